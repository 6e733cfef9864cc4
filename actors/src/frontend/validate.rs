//! Turns a raw request body into a [`Validated`] request, or an [`ApiError`] naming the field.
//!
//! WHY this shape: every field is first checked against the table in `fields.rs` (unknown
//! and refused fields get a 400 naming them), then the body is read into the typed structs
//! of `openai.rs`. serde's error for a wrong type ("invalid type: string, expected f64",
//! "data did not match any variant of untagged enum") names neither the field nor the
//! expectation in words, so on failure each top-level field is deserialized alone (every
//! field is optional, so a one-field object is a valid request) and the first one that
//! fails is reported with the table's words. Messages are walked by hand for the same
//! reason: an error names `messages[2].content`.

use super::engine::{ChatMessage, GenerateRequest, Prompt};
use super::error::ApiError;
use super::fields::{self, describe, type_error, On};
use super::images::{image_from_url, ImageLimits, ImageSource};
use super::openai::{
    ChatCompletionRequest, CommonFields, CompletionRequest, DetokenizeRequest, PromptField,
    StopField, TokenizeRequest,
};
use super::tools::{ToolChoice, ToolSetup, ToolSpec};
use crate::protocol::{Grammar, ToolCall};
use crate::protocol::{MessagePart, SamplingParams};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// OpenAI's limit on `stop` entries.
pub const MAX_STOP_SEQUENCES: usize = 4;
/// Largest `top_logprobs` / completions `logprobs` served.
pub const MAX_TOP_LOGPROBS: u64 = 20;
/// Most choices one request may ask for (prompts times `n`).
pub const MAX_CHOICES: usize = 128;
/// Most `logit_bias` entries (OpenAI's limit is of this order too).
pub const MAX_LOGIT_BIAS: usize = 1024;

const CHAT_ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

/// A validated request: one [`GenerateRequest`] per choice is derived from it.
#[derive(Clone, Debug, PartialEq)]
pub struct Validated {
    /// The request of choice 0; the others differ in `prompt` and `sampling.seed`.
    pub request: GenerateRequest,
    /// Every prompt of the request, in order (a completions batch has several); at least one.
    pub prompts: Vec<Prompt>,
    /// Samples per prompt.
    pub n: u32,
    /// Completions: each choice's text starts with its prompt.
    pub echo: bool,
}

impl Validated {
    /// Number of choices: prompts times `n`, indexed prompt-major as OpenAI does.
    pub fn num_choices(&self) -> usize {
        self.prompts.len() * self.n as usize
    }

    /// The request of choice `index`: its prompt, and for samples after the first of a
    /// prompt a seed of their own (seed + sample) so that `n` samples differ under
    /// temperature yet a seeded request stays reproducible.
    pub fn choice(&self, index: usize) -> GenerateRequest {
        let n = self.n.max(1) as usize;
        let (prompt, sample) = (index / n, index % n);
        let mut req = self.request.clone();
        if let Some(p) = self.prompts.get(prompt) {
            req.prompt = p.clone();
        }
        if sample > 0 {
            req.sampling.seed = req.sampling.seed.map(|s| s.wrapping_add(sample as u64));
        }
        req
    }
}

/// Validates a POST /v1/chat/completions body for the engine serving `model_id`; images
/// are decoded and checked against `images`.
pub fn chat_request(
    body: &[u8],
    model_id: &str,
    images: &ImageLimits,
) -> Result<Validated, ApiError> {
    let object = json_object(body)?;
    fields::check(&object, On::Chat)?;
    let req: ChatCompletionRequest = typed(&object, On::Chat)?;
    let messages = chat_messages(req.messages, images)?;
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
    let format = match &req.response_format {
        Some(format) => response_format(format)?,
        None => None,
    };
    let tools = tool_setup(req.tools, req.tool_choice, req.parallel_tool_calls)?;
    let forced = tools.as_ref().and_then(tool_grammar);
    if let (Some(setup), Some(_)) = (&tools, &forced) {
        // The arguments of a forced call are enforced, so their schema must be complete.
        for (i, t) in setup.tools.iter().enumerate() {
            let allowed = match &setup.choice {
                ToolChoice::Named(name) => &t.name == name,
                _ => true,
            };
            if allowed {
                local_refs_only(&format!("tools[{i}].function.parameters"), &t.parameters)?;
            }
        }
    }
    let grammar = match (format, forced) {
        (Some(_), Some(_)) => {
            return Err(ApiError::field(
                "response_format",
                "`response_format` cannot be combined with `tool_choice` \"required\" or a named function: the output is the tool call",
            ))
        }
        (format, forced) => format.or(forced),
    };
    let mut validated = common(
        req.common,
        model_id,
        vec![Prompt::Chat(messages)],
        max_tokens,
        logprobs,
        false,
    )?;
    // `min_tokens` is served with a grammar (the stop tokens leave its mask while it
    // allows going on: `worker::constrained::hold_back`); `ignore_eos` has no meaning there.
    if grammar.is_some() && validated.request.ignore_eos {
        return Err(ApiError::field(
            "ignore_eos",
            "`ignore_eos` cannot be combined with `response_format` or a forced tool call (`tool_choice` \"required\" or a named function): once the grammar is complete only end-of-sequence may follow, so the output could not go on",
        ));
    }
    validated.request.tools = tools;
    validated.request.sampling.grammar = grammar;
    Ok(validated)
}

