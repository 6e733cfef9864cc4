//! Turns a raw request body into a [`GenerateRequest`], or an [`ApiError`] naming the field.
//!
//! WHY two passes: serde's error for a wrong type ("invalid type: string, expected f64")
//! does not say which field it was. On failure each top-level field is deserialized alone
//! (every request field is optional, so a one-field object is a valid request) and the first
//! one that fails is named in the 400.

use super::engine::{ChatMessage, GenerateRequest, Prompt};
use super::error::ApiError;
use super::openai::{
    ChatCompletionRequest, CommonFields, CompletionRequest, MessageContent, PromptField,
    RequestMessage, StopField,
};
use crate::protocol::SamplingParams;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// OpenAI's limit on `stop` entries.
pub const MAX_STOP_SEQUENCES: usize = 4;
/// Largest `top_logprobs` / completions `logprobs` served.
pub const MAX_TOP_LOGPROBS: u64 = 20;

const CHAT_ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

/// Validates a POST /v1/chat/completions body for the engine serving `model_id`.
pub fn chat_request(body: &[u8], model_id: &str) -> Result<GenerateRequest, ApiError> {
    let object = json_object(body)?;
    let req: ChatCompletionRequest = typed(&object)?;
    let messages = req
        .messages
        .ok_or_else(|| ApiError::field("messages", "`messages` is required"))?;
    if messages.is_empty() {
        return Err(ApiError::field("messages", "`messages` must not be empty"));
    }
    let messages = messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| chat_message(i, m))
        .collect::<Result<Vec<_>, _>>()?;
    let logprobs = match (req.logprobs, req.top_logprobs) {
        (Some(true), top) => Some(top_logprobs("top_logprobs", top.unwrap_or(0))?),
        (_, Some(top)) if top > 0 => {
            return Err(ApiError::field(
                "top_logprobs",
                "`top_logprobs` requires `logprobs` to be true",
            ))
        }
        _ => None,
    };
    let max_tokens = match req.max_completion_tokens {
        Some(n) => Some(("max_completion_tokens", n)),
        None => req.common.max_tokens.map(|n| ("max_tokens", n)),
    };
    common(
        req.common,
        model_id,
        Prompt::Chat(messages),
        max_tokens,
        logprobs,
    )
}

/// Validates a POST /v1/completions body for the engine serving `model_id`.
pub fn completion_request(body: &[u8], model_id: &str) -> Result<GenerateRequest, ApiError> {
    let object = json_object(body)?;
    let req: CompletionRequest = typed(&object)?;
    let prompt = match req.prompt {
        None => return Err(ApiError::field("prompt", "`prompt` is required")),
        Some(PromptField::One(text)) => text,
        Some(PromptField::Many(mut texts)) => match texts.len() {
            1 => texts.remove(0),
            0 => return Err(ApiError::field("prompt", "`prompt` must not be empty")),
            _ => {
                return Err(ApiError::field(
                    "prompt",
                    "batched prompts are not supported: send one prompt per request",
                ))
            }
        },
    };
    let logprobs = req
        .logprobs
        .map(|k| top_logprobs("logprobs", k))
        .transpose()?;
    let max_tokens = req.common.max_tokens.map(|n| ("max_tokens", n));
    common(
        req.common,
        model_id,
        Prompt::Text(prompt),
        max_tokens,
        logprobs,
    )
}

/// UTF-8, then JSON, then "is an object".
fn json_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let text = std::str::from_utf8(body)
        .map_err(|e| ApiError::invalid(None, format!("request body is not valid UTF-8: {e}")))?;
    let value: Value = serde_json::from_str(text)
        .map_err(|e| ApiError::invalid(None, format!("request body is not valid JSON: {e}")))?;
    match value {
        Value::Object(object) => Ok(object),
        _ => Err(ApiError::invalid(
            None,
            "request body must be a JSON object",
        )),
    }
}

/// Deserializes the whole object; on failure finds and names the offending field.
fn typed<T: DeserializeOwned>(object: &Map<String, Value>) -> Result<T, ApiError> {
    match serde_json::from_value::<T>(Value::Object(object.clone())) {
        Ok(typed) => Ok(typed),
        Err(whole) => Err(blame_field::<T>(object)
            .unwrap_or_else(|| ApiError::invalid(None, format!("invalid request body: {whole}")))),
    }
}

fn blame_field<T: DeserializeOwned>(object: &Map<String, Value>) -> Option<ApiError> {
    object.iter().find_map(|(key, value)| {
        let mut alone = Map::new();
        alone.insert(key.clone(), value.clone());
        let err = serde_json::from_value::<T>(Value::Object(alone)).err()?;
        if key == "messages" {
            if let Some(err) = blame_message(value) {
                return Some(err);
            }
        }
        Some(ApiError::field(
            key,
            format!("invalid value for `{key}`: {err}"),
        ))
    })
}

