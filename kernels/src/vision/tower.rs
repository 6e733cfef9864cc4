//! The Idefics3 / SmolVLM vision side on the CPU: a SigLIP vision transformer over one
//! square tile, then the connector (pixel shuffle + one linear projection) that turns its
//! patch features into `tokens_per_tile` embeddings of the text model's width.
//!
//! WHY one tile at a time: the processor always hands the tower full `image_size` squares
//! (split tiles and the global view), so every patch is real and positions are simply
//! `0..num_patches`; partial tiles (NaViT-style masks) never occur on this path.

use crate::cpu::linear::{floats_of, Input, Linear};
use crate::cpu::ops::{add_assign, add_bias};
use crate::tensor::WeightTensor;
use rayon::prelude::*;
use serde_json::Value;

/// The vision tower's hyper-parameters (`vision_config` + `scale_factor` in config.json).
#[derive(Clone, Debug, PartialEq)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub num_channels: usize,
    /// Side of a square tile in pixels.
    pub image_size: usize,
    pub patch_size: usize,
    pub layer_norm_eps: f32,
    /// Pixel-shuffle factor of the connector.
    pub scale_factor: usize,
    /// Width of the text model the embeddings feed.
    pub text_hidden: usize,
}

/// Why a vision tower could not be built.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VisionError {
    #[error("vision config: {0}")]
    Config(String),
    #[error("vision weight {name:?} is missing")]
    Missing { name: String },
    #[error("vision weight {name:?} has shape {found:?}, expected {expected:?}")]
    Shape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("vision weight {name:?}: {reason}")]
    Unsupported { name: String, reason: String },
    #[error("vision tower on the GPU: {0}")]
    Device(String),
    #[error("tile has {got} values, expected {expected} (3 x {side} x {side})")]
    BadTile {
        got: usize,
        expected: usize,
        side: usize,
    },
}

