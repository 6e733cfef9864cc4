//! Renders [`GenEvent`]s as OpenAI responses: SSE chunks for streaming, one JSON object
//! otherwise, for either endpoint.

use super::engine::{TokenLogprobs, Usage};
use super::error::ApiError;
use super::generation::{FinishKind, GenEvent};
use super::openai::{
    ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionResponse, ChatDelta,
    ChatLogprobs, ChatTokenLogprob, ChatTopLogprob, CompletionChoice, CompletionLogprobs,
    CompletionResponse, PromptTokensDetails, ResponseMessage, UsageBody,
};
use serde::Serialize;

/// Which OpenAI endpoint a response is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completion,
}

impl Endpoint {
    /// The request field that holds the prompt, for errors about it.
    pub fn prompt_param(self) -> &'static str {
        match self {
            Endpoint::Chat => "messages",
            Endpoint::Completion => "prompt",
        }
    }

    fn id_prefix(self) -> &'static str {
        match self {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completion => "cmpl",
        }
    }
}

/// The fields every chunk/response of one request repeats.
#[derive(Clone, Debug)]
pub struct ResponseMeta {
    pub endpoint: Endpoint,
    pub id: String,
    pub created: u64,
    pub model: String,
    pub logprobs: bool,
}

impl ResponseMeta {
    pub fn new(
        endpoint: Endpoint,
        serial: &str,
        created: u64,
        model: String,
        logprobs: bool,
    ) -> Self {
        ResponseMeta {
            endpoint,
            id: format!("{}-{serial}", endpoint.id_prefix()),
            created,
            model,
            logprobs,
        }
    }
}

pub fn usage_body(usage: Usage) -> UsageBody {
    UsageBody {
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
        total_tokens: usage.prompt_tokens.saturating_add(usage.completion_tokens),
        prompt_tokens_details: PromptTokensDetails {
            cached_tokens: usage.cached_tokens,
        },
    }
}