/// Names `messages[i]` when one message is malformed.
fn blame_message(messages: &Value) -> Option<ApiError> {
    let items = messages.as_array()?;
    items.iter().enumerate().find_map(|(i, item)| {
        let err = serde_json::from_value::<RequestMessage>(item.clone()).err()?;
        let param = format!("messages[{i}]");
        Some(ApiError::field(
            &param,
            format!("invalid value for `{param}`: {err}"),
        ))
    })
}

fn chat_message(index: usize, message: RequestMessage) -> Result<ChatMessage, ApiError> {
    if !CHAT_ROLES.contains(&message.role.as_str()) {
        return Err(ApiError::field(
            &format!("messages[{index}].role"),
            format!(
                "unknown role `{}`; expected one of {}",
                message.role,
                CHAT_ROLES.join(", ")
            ),
        ));
    }
    let content = match message.content {
        None => String::new(),
        Some(MessageContent::Text(text)) => text,
        Some(MessageContent::Parts(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (j, part) in parts.into_iter().enumerate() {
                let param = format!("messages[{index}].content[{j}]");
                match (part.kind.as_str(), part.text) {
                    ("text", Some(text)) => texts.push(text),
                    ("text", None) => {
                        return Err(ApiError::field(&param, "a text part needs `text`"))
                    }
                    (other, _) => {
                        return Err(ApiError::field(
                            &param,
                            format!("content parts of type `{other}` are not supported"),
                        ))
                    }
                }
            }
            // Parts are separate paragraphs to the client; a newline keeps them apart
            // for the tokenizer instead of gluing the last word of one to the next.
            texts.join("\n")
        }
    };
    Ok(ChatMessage {
        role: message.role,
        content,
    })
}

fn top_logprobs(param: &str, k: u64) -> Result<u32, ApiError> {
    if k > MAX_TOP_LOGPROBS {
        return Err(ApiError::field(
            param,
            format!("`{param}` must be at most {MAX_TOP_LOGPROBS}"),
        ));
    }
    Ok(k as u32)
}

/// Checks the fields both endpoints share and assembles the request.
fn common(
    fields: CommonFields,
    model_id: &str,
    prompt: Prompt,
    max_tokens: Option<(&str, u64)>,
    logprobs: Option<u32>,
) -> Result<GenerateRequest, ApiError> {
    let model = match fields.model.as_deref() {
        None => model_id.to_string(),
        Some(model) if model == model_id => model.to_string(),
        Some(model) => return Err(ApiError::model_not_found(model)),
    };
    if let Some(n) = fields.n {
        if n != 1 {
            return Err(ApiError::field("n", "only `n` = 1 is supported"));
        }
    }
    let max_tokens = match max_tokens {
        Some((param, 0)) => {
            return Err(ApiError::field(
                param,
                format!("`{param}` must be at least 1"),
            ))
        }
        // Huge values are accepted; the engine caps them at the context limit.
        Some((_, n)) => Some(u32::try_from(n).unwrap_or(u32::MAX)),
        None => None,
    };
    let sampling = sampling(&fields)?;
    let stop = match fields.stop {
        None => Vec::new(),
        Some(StopField::One(stop)) => vec![stop],
        Some(StopField::Many(stops)) => stops,
    };
    if stop.len() > MAX_STOP_SEQUENCES {
        return Err(ApiError::field(
            "stop",
            format!("at most {MAX_STOP_SEQUENCES} stop sequences are allowed"),
        ));
    }
    let stop = stop.into_iter().filter(|s| !s.is_empty()).collect();
    let stream = fields.stream.unwrap_or(false);
    let include_usage = stream
        && fields
            .stream_options
            .and_then(|options| options.include_usage)
            .unwrap_or(false);
    Ok(GenerateRequest {
        model,
        prompt,
        sampling,
        max_tokens,
        stop,
        ignore_eos: fields.ignore_eos.unwrap_or(false),
        logprobs,
        include_usage,
        stream,
        hints: crate::router::hints::RoutingHints::default(),
    })
}

fn sampling(fields: &CommonFields) -> Result<SamplingParams, ApiError> {
    let defaults = SamplingParams::default();
    let temperature = in_range(
        "temperature",
        fields.temperature,
        |t| (0.0..=2.0).contains(&t),
        "between 0 and 2",
    )?
    .map_or(defaults.temperature, |t| t as f32);
    let top_p = in_range(
        "top_p",
        fields.top_p,
        |p| p > 0.0 && p <= 1.0,
        "greater than 0 and at most 1",
    )?
    .map_or(defaults.top_p, |p| p as f32);
    let min_p = in_range(
        "min_p",
        fields.min_p,
        |p| (0.0..=1.0).contains(&p),
        "between 0 and 1",
    )?
    .map_or(defaults.min_p, |p| p as f32);
    let repetition_penalty = in_range(
        "repetition_penalty",
        fields.repetition_penalty,
        |r| r > 0.0 && r <= 2.0,
        "greater than 0 and at most 2",
    )?
    .map_or(defaults.repetition_penalty, |r| r as f32);
    let top_k = match fields.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => u32::try_from(k).unwrap_or(u32::MAX),
        Some(_) => {
            return Err(ApiError::field(
                "top_k",
                "`top_k` must be -1 (disabled) or a positive integer",
            ))
        }
    };
    Ok(SamplingParams {
        temperature,
        top_p,
        top_k,
        min_p,
        repetition_penalty,
        // Same bits, so a negative seed is as reproducible as a positive one.
        seed: fields.seed.map(|s| s as u64),
    })
}