impl VisionConfig {
    /// Reads an Idefics3 config.json (`vision_config`, `scale_factor`, `text_config`).
    pub fn from_hf(cfg: &Value) -> Result<VisionConfig, VisionError> {
        let v = cfg
            .get("vision_config")
            .ok_or_else(|| VisionError::Config("config.json has no vision_config".into()))?;
        let text = cfg.get("text_config").unwrap_or(cfg);
        let num = |o: &Value, k: &str, d: Option<u64>| -> Result<usize, VisionError> {
            o.get(k)
                .and_then(Value::as_u64)
                .or(d)
                .map(|x| x as usize)
                .ok_or_else(|| VisionError::Config(format!("{k} missing")))
        };
        let c = VisionConfig {
            hidden_size: num(v, "hidden_size", Some(768))?,
            intermediate_size: num(v, "intermediate_size", Some(3072))?,
            n_layers: num(v, "num_hidden_layers", Some(12))?,
            n_heads: num(v, "num_attention_heads", Some(12))?,
            num_channels: num(v, "num_channels", Some(3))?,
            image_size: num(v, "image_size", Some(224))?,
            patch_size: num(v, "patch_size", Some(32))?,
            layer_norm_eps: v
                .get("layer_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6) as f32,
            scale_factor: num(cfg, "scale_factor", Some(2))?,
            text_hidden: num(text, "hidden_size", None)?,
        };
        if let Some(act) = v.get("hidden_act").and_then(Value::as_str) {
            if act != "gelu_pytorch_tanh" {
                return Err(VisionError::Config(format!(
                    "hidden_act {act:?} is not supported (gelu_pytorch_tanh is)"
                )));
            }
        }
        c.check()?;
        Ok(c)
    }

    fn check(&self) -> Result<(), VisionError> {
        let bad = |m: String| Err(VisionError::Config(m));
        if self.patch_size == 0 || self.image_size % self.patch_size != 0 {
            return bad(format!(
                "image_size {} is not a multiple of patch_size {}",
                self.image_size, self.patch_size
            ));
        }
        if self.n_heads == 0 || self.hidden_size % self.n_heads != 0 {
            return bad("hidden_size must be a multiple of num_attention_heads".into());
        }
        let side = self.patches_per_side();
        if self.scale_factor == 0 || side % self.scale_factor != 0 {
            return bad(format!(
                "{side} patches per side do not divide by scale_factor {}",
                self.scale_factor
            ));
        }
        Ok(())
    }

    pub fn patches_per_side(&self) -> usize {
        self.image_size / self.patch_size
    }

    pub fn num_patches(&self) -> usize {
        self.patches_per_side() * self.patches_per_side()
    }

    /// Embeddings one tile becomes (Idefics3's `image_seq_len`).
    pub fn tokens_per_tile(&self) -> usize {
        self.num_patches() / (self.scale_factor * self.scale_factor)
    }

    /// Values of one tile: `[channels, image_size, image_size]`.
    pub fn tile_len(&self) -> usize {
        self.num_channels * self.image_size * self.image_size
    }
}

// The weights' fields are crate-visible: the CUDA tower (`cuda::vision`) uploads these, so
// both towers run the same tensors, reshaped once, here.
pub(crate) struct Norm {
    pub(crate) weight: Vec<f32>,
    pub(crate) bias: Vec<f32>,
}

pub(crate) struct Dense {
    /// `[out, in]`.
    pub(crate) w: Linear,
    pub(crate) b: Vec<f32>,
}

pub(crate) struct Layer {
    pub(crate) ln1: Norm,
    pub(crate) q: Dense,
    pub(crate) k: Dense,
    pub(crate) v: Dense,
    pub(crate) o: Dense,
    pub(crate) ln2: Norm,
    pub(crate) fc1: Dense,
    pub(crate) fc2: Dense,
}

/// The tower and the connector, weights in CPU-kernel form (f32).
pub struct VisionTower {
    pub(crate) cfg: VisionConfig,
    /// The patch convolution as a matrix `[hidden, channels * patch * patch]`.
    pub(crate) patch: Dense,
    /// `[num_patches, hidden]`.
    pub(crate) pos: Vec<f32>,
    pub(crate) layers: Vec<Layer>,
    pub(crate) post_ln: Norm,
    /// `[text_hidden, hidden * scale^2]`, no bias.
    pub(crate) proj: Linear,
}

/// Where the tower's weights live in an Idefics3 checkpoint (with or without the
/// `model.` prefix that newer transformers versions write).
const PREFIXES: [&str; 2] = ["model.", ""];

impl VisionTower {
    /// Builds the tower from a checkpoint's tensors (`fetch`: name -> tensor).
    pub fn load(
        cfg: VisionConfig,
        fetch: &dyn Fn(&str) -> Option<WeightTensor>,
    ) -> Result<VisionTower, VisionError> {
        cfg.check()?;
        let get = |name: &str, shape: &[usize]| -> Result<WeightTensor, VisionError> {
            let t = PREFIXES
                .iter()
                .find_map(|p| fetch(&format!("{p}{name}")))
                .ok_or_else(|| VisionError::Missing {
                    name: name.to_string(),
                })?;
            if t.shape != shape {
                return Err(VisionError::Shape {
                    name: name.to_string(),
                    expected: shape.to_vec(),
                    found: t.shape.clone(),
                });
            }
            Ok(t)
        };
        let floats = |name: &str, shape: &[usize]| -> Result<Vec<f32>, VisionError> {
            let t = get(name, shape)?;
            floats_of(&t).ok_or_else(|| VisionError::Unsupported {
                name: name.to_string(),
                reason: format!("dtype {:?} (F32, F16 or BF16 expected)", t.dtype),
            })
        };
        let linear = |t: &WeightTensor, rows: usize, cols: usize| {
            Linear::from_tensor(t, rows, cols).map_err(|e| VisionError::Unsupported {
                name: t.name.clone(),
                reason: e.to_string(),
            })
        };
        let dense = |name: &str, rows: usize, cols: usize| -> Result<Dense, VisionError> {
            let w = get(&format!("{name}.weight"), &[rows, cols])?;
            Ok(Dense {
                w: linear(&w, rows, cols)?,
                b: floats(&format!("{name}.bias"), &[rows])?,
            })
        };
        let norm = |name: &str, len: usize| -> Result<Norm, VisionError> {
            Ok(Norm {
                weight: floats(&format!("{name}.weight"), &[len])?,
                bias: floats(&format!("{name}.bias"), &[len])?,
            })
        };
        let (h, ffn, c, p) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_channels,
            cfg.patch_size,
        );
        let vm = "vision_model";
        let conv = get(
            &format!("{vm}.embeddings.patch_embedding.weight"),
            &[h, c, p, p],
        )?;
        // The convolution's [hidden, c, p, p] is a [hidden, c*p*p] matrix over a patch
        // flattened channel-major, row by row.
        let conv = WeightTensor {
            shape: vec![h, c * p * p],
            ..conv
        };
        let patch = Dense {
            w: linear(&conv, h, c * p * p)?,
            b: floats(&format!("{vm}.embeddings.patch_embedding.bias"), &[h])?,
        };
        let pos = floats(
            &format!("{vm}.embeddings.position_embedding.weight"),
            &[cfg.num_patches(), h],
        )?;
        let layers = (0..cfg.n_layers)
            .map(|i| {
                let l = format!("{vm}.encoder.layers.{i}");
                Ok(Layer {
                    ln1: norm(&format!("{l}.layer_norm1"), h)?,
                    q: dense(&format!("{l}.self_attn.q_proj"), h, h)?,
                    k: dense(&format!("{l}.self_attn.k_proj"), h, h)?,
                    v: dense(&format!("{l}.self_attn.v_proj"), h, h)?,
                    o: dense(&format!("{l}.self_attn.out_proj"), h, h)?,
                    ln2: norm(&format!("{l}.layer_norm2"), h)?,
                    fc1: dense(&format!("{l}.mlp.fc1"), ffn, h)?,
                    fc2: dense(&format!("{l}.mlp.fc2"), h, ffn)?,
                })
            })
            .collect::<Result<Vec<_>, VisionError>>()?;
        let post_ln = norm(&format!("{vm}.post_layernorm"), h)?;
        let s2 = cfg.scale_factor * cfg.scale_factor;
        let proj_t = get(
            "connector.modality_projection.proj.weight",
            &[cfg.text_hidden, h * s2],
        )?;
        let proj = linear(&proj_t, cfg.text_hidden, h * s2)?;
        Ok(VisionTower {
            cfg,
            patch,
            pos,
            layers,
            post_ln,
            proj,
        })
    }

