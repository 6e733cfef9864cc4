//! Every request field the generation endpoints know, with what turbine does with it.
//!
//! WHY a table: "no parameter silently ignored". A field is honoured, accepted as harmless
//! (it changes nothing about the output, e.g. `user`), or refused with a 400 that names it
//! and says why; a field that is not in the table is refused as unknown. The same table
//! gives the words of a type error ("`stop` must be a string or a list of strings"), so no
//! serde message reaches a client, and docs/API.md lists it (a unit test keeps them equal).

use super::error::ApiError;
use serde_json::{Map, Value};

/// Which endpoint a field belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum On {
    Chat,
    Completion,
    Both,
    /// POST /tokenize and /detokenize (their few fields are listed in docs/API.md).
    Tokenize,
}

/// What turbine does with a field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Served as documented.
    Honoured,
    /// Accepted and without effect on the output (listed in docs/API.md).
    Harmless,
    /// Refused with a 400 naming the field; the text says why.
    Refused(&'static str),
}

/// One row of the table.
#[derive(Clone, Copy, Debug)]
pub struct Field {
    pub name: &'static str,
    pub on: On,
    pub status: Status,
    /// What a value must be, in words: "`name` must be ...".
    pub expects: &'static str,
}

const fn f(name: &'static str, on: On, status: Status, expects: &'static str) -> Field {
    Field {
        name,
        on,
        status,
        expects,
    }
}

use On::{Both, Chat, Completion};
use Status::{Harmless, Honoured, Refused};

/// The table. Keep docs/API.md in step (`api_md_lists_every_field` checks it).
pub const FIELDS: &[Field] = &[
    f("model", On::Tokenize, Honoured, "a string"),
    f("tokens", On::Tokenize, Honoured, "a list of token ids (non-negative integers)"),
    f("add_special_tokens", On::Tokenize, Honoured, "a boolean"),
    f("prompt", On::Tokenize, Honoured, "a string"),
    f("messages", On::Tokenize, Honoured, "a non-empty list of messages"),
    f("model", Both, Honoured, "a string"),
    f("messages", Chat, Honoured, "a non-empty list of messages"),
    f("prompt", Completion, Honoured, "a string, a list of strings, a list of token ids (non-negative integers), or a list of lists of token ids"),
    f("max_tokens", Both, Honoured, "a positive integer"),
    f("max_completion_tokens", Chat, Honoured, "a positive integer"),
    f("temperature", Both, Honoured, "a number between 0 and 2"),
    f("top_p", Both, Honoured, "a number greater than 0 and at most 1"),
    f("n", Both, Honoured, "a positive integer"),
    f("stop", Both, Honoured, "a string or a list of at most 4 strings"),
    f("stream", Both, Honoured, "a boolean"),
    f("stream_options", Both, Honoured, "an object such as {\"include_usage\": true}"),
    f("seed", Both, Honoured, "an integer"),
    f("logprobs", Chat, Honoured, "a boolean"),
    f("logprobs", Completion, Honoured, "an integer between 0 and 20"),
    f("top_logprobs", Chat, Honoured, "an integer between 0 and 20"),
    f("presence_penalty", Both, Honoured, "a number between -2 and 2"),
    f("frequency_penalty", Both, Honoured, "a number between -2 and 2"),
    f("logit_bias", Both, Honoured, "an object mapping token ids to numbers between -100 and 100"),
    f("echo", Completion, Honoured, "a boolean"),
    f("best_of", Completion, Honoured, "a positive integer equal to `n`"),
    f("tools", Chat, Honoured, "a list of tools"),
    f("tool_choice", Chat, Honoured, "\"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}"),
    f("parallel_tool_calls", Chat, Honoured, "a boolean"),
    f("response_format", Chat, Honoured, "an object with a `type`"),
    // vLLM's extensions.
    f("top_k", Both, Honoured, "an integer: -1 or 0 (disabled) or positive"),
    f("min_p", Both, Honoured, "a number between 0 and 1"),
    f("repetition_penalty", Both, Honoured, "a number greater than 0 and at most 2"),
    f("ignore_eos", Both, Honoured, "a boolean"),
    f("min_tokens", Both, Honoured, "a non-negative integer"),
    f("stop_token_ids", Both, Honoured, "a list of token ids (non-negative integers)"),
    // Harmless: no effect on what is generated.
    f("user", Both, Harmless, "a string"),
    f("metadata", Chat, Harmless, "an object of strings"),
    f("safety_identifier", Chat, Harmless, "a string"),
    f("prompt_cache_key", Chat, Harmless, "a string"),
    f("service_tier", Chat, Harmless, "a string"),
    f("store", Chat, Harmless, "false or null (turbine stores nothing)"),
    f("modalities", Chat, Harmless, "[\"text\"] (turbine generates text only)"),
    // Known and refused.
    f("functions", Chat, Refused("the deprecated `functions` is not served; use `tools`"), "a list"),
    f("function_call", Chat, Refused("the deprecated `function_call` is not served; use `tool_choice`"), "a string or an object"),
    f("audio", Chat, Refused("audio output is not served"), "an object"),
    f("prediction", Chat, Refused("predicted outputs are not served"), "an object"),
    f("reasoning_effort", Chat, Refused("this model has no reasoning mode"), "a string"),
    f("verbosity", Chat, Refused("this model has no verbosity setting"), "a string"),
    f("web_search_options", Chat, Refused("web search is not served"), "an object"),
    f("suffix", Completion, Refused("insertion (`suffix`) is not served"), "a string"),
    f("prompt_logprobs", Both, Refused("vLLM's `prompt_logprobs` output is not served; on /v1/completions, `echo` with `logprobs` returns the prompt's logprobs"), "an integer"),
];

