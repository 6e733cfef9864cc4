//! The seam between the HTTP layer and whatever produces tokens.
//!
//! The HTTP layer validates an OpenAI request into a [`GenerateRequest`] and hands it to a
//! [`ChatEngine`]; the engine answers with a stream of text [`Delta`]s. The lead connects the
//! actor pipeline (preprocessor → router → workers) behind this trait; tests use fakes.
//!
//! Cancellation is by drop: when the client goes away (or a stop string matches) the HTTP
//! layer drops the stream, and the engine must treat that as "cancel this request and free
//! its KV blocks". No separate cancel call exists, so it cannot be forgotten.

use crate::protocol::{FinishReason, SamplingParams};
// Shared with the preprocessor (which renders prompts and logprobs), so they live in
// `protocol`; re-exported here because they are part of this seam.
pub use crate::protocol::{ChatMessage, EngineError, Prompt, TokenLogprobs, TopLogprob};
use async_trait::async_trait;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};

/// A validated generation request, independent of the OpenAI endpoint it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateRequest {
    /// The served model id the client asked for (already checked against the engine).
    pub model: String,
    pub prompt: Prompt,
    pub sampling: SamplingParams,
    /// Client limit on generated tokens. `None`: until EOS or the context is full. The engine
    /// caps any value at the context limit and then finishes with `FinishReason::Length`.
    pub max_tokens: Option<u32>,
    /// Stop strings (at most 4). The HTTP layer enforces them itself on the text it receives
    /// and drops the stream on a match, so an engine may ignore this field.
    pub stop: Vec<String>,
    /// Keep generating past EOS (the model's stop tokens; `stop_token_ids` still stop).
    pub ignore_eos: bool,
    /// The client's extra stop token ids (vLLM's `stop_token_ids`).
    pub stop_token_ids: Vec<u32>,
    /// Chat: the tools, rendered into the prompt and parsed out of the output.
    pub tools: Option<super::tools::ToolSetup>,
    /// `Some(k)`: return the sampled token's log-probability and the top `k` alternatives.
    pub logprobs: Option<u32>,
    /// The client asked for a final usage chunk (streaming only).
    pub include_usage: bool,
    pub stream: bool,
    /// Routing hints from a gateway that already decided (header `x-turbine-worker` etc.,
    /// see [`crate::router::hints`]); an engine that routes follows them when it can.
    pub hints: crate::router::hints::RoutingHints,
}

/// Token counts of one request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: u32,
}

/// A piece of generated output: usually one token's text.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Delta {
    /// Newly detokenized text (may be empty while a multi-byte character is incomplete).
    pub text: String,
    /// The token ids this delta covers; the HTTP layer counts completion tokens from these.
    pub token_ids: Vec<u32>,
    /// One entry per token in `token_ids` when logprobs were requested.
    pub logprobs: Option<Vec<TokenLogprobs>>,
    /// On the first delta of a request with `sampling.prompt_logprobs`: one entry per
    /// prompt token, the first with a NaN logprob (nothing precedes it).
    pub prompt_logprobs: Option<Vec<TokenLogprobs>>,
    /// Set on the last delta of the stream.
    pub finish: Option<FinishReason>,
    /// Running token counts; engines should set it at least on the first and the last delta.
    pub usage: Option<Usage>,
}

/// The stream of deltas for one request. Dropping it cancels the request.
pub type DeltaStream = BoxStream<'static, Result<Delta, EngineError>>;

/// Something that turns validated requests into streams of text.
#[async_trait]
pub trait ChatEngine: Send + Sync + 'static {
    /// The model name clients must send in `model` (also listed by GET /v1/models).
    fn model_id(&self) -> &str;
    /// Maximum prompt + completion tokens.
    fn context_length(&self) -> usize;
    /// Starts generation. Errors found before any token (prompt too long, overload) come
    /// back here; errors after the first token come as an `Err` item in the stream.
    async fn generate(&self, req: GenerateRequest) -> Result<DeltaStream, EngineError>;

    /// The token ids `prompt` would be generated from (chat messages through the template;
    /// `add_special` adds BOS to plain text). For POST /tokenize and `echo`.
    fn tokenize(&self, _prompt: &Prompt, _add_special: bool) -> Result<Vec<u32>, EngineError> {
        Err(EngineError::InvalidRequest(
            "this engine does not expose its tokenizer".into(),
        ))
    }

    /// The text of `ids` (special tokens shown). For POST /detokenize and `echo` of a
    /// token-id prompt.
    fn detokenize(&self, _ids: &[u32]) -> Result<String, EngineError> {
        Err(EngineError::InvalidRequest(
            "this engine does not expose its tokenizer".into(),
        ))
    }
}
