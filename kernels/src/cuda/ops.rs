//! Typed launchers for the kernels in `kernels.cu`: one method per kernel, with the grid
//! chosen here, so the backend and the tests call the same thing. All asynchronous on the
//! compute stream; pointers are raw device addresses of bf16 (`u16`), f32 or i32 data.

use super::device::{Arg, CudaError, Gpu};

/// Attention blocks to aim for per launch: enough to fill every SM many times over (132 SMs
/// on an H100/H200), so a batch-1 decode step over a long context still spreads its keys over
/// the whole chip (split-K), and a 64-row decode step gets several splits per token, while a
/// long prefill keeps few splits (small workspace). 16 per SM measured best on the H200
/// (2026-12-02, docs/BENCHMARKS.md): SmolLM2 64-row decode at 512 positions 2.14 -> 1.86 ms
/// against 4 per SM, 8B batch 128 17.6 -> 17.2 ms, batch <= 8 unchanged.
const ATTN_TARGET_BLOCKS: usize = 16 * 132;

/// [`ATTN_TARGET_BLOCKS`], or `TURBINE_ATTN_TARGET_BLOCKS` when set to a positive number (read
/// once per process; a benchmarking knob for sweeping the split count).
fn attn_target_blocks() -> usize {
    static TARGET: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *TARGET.get_or_init(|| {
        std::env::var("TURBINE_ATTN_TARGET_BLOCKS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&b| b > 0)
            .unwrap_or(ATTN_TARGET_BLOCKS)
    })
}
/// Shortest split: below this the merge costs more than the parallelism gains.
const ATTN_MIN_SPLIT: usize = 32;
/// Longest split: keeps several splits per token at mid batch sizes (batch 128 at 1k ran
/// 19.3 ms with 256-position splits, 22.7 ms with one split per token).
const ATTN_MAX_SPLIT: usize = 512;

/// (splits, split_len) for `tokens` query tokens over up to `max_ctx` positions.
pub fn attn_splits(tokens: usize, n_kv_heads: usize, max_ctx: usize) -> (usize, usize) {
    let max_ctx = max_ctx.max(1);
    let want = attn_target_blocks().div_ceil((tokens * n_kv_heads).max(1));
    let splits = want
        .max(max_ctx.div_ceil(ATTN_MAX_SPLIT))
        .clamp(1, max_ctx.div_ceil(ATTN_MIN_SPLIT));
    let split_len = max_ctx.div_ceil(splits).next_multiple_of(ATTN_MIN_SPLIT);
    (max_ctx.div_ceil(split_len), split_len)
}
const ATTN_THREADS: u32 = 128;

/// i32 words of one row's parameters for [`Gpu::sample_rows`].
pub const SAMPLE_PARAMS: usize = 10;
/// Most alternatives the device sampler reports per token (the API's limit too).
pub const SAMPLE_MAX_TOP: usize = 20;
/// i32 words of one row's result: token, logprob, count, ids, logprobs.
pub const SAMPLE_OUT: usize = 3 + 2 * SAMPLE_MAX_TOP;
const SAMPLE_THREADS: u32 = 1024;

/// One row's [`SAMPLE_PARAMS`] words: the draw's parameters, where its distinct history
/// tokens start (`hist_off`) and how many there are.
pub fn sample_params(
    p: &crate::sampling::SamplingParams,
    logprobs: bool,
    hist_off: usize,
    hist_len: usize,
) -> [i32; SAMPLE_PARAMS] {
    let f = |x: f32| x.to_bits() as i32;
    [
        f(p.temperature),
        p.top_k.min(i32::MAX as usize) as i32,
        f(p.top_p),
        f(p.min_p),
        f(p.repetition_penalty),
        p.seed as u32 as i32,
        (p.seed >> 32) as u32 as i32,
        if logprobs {
            p.top_logprobs.min(SAMPLE_MAX_TOP) as i32
        } else {
            -1
        },
        hist_off as i32,
        hist_len as i32,
    ]
}

/// Which attention kernel a prefill-only step uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefillAttention {
    /// `attn_split`, the kernel every step can use (CUDA cores, K/V re-read per query token).
    Split,
    /// `attn_prefill`: tensor cores, 64 query rows per block (4 warps).
    TensorCore64,
    /// `attn_prefill_wide`: tensor cores, 128 query rows per block (8 warps): each K/V tile
    /// loaded into shared memory serves twice the rows.
    TensorCore128,
}

impl PrefillAttention {
    /// Query rows per block (tile), `None` for the split kernel.
    pub fn tile_rows(self) -> Option<usize> {
        match self {
            PrefillAttention::Split => None,
            PrefillAttention::TensorCore64 => Some(64),
            PrefillAttention::TensorCore128 => Some(128),
        }
    }
}