/// Validates a POST /v1/completions body for the engine serving `model_id`.
pub fn completion_request(body: &[u8], model_id: &str) -> Result<Validated, ApiError> {
    let object = json_object(body)?;
    fields::check(&object, On::Completion)?;
    let req: CompletionRequest = typed(&object, On::Completion)?;
    let prompts = completion_prompts(req.prompt)?;
    let logprobs = req
        .logprobs
        .map(|k| top_logprobs("logprobs", k))
        .transpose()?;
    let echo = req.echo.unwrap_or(false);
    if let Some(best_of) = req.best_of {
        if best_of != req.common.n.unwrap_or(1) {
            return Err(ApiError::field(
                "best_of",
                "`best_of` is served only equal to `n` (every sample is returned; none is ranked away)",
            ));
        }
    }
    let max_tokens = req.common.max_tokens.map(|n| ("max_tokens", n));
    let mut validated = common(req.common, model_id, prompts, max_tokens, logprobs, echo)?;
    // `echo` with `logprobs`: the echoed prompt's tokens come with their logprobs too.
    if echo {
        validated.request.sampling.prompt_logprobs = logprobs;
    }
    Ok(validated)
}

/// Validates a POST /tokenize body: the prompt (text or chat messages, rendered as a chat
/// completion renders them, generation prompt included) and whether to add BOS to text.
pub fn tokenize_request(body: &[u8], model_id: &str) -> Result<(Prompt, bool), ApiError> {
    let object = json_object(body)?;
    only_keys(
        &object,
        &["model", "prompt", "messages", "add_special_tokens"],
    )?;
    let req: TokenizeRequest = typed(&object, On::Tokenize)?;
    check_model(req.model.as_deref(), model_id)?;
    match (req.prompt, req.messages) {
        (Some(text), None) => Ok((Prompt::Text(text), req.add_special_tokens.unwrap_or(true))),
        (None, Some(messages)) => Ok((
            Prompt::Chat(chat_messages(Some(messages), &ImageLimits::default())?),
            req.add_special_tokens.unwrap_or(false),
        )),
        _ => Err(ApiError::invalid(
            None,
            "give exactly one of `prompt` (a string) and `messages`",
        )),
    }
}

/// Validates a POST /detokenize body: the token ids.
pub fn detokenize_request(body: &[u8], model_id: &str) -> Result<Vec<u32>, ApiError> {
    let object = json_object(body)?;
    only_keys(&object, &["model", "tokens"])?;
    let req: DetokenizeRequest = typed(&object, On::Tokenize)?;
    check_model(req.model.as_deref(), model_id)?;
    req.tokens
        .ok_or_else(|| ApiError::field("tokens", "`tokens` (a list of token ids) is required"))
}

fn only_keys(object: &Map<String, Value>, allowed: &[&str]) -> Result<(), ApiError> {
    match object.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(key) => Err(ApiError::field(
            key,
            format!(
                "unrecognized request field `{key}`; this endpoint reads {}",
                allowed.join(", ")
            ),
        )),
        None => Ok(()),
    }
}

fn check_model(model: Option<&str>, model_id: &str) -> Result<(), ApiError> {
    match model {
        Some(model) if model != model_id => Err(ApiError::model_not_found(model)),
        _ => Ok(()),
    }
}

fn completion_prompts(prompt: Option<PromptField>) -> Result<Vec<Prompt>, ApiError> {
    let prompts = match prompt {
        None => return Err(ApiError::field("prompt", "`prompt` is required")),
        Some(PromptField::One(text)) => vec![Prompt::Text(text)],
        Some(PromptField::Many(texts)) => texts.into_iter().map(Prompt::Text).collect(),
        Some(PromptField::Tokens(ids)) => vec![Prompt::Tokens(ids)],
        Some(PromptField::TokenLists(lists)) => lists.into_iter().map(Prompt::Tokens).collect(),
    };
    if prompts.is_empty() {
        return Err(ApiError::field("prompt", "`prompt` must not be empty"));
    }
    for (i, p) in prompts.iter().enumerate() {
        if matches!(p, Prompt::Tokens(ids) if ids.is_empty()) {
            return Err(ApiError::field(
                &format!("prompt[{i}]"),
                "a token-id prompt must hold at least one token",
            ));
        }
    }
    Ok(prompts)
}

/// `response_format`: `text` (no constraint), `json_object` (any JSON object) or
/// `json_schema` (`{"name", "schema", "strict", "description"}`), the JSON ones enforced
/// by constrained decoding. Whether the schema compiles is checked where the grammar
/// engine is (the pipeline), with the error naming the field.
fn response_format(format: &Value) -> Result<Option<Grammar>, ApiError> {
    let kind = format.get("type").and_then(Value::as_str);
    let only = |keys: &[&str]| match format
        .as_object()
        .and_then(|o| o.keys().find(|k| !keys.contains(&k.as_str())))
    {
        Some(key) => Err(ApiError::field(
            &format!("response_format.{key}"),
            format!("unrecognized `response_format` field `{key}`"),
        )),
        None => Ok(()),
    };
    match kind {
        Some("text") => {
            only(&["type"])?;
            Ok(None)
        }
        Some("json_object") => {
            only(&["type"])?;
            Ok(Some(json_grammar(&serde_json::json!({"type": "object"}))))
        }
        Some("json_schema") => {
            only(&["type", "json_schema"])?;
            let Some(spec) = format.get("json_schema").and_then(Value::as_object) else {
                return Err(ApiError::field(
                    "response_format.json_schema",
                    "`response_format.json_schema` is required: {\"name\", \"schema\", \"strict\"}",
                ));
            };
            if let Some(key) = spec
                .keys()
                .find(|k| !["name", "schema", "strict", "description"].contains(&k.as_str()))
            {
                return Err(ApiError::field(
                    &format!("response_format.json_schema.{key}"),
                    format!("unrecognized `json_schema` field `{key}`"),
                ));
            }
            match spec.get("schema") {
                Some(schema @ (Value::Object(_) | Value::Bool(_))) => {
                    local_refs_only("response_format.json_schema.schema", schema)?;
                    Ok(Some(json_grammar(schema)))
                }
                None => Err(ApiError::field(
                    "response_format.json_schema.schema",
                    "`response_format.json_schema.schema` (a JSON schema) is required",
                )),
                Some(other) => Err(type_error(
                    "response_format.json_schema.schema",
                    other,
                    "a JSON schema (an object)",
                )),
            }
        }
        Some(other) => Err(ApiError::field(
            "response_format.type",
            format!("`response_format.type` must be \"text\", \"json_object\" or \"json_schema\", got {other:?}"),
        )),
        None => Err(type_error(
            "response_format",
            format,
            "an object with a `type` (\"text\", \"json_object\" or \"json_schema\")",
        )),
    }
}