fn chat_logprobs(entries: &[TokenLogprobs]) -> ChatLogprobs {
    ChatLogprobs {
        content: entries
            .iter()
            .map(|entry| ChatTokenLogprob {
                token: entry.token.clone(),
                logprob: entry.logprob,
                bytes: entry.bytes.clone(),
                top_logprobs: entry
                    .top
                    .iter()
                    .map(|top| ChatTopLogprob {
                        token: top.token.clone(),
                        logprob: top.logprob,
                        bytes: top.bytes.clone(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// Appends tokens to legacy completions logprobs; `offset` is the byte offset of the next
/// token in the completion text.
fn extend_completion_logprobs(
    into: &mut CompletionLogprobs,
    entries: &[TokenLogprobs],
    offset: &mut u32,
) {
    for entry in entries {
        into.tokens.push(entry.token.clone());
        into.token_logprobs.push(entry.logprob);
        into.top_logprobs.push(
            entry
                .top
                .iter()
                .map(|top| (top.token.clone(), serde_json::Value::from(top.logprob)))
                .collect(),
        );
        into.text_offset.push(*offset);
        *offset = offset.saturating_add(u32::try_from(entry.token.len()).unwrap_or(u32::MAX));
    }
}

/// Streaming: renders events as `data: {json}\n\n` lines.
pub struct SseWriter {
    meta: ResponseMeta,
    include_usage: bool,
    sent_role: bool,
    text_offset: u32,
}

impl SseWriter {
    pub fn new(meta: ResponseMeta, include_usage: bool) -> Self {
        SseWriter {
            meta,
            include_usage,
            sent_role: false,
            text_offset: 0,
        }
    }

    /// The SSE text for one event (possibly several `data:` lines).
    pub fn render(&mut self, event: GenEvent) -> String {
        let mut out = String::new();
        if self.meta.endpoint == Endpoint::Chat && !self.sent_role {
            self.sent_role = true;
            let role = ChatDelta {
                role: Some("assistant".to_string()),
                content: Some(String::new()),
            };
            push_data(&mut out, &self.chat_chunk(role, None, None));
        }
        match event {
            GenEvent::Text { text, logprobs } => self.text_chunk(&mut out, text, &logprobs),
            GenEvent::Finished { reason, usage } => {
                self.finish_chunk(&mut out, reason);
                if self.include_usage {
                    self.usage_chunk(&mut out, usage);
                }
            }
            GenEvent::Failed(err) => {
                tracing::warn!(id = %self.meta.id, error = %err, "generation failed mid-stream");
                let error = ApiError::from_engine(err, self.meta.endpoint.prompt_param());
                push_data(&mut out, &error.body());
            }
        }
        out
    }

    /// The terminator OpenAI clients wait for.
    pub fn done() -> &'static str {
        "data: [DONE]\n\n"
    }

    fn chat_chunk(
        &self,
        delta: ChatDelta,
        logprobs: Option<ChatLogprobs>,
        finish: Option<FinishKind>,
    ) -> ChatCompletionChunk {
        ChatCompletionChunk {
            id: self.meta.id.clone(),
            object: "chat.completion.chunk".to_string(),
            created: self.meta.created,
            model: self.meta.model.clone(),
            choices: vec![ChatChunkChoice {
                index: 0,
                delta,
                logprobs,
                finish_reason: finish.map(|f| f.as_str().to_string()),
            }],
            usage: None,
        }
    }

    fn completion_chunk(
        &self,
        text: String,
        logprobs: Option<CompletionLogprobs>,
        finish: Option<FinishKind>,
    ) -> CompletionResponse {
        CompletionResponse {
            id: self.meta.id.clone(),
            object: "text_completion".to_string(),
            created: self.meta.created,
            model: self.meta.model.clone(),
            choices: vec![CompletionChoice {
                index: 0,
                text,
                logprobs,
                finish_reason: finish.map(|f| f.as_str().to_string()),
            }],
            usage: None,
        }
    }

    fn text_chunk(&mut self, out: &mut String, text: String, logprobs: &[TokenLogprobs]) {
        let want_logprobs = self.meta.logprobs;
        match self.meta.endpoint {
            Endpoint::Chat => {
                let logprobs = want_logprobs.then(|| chat_logprobs(logprobs));
                let delta = ChatDelta {
                    role: None,
                    content: Some(text),
                };
                push_data(out, &self.chat_chunk(delta, logprobs, None));
            }
            Endpoint::Completion => {
                let logprobs = want_logprobs.then(|| {
                    let mut lp = CompletionLogprobs::default();
                    extend_completion_logprobs(&mut lp, logprobs, &mut self.text_offset);
                    lp
                });
                push_data(out, &self.completion_chunk(text, logprobs, None));
            }
        }
    }

    fn finish_chunk(&self, out: &mut String, reason: FinishKind) {
        match self.meta.endpoint {
            Endpoint::Chat => push_data(
                out,
                &self.chat_chunk(ChatDelta::default(), None, Some(reason)),
            ),
            Endpoint::Completion => push_data(
                out,
                &self.completion_chunk(String::new(), None, Some(reason)),
            ),
        }
    }

    fn usage_chunk(&self, out: &mut String, usage: Usage) {
        match self.meta.endpoint {
            Endpoint::Chat => {
                let mut chunk = self.chat_chunk(ChatDelta::default(), None, None);
                chunk.choices.clear();
                chunk.usage = Some(usage_body(usage));
                push_data(out, &chunk);
            }
            Endpoint::Completion => {
                let mut chunk = self.completion_chunk(String::new(), None, None);
                chunk.choices.clear();
                chunk.usage = Some(usage_body(usage));
                push_data(out, &chunk);
            }
        }
    }
}

fn push_data<T: Serialize>(out: &mut String, value: &T) {
    // Serializing these plain structs cannot fail (string keys, finite floats from JSON or
    // the engine); if it ever did, an empty object keeps the stream well-formed.
    let json = serde_json::to_string(value).unwrap_or_else(|_| "{}".to_string());
    out.push_str("data: ");
    out.push_str(&json);
    out.push_str("\n\n");
}

/// Non-streaming: accumulates events into one response body.
#[derive(Default)]
pub struct Aggregate {
    text: String,
    logprobs: Vec<TokenLogprobs>,
}

impl Aggregate {
    pub fn push_text(&mut self, text: &str, logprobs: Vec<TokenLogprobs>) {
        self.text.push_str(text);
        self.logprobs.extend(logprobs);
    }

    pub fn into_json(
        self,
        meta: &ResponseMeta,
        reason: FinishKind,
        usage: Usage,
    ) -> serde_json::Result<serde_json::Value> {
        let finish_reason = Some(reason.as_str().to_string());
        match meta.endpoint {
            Endpoint::Chat => serde_json::to_value(ChatCompletionResponse {
                id: meta.id.clone(),
                object: "chat.completion".to_string(),
                created: meta.created,
                model: meta.model.clone(),
                choices: vec![ChatChoice {
                    index: 0,
                    message: ResponseMessage {
                        role: "assistant".to_string(),
                        content: self.text,
                    },
                    logprobs: meta.logprobs.then(|| chat_logprobs(&self.logprobs)),
                    finish_reason,
                }],
                usage: usage_body(usage),
            }),
            Endpoint::Completion => {
                let logprobs = meta.logprobs.then(|| {
                    let mut lp = CompletionLogprobs::default();
                    extend_completion_logprobs(&mut lp, &self.logprobs, &mut 0);
                    lp
                });
                serde_json::to_value(CompletionResponse {
                    id: meta.id.clone(),
                    object: "text_completion".to_string(),
                    created: meta.created,
                    model: meta.model.clone(),
                    choices: vec![CompletionChoice {
                        index: 0,
                        text: self.text,
                        logprobs,
                        finish_reason,
                    }],
                    usage: Some(usage_body(usage)),
                })
            }
        }
    }
}