/// A sequence needs at least this many new tokens in a step for the tensor-core prefill
/// kernel to pay (its warps compute 16 rows at a time); shorter ones use `attn_split`.
pub const PREFILL_MIN_TOKENS: usize = 16;

/// Tiles for [`Gpu::attention_prefill`] as i32 triples (first row, rows, sequence index):
/// `seq_tokens[s]` new tokens of sequence `s`, its rows contiguous and in order, cut into
/// tiles of at most `tile_rows`.
pub fn prefill_tiles(seq_tokens: &[usize], tile_rows: usize) -> Vec<i32> {
    let tile_rows = tile_rows.max(1);
    let mut tiles = Vec::new();
    let mut row = 0usize;
    for (s, &n) in seq_tokens.iter().enumerate() {
        let mut t = 0;
        while t < n {
            let rows = tile_rows.min(n - t);
            tiles.extend([(row + t) as i32, rows as i32, s as i32]);
            t += rows;
        }
        row += n;
    }
    tiles
}

/// Where the per-token attention metadata lives on the device (all i32 arrays).
#[derive(Clone, Copy, Debug)]
pub struct AttnMeta {
    /// Flattened block tables of all sequences.
    pub block_tables: u64,
    /// Per token: index of its sequence.
    pub tok_seq: u64,
    /// Per token: its position (it attends to 0..=pos).
    pub tok_pos: u64,
    /// Per sequence: offset of its table in `block_tables`.
    pub seq_bt_off: u64,
    pub block_size: usize,
}

impl Gpu {
    /// `x[r] = table[tokens[r]]` widened to f32.
    pub fn embed_rows(
        &self,
        table: u64,
        tokens: u64,
        x: u64,
        rows: usize,
        hidden: usize,
    ) -> Result<(), CudaError> {
        self.launch(
            &self.k.embed_rows,
            (rows as u32, 1, 1),
            256,
            &[
                Arg::P(table),
                Arg::P(tokens),
                Arg::P(x),
                Arg::I(hidden as i32),
            ],
        )
    }

    /// `x += add` (if `add != 0`), then `out = rmsnorm(x) * w` in bf16.
    #[allow(clippy::too_many_arguments)]
    pub fn add_rmsnorm(
        &self,
        x: u64,
        add: u64,
        w: u64,
        out: u64,
        rows: usize,
        hidden: usize,
        eps: f32,
    ) -> Result<(), CudaError> {
        self.launch(
            &self.k.add_rmsnorm,
            (rows as u32, 1, 1),
            1024.min(hidden.next_multiple_of(32)) as u32,
            &[
                Arg::P(x),
                Arg::P(add),
                Arg::P(w),
                Arg::P(out),
                Arg::I(hidden as i32),
                Arg::F(eps),
            ],
        )
    }

    /// `y[r, c] += b[c]` for `cols` columns of rows `stride` apart.
    pub fn add_bias(
        &self,
        y: u64,
        b: u64,
        rows: usize,
        cols: usize,
        stride: usize,
    ) -> Result<(), CudaError> {
        let grid = (rows * cols).div_ceil(256).clamp(1, 4096) as u32;
        self.launch(
            &self.k.add_bias,
            (grid, 1, 1),
            256,
            &[
                Arg::P(y),
                Arg::P(b),
                Arg::I(cols as i32),
                Arg::I(stride as i32),
                Arg::I(rows as i32),
            ],
        )
    }

    /// RoPE on the first `n_heads + n_kv_heads` heads of each row (q then k).
    #[allow(clippy::too_many_arguments)]
    pub fn rope_qk(
        &self,
        qkv: u64,
        pos: u64,
        rows: usize,
        stride: usize,
        n_heads: usize,
        n_kv_heads: usize,
        theta: f32,
        neox: bool,
    ) -> Result<(), CudaError> {
        let ratio = theta.powf(-2.0 / self.spec.head_dim as f32);
        self.launch(
            &self.k.rope_qk,
            (rows as u32, 1, 1),
            256,
            &[
                Arg::P(qkv),
                Arg::P(pos),
                Arg::I(stride as i32),
                Arg::I(n_heads as i32),
                Arg::I(n_kv_heads as i32),
                Arg::F(ratio),
                Arg::I(neox as i32),
            ],
        )
    }

