//! What a stage author implements: [`Stage`] (see each request before it is templated and
//! routed: inspect, rewrite, reject) and, optionally, a [`StreamFilter`] per output stream
//! (observe or transform the text the client receives).
//!
//! WHY text, not token ids: the stages people write (guards, redaction, prompt rewriting,
//! per-key limits) reason about what the user wrote and what the model said. A stage sits
//! after validation and before the chat template, so a rewritten prompt is templated and
//! tokenized like any other; its filters see the detokenized deltas just before the HTTP
//! layer matches stop strings, parses tool calls and renders them.
//!
//! Everything here is plain data that crosses the request plane in MessagePack, so the same
//! stage runs in the frontend's process or in a `turbine worker --role stage` of its own.

use crate::protocol::Prompt;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// A user's pipeline stage. One instance lives inside a supervised actor and sees one
/// message at a time (`&mut self`: keep per-key counters in plain fields). If it panics,
/// the actor is restarted from the stage's factory (state is lost) and the request it was
/// handling fails with a 500 naming the stage.
#[async_trait]
pub trait Stage: Send + 'static {
    /// Sees a request before routing. Change `request` in place to rewrite it (prompts,
    /// `max_tokens`, `stop`), return a [`StageError`] to refuse it (the client receives that
    /// error as OpenAI-style JSON), or `Ok(())` to let it through unchanged.
    async fn on_request(&mut self, request: &mut StageRequest) -> Result<(), StageError>;

    /// A filter for one output stream of `request` (one per choice), called after
    /// `on_request` accepted it. `None` (the default): this stage does not look at outputs,
    /// and no output crosses into its actor.
    fn on_stream(&mut self, request: &StageRequest) -> Option<Box<dyn StreamFilter>> {
        let _ = request;
        None
    }
}

/// Observes or transforms one output stream, piece by piece, in order.
///
/// A filter may hold text back (return less than it got) and release it later, e.g. a
/// redaction filter keeps a possible prefix of a secret until it knows; whatever it still
/// holds at the end it returns from [`StreamFilter::on_end`].
pub trait StreamFilter: Send + 'static {
    /// The next piece of generated text (usually one token's worth; may be empty). Returns
    /// the text to pass on.
    fn on_text(&mut self, text: &str) -> String;

    /// The stream ends (the model finished); returns any text still held back.
    fn on_end(&mut self) -> String {
        String::new()
    }
}

/// The part of a request a stage may read and rewrite.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageRequest {
    /// Facts about the request; changes a stage makes here are not applied.
    pub meta: RequestMeta,
    /// The prompts: one for a chat request (its messages), one or more for a completions
    /// batch. A stage may rewrite them but not add or remove any. A chat message that holds
    /// images keeps them only if the stage leaves that message's content as it was.
    pub prompts: Vec<Prompt>,
    /// The client's limit on generated tokens (`None`: until EOS or the context is full).
    pub max_tokens: Option<u32>,
    /// Stop strings, at most 4.
    pub stop: Vec<String>,
}

/// Read-only facts about a request, for a stage's decisions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestMeta {
    /// The request id (the client's `x-request-id`, or one the frontend made); it is in the
    /// response's `x-request-id` header and in every log line of the request.
    pub request_id: String,
    /// The bearer token of the `Authorization` header, if any.
    pub api_key: Option<String>,
    /// `/v1/chat/completions` or `/v1/completions`.
    pub endpoint: String,
    /// The served model the client named.
    pub model: String,
    /// Whether the client asked for a stream (SSE).
    pub stream: bool,
    /// Samples per prompt (`n`).
    pub n: u32,
}

/// A stage's refusal, sent to the client as OpenAI-style JSON
/// (`{"error": {"message", "type", "param", "code"}}`) with this status. The `type` follows
/// from the status, as OpenAI's does: 400 `invalid_request_error`, 401
/// `authentication_error`, 403 `permission_error`, 404 `not_found_error`, 429
/// `rate_limit_error`, 5xx `server_error`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{status} {message}")]
pub struct StageError {
    /// An HTTP status, 400-599 (anything else is sent as 500).
    pub status: u16,
    pub message: String,
    /// OpenAI's `code` (e.g. `invalid_api_key`, `rate_limit_exceeded`).
    pub code: Option<String>,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    /// Seconds for a `Retry-After` header (429 and 503).
    pub retry_after_secs: Option<u32>,
}

impl StageError {
    /// A refusal with `status` and `message`.
    pub fn new(status: u16, message: impl Into<String>) -> StageError {
        StageError {
            status,
            message: message.into(),
            code: None,
            param: None,
            retry_after_secs: None,
        }
    }

    /// 400: the request is not acceptable.
    pub fn invalid(message: impl Into<String>) -> StageError {
        StageError::new(400, message)
    }

    /// 401 with code `invalid_api_key` (OpenAI's answer to a missing or unknown key).
    pub fn invalid_api_key(message: impl Into<String>) -> StageError {
        StageError::new(401, message).with_code("invalid_api_key")
    }

    /// 403: the key is known but may not do this.
    pub fn forbidden(message: impl Into<String>) -> StageError {
        StageError::new(403, message)
    }

    /// 429 with code `rate_limit_exceeded` and a `Retry-After` of `retry_after_secs`.
    pub fn rate_limited(message: impl Into<String>, retry_after_secs: u32) -> StageError {
        let mut e = StageError::new(429, message).with_code("rate_limit_exceeded");
        e.retry_after_secs = Some(retry_after_secs.max(1));
        e
    }

    pub fn with_code(mut self, code: &str) -> StageError {
        self.code = Some(code.to_string());
        self
    }

    pub fn with_param(mut self, param: &str) -> StageError {
        self.param = Some(param.to_string());
        self
    }
}

/// Reads a stage's `config:` block from the cluster file into `T`; an absent block is
/// `T::default()`. Errors name the field (`keys.alice.requests_per_minute: ...`).
pub fn parse_config<T>(config: &serde_yaml::Value) -> Result<T, String>
where
    T: serde::de::DeserializeOwned + Default,
{
    if config.is_null() {
        return Ok(T::default());
    }
    serde_path_to_error::deserialize(config.clone()).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            e.inner().to_string()
        } else {
            format!("{path}: {}", e.inner())
        }
    })
}
