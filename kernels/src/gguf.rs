//! GGUF reader: header, metadata key/values, tensor infos, and zero-copy tensor data through a
//! memory map.
//!
//! Layout (GGUF v2/v3, little-endian): magic `GGUF`, `u32` version, `u64` tensor count, `u64`
//! metadata count; then the metadata (`string` key, `u32` value type, value), then per tensor
//! (`string` name, `u32` n_dims, `u64` dims innermost-first, `u32` ggml type, `u64` offset into
//! the data section); the data section starts at the next multiple of `general.alignment`
//! (default 32). Strings are a `u64` byte length plus UTF-8 bytes.
//!
//! Every length and count read from the file is checked against the bytes that remain, so a
//! corrupt or truncated file yields a [`GgufError`], never a panic or a huge allocation.

use crate::tensor::{DType, Storage, WeightTensor};
use memmap2::Mmap;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Arrays nested deeper than this are treated as corruption (real files nest at most once).
const MAX_ARRAY_DEPTH: usize = 4;
/// More dimensions than this is corruption (ggml's GGML_MAX_DIMS is 4).
const MAX_DIMS: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot open {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("not a GGUF file: magic is {0:02x?}, expected \"GGUF\"")]
    BadMagic([u8; 4]),
    #[error("unsupported GGUF version {0} (supported: 2, 3)")]
    BadVersion(u32),
    #[error("file truncated while reading {what} at byte {offset}")]
    Truncated { what: String, offset: usize },
    #[error("corrupt metadata value for key {key:?}: {problem}")]
    BadMetadata { key: String, problem: String },
    #[error("tensor {name:?}: {problem}")]
    BadTensor { name: String, problem: String },
    #[error("tensor {name:?}: unknown or unsupported ggml type id {type_id}")]
    UnknownDType { name: String, type_id: u32 },
    #[error("tensor {name:?} not found in the file")]
    MissingTensor { name: String },
    #[error("metadata key {key:?} is missing")]
    MissingKey { key: String },
    #[error("metadata key {key:?} has type {found}, expected {expected}")]
    WrongType {
        key: String,
        expected: &'static str,
        found: &'static str,
    },
}

/// One metadata value. Arrays hold values of one element type.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Vec<MetaValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetaValue {
    pub fn type_name(&self) -> &'static str {
        match self {
            MetaValue::U8(_) => "u8",
            MetaValue::I8(_) => "i8",
            MetaValue::U16(_) => "u16",
            MetaValue::I16(_) => "i16",
            MetaValue::U32(_) => "u32",
            MetaValue::I32(_) => "i32",
            MetaValue::F32(_) => "f32",
            MetaValue::Bool(_) => "bool",
            MetaValue::Str(_) => "string",
            MetaValue::Array(_) => "array",
            MetaValue::U64(_) => "u64",
            MetaValue::I64(_) => "i64",
            MetaValue::F64(_) => "f64",
        }
    }

    /// Any integer type, as `u64` when it is non-negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer type as `i64` (u64 values above `i64::MAX` give `None`).
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetaValue::I8(v) => Some(v.into()),
            MetaValue::I16(v) => Some(v.into()),
            MetaValue::I32(v) => Some(v.into()),
            MetaValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// Any float or integer type as `f64`.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v.into()),
            MetaValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where one tensor lies in the data section, as the header describes it.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Outermost-first (row-major), i.e. ggml's `ne` reversed.
    pub shape: Vec<usize>,
    pub dtype: DType,
    /// Offset from the start of the data section.
    pub offset: u64,
    /// Bytes the tensor occupies, from its dtype and shape.
    pub n_bytes: usize,
}

/// Everything before the tensor data: parsed from bytes alone, so it can be tested (and
/// fuzzed) without a file.
#[derive(Clone, Debug)]
pub struct GgufHeader {
    pub version: u32,
    pub metadata: BTreeMap<String, MetaValue>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Absolute file offset of the data section.
    pub data_offset: usize,
}