    pub fn config(&self) -> &VisionConfig {
        &self.cfg
    }

    /// One tile (`[channels, image_size, image_size]`, normalised) to its
    /// `[tokens_per_tile, text_hidden]` embeddings, row-major.
    pub fn encode_tile(&self, tile: &[f32]) -> Result<Vec<f32>, VisionError> {
        let c = &self.cfg;
        if tile.len() != c.tile_len() {
            return Err(VisionError::BadTile {
                got: tile.len(),
                expected: c.tile_len(),
                side: c.image_size,
            });
        }
        let (h, n, p, side) = (
            c.hidden_size,
            c.num_patches(),
            c.patch_size,
            c.patches_per_side(),
        );
        let patch_len = c.num_channels * p * p;
        let mut patches = vec![0.0f32; n * patch_len];
        for (idx, row) in patches.chunks_exact_mut(patch_len).enumerate() {
            let (py, px) = (idx / side, idx % side);
            let mut k = 0;
            for ch in 0..c.num_channels {
                for y in 0..p {
                    let start = (ch * c.image_size + py * p + y) * c.image_size + px * p;
                    row[k..k + p].copy_from_slice(&tile[start..start + p]);
                    k += p;
                }
            }
        }
        let mut x = vec![0.0f32; n * h];
        dense(&self.patch, &patches, n, &mut x);
        add_assign(&mut x, &self.pos);
        let mut xn = vec![0.0f32; n * h];
        let (mut q, mut k, mut v) = (vec![0.0; n * h], vec![0.0; n * h], vec![0.0; n * h]);
        let mut attn = vec![0.0f32; n * h];
        let mut proj = vec![0.0f32; n * h];
        let mut mid = vec![0.0f32; n * c.intermediate_size];
        for l in &self.layers {
            layer_norm(&x, &l.ln1, c.layer_norm_eps, &mut xn);
            dense(&l.q, &xn, n, &mut q);
            dense(&l.k, &xn, n, &mut k);
            dense(&l.v, &xn, n, &mut v);
            attention(&q, &k, &v, n, c.n_heads, h / c.n_heads, &mut attn);
            dense(&l.o, &attn, n, &mut proj);
            add_assign(&mut x, &proj);
            layer_norm(&x, &l.ln2, c.layer_norm_eps, &mut xn);
            dense(&l.fc1, &xn, n, &mut mid);
            mid.iter_mut().for_each(|m| *m = gelu_tanh(*m));
            dense(&l.fc2, &mid, n, &mut proj);
            add_assign(&mut x, &proj);
        }
        layer_norm(&x, &self.post_ln, c.layer_norm_eps, &mut xn);
        let shuffled = pixel_shuffle(&xn, side, h, c.scale_factor);
        let tokens = c.tokens_per_tile();
        let mut out = vec![0.0f32; tokens * c.text_hidden];
        let width = h * c.scale_factor * c.scale_factor;
        self.proj
            .forward(&Input::new(&shuffled, tokens, width), &mut out);
        Ok(out)
    }

