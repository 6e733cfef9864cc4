//! Bench command for the loaders and the GGUF tokenizer:
//!
//!     cargo run -p turbine-kernels --example tokenizer_bench
//!
//! Measures (median of 5 runs) the default model's load time and encode throughput on a
//! ~250 KB text built from the reference prompts (tests/fixtures/llamacpp_reference.json),
//! with a cold word cache (fresh tokenizer) and a warm one, plus decode throughput. Writes the
//! text to $TURBINE_BENCH_TEXT (if set) so the same input can be fed to llama.cpp; with
//! $TURBINE_BENCH_IDS naming a JSON array of llama.cpp's ids for that text, checks them.

use std::path::PathBuf;
use std::time::Instant;
use turbine_kernels::gguf::GgufFile;
use turbine_kernels::loader::{default_model_path, load_model};
use turbine_kernels::tokenizer::Tokenizer;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let path = default_model_path();
    if !path.exists() {
        eprintln!(
            "model {} absent (run scripts/fetch-model.sh)",
            path.display()
        );
        std::process::exit(1);
    }
    let fx: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../tests/fixtures/llamacpp_reference.json"),
        )
        .expect("fixture"),
    )
    .expect("fixture JSON");
    let mut text = String::new();
    for i in 0..200 {
        for p in fx["prompts"].as_array().expect("prompts") {
            text.push_str(p["text"].as_str().expect("text"));
            text.push_str(&format!(" {i}\n"));
        }
    }
    if let Some(out) = std::env::var_os("TURBINE_BENCH_TEXT") {
        std::fs::write(out, &text).expect("write bench text");
    }
    let mb = text.len() as f64 / 1e6;

    let load: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            let m = load_model(&path).expect("load");
            std::hint::black_box(&m);
            t.elapsed().as_secs_f64()
        })
        .collect();
    println!(
        "load_model (GGUF, mmap, tokenizer build): median {:.1} ms",
        median(load) * 1e3
    );

    let g = GgufFile::open(&path).expect("open");
    let mut n_tokens = 0;
    let cold: Vec<f64> = (0..5)
        .map(|_| {
            let tok = Tokenizer::from_gguf(&g).expect("tokenizer");
            let t = Instant::now();
            n_tokens = tok.encode(&text, false).expect("encode").len();
            t.elapsed().as_secs_f64()
        })
        .collect();
    let tok = Tokenizer::from_gguf(&g).expect("tokenizer");
    let ids = tok.encode(&text, false).expect("encode");
    let warm: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(tok.encode(&text, false).expect("encode"));
            t.elapsed().as_secs_f64()
        })
        .collect();
    let dec: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(tok.decode(&ids, false).expect("decode"));
            t.elapsed().as_secs_f64()
        })
        .collect();
    if let Some(file) = std::env::var_os("TURBINE_BENCH_IDS") {
        let want: Vec<u32> =
            serde_json::from_str(&std::fs::read_to_string(file).expect("ids file")).expect("ids");
        let first_diff = ids.iter().zip(&want).position(|(a, b)| a != b);
        if ids == want {
            println!("ids identical to the reference ({} tokens)", want.len());
        } else {
            println!(
                "ids DIFFER from the reference: {} vs {} tokens, first difference at {first_diff:?}",
                ids.len(),
                want.len()
            );
        }
    }
    let (cold, warm, dec) = (median(cold), median(warm), median(dec));
    println!("text: {:.3} MB, {n_tokens} tokens", mb);
    println!(
        "encode cold cache: median {:.1} ms = {:.2} MB/s = {:.0} tokens/s",
        cold * 1e3,
        mb / cold,
        n_tokens as f64 / cold
    );
    println!(
        "encode warm cache: median {:.1} ms = {:.2} MB/s = {:.0} tokens/s",
        warm * 1e3,
        mb / warm,
        n_tokens as f64 / warm
    );
    println!(
        "decode: median {:.2} ms = {:.0} tokens/s",
        dec * 1e3,
        n_tokens as f64 / dec
    );
}