impl GgufHeader {
    /// Parses the header from the file's bytes and checks that every tensor's data lies
    /// inside `bytes`.
    pub fn parse(bytes: &[u8]) -> Result<GgufHeader, GgufError> {
        let mut r = Reader { bytes, pos: 0 };
        let magic: [u8; 4] = r.take_array("magic")?;
        if &magic != MAGIC {
            return Err(GgufError::BadMagic(magic));
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::BadVersion(version));
        }
        let n_tensors = r.u64("tensor count")?;
        let n_kv = r.u64("metadata count")?;

        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = r.string(&format!("metadata key #{i}"))?;
            let type_id = r.u32(&format!("type of metadata {key:?}"))?;
            let value = r.value(&key, type_id, 0)?;
            metadata.insert(key, value);
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => {
                    return Err(GgufError::BadMetadata {
                        key: "general.alignment".into(),
                        problem: format!("{v:?} is not a power of two"),
                    })
                }
            },
        };

        // Each tensor info takes at least 8 (name len) + 4 + 4 + 8 bytes: a cheap bound that
        // keeps a corrupt count from reserving memory.
        let cap = usize::try_from(n_tensors)
            .unwrap_or(usize::MAX)
            .min(r.remaining() / 24);
        let mut tensors = Vec::with_capacity(cap);
        for i in 0..n_tensors {
            tensors.push(r.tensor_info(i)?);
        }

        let data_offset =
            align_up(r.pos as u64, alignment).ok_or_else(|| GgufError::Truncated {
                what: "data section".into(),
                offset: r.pos,
            })?;
        let data_offset = usize::try_from(data_offset).map_err(|_| GgufError::Truncated {
            what: "data section".into(),
            offset: r.pos,
        })?;
        let header = GgufHeader {
            version,
            metadata,
            tensors,
            alignment,
            data_offset,
        };
        header.check_tensor_bounds(bytes.len())?;
        Ok(header)
    }

    fn check_tensor_bounds(&self, file_len: usize) -> Result<(), GgufError> {
        for t in &self.tensors {
            if t.offset % self.alignment != 0 {
                return Err(GgufError::BadTensor {
                    name: t.name.clone(),
                    problem: format!(
                        "data offset {} is not aligned to {}",
                        t.offset, self.alignment
                    ),
                });
            }
            let end = (self.data_offset as u64)
                .checked_add(t.offset)
                .and_then(|s| s.checked_add(t.n_bytes as u64));
            match end {
                Some(end) if end <= file_len as u64 => {}
                _ => {
                    return Err(GgufError::Truncated {
                        what: format!(
                            "data of tensor {:?} ({} bytes at data offset {})",
                            t.name, t.n_bytes, t.offset
                        ),
                        offset: file_len,
                    })
                }
            }
        }
        Ok(())
    }
}

