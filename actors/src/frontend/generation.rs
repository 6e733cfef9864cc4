//! Drives one engine stream for the HTTP layer: applies stop strings, counts tokens,
//! records latency metrics, and turns [`Delta`]s into endpoint-neutral [`GenEvent`]s.
//!
//! WHY here and not in the engine: stop strings must be cut exactly even when the engine does
//! not support them, and stopping must cancel the engine. Dropping the engine stream is the
//! cancel signal, so the moment a stop string matches, the stream is dropped.

use super::engine::{Delta, DeltaStream, EngineError, TokenLogprobs, Usage};
use super::metrics::HttpMetrics;
use super::tools::ParsedCall;
use crate::preprocessor::stop::StopMatcher;
use crate::protocol::FinishReason;
use futures::StreamExt;
use std::collections::VecDeque;
use std::time::Instant;

/// Why a response ended, as OpenAI names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishKind {
    Stop,
    Length,
    /// The model called tools (set by the tool parser, never by the engine).
    ToolCalls,
}

impl FinishKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishKind::Stop => "stop",
            FinishKind::Length => "length",
            FinishKind::ToolCalls => "tool_calls",
        }
    }
}

/// What the HTTP layer renders, in order: any number of `Text` (and, with tools,
/// `ToolCall`), then exactly one of `Finished` or `Failed`.
#[derive(Clone, Debug, PartialEq)]
pub enum GenEvent {
    Text {
        text: String,
        logprobs: Vec<TokenLogprobs>,
    },
    /// A tool call found in the text (chat with tools); `index` counts the choice's calls.
    ToolCall {
        index: usize,
        id: String,
        call: ParsedCall,
    },
    Finished {
        reason: FinishKind,
        usage: Usage,
    },
    Failed(EngineError),
}

/// One request's generation, pulled event by event.
pub struct Generation {
    engine: Option<DeltaStream>,
    stop: StopMatcher,
    pending: VecDeque<GenEvent>,
    usage: Usage,
    counted_completion_tokens: u32,
    started: Instant,
    last_output_at: Option<Instant>,
    metrics: HttpMetrics,
    /// `echo`: the prompt's text, sent before the first delta's text (with the prompt's
    /// logprobs, which come with that delta, when they were asked for).
    echo: Option<String>,
}

impl Generation {
    pub fn new(
        engine: DeltaStream,
        stop: &[String],
        started: Instant,
        metrics: HttpMetrics,
    ) -> Self {
        Generation {
            engine: Some(engine),
            stop: StopMatcher::new(stop.iter().cloned()),
            pending: VecDeque::new(),
            usage: Usage::default(),
            counted_completion_tokens: 0,
            started,
            last_output_at: None,
            metrics,
            echo: None,
        }
    }

    /// Starts the choice's text with `echo` (completions' `echo`).
    pub fn with_echo(mut self, echo: Option<String>) -> Self {
        self.echo = echo;
        self
    }

    /// The next event, or `None` after the final `Finished`/`Failed`.
    pub async fn next(&mut self) -> Option<GenEvent> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(event);
            }
            let engine = self.engine.as_mut()?;
            match engine.next().await {
                Some(Ok(delta)) => self.on_delta(delta),
                Some(Err(err)) => self.end(GenEvent::Failed(err)),
                // An engine should always send a finish reason; treat a silent end as a
                // natural stop rather than losing the text already generated.
                None => self.finish(FinishKind::Stop),
            }
        }
    }

    fn on_delta(&mut self, mut delta: Delta) {
        if let Some(text) = self.echo.take() {
            let logprobs = delta.prompt_logprobs.take().unwrap_or_default();
            if !text.is_empty() || !logprobs.is_empty() {
                self.pending.push_back(GenEvent::Text { text, logprobs });
            }
        }
        if let Some(usage) = delta.usage {
            self.usage = usage;
        }
        let new_tokens = u32::try_from(delta.token_ids.len()).unwrap_or(u32::MAX);
        self.counted_completion_tokens = self.counted_completion_tokens.saturating_add(new_tokens);
        if new_tokens > 0 || !delta.text.is_empty() {
            self.observe_output();
        }
        let step = self.stop.push(&delta.text);
        let logprobs = delta.logprobs.unwrap_or_default();
        if !step.text.is_empty() || !logprobs.is_empty() {
            self.pending.push_back(GenEvent::Text {
                text: step.text,
                logprobs,
            });
        }
        if step.stopped {
            return self.end_with(FinishKind::Stop);
        }
        match delta.finish {
            None => {}
            Some(FinishReason::Stop) => self.finish(FinishKind::Stop),
            Some(FinishReason::Length) => self.finish(FinishKind::Length),
            Some(FinishReason::Cancelled) => self.end(GenEvent::Failed(EngineError::Internal(
                "the engine cancelled the request".to_string(),
            ))),
            Some(FinishReason::Error(message)) => {
                self.end(GenEvent::Failed(EngineError::Internal(message)))
            }
            // The migration shell continues a released request; one that still reaches
            // here was not migrated.
            Some(FinishReason::Migrate) => self.end(GenEvent::Failed(EngineError::Internal(
                "the worker gave the request up".to_string(),
            ))),
        }
    }

    fn observe_output(&mut self) {
        let now = Instant::now();
        match self.last_output_at {
            None => self
                .metrics
                .observe_time_to_first_token(now.duration_since(self.started)),
            Some(last) => self
                .metrics
                .observe_inter_token_latency(now.duration_since(last)),
        }
        self.last_output_at = Some(now);
    }

    /// The engine finished: release the held-back tail (it may still complete a stop string).
    fn finish(&mut self, reason: FinishKind) {
        let tail = self.stop.finish();
        if !tail.text.is_empty() {
            self.pending.push_back(GenEvent::Text {
                text: tail.text,
                logprobs: Vec::new(),
            });
        }
        let reason = if tail.stopped {
            FinishKind::Stop
        } else {
            reason
        };
        self.end_with(reason);
    }

    fn end_with(&mut self, reason: FinishKind) {
        let usage = self.final_usage();
        self.end(GenEvent::Finished { reason, usage });
    }

    /// Drops the engine stream (= cancels the request engine-side) and queues the last event.
    fn end(&mut self, last: GenEvent) {
        self.engine = None;
        self.pending.push_back(last);
    }

    /// Both counts are lower bounds of the truth (the engine's may lag after a stop-string
    /// cancel; ours misses engines that do not report token ids), so take the larger.
    fn final_usage(&self) -> Usage {
        Usage {
            completion_tokens: self
                .usage
                .completion_tokens
                .max(self.counted_completion_tokens),
            ..self.usage
        }
    }
}

impl Drop for Generation {
    /// Counted on drop so that requests cut short by a disconnect are counted too.
    fn drop(&mut self) {
        let usage = self.final_usage();
        self.metrics
            .add_prompt_tokens(u64::from(usage.prompt_tokens));
        self.metrics
            .add_completion_tokens(u64::from(usage.completion_tokens));
    }
}
