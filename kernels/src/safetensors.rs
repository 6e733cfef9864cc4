//! Safetensors reader: an 8-byte little-endian header length, a JSON header mapping tensor
//! names to `{dtype, shape, data_offsets: [begin, end]}` (offsets relative to the end of the
//! header), then the data. Files are memory-mapped; tensors are zero-copy views.

use crate::tensor::{DType, Storage, WeightTensor};
use memmap2::Mmap;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Headers larger than this are corruption (real ones are well under a few MB).
const MAX_HEADER: u64 = 100 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SafetensorsError {
    #[error("cannot open {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {problem}")]
    BadHeader { path: PathBuf, problem: String },
    #[error("{path}: tensor {name:?}: {problem}")]
    BadTensor {
        path: PathBuf,
        name: String,
        problem: String,
    },
}

#[derive(Deserialize)]
struct RawInfo {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

/// One mapped safetensors file.
pub struct SafetensorsFile {
    pub path: PathBuf,
    map: Arc<Mmap>,
    tensors: BTreeMap<String, (DType, Vec<usize>, usize, usize)>,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<SafetensorsFile, SafetensorsError> {
        let io = |source| SafetensorsError::Io {
            path: path.to_path_buf(),
            source,
        };
        let bad = |problem: String| SafetensorsError::BadHeader {
            path: path.to_path_buf(),
            problem,
        };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len < 8 {
            return Err(bad(format!("{len} bytes is too short for a header")));
        }
        // SAFETY: read-only map; the file must not be truncated while mapped.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        let mut n = [0u8; 8];
        n.copy_from_slice(&map[..8]);
        let header_len = u64::from_le_bytes(n);
        if header_len > MAX_HEADER || 8 + header_len > len {
            return Err(bad(format!(
                "header length {header_len} exceeds the file ({len} bytes)"
            )));
        }
        let data_start = 8 + header_len as usize;
        let header: BTreeMap<String, serde_json::Value> =
            serde_json::from_slice(&map[8..data_start])
                .map_err(|e| bad(format!("header is not JSON: {e}")))?;
        let data_len = map.len() - data_start;
        let mut tensors = BTreeMap::new();
        for (name, value) in header {
            if name == "__metadata__" {
                continue;
            }
            let bad_t = |problem: String| SafetensorsError::BadTensor {
                path: path.to_path_buf(),
                name: name.clone(),
                problem,
            };
            let info: RawInfo = serde_json::from_value(value).map_err(|e| bad_t(e.to_string()))?;
            let dtype = match info.dtype.as_str() {
                "F32" => DType::F32,
                "F16" => DType::F16,
                "BF16" => DType::BF16,
                other => return Err(bad_t(format!("unsupported dtype {other}"))),
            };
            let [begin, end] = info.data_offsets;
            if begin > end || end > data_len as u64 {
                return Err(bad_t(format!(
                    "data offsets [{begin}, {end}] outside the {data_len} data bytes"
                )));
            }
            let numel = info
                .shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| bad_t(format!("shape {:?} overflows", info.shape)))?;
            let want = numel.checked_mul(dtype.block_bytes());
            if want != Some((end - begin) as usize) {
                return Err(bad_t(format!(
                    "shape {:?} of {dtype:?} needs {want:?} bytes, data has {}",
                    info.shape,
                    end - begin
                )));
            }
            tensors.insert(
                name,
                (
                    dtype,
                    info.shape,
                    data_start + begin as usize,
                    (end - begin) as usize,
                ),
            );
        }
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            map: Arc::new(map),
            tensors,
        })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn tensor(&self, name: &str) -> Option<WeightTensor> {
        let (dtype, shape, offset, len) = self.tensors.get(name)?;
        Some(WeightTensor {
            name: name.to_string(),
            dtype: *dtype,
            shape: shape.clone(),
            storage: Storage::Mapped {
                map: Arc::clone(&self.map),
                offset: *offset,
                len: *len,
            },
        })
    }
}

/// Writes a safetensors file (tests and tools): `(name, dtype, shape, bytes)`.
pub fn write(path: &Path, tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) -> std::io::Result<()> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, dtype, shape, data) in tensors {
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + data.len()]}),
        );
        offset += data.len();
    }
    let mut json = serde_json::Value::Object(header).to_string().into_bytes();
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len() + offset);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    for (_, _, _, data) in tensors {
        out.extend_from_slice(data);
    }
    std::fs::write(path, out)
}