/// Refuses a schema with a `$ref` outside the document (`https://...`, `other.json#...`):
/// turbine fetches nothing over the network, so it could not be enforced. Local refs
/// (`#`, `#/$defs/...`) are resolved by the grammar engine.
pub fn local_refs_only(param: &str, schema: &Value) -> Result<(), ApiError> {
    match schema {
        Value::Object(o) => {
            if let Some(Value::String(target)) = o.get("$ref") {
                if !target.starts_with('#') {
                    return Err(ApiError::field(
                        param,
                        format!("`{param}` refers to {target:?} with `$ref`: only references inside the schema (\"#/$defs/...\") are served; turbine fetches nothing, so put the referenced schema under `$defs`"),
                    ));
                }
            }
            o.values().try_for_each(|v| local_refs_only(param, v))
        }
        Value::Array(items) => items.iter().try_for_each(|v| local_refs_only(param, v)),
        _ => Ok(()),
    }
}

/// Compact JSON, no free whitespace: a small model given the freedom of JSON's whitespace
/// may spend its whole budget on newlines.
fn compact(schema: &Value) -> Value {
    match schema {
        Value::Object(o) if !o.contains_key("x-guidance") => {
            let mut o = o.clone();
            o.insert(
                "x-guidance".into(),
                serde_json::json!({"whitespace_flexible": false}),
            );
            Value::Object(o)
        }
        other => other.clone(),
    }
}

fn json_grammar(schema: &Value) -> Grammar {
    Grammar::JsonSchema(compact(schema).to_string())
}

/// The grammar of a forced tool call (`tool_choice` `required` or named): one Hermes-style
/// `<tool_call>` whose JSON names one of `tools` and has arguments of its schema.
pub fn tool_grammar(setup: &ToolSetup) -> Option<Grammar> {
    let allowed: Vec<&ToolSpec> = match &setup.choice {
        ToolChoice::Required => setup.tools.iter().collect(),
        ToolChoice::Named(name) => setup.tools.iter().filter(|t| &t.name == name).collect(),
        ToolChoice::Auto | ToolChoice::None => return None,
    };
    let calls: Vec<Value> = allowed
        .iter()
        .map(|t| {
            serde_json::json!({
                "type": "object",
                "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                "required": ["name", "arguments"],
                "additionalProperties": false,
            })
        })
        .collect();
    let schema = match calls.len() {
        1 => calls[0].clone(),
        _ => serde_json::json!({"anyOf": calls}),
    };
    let open = super::tools::OPEN;
    let close = super::tools::CLOSE;
    Some(Grammar::Lark(format!(
        "start: \"{open}\\n\" call \"\\n{close}\"\ncall: %json {}\n",
        compact(&schema)
    )))
}

/// UTF-8, then JSON, then "is an object".
fn json_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let text = std::str::from_utf8(body).map_err(|e| {
        ApiError::invalid(
            None,
            format!(
                "the request body is not valid UTF-8 (bad byte at offset {})",
                e.valid_up_to()
            ),
        )
    })?;
    let value: Value = serde_json::from_str(text).map_err(json_error)?;
    match value {
        Value::Object(object) => Ok(object),
        other => Err(ApiError::invalid(
            None,
            format!(
                "the request body must be a JSON object, got {}",
                describe(&other)
            ),
        )),
    }
}

/// A JSON syntax error in words, with where it is.
fn json_error(err: serde_json::Error) -> ApiError {
    let raw = err.to_string();
    let what = if raw.contains("surrogate") || raw.contains("hex escape") {
        "a string holds a `\\u` escape that is not a character (a lone UTF-16 surrogate such as \
         `\\ud800` must be followed by its pair)"
            .to_string()
    } else if raw.contains("EOF while parsing") {
        "the body ends before the JSON value is complete".to_string()
    } else if raw.contains("trailing characters") {
        "there is more text after the JSON value".to_string()
    } else if raw.contains("trailing comma") {
        "a list or object ends with a trailing comma".to_string()
    } else if raw.contains("control character") {
        "a string holds a raw control character; escape it (e.g. `\\n`)".to_string()
    } else if raw.contains("invalid escape") {
        "a string holds an invalid escape sequence".to_string()
    } else if raw.contains("key must be a string") {
        "object keys must be strings".to_string()
    } else if raw.contains("recursion limit") {
        "the JSON nests too deeply".to_string()
    } else if raw.contains("number") {
        "a number is malformed or out of range".to_string()
    } else if raw.contains("expected value") {
        "a JSON value was expected".to_string()
    } else {
        // serde_json's remaining syntax messages are already words ("expected `:`").
        raw.split(" at line ").next().unwrap_or(&raw).to_string()
    };
    ApiError::invalid(
        None,
        format!(
            "the request body is not valid JSON: {what} (line {}, column {})",
            err.line(),
            err.column()
        ),
    )
}

/// Deserializes the whole object; on failure finds and names the offending field.
fn typed<T: DeserializeOwned>(object: &Map<String, Value>, on: On) -> Result<T, ApiError> {
    match serde_json::from_value::<T>(Value::Object(object.clone())) {
        Ok(typed) => Ok(typed),
        Err(_) => Err(blame_field::<T>(object, on).unwrap_or_else(|| {
            ApiError::invalid(None, "the request body does not have the expected shape")
        })),
    }
}