/// The row for `name` on `endpoint`, if the field exists there.
pub fn lookup(name: &str, endpoint: On) -> Option<&'static Field> {
    FIELDS.iter().find(|f| {
        f.name == name && (f.on == endpoint || (f.on == Both && endpoint != On::Tokenize))
    })
}

/// Refuses unknown and refused fields, and harmless ones whose value would matter
/// (`store: true`, `modalities` other than text). Fields set to `null` are absent.
pub fn check(object: &Map<String, Value>, endpoint: On) -> Result<(), ApiError> {
    for (name, value) in object {
        let Some(field) = lookup(name, endpoint) else {
            let other = match endpoint {
                On::Chat => lookup(name, On::Completion).map(|_| "/v1/completions"),
                On::Completion => lookup(name, On::Chat).map(|_| "/v1/chat/completions"),
                _ => None,
            };
            let hint = other.map_or(String::new(), |e| format!(" (it belongs to {e})"));
            return Err(ApiError::field(
                name,
                format!("unrecognized request field `{name}`{hint}; docs/API.md lists the fields served"),
            ));
        };
        if value.is_null() {
            continue;
        }
        match field.status {
            Status::Honoured => {}
            Status::Refused(why) => {
                return Err(ApiError::field(
                    name,
                    format!("`{name}` is not supported: {why}"),
                ))
            }
            Status::Harmless => harmless(name, value, field)?,
        }
    }
    Ok(())
}

fn harmless(name: &str, value: &Value, field: &Field) -> Result<(), ApiError> {
    let ok = match name {
        "store" => value == &Value::Bool(false),
        "modalities" => value
            .as_array()
            .is_some_and(|m| m.iter().all(|x| x.as_str() == Some("text"))),
        "metadata" => value.is_object(),
        _ => value.is_string(),
    };
    if ok {
        Ok(())
    } else {
        Err(type_error(name, value, field.expects))
    }
}

/// "`stop` must be a string or a list of strings, got a number".
pub fn type_error(name: &str, value: &Value, expects: &str) -> ApiError {
    ApiError::field(
        name,
        format!("`{name}` must be {expects}, got {}", describe(value)),
    )
}

/// A JSON value's kind in words, with the value when it is short.
pub fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".to_string(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) if s.chars().count() <= 40 => format!("the string {s:?}"),
        Value::String(_) => "a string".to_string(),
        Value::Array(items) if items.is_empty() => "an empty list".to_string(),
        Value::Array(items) => format!("a list of {}", kinds(items)),
        Value::Object(_) => "an object".to_string(),
    }
}

fn kinds(items: &[Value]) -> &'static str {
    let kind = |v: &Value| match v {
        Value::Null => "nulls",
        Value::Bool(_) => "booleans",
        Value::Number(n) if n.is_u64() => "non-negative integers",
        Value::Number(_) => "numbers",
        Value::String(_) => "strings",
        Value::Array(_) => "lists",
        Value::Object(_) => "objects",
    };
    let first = kind(&items[0]);
    if items.iter().all(|v| kind(v) == first) {
        first
    } else {
        "mixed values"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_md_lists_every_field() {
        let doc = include_str!("../../../docs/API.md");
        for field in FIELDS {
            assert!(
                doc.contains(&format!("`{}`", field.name)),
                "docs/API.md does not list `{}`",
                field.name
            );
        }
    }

    #[test]
    fn unknown_and_refused_fields_are_named() {
        let obj = |s: &str| serde_json::from_str::<Map<String, Value>>(s).unwrap();
        let err = check(&obj(r#"{"foo":1}"#), On::Chat).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("foo"));
        assert!(err.message.contains("unrecognized"), "{}", err.message);
        let err = check(&obj(r#"{"echo":true}"#), On::Chat).unwrap_err();
        assert!(err.message.contains("/v1/completions"), "{}", err.message);
        let err = check(&obj(r#"{"functions":[]}"#), On::Chat).unwrap_err();
        assert!(err.message.contains("use `tools`"), "{}", err.message);
        assert!(check(
            &obj(r#"{"user":"u","store":false,"functions":null}"#),
            On::Chat
        )
        .is_ok());
        let err = check(&obj(r#"{"store":true}"#), On::Chat).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("store"));
    }

    #[test]
    fn values_are_described_in_words() {
        assert_eq!(describe(&serde_json::json!(5)), "the number 5");
        assert_eq!(
            describe(&serde_json::json!([1, 2])),
            "a list of non-negative integers"
        );
        assert_eq!(
            describe(&serde_json::json!(["a", 1])),
            "a list of mixed values"
        );
    }
}