/// An open GGUF file: its header plus the memory map the tensors point into.
#[derive(Clone, Debug)]
pub struct GgufFile {
    pub path: PathBuf,
    pub header: GgufHeader,
    map: Arc<Mmap>,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile, GgufError> {
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len < 4 {
            return Err(GgufError::Truncated {
                what: "magic".into(),
                offset: 0,
            });
        }
        // SAFETY: the map is read-only; like every mmap-based model loader we rely on the file
        // not being truncated by another process while it is mapped.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        let header = GgufHeader::parse(&map)?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            header,
            map: Arc::new(map),
        })
    }

    pub fn metadata(&self) -> &BTreeMap<String, MetaValue> {
        &self.header.metadata
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.header.metadata.get(key)
    }

    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        let v = self.require(key)?;
        v.as_str().ok_or_else(|| wrong_type(key, "string", v))
    }

    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        let v = self.require(key)?;
        v.as_u64()
            .ok_or_else(|| wrong_type(key, "unsigned integer", v))
    }

    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        let v = self.require(key)?;
        v.as_f64().ok_or_else(|| wrong_type(key, "number", v))
    }

    pub fn get_array(&self, key: &str) -> Result<&[MetaValue], GgufError> {
        let v = self.require(key)?;
        v.as_array().ok_or_else(|| wrong_type(key, "array", v))
    }

    fn require(&self, key: &str) -> Result<&MetaValue, GgufError> {
        self.get(key)
            .ok_or_else(|| GgufError::MissingKey { key: key.into() })
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.header.tensors.iter().find(|t| t.name == name)
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.tensor_info(name).is_some()
    }

    /// The named tensor as a zero-copy view into the map.
    pub fn tensor(&self, name: &str) -> Result<WeightTensor, GgufError> {
        let info = self
            .tensor_info(name)
            .ok_or_else(|| GgufError::MissingTensor { name: name.into() })?;
        // Bounds were checked in `GgufHeader::parse`, against this same map.
        let offset = self.header.data_offset + info.offset as usize;
        Ok(WeightTensor {
            name: info.name.clone(),
            dtype: info.dtype,
            shape: info.shape.clone(),
            storage: Storage::Mapped {
                map: Arc::clone(&self.map),
                offset,
                len: info.n_bytes,
            },
        })
    }
}

fn wrong_type(key: &str, expected: &'static str, v: &MetaValue) -> GgufError {
    GgufError::WrongType {
        key: key.into(),
        expected,
        found: v.type_name(),
    }
}

fn align_up(x: u64, a: u64) -> Option<u64> {
    Some(x.checked_add(a - 1)? / a * a)
}

/// A bounds-checked little-endian cursor.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], GgufError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        match end {
            Some(end) => {
                let s = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(GgufError::Truncated {
                what: what.into(),
                offset: self.pos,
            }),
        }
    }

    fn take_array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.take_array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.take_array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        let len = usize::try_from(len).map_err(|_| GgufError::Truncated {
            what: what.into(),
            offset: self.pos,
        })?;
        let raw = self.take(len, what)?;
        // Token texts are occasionally not valid UTF-8 in the wild; keep them readable.
        Ok(String::from_utf8_lossy(raw).into_owned())
    }

    fn value(&mut self, key: &str, type_id: u32, depth: usize) -> Result<MetaValue, GgufError> {
        Ok(match type_id {
            0 => MetaValue::U8(self.take_array::<1>(key)?[0]),
            1 => MetaValue::I8(i8::from_le_bytes(self.take_array(key)?)),
            2 => MetaValue::U16(u16::from_le_bytes(self.take_array(key)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.take_array(key)?)),
            4 => MetaValue::U32(self.u32(key)?),
            5 => MetaValue::I32(i32::from_le_bytes(self.take_array(key)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.take_array(key)?)),
            7 => match self.take_array::<1>(key)?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => {
                    return Err(GgufError::BadMetadata {
                        key: key.into(),
                        problem: format!("bool byte {b} is neither 0 nor 1"),
                    })
                }
            },
            8 => MetaValue::Str(self.string(key)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufError::BadMetadata {
                        key: key.into(),
                        problem: "arrays nested too deeply".into(),
                    });
                }
                let elem_type = self.u32(key)?;
                let count = self.u64(key)?;
                // Every element takes at least one byte: a count beyond the remaining bytes is
                // corruption, caught before any allocation.
                if count > self.remaining() as u64 {
                    return Err(GgufError::Truncated {
                        what: format!("array {key:?} of {count} elements"),
                        offset: self.pos,
                    });
                }
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(key, elem_type, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64(key)?),
            11 => MetaValue::I64(i64::from_le_bytes(self.take_array(key)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.take_array(key)?)),
            other => {
                return Err(GgufError::BadMetadata {
                    key: key.into(),
                    problem: format!("unknown value type {other}"),
                })
            }
        })
    }

    fn tensor_info(&mut self, index: u64) -> Result<TensorInfo, GgufError> {
        let name = self.string(&format!("name of tensor #{index}"))?;
        let bad = |problem: String| GgufError::BadTensor {
            name: name.clone(),
            problem,
        };
        let n_dims = self.u32(&format!("dims of tensor {name:?}"))?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(bad(format!(
                "{n_dims} dimensions (expected 1..={MAX_DIMS})"
            )));
        }
        let mut ne = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            let d = self.u64(&format!("dims of tensor {name:?}"))?;
            ne.push(usize::try_from(d).map_err(|_| bad(format!("dimension {d} too large")))?);
        }
        let type_id = self.u32(&format!("type of tensor {name:?}"))?;
        let offset = self.u64(&format!("offset of tensor {name:?}"))?;
        let dtype = DType::from_ggml(type_id).ok_or_else(|| GgufError::UnknownDType {
            name: name.clone(),
            type_id,
        })?;
        let numel = ne
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| bad(format!("shape {ne:?} overflows")))?;
        if ne[0] % dtype.block_elems() != 0 {
            return Err(bad(format!(
                "row length {} is not a multiple of the {:?} block size {}",
                ne[0],
                dtype,
                dtype.block_elems()
            )));
        }
        let n_bytes = numel
            .checked_div(dtype.block_elems())
            .and_then(|blocks| blocks.checked_mul(dtype.block_bytes()))
            .ok_or_else(|| bad(format!("shape {ne:?} overflows")))?;
        ne.reverse();
        Ok(TensorInfo {
            name,
            shape: ne,
            dtype,
            offset,
            n_bytes,
        })
    }
}

