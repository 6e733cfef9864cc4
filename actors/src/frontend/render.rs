//! Renders [`GenEvent`]s as OpenAI responses: SSE chunks for streaming, one JSON object
//! otherwise, for either endpoint, with one choice per prompt and sample (`index`).

use super::engine::{TokenLogprobs, Usage};
use super::error::ApiError;
use super::generation::{FinishKind, GenEvent};
use super::openai::{
    ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionResponse, ChatDelta,
    ChatLogprobs, ChatTokenLogprob, ChatTopLogprob, CompletionChoice, CompletionLogprobs,
    CompletionResponse, FunctionBody, FunctionDelta, PromptTokensDetails, ResponseMessage,
    ToolCallBody, ToolCallDelta, UsageBody,
};
use super::tools::ParsedCall;
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
        // An echoed prompt's first token has no logprob (NaN): null, as OpenAI sends it.
        let known = !entry.logprob.is_nan();
        into.token_logprobs.push(known.then_some(entry.logprob));
        into.top_logprobs.push(known.then(|| {
            entry
                .top
                .iter()
                .map(|top| (top.token.clone(), serde_json::Value::from(top.logprob)))
                .collect()
        }));
        into.text_offset.push(*offset);
        *offset = offset.saturating_add(u32::try_from(entry.token.len()).unwrap_or(u32::MAX));
    }
}

/// Streaming: renders each choice's events as `data: {json}\n\n` lines.
pub struct SseWriter {
    meta: ResponseMeta,
    include_usage: bool,
    /// Per choice: whether its role chunk went out (chat).
    sent_role: Vec<bool>,
    /// Per choice: byte offset of its next token (completions logprobs).
    text_offset: Vec<u32>,
}

impl SseWriter {
    pub fn new(meta: ResponseMeta, include_usage: bool, choices: usize) -> Self {
        SseWriter {
            meta,
            include_usage,
            sent_role: vec![false; choices],
            text_offset: vec![0; choices],
        }
    }

    /// The SSE text for one event of choice `index` (possibly several `data:` lines).
    /// `Finished` renders the choice's finish chunk; the usage chunk is [`SseWriter::usage`].
    pub fn render(&mut self, index: usize, event: GenEvent) -> String {
        let mut out = String::new();
        if self.meta.endpoint == Endpoint::Chat
            && !self.sent_role.get(index).copied().unwrap_or(true)
        {
            self.sent_role[index] = true;
            let role = ChatDelta {
                role: Some("assistant".to_string()),
                content: Some(String::new()),
                tool_calls: None,
            };
            push_data(&mut out, &self.chat_chunk(index, role, None, None));
        }
        match event {
            GenEvent::Text { text, logprobs } => self.text_chunk(&mut out, index, text, &logprobs),
            GenEvent::ToolCall {
                index: call,
                id,
                call: parsed,
            } => {
                // Two deltas, as OpenAI streams them: the call's name, then its arguments.
                let named = ToolCallDelta {
                    index: call as u32,
                    id: Some(id),
                    kind: Some("function".to_string()),
                    function: FunctionDelta {
                        name: Some(parsed.name),
                        arguments: Some(String::new()),
                    },
                };
                let args = ToolCallDelta {
                    index: call as u32,
                    id: None,
                    kind: None,
                    function: FunctionDelta {
                        name: None,
                        arguments: Some(parsed.arguments),
                    },
                };
                for delta in [named, args] {
                    let delta = ChatDelta {
                        tool_calls: Some(vec![delta]),
                        ..ChatDelta::default()
                    };
                    push_data(&mut out, &self.chat_chunk(index, delta, None, None));
                }
            }
            GenEvent::Finished { reason, .. } => self.finish_chunk(&mut out, index, reason),
            GenEvent::Failed(err) => {
                tracing::warn!(id = %self.meta.id, error = %err, "generation failed mid-stream");
                let error = ApiError::from_engine(err, self.meta.endpoint.prompt_param());
                push_data(&mut out, &error.body());
            }
        }
        out
    }

    /// The final usage chunk, when the client asked for one (empty otherwise).
    pub fn usage(&self, usage: Usage) -> String {
        let mut out = String::new();
        if self.include_usage {
            self.usage_chunk(&mut out, usage);
        }
        out
    }

