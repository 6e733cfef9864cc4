//! The messages that flow down the serving graph and the tokens that flow back.
//!
//! frontend → preprocessor: an OpenAI-shaped request (owned by the frontend module);
//! preprocessor → router → worker: [`PreprocessedRequest`] (token ids, sampling, stop);
//! worker → preprocessor → frontend: a stream of [`TokenOutput`]; the preprocessor turns it
//! into text (incremental detokenization, stop strings) for the frontend.
//!
//! Types that both the frontend and the preprocessor speak (the prompt, rendered
//! logprobs, the engine error) live here too, so neither imports the other.

use crate::ids::{RequestId, TokenId};
use serde::{Deserialize, Serialize};

/// How to pick the next token. Defaults are OpenAI's (temperature 1, top_p 1, no top-k).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 disables top-k.
    pub top_k: u32,
    /// 0 disables min-p.
    pub min_p: f32,
    /// 1 disables the penalty.
    pub repetition_penalty: f32,
    /// Same seed, same prompt, same tokens.
    pub seed: Option<u64>,
    /// OpenAI's: subtracted once from the logit of every token already generated; 0 disables.
    #[serde(default)]
    pub presence_penalty: f32,
    /// OpenAI's: subtracted from a token's logit once per time it was generated; 0 disables.
    #[serde(default)]
    pub frequency_penalty: f32,
    /// Added to the logits of these tokens before sampling; -100 bans a token.
    #[serde(default)]
    pub logit_bias: Vec<(TokenId, f32)>,
    /// Stop tokens are not drawn before this many tokens have been generated.
    #[serde(default)]
    pub min_tokens: u32,
    /// The output must follow this grammar (constrained decoding).
    #[serde(default)]
    pub grammar: Option<Grammar>,
    /// `Some(k)`: also return the log-probability of every prompt token after the first
    /// (with `k` alternatives each), as vLLM's `prompt_logprobs` (completions' `echo` with
    /// `logprobs`). The worker then computes the whole prompt in one step, without the
    /// prefix cache (cached positions have no logits).
    #[serde(default)]
    pub prompt_logprobs: Option<u32>,
}

/// A grammar the output must follow, enforced token by token (`response_format`, tool
/// calls under `tool_choice` `required` or a named function).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Grammar {
    /// A JSON schema, as JSON text.
    JsonSchema(String),
    /// llguidance's Lark dialect (may embed JSON schemas with `%json`).
    Lark(String),
}

impl Grammar {
    /// What the grammar engine compiles (the schema text parsed as JSON).
    pub fn source(&self) -> Result<turbine_kernels::grammar::GrammarSource, String> {
        use turbine_kernels::grammar::GrammarSource;
        match self {
            Grammar::JsonSchema(text) => serde_json::from_str(text)
                .map(GrammarSource::JsonSchema)
                .map_err(|e| format!("the JSON schema is not JSON: {e}")),
            Grammar::Lark(text) => Ok(GrammarSource::Lark(text.clone())),
        }
    }
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            min_tokens: 0,
            grammar: None,
            prompt_logprobs: None,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        }
    }
}

/// When generation ends, as far as the worker can tell from token ids. Stop *strings* are
/// matched on text by the preprocessor, which then cancels the request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopConditions {
    pub max_tokens: u32,
    /// End-of-sequence ids and any extra stop token ids.
    pub stop_token_ids: Vec<TokenId>,
    /// Keep going past EOS (benchmarks). The frontend sends it as `false` with only the
    /// client's own `stop_token_ids` in `stop_token_ids`, so those still stop.
    pub ignore_eos: bool,
}

impl StopConditions {
    /// The `max_tokens` a prompt of `prompt_len` tokens runs with in a context of
    /// `context_length`: the client's `requested` (none: all the room), capped by the room
    /// the prompt leaves, as OpenAI servers do. The cap matters: a worker ends a sequence at
    /// the context length anyway (`FinishReason::Length`), so an uncapped request would end
    /// short of its own `max_tokens`. A prompt that fills the context is refused. The HTTP
    /// pipeline and the simulator's clients both ask here.
    pub fn max_tokens_within(
        prompt_len: usize,
        context_length: usize,
        requested: Option<u32>,
    ) -> Result<u32, EngineError> {
        if prompt_len >= context_length {
            return Err(EngineError::ContextLengthExceeded {
                prompt_tokens: prompt_len,
                context_length,
            });
        }
        let room = u32::try_from(context_length - prompt_len).unwrap_or(u32::MAX);
        Ok(requested.map_or(room, |m| m.min(room)))
    }
}

