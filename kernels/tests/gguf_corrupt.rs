//! The GGUF reader on broken input: truncated and corrupted copies of the real model, and
//! random bytes. Every case must be an error (or, for harmless flips, a success), never a
//! panic.

use proptest::prelude::*;
use std::path::PathBuf;
use turbine_kernels::gguf::writer::{build, TensorSpec};
use turbine_kernels::gguf::{GgufError, GgufFile, GgufHeader, MetaValue};
use turbine_kernels::loader::{default_model_path, load_model, LoadError};

fn model_bytes() -> Option<Vec<u8>> {
    let path = default_model_path();
    if !path.exists() {
        eprintln!(
            "SKIPPED: model {} absent (run scripts/fetch-model.sh)",
            path.display()
        );
        return None;
    }
    Some(std::fs::read(path).expect("model readable"))
}

fn temp_path(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("turbine-gguf-{}-{tag}.gguf", std::process::id()))
}

#[test]
fn truncated_real_file_is_an_error_naming_the_problem() {
    let Some(bytes) = model_bytes() else { return };
    let header = GgufHeader::parse(&bytes).expect("real file parses");
    let data = header.data_offset;
    let cuts = [
        0,
        3,
        4,
        8,
        23,
        100,
        10_000,
        data / 2,
        data - 1,
        data,
        data + 4096,
        bytes.len() - 1,
    ];
    for cut in cuts {
        let err = GgufHeader::parse(&bytes[..cut]).expect_err("truncated file parsed");
        assert!(
            matches!(err, GgufError::Truncated { .. }),
            "cut at {cut}: unexpected error {err}"
        );
    }
    // Through the whole loader too, from a file on disk.
    let path = temp_path("trunc");
    std::fs::write(&path, &bytes[..data + 4096]).unwrap();
    let err = load_model(&path).expect_err("truncated model loaded");
    std::fs::remove_file(&path).ok();
    assert!(
        matches!(err, LoadError::Gguf(GgufError::Truncated { .. })),
        "{err}"
    );
    assert!(
        err.to_string().contains("tensor"),
        "error names the tensor: {err}"
    );
}

#[test]
fn random_flips_in_the_real_header_never_panic() {
    let Some(bytes) = model_bytes() else { return };
    let header_len = GgufHeader::parse(&bytes).unwrap().data_offset;
    // Only the header is parsed; keep a short data tail so bounds checks still run.
    let mut buf = bytes[..(header_len + (1 << 20)).min(bytes.len())].to_vec();
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let (mut ok, mut err) = (0, 0);
    for _ in 0..60 {
        let mut saved = Vec::new();
        for _ in 0..4 {
            // Bias towards the start, where counts and lengths live.
            let limit = if next() % 2 == 0 { 4096 } else { header_len };
            let pos = (next() as usize) % limit;
            saved.push((pos, buf[pos]));
            buf[pos] = next() as u8;
        }
        match GgufHeader::parse(&buf) {
            Ok(_) => ok += 1,
            Err(_) => err += 1,
        }
        for (pos, b) in saved.into_iter().rev() {
            buf[pos] = b;
        }
    }
    eprintln!("corrupted headers: {ok} parsed, {err} rejected");
}

#[test]
fn synthetic_bad_headers() {
    // Wrong magic, unsupported version, absurd counts, a string longer than the file.
    assert!(matches!(
        GgufHeader::parse(b"GGML\x03\0\0\0"),
        Err(GgufError::BadMagic(_))
    ));
    let mut v = b"GGUF".to_vec();
    v.extend_from_slice(&4u32.to_le_bytes());
    assert!(matches!(
        GgufHeader::parse(&v),
        Err(GgufError::BadVersion(4))
    ));
    let mut v = b"GGUF".to_vec();
    v.extend_from_slice(&3u32.to_le_bytes());
    v.extend_from_slice(&0u64.to_le_bytes());
    v.extend_from_slice(&1u64.to_le_bytes());
    v.extend_from_slice(&u64::MAX.to_le_bytes()); // key length
    assert!(matches!(
        GgufHeader::parse(&v),
        Err(GgufError::Truncated { .. })
    ));
    // A tensor whose data runs past the end of the file.
    let mut file = build(
        &[("general.architecture", MetaValue::Str("llama".into()))],
        &[TensorSpec {
            name: "blk.0.attn_q.weight".into(),
            shape: vec![4, 32],
            type_id: 3,
            data: vec![0; 4 * 20],
        }],
    );
    file.truncate(file.len() - 1);
    let err = GgufHeader::parse(&file).unwrap_err();
    assert!(err.to_string().contains("blk.0.attn_q.weight"), "{err}");
    // Bad alignment value.
    let file = build(&[("general.alignment", MetaValue::U32(3))], &[]);
    assert!(matches!(
        GgufHeader::parse(&file),
        Err(GgufError::BadMetadata { .. })
    ));
}

#[test]
fn missing_file_and_non_gguf_file() {
    let err = load_model(&PathBuf::from("/nonexistent/model.gguf")).unwrap_err();
    assert!(matches!(err, LoadError::NotFound(_)));
    let path = temp_path("text");
    std::fs::write(&path, b"hello, this is not a model").unwrap();
    let err = GgufFile::open(&path).unwrap_err();
    std::fs::remove_file(&path).ok();
    assert!(matches!(err, GgufError::BadMagic(_)), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn random_bytes_after_magic_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut v = b"GGUF\x03\0\0\0".to_vec();
        v.extend_from_slice(&tail);
        let _ = GgufHeader::parse(&v);
    }

    #[test]
    fn random_small_counts_never_panic(
        n_tensors in 0u64..4, n_kv in 0u64..4, tail in proptest::collection::vec(any::<u8>(), 0..256)
    ) {
        let mut v = b"GGUF\x03\0\0\0".to_vec();
        v.extend_from_slice(&n_tensors.to_le_bytes());
        v.extend_from_slice(&n_kv.to_le_bytes());
        v.extend_from_slice(&tail);
        let _ = GgufHeader::parse(&v);
    }
}
