//! Chat templates: the model's own Jinja template (GGUF `tokenizer.chat_template`, or
//! `chat_template` in HF's tokenizer_config.json) rendered with minijinja on OpenAI-style
//! messages, the way HF transformers' `apply_chat_template` renders it.

use minijinja::{context, Environment, Error as JinjaError, ErrorKind};
use serde::{Deserialize, Serialize};

/// One message of a conversation (OpenAI's `{role, content}`, with `tool_calls` and
/// `tool_call_id` in a tool conversation, as HF templates read them).
///
/// A message with `parts` (it holds images) reaches the template with `content` as the
/// list of parts, `[{"type": "text", "text": ...}, {"type": "image"}]`, as transformers'
/// processors pass multimodal messages; otherwise `content` is the string.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    #[serde(skip)]
    pub parts: Option<Vec<ContentPart>>,
    /// `[{"id", "type": "function", "function": {"name", "arguments": {...}}}]`, arguments
    /// as a JSON object (templates write them with `tojson`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
            parts: None,
            tool_calls: None,
            tool_call_id: None,
        }
    }
}

/// One part of a multimodal message's content, as templates read it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ContentPart {
    Text { text: String },
    Image,
}

impl Serialize for ChatMessage {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("role", &self.role)?;
        match &self.parts {
            Some(parts) => m.serialize_entry("content", parts)?,
            None => m.serialize_entry("content", &self.content)?,
        }
        if let Some(calls) = &self.tool_calls {
            m.serialize_entry("tool_calls", calls)?;
        }
        if let Some(id) = &self.tool_call_id {
            m.serialize_entry("tool_call_id", id)?;
        }
        m.end()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    #[error("chat template does not compile: {0:#}")]
    Syntax(JinjaError),
    #[error("chat template failed to render: {0:#}")]
    Render(JinjaError),
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Whether the template reads `tools` (else callers fall back to a system prompt).
    renders_tools: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

const NAME: &str = "chat_template";

impl ChatTemplate {
    pub fn new(source: &str) -> Result<ChatTemplate, ChatTemplateError> {
        let mut env = Environment::new();
        // transformers renders chat templates with these two options on.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut env);
        // Python string/list/dict methods (`.strip()`, `.startswith()`, `.items()`, ...).
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned(NAME, source.to_string())
            .map_err(ChatTemplateError::Syntax)?;
        // The heuristic HF-format servers use: a template that never names `tools` has no
        // place for them.
        let renders_tools = source.contains("tools");
        Ok(ChatTemplate { env, renders_tools })
    }

    /// Whether the template renders a `tools` list itself.
    pub fn renders_tools(&self) -> bool {
        self.renders_tools
    }

    /// Renders `messages` with `add_generation_prompt`, `bos_token` and `eos_token` set.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<String, ChatTemplateError> {
        self.render_with_tools(messages, None, add_generation_prompt, bos_token, eos_token)
    }

    /// [`ChatTemplate::render`] with `tools` (OpenAI's `[{"type": "function", "function":
    /// {...}}]`), passed as `none` when absent, as transformers does.
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<String, ChatTemplateError> {
        let tmpl = self
            .env
            .get_template(NAME)
            .map_err(ChatTemplateError::Syntax)?;
        tmpl.render(context! {
            messages => messages,
            tools => tools,
            add_generation_prompt => add_generation_prompt,
            bos_token => bos_token,
            eos_token => eos_token,
        })
        .map_err(ChatTemplateError::Render)
    }
}

/// One-shot: compile `template` and render `messages` with a generation prompt.
pub fn render_chat(
    template: &str,
    messages: &[ChatMessage],
    bos_token: &str,
    eos_token: &str,
) -> Result<String, ChatTemplateError> {
    ChatTemplate::new(template)?.render(messages, true, bos_token, eos_token)
}

fn raise_exception(message: String) -> Result<String, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_chatml() {
        let out = render_chat(CHATML, &[ChatMessage::new("user", "Hi")], "", "").unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_methods_and_tokens() {
        let t = "{{ bos_token }}{% for m in messages %}{{ m.content.strip() | upper }}{% endfor %}{{ eos_token }}";
        let out = render_chat(t, &[ChatMessage::new("user", "  hi  ")], "<s>", "</s>").unwrap();
        assert_eq!(out, "<s>HI</s>");
    }

    #[test]
    fn raise_exception_is_an_error_with_its_message() {
        let t = "{% if messages[0].role != 'user' %}{{ raise_exception('roles must alternate') }}{% endif %}";
        let err = render_chat(t, &[ChatMessage::new("assistant", "x")], "", "").unwrap_err();
        assert!(matches!(err, ChatTemplateError::Render(_)));
        assert!(err.to_string().contains("roles must alternate"), "{err}");
    }

    #[test]
    fn tools_reach_templates_that_read_them() {
        let t = "{% if tools %}{% for t in tools %}[{{ t.function.name }}]{% endfor %}{% endif %}{% for m in messages %}{{ m.role }}{% if m.tool_calls %}:{{ m.tool_calls[0].function.arguments | tojson }}{% endif %};{% endfor %}";
        let tmpl = ChatTemplate::new(t).unwrap();
        assert!(tmpl.renders_tools());
        let tools = vec![serde_json::json!({"type": "function", "function": {"name": "f"}})];
        let mut call = ChatMessage::new("assistant", "");
        call.tool_calls = Some(serde_json::json!([{"id": "c", "type": "function",
            "function": {"name": "f", "arguments": {"a": 1}}}]));
        let out = tmpl
            .render_with_tools(
                &[ChatMessage::new("user", "x"), call],
                Some(&tools),
                false,
                "",
                "",
            )
            .unwrap();
        assert_eq!(out, r#"[f]user;assistant:{"a":1};"#);
        assert!(!ChatTemplate::new(CHATML).unwrap().renders_tools());
    }

    #[test]
    fn image_parts_reach_the_template_as_a_list() {
        let t = "{% for m in messages %}{% if m.content is string %}{{ m.content }}{% else %}{% for p in m.content %}{% if p.type == 'image' %}<image>{% else %}{{ p.text }}{% endif %}{% endfor %}{% endif %};{% endfor %}";
        let mut m = ChatMessage::new("user", "what?");
        m.parts = Some(vec![
            ContentPart::Image,
            ContentPart::Text {
                text: "what?".into(),
            },
        ]);
        let out = render_chat(t, &[ChatMessage::new("system", "s"), m], "", "").unwrap();
        assert_eq!(out, "s;<image>what?;");
    }

    #[test]
    fn syntax_error_is_reported() {
        assert!(matches!(
            ChatTemplate::new("{% for %}"),
            Err(ChatTemplateError::Syntax(_))
        ));
    }
}
