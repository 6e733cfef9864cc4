//! The compute-backend contract shared by the CPU backend (pure Rust) and the CUDA backend.
//!
//! A backend owns the model weights and a *paged* KV pool: `num_blocks` blocks, each holding
//! `block_size` consecutive token positions of K and V for every layer and KV head. Which
//! physical blocks a sequence uses is decided OUTSIDE the backend (by the worker's block
//! manager) and passed in with every step as a block table, so the backend keeps no
//! per-sequence state: a forward call is a pure function of (weights, KV pool, batch) that
//! writes the batch's new K/V into the named blocks and returns logits.
//!
//! Numerics contract: every backend implements the same Llama-family forward pass (RMSNorm,
//! RoPE, grouped-query attention, SwiGLU); a CUDA backend must match the CPU backend within
//! bf16 tolerance on the same weights and inputs.

use bytes::Bytes;

use crate::kv_chunks;
use crate::kv_ipc::{HostReason, IpcPull, KvIpcPool};
use crate::model::ModelConfig;
use crate::sampling::{sample_rows_on_host, SampleRow, SampledToken, SamplingError};
use thiserror::Error;

/// One sequence's part of a batched forward call: a prefill chunk (several tokens) or a
/// decode step (one token).
#[derive(Clone, Copy, Debug)]
pub struct SeqStep<'a> {
    /// New tokens to run, in order. Must not be empty.
    pub tokens: &'a [u32],
    /// Position of `tokens[0]` in the sequence; positions `0..start_pos` are already in the
    /// KV cache (written by earlier calls into the same blocks).
    pub start_pos: usize,
    /// Physical KV block ids covering positions `0..start_pos + tokens.len()`, in order:
    /// position `p` lives in block `block_table[p / block_size]` at slot `p % block_size`.
    /// Extra trailing entries are allowed and ignored.
    pub block_table: &'a [u32],
    /// Return the logits of the last token of `tokens`.
    pub want_logits: bool,
}

impl SeqStep<'_> {
    /// Position one past the last token of this step (the sequence length afterwards);
    /// saturates rather than overflowing on absurd `start_pos` values.
    pub fn end_pos(&self) -> usize {
        self.start_pos.saturating_add(self.tokens.len())
    }
}

/// Embeddings that stand in for some tokens' embedding rows in a forward call: an image's
/// placeholder tokens get the vision tower's output. `embeds` is `rows * hidden_size` values.
#[derive(Clone, Copy, Debug)]
pub struct Splice<'a> {
    /// Index of the step in the batch.
    pub step: usize,
    /// Index in that step's `tokens` of the first replaced token.
    pub offset: usize,
    pub rows: usize,
    pub embeds: &'a [f32],
}

/// Element type of the KV pool, which fixes the byte layout of exported blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KvDType {
    F32,
    F16,
    BF16,
}

impl KvDType {
    pub fn size_bytes(self) -> usize {
        match self {
            KvDType::F32 => 4,
            KvDType::F16 | KvDType::BF16 => 2,
        }
    }
}

/// Shape of a backend's paged KV pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KvLayout {
    /// Token positions per block (default 16, the same `block_size` the block hashes use).
    pub block_size: usize,
    /// Physical blocks in the pool; valid block ids are `0..num_blocks`.
    pub num_blocks: usize,
    pub n_layers: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub dtype: KvDType,
}

impl KvLayout {
    /// Elements of K (or of V) for one layer of one block.
    pub fn elems_per_layer_block(&self) -> usize {
        self.block_size * self.n_kv_heads * self.head_dim
    }

    /// Bytes one block occupies in [`Backend::export_blocks`]' output: for each layer in
    /// order, K then V, each `[block_size][n_kv_heads][head_dim]` little-endian `dtype`.
    pub fn bytes_per_block(&self) -> usize {
        2 * self.n_layers * self.elems_per_layer_block() * self.dtype.size_bytes()
    }
}

/// Logits returned by a forward call: one `vocab`-sized row per [`SeqStep`] that asked for
/// them, in batch order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Logits {
    pub vocab: usize,
    /// `rows() * vocab` values, row-major.
    pub data: Vec<f32>,
}

impl Logits {
    pub fn rows(&self) -> usize {
        self.data.len().checked_div(self.vocab).unwrap_or(0)
    }

