//! [`CudaBackend`]: the Llama-family forward pass on one GPU, implementing [`Backend`].
//!
//! Weights live on the device as bf16 (norms and biases f32), with q/k/v fused into one
//! `[q + 2kv, hidden]` matrix and gate/up into one `[2 ffn, hidden]` matrix, so a layer is
//! four cuBLAS GEMMs plus small kernels. The residual stream stays f32. The KV pool is one
//! bf16 K and one bf16 V allocation per layer, `[num_blocks * block_size][n_kv_heads][head_dim]`
//! (the per-layer order of [`KvLayout::bytes_per_block`]).
//!
//! All work of a call runs in order on the compute stream; the call's metadata goes up from
//! page-locked memory without a wait, and the call synchronises once, at its end, to return
//! logits or (sampling on the device) token ids and requested logprobs.
//!
//! Decode steps (one new token per sequence, every row sampled) replay a CUDA graph captured
//! per (batch bucket, context bucket): the step is padded to the bucket's row count (padding
//! rows write a spare KV block past the pool and their tokens are dropped) and its metadata
//! is laid out at fixed offsets, so one launch replaces the ~11 launches per layer.

mod kv_copy;
mod kv_ipc;
pub use kv_copy::{KvExportJob, KvImportJob, KvPool};

use super::device::{CudaError, DBuf, Gpu, Graph, KernelSpec, PinnedWords, SharedAlloc};
use super::ops::{
    prefill_tiles, sample_params, AttnMeta, PrefillAttention, PREFILL_MIN_TOKENS, SAMPLE_MAX_TOP,
    SAMPLE_OUT,
};
use super::synthetic::{draw_for, Draw};
use crate::backend::{
    validate_splices, Backend, BackendError, KvDType, KvLayout, Logits, SeqStep, Splice,
};
use crate::model::{ModelConfig, ModelWeights, RopeStyle};
use crate::sampling::{SampleRow, SampledToken, SamplingError, SamplingParams};
use crate::tensor::WeightTensor;
use std::collections::BTreeMap;
use std::sync::Arc;

impl From<CudaError> for BackendError {
    fn from(e: CudaError) -> Self {
        BackendError::Device(e.to_string())
    }
}

/// Construction options for [`CudaBackend`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CudaBackendOptions {
    /// CUDA device ordinal.
    pub device: usize,
    /// Physical KV blocks in the pool.
    pub num_blocks: usize,
    /// Token positions per block.
    pub block_size: usize,
}

impl Default for CudaBackendOptions {
    fn default() -> Self {
        CudaBackendOptions {
            device: 0,
            num_blocks: 2048,
            block_size: 16,
        }
    }
}

struct DevLayer {
    attn_norm: DBuf,
    wqkv: DBuf,
    bqkv: Option<DBuf>,
    wo: DBuf,
    ffn_norm: DBuf,
    w_gu: DBuf,
    w_down: DBuf,
}

/// Scratch buffers, grown to the largest call seen.
#[derive(Default)]
struct Scratch {
    tokens: usize,
    logits: usize,
    ws: (usize, usize),
    meta_len: usize,
    bufs: Option<ScratchBufs>,
}

struct ScratchBufs {
    x: DBuf,
    h: DBuf,
    qkv: DBuf,
    attn: DBuf,
    o: DBuf,
    gu: DBuf,
    act: DBuf,
    part_o: DBuf,
    part_ml: DBuf,
    meta: DBuf,
    head_in: DBuf,
    logits: DBuf,
    /// Penalised copies of logits rows (device sampling).
    sample_work: DBuf,
    /// [`SAMPLE_OUT`] i32 per logits row.
    sample_out: DBuf,
}

/// Word offsets of the parts of a step's metadata upload (one i32 array).
#[derive(Clone, Copy, Debug, Default)]
struct MetaOffsets {
    tokens: usize,
    pos: usize,
    slots: usize,
    tok_seq: usize,
    rows: usize,
    bt_off: usize,
    tables: usize,
    tiles: usize,
    sparams: usize,
    hist: usize,
}

/// A step reduced to what the device needs: the metadata words and the launch sizes.
struct StepPlan {
    words: Vec<i32>,
    offs: MetaOffsets,
    /// Token rows (padded, for a graph).
    n: usize,
    /// Logits rows.
    m: usize,
    /// Bound on every position + 1 (the bucket's, for a graph).
    max_ctx: usize,
    /// Tensor-core prefill tiles (0: the split kernel).
    n_tiles: usize,
    /// Sample on the device (params at `offs.sparams`).
    sample: bool,
    /// Every token row wants logits, in order (no gather before the head GEMM).
    all_rows: bool,
}

/// The fixed shape a decode graph was captured for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct GraphShape {
    rows: usize,
    ctx_cap: usize,
}

/// Batch buckets of decode graphs (a step of n sequences runs the smallest bucket >= n).
const GRAPH_BATCHES: [usize; 19] = [
    1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256,
];
/// Smallest context bucket; buckets double from here.
const GRAPH_MIN_CTX: usize = 256;
/// Most graphs kept (each holds its own small metadata buffer).
const GRAPH_CACHE_MAX: usize = 96;

struct GraphEntry {
    graph: Graph,
    /// The metadata buffer the graph reads (fixed address).
    meta: DBuf,
}

pub struct CudaBackend {
    gpu: Gpu,
    config: ModelConfig,
    layout: KvLayout,
    embd: DBuf,
    /// `None`: tied to `embd`.
    head: Option<DBuf>,
    out_norm: DBuf,
    layers: Vec<DevLayer>,
    kcache: Vec<DBuf>,
    vcache: Vec<DBuf>,
    scratch: Scratch,
    /// Page-locked staging of the metadata upload and of the sampled results.
    pinned_in: Option<PinnedWords>,
    pinned_out: Option<PinnedWords>,
    /// Decode graphs by shape; emptied whenever the scratch buffers they point into move.
    graphs: BTreeMap<GraphShape, GraphEntry>,
    /// Capture and replay decode graphs (on unless `TURBINE_CUDA_GRAPHS=0` or
    /// [`CudaBackend::set_graphs`]).
    use_graphs: bool,
    /// The attention kernel of steps whose every sequence has [`PREFILL_MIN_TOKENS`] or more
    /// new tokens (other steps always use the split kernel).
    prefill_attention: PrefillAttention,
    /// Page-locked staging of KV exports and imports, kept between them (pinning hundreds of
    /// MB takes longer than copying them); exported layer chunks hold theirs until dropped.
    kv_host: std::sync::Arc<kv_copy::PinnedPool>,
    /// The one allocation `kcache` and `vcache` are parts of.
    kv_alloc: Arc<SharedAlloc>,
    /// Other processes' pools mapped by their IPC handles (`kv_ipc`).
    ipc_peers: kv_ipc::IpcPeers,
}