fn blame_field<T: DeserializeOwned>(object: &Map<String, Value>, on: On) -> Option<ApiError> {
    object.iter().find_map(|(key, value)| {
        let mut alone = Map::new();
        alone.insert(key.clone(), value.clone());
        serde_json::from_value::<T>(Value::Object(alone)).err()?;
        let expects = fields::lookup(key, on).map_or("of another type", |f| f.expects);
        Some(type_error(key, value, expects))
    })
}

fn chat_messages(
    messages: Option<Vec<Value>>,
    images: &ImageLimits,
) -> Result<Vec<ChatMessage>, ApiError> {
    let messages = messages.ok_or_else(|| ApiError::field("messages", "`messages` is required"))?;
    if messages.is_empty() {
        return Err(ApiError::field("messages", "`messages` must not be empty"));
    }
    let mut budget = ImageBudget {
        limits: images,
        seen: 0,
    };
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| chat_message(i, m, &mut budget))
        .collect()
}

/// Keys a message may carry.
const MESSAGE_KEYS: [&str; 5] = ["role", "content", "name", "tool_calls", "tool_call_id"];

/// The image limits and how many images the request has used so far.
struct ImageBudget<'a> {
    limits: &'a ImageLimits,
    seen: usize,
}

fn chat_message(
    index: usize,
    message: &Value,
    budget: &mut ImageBudget<'_>,
) -> Result<ChatMessage, ApiError> {
    let at = |field: &str| format!("messages[{index}].{field}");
    let Some(object) = message.as_object() else {
        let param = format!("messages[{index}]");
        return Err(type_error(
            &param,
            message,
            "an object with `role` and `content`",
        ));
    };
    if let Some(key) = object.keys().find(|k| !MESSAGE_KEYS.contains(&k.as_str())) {
        let why = match key.as_str() {
            "function_call" => "the deprecated `function_call` is not served; use `tool_calls`",
            _ => "messages carry `role`, `content`, `name`, `tool_calls` (assistant) and `tool_call_id` (tool)",
        };
        return Err(ApiError::field(
            &at(key),
            format!("unrecognized message field `{key}`: {why}"),
        ));
    }
    let role = match object.get("role") {
        Some(Value::String(role)) if CHAT_ROLES.contains(&role.as_str()) => role.clone(),
        Some(Value::String(role)) => {
            return Err(ApiError::field(
                &at("role"),
                format!(
                    "unknown role `{role}`; expected one of {}",
                    CHAT_ROLES.join(", ")
                ),
            ))
        }
        None => return Err(ApiError::field(&at("role"), "every message needs a `role`")),
        Some(other) => return Err(type_error(&at("role"), other, "a string")),
    };
    if let Some(name) = object.get("name") {
        if !name.is_string() && !name.is_null() {
            return Err(type_error(&at("name"), name, "a string"));
        }
    }
    let tool_calls = match object.get("tool_calls") {
        None | Some(Value::Null) => Vec::new(),
        Some(_) if role != "assistant" => {
            return Err(ApiError::field(
                &at("tool_calls"),
                "only assistant messages carry `tool_calls`",
            ))
        }
        Some(Value::Array(calls)) => calls
            .iter()
            .enumerate()
            .map(|(j, c)| history_call(&at(&format!("tool_calls[{j}]")), c))
            .collect::<Result<Vec<_>, _>>()?,
        Some(other) => return Err(type_error(&at("tool_calls"), other, "a list of tool calls")),
    };
    let tool_call_id = match (object.get("tool_call_id"), role.as_str()) {
        (Some(Value::String(id)), "tool") => Some(id.clone()),
        (None | Some(Value::Null), "tool") => {
            return Err(ApiError::field(
                &at("tool_call_id"),
                "a tool message needs `tool_call_id` (the id of the call it answers)",
            ))
        }
        (None | Some(Value::Null), _) => None,
        (Some(Value::String(_)), _) => {
            return Err(ApiError::field(
                &at("tool_call_id"),
                "only tool messages carry `tool_call_id`",
            ))
        }
        (Some(other), _) => return Err(type_error(&at("tool_call_id"), other, "a string")),
    };
    let mut parts = Vec::new();
    let content = match object.get("content") {
        None | Some(Value::Null) if !tool_calls.is_empty() => String::new(),
        None | Some(Value::Null) => {
            let needs = if role == "assistant" {
                "`content` or `tool_calls`"
            } else {
                "`content` (a string or a list of text parts)"
            };
            return Err(ApiError::field(
                &at("content"),
                format!("a {role} message needs {needs}"),
            ));
        }
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(given)) => {
            let (text, with_images) = content_parts(index, given, budget)?;
            parts = with_images;
            text
        }
        Some(other) => {
            return Err(type_error(
                &at("content"),
                other,
                "a string or a list of text parts",
            ))
        }
    };
    Ok(ChatMessage {
        role,
        content,
        tool_calls,
        tool_call_id,
        parts,
    })
}

/// One `tool_calls` entry of an assistant message in the history.
fn history_call(param: &str, call: &Value) -> Result<ToolCall, ApiError> {
    let shape =
        "an object {\"id\", \"type\": \"function\", \"function\": {\"name\", \"arguments\"}}";
    let id = call.get("id").and_then(Value::as_str);
    let function = call.get("function");
    let name = function.and_then(|f| f.get("name")).and_then(Value::as_str);
    let arguments = function.and_then(|f| f.get("arguments"));
    match (id, name, arguments) {
        (Some(id), Some(name), Some(Value::String(arguments))) => Ok(ToolCall {
            id: id.to_string(),
            name: name.to_string(),
            arguments: arguments.clone(),
        }),
        (Some(id), Some(name), None) => Ok(ToolCall {
            id: id.to_string(),
            name: name.to_string(),
            arguments: "{}".to_string(),
        }),
        _ => Err(type_error(param, call, shape)),
    }
}

