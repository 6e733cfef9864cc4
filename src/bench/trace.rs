//! Per-request accounting: turns the timed items of one streamed response into the
//! request's TTFT, inter-token latencies, end-to-end latency, token counts and error.
//!
//! Pure: callers pass the instants at which bytes arrived, so tests can feed made-up times.

use super::sse::StreamItem;
use std::time::{Duration, Instant};

/// What one request measured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestOutcome {
    /// Send -> first chunk with non-empty content.
    pub ttft: Option<Duration>,
    /// Gaps between consecutive chunks with non-empty content.
    pub inter_token: Vec<Duration>,
    /// Send -> end of the response.
    pub e2e: Duration,
    /// From the server's `usage` when it sent one, else the number of content chunks.
    pub output_tokens: u64,
    pub tokens_from_usage: bool,
    pub prompt_tokens: Option<u64>,
    pub finish_reason: Option<String>,
    /// Why the request failed; `None` for a success.
    pub error: Option<String>,
}

impl RequestOutcome {
    /// A request that failed before any stream was read (connection, HTTP status, timeout).
    pub fn failed(sent: Instant, end: Instant, error: String) -> Self {
        RequestOutcome {
            ttft: None,
            inter_token: Vec::new(),
            e2e: end.saturating_duration_since(sent),
            output_tokens: 0,
            tokens_from_usage: false,
            prompt_tokens: None,
            finish_reason: None,
            error: Some(error),
        }
    }

    pub fn is_ok(&self) -> bool {
        self.error.is_none()
    }
}

/// Accumulates one streamed response.
#[derive(Debug)]
pub struct RequestTrace {
    sent: Instant,
    first_content: Option<Instant>,
    last_content: Option<Instant>,
    inter_token: Vec<Duration>,
    content_chunks: u64,
    usage_tokens: Option<u64>,
    prompt_tokens: Option<u64>,
    finish_reason: Option<String>,
    error: Option<String>,
    done: bool,
}

impl RequestTrace {
    pub fn new(sent: Instant) -> Self {
        RequestTrace {
            sent,
            first_content: None,
            last_content: None,
            inter_token: Vec::new(),
            content_chunks: 0,
            usage_tokens: None,
            prompt_tokens: None,
            finish_reason: None,
            error: None,
            done: false,
        }
    }

    /// Records one item that arrived at `at`.
    pub fn on_item(&mut self, at: Instant, item: StreamItem) {
        let chunk = match item {
            StreamItem::Done => {
                self.done = true;
                return;
            }
            StreamItem::Chunk(chunk) => chunk,
        };
        if !chunk.content.is_empty() {
            self.content_chunks += 1;
            match self.last_content {
                None => self.first_content = Some(at),
                Some(previous) => self
                    .inter_token
                    .push(at.saturating_duration_since(previous)),
            }
            self.last_content = Some(at);
        }
        if chunk.finish_reason.is_some() {
            self.finish_reason = chunk.finish_reason;
        }
        if chunk.completion_tokens.is_some() {
            self.usage_tokens = chunk.completion_tokens;
        }
        if chunk.prompt_tokens.is_some() {
            self.prompt_tokens = chunk.prompt_tokens;
        }
        if let Some(error) = chunk.error {
            self.error.get_or_insert(error);
        }
    }

    /// Records a failure of the transport or the decoder (the first one wins).
    pub fn fail(&mut self, error: String) {
        self.error.get_or_insert(error);
    }

    /// Ends the request at `end`. A stream that stopped without `[DONE]` is an error.
    pub fn finish(mut self, end: Instant) -> RequestOutcome {
        if !self.done {
            self.error
                .get_or_insert_with(|| "stream ended without [DONE]".to_string());
        }
        RequestOutcome {
            ttft: self
                .first_content
                .map(|t| t.saturating_duration_since(self.sent)),
            inter_token: self.inter_token,
            e2e: end.saturating_duration_since(self.sent),
            output_tokens: self.usage_tokens.unwrap_or(self.content_chunks),
            tokens_from_usage: self.usage_tokens.is_some(),
            prompt_tokens: self.prompt_tokens,
            finish_reason: self.finish_reason,
            error: self.error,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::sse::ChunkInfo;

    fn content(text: &str) -> StreamItem {
        StreamItem::Chunk(ChunkInfo {
            content: text.to_string(),
            ..ChunkInfo::default()
        })
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn ttft_itl_and_usage_tokens() {
        let t0 = Instant::now();
        let mut trace = RequestTrace::new(t0);
        trace.on_item(t0 + ms(5), content("")); // role chunk: not a token
        trace.on_item(t0 + ms(40), content("a"));
        trace.on_item(t0 + ms(50), content("b"));
        trace.on_item(t0 + ms(75), content("c"));
        trace.on_item(
            t0 + ms(76),
            StreamItem::Chunk(ChunkInfo {
                finish_reason: Some("length".into()),
                ..ChunkInfo::default()
            }),
        );
        trace.on_item(
            t0 + ms(77),
            StreamItem::Chunk(ChunkInfo {
                prompt_tokens: Some(12),
                completion_tokens: Some(4),
                ..ChunkInfo::default()
            }),
        );
        trace.on_item(t0 + ms(78), StreamItem::Done);
        let outcome = trace.finish(t0 + ms(80));
        assert!(outcome.is_ok());
        assert_eq!(outcome.ttft, Some(ms(40)));
        assert_eq!(outcome.inter_token, vec![ms(10), ms(25)]);
        assert_eq!(outcome.e2e, ms(80));
        assert_eq!(outcome.output_tokens, 4, "usage wins over the chunk count");
        assert!(outcome.tokens_from_usage);
        assert_eq!(outcome.prompt_tokens, Some(12));
        assert_eq!(outcome.finish_reason.as_deref(), Some("length"));
    }

    #[test]
    fn without_usage_tokens_are_counted_chunks() {
        let t0 = Instant::now();
        let mut trace = RequestTrace::new(t0);
        for i in 1..=3 {
            trace.on_item(t0 + ms(i), content("x"));
        }
        trace.on_item(t0 + ms(4), StreamItem::Done);
        let outcome = trace.finish(t0 + ms(4));
        assert_eq!(outcome.output_tokens, 3);
        assert!(!outcome.tokens_from_usage);
    }

    #[test]
    fn mid_stream_error_and_missing_done_are_errors() {
        let t0 = Instant::now();
        let mut trace = RequestTrace::new(t0);
        trace.on_item(t0 + ms(1), content("x"));
        trace.on_item(
            t0 + ms(2),
            StreamItem::Chunk(ChunkInfo {
                error: Some("boom".into()),
                ..ChunkInfo::default()
            }),
        );
        trace.on_item(t0 + ms(3), StreamItem::Done);
        assert_eq!(trace.finish(t0 + ms(3)).error.as_deref(), Some("boom"));

        let mut cut = RequestTrace::new(t0);
        cut.on_item(t0 + ms(1), content("x"));
        let outcome = cut.finish(t0 + ms(2));
        assert_eq!(
            outcome.error.as_deref(),
            Some("stream ended without [DONE]")
        );
        assert_eq!(outcome.ttft, Some(ms(1)));
    }
}