fn check_config(c: &ModelConfig, o: &CudaBackendOptions) -> Result<(), BackendError> {
    let bad = |m: &str| Err(BackendError::BadConfig(m.to_string()));
    if c.n_heads == 0 || c.n_kv_heads == 0 || c.n_heads % c.n_kv_heads != 0 {
        return bad("n_heads must be a positive multiple of n_kv_heads");
    }
    if c.head_dim == 0 || c.head_dim % 32 != 0 || c.head_dim > 256 {
        return bad("the CUDA kernels need head_dim a multiple of 32, at most 256");
    }
    if c.hidden_size == 0 || c.vocab_size == 0 || c.intermediate_size == 0 {
        return bad("hidden_size, vocab_size and intermediate_size must be positive");
    }
    if o.block_size == 0 || o.num_blocks == 0 {
        return bad("block_size and num_blocks must be positive");
    }
    Ok(())
}

pub(crate) fn to_bf16_bits(v: &[f32]) -> Vec<u16> {
    v.iter()
        .map(|&x| half::bf16::from_f32(x).to_bits())
        .collect()
}

fn floats(t: &WeightTensor, rows: usize, cols: usize) -> Result<Vec<f32>, BackendError> {
    if t.numel() != rows * cols {
        return Err(BackendError::UnsupportedWeight {
            name: t.name.clone(),
            reason: format!("shape {:?}, expected {rows} x {cols}", t.shape),
        });
    }
    crate::quant::dequantize_tensor(t).map_err(|e| BackendError::UnsupportedWeight {
        name: t.name.clone(),
        reason: e.to_string(),
    })
}

/// The prefill attention kernel a new backend uses: 128-row tiles measured fastest on the H100
/// (8B shapes: 16k-token prefill 0.93 s vs 1.00 s with 64-row tiles, 4k 135 vs 138 ms).
pub const DEFAULT_PREFILL_ATTENTION: PrefillAttention = PrefillAttention::TensorCore128;

/// Whether decode graphs are on by default: `TURBINE_CUDA_GRAPHS=0` turns them off (to
/// compare with eager launches in benchmarks).
fn graphs_from_env() -> bool {
    std::env::var_os("TURBINE_CUDA_GRAPHS").is_none_or(|v| v != "0")
}

/// The graph shape of a step, if it is a decode step a graph can serve: one new token per
/// sequence, every row sampled, no repetition penalty (its history has no fixed size).
fn graph_shape(batch: &[SeqStep<'_>], rows: &[SampleRow<'_>]) -> Option<GraphShape> {
    let decode = batch.iter().all(|s| s.tokens.len() == 1 && s.want_logits);
    let plain = rows.iter().all(|r| r.params.repetition_penalty == 1.0);
    if !decode || !plain || rows.len() != batch.len() {
        return None;
    }
    let bucket = *GRAPH_BATCHES.iter().find(|&&b| b >= batch.len())?;
    let max_ctx = batch.iter().map(|s| s.end_pos()).max().unwrap_or(1);
    Some(GraphShape {
        rows: bucket,
        ctx_cap: max_ctx.next_power_of_two().max(GRAPH_MIN_CTX),
    })
}

/// Split-K attention workspace allowed per launch (bytes).
const ATTN_WORKSPACE_BYTES: usize = 256 << 20;

/// Query tokens per attention launch so the workspace stays within [`ATTN_WORKSPACE_BYTES`].
fn attn_chunk(g: &Gpu, tokens: usize, n_heads: usize, max_ctx: usize) -> usize {
    let per_token = g.attn_workspace(1, n_heads, max_ctx).0.max(1);
    (ATTN_WORKSPACE_BYTES / per_token).clamp(1, tokens.max(1))
}

impl CudaBackend {
    /// Fills the whole KV pool with seeded random values (benchmarks: never time on zeros).
    pub fn randomize_kv(&mut self, seed: u64) -> Result<(), BackendError> {
        let n = self.layout.num_blocks * self.layout.elems_per_layer_block();
        for (l, (k, v)) in self.kcache.iter().zip(&self.vcache).enumerate() {
            self.gpu
                .init_uniform_bf16(k.ptr(), n, seed ^ (2 * l as u64), 1.0, 0.0)?;
            self.gpu
                .init_uniform_bf16(v.ptr(), n, seed ^ (2 * l as u64 + 1), 1.0, 0.0)?;
        }
        self.gpu.sync()?;
        Ok(())
    }

    fn empty(
        config: ModelConfig,
        options: CudaBackendOptions,
    ) -> Result<(Gpu, KvLayout), BackendError> {
        check_config(&config, &options)?;
        let gpu = Gpu::new(
            options.device,
            KernelSpec {
                head_dim: config.head_dim,
                group: config.group_size(),
            },
        )?;
        let layout = KvLayout {
            block_size: options.block_size,
            num_blocks: options.num_blocks,
            n_layers: config.n_layers,
            n_kv_heads: config.n_kv_heads,
            head_dim: config.head_dim,
            dtype: KvDType::BF16,
        };
        Ok((gpu, layout))
    }

