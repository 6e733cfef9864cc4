//! Tools in the prompt: the conversation as the chat template sees it when tools are on.
//!
//! A template that reads `tools` (Qwen 2.5, Hermes, Llama 3.1, ...) gets them as
//! transformers passes them, and assistant `tool_calls` with their arguments as JSON
//! objects. A template that does not (SmolLM2's, plain ChatML) gets the documented
//! fallback instead: a system message that lists the tools and asks for Hermes-style calls
//! (`<tool_call>{"name": ..., "arguments": ...}</tool_call>`, the format the frontend's
//! parser reads), earlier calls written back into the assistant's text in that format, and
//! tool results as user turns wrapped in `<tool_response>`, since such templates have no
//! `tool` role of their own.

use crate::protocol::{ChatMessage, MessagePart};
use serde_json::Value;
use turbine_kernels::chat::{ChatMessage as TemplateMessage, ContentPart};

pub const OPEN: &str = "<tool_call>";
pub const CLOSE: &str = "</tool_call>";

/// The messages for a template that renders tools itself.
pub fn native(messages: &[ChatMessage]) -> Vec<TemplateMessage> {
    messages
        .iter()
        .map(|m| {
            let mut t = TemplateMessage::new(m.role.clone(), m.content.clone());
            t.parts = template_parts(m);
            if !m.tool_calls.is_empty() {
                let calls: Vec<Value> = m
                    .tool_calls
                    .iter()
                    .map(|c| {
                        serde_json::json!({
                            "id": c.id,
                            "type": "function",
                            "function": {"name": c.name, "arguments": arguments_value(&c.arguments)},
                        })
                    })
                    .collect();
                t.tool_calls = Some(Value::Array(calls));
            }
            t.tool_call_id = m.tool_call_id.clone();
            t
        })
        .collect()
}

/// The messages for a template without tool support, `tools` (OpenAI-shaped) in a system
/// message of their own (merged into the conversation's first system message if any).
pub fn fallback(messages: &[ChatMessage], tools: &[Value]) -> Vec<TemplateMessage> {
    let mut out: Vec<TemplateMessage> = Vec::with_capacity(messages.len() + 1);
    let preamble = system_prompt(tools);
    for (i, m) in messages.iter().enumerate() {
        let t = match m.role.as_str() {
            "system" | "developer" if i == 0 && !tools.is_empty() => {
                TemplateMessage::new("system", format!("{}\n\n{preamble}", m.content))
            }
            "assistant" if !m.tool_calls.is_empty() => {
                let mut text = m.content.clone();
                for c in &m.tool_calls {
                    let call = serde_json::json!({"name": c.name, "arguments": arguments_value(&c.arguments)});
                    if !text.is_empty() {
                        text.push('\n');
                    }
                    text.push_str(&format!("{OPEN}\n{call}\n{CLOSE}"));
                }
                TemplateMessage::new("assistant", text)
            }
            "tool" => TemplateMessage::new(
                "user",
                format!("<tool_response>\n{}\n</tool_response>", m.content),
            ),
            _ => {
                let mut t = TemplateMessage::new(m.role.clone(), m.content.clone());
                t.parts = template_parts(m);
                t
            }
        };
        out.push(t);
    }
    let has_system = messages
        .first()
        .is_some_and(|m| m.role == "system" || m.role == "developer");
    if !tools.is_empty() && !has_system {
        out.insert(0, TemplateMessage::new("system", preamble));
    }
    out
}

/// A message with images as the template's list of parts (none for a text message).
fn template_parts(m: &ChatMessage) -> Option<Vec<ContentPart>> {
    (!m.parts.is_empty()).then(|| {
        m.parts
            .iter()
            .map(|p| match p {
                MessagePart::Text(text) => ContentPart::Text { text: text.clone() },
                MessagePart::Image(_) | MessagePart::Remote(_) => ContentPart::Image,
            })
            .collect()
    })
}

/// Arguments as a JSON object for templates (`tojson`); text that is not JSON stays text.
fn arguments_value(arguments: &str) -> Value {
    serde_json::from_str(arguments).unwrap_or_else(|_| Value::String(arguments.to_string()))
}

/// The fallback's system prompt.
pub fn system_prompt(tools: &[Value]) -> String {
    let mut out = String::from(
        "You can call functions to help with the user's request. The functions are listed \
         below as JSON, one per line, between <tools> and </tools>:\n<tools>\n",
    );
    for t in tools {
        out.push_str(&t.to_string());
        out.push('\n');
    }
    out.push_str(&format!(
        "</tools>\nTo call a function, write a JSON object with its name and arguments \
         between {OPEN} and {CLOSE} tags, one call per pair of tags:\n\
         {OPEN}\n{{\"name\": \"<function name>\", \"arguments\": {{<arguments as JSON>}}}}\n{CLOSE}"
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ToolCall;

    #[test]
    fn fallback_lists_tools_and_rewrites_calls_and_results() {
        let tools = vec![serde_json::json!({"type": "function", "function": {"name": "f"}})];
        let messages = vec![
            ChatMessage {
                role: "user".into(),
                content: "hi".into(),
                ..ChatMessage::default()
            },
            ChatMessage {
                role: "assistant".into(),
                tool_calls: vec![ToolCall {
                    id: "c1".into(),
                    name: "f".into(),
                    arguments: r#"{"a":1}"#.into(),
                }],
                ..ChatMessage::default()
            },
            ChatMessage {
                role: "tool".into(),
                content: "42".into(),
                tool_call_id: Some("c1".into()),
                ..ChatMessage::default()
            },
        ];
        let out = fallback(&messages, &tools);
        assert_eq!(out.len(), 4);
        assert_eq!(out[0].role, "system");
        assert!(
            out[0].content.contains(r#""name":"f""#),
            "{}",
            out[0].content
        );
        assert!(
            out[2].content.starts_with("<tool_call>\n{"),
            "{}",
            out[2].content
        );
        assert!(
            out[2].content.contains(r#""name":"f""#) && out[2].content.ends_with("}\n</tool_call>")
        );
        assert_eq!(out[3].role, "user");
        assert!(out[3].content.contains("<tool_response>\n42\n"));
        let native = native(&messages);
        assert_eq!(
            native[1].tool_calls.as_ref().unwrap()[0]["function"]["arguments"]["a"],
            1
        );
        assert_eq!(native[2].tool_call_id.as_deref(), Some("c1"));
    }
}