/// Builds GGUF bytes in tests (here and in integration tests): a tiny writer, so that
/// synthetic files exercise the same parser as real ones.
pub mod writer {
    use super::MetaValue;

    /// Appends a GGUF string.
    pub fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    fn type_id(v: &MetaValue) -> u32 {
        match v {
            MetaValue::U8(_) => 0,
            MetaValue::I8(_) => 1,
            MetaValue::U16(_) => 2,
            MetaValue::I16(_) => 3,
            MetaValue::U32(_) => 4,
            MetaValue::I32(_) => 5,
            MetaValue::F32(_) => 6,
            MetaValue::Bool(_) => 7,
            MetaValue::Str(_) => 8,
            MetaValue::Array(_) => 9,
            MetaValue::U64(_) => 10,
            MetaValue::I64(_) => 11,
            MetaValue::F64(_) => 12,
        }
    }

    /// Appends a value's payload (without its type id).
    pub fn put_value(out: &mut Vec<u8>, v: &MetaValue) {
        match v {
            MetaValue::U8(x) => out.push(*x),
            MetaValue::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::Bool(x) => out.push(u8::from(*x)),
            MetaValue::Str(s) => put_str(out, s),
            MetaValue::Array(items) => {
                let elem = items.first().map(type_id).unwrap_or(0);
                out.extend_from_slice(&elem.to_le_bytes());
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for it in items {
                    put_value(out, it);
                }
            }
            MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        }
    }

    /// A tensor to write: name, shape outermost-first, ggml type id, raw data.
    pub struct TensorSpec {
        pub name: String,
        pub shape: Vec<usize>,
        pub type_id: u32,
        pub data: Vec<u8>,
    }