    /// The KV pool: every layer's K and V in one `cuMemAlloc` allocation (the kind another
    /// process can map by an IPC handle, `kv_ipc`), cut into one part per layer and kind.
    #[allow(clippy::type_complexity)] // the allocation and its two lists of parts
    fn alloc_pool(
        gpu: &Gpu,
        layout: &KvLayout,
    ) -> Result<(Arc<SharedAlloc>, Vec<DBuf>, Vec<DBuf>), BackendError> {
        // One spare block past the pool: padding rows of decode graphs write there.
        let bytes = (layout.num_blocks + 1) * layout.elems_per_layer_block() * 2;
        let all = SharedAlloc::new(gpu, 2 * layout.n_layers * bytes)?;
        gpu.fill(all.ptr(), 0, all.len())?;
        let mut k = Vec::new();
        let mut v = Vec::new();
        for l in 0..layout.n_layers {
            k.push(all.part(2 * l * bytes, bytes)?);
            v.push(all.part((2 * l + 1) * bytes, bytes)?);
        }
        Ok((all, k, v))
    }

    /// Uploads `weights` (any dtype the loader produces: dequantized to f32 on the host, then
    /// stored as bf16) and allocates the KV pool.
    pub fn new(
        config: ModelConfig,
        weights: &ModelWeights,
        options: CudaBackendOptions,
    ) -> Result<CudaBackend, BackendError> {
        let (gpu, layout) = Self::empty(config.clone(), options)?;
        let c = &config;
        if weights.layers.len() != c.n_layers {
            return Err(BackendError::BadConfig(format!(
                "{} layers of weights for n_layers = {}",
                weights.layers.len(),
                c.n_layers
            )));
        }
        let (h, q, kv, f) = (
            c.hidden_size,
            c.n_heads * c.head_dim,
            c.n_kv_heads * c.head_dim,
            c.intermediate_size,
        );
        let mat = |parts: &[(&WeightTensor, usize)], cols: usize| -> Result<DBuf, BackendError> {
            let mut all = Vec::new();
            for (t, rows) in parts {
                all.extend(to_bf16_bits(&floats(t, *rows, cols)?));
            }
            Ok(gpu.upload(&all)?)
        };
        let vecf = |t: &WeightTensor, len: usize| -> Result<DBuf, BackendError> {
            Ok(gpu.upload(&floats(t, 1, len)?)?)
        };
        let mut layers = Vec::new();
        for l in &weights.layers {
            let bqkv = match (&l.bq, &l.bk, &l.bv) {
                (None, None, None) => None,
                (bq, bk, bv) => {
                    let mut all = Vec::new();
                    for (b, len) in [(bq, q), (bk, kv), (bv, kv)] {
                        match b {
                            Some(t) => all.extend(floats(t, 1, len)?),
                            None => all.extend(std::iter::repeat_n(0.0f32, len)),
                        }
                    }
                    Some(gpu.upload(&all)?)
                }
            };
            layers.push(DevLayer {
                attn_norm: vecf(&l.attn_norm, h)?,
                wqkv: mat(&[(&l.wq, q), (&l.wk, kv), (&l.wv, kv)], h)?,
                bqkv,
                wo: mat(&[(&l.wo, h)], q)?,
                ffn_norm: vecf(&l.ffn_norm, h)?,
                w_gu: mat(&[(&l.w_gate, f), (&l.w_up, f)], h)?,
                w_down: mat(&[(&l.w_down, h)], f)?,
            });
        }
        let embd = mat(&[(&weights.token_embd, c.vocab_size)], h)?;
        let head = match &weights.output {
            Some(t) => Some(mat(&[(t, c.vocab_size)], h)?),
            None => None,
        };
        let out_norm = vecf(&weights.output_norm, h)?;
        let (kv_alloc, kcache, vcache) = Self::alloc_pool(&gpu, &layout)?;
        gpu.sync()?;
        let kv_host = std::sync::Arc::new(kv_copy::PinnedPool::new(gpu.ctx.clone()));
        Ok(CudaBackend {
            gpu,
            config,
            layout,
            embd,
            head,
            out_norm,
            layers,
            kcache,
            vcache,
            scratch: Scratch::default(),
            pinned_in: None,
            pinned_out: None,
            graphs: BTreeMap::new(),
            use_graphs: graphs_from_env(),
            prefill_attention: DEFAULT_PREFILL_ATTENTION,
            kv_host,
            kv_alloc,
            ipc_peers: kv_ipc::IpcPeers::default(),
        })
    }

    /// A model of `config`'s shapes with seeded random weights generated on the device (no
    /// file, no host copy): the same values `synthetic::synthetic_weights(config, seed)` would
    /// give, up to float rounding of the hash-to-float step.
    pub fn synthetic(
        config: ModelConfig,
        seed: u64,
        options: CudaBackendOptions,
    ) -> Result<CudaBackend, BackendError> {
        let (gpu, layout) = Self::empty(config.clone(), options)?;
        let c = &config;
        let (h, q, kv, f) = (
            c.hidden_size,
            c.n_heads * c.head_dim,
            c.n_kv_heads * c.head_dim,
            c.intermediate_size,
        );
        // Fills a fused bf16 matrix part by part, each part with its own draw.
        let mat = |parts: &[(Draw, usize)], cols: usize| -> Result<DBuf, BackendError> {
            let rows: usize = parts.iter().map(|p| p.1).sum();
            let b = gpu.alloc(rows * cols * 2)?;
            let mut off = 0usize;
            for (d, r) in parts {
                gpu.init_uniform_bf16(b.ptr() + off as u64, r * cols, d.seed, d.scale, d.offset)?;
                off += r * cols * 2;
            }
            Ok(b)
        };
        let vecf = |d: Draw, len: usize| -> Result<DBuf, BackendError> {
            let b = gpu.alloc(len * 4)?;
            gpu.init_uniform_f32(b.ptr(), len, d.seed, d.scale, d.offset)?;
            Ok(b)
        };
        let mut layers = Vec::new();
        for l in 0..c.n_layers {
            let d = |role: usize, fan_in: usize| draw_for(seed, Some(l), role, fan_in);
            layers.push(DevLayer {
                attn_norm: vecf(d(0, h), h)?,
                wqkv: mat(&[(d(1, h), q), (d(2, h), kv), (d(3, h), kv)], h)?,
                bqkv: None,
                wo: mat(&[(d(4, q), h)], q)?,
                ffn_norm: vecf(d(5, h), h)?,
                w_gu: mat(&[(d(6, h), f), (d(7, h), f)], h)?,
                w_down: mat(&[(d(8, f), h)], f)?,
            });
        }
        let embd = mat(&[(draw_for(seed, None, 0, h), c.vocab_size)], h)?;
        let head = Some(mat(&[(draw_for(seed, None, 2, h), c.vocab_size)], h)?);
        let out_norm = vecf(draw_for(seed, None, 1, h), h)?;
        let (kv_alloc, kcache, vcache) = Self::alloc_pool(&gpu, &layout)?;
        gpu.sync()?;
        let kv_host = std::sync::Arc::new(kv_copy::PinnedPool::new(gpu.ctx.clone()));
        Ok(CudaBackend {
            gpu,
            config,
            layout,
            embd,
            head,
            out_norm,
            layers,
            kcache,
            vcache,
            scratch: Scratch::default(),
            pinned_in: None,
            pinned_out: None,
            graphs: BTreeMap::new(),
            use_graphs: graphs_from_env(),
            prefill_attention: DEFAULT_PREFILL_ATTENTION,
            kv_host,
            kv_alloc,
            ipc_peers: kv_ipc::IpcPeers::default(),
        })
    }

