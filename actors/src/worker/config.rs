//! Scheduler limits, loadable from the cluster YAML (every field has a default).

use serde::{Deserialize, Serialize};

/// Per-step limits and the model's context length.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    /// Tokens fed to the model in one step, over all sequences (decodes count 1 each). Bounds
    /// the step's latency, so decodes are not stalled behind a long prompt.
    pub max_num_batched_tokens: usize,
    /// Sequences running at once (each holds KV blocks and a batch slot). Keep it at most
    /// `max_num_batched_tokens`, or some running decodes wait a step for budget.
    pub max_num_seqs: usize,
    /// Context length: prompt plus generated tokens never exceed it.
    pub max_model_len: usize,
    /// Split long prompts over several steps, mixed with decodes. When off, a prompt is
    /// scheduled whole or not at all, and `max_num_batched_tokens` must cover
    /// `max_model_len`.
    pub enable_chunked_prefill: bool,
    /// Most prompt tokens one prefilling sequence takes in a step while other requests
    /// want the budget too (requests waiting for admission, or other prompts mid-prefill):
    /// a long prompt then leaves room, every step, for a short one to start, so the short
    /// one's first token waits about one step, not the whole long prefill. A prefill alone
    /// takes the whole budget. `max_num_batched_tokens` or more: no cap (strict FIFO).
    pub contended_prefill_chunk: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_num_batched_tokens: 2048,
            max_num_seqs: 128,
            max_model_len: 4096,
            enable_chunked_prefill: true,
            contended_prefill_chunk: usize::MAX,
        }
    }
}

/// A configuration the scheduler cannot run with.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("max_num_batched_tokens must be at least 1")]
    ZeroTokenBudget,
    #[error("max_num_seqs must be at least 1")]
    ZeroMaxSeqs,
    #[error("max_model_len must be at least 2 (one prompt token, one generated)")]
    ContextTooShort,
    #[error(
        "without chunked prefill, max_num_batched_tokens ({budget}) must be at least \
         max_model_len ({max_model_len}) or long prompts could never be scheduled"
    )]
    BudgetBelowContext { budget: usize, max_model_len: usize },
    #[error("the KV pool has no blocks")]
    EmptyPool,
    #[error(
        "a prefill chunk under contention must be at least 1 token (long_prefill_share too small)"
    )]
    ZeroPrefillChunk,
}

impl SchedulerConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_num_batched_tokens == 0 {
            return Err(ConfigError::ZeroTokenBudget);
        }
        if self.max_num_seqs == 0 {
            return Err(ConfigError::ZeroMaxSeqs);
        }
        if self.max_model_len < 2 {
            return Err(ConfigError::ContextTooShort);
        }
        if self.contended_prefill_chunk == 0 {
            return Err(ConfigError::ZeroPrefillChunk);
        }
        if !self.enable_chunked_prefill && self.max_num_batched_tokens < self.max_model_len {
            return Err(ConfigError::BudgetBelowContext {
                budget: self.max_num_batched_tokens,
                max_model_len: self.max_model_len,
            });
        }
        Ok(())
    }
}