    /// A whole GGUF v3 file with alignment 32.
    pub fn build(metadata: &[(&str, MetaValue)], tensors: &[TensorSpec]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (k, v) in metadata {
            put_str(&mut out, k);
            out.extend_from_slice(&type_id(v).to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0u64;
        let mut offsets = Vec::new();
        for t in tensors {
            put_str(&mut out, &t.name);
            out.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
            for d in t.shape.iter().rev() {
                out.extend_from_slice(&(*d as u64).to_le_bytes());
            }
            out.extend_from_slice(&t.type_id.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offsets.push(offset);
            offset = (offset + t.data.len() as u64).div_ceil(32) * 32;
        }
        while out.len() % 32 != 0 {
            out.push(0);
        }
        let base = out.len();
        for (t, off) in tensors.iter().zip(offsets) {
            out.resize(base + off as usize, 0);
            out.extend_from_slice(&t.data);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::writer::{build, TensorSpec};
    use super::*;

    fn sample() -> Vec<u8> {
        build(
            &[
                ("general.architecture", MetaValue::Str("llama".into())),
                ("n", MetaValue::U32(7)),
                ("f", MetaValue::F32(0.5)),
                ("b", MetaValue::Bool(true)),
                (
                    "arr",
                    MetaValue::Array(vec![MetaValue::Str("a".into()), MetaValue::Str("b".into())]),
                ),
                ("i64", MetaValue::I64(-3)),
            ],
            &[
                TensorSpec {
                    name: "v".into(),
                    shape: vec![3],
                    type_id: 0,
                    data: [1.0f32, 2.0, 3.0]
                        .iter()
                        .flat_map(|x| x.to_le_bytes())
                        .collect(),
                },
                TensorSpec {
                    name: "m".into(),
                    shape: vec![2, 32],
                    type_id: 8,
                    data: vec![0u8; 2 * 34],
                },
            ],
        )
    }

    #[test]
    fn parses_synthetic_file() {
        let bytes = sample();
        let h = GgufHeader::parse(&bytes).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.metadata["n"].as_u64(), Some(7));
        assert_eq!(h.metadata["f"].as_f64(), Some(0.5));
        assert_eq!(h.metadata["b"].as_bool(), Some(true));
        assert_eq!(h.metadata["i64"].as_i64(), Some(-3));
        assert_eq!(h.metadata["arr"].as_array().unwrap().len(), 2);
        assert_eq!(h.tensors[0].shape, vec![3]);
        assert_eq!(h.tensors[1].shape, vec![2, 32]);
        assert_eq!(h.tensors[1].dtype, DType::Q8_0);
        assert_eq!(h.tensors[1].n_bytes, 68);
        assert_eq!(h.data_offset % 32, 0);
    }

    #[test]
    fn rejects_bad_magic_and_version() {
        let mut b = sample();
        b[0] = b'X';
        assert!(matches!(GgufHeader::parse(&b), Err(GgufError::BadMagic(_))));
        let mut b = sample();
        b[4..8].copy_from_slice(&1u32.to_le_bytes());
        assert!(matches!(
            GgufHeader::parse(&b),
            Err(GgufError::BadVersion(1))
        ));
    }

    #[test]
    fn every_truncation_is_an_error() {
        let b = sample();
        for len in 0..b.len() {
            assert!(GgufHeader::parse(&b[..len]).is_err(), "len {len} parsed");
        }
    }

    #[test]
    fn huge_counts_do_not_allocate_or_panic() {
        let mut b = sample();
        b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(GgufHeader::parse(&b).is_err());
        let mut b = sample();
        b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(GgufHeader::parse(&b).is_err());
    }

    #[test]
    fn unknown_dtype_names_the_tensor() {
        let b = build(
            &[],
            &[TensorSpec {
                name: "weird".into(),
                shape: vec![4],
                type_id: 99,
                data: vec![0; 16],
            }],
        );
        let err = GgufHeader::parse(&b).unwrap_err();
        assert!(
            matches!(err, GgufError::UnknownDType { ref name, type_id: 99 } if name == "weird")
        );
        assert!(err.to_string().contains("weird"));
    }

    #[test]
    fn misaligned_quant_row_is_a_shape_error() {
        let b = build(
            &[],
            &[TensorSpec {
                name: "q".into(),
                shape: vec![2, 33],
                type_id: 2,
                data: vec![0; 64],
            }],
        );
        let err = GgufHeader::parse(&b).unwrap_err();
        assert!(
            matches!(err, GgufError::BadTensor { ref name, .. } if name == "q"),
            "{err}"
        );
    }
}