    /// [`Gpu::rope_qk`] then [`Gpu::kv_write`] (k right after the q heads, v after k) in one
    /// launch.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_kv_write(
        &self,
        qkv: u64,
        pos: u64,
        slots: u64,
        kc: u64,
        vc: u64,
        rows: usize,
        stride: usize,
        n_heads: usize,
        n_kv_heads: usize,
        theta: f32,
        neox: bool,
    ) -> Result<(), CudaError> {
        let ratio = theta.powf(-2.0 / self.spec.head_dim as f32);
        self.launch(
            &self.k.rope_kv_write,
            (rows as u32, 1, 1),
            256,
            &[
                Arg::P(qkv),
                Arg::P(pos),
                Arg::P(slots),
                Arg::P(kc),
                Arg::P(vc),
                Arg::I(stride as i32),
                Arg::I(n_heads as i32),
                Arg::I(n_kv_heads as i32),
                Arg::F(ratio),
                Arg::I(neox as i32),
            ],
        )
    }

    /// Copies each row's k/v (at `k_off`, `k_off + kv_dim`) to pool slot `slots[r]`.
    #[allow(clippy::too_many_arguments)]
    pub fn kv_write(
        &self,
        qkv: u64,
        slots: u64,
        kc: u64,
        vc: u64,
        rows: usize,
        stride: usize,
        k_off: usize,
        kv_dim: usize,
    ) -> Result<(), CudaError> {
        self.launch(
            &self.k.kv_write,
            (rows as u32, 1, 1),
            256,
            &[
                Arg::P(qkv),
                Arg::P(slots),
                Arg::P(kc),
                Arg::P(vc),
                Arg::I(stride as i32),
                Arg::I(k_off as i32),
                Arg::I(kv_dim as i32),
            ],
        )
    }

    /// `out = silu(gu[:, :ffn]) * gu[:, ffn:]`.
    pub fn swiglu(&self, gu: u64, out: u64, rows: usize, ffn: usize) -> Result<(), CudaError> {
        let grid = (rows * ffn).div_ceil(256).clamp(1, 8192) as u32;
        self.launch(
            &self.k.swiglu,
            (grid, 1, 1),
            256,
            &[
                Arg::P(gu),
                Arg::P(out),
                Arg::I(ffn as i32),
                Arg::I(rows as i32),
            ],
        )
    }

    /// `dst[i] = src[rows[i]]` for `n` rows of `cols` bf16.
    pub fn gather_rows(
        &self,
        src: u64,
        rows: u64,
        dst: u64,
        n: usize,
        cols: usize,
    ) -> Result<(), CudaError> {
        self.launch(
            &self.k.gather_rows,
            (n as u32, 1, 1),
            256,
            &[Arg::P(src), Arg::P(rows), Arg::P(dst), Arg::I(cols as i32)],
        )
    }

    /// Bytes of f32 workspace attention needs for `tokens` query tokens with up to `max_ctx`
    /// context positions: (part_o, part_ml).
    pub fn attn_workspace(&self, tokens: usize, n_heads: usize, max_ctx: usize) -> (usize, usize) {
        let (splits, _) = attn_splits(tokens, n_heads / self.spec.group.max(1), max_ctx);
        let base = tokens * n_heads * splits;
        (base * self.spec.head_dim * 4, base * 2 * 4)
    }

    /// Paged causal attention for `tokens` query tokens (rows of `q`, `q_stride` apart) over
    /// the KV pool of one layer; writes `out[t, h * head_dim + d]` (bf16). `max_ctx` bounds
    /// every token's position + 1. `part_o`/`part_ml` are the workspace of
    /// [`Gpu::attn_workspace`].
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        q: u64,
        q_stride: usize,
        kc: u64,
        vc: u64,
        meta: &AttnMeta,
        tokens: usize,
        n_kv_heads: usize,
        max_ctx: usize,
        part_o: u64,
        part_ml: u64,
        out: u64,
    ) -> Result<(), CudaError> {
        if tokens == 0 {
            return Ok(());
        }
        let hd = self.spec.head_dim;
        let n_heads = n_kv_heads * self.spec.group;
        let (splits, split_len) = attn_splits(tokens, n_kv_heads, max_ctx);
        let scale = 1.0 / (hd as f32).sqrt();
        self.launch(
            &self.k.attn_split,
            (n_kv_heads as u32, tokens as u32, splits as u32),
            ATTN_THREADS,
            &[
                Arg::P(q),
                Arg::I(q_stride as i32),
                Arg::P(kc),
                Arg::P(vc),
                Arg::P(meta.block_tables),
                Arg::P(meta.tok_seq),
                Arg::P(meta.tok_pos),
                Arg::P(meta.seq_bt_off),
                Arg::I(meta.block_size as i32),
                Arg::I(split_len as i32),
                Arg::I(splits as i32),
                Arg::I(n_kv_heads as i32),
                Arg::F(scale),
                Arg::P(part_o),
                Arg::P(part_ml),
                Arg::P(out),
            ],
        )?;
        if splits == 1 {
            // The split kernel wrote the normalised output itself.
            return Ok(());
        }
        self.launch(
            &self.k.attn_combine,
            (tokens as u32, n_heads as u32, 1),
            hd as u32,
            &[
                Arg::P(part_o),
                Arg::P(part_ml),
                Arg::P(meta.tok_pos),
                Arg::I(split_len as i32),
                Arg::I(splits as i32),
                Arg::I(n_heads as i32),
                Arg::P(out),
            ],
        )
    }

    /// Causal attention on tensor cores for prefill: `tiles` (device i32 triples from
    /// [`prefill_tiles`] with `kernel.tile_rows()`) cover every query row, each tile
    /// consecutive tokens of one sequence. Same inputs and output as [`Gpu::attention`]
    /// (only `meta.tok_pos`, `block_tables`, `seq_bt_off` are read), no workspace.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_prefill(
        &self,
        q: u64,
        q_stride: usize,
        kc: u64,
        vc: u64,
        meta: &AttnMeta,
        tiles: u64,
        n_tiles: usize,
        n_kv_heads: usize,
        out: u64,
        kernel: PrefillAttention,
    ) -> Result<(), CudaError> {
        let (f, threads) = match kernel {
            PrefillAttention::TensorCore64 => (&self.k.attn_prefill, 128),
            PrefillAttention::TensorCore128 => (&self.k.attn_prefill_wide, 256),
            PrefillAttention::Split => {
                return Err(CudaError::Shape(
                    "attention_prefill needs a tensor-core kernel".into(),
                ))
            }
        };
        if n_tiles == 0 {
            return Ok(());
        }
        let hd = self.spec.head_dim;
        let n_heads = n_kv_heads * self.spec.group;
        let scale_log2 = std::f32::consts::LOG2_E / (hd as f32).sqrt();
        self.launch(
            f,
            (n_tiles as u32, n_heads as u32, 1),
            threads,
            &[
                Arg::P(q),
                Arg::I(q_stride as i32),
                Arg::P(kc),
                Arg::P(vc),
                Arg::P(meta.block_tables),
                Arg::P(tiles),
                Arg::I(n_tiles as i32),
                Arg::P(meta.tok_pos),
                Arg::P(meta.seq_bt_off),
                Arg::I(meta.block_size as i32),
                Arg::I(n_kv_heads as i32),
                Arg::F(scale_log2),
                Arg::P(out),
            ],
        )
    }

    /// Draws one token per f32 logits row on the device (`sample_rows` in kernels.cu):
    /// `params` holds [`SAMPLE_PARAMS`] i32 per row (see [`sample_params`]), `hist` the
    /// distinct history tokens the rows' offsets point into, `work` `rows * vocab` f32 of
    /// scratch; `out` gets [`SAMPLE_OUT`] i32 per row.
    #[allow(clippy::too_many_arguments)]
    pub fn sample_rows(
        &self,
        logits: u64,
        work: u64,
        rows: usize,
        vocab: usize,
        params: u64,
        hist: u64,
        out: u64,
    ) -> Result<(), CudaError> {
        if rows == 0 {
            return Ok(());
        }
        self.launch(
            &self.k.sample_rows,
            (rows as u32, 1, 1),
            SAMPLE_THREADS,
            &[
                Arg::P(logits),
                Arg::P(work),
                Arg::I(vocab as i32),
                Arg::P(params),
                Arg::P(hist),
                Arg::P(out),
            ],
        )
    }

    /// `out[r] = argmax(x[r, :cols])` (i32) for f32 rows.
    pub fn argmax_rows(&self, x: u64, rows: usize, cols: usize, out: u64) -> Result<(), CudaError> {
        self.launch(
            &self.k.argmax_rows,
            (rows as u32, 1, 1),
            1024,
            &[Arg::P(x), Arg::I(cols as i32), Arg::P(out)],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefill_tiles_cover_each_sequence_in_order() {
        let t = prefill_tiles(&[16, 130, 64], 64);
        let triples: Vec<[i32; 3]> = t.chunks(3).map(|c| [c[0], c[1], c[2]]).collect();
        assert_eq!(
            triples,
            vec![
                [0, 16, 0],
                [16, 64, 1],
                [80, 64, 1],
                [144, 2, 1],
                [146, 64, 2]
            ]
        );
        assert!(prefill_tiles(&[], 64).is_empty());
        assert_eq!(prefill_tiles(&[130], 128), vec![0, 128, 0, 128, 2, 0]);
    }
}