/// A request ready for a worker: tokenized, templated, with its sampling settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PreprocessedRequest {
    pub id: RequestId,
    pub token_ids: Vec<TokenId>,
    pub sampling: SamplingParams,
    pub stop: StopConditions,
    /// Return the log-probability of each sampled token, and this many alternatives.
    pub logprobs: Option<u32>,
    /// Hash salt (LoRA, multimodal content); 0 for the base model and text.
    pub salt: u64,
    /// Tokens at the end of `token_ids` that other workers already generated for this
    /// request (a migrated continuation). The sample index continues from here, so a
    /// seeded or greedy request draws the tokens it would have drawn on one worker.
    #[serde(default)]
    pub generated_before: u32,
    /// The prompt's images, in prompt order: each stands behind a run of placeholder
    /// tokens, salts the KV block hashes from its first one (see
    /// [`crate::kv::hash::ImageSalts`]) and becomes embeddings on the worker.
    #[serde(default)]
    pub images: Vec<PromptImage>,
    /// The embeddings of `images`' placeholder tokens, once computed (on the worker, or
    /// pulled from an encoder); never serialized.
    #[serde(skip)]
    pub embeds: Option<std::sync::Arc<crate::encoder::PromptEmbeds>>,
}

impl PreprocessedRequest {
    /// The salts its images put on its KV block hashes.
    pub fn image_salts(&self) -> crate::kv::hash::ImageSalts {
        image_salts(&self.images)
    }
}

/// The salts `images` put on a prompt's KV block hashes (the dispatcher's and the
/// worker's hashes are the same function of the same images).
pub fn image_salts(images: &[PromptImage]) -> crate::kv::hash::ImageSalts {
    crate::kv::hash::ImageSalts::new(images.iter().map(|i| (i.first_token as usize, i.hash.0)))
}

/// One image of a prompt, as it travels to a worker: where its placeholder tokens start,
/// how many there are, and the image itself as the client sent it (PNG/JPEG/WebP bytes,
/// already checked by the frontend; smaller on the wire than its pixels).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptImage {
    pub hash: ImageHash,
    /// Index in the prompt of its first placeholder token.
    pub first_token: u32,
    /// Placeholder tokens that stand for it (its embeddings' rows).
    pub tokens: u32,
    #[serde(with = "wire_bytes")]
    pub encoded: std::sync::Arc<Vec<u8>>,
    /// Its embeddings on an encoder's transfer plane (E/P/D), if an encoder made them; the
    /// worker pulls them, or encodes the image itself when they cannot be pulled.
    #[serde(default)]
    pub embeds: Option<EmbedsRef>,
    /// The decoded image where the frontend and the worker share a process (not re-decoded
    /// there); never serialized.
    #[serde(skip)]
    pub decoded: Option<std::sync::Arc<turbine_kernels::vision::RgbImage>>,
}

/// An image's embeddings pinned on an encoder: `[rows, hidden]` little-endian f32.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmbedsRef {
    pub descriptor: turbine_runtime::transfer::Descriptor,
    pub rows: u32,
    pub hidden: u32,
    /// Served from the encoder's embedding cache.
    pub cached: bool,
}

/// Bytes as one MessagePack `bin`, not an array of numbers.
mod wire_bytes {
    use serde::{Deserializer, Serializer};
    use std::sync::Arc;

    pub fn serialize<S: Serializer>(b: &Arc<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(b)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<Vec<u8>>, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::new();
                while let Some(b) = a.next_element::<u8>()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        d.deserialize_byte_buf(V).map(Arc::new)
    }
}

/// Why a sequence ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FinishReason {
    /// A stop token (or, set by the preprocessor, a stop string).
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
    /// The client went away or asked to stop.
    Cancelled,
    /// The engine failed; the message says why.
    Error(String),
    /// The worker gave the request up before it finished (it is draining or stopping):
    /// the frontend continues it on another worker from the tokens so far (see
    /// `router::migration`). Never reaches a client.
    Migrate,
}

impl FinishReason {
    /// A short name for log lines.
    pub fn label(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
            FinishReason::Error(_) => "error",
            FinishReason::Migrate => "migrate",
        }
    }
}

/// Log-probability of one sampled token, with the top alternatives when asked for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    pub token_id: TokenId,
    pub logprob: f32,
    pub top: Vec<(TokenId, f32)>,
}

/// One step's output for one request: usually one token; the last item carries `finish`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenOutput {
    pub token_ids: Vec<TokenId>,
    pub logprobs: Option<Vec<TokenLogprob>>,
    pub finish: Option<FinishReason>,
    /// Prompt tokens served from the prefix cache (set on the first output).
    pub cached_tokens: Option<u32>,
    /// On the first output of a request with `sampling.prompt_logprobs`: the logprob of
    /// each prompt token after the first, in order.
    #[serde(default)]
    pub prompt_logprobs: Option<Vec<TokenLogprob>>,
}