/// Tool names as OpenAI allows them.
fn valid_tool_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// `tools`, `tool_choice` and `parallel_tool_calls` into a [`ToolSetup`] (`None`: no
/// tools and no choice that needs them).
fn tool_setup(
    tools: Option<Vec<Value>>,
    choice: Option<Value>,
    parallel: Option<bool>,
) -> Result<Option<ToolSetup>, ApiError> {
    let tools = tools.unwrap_or_default();
    let mut specs: Vec<ToolSpec> = Vec::with_capacity(tools.len());
    for (i, tool) in tools.iter().enumerate() {
        let param = format!("tools[{i}]");
        let shape = "an object {\"type\": \"function\", \"function\": {\"name\", \"description\", \"parameters\"}}";
        if tool.get("type").and_then(Value::as_str) != Some("function") {
            return Err(type_error(&param, tool, shape));
        }
        let Some(function) = tool.get("function").and_then(Value::as_object) else {
            return Err(type_error(&param, tool, shape));
        };
        if let Some(key) = function
            .keys()
            .find(|k| !["name", "description", "parameters", "strict"].contains(&k.as_str()))
        {
            return Err(ApiError::field(
                &format!("{param}.function.{key}"),
                format!("unrecognized function field `{key}`"),
            ));
        }
        let name = match function.get("name") {
            Some(Value::String(n)) if valid_tool_name(n) => n.clone(),
            Some(Value::String(n)) => {
                return Err(ApiError::field(
                    &format!("{param}.function.name"),
                    format!("tool name {n:?} must be 1 to 64 letters, digits, `_` or `-`"),
                ))
            }
            _ => {
                return Err(ApiError::field(
                    &format!("{param}.function.name"),
                    "every tool needs a `name` (a string)",
                ))
            }
        };
        if specs.iter().any(|s| s.name == name) {
            return Err(ApiError::field(
                &format!("{param}.function.name"),
                format!("two tools are named `{name}`"),
            ));
        }
        let description = match function.get("description") {
            None | Some(Value::Null) => None,
            Some(Value::String(d)) => Some(d.clone()),
            Some(other) => {
                return Err(type_error(
                    &format!("{param}.function.description"),
                    other,
                    "a string",
                ))
            }
        };
        let parameters = match function.get("parameters") {
            None | Some(Value::Null) => serde_json::json!({"type": "object", "properties": {}}),
            Some(p @ Value::Object(_)) => p.clone(),
            Some(other) => {
                return Err(type_error(
                    &format!("{param}.function.parameters"),
                    other,
                    "a JSON schema (an object)",
                ))
            }
        };
        let strict = match function.get("strict") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(type_error(
                    &format!("{param}.function.strict"),
                    other,
                    "a boolean",
                ))
            }
        };
        specs.push(ToolSpec {
            name,
            description,
            parameters,
            strict,
        });
    }
    let choice = match &choice {
        None | Some(Value::Null) if specs.is_empty() => return Ok(None),
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(ApiError::field(
                    "tool_choice",
                    format!("`tool_choice` must be \"none\", \"auto\", \"required\" or a named function, got {other:?}"),
                ))
            }
        },
        Some(v @ Value::Object(_)) => {
            let name = v
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str);
            match (v.get("type").and_then(Value::as_str), name) {
                (Some("function"), Some(name)) => ToolChoice::Named(name.to_string()),
                _ => {
                    let expects = super::fields::lookup("tool_choice", On::Chat).map_or("", |f| f.expects);
                    return Err(type_error("tool_choice", v, expects));
                }
            }
        }
        Some(other) => {
            let expects = super::fields::lookup("tool_choice", On::Chat).map_or("", |f| f.expects);
            return Err(type_error("tool_choice", other, expects));
        }
    };
    match &choice {
        ToolChoice::Required if specs.is_empty() => {
            return Err(ApiError::field(
                "tool_choice",
                "`tool_choice: \"required\"` needs `tools`",
            ))
        }
        ToolChoice::Named(name) if !specs.iter().any(|s| &s.name == name) => {
            return Err(ApiError::field(
                "tool_choice",
                format!("`tool_choice` names `{name}`, which is not among `tools`"),
            ))
        }
        _ => {}
    }
    Ok(Some(ToolSetup {
        tools: specs,
        choice,
        parallel: parallel.unwrap_or(true),
    }))
}