fn in_range(
    param: &str,
    value: Option<f64>,
    ok: impl Fn(f64) -> bool,
    expected: &str,
) -> Result<Option<f64>, ApiError> {
    match value {
        Some(v) if !v.is_finite() || !ok(v) => Err(ApiError::field(
            param,
            format!("`{param}` must be {expected}, got {v}"),
        )),
        other => Ok(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    fn chat(body: &str) -> Result<GenerateRequest, ApiError> {
        chat_request(body.as_bytes(), "m")
    }

    #[test]
    fn accepts_a_minimal_chat_request_with_defaults() {
        let req = chat(r#"{"messages":[{"role":"user","content":"hi"}]}"#).unwrap();
        assert_eq!(req.model, "m");
        assert_eq!(req.sampling, SamplingParams::default());
        assert_eq!(req.max_tokens, None);
        assert!(!req.stream);
        assert_eq!(
            req.prompt,
            Prompt::Chat(vec![ChatMessage {
                role: "user".into(),
                content: "hi".into()
            }])
        );
    }

    #[test]
    fn joins_text_parts_and_ignores_unknown_fields() {
        let req = chat(
            r#"{"model":"m","foo":{"bar":1},"user":"u","messages":[{"role":"user",
               "content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]}"#,
        )
        .unwrap();
        let Prompt::Chat(messages) = req.prompt else {
            panic!("chat prompt expected")
        };
        assert_eq!(messages[0].content, "a\nb");
    }

    #[test]
    fn names_the_field_with_the_wrong_type() {
        let err = chat(r#"{"messages":[{"role":"user","content":"x"}],"temperature":"hot"}"#)
            .unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert_eq!(err.param.as_deref(), Some("temperature"));
        let err =
            chat(r#"{"messages":[{"role":"user","content":"x"},{"content":"y"}]}"#).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("messages[1]"));
        let err =
            chat(r#"{"messages":[{"role":"user","content":"x"}],"stream":"yes"}"#).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("stream"));
    }

    #[test]
    fn prefers_max_completion_tokens_and_caps_huge_values() {
        let req = chat(
            r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":5,"max_completion_tokens":7}"#,
        )
        .unwrap();
        assert_eq!(req.max_tokens, Some(7));
        let req = chat(r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":1e30}"#);
        // 1e30 is a float, not an integer: a type error naming the field.
        assert_eq!(req.unwrap_err().param.as_deref(), Some("max_tokens"));
        let req =
            chat(r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":99999999999999}"#)
                .unwrap();
        assert_eq!(req.max_tokens, Some(u32::MAX));
    }

    #[test]
    fn integers_are_accepted_for_float_fields_and_ranges_are_checked() {
        let req = chat(r#"{"messages":[{"role":"user","content":"x"}],"temperature":1,"top_p":1}"#)
            .unwrap();
        assert_eq!(req.sampling.temperature, 1.0);
        assert_eq!(req.sampling.top_p, 1.0);
        let err = chat(r#"{"messages":[{"role":"user","content":"x"}],"top_p":0}"#).unwrap_err();
        assert!(err.message.contains("greater than 0"), "{}", err.message);
        let req =
            chat(r#"{"messages":[{"role":"user","content":"x"}],"top_k":-1,"seed":-1}"#).unwrap();
        assert_eq!(req.sampling.top_k, 0);
        assert_eq!(req.sampling.seed, Some(u64::MAX));
    }

    #[test]
    fn stream_options_only_count_when_streaming() {
        let base =
            r#""messages":[{"role":"user","content":"x"}],"stream_options":{"include_usage":true}"#;
        assert!(!chat(&format!("{{{base}}}")).unwrap().include_usage);
        assert!(
            chat(&format!(r#"{{{base},"stream":true}}"#))
                .unwrap()
                .include_usage
        );
    }

    #[test]
    fn completion_prompt_forms() {
        let one = completion_request(br#"{"prompt":["a b"]}"#, "m").unwrap();
        assert_eq!(one.prompt, Prompt::Text("a b".into()));
        let two = completion_request(br#"{"prompt":["a","b"]}"#, "m").unwrap_err();
        assert_eq!(two.param.as_deref(), Some("prompt"));
        let lp = completion_request(br#"{"prompt":"a","logprobs":3}"#, "m").unwrap();
        assert_eq!(lp.logprobs, Some(3));
    }

    #[test]
    fn chat_logprobs_need_the_flag() {
        let base = r#""messages":[{"role":"user","content":"x"}]"#;
        let req = chat(&format!(r#"{{{base},"logprobs":true,"top_logprobs":2}}"#)).unwrap();
        assert_eq!(req.logprobs, Some(2));
        let err = chat(&format!(r#"{{{base},"top_logprobs":2}}"#)).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("top_logprobs"));
    }
}
