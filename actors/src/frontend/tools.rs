//! Tool calling: the request's tools and `tool_choice`, and the parser that finds tool calls
//! in generated text, whole or as it streams.
//!
//! The call format is Hermes's (used by Qwen 2.5, Hermes, many Llama fine-tunes, and what
//! the fallback prompt asks for): each call is a JSON object `{"name": ..., "arguments":
//! {...}}` between `<tool_call>` and `</tool_call>`. Text outside the tags is the message's
//! content. A body that does not parse, or names no declared tool, stays content: the client
//! sees what the model wrote rather than a call that was never made.
//!
//! WHY a streaming parser that holds text back: a tag may arrive split over several tokens
//! (`<tool`, `_call>`), so text that could be the start of a tag waits until it is clearly
//! not one; a call is emitted once its closing tag (or the end of the output) arrives.

use serde_json::Value;

pub use crate::preprocessor::tool_prompt::{CLOSE, OPEN};

/// One declared function.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolSpec {
    pub name: String,
    pub description: Option<String>,
    /// JSON schema of the arguments (`{"type": "object"}` when the request gave none).
    pub parameters: Value,
    pub strict: bool,
}

/// `tool_choice`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolChoice {
    /// Tools are neither shown to the model nor parsed from its output.
    None,
    /// The model decides; calls are parsed from its output.
    Auto,
    /// At least one call, constrained to the declared tools.
    Required,
    /// One call of this function.
    Named(String),
}

/// The tools of one chat request.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolSetup {
    pub tools: Vec<ToolSpec>,
    pub choice: ToolChoice,
    /// `parallel_tool_calls: false`: at most one call is returned.
    pub parallel: bool,
}

impl ToolSetup {
    /// Whether generated text is searched for calls.
    pub fn parses(&self) -> bool {
        self.choice != ToolChoice::None && !self.tools.is_empty()
    }

    /// The tools as the chat template sees them (OpenAI's shape).
    pub fn template_tools(&self) -> Vec<Value> {
        self.tools
            .iter()
            .map(|t| {
                let mut function = serde_json::Map::new();
                function.insert("name".into(), Value::String(t.name.clone()));
                if let Some(d) = &t.description {
                    function.insert("description".into(), Value::String(d.clone()));
                }
                function.insert("parameters".into(), t.parameters.clone());
                serde_json::json!({"type": "function", "function": function})
            })
            .collect()
    }
}

/// A call found in the output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedCall {
    pub name: String,
    /// The arguments as JSON text (OpenAI sends a string).
    pub arguments: String,
}

/// Parses one `<tool_call>` body; `None` when it is not a call of a declared tool.
pub fn parse_call(body: &str, tools: &[ToolSpec]) -> Option<ParsedCall> {
    let value: Value = serde_json::from_str(body.trim()).ok()?;
    let name = value.get("name")?.as_str()?;
    if !tools.iter().any(|t| t.name == name) {
        return None;
    }
    let arguments = match value.get("arguments").or_else(|| value.get("parameters")) {
        None | Some(Value::Null) => "{}".to_string(),
        // Some models write the arguments as a JSON string already.
        Some(Value::String(s)) if serde_json::from_str::<Value>(s).is_ok() => s.clone(),
        Some(other) => other.to_string(),
    };
    Some(ParsedCall {
        name: name.to_string(),
        arguments,
    })
}

/// What the streaming parser lets out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolEvent {
    Content(String),
    Call(ParsedCall),
}

/// Finds calls in text that arrives piece by piece.
#[derive(Clone, Debug, Default)]
pub struct ToolParser {
    /// Text not let out yet: a possible tag start, or a call's body.
    held: String,
    in_call: bool,
    calls: usize,
    max_calls: Option<usize>,
}

impl ToolParser {
    /// `single`: stop emitting calls after the first (`parallel_tool_calls: false`).
    pub fn new(single: bool) -> Self {
        ToolParser {
            max_calls: single.then_some(1),
            ..ToolParser::default()
        }
    }

    /// Calls emitted so far.
    pub fn calls(&self) -> usize {
        self.calls
    }

    /// Feeds a piece of generated text.
    pub fn push(&mut self, text: &str, tools: &[ToolSpec]) -> Vec<ToolEvent> {
        self.held.push_str(text);
        let mut out = Vec::new();
        loop {
            if self.in_call {
                let Some(end) = self.held.find(CLOSE) else {
                    break;
                };
                let body: String = self.held[..end].to_string();
                self.held.replace_range(..end + CLOSE.len(), "");
                self.in_call = false;
                self.emit_call(&body, tools, &mut out);
            } else if let Some(start) = self.held.find(OPEN) {
                let before: String = self.held[..start].to_string();
                push_content(&mut out, before);
                self.held.replace_range(..start + OPEN.len(), "");
                self.in_call = true;
            } else {
                // Let out all but a tail that could still grow into `<tool_call>`.
                let keep = partial_tag_len(&self.held);
                let cut = self.held.len() - keep;
                let free: String = self.held[..cut].to_string();
                self.held.replace_range(..cut, "");
                push_content(&mut out, free);
                break;
            }
        }
        out
    }