/// A list `content`: its text parts joined, and, when it holds an image, every part in the
/// client's order (empty for text only, where the text says it all).
fn content_parts(
    index: usize,
    parts: &[Value],
    budget: &mut ImageBudget<'_>,
) -> Result<(String, Vec<MessagePart>), ApiError> {
    let mut out = Vec::with_capacity(parts.len());
    for (j, part) in parts.iter().enumerate() {
        let param = format!("messages[{index}].content[{j}]");
        let kind = part.get("type").and_then(Value::as_str);
        match (kind, part.get("text")) {
            (Some("text"), Some(Value::String(text))) => out.push(MessagePart::Text(text.clone())),
            (Some("text"), _) => {
                return Err(ApiError::field(
                    &param,
                    "a text part needs `text` (a string)",
                ))
            }
            (Some("image_url"), _) => out.push(image_part(&param, part, budget)?),
            (Some(other), _) => {
                return Err(ApiError::field(
                    &param,
                    format!(
                        "content parts of type `{other}` are not supported (text and image_url)"
                    ),
                ))
            }
            (None, _) => {
                return Err(type_error(
                    &param,
                    part,
                    "an object such as {\"type\": \"text\", \"text\": \"...\"}",
                ))
            }
        }
    }
    // Parts are separate paragraphs to the client; a newline keeps them apart for the
    // tokenizer instead of gluing the last word of one to the next.
    let text = out
        .iter()
        .filter_map(|p| match p {
            MessagePart::Text(t) => Some(t.as_str()),
            MessagePart::Image(_) | MessagePart::Remote(_) => None,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let has_image = out.iter().any(|p| !matches!(p, MessagePart::Text(_)));
    Ok((text, if has_image { out } else { Vec::new() }))
}

/// One `{"type": "image_url", "image_url": {"url": ..., "detail": ...}}` part, checked
/// against the request's image budget: decoded (a data: URI), or left to fetch (an http(s)
/// URL, see `frontend::fetch`).
fn image_part(
    param: &str,
    part: &Value,
    budget: &mut ImageBudget<'_>,
) -> Result<MessagePart, ApiError> {
    let Some(image_url) = part.get("image_url").and_then(Value::as_object) else {
        return Err(ApiError::field(
            param,
            "an image_url part needs `image_url: {\"url\": ...}`",
        ));
    };
    let Some(url) = image_url.get("url").and_then(Value::as_str) else {
        return Err(ApiError::field(
            &format!("{param}.image_url.url"),
            "`url` must be a string (a data: URI or an http(s) URL)",
        ));
    };
    match image_url.get("detail") {
        None | Some(Value::Null) => {}
        Some(Value::String(d)) if d == "auto" => {}
        Some(other) => {
            let shown = other
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| other.to_string());
            return Err(ApiError::field(
                &format!("{param}.image_url.detail"),
                format!(
                    "`detail: {shown}` is not supported: the model's processor picks the \
                     resolution (use `auto` or leave it out)"
                ),
            ));
        }
    }
    budget.seen += 1;
    if budget.seen > budget.limits.max_images_per_request {
        return Err(ApiError::field(
            param,
            format!(
                "too many images: at most {} per request",
                budget.limits.max_images_per_request
            ),
        ));
    }
    let param = format!("{param}.image_url.url");
    match image_from_url(url, budget.limits) {
        Ok(ImageSource::Inline(image)) => Ok(MessagePart::Image(image)),
        Ok(ImageSource::Remote(url)) => Ok(MessagePart::Remote(crate::protocol::RemoteImage {
            url,
            param,
        })),
        Err(why) => Err(ApiError::field(&param, why)),
    }
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
    prompts: Vec<Prompt>,
    max_tokens: Option<(&str, u64)>,
    logprobs: Option<u32>,
    echo: bool,
) -> Result<Validated, ApiError> {
    check_model(fields.model.as_deref(), model_id)?;
    let model = model_id.to_string();
    let n = match fields.n {
        None => 1,
        Some(0) => return Err(ApiError::field("n", "`n` must be at least 1")),
        Some(n) if n as usize > MAX_CHOICES / prompts.len().max(1) => {
            return Err(ApiError::field(
                "n",
                format!(
                    "`n` times the number of prompts must be at most {MAX_CHOICES}, got {n} x {}",
                    prompts.len()
                ),
            ))
        }
        Some(n) => n as u32,
    };
    if prompts.len() > MAX_CHOICES {
        return Err(ApiError::field(
            "prompt",
            format!("at most {MAX_CHOICES} prompts are served in one request"),
        ));
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
    let request = GenerateRequest {
        model,
        prompt: prompts[0].clone(),
        sampling,
        max_tokens,
        stop,
        ignore_eos: fields.ignore_eos.unwrap_or(false),
        stop_token_ids: fields.stop_token_ids.unwrap_or_default(),
        tools: None,
        logprobs,
        include_usage,
        stream,
        hints: crate::router::hints::RoutingHints::default(),
    };
    Ok(Validated {
        request,
        prompts,
        n,
        echo,
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
    let penalty = |param, value| {
        in_range(
            param,
            value,
            |p| (-2.0..=2.0).contains(&p),
            "between -2 and 2",
        )
        .map(|v| v.map_or(0.0, |p| p as f32))
    };
    let presence_penalty = penalty("presence_penalty", fields.presence_penalty)?;
    let frequency_penalty = penalty("frequency_penalty", fields.frequency_penalty)?;
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
    let logit_bias = logit_bias(fields.logit_bias.as_ref())?;
    Ok(SamplingParams {
        temperature,
        top_p,
        top_k,
        min_p,
        repetition_penalty,
        // Same bits, so a negative seed is as reproducible as a positive one.
        seed: fields.seed.map(|s| s as u64),
        presence_penalty,
        frequency_penalty,
        logit_bias,
        min_tokens: fields
            .min_tokens
            .map_or(0, |m| u32::try_from(m).unwrap_or(u32::MAX)),
        grammar: None,
        prompt_logprobs: None,
    })
}

/// Token ids (JSON object keys, so strings) to biases in [-100, 100]. Whether an id is in
/// the vocabulary is the engine's to check (it knows the vocabulary).
fn logit_bias(
    bias: Option<&std::collections::BTreeMap<String, f64>>,
) -> Result<Vec<(u32, f32)>, ApiError> {
    let Some(bias) = bias else {
        return Ok(Vec::new());
    };
    if bias.len() > MAX_LOGIT_BIAS {
        return Err(ApiError::field(
            "logit_bias",
            format!("`logit_bias` may hold at most {MAX_LOGIT_BIAS} entries"),
        ));
    }
    bias.iter()
        .map(|(key, &value)| {
            let id = key.trim().parse::<u32>().map_err(|_| {
                ApiError::field(
                    "logit_bias",
                    format!("`logit_bias` keys must be token ids (non-negative integers), got {key:?}"),
                )
            })?;
            if !(value.is_finite() && (-100.0..=100.0).contains(&value)) {
                return Err(ApiError::field(
                    "logit_bias",
                    format!("`logit_bias` values must be between -100 and 100, got {value} for token {id}"),
                ));
            }
            Ok((id, value as f32))
        })
        .collect()
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
        chat_request(body.as_bytes(), "m", &ImageLimits::default()).map(|v| v.request)
    }

    fn completion(body: &str) -> Result<Validated, ApiError> {
        completion_request(body.as_bytes(), "m")
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
                content: "hi".into(),
                ..ChatMessage::default()
            }])
        );
    }

    #[test]
    fn joins_text_parts_accepts_harmless_fields_and_refuses_unknown_ones() {
        let req = chat(
            r#"{"model":"m","user":"u","messages":[{"role":"user",
               "content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]}"#,
        )
        .unwrap();
        let Prompt::Chat(messages) = req.prompt else {
            panic!("chat prompt expected")
        };
        assert_eq!(messages[0].content, "a\nb");
        let err =
            chat(r#"{"foo":{"bar":1},"messages":[{"role":"user","content":"x"}]}"#).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("foo"));
    }

    #[test]
    fn names_the_field_with_the_wrong_type_in_words() {
        let err = chat(r#"{"messages":[{"role":"user","content":"x"}],"temperature":"hot"}"#)
            .unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert_eq!(err.param.as_deref(), Some("temperature"));
        assert!(err.message.contains("must be a number"), "{}", err.message);
        let err =
            chat(r#"{"messages":[{"role":"user","content":"x"},{"content":"y"}]}"#).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("messages[1].role"));
        let err =
            chat(r#"{"messages":[{"role":"user","content":"x"}],"stream":"yes"}"#).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("stream"));
        let err = chat(r#"{"messages":[{"role":"user","content":"x"}],"stop":5}"#).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("stop"));
        assert!(
            err.message.contains("a string or a list") && !err.message.contains("variant"),
            "{}",
            err.message
        );
    }

    #[test]
    fn the_issue_cases_get_human_messages() {
        // A user message without content.
        let err = chat(r#"{"messages":[{"role":"user","content":null}]}"#).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("messages[0].content"));
        assert!(err.message.contains("needs `content`"), "{}", err.message);
        // A lone surrogate.
        let err = chat(r#"{"messages":[{"role":"user","content":"a\ud800b"}]}"#).unwrap_err();
        assert!(err.message.contains("surrogate"), "{}", err.message);
        assert!(err.message.contains("line 1"), "{}", err.message);
        // A prompt that is none of the accepted shapes.
        let err = completion(r#"{"prompt":[1,"a"]}"#).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("prompt"));
        assert!(!err.message.contains("untagged"), "{}", err.message);
        assert!(err.message.contains("list of token ids"), "{}", err.message);
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
        let one = completion(r#"{"prompt":["a b"]}"#).unwrap();
        assert_eq!(one.prompts, vec![Prompt::Text("a b".into())]);
        let two = completion(r#"{"prompt":["a","b"],"n":2}"#).unwrap();
        assert_eq!(two.num_choices(), 4);
        assert_eq!(two.choice(3).prompt, Prompt::Text("b".into()));
        let ids = completion(r#"{"prompt":[504, 12]}"#).unwrap();
        assert_eq!(ids.prompts, vec![Prompt::Tokens(vec![504, 12])]);
        let lists = completion(r#"{"prompt":[[1],[2,3]]}"#).unwrap();
        assert_eq!(lists.prompts.len(), 2);
        let lp = completion(r#"{"prompt":"a","logprobs":3}"#).unwrap();
        assert_eq!(lp.request.logprobs, Some(3));
        let err = completion(r#"{"prompt":[[]]}"#).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("prompt[0]"));
    }

    #[test]
    fn samples_get_seeds_of_their_own() {
        let v = completion(r#"{"prompt":"a","n":3,"seed":7}"#).unwrap();
        let seeds: Vec<_> = (0..3).map(|i| v.choice(i).sampling.seed).collect();
        assert_eq!(seeds, vec![Some(7), Some(8), Some(9)]);
        assert_eq!(
            completion(r#"{"prompt":"a","n":0}"#)
                .unwrap_err()
                .param
                .as_deref(),
            Some("n")
        );
        let err = completion(r#"{"prompt":"a","n":2,"best_of":3}"#).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("best_of"));
    }

    #[test]
    fn logit_bias_and_penalties_are_read_and_checked() {
        let v = completion(
            r#"{"prompt":"a","logit_bias":{"5":-100,"7":2.5},"presence_penalty":0.5,
                "frequency_penalty":-1,"min_tokens":3,"stop_token_ids":[9]}"#,
        )
        .unwrap();
        let s = &v.request.sampling;
        assert_eq!(s.logit_bias, vec![(5, -100.0), (7, 2.5)]);
        assert_eq!((s.presence_penalty, s.frequency_penalty), (0.5, -1.0));
        assert_eq!(s.min_tokens, 3);
        assert_eq!(v.request.stop_token_ids, vec![9]);
        let err = completion(r#"{"prompt":"a","logit_bias":{"x":1}}"#).unwrap_err();
        assert!(err.message.contains("token ids"), "{}", err.message);
        let err = completion(r#"{"prompt":"a","logit_bias":{"1":101}}"#).unwrap_err();
        assert!(err.message.contains("-100 and 100"), "{}", err.message);
        let err = completion(r#"{"prompt":"a","presence_penalty":3}"#).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("presence_penalty"));
    }

    #[test]
    fn echo_with_logprobs_asks_for_prompt_logprobs() {
        let plain = completion(r#"{"prompt":"a","echo":true}"#).unwrap();
        assert!(plain.echo);
        assert_eq!(plain.request.sampling.prompt_logprobs, None);
        let both = completion(r#"{"prompt":"a","echo":true,"logprobs":2}"#).unwrap();
        assert_eq!(both.request.sampling.prompt_logprobs, Some(2));
        let no_echo = completion(r#"{"prompt":"a","logprobs":2}"#).unwrap();
        assert_eq!(no_echo.request.sampling.prompt_logprobs, None);
    }

    #[test]
    fn response_formats_become_grammars() {
        let base = r#""messages":[{"role":"user","content":"x"}]"#;
        let req = chat(&format!(
            r#"{{{base},"response_format":{{"type":"text"}}}}"#
        ))
        .unwrap();
        assert_eq!(req.sampling.grammar, None);
        let req = chat(&format!(
            r#"{{{base},"response_format":{{"type":"json_object"}}}}"#
        ))
        .unwrap();
        assert!(matches!(req.sampling.grammar, Some(Grammar::JsonSchema(_))));
        let req = chat(&format!(
            r#"{{{base},"response_format":{{"type":"json_schema","json_schema":{{"name":"n","schema":{{"type":"integer"}},"strict":true}}}}}}"#
        ))
        .unwrap();
        let Some(Grammar::JsonSchema(text)) = req.sampling.grammar else {
            panic!("a schema grammar expected")
        };
        assert!(
            text.contains("integer") && text.contains("whitespace_flexible"),
            "{text}"
        );
        for (bad, param) in [
            (r#"{"type":"xml"}"#, "response_format.type"),
            (r#"{"type":"json_schema"}"#, "response_format.json_schema"),
            (
                r#"{"type":"json_schema","json_schema":{"name":"n"}}"#,
                "response_format.json_schema.schema",
            ),
            (
                r#"{"type":"json_object","extra":1}"#,
                "response_format.extra",
            ),
        ] {
            let err = chat(&format!(r#"{{{base},"response_format":{bad}}}"#)).unwrap_err();
            assert_eq!(err.param.as_deref(), Some(param), "{bad}: {}", err.message);
        }
    }

    #[test]
    fn grammars_refuse_ignore_eos_and_remote_refs_and_take_min_tokens() {
        let base = r#""messages":[{"role":"user","content":"x"}]"#;
        let json = r#""response_format":{"type":"json_object"}"#;
        let extra = r#""ignore_eos":true"#;
        let err = chat(&format!("{{{base},{json},{extra}}}")).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("ignore_eos"), "{}", err.message);
        assert!(err.message.contains("response_format"), "{}", err.message);
        // Without a grammar it is served.
        assert!(chat(&format!("{{{base},{extra}}}")).is_ok());
        // `min_tokens` is served with a grammar, and with a forced tool call.
        let with = chat(&format!(r#"{{{base},{json},"min_tokens":3}}"#)).unwrap();
        assert_eq!(with.sampling.min_tokens, 3);
        assert!(with.sampling.grammar.is_some());
        let tools = r#""tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}],"tool_choice":"required""#;
        assert!(chat(&format!(r#"{{{base},{tools},"min_tokens":3}}"#)).is_ok());
        let err = chat(&format!("{{{base},{tools},{extra}}}")).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("ignore_eos"), "{}", err.message);
        let schema = |s: &str| {
            format!(
                r#"{{{base},"response_format":{{"type":"json_schema","json_schema":{{"name":"n","schema":{s}}}}}}}"#
            )
        };
        let remote =
            r#"{"type":"object","properties":{"a":{"$ref":"https://example.com/a.json"}}}"#;
        let err = chat(&schema(remote)).unwrap_err();
        assert_eq!(
            err.param.as_deref(),
            Some("response_format.json_schema.schema")
        );
        assert!(
            err.message.contains("https://example.com/a.json"),
            "{}",
            err.message
        );
        let local = r##"{"$defs":{"a":{"type":"integer"}},"type":"object","properties":{"a":{"$ref":"#/$defs/a"}}}"##;
        assert!(chat(&schema(local)).is_ok());
        let tools = r#""tools":[{"type":"function","function":{"name":"f","parameters":{"$ref":"other.json"}}}]"#;
        let err = chat(&format!(r#"{{{base},{tools},"tool_choice":"required"}}"#)).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("tools[0].function.parameters"));
        // Shown to the model, not enforced: accepted under "auto".
        assert!(chat(&format!("{{{base},{tools}}}")).is_ok());
    }

    #[test]
    fn tools_and_tool_choice_are_read_and_checked() {
        let tools = r#""tools":[{"type":"function","function":{"name":"get_weather","parameters":{"type":"object"}}}]"#;
        let base = r#""messages":[{"role":"user","content":"x"}]"#;
        let req = chat(&format!("{{{base},{tools}}}")).unwrap();
        let setup = req.tools.unwrap();
        assert_eq!(setup.choice, ToolChoice::Auto);
        assert_eq!(req.sampling.grammar, None);
        let req = chat(&format!(
            r#"{{{base},{tools},"tool_choice":{{"type":"function","function":{{"name":"get_weather"}}}}}}"#
        ))
        .unwrap();
        let Some(Grammar::Lark(lark)) = req.sampling.grammar else {
            panic!("a forced call is a grammar")
        };
        assert!(
            lark.contains("<tool_call>") && lark.contains("get_weather"),
            "{lark}"
        );
        let err = chat(&format!(
            r#"{{{base},{tools},"tool_choice":{{"type":"function","function":{{"name":"nope"}}}}}}"#
        ))
        .unwrap_err();
        assert_eq!(err.param.as_deref(), Some("tool_choice"));
        let err = chat(&format!(r#"{{{base},"tool_choice":"required"}}"#)).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("tool_choice"));
        let err = chat(&format!(
            r#"{{{base},"tools":[{{"type":"function","function":{{"name":"a b"}}}}]}}"#
        ))
        .unwrap_err();
        assert_eq!(err.param.as_deref(), Some("tools[0].function.name"));
        // A tool conversation: the call in the history and its result.
        let req = chat(
            r#"{"messages":[{"role":"user","content":"x"},
                {"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{}"}}]},
                {"role":"tool","tool_call_id":"c1","content":"42"}]}"#,
        )
        .unwrap();
        let Prompt::Chat(messages) = req.prompt else {
            panic!("chat prompt expected")
        };
        assert_eq!(messages[1].tool_calls[0].name, "f");
        assert_eq!(messages[2].tool_call_id.as_deref(), Some("c1"));
        let err = chat(r#"{"messages":[{"role":"tool","content":"42"}]}"#).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("messages[0].tool_call_id"));
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
