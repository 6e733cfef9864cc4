//! The CPU backend: a pure-Rust Llama-family forward pass (RMSNorm, RoPE, grouped-query
//! attention over a paged f16 KV pool, SwiGLU, optional q/k/v biases, tied or untied head).
//!
//! A forward call flattens all sequences' new tokens into one `[tokens, hidden]` matrix, so
//! every linear layer reads its weights once per call however many sequences and prefill
//! tokens the batch holds; only attention is per sequence. Work runs on the backend's own
//! rayon pool (size chosen at construction) so it does not compete with other pools.

pub mod attention;
pub mod attention_simd;
pub mod linear;
pub mod ops;
pub mod quant;

use crate::backend::{
    validate_splices, Backend, BackendError, KvDType, KvLayout, Logits, SeqStep, Splice,
};
use crate::kv_cache::PagedKvPool;
use crate::model::{ModelConfig, ModelWeights};
use crate::tensor::WeightTensor;
use attention::{AttentionShape, TokenSlot};
use linear::{Input, Linear};

/// Construction options for [`CpuBackend`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuBackendOptions {
    /// Physical KV blocks in the pool.
    pub num_blocks: usize,
    /// Token positions per block.
    pub block_size: usize,
    /// Worker threads for the matmuls and attention (0 = all available cores).
    pub threads: usize,
}

impl Default for CpuBackendOptions {
    fn default() -> Self {
        CpuBackendOptions {
            num_blocks: 512,
            block_size: 16,
            threads: 0,
        }
    }
}

struct CpuLayer {
    attn_norm: Vec<f32>,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    bq: Vec<f32>,
    bk: Vec<f32>,
    bv: Vec<f32>,
    ffn_norm: Vec<f32>,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// The weights in CPU-kernel form.
struct CpuModel {
    config: ModelConfig,
    embd: Linear,
    /// `None`: tied to `embd`.
    head: Option<Linear>,
    layers: Vec<CpuLayer>,
    output_norm: Vec<f32>,
}

pub struct CpuBackend {
    model: CpuModel,
    pool: PagedKvPool,
    threads: rayon::ThreadPool,
}

fn vector(t: &WeightTensor, len: usize) -> Result<Vec<f32>, BackendError> {
    let v = linear::floats_of(t).ok_or_else(|| BackendError::UnsupportedWeight {
        name: t.name.clone(),
        reason: format!("a norm/bias vector must be F32/F16/BF16, not {:?}", t.dtype),
    })?;
    if v.len() != len || t.numel() != len {
        return Err(BackendError::UnsupportedWeight {
            name: t.name.clone(),
            reason: format!("{} values, expected {len}", v.len()),
        });
    }
    Ok(v)
}

fn bias(t: &Option<WeightTensor>, len: usize) -> Result<Vec<f32>, BackendError> {
    t.as_ref().map_or(Ok(Vec::new()), |t| vector(t, len))
}

fn check_config(c: &ModelConfig, o: &CpuBackendOptions) -> Result<(), BackendError> {
    let bad = |m: &str| Err(BackendError::BadConfig(m.to_string()));
    if c.n_heads == 0 || c.n_kv_heads == 0 || c.n_heads % c.n_kv_heads != 0 {
        return bad("n_heads must be a positive multiple of n_kv_heads");
    }
    if c.head_dim == 0 || c.head_dim % 2 != 0 {
        return bad("head_dim must be positive and even");
    }
    if c.hidden_size == 0 || c.vocab_size == 0 || c.intermediate_size == 0 {
        return bad("hidden_size, vocab_size and intermediate_size must be positive");
    }
    if o.block_size == 0 {
        return bad("block_size must be positive");
    }
    Ok(())
}

impl CpuModel {
    fn new(config: ModelConfig, w: &ModelWeights) -> Result<CpuModel, BackendError> {
        let c = &config;
        let (h, q_dim, kv_dim) = (
            c.hidden_size,
            c.n_heads * c.head_dim,
            c.n_kv_heads * c.head_dim,
        );
        if w.layers.len() != c.n_layers {
            return Err(BackendError::BadConfig(format!(
                "{} layers of weights for n_layers = {}",
                w.layers.len(),
                c.n_layers
            )));
        }
        let layers = w
            .layers
            .iter()
            .map(|l| {
                Ok(CpuLayer {
                    attn_norm: vector(&l.attn_norm, h)?,
                    wq: Linear::from_tensor(&l.wq, q_dim, h)?,
                    wk: Linear::from_tensor(&l.wk, kv_dim, h)?,
                    wv: Linear::from_tensor(&l.wv, kv_dim, h)?,
                    wo: Linear::from_tensor(&l.wo, h, q_dim)?,
                    bq: bias(&l.bq, q_dim)?,
                    bk: bias(&l.bk, kv_dim)?,
                    bv: bias(&l.bv, kv_dim)?,
                    ffn_norm: vector(&l.ffn_norm, h)?,
                    gate: Linear::from_tensor(&l.w_gate, c.intermediate_size, h)?,
                    up: Linear::from_tensor(&l.w_up, c.intermediate_size, h)?,
                    down: Linear::from_tensor(&l.w_down, h, c.intermediate_size)?,
                })
            })
            .collect::<Result<Vec<_>, BackendError>>()?;
        Ok(CpuModel {
            embd: Linear::from_tensor(&w.token_embd, c.vocab_size, h)?,
            head: w
                .output
                .as_ref()
                .map(|t| Linear::from_tensor(t, c.vocab_size, h))
                .transpose()?,
            output_norm: vector(&w.output_norm, h)?,
            layers,
            config,
        })
    }
}

impl CpuBackend {
    /// Prepares the weights for the CPU kernels (quantized ones are repacked, still
    /// quantized; float ones widened to f32) and allocates the KV pool. Rejects shapes that
    /// disagree with `config` and dtypes the kernels do not handle.
    pub fn new(
        config: ModelConfig,
        weights: &ModelWeights,
        options: CpuBackendOptions,
    ) -> Result<CpuBackend, BackendError> {
        check_config(&config, &options)?;
        let layout = KvLayout {
            block_size: options.block_size,
            num_blocks: options.num_blocks,
            n_layers: config.n_layers,
            n_kv_heads: config.n_kv_heads,
            head_dim: config.head_dim,
            dtype: KvDType::F32,
        };
        let threads = rayon::ThreadPoolBuilder::new()
            .num_threads(options.threads)
            .thread_name(|i| format!("turbine-cpu-{i}"))
            .build()
            .map_err(|e| BackendError::Device(e.to_string()))?;
        Ok(CpuBackend {
            model: CpuModel::new(config, weights)?,
            pool: PagedKvPool::new(layout),
            threads,
        })
    }