    /// Row `i`, or `None` past the end.
    pub fn row(&self, i: usize) -> Option<&[f32]> {
        let start = i.checked_mul(self.vocab)?;
        self.data.get(start..start.checked_add(self.vocab)?)
    }
}

/// Why a backend refused a call. Backends never panic on bad input; they return one of these
/// and leave the KV pool unchanged where they can (validation happens before any write).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum BackendError {
    #[error("KV block id {block} out of range (pool has {num_blocks} blocks)")]
    BadBlockId { block: u32, num_blocks: usize },
    #[error("block table has {got} blocks but positions up to {needed_positions} need {needed}")]
    BlockTableTooShort {
        got: usize,
        needed: usize,
        needed_positions: usize,
    },
    #[error("sequence length {len} exceeds the model's maximum {max}")]
    SequenceTooLong { len: usize, max: usize },
    #[error("token id {token} out of range (vocabulary has {vocab} tokens)")]
    BadTokenId { token: u32, vocab: usize },
    #[error("batch entry {index} has no tokens")]
    EmptyStep { index: usize },
    #[error("two batch entries write the same KV slot (block {block}, slot {slot})")]
    ConflictingWrites { block: u32, slot: usize },
    #[error("KV data is {got} bytes but {expected} were expected")]
    KvDataSize { got: usize, expected: usize },
    #[error("unsupported weight {name}: {reason}")]
    UnsupportedWeight { name: String, reason: String },
    #[error("invalid model configuration: {0}")]
    BadConfig(String),
    #[error("device error: {0}")]
    Device(String),
    #[error("embedding splice: {0}")]
    BadSplice(String),
}

