//! A minimal GGUF reader for the CPU benchmark and the llama.cpp comparison test, so they
//! can run before (and independently of) the crate's full loader. Llama-architecture files
//! with F32/F16/Q4_0/Q4_1/Q8_0 tensors only; test/bench code, so errors are plain strings.

// Shared by a bench and a test that each use part of it.
#![allow(dead_code)]

use memmap2::Mmap;
use std::collections::BTreeMap;
use std::sync::Arc;
use turbine_kernels::model::{LayerWeights, ModelConfig, ModelWeights, RopeStyle};
use turbine_kernels::tensor::{DType, Storage, WeightTensor};

#[derive(Debug, Clone)]
pub enum Meta {
    Int(i64),
    Float(f64),
    Str(String),
    Other,
}

struct Cursor<'a> {
    b: &'a [u8],
    p: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let s = self.b.get(self.p..self.p + n).ok_or("truncated GGUF")?;
        self.p += n;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().map_err(|_| "u32")?,
        ))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().map_err(|_| "u64")?,
        ))
    }
    fn string(&mut self) -> Result<String, String> {
        let n = self.u64()? as usize;
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }
    fn value(&mut self, t: u32) -> Result<Meta, String> {
        Ok(match t {
            0 => Meta::Int(self.take(1)?[0] as i64),
            1 => Meta::Int(self.take(1)?[0] as i8 as i64),
            2 => Meta::Int(u16::from_le_bytes([self.take(1)?[0], self.take(1)?[0]]) as i64),
            3 => Meta::Int(i16::from_le_bytes([self.take(1)?[0], self.take(1)?[0]]) as i64),
            4 => Meta::Int(self.u32()? as i64),
            5 => Meta::Int(self.u32()? as i32 as i64),
            6 => Meta::Float(f32::from_bits(self.u32()?) as f64),
            7 => Meta::Int(self.take(1)?[0] as i64),
            8 => Meta::Str(self.string()?),
            9 => {
                let at = self.u32()?;
                let n = self.u64()?;
                for _ in 0..n {
                    self.value(at)?;
                }
                Meta::Other
            }
            10 | 11 => Meta::Int(self.u64()? as i64),
            12 => Meta::Float(f64::from_bits(self.u64()?)),
            _ => return Err(format!("unknown GGUF value type {t}")),
        })
    }
}

pub struct Gguf {
    pub meta: BTreeMap<String, Meta>,
    pub tensors: BTreeMap<String, WeightTensor>,
}

pub fn read(path: &str) -> Result<Gguf, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{path}: {e}"))?;
    // SAFETY: the model file is not modified while mapped (read-only bench input).
    let map = Arc::new(unsafe { Mmap::map(&file) }.map_err(|e| e.to_string())?);
    let mut c = Cursor { b: &map, p: 0 };
    if c.take(4)? != b"GGUF" {
        return Err("not a GGUF file".into());
    }
    let _version = c.u32()?;
    let n_tensors = c.u64()?;
    let n_kv = c.u64()?;
    let mut meta = BTreeMap::new();
    for _ in 0..n_kv {
        let k = c.string()?;
        let t = c.u32()?;
        meta.insert(k, c.value(t)?);
    }
    let mut infos = Vec::new();
    for _ in 0..n_tensors {
        let name = c.string()?;
        let nd = c.u32()?;
        let mut dims = Vec::new();
        for _ in 0..nd {
            dims.push(c.u64()? as usize);
        }
        let t = c.u32()?;
        let off = c.u64()? as usize;
        infos.push((name, dims, t, off));
    }
    let align = match meta.get("general.alignment") {
        Some(Meta::Int(a)) => *a as usize,
        _ => 32,
    };
    let data = c.p.div_ceil(align) * align;
    let mut tensors = BTreeMap::new();
    for (name, dims, t, off) in infos {
        let dtype = DType::from_ggml(t).ok_or(format!("{name}: unsupported ggml type {t}"))?;
        let shape: Vec<usize> = dims.iter().rev().copied().collect();
        let len = dtype
            .bytes_for(shape.iter().product())
            .ok_or(format!("{name}: bad shape"))?;
        let offset = data + off;
        if offset + len > map.len() {
            return Err(format!("{name}: data past end of file"));
        }
        let storage = Storage::Mapped {
            map: map.clone(),
            offset,
            len,
        };
        tensors.insert(
            name.clone(),
            WeightTensor {
                name,
                dtype,
                shape,
                storage,
            },
        );
    }
    Ok(Gguf { meta, tensors })
}

impl Gguf {
    fn int(&self, k: &str) -> Result<usize, String> {
        match self.meta.get(k) {
            Some(Meta::Int(v)) => Ok(*v as usize),
            _ => Err(format!("missing {k}")),
        }
    }
    fn float(&self, k: &str) -> Result<f32, String> {
        match self.meta.get(k) {
            Some(Meta::Float(v)) => Ok(*v as f32),
            _ => Err(format!("missing {k}")),
        }
    }
    fn tensor(&self, k: &str) -> Result<WeightTensor, String> {
        self.tensors
            .get(k)
            .cloned()
            .ok_or(format!("missing tensor {k}"))
    }

    /// Llama-architecture config and weights.
    pub fn llama(&self) -> Result<(ModelConfig, ModelWeights), String> {
        let n_heads = self.int("llama.attention.head_count")?;
        let hidden = self.int("llama.embedding_length")?;
        let embd = self.tensor("token_embd.weight")?;
        let output = self.tensors.get("output.weight").cloned();
        let config = ModelConfig {
            arch: "llama".into(),
            vocab_size: embd.rows(),
            hidden_size: hidden,
            n_layers: self.int("llama.block_count")?,
            n_heads,
            n_kv_heads: self.int("llama.attention.head_count_kv")?,
            head_dim: hidden / n_heads,
            intermediate_size: self.int("llama.feed_forward_length")?,
            rope_theta: self.float("llama.rope.freq_base").unwrap_or(10000.0),
            rope_style: RopeStyle::Interleaved,
            rms_norm_eps: self.float("llama.attention.layer_norm_rms_epsilon")?,
            max_position: self.int("llama.context_length")?,
            tie_embeddings: output.is_none(),
        };
        let layers = (0..config.n_layers)
            .map(|i| {
                let t = |s: &str| self.tensor(&format!("blk.{i}.{s}.weight"));
                Ok(LayerWeights {
                    attn_norm: t("attn_norm")?,
                    wq: t("attn_q")?,
                    wk: t("attn_k")?,
                    wv: t("attn_v")?,
                    wo: t("attn_output")?,
                    bq: None,
                    bk: None,
                    bv: None,
                    ffn_norm: t("ffn_norm")?,
                    w_gate: t("ffn_gate")?,
                    w_up: t("ffn_up")?,
                    w_down: t("ffn_down")?,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok((
            config,
            ModelWeights {
                token_embd: embd,
                layers,
                output_norm: self.tensor("output_norm.weight")?,
                output,
            },
        ))
    }
}

/// The model path: `TURBINE_MODEL`, else the default cache location.
pub fn default_model_path() -> String {
    std::env::var("TURBINE_MODEL").unwrap_or_else(|_| {
        let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
        format!("{home}/.cache/turbine/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    })
}