    /// Several tiles, one after the other: their embeddings concatenated
    /// (`[tiles * tokens_per_tile, text_hidden]`).
    pub fn encode_tiles(&self, tiles: &[Vec<f32>]) -> Result<Vec<f32>, VisionError> {
        let mut out =
            Vec::with_capacity(tiles.len() * self.cfg.tokens_per_tile() * self.cfg.text_hidden);
        for tile in tiles {
            out.extend(self.encode_tile(tile)?);
        }
        Ok(out)
    }
}

fn dense(d: &Dense, x: &[f32], n: usize, out: &mut [f32]) {
    d.w.forward(&Input::new(x, n, d.w.cols), out);
    add_bias(out, &d.b);
}

/// LayerNorm of each row (mean and variance accumulated in f64).
fn layer_norm(x: &[f32], norm: &Norm, eps: f32, out: &mut [f32]) {
    let h = norm.weight.len().max(1);
    for (xr, or) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
        let mean = xr.iter().map(|&v| v as f64).sum::<f64>() / h as f64;
        let var = xr.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / h as f64;
        let inv = 1.0 / (var + eps as f64).sqrt();
        for (((o, &v), &w), &b) in or.iter_mut().zip(xr).zip(&norm.weight).zip(&norm.bias) {
            *o = ((v as f64 - mean) * inv) as f32 * w + b;
        }
    }
}

/// GELU, tanh approximation (`gelu_pytorch_tanh`).
fn gelu_tanh(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // sqrt(2 / pi)
    0.5 * x * (1.0 + (C * (x + 0.044_715 * x * x * x)).tanh())
}