    /// The terminator OpenAI clients wait for.
    pub fn done() -> &'static str {
        "data: [DONE]\n\n"
    }

    fn chat_chunk(
        &self,
        index: usize,
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
                index: index as u32,
                delta,
                logprobs,
                finish_reason: finish.map(|f| f.as_str().to_string()),
            }],
            usage: None,
        }
    }

    fn completion_chunk(
        &self,
        index: usize,
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
                index: index as u32,
                text,
                logprobs,
                finish_reason: finish.map(|f| f.as_str().to_string()),
            }],
            usage: None,
        }
    }

    fn text_chunk(
        &mut self,
        out: &mut String,
        index: usize,
        text: String,
        logprobs: &[TokenLogprobs],
    ) {
        let want_logprobs = self.meta.logprobs;
        match self.meta.endpoint {
            Endpoint::Chat => {
                let logprobs = want_logprobs.then(|| chat_logprobs(logprobs));
                let delta = ChatDelta {
                    content: Some(text),
                    ..ChatDelta::default()
                };
                push_data(out, &self.chat_chunk(index, delta, logprobs, None));
            }
            Endpoint::Completion => {
                let mut offset = self.text_offset.get(index).copied().unwrap_or(0);
                let logprobs = want_logprobs.then(|| {
                    let mut lp = CompletionLogprobs::default();
                    extend_completion_logprobs(&mut lp, logprobs, &mut offset);
                    lp
                });
                if let Some(slot) = self.text_offset.get_mut(index) {
                    *slot = offset;
                }
                push_data(out, &self.completion_chunk(index, text, logprobs, None));
            }
        }
    }

    fn finish_chunk(&self, out: &mut String, index: usize, reason: FinishKind) {
        match self.meta.endpoint {
            Endpoint::Chat => push_data(
                out,
                &self.chat_chunk(index, ChatDelta::default(), None, Some(reason)),
            ),
            Endpoint::Completion => push_data(
                out,
                &self.completion_chunk(index, String::new(), None, Some(reason)),
            ),
        }
    }

    fn usage_chunk(&self, out: &mut String, usage: Usage) {
        match self.meta.endpoint {
            Endpoint::Chat => {
                let mut chunk = self.chat_chunk(0, ChatDelta::default(), None, None);
                chunk.choices.clear();
                chunk.usage = Some(usage_body(usage));
                push_data(out, &chunk);
            }
            Endpoint::Completion => {
                let mut chunk = self.completion_chunk(0, String::new(), None, None);
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

/// One choice of a non-streaming response, as it accumulates.
#[derive(Default)]
struct ChoiceText {
    text: String,
    logprobs: Vec<TokenLogprobs>,
    tool_calls: Vec<ToolCallBody>,
    finish: Option<FinishKind>,
}

/// Non-streaming: accumulates each choice's events into one response body.
pub struct Aggregate {
    choices: Vec<ChoiceText>,
}

impl Aggregate {
    pub fn new(choices: usize) -> Self {
        Aggregate {
            choices: (0..choices).map(|_| ChoiceText::default()).collect(),
        }
    }

    pub fn push_text(&mut self, index: usize, text: &str, logprobs: Vec<TokenLogprobs>) {
        if let Some(c) = self.choices.get_mut(index) {
            c.text.push_str(text);
            c.logprobs.extend(logprobs);
        }
    }

    pub fn push_tool_call(&mut self, index: usize, id: String, call: ParsedCall) {
        if let Some(c) = self.choices.get_mut(index) {
            c.tool_calls.push(ToolCallBody {
                id,
                kind: "function".to_string(),
                function: FunctionBody {
                    name: call.name,
                    arguments: call.arguments,
                },
            });
        }
    }

    pub fn finish(&mut self, index: usize, reason: FinishKind) {
        if let Some(c) = self.choices.get_mut(index) {
            c.finish = Some(reason);
        }
    }

    pub fn into_json(
        self,
        meta: &ResponseMeta,
        usage: Usage,
    ) -> serde_json::Result<serde_json::Value> {
        let finish_reason =
            |c: &ChoiceText| Some(c.finish.unwrap_or(FinishKind::Stop).as_str().to_string());
        match meta.endpoint {
            Endpoint::Chat => serde_json::to_value(ChatCompletionResponse {
                id: meta.id.clone(),
                object: "chat.completion".to_string(),
                created: meta.created,
                model: meta.model.clone(),
                choices: self
                    .choices
                    .into_iter()
                    .enumerate()
                    .map(|(i, c)| ChatChoice {
                        index: i as u32,
                        finish_reason: finish_reason(&c),
                        logprobs: meta.logprobs.then(|| chat_logprobs(&c.logprobs)),
                        message: ResponseMessage {
                            role: "assistant".to_string(),
                            // Only calls: null content, as OpenAI answers.
                            content: if c.tool_calls.is_empty() {
                                Some(c.text)
                            } else {
                                Some(c.text.trim().to_string()).filter(|t| !t.is_empty())
                            },
                            tool_calls: c.tool_calls,
                        },
                    })
                    .collect(),
                usage: usage_body(usage),
            }),
            Endpoint::Completion => serde_json::to_value(CompletionResponse {
                id: meta.id.clone(),
                object: "text_completion".to_string(),
                created: meta.created,
                model: meta.model.clone(),
                choices: self
                    .choices
                    .into_iter()
                    .enumerate()
                    .map(|(i, c)| {
                        let logprobs = meta.logprobs.then(|| {
                            let mut lp = CompletionLogprobs::default();
                            extend_completion_logprobs(&mut lp, &c.logprobs, &mut 0);
                            lp
                        });
                        CompletionChoice {
                            index: i as u32,
                            finish_reason: finish_reason(&c),
                            logprobs,
                            text: c.text,
                        }
                    })
                    .collect(),
                usage: Some(usage_body(usage)),
            }),
        }
    }
}