    /// The output ended: an unterminated call is parsed as it is; held text is content.
    pub fn finish(&mut self, tools: &[ToolSpec]) -> Vec<ToolEvent> {
        let held = std::mem::take(&mut self.held);
        let mut out = Vec::new();
        if self.in_call {
            self.in_call = false;
            self.emit_call(&held, tools, &mut out);
        } else {
            push_content(&mut out, held);
        }
        out
    }

    fn emit_call(&mut self, body: &str, tools: &[ToolSpec], out: &mut Vec<ToolEvent>) {
        match parse_call(body, tools) {
            Some(call) if self.max_calls.is_none_or(|m| self.calls < m) => {
                self.calls += 1;
                out.push(ToolEvent::Call(call));
            }
            // A second call under `parallel_tool_calls: false` is dropped: the client
            // asked for one.
            Some(_) => {}
            None => push_content(out, format!("{OPEN}{body}")),
        }
    }
}

fn push_content(out: &mut Vec<ToolEvent>, text: String) {
    if !text.is_empty() {
        out.push(ToolEvent::Content(text));
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of [`OPEN`].
fn partial_tag_len(text: &str) -> usize {
    (1..OPEN.len())
        .rev()
        .find(|&k| {
            text.len() >= k
                && text.is_char_boundary(text.len() - k)
                && OPEN.starts_with(&text[text.len() - k..])
        })
        .unwrap_or(0)
}

/// Whole-text parse: (content, calls). Content is `None` when only calls were written.
pub fn parse_all(
    text: &str,
    tools: &[ToolSpec],
    single: bool,
) -> (Option<String>, Vec<ParsedCall>) {
    let mut parser = ToolParser::new(single);
    let mut events = parser.push(text, tools);
    events.extend(parser.finish(tools));
    let mut content = String::new();
    let mut calls = Vec::new();
    for e in events {
        match e {
            ToolEvent::Content(t) => content.push_str(&t),
            ToolEvent::Call(c) => calls.push(c),
        }
    }
    let content = if calls.is_empty() {
        Some(content)
    } else {
        Some(content.trim().to_string()).filter(|c| !c.is_empty())
    };
    (content, calls)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools() -> Vec<ToolSpec> {
        vec![ToolSpec {
            name: "get_weather".into(),
            description: None,
            parameters: serde_json::json!({"type": "object"}),
            strict: false,
        }]
    }

    #[test]
    fn whole_text_calls_and_content() {
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
        let (content, calls) = parse_all(text, &tools(), false);
        assert_eq!(content.as_deref(), Some("Let me check."));
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].name, "get_weather");
        assert_eq!(calls[0].arguments, r#"{"city":"Paris"}"#);
        // Unknown tool or bad JSON: stays content.
        let (content, calls) = parse_all(
            "<tool_call>{\"name\": \"nope\"}</tool_call>",
            &tools(),
            false,
        );
        assert!(calls.is_empty());
        assert!(content.unwrap().contains("nope"));
        let (content, calls) = parse_all("plain answer", &tools(), false);
        assert_eq!((content.as_deref(), calls.len()), (Some("plain answer"), 0));
    }

    #[test]
    fn streamed_pieces_give_the_same_calls_as_the_whole_text() {
        let text = "ok <tool_call>{\"name\": \"get_weather\", \"arguments\": {}}</tool_call> and <tool_call>{\"name\": \"get_weather\", \"arguments\": {\"a\": 1}}</tool_call>";
        for size in [1, 2, 3, 5, 7, 100] {
            let mut p = ToolParser::new(false);
            let mut events = Vec::new();
            let chars: Vec<char> = text.chars().collect();
            for piece in chars.chunks(size) {
                events.extend(p.push(&piece.iter().collect::<String>(), &tools()));
            }
            events.extend(p.finish(&tools()));
            let calls: Vec<_> = events
                .iter()
                .filter_map(|e| match e {
                    ToolEvent::Call(c) => Some(c.arguments.clone()),
                    _ => None,
                })
                .collect();
            assert_eq!(
                calls,
                vec!["{}".to_string(), r#"{"a":1}"#.to_string()],
                "size {size}"
            );
            let content: String = events
                .iter()
                .filter_map(|e| match e {
                    ToolEvent::Content(c) => Some(c.as_str()),
                    _ => None,
                })
                .collect();
            assert_eq!(content, "ok  and ", "size {size}");
        }
    }

    #[test]
    fn a_lone_angle_bracket_is_let_out_at_the_end_and_single_keeps_one_call() {
        let mut p = ToolParser::new(true);
        assert!(p
            .push("a <tool", &tools())
            .iter()
            .all(|e| e == &ToolEvent::Content("a ".into())));
        assert_eq!(p.finish(&tools()), vec![ToolEvent::Content("<tool".into())]);
        let two = "<tool_call>{\"name\":\"get_weather\"}</tool_call><tool_call>{\"name\":\"get_weather\"}</tool_call>";
        assert_eq!(parse_all(two, &tools(), true).1.len(), 1);
    }
}
