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
    /// Keep generating past EOS.
    pub ignore_eos: bool,
    /// `Some(k)`: return the sampled token's log-probability and the top `k` alternatives.
    pub logprobs: Option<u32>,
    /// The client asked for a final usage chunk (streaming only).
    pub include_usage: bool,
    pub stream: bool,
}

/// What to generate from: chat messages (the engine applies the chat template) or raw text.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    Chat(Vec<ChatMessage>),
    Text(String),
}

/// One chat message with its content flattened to text.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// "system", "developer", "user", "assistant" or "tool".
    pub role: String,
    pub content: String,
}

/// Token counts of one request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: u32,
}

/// Log-probability of one generated token, with the alternatives asked for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprobs {
    /// The token's text (lossy when the token is a partial UTF-8 sequence).
    pub token: String,
    /// The token's raw bytes.
    pub bytes: Vec<u8>,
    pub logprob: f32,
    /// Most likely alternatives, best first.
    pub top: Vec<TopLogprob>,
}

/// One alternative token at a position.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TopLogprob {
    pub token: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
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
    /// Set on the last delta of the stream.
    pub finish: Option<FinishReason>,
    /// Running token counts; engines should set it at least on the first and the last delta.
    pub usage: Option<Usage>,
}

/// Why an engine refused or failed a request. Each maps to one HTTP status.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The request is malformed for this model (e.g. a bad chat role). HTTP 400.
    #[error("{0}")]
    InvalidRequest(String),
    /// The prompt does not fit the model's context. HTTP 400, code `context_length_exceeded`.
    #[error(
        "this model's maximum context length is {context_length} tokens, \
         but the prompt has {prompt_tokens} tokens"
    )]
    ContextLengthExceeded {
        prompt_tokens: usize,
        context_length: usize,
    },
    /// No capacity now; the client should retry later. HTTP 503.
    #[error("the engine is overloaded: {0}")]
    Overloaded(String),
    /// The request ran past its deadline (the `http.request_timeout_ms` default or the
    /// client's `x-request-timeout-ms`). HTTP 504, code `request_timeout`; mid-stream, an
    /// error event ends the stream.
    #[error("the request exceeded its deadline of {timeout_ms} ms")]
    DeadlineExceeded { timeout_ms: u64 },
    /// Anything else. HTTP 500.
    #[error("internal engine error: {0}")]
    Internal(String),
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
}