    /// Chooses the attention kernel of prefill-only steps (benchmarks and tests compare them;
    /// the default is [`DEFAULT_PREFILL_ATTENTION`]).
    pub fn set_prefill_attention(&mut self, kernel: PrefillAttention) {
        self.prefill_attention = kernel;
    }

    /// The device (for timing events in benchmarks).
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Bytes of weights on the device.
    pub fn weight_bytes(&self) -> usize {
        let mut n =
            self.embd.len() + self.out_norm.len() + self.head.as_ref().map_or(0, |b| b.len());
        for l in &self.layers {
            n += l.attn_norm.len()
                + l.wqkv.len()
                + l.wo.len()
                + l.ffn_norm.len()
                + l.w_gu.len()
                + l.w_down.len();
            n += l.bqkv.as_ref().map_or(0, |b| b.len());
        }
        n
    }

    fn validate(&self, batch: &[SeqStep<'_>]) -> Result<(), BackendError> {
        // Kernels index positions with i32 (and twice a position in places).
        crate::backend::validate_batch(batch, &self.config, &self.layout, i32::MAX as usize / 2)
    }

    fn check_block(&self, b: u32) -> Result<(), BackendError> {
        if (b as usize) < self.layout.num_blocks {
            Ok(())
        } else {
            Err(BackendError::BadBlockId {
                block: b,
                num_blocks: self.layout.num_blocks,
            })
        }
    }

    fn ensure_scratch(
        &mut self,
        tokens: usize,
        logits: usize,
        max_ctx: usize,
        meta_len: usize,
    ) -> Result<bool, BackendError> {
        let c = &self.config;
        // Launches use `chunk` tokens, the last one the remainder: room for either.
        let chunk = attn_chunk(&self.gpu, tokens, c.n_heads, max_ctx);
        let full = self.gpu.attn_workspace(chunk, c.n_heads, max_ctx);
        let last = self.gpu.attn_workspace(tokens % chunk, c.n_heads, max_ctx);
        let ws = (full.0.max(last.0), full.1.max(last.1));
        let s = &self.scratch;
        if s.bufs.is_some()
            && tokens <= s.tokens
            && logits <= s.logits
            && ws.0 <= s.ws.0
            && ws.1 <= s.ws.1
            && meta_len <= s.meta_len
        {
            return Ok(false);
        }
        let tokens = tokens.max(s.tokens);
        let logits = logits.max(s.logits).max(1);
        let ws = (ws.0.max(s.ws.0), ws.1.max(s.ws.1));
        let meta_len = meta_len.max(s.meta_len);
        self.scratch.bufs = None;
        let (h, q, kv, f) = (
            c.hidden_size,
            c.n_heads * c.head_dim,
            c.n_kv_heads * c.head_dim,
            c.intermediate_size,
        );
        let g = &self.gpu;
        let bufs = ScratchBufs {
            x: g.alloc(tokens * h * 4)?,
            h: g.alloc(tokens * h * 2)?,
            qkv: g.alloc(tokens * (q + 2 * kv) * 2)?,
            attn: g.alloc(tokens * q * 2)?,
            o: g.alloc(tokens * h * 2)?,
            gu: g.alloc(tokens * 2 * f * 2)?,
            act: g.alloc(tokens * f * 2)?,
            part_o: g.alloc(ws.0)?,
            part_ml: g.alloc(ws.1)?,
            meta: g.alloc(meta_len * 4)?,
            head_in: g.alloc(logits * h * 2)?,
            logits: g.alloc(logits * c.vocab_size * 4)?,
            sample_work: g.alloc(logits * c.vocab_size * 4)?,
            sample_out: g.alloc(logits * SAMPLE_OUT * 4)?,
        };
        self.scratch = Scratch {
            tokens,
            logits,
            ws,
            meta_len,
            bufs: Some(bufs),
        };
        // Graphs point into the old buffers.
        self.graphs.clear();
        Ok(true)
    }

    /// Turns a validated batch into its metadata words: tokens, positions, KV slots, token ->
    /// sequence, logits rows, per-sequence table offsets, block tables, prefill tiles, then
    /// (when sampling) each row's parameters and the rows' distinct history tokens. With
    /// `shape` (a decode graph) every part has the bucket's fixed size and offset; padding
    /// rows point at the spare block past the pool and sample greedily. A step `i` with
    /// `every[i]` gets a logits row for each of its tokens (`Backend::forward_every`): the
    /// head GEMM simply runs over more gathered rows.
    fn plan_step(
        &self,
        batch: &[SeqStep<'_>],
        rows: Option<&[SampleRow<'_>]>,
        shape: Option<GraphShape>,
        every: &[bool],
    ) -> StepPlan {
        let bs = self.layout.block_size;
        let spare = self.layout.num_blocks as i32;
        let (mut tokens, mut pos, mut slots, mut tok_seq, mut lrows, mut bt_off, mut tables) = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        );
        let stride = shape.map(|g| g.ctx_cap.div_ceil(bs));
        let mut max_ctx = 1;
        for (si, s) in batch.iter().enumerate() {
            let end = s.end_pos();
            max_ctx = max_ctx.max(end);
            bt_off.push(tables.len() as i32);
            let used = end.div_ceil(bs);
            tables.extend(s.block_table[..used].iter().map(|&b| b as i32));
            if let Some(w) = stride {
                tables.extend(std::iter::repeat_n(spare, w - used));
            }
            for (i, &t) in s.tokens.iter().enumerate() {
                let p = s.start_pos + i;
                tokens.push(t as i32);
                pos.push(p as i32);
                slots.push((s.block_table[p / bs] as usize * bs + p % bs) as i32);
                tok_seq.push(si as i32);
            }
            if every.get(si).copied().unwrap_or(false) {
                lrows.extend(tokens.len() as i32 - s.tokens.len() as i32..tokens.len() as i32);
            } else if s.want_logits {
                lrows.push(tokens.len() as i32 - 1);
            }
        }
        if let (Some(g), Some(w)) = (shape, stride) {
            for si in batch.len()..g.rows {
                bt_off.push(tables.len() as i32);
                tables.extend(std::iter::repeat_n(spare, w));
                tokens.push(0);
                pos.push(0);
                slots.push(spare * bs as i32);
                tok_seq.push(si as i32);
                lrows.push(si as i32);
            }
            max_ctx = g.ctx_cap;
        }
        let n = tokens.len();
        let m = lrows.len();
        // Prefill-only steps take the tensor-core kernel (no split workspace either).
        let tile_rows = self
            .prefill_attention
            .tile_rows()
            .filter(|_| batch.iter().all(|s| s.tokens.len() >= PREFILL_MIN_TOKENS));
        let tiles = match (tile_rows, shape) {
            (Some(r), None) => {
                prefill_tiles(&batch.iter().map(|s| s.tokens.len()).collect::<Vec<_>>(), r)
            }
            _ => Vec::new(),
        };
        let mut sparams = Vec::new();
        let mut hist = Vec::new();
        if let Some(rows) = rows {
            for r in rows {
                let off = hist.len();
                if r.params.repetition_penalty != 1.0 {
                    let mut seen: Vec<u32> = r.history.to_vec();
                    seen.sort_unstable();
                    seen.dedup();
                    hist.extend(seen.iter().map(|&t| t as i32));
                }
                sparams.extend(sample_params(&r.params, r.logprobs, off, hist.len() - off));
            }
            let greedy = sample_params(&SamplingParams::greedy(), false, 0, 0);
            for _ in rows.len()..m {
                sparams.extend(greedy);
            }
        }
        let mut words = Vec::new();
        let mut offs = [0usize; 10];
        for (i, part) in [
            &tokens, &pos, &slots, &tok_seq, &lrows, &bt_off, &tables, &tiles, &sparams, &hist,
        ]
        .iter()
        .enumerate()
        {
            offs[i] = words.len();
            words.extend_from_slice(part);
        }
        StepPlan {
            words,
            offs: MetaOffsets {
                tokens: offs[0],
                pos: offs[1],
                slots: offs[2],
                tok_seq: offs[3],
                rows: offs[4],
                bt_off: offs[5],
                tables: offs[6],
                tiles: offs[7],
                sparams: offs[8],
                hist: offs[9],
            },
            n,
            m,
            max_ctx,
            n_tiles: tiles.len() / 3,
            sample: rows.is_some(),
            all_rows: m == n && lrows.iter().enumerate().all(|(i, &r)| r == i as i32),
        }
    }

    /// Queues the whole step on the compute stream (no allocation, no synchronisation, no
    /// host copy: what a graph capture records): embeddings, the layers, final norm, head
    /// GEMM, and with `plan.sample` the device sampler into `sample_out`. `meta` is the
    /// device address of the plan's words. `spliced` (a prefill with images; never in a
    /// graph) overwrites token rows of the embeddings with given values: (first row, values).
    fn enqueue(
        &self,
        plan: &StepPlan,
        meta: u64,
        spliced: &[(usize, &[f32])],
    ) -> Result<(), CudaError> {
        let c = &self.config;
        let bs = self.layout.block_size;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let (q, kv, f) = (c.n_heads * hd, c.n_kv_heads * hd, c.intermediate_size);
        let qkv_dim = q + 2 * kv;
        let (n, m, max_ctx) = (plan.n, plan.m, plan.max_ctx);
        let Some(sb) = self.scratch.bufs.as_ref() else {
            return Err(CudaError::Shape("scratch buffers missing".into()));
        };
        let g = &self.gpu;
        let mp = |off: usize| meta + (off * 4) as u64;
        let o = plan.offs;
        let am = AttnMeta {
            block_tables: mp(o.tables),
            tok_seq: mp(o.tok_seq),
            tok_pos: mp(o.pos),
            seq_bt_off: mp(o.bt_off),
            block_size: bs,
        };
        let eps = c.rms_norm_eps;
        g.embed_rows(self.embd.ptr(), mp(o.tokens), sb.x.ptr(), n, h)?;
        for &(row, values) in spliced {
            // Ordered after the lookup on the compute stream; `x` is f32 like the values.
            g.htod(values, &sb.x, row * h * 4)?;
        }
        for (li, l) in self.layers.iter().enumerate() {
            let add = if li == 0 { 0 } else { sb.o.ptr() };
            g.add_rmsnorm(sb.x.ptr(), add, l.attn_norm.ptr(), sb.h.ptr(), n, h, eps)?;
            g.gemm_xwt(
                sb.h.ptr(),
                h,
                l.wqkv.ptr(),
                sb.qkv.ptr(),
                qkv_dim,
                n,
                qkv_dim,
                h,
                false,
            )?;
            if let Some(b) = &l.bqkv {
                g.add_bias(sb.qkv.ptr(), b.ptr(), n, qkv_dim, qkv_dim)?;
            }
            let (kc, vc) = (self.kcache[li].ptr(), self.vcache[li].ptr());
            g.rope_kv_write(
                sb.qkv.ptr(),
                mp(o.pos),
                mp(o.slots),
                kc,
                vc,
                n,
                qkv_dim,
                c.n_heads,
                c.n_kv_heads,
                c.rope_theta,
                c.rope_style == RopeStyle::Neox,
            )?;
            if plan.n_tiles > 0 {
                g.attention_prefill(
                    sb.qkv.ptr(),
                    qkv_dim,
                    kc,
                    vc,
                    &am,
                    mp(o.tiles),
                    plan.n_tiles,
                    c.n_kv_heads,
                    sb.attn.ptr(),
                    self.prefill_attention,
                )?;
            }
            // Attention in token chunks so the split-K workspace stays bounded on long prompts.
            let chunk = attn_chunk(g, n, c.n_heads, max_ctx);
            let mut t0 = if plan.n_tiles > 0 { n } else { 0 };
            while t0 < n {
                let nt = chunk.min(n - t0);
                let sub = AttnMeta {
                    tok_seq: am.tok_seq + (t0 * 4) as u64,
                    tok_pos: am.tok_pos + (t0 * 4) as u64,
                    ..am
                };
                g.attention(
                    sb.qkv.ptr() + (t0 * qkv_dim * 2) as u64,
                    qkv_dim,
                    kc,
                    vc,
                    &sub,
                    nt,
                    c.n_kv_heads,
                    max_ctx,
                    sb.part_o.ptr(),
                    sb.part_ml.ptr(),
                    sb.attn.ptr() + (t0 * q * 2) as u64,
                )?;
                t0 += nt;
            }
            g.gemm_xwt(sb.attn.ptr(), q, l.wo.ptr(), sb.o.ptr(), h, n, h, q, false)?;
            g.add_rmsnorm(
                sb.x.ptr(),
                sb.o.ptr(),
                l.ffn_norm.ptr(),
                sb.h.ptr(),
                n,
                h,
                eps,
            )?;
            g.gemm_xwt(
                sb.h.ptr(),
                h,
                l.w_gu.ptr(),
                sb.gu.ptr(),
                2 * f,
                n,
                2 * f,
                h,
                false,
            )?;
            g.swiglu_down(
                sb.gu.ptr(),
                sb.act.ptr(),
                l.w_down.ptr(),
                sb.o.ptr(),
                h,
                n,
                h,
                f,
            )?;
        }
        let add = if self.layers.is_empty() {
            0
        } else {
            sb.o.ptr()
        };
        g.add_rmsnorm(sb.x.ptr(), add, self.out_norm.ptr(), sb.h.ptr(), n, h, eps)?;
        if m > 0 {
            // Decode steps want every row, in order: the head reads the normed rows in place.
            let head_in = if plan.all_rows {
                sb.h.ptr()
            } else {
                g.gather_rows(sb.h.ptr(), mp(o.rows), sb.head_in.ptr(), m, h)?;
                sb.head_in.ptr()
            };
            let head = self.head.as_ref().unwrap_or(&self.embd);
            g.gemm_xwt(
                head_in,
                h,
                head.ptr(),
                sb.logits.ptr(),
                c.vocab_size,
                m,
                c.vocab_size,
                h,
                true,
            )?;
            if plan.sample {
                g.sample_rows(
                    sb.logits.ptr(),
                    sb.sample_work.ptr(),
                    m,
                    c.vocab_size,
                    mp(o.sparams),
                    mp(o.hist),
                    sb.sample_out.ptr(),
                )?;
            }
        }
        Ok(())
    }

    /// Runs a validated batch eagerly (every launch from the host): the logits end up in
    /// `scratch.logits` and, when sampling, the results in `scratch.sample_out`. Returns the
    /// number of logits rows. Nothing is synchronised.
    fn run(
        &mut self,
        batch: &[SeqStep<'_>],
        rows: Option<&[SampleRow<'_>]>,
        every: &[bool],
        splices: &[Splice<'_>],
    ) -> Result<usize, BackendError> {
        let plan = self.plan_step(batch, rows, None, every);
        self.ensure_scratch(plan.n, plan.m, plan.max_ctx, plan.words.len())?;
        let Some(meta) = self
            .scratch
            .bufs
            .as_ref()
            .map(|b| (b.meta.ptr(), b.meta.len()))
        else {
            return Err(BackendError::Device("scratch buffers missing".into()));
        };
        self.upload_meta_to(&plan.words, meta)?;
        // A step's tokens are rows in batch order (`plan_step`); nothing is allocated for
        // the usual step without splices.
        let spliced: Vec<(usize, &[f32])> = splices
            .iter()
            .map(|sp| {
                let rows_before: usize = batch[..sp.step].iter().map(|s| s.tokens.len()).sum();
                (rows_before + sp.offset, sp.embeds)
            })
            .collect();
        self.enqueue(&plan, meta.0, &spliced)?;
        Ok(plan.m)
    }

    /// Copies `words` into the page-locked staging buffer (grown as needed) and queues its
    /// upload to device address `dst.0` (of `dst.1` bytes). Asynchronous: the staging buffer
    /// is written again only after the call's final synchronisation.
    fn upload_meta_to(&mut self, words: &[i32], dst: (u64, usize)) -> Result<(), BackendError> {
        if self
            .pinned_in
            .as_ref()
            .is_none_or(|p| p.len() < words.len())
        {
            self.pinned_in = Some(PinnedWords::new(
                &self.gpu,
                words.len().next_power_of_two(),
            )?);
        }
        let Some(stage) = self.pinned_in.as_mut() else {
            return Err(BackendError::Device("staging buffer missing".into()));
        };
        stage.as_mut_slice()[..words.len()].copy_from_slice(words);
        self.gpu.htod_pinned(stage, words.len(), dst.0, dst.1)?;
        Ok(())
    }

    /// Runs a validated decode batch by replaying (capturing first, if new) the graph of
    /// its shape. `Ok(false)`: no graph could be made; nothing was queued.
    fn run_graph(
        &mut self,
        batch: &[SeqStep<'_>],
        rows: &[SampleRow<'_>],
        shape: GraphShape,
    ) -> Result<bool, BackendError> {
        self.ensure_scratch(shape.rows, shape.rows, shape.ctx_cap, 0)?;
        let plan = self.plan_step(batch, Some(rows), Some(shape), &[]);
        if !self.graphs.contains_key(&shape) {
            if self.graphs.len() >= GRAPH_CACHE_MAX {
                return Ok(false);
            }
            let meta = self.gpu.alloc(plan.words.len() * 4)?;
            let captured = self.gpu.capture(|| self.enqueue(&plan, meta.ptr(), &[]));
            match captured {
                Ok(graph) => {
                    if std::env::var_os("TURBINE_STEP_PROFILE").is_some() {
                        eprintln!(
                            "turbine: captured a decode graph for {} rows, context {}: {} nodes",
                            shape.rows,
                            shape.ctx_cap,
                            graph.nodes()?
                        );
                    }
                    self.graphs.insert(shape, GraphEntry { graph, meta });
                }
                Err(e) => {
                    // Serve eagerly from now on rather than fail the step.
                    eprintln!(
                        "turbine: CUDA graph capture failed ({e}); decode steps run without graphs"
                    );
                    self.use_graphs = false;
                    return Ok(false);
                }
            }
        }
        let Some(entry) = self.graphs.get(&shape) else {
            return Ok(false);
        };
        let dst = (entry.meta.ptr(), entry.meta.len());
        self.upload_meta_to(&plan.words, dst)?;
        let Some(entry) = self.graphs.get(&shape) else {
            return Ok(false);
        };
        self.gpu.replay(&entry.graph)?;
        Ok(true)
    }

    /// The device sampler over a validated batch: graph or eager launches, one copy of the
    /// results back, one synchronisation. `rows` has one entry per logits row.
    fn sample_on_device(
        &mut self,
        batch: &[SeqStep<'_>],
        rows: &[SampleRow<'_>],
    ) -> Result<Vec<Result<SampledToken, SamplingError>>, BackendError> {
        let graphed = match graph_shape(batch, rows).filter(|_| self.use_graphs) {
            Some(shape) => self.run_graph(batch, rows, shape)?,
            None => false,
        };
        if !graphed {
            self.run(batch, Some(rows), &[], &[])?;
        }
        let m = rows.len();
        let words = m * SAMPLE_OUT;
        if self.pinned_out.as_ref().is_none_or(|p| p.len() < words) {
            self.pinned_out = Some(PinnedWords::new(&self.gpu, words.next_power_of_two())?);
        }
        let (Some(sb), Some(out)) = (self.scratch.bufs.as_ref(), self.pinned_out.as_mut()) else {
            return Err(BackendError::Device("scratch buffers missing".into()));
        };
        self.gpu.dtoh_pinned(sb.sample_out.ptr(), words, out)?;
        self.gpu.sync()?;
        let out = out.as_slice();
        Ok(rows
            .iter()
            .enumerate()
            .map(|(i, row)| {
                let w = &out[i * SAMPLE_OUT..(i + 1) * SAMPLE_OUT];
                if w[0] < 0 {
                    return Err(SamplingError::NoFiniteLogits);
                }
                let token = w[0] as u32;
                if !row.logprobs {
                    return Ok(SampledToken {
                        token,
                        logprob: None,
                        top_logprobs: Vec::new(),
                    });
                }
                let n = (w[2].max(0) as usize).min(SAMPLE_MAX_TOP);
                let top = (0..n)
                    .map(|j| {
                        (
                            w[3 + j] as u32,
                            f32::from_bits(w[3 + SAMPLE_MAX_TOP + j] as u32),
                        )
                    })
                    .collect();
                Ok(SampledToken {
                    token,
                    logprob: Some(f32::from_bits(w[1] as u32)),
                    top_logprobs: top,
                })
            })
            .collect())
    }

    /// Sends GEMMs of at most [`crate::cuda::GEMV_MAX_ROWS`] rows to the `gemv_xwt` kernel
    /// (off unless `TURBINE_CUDA_GEMV=1`) or to cuBLAS; captured graphs are dropped.
    pub fn set_gemv(&mut self, on: bool) {
        self.gpu.gemv = on;
        self.graphs.clear();
    }

    /// Turns decode graphs on or off (they are on unless `TURBINE_CUDA_GRAPHS=0`).
    pub fn set_graphs(&mut self, on: bool) {
        self.use_graphs = on;
        if !on {
            self.graphs.clear();
        }
    }

    /// Like [`Backend::forward`] but returns the greedy (argmax) token of each logits row,
    /// chosen on the device (the device sampler with temperature 0; decode steps replay a
    /// graph), so only a few bytes per row come back.
    pub fn forward_greedy(&mut self, batch: &[SeqStep<'_>]) -> Result<Vec<u32>, BackendError> {
        let m = batch.iter().filter(|s| s.want_logits).count();
        let rows = vec![
            SampleRow {
                params: SamplingParams::greedy(),
                history: &[],
                bias: &[],
                allowed: None,
                logprobs: false,
            };
            m
        ];
        self.forward_sample(batch, &rows)?
            .into_iter()
            .map(|r| r.map(|t| t.token))
            .collect::<Result<Vec<u32>, SamplingError>>()
            .map_err(|e| BackendError::Device(format!("greedy choice: {e}")))
    }

    /// Runs a validated batch eagerly and copies its logits rows back (see
    /// [`CudaBackend::plan_step`] for `every`).
    fn logits_of(
        &mut self,
        batch: &[SeqStep<'_>],
        every: &[bool],
        splices: &[Splice<'_>],
    ) -> Result<Logits, BackendError> {
        let m = self.run(batch, None, every, splices)?;
        let vocab = self.config.vocab_size;
        let mut data = vec![0.0f32; m * vocab];
        if m > 0 {
            let Some(sb) = self.scratch.bufs.as_ref() else {
                return Err(BackendError::Device("scratch buffers missing".into()));
            };
            self.gpu.dtoh(&sb.logits, 0, &mut data)?;
        } else {
            self.gpu.sync()?;
        }
        Ok(Logits { vocab, data })
    }

    /// Byte offset of (block, layer) in a layer's K or V buffer, and its length.
    fn block_span(&self, block: u32) -> (usize, usize) {
        let len = self.layout.elems_per_layer_block() * 2;
        (block as usize * len, len)
    }
}

impl Backend for CudaBackend {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn kv_layout(&self) -> KvLayout {
        self.layout
    }

    fn forward(&mut self, batch: &[SeqStep<'_>]) -> Result<Logits, BackendError> {
        self.validate(batch)?;
        self.logits_of(batch, &[], &[])
    }

    /// Image embeddings replace the looked-up rows of their positions before the first
    /// layer; the rest of the pass is [`Backend::forward`]'s.
    fn forward_spliced(
        &mut self,
        batch: &[SeqStep<'_>],
        splices: &[Splice<'_>],
    ) -> Result<Logits, BackendError> {
        self.validate(batch)?;
        validate_splices(batch, splices, self.config.hidden_size)?;
        self.logits_of(batch, &[], splices)
    }

    /// One pass: the head GEMM runs over every token row of the `every` steps.
    fn forward_every(
        &mut self,
        batch: &[SeqStep<'_>],
        every: &[bool],
    ) -> Result<Logits, BackendError> {
        self.validate(batch)?;
        self.logits_of(batch, every, &[])
    }

    fn forward_sample(
        &mut self,
        batch: &[SeqStep<'_>],
        rows: &[SampleRow<'_>],
    ) -> Result<Vec<Result<SampledToken, SamplingError>>, BackendError> {
        self.validate(batch)?;
        let m = batch.iter().filter(|s| s.want_logits).count();
        if rows.len() != m {
            return Err(BackendError::Device(format!(
                "{} sampling rows for {m} logits rows",
                rows.len()
            )));
        }
        if rows.iter().any(|r| {
            (r.logprobs && r.params.top_logprobs > SAMPLE_MAX_TOP)
                || !r.bias.is_empty()
                || r.allowed.is_some()
        }) {
            // More alternatives than the device sampler reports, a logit bias or a grammar
            // mask (which it does not apply): the host sampler does it.
            let logits = self.forward(batch)?;
            return Ok(crate::sampling::sample_rows_on_host(&logits, rows));
        }
        // Rows with bad parameters fail alone; the device draws a greedy token in their place.
        let checked: Vec<Result<(), SamplingError>> =
            rows.iter().map(|r| r.params.validate()).collect();
        let safe: Vec<SampleRow<'_>> = rows
            .iter()
            .zip(&checked)
            .map(|(r, ok)| match ok {
                Ok(()) => r.clone(),
                Err(_) => SampleRow {
                    params: SamplingParams::greedy(),
                    history: &[],
                    bias: &[],
                    allowed: None,
                    logprobs: false,
                },
            })
            .collect();
        let drawn = self.sample_on_device(batch, &safe)?;
        Ok(drawn
            .into_iter()
            .zip(checked)
            .map(|(d, ok)| ok.and(d))
            .collect())
    }

    fn copy_blocks(&mut self, src_dst: &[(u32, u32)]) -> Result<(), BackendError> {
        for &(s, d) in src_dst {
            self.check_block(s)?;
            self.check_block(d)?;
        }
        for &(s, d) in src_dst {
            let (so, len) = self.block_span(s);
            let (doff, _) = self.block_span(d);
            for l in 0..self.layout.n_layers {
                for buf in [&self.kcache[l], &self.vcache[l]] {
                    self.gpu
                        .dtod(buf.ptr() + so as u64, buf.ptr() + doff as u64, len)?;
                }
            }
        }
        self.gpu.sync()?;
        Ok(())
    }

    fn export_blocks(&self, ids: &[u32]) -> Result<Vec<u8>, BackendError> {
        // Through the copy stream's layer chunks, reordered to the trait's block-major order
        // on the host (the transfer plane uses `export_layer_chunks`, without this pass).
        let chunks = self.export_layer_chunks(ids)?;
        let mut out = vec![0u8; self.layout.bytes_per_block() * ids.len()];
        let seg2 = 2 * self.block_span(0).1;
        let per = self.layout.bytes_per_block();
        for (l, chunk) in chunks.iter().enumerate() {
            for i in 0..ids.len() {
                out[i * per + l * seg2..i * per + (l + 1) * seg2]
                    .copy_from_slice(&chunk[i * seg2..(i + 1) * seg2]);
            }
        }
        Ok(out)
    }

    fn export_layer_chunks(&self, ids: &[u32]) -> Result<Vec<bytes::Bytes>, BackendError> {
        self.export_pinned_chunks(ids)
    }

    fn import_layer_chunks(
        &mut self,
        ids: &[u32],
        chunks: &[bytes::Bytes],
    ) -> Result<(), BackendError> {
        self.import_chunks(ids, chunks)
    }

    fn kv_ipc_pool(&self) -> Option<crate::kv_ipc::KvIpcPool> {
        match self.kv_ipc_offer() {
            Ok(offer) => Some(offer),
            Err(e) => {
                tracing::warn!("no IPC handle for the KV pool ({e}): KV leaves by host memory");
                None
            }
        }
    }

    fn pull_blocks_ipc(
        &mut self,
        offer: &crate::kv_ipc::KvIpcPool,
        src: &[u32],
        dst: &[u32],
    ) -> Result<crate::kv_ipc::IpcPull, BackendError> {
        self.pull_ipc(offer, src, dst)
    }

    fn import_blocks(&mut self, ids: &[u32], data: &[u8]) -> Result<(), BackendError> {
        self.check_ids(ids)?;
        let per = self.layout.bytes_per_block();
        if data.len() != per * ids.len() {
            return Err(BackendError::KvDataSize {
                got: data.len(),
                expected: per * ids.len(),
            });
        }
        if ids.is_empty() {
            return Ok(());
        }
        let seg2 = 2 * self.block_span(0).1;
        let mut job = self.start_import(ids)?;
        let mut chunk = vec![0u8; job.layer_bytes()];
        for l in 0..self.layout.n_layers {
            for i in 0..ids.len() {
                let at = i * per + l * seg2;
                chunk[i * seg2..(i + 1) * seg2].copy_from_slice(&data[at..at + seg2]);
            }
            self.import_layer(&mut job, l, &chunk)?;
        }
        self.finish_import(job)?;
        Ok(())
    }
}