/// Bidirectional multi-head attention over all `n` patches; `[n, heads * hd]` in and out.
#[allow(clippy::too_many_arguments)]
fn attention(q: &[f32], k: &[f32], v: &[f32], n: usize, heads: usize, hd: usize, out: &mut [f32]) {
    let width = heads * hd;
    let scale = 1.0 / (hd as f32).sqrt();
    out.par_chunks_mut(hd).enumerate().for_each(|(idx, o)| {
        let (t, head) = (idx / heads, idx % heads);
        let off = head * hd;
        let qh = &q[t * width + off..t * width + off + hd];
        let mut scores: Vec<f32> = (0..n)
            .map(|j| {
                let kh = &k[j * width + off..j * width + off + hd];
                qh.iter().zip(kh).map(|(a, b)| a * b).sum::<f32>() * scale
            })
            .collect();
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f64;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s as f64;
        }
        let inv = (1.0 / sum) as f32;
        o.fill(0.0);
        for (j, &w) in scores.iter().enumerate() {
            let vh = &v[j * width + off..j * width + off + hd];
            for (a, &b) in o.iter_mut().zip(vh) {
                *a += w * inv * b;
            }
        }
    });
}

/// Idefics3's pixel shuffle: the `side x side` grid of `dim`-wide features becomes a
/// `(side/s) x (side/s)` grid of `dim*s*s`-wide ones; output cell `(i, j)` is the
/// concatenation, row `u` then column `t` of its `s x s` block, of input cells
/// `(i*s + u, j*s + t)`.
fn pixel_shuffle(x: &[f32], side: usize, dim: usize, s: usize) -> Vec<f32> {
    let out_side = side / s;
    let mut out = Vec::with_capacity(x.len());
    for i in 0..out_side {
        for j in 0..out_side {
            for u in 0..s {
                for t in 0..s {
                    let cell = (i * s + u) * side + (j * s + t);
                    out.extend_from_slice(&x[cell * dim..(cell + 1) * dim]);
                }
            }
        }
    }
    out
}

/// [`pixel_shuffle`] of `tiles` tiles at once as a row gather: viewing the output as rows of
/// `dim` (each output cell is `s * s` of them), output row `q` is input row `rows[q]`, the
/// input being the tiles' `side * side` cells each, tile after tile. Output row
/// `q = ((t * out_side + i) * out_side + j) * s * s + u * s + v` (tile `t`, cell `(i, j)`,
/// block row `u`, column `v`) takes input cell `(i * s + u, j * s + v)` of tile `t`.
pub fn pixel_shuffle_rows(tiles: usize, side: usize, s: usize) -> Vec<usize> {
    let out_side = side / s.max(1);
    let mut rows = Vec::with_capacity(tiles * side * side);
    for t in 0..tiles {
        for i in 0..out_side {
            for j in 0..out_side {
                for u in 0..s {
                    for v in 0..s {
                        rows.push(t * side * side + (i * s + u) * side + (j * s + v));
                    }
                }
            }
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pixel_shuffle_rows_gather_what_pixel_shuffle_builds() {
        // Two 4x4 tiles of 3-wide features (distinct values), s = 2; and 6x6, s = 3.
        for (side, s) in [(4, 2), (6, 3), (4, 1)] {
            let (dim, tiles) = (3, 2);
            let x: Vec<f32> = (0..tiles * side * side * dim).map(|v| v as f32).collect();
            let rows = pixel_shuffle_rows(tiles, side, s);
            assert_eq!(rows.len(), tiles * side * side);
            let gathered: Vec<f32> = rows
                .iter()
                .flat_map(|&r| x[r * dim..(r + 1) * dim].iter().copied())
                .collect();
            let cell = side * side * dim;
            let expected: Vec<f32> = (0..tiles)
                .flat_map(|t| pixel_shuffle(&x[t * cell..(t + 1) * cell], side, dim, s))
                .collect();
            assert_eq!(gathered, expected, "side {side}, s {s}");
        }
    }

    #[test]
    fn pixel_shuffle_groups_blocks() {
        // 4x4 grid of 1-wide features numbered row-major; s = 2.
        let x: Vec<f32> = (0..16).map(|v| v as f32).collect();
        let out = pixel_shuffle(&x, 4, 1, 2);
        assert_eq!(
            out,
            vec![0., 1., 4., 5., 2., 3., 6., 7., 8., 9., 12., 13., 10., 11., 14., 15.]
        );
    }
}