/// Checks that every splice lands inside its step and carries whole rows.
pub fn validate_splices(
    batch: &[SeqStep<'_>],
    splices: &[Splice<'_>],
    hidden: usize,
) -> Result<(), BackendError> {
    for (i, sp) in splices.iter().enumerate() {
        let bad = |m: String| Err(BackendError::BadSplice(format!("splice {i}: {m}")));
        let Some(step) = batch.get(sp.step) else {
            return bad(format!("step {} of a batch of {}", sp.step, batch.len()));
        };
        if sp.offset.saturating_add(sp.rows) > step.tokens.len() {
            return bad(format!(
                "rows {}..{} past the step's {} tokens",
                sp.offset,
                sp.offset.saturating_add(sp.rows),
                step.tokens.len()
            ));
        }
        if sp.embeds.len() != sp.rows.saturating_mul(hidden) {
            return bad(format!(
                "{} values for {} rows of {hidden}",
                sp.embeds.len(),
                sp.rows
            ));
        }
    }
    Ok(())
}

/// A compute backend: runs batched forward steps over its own paged KV pool.
pub trait Backend: Send {
    fn config(&self) -> &ModelConfig;

    fn kv_layout(&self) -> KvLayout;

    /// Runs every step of `batch` (each sequence at its own position), writing the new
    /// tokens' K/V into the blocks named by each block table, and returns one logits row per
    /// step with `want_logits`, in order. Attention is causal within a step and covers all
    /// cached positions before it. Validation (token ids, block ids, table lengths, context
    /// limit) happens before anything is written.
    fn forward(&mut self, batch: &[SeqStep<'_>]) -> Result<Logits, BackendError>;

    /// [`Backend::forward`] with some positions' embeddings given rather than looked up
    /// (multimodal prompts). A backend that cannot splice refuses any splice.
    fn forward_spliced(
        &mut self,
        batch: &[SeqStep<'_>],
        splices: &[Splice<'_>],
    ) -> Result<Logits, BackendError> {
        if splices.is_empty() {
            return self.forward(batch);
        }
        Err(BackendError::BadSplice(
            "this backend does not take image embeddings".into(),
        ))
    }

    /// [`Backend::forward`], but each step `i` with `every[i]` returns a logits row for
    /// every one of its tokens (in order) instead of only its last: what a prompt's
    /// logprobs (`echo` with `logprobs`) are read from. Rows are in batch order, a step's
    /// rows together; other steps give one row when they `want_logits`. Only a request that
    /// asks for prompt logprobs takes this path, so the normal path never pays for the wider
    /// output head.
    ///
    /// The default works on any backend by feeding the `every` steps one token per forward
    /// call (their first token with the rest of the batch, then one call per further
    /// position), which is correct but costs a call per prompt token; the CPU and CUDA
    /// backends override it with one pass (their output head over the wider set of rows).
    fn forward_every(
        &mut self,
        batch: &[SeqStep<'_>],
        every: &[bool],
    ) -> Result<Logits, BackendError> {
        let all = |i: usize| every.get(i).copied().unwrap_or(false);
        if !(0..batch.len()).any(all) {
            return self.forward(batch);
        }
        // Checked whole first: nothing is written if any later call would be refused.
        validate_batch(batch, self.config(), &self.kv_layout(), usize::MAX)?;
        let vocab = self.config().vocab_size;
        let mut rows: Vec<Vec<Vec<f32>>> = vec![Vec::new(); batch.len()];
        let first: Vec<SeqStep<'_>> = batch
            .iter()
            .enumerate()
            .map(|(i, s)| match all(i) {
                true => SeqStep {
                    tokens: &s.tokens[..1],
                    want_logits: true,
                    ..*s
                },
                false => *s,
            })
            .collect();
        let row = |logits: &Logits, r: usize| {
            logits.row(r).map(<[f32]>::to_vec).ok_or_else(|| {
                BackendError::Device("the forward pass returned too few logits rows".into())
            })
        };
        let logits = self.forward(&first)?;
        let mut r = 0;
        for (i, s) in first.iter().enumerate() {
            if s.want_logits {
                rows[i].push(row(&logits, r)?);
                r += 1;
            }
        }
        let longest = (0..batch.len())
            .filter(|&i| all(i))
            .map(|i| batch[i].tokens.len())
            .max()
            .unwrap_or(0);
        for k in 1..longest {
            let (ids, steps): (Vec<usize>, Vec<SeqStep<'_>>) = (0..batch.len())
                .filter(|&i| all(i) && batch[i].tokens.len() > k)
                .map(|i| {
                    let s = &batch[i];
                    let step = SeqStep {
                        tokens: &s.tokens[k..k + 1],
                        start_pos: s.start_pos + k,
                        block_table: s.block_table,
                        want_logits: true,
                    };
                    (i, step)
                })
                .unzip();
            let logits = self.forward(&steps)?;
            for (r, &i) in ids.iter().enumerate() {
                rows[i].push(row(&logits, r)?);
            }
        }
        Ok(Logits {
            vocab,
            data: rows.into_iter().flatten().flatten().collect(),
        })
    }

    /// [`Backend::forward`], then one token drawn from each logits row as `rows` (one per
    /// step with `want_logits`, in order) asks. A row's own sampling error (bad parameters,
    /// no finite logit) fails only that row. The default samples on the host; a device
    /// backend may sample where the logits are and copy back only tokens and logprobs
    /// (same distribution and tie rules; its random stream is its own, seeded as reproducibly).
    fn forward_sample(
        &mut self,
        batch: &[SeqStep<'_>],
        rows: &[SampleRow<'_>],
    ) -> Result<Vec<Result<SampledToken, SamplingError>>, BackendError> {
        let logits = self.forward(batch)?;
        Ok(sample_rows_on_host(&logits, rows))
    }

    /// Copies whole blocks `src -> dst` (all layers, K and V), e.g. for copy-on-write of a
    /// shared prefix block. Pairs are applied in order.
    fn copy_blocks(&mut self, src_dst: &[(u32, u32)]) -> Result<(), BackendError>;

    /// Serialises the named blocks, in order, each [`KvLayout::bytes_per_block`] bytes (see
    /// there for the layout), for transfer to another worker.
    fn export_blocks(&self, ids: &[u32]) -> Result<Vec<u8>, BackendError>;

    /// Writes data produced by [`Backend::export_blocks`] (on a backend with the same
    /// [`KvLayout`] shape and dtype) into the named blocks.
    fn import_blocks(&mut self, ids: &[u32], data: &[u8]) -> Result<(), BackendError>;

    /// The named blocks as the transfer plane carries them: one chunk per layer (layer `l`:
    /// K then V of each block, in `ids` order; see [`crate::kv_chunks`]). The default
    /// reorders [`Backend::export_blocks`]; a device backend writes the chunks straight from
    /// its pool (the CUDA one into page-locked memory the chunks keep alive, so a pull in the
    /// same process reads them with no host copy).
    fn export_layer_chunks(&self, ids: &[u32]) -> Result<Vec<Bytes>, BackendError> {
        let data = self.export_blocks(ids)?;
        kv_chunks::to_layer_chunks(&self.kv_layout(), ids.len(), &data)
    }

    /// Writes chunks from [`Backend::export_layer_chunks`] (of a backend with the same
    /// [`KvLayout`] shape and dtype) into the named blocks. The default reorders them for
    /// [`Backend::import_blocks`].
    fn import_layer_chunks(&mut self, ids: &[u32], chunks: &[Bytes]) -> Result<(), BackendError> {
        let data = kv_chunks::to_block_major(&self.kv_layout(), ids.len(), chunks)?;
        self.import_blocks(ids, &data)
    }

    /// What another process on this host needs to copy blocks straight out of this pool,
    /// device to device ([`crate::kv_ipc`]); `None` (the default) when the pool cannot be
    /// shared so.
    fn kv_ipc_pool(&self) -> Option<KvIpcPool> {
        None
    }

    /// Copies blocks `src` of another process's pool (its [`Backend::kv_ipc_pool`]) into
    /// this pool's `dst`, device to device; [`IpcPull::Host`] with the reason when that is
    /// not possible here (the default: this backend has no device memory to map into).
    /// The owner's blocks must be written and held until this returns.
    fn pull_blocks_ipc(
        &mut self,
        offer: &KvIpcPool,
        src: &[u32],
        dst: &[u32],
    ) -> Result<IpcPull, BackendError> {
        let _ = (offer, src, dst);
        Ok(IpcPull::Host(HostReason::NotDevice))
    }
}

/// Checks a batch before any KV write, the same way for every backend: each step has tokens
/// from the vocabulary, ends within the model's context (and within `device_max_position`,
/// a backend's own indexing limit; `usize::MAX` when it has none), names enough blocks, all
/// inside the pool, and no two steps write the same KV slot.
pub fn validate_batch(
    batch: &[SeqStep<'_>],
    config: &ModelConfig,
    layout: &KvLayout,
    device_max_position: usize,
) -> Result<(), BackendError> {
    let bs = layout.block_size;
    let mut written = Vec::new();
    for (index, s) in batch.iter().enumerate() {
        if s.tokens.is_empty() {
            return Err(BackendError::EmptyStep { index });
        }
        if let Some(&token) = s.tokens.iter().find(|&&t| t as usize >= config.vocab_size) {
            return Err(BackendError::BadTokenId {
                token,
                vocab: config.vocab_size,
            });
        }
        let end = s.end_pos();
        if config.max_position > 0 && end > config.max_position {
            return Err(BackendError::SequenceTooLong {
                len: end,
                max: config.max_position,
            });
        }
        if end > device_max_position {
            return Err(BackendError::SequenceTooLong {
                len: end,
                max: device_max_position,
            });
        }
        let needed = end.div_ceil(bs);
        let table = s
            .block_table
            .get(..needed)
            .ok_or(BackendError::BlockTableTooShort {
                got: s.block_table.len(),
                needed,
                needed_positions: end,
            })?;
        if let Some(&block) = table.iter().find(|&&b| b as usize >= layout.num_blocks) {
            return Err(BackendError::BadBlockId {
                block,
                num_blocks: layout.num_blocks,
            });
        }
        for p in s.start_pos..end {
            written.push((table[p / bs], p % bs));
        }
    }
    written.sort_unstable();
    if let Some(w) = written.windows(2).find(|w| w[0] == w[1]) {
        return Err(BackendError::ConflictingWrites {
            block: w[0].0,
            slot: w[0].1,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logits_rows_are_bounded() {
        let l = Logits {
            vocab: 3,
            data: vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0],
        };
        assert_eq!(l.rows(), 2);
        assert_eq!(l.row(1), Some(&[3.0, 4.0, 5.0][..]));
        assert_eq!(l.row(2), None);
        assert_eq!(Logits::default().rows(), 0);
    }

    #[test]
    fn block_bytes_cover_k_and_v_of_every_layer() {
        let layout = KvLayout {
            block_size: 16,
            num_blocks: 4,
            n_layers: 2,
            n_kv_heads: 3,
            head_dim: 8,
            dtype: KvDType::F32,
        };
        assert_eq!(layout.bytes_per_block(), 2 * 2 * 16 * 3 * 8 * 4);
    }
}