    /// Threads the backend computes on.
    pub fn threads(&self) -> usize {
        self.threads.current_num_threads()
    }

    fn validate(&self, batch: &[SeqStep<'_>]) -> Result<(), BackendError> {
        let layout = self.pool.layout();
        crate::backend::validate_batch(batch, &self.model.config, &layout, usize::MAX)
    }
}

/// The forward pass proper; `batch` and `splices` have been validated.
fn run_forward(
    m: &CpuModel,
    pool: &mut PagedKvPool,
    batch: &[SeqStep<'_>],
    splices: &[Splice<'_>],
    every: &[bool],
) -> Logits {
    let c = &m.config;
    let (h, hd, eps) = (c.hidden_size, c.head_dim, c.rms_norm_eps);
    let (q_dim, kv_dim) = (c.n_heads * hd, c.n_kv_heads * hd);
    let bs = pool.layout().block_size;

    let mut slots = Vec::new();
    let mut token_ids = Vec::new();
    let mut logit_rows = Vec::new();
    for (si, s) in batch.iter().enumerate() {
        for (i, &t) in s.tokens.iter().enumerate() {
            slots.push(TokenSlot {
                pos: s.start_pos + i,
                block_table: s.block_table,
            });
            token_ids.push(t);
        }
        if every.get(si).copied().unwrap_or(false) {
            logit_rows.extend(slots.len() - s.tokens.len()..slots.len());
        } else if s.want_logits {
            logit_rows.push(slots.len() - 1);
        }
    }
    let n = slots.len();
    if n == 0 {
        return Logits {
            vocab: c.vocab_size,
            data: Vec::new(),
        };
    }
    let mut angle_buf = Vec::new();
    let angles: Vec<Vec<(f32, f32)>> = slots
        .iter()
        .map(|s| {
            ops::rope_angles(s.pos, hd, c.rope_theta, &mut angle_buf);
            angle_buf.clone()
        })
        .collect();

    let mut x = vec![0.0f32; n * h];
    for (row, &t) in x.chunks_exact_mut(h).zip(&token_ids) {
        m.embd.row_f32(t as usize, row);
    }
    for sp in splices {
        let first: usize = batch[..sp.step].iter().map(|s| s.tokens.len()).sum();
        let start = (first + sp.offset) * h;
        x[start..start + sp.rows * h].copy_from_slice(sp.embeds);
    }
    let mut xn = vec![0.0f32; n * h];
    let (mut q, mut k, mut v) = (
        vec![0.0; n * q_dim],
        vec![0.0; n * kv_dim],
        vec![0.0; n * kv_dim],
    );
    let mut attn = vec![0.0f32; n * q_dim];
    let mut proj = vec![0.0f32; n * h];
    let mut gate = vec![0.0f32; n * c.intermediate_size];
    let mut up = vec![0.0f32; n * c.intermediate_size];
    let shape = AttentionShape {
        n_heads: c.n_heads,
        n_kv_heads: c.n_kv_heads,
        head_dim: hd,
        block_size: bs,
    };

    for (li, l) in m.layers.iter().enumerate() {
        ops::rms_norm(&x, &l.attn_norm, eps, &mut xn);
        let input = Input::new(&xn, n, h);
        linear::forward_group(
            &input,
            &mut [(&l.wq, &mut q), (&l.wk, &mut k), (&l.wv, &mut v)],
        );
        ops::add_bias(&mut q, &l.bq);
        ops::add_bias(&mut k, &l.bk);
        ops::add_bias(&mut v, &l.bv);
        for (((qr, kr), vr), (slot, ang)) in q
            .chunks_exact_mut(q_dim)
            .zip(k.chunks_exact_mut(kv_dim))
            .zip(v.chunks_exact(kv_dim))
            .zip(slots.iter().zip(&angles))
        {
            ops::apply_rope(qr, hd, ang, c.rope_style);
            ops::apply_rope(kr, hd, ang, c.rope_style);
            let block = slot.block_table.get(slot.pos / bs).copied().unwrap_or(0);
            pool.write(li, block, slot.pos % bs, kr, vr);
        }
        attention::attention(pool, li, &shape, &slots, &q, &mut attn);
        l.wo.forward(&Input::new(&attn, n, q_dim), &mut proj);
        ops::add_assign(&mut x, &proj);

        ops::rms_norm(&x, &l.ffn_norm, eps, &mut xn);
        let input = Input::new(&xn, n, h);
        linear::forward_group(&input, &mut [(&l.gate, &mut gate), (&l.up, &mut up)]);
        ops::swiglu(&mut gate, &up);
        l.down
            .forward(&Input::new(&gate, n, c.intermediate_size), &mut proj);
        ops::add_assign(&mut x, &proj);
    }

    let rows = logit_rows.len();
    if rows == 0 {
        return Logits {
            vocab: c.vocab_size,
            data: Vec::new(),
        };
    }
    let mut last = Vec::with_capacity(rows * h);
    for &r in &logit_rows {
        last.extend_from_slice(&x[r * h..(r + 1) * h]);
    }
    let mut normed = vec![0.0f32; rows * h];
    ops::rms_norm(&last, &m.output_norm, eps, &mut normed);
    let mut data = vec![0.0f32; rows * c.vocab_size];
    m.head
        .as_ref()
        .unwrap_or(&m.embd)
        .forward(&Input::new(&normed, rows, h), &mut data);
    Logits {
        vocab: c.vocab_size,
        data,
    }
}

impl Backend for CpuBackend {
    fn config(&self) -> &ModelConfig {
        &self.model.config
    }

    fn kv_layout(&self) -> KvLayout {
        self.pool.layout()
    }

    fn forward(&mut self, batch: &[SeqStep<'_>]) -> Result<Logits, BackendError> {
        self.forward_spliced(batch, &[])
    }

    fn forward_spliced(
        &mut self,
        batch: &[SeqStep<'_>],
        splices: &[Splice<'_>],
    ) -> Result<Logits, BackendError> {
        self.validate(batch)?;
        validate_splices(batch, splices, self.model.config.hidden_size)?;
        let CpuBackend {
            model,
            pool,
            threads,
        } = self;
        Ok(threads.install(|| run_forward(model, pool, batch, splices, &[])))
    }

    /// One pass: the output head runs over every token of the `every` steps.
    fn forward_every(
        &mut self,
        batch: &[SeqStep<'_>],
        every: &[bool],
    ) -> Result<Logits, BackendError> {
        self.validate(batch)?;
        let CpuBackend {
            model,
            pool,
            threads,
        } = self;
        Ok(threads.install(|| run_forward(model, pool, batch, &[], every)))
    }

    fn copy_blocks(&mut self, src_dst: &[(u32, u32)]) -> Result<(), BackendError> {
        self.pool.copy_blocks(src_dst)
    }

    fn export_blocks(&self, ids: &[u32]) -> Result<Vec<u8>, BackendError> {
        self.pool.export_blocks(ids)
    }

    fn import_blocks(&mut self, ids: &[u32], data: &[u8]) -> Result<(), BackendError> {
        self.pool.import_blocks(ids, data)
    }
}
