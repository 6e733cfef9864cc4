//! Server-sent events as OpenAI-compatible servers stream them: a byte-level decoder that
//! survives arbitrary network chunk boundaries, and a classifier for the JSON payloads.
//!
//! WHY a hand-written decoder: a bench must time each event at the moment its bytes arrive,
//! so it cannot wait for a library to buffer whole responses; and the format is small.

use serde_json::Value;

/// Refuse to buffer a single line longer than this (a broken or hostile server).
pub const MAX_LINE_BYTES: usize = 16 << 20;

/// Errors while decoding a stream.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SseError {
    #[error("an SSE line exceeded {MAX_LINE_BYTES} bytes")]
    LineTooLong,
    #[error("an SSE data payload is not JSON: {0}")]
    BadJson(String),
}

/// Incremental SSE decoder: push bytes as they arrive, get back the `data` payload of every
/// event completed by them. Lines end in `\n`, `\r\n` or `\r`; an event ends at a blank
/// line; several `data:` lines of one event are joined with `\n`; comments (`:`) and other
/// fields (`event:`, `id:`, `retry:`) are ignored.
#[derive(Debug, Default)]
pub struct SseDecoder {
    line: Vec<u8>,
    data: Option<String>,
    /// The previous byte was `\r`: a `\n` right after it belongs to the same line end.
    after_cr: bool,
}

impl SseDecoder {
    pub fn new() -> Self {
        SseDecoder::default()
    }

    /// Feeds bytes; returns the payloads of the events they complete, in order.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<String>, SseError> {
        let mut events = Vec::new();
        for &byte in bytes {
            let after_cr = std::mem::replace(&mut self.after_cr, false);
            match byte {
                b'\n' if after_cr => {}
                b'\n' | b'\r' => {
                    self.after_cr = byte == b'\r';
                    let line = std::mem::take(&mut self.line);
                    if let Some(event) = self.end_line(&line) {
                        events.push(event);
                    }
                }
                _ => {
                    if self.line.len() >= MAX_LINE_BYTES {
                        return Err(SseError::LineTooLong);
                    }
                    self.line.push(byte);
                }
            }
        }
        Ok(events)
    }

    /// Handles one complete line; returns an event's data when the line was blank.
    fn end_line(&mut self, line: &[u8]) -> Option<String> {
        if line.is_empty() {
            return self.data.take();
        }
        if line.first() == Some(&b':') {
            return None;
        }
        // Lines were split on ASCII line ends only, so no UTF-8 sequence was cut.
        let line = String::from_utf8_lossy(line);
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line.as_ref(), ""),
        };
        if field == "data" {
            match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.data = Some(value.to_string()),
            }
        }
        None
    }
}

/// What one `data:` payload of an OpenAI stream says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamItem {
    /// `[DONE]`: the server finished the stream properly.
    Done,
    Chunk(ChunkInfo),
}

/// The parts of a chunk that a client measures. `content` joins the new text of every
/// choice (`delta.content` for chat, `text` for completions); it is empty for role-only,
/// finish and usage chunks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChunkInfo {
    pub content: String,
    pub finish_reason: Option<String>,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    /// `{"error": {"message": ...}}` sent mid-stream.
    pub error: Option<String>,
}