/// What to generate from: chat messages (the engine applies the chat template), raw text,
/// or token ids as they are. Serializable for stages in other processes (a chat message's
/// image parts stay behind, see [`ChatMessage::parts`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Prompt {
    Chat(Vec<ChatMessage>),
    Text(String),
    Tokens(Vec<TokenId>),
}

/// One chat message with its content flattened to text.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// "system", "developer", "user", "assistant" or "tool".
    pub role: String,
    /// The text parts, joined by newlines. Empty for an assistant message that only calls tools.
    pub content: String,
    /// An assistant message's tool calls (earlier turns of a tool conversation). Always
    /// serialized: messages are positional MessagePack, where a skipped field shifts the next.
    #[serde(default)]
    pub tool_calls: Vec<ToolCall>,
    /// A `tool` message: the call it answers.
    #[serde(default)]
    pub tool_call_id: Option<String>,
    /// The parts in the client's order when the message holds an image; empty for a text
    /// message (its `content` says it all). Never serialized: images cross processes as
    /// embeddings by descriptor, not inside the request.
    #[serde(skip)]
    pub parts: Vec<MessagePart>,
}

impl ChatMessage {
    /// A text-only message.
    pub fn text(role: impl Into<String>, content: impl Into<String>) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
            ..ChatMessage::default()
        }
    }

    /// The images of this message, in order.
    pub fn images(&self) -> impl Iterator<Item = &ChatImage> {
        self.parts.iter().filter_map(|p| match p {
            MessagePart::Image(image) => Some(image),
            MessagePart::Text(_) | MessagePart::Remote(_) => None,
        })
    }

    /// The images of this message still to be fetched, in order.
    pub fn remote_images(&self) -> impl Iterator<Item = &RemoteImage> {
        self.parts.iter().filter_map(|p| match p {
            MessagePart::Remote(r) => Some(r),
            _ => None,
        })
    }
}

/// One part of a message that holds images.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MessagePart {
    Text(String),
    Image(ChatImage),
    /// An http(s) image not fetched yet: validation leaves it so (it does no I/O), and the
    /// frontend fetches it (`frontend::fetch`) into an `Image` before the prompt is made.
    Remote(RemoteImage),
}

/// An image the client named by an http(s) URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteImage {
    pub url: String,
    /// The request field that named it (`messages[0].content[1].image_url.url`), for errors.
    pub param: String,
}

/// A decoded image from a request, with the hash of its pixels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatImage {
    pub image: std::sync::Arc<turbine_kernels::vision::RgbImage>,
    /// The bytes the client sent (what crosses to a worker in another process).
    pub encoded: std::sync::Arc<Vec<u8>>,
    /// xxh3-64 over the width, height and RGB pixels: the same picture is the same hash
    /// however it was encoded. It salts the prompt's KV block hashes and keys the
    /// encoder's embedding cache.
    pub hash: ImageHash,
}

impl ChatImage {
    pub fn new(image: turbine_kernels::vision::RgbImage, encoded: Vec<u8>) -> ChatImage {
        let hash = ImageHash::of(&image);
        ChatImage {
            image: std::sync::Arc::new(image),
            encoded: std::sync::Arc::new(encoded),
            hash,
        }
    }
}

/// The content hash of an image (see [`ChatImage::hash`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ImageHash(pub u64);

impl ImageHash {
    pub fn of(image: &turbine_kernels::vision::RgbImage) -> ImageHash {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        h.update(&image.width.to_le_bytes());
        h.update(&image.height.to_le_bytes());
        h.update(&image.pixels);
        ImageHash(h.digest())
    }
}

/// A function call an assistant made (in a conversation's history).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as JSON text, as OpenAI sends them.
    pub arguments: String,
}

/// Log-probability of one generated token, with the alternatives asked for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprobs {
    /// The token's text (lossy when the token is a partial UTF-8 sequence).
    pub token: String,
    /// The token's raw bytes.
    pub bytes: Vec<u8>,
    /// NaN for a prompt's first token, which has none (nothing precedes it): rendered as
    /// `null`, as OpenAI and vLLM do.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_tokens_are_capped_by_the_room_the_prompt_leaves() {
        let within = StopConditions::max_tokens_within;
        assert_eq!(within(96, 512, Some(100)), Ok(100));
        assert_eq!(within(140, 512, Some(484)), Ok(372));
        assert_eq!(within(140, 512, None), Ok(372));
        assert_eq!(within(511, 512, Some(9)), Ok(1));
        assert_eq!(
            within(512, 512, Some(1)),
            Err(EngineError::ContextLengthExceeded {
                prompt_tokens: 512,
                context_length: 512
            })
        );
    }
}