/// Classifies one event payload.
pub fn parse_stream_item(data: &str) -> Result<StreamItem, SseError> {
    if data.trim() == "[DONE]" {
        return Ok(StreamItem::Done);
    }
    let value: Value = serde_json::from_str(data).map_err(|e| SseError::BadJson(e.to_string()))?;
    let mut info = ChunkInfo::default();
    if let Some(error) = value.get("error") {
        let message = error
            .get("message")
            .and_then(Value::as_str)
            .map_or_else(|| error.to_string(), str::to_string);
        info.error = Some(message);
    }
    if let Some(choices) = value.get("choices").and_then(Value::as_array) {
        for choice in choices {
            let text = choice
                .get("delta")
                .and_then(|delta| delta.get("content"))
                .or_else(|| choice.get("text"))
                .and_then(Value::as_str);
            if let Some(text) = text {
                info.content.push_str(text);
            }
            if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
                info.finish_reason = Some(reason.to_string());
            }
        }
    }
    if let Some(usage) = value.get("usage") {
        info.prompt_tokens = usage.get("prompt_tokens").and_then(Value::as_u64);
        info.completion_tokens = usage.get("completion_tokens").and_then(Value::as_u64);
    }
    Ok(StreamItem::Chunk(info))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_in_pieces(input: &[u8], piece: usize) -> Vec<String> {
        let mut decoder = SseDecoder::new();
        let mut events = Vec::new();
        for part in input.chunks(piece) {
            events.extend(decoder.push(part).unwrap());
        }
        events
    }

    #[test]
    fn events_survive_every_split_point_and_line_ending() {
        let lf = "data: {\"a\":1}\n\ndata: [DONE]\n\n";
        let crlf = "data: {\"a\":1}\r\n\r\ndata: [DONE]\r\n\r\n";
        let cr = "data: {\"a\":1}\r\rdata: [DONE]\r\r";
        for input in [lf, crlf, cr] {
            for piece in 1..=input.len() {
                assert_eq!(
                    decode_in_pieces(input.as_bytes(), piece),
                    vec!["{\"a\":1}".to_string(), "[DONE]".to_string()],
                    "input {input:?} in pieces of {piece}"
                );
            }
        }
    }

    #[test]
    fn comments_other_fields_and_multiline_data() {
        let input = ": keep-alive\n\nevent: message\nid: 7\ndata: first\ndata:second\n\n";
        assert_eq!(
            decode_in_pieces(input.as_bytes(), 3),
            vec!["first\nsecond".to_string()]
        );
    }

    #[test]
    fn an_unfinished_event_is_not_emitted() {
        let mut decoder = SseDecoder::new();
        assert!(decoder.push(b"data: partial\n").unwrap().is_empty());
    }

    #[test]
    fn multibyte_text_split_mid_character() {
        let input = "data: {\"t\":\"héllo ✓\"}\n\n".as_bytes();
        assert_eq!(
            decode_in_pieces(input, 1),
            vec!["{\"t\":\"héllo ✓\"}".to_string()]
        );
    }

    #[test]
    fn overlong_lines_are_refused() {
        let mut decoder = SseDecoder::new();
        let big = vec![b'x'; MAX_LINE_BYTES + 1];
        assert_eq!(decoder.push(&big), Err(SseError::LineTooLong));
    }

    #[test]
    fn classifies_chat_completion_usage_and_error_chunks() {
        assert_eq!(parse_stream_item("[DONE]"), Ok(StreamItem::Done));
        let role = r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#;
        assert_eq!(
            parse_stream_item(role),
            Ok(StreamItem::Chunk(ChunkInfo::default()))
        );
        let chat = r#"{"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}"#;
        let StreamItem::Chunk(info) = parse_stream_item(chat).unwrap() else {
            panic!("not a chunk")
        };
        assert_eq!(info.content, "hi");
        let completion = r#"{"choices":[{"index":0,"text":" there","finish_reason":"length"}]}"#;
        let StreamItem::Chunk(info) = parse_stream_item(completion).unwrap() else {
            panic!("not a chunk")
        };
        assert_eq!(info.content, " there");
        assert_eq!(info.finish_reason.as_deref(), Some("length"));
        let usage =
            r#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":9,"total_tokens":14}}"#;
        let StreamItem::Chunk(info) = parse_stream_item(usage).unwrap() else {
            panic!("not a chunk")
        };
        assert_eq!(info.prompt_tokens, Some(5));
        assert_eq!(info.completion_tokens, Some(9));
        assert!(info.content.is_empty());
        let error = r#"{"error":{"message":"boom","type":"server_error"}}"#;
        let StreamItem::Chunk(info) = parse_stream_item(error).unwrap() else {
            panic!("not a chunk")
        };
        assert_eq!(info.error.as_deref(), Some("boom"));
        assert!(matches!(
            parse_stream_item("{not json"),
            Err(SseError::BadJson(_))
        ));
    }
}
