//! What the planner observes: one adjustment interval's requests, as the frontend saw them.
//!
//! [`LoadTap`] is a window the serving path writes into (an arrival with its prompt length,
//! a first token with its TTFT, a finished request with its output length and mean ITL)
//! and the planner drains once per interval ([`LoadTap::take`]) into [`IntervalMetrics`].
//! The frontend's side is [`MeteredEngine`], a [`ChatEngine`] around the pipeline; the
//! simulator's client writes the same calls on virtual time. Durations are passed in, so
//! the window itself reads no clock.
//!
//! The workers' side comes from their load reports ([`LoadTap::worker_load`], written by
//! whoever follows them: the router's [`crate::router::service::LoadWatcher`] for workers in
//! other processes, the in-process workers' stats for `turbine up`'s own): the mean decode
//! batch, and the requests waiting on each worker (the latest report of each; a worker that
//! left is forgotten, [`LoadTap::worker_left`]).

use super::core::{IntervalMetrics, Pressure};
use crate::frontend::engine::{ChatEngine, DeltaStream, GenerateRequest};
use crate::ids::WorkerId;
use crate::protocol::EngineError;
use crate::router::service::PoolRole;
use async_trait::async_trait;
use futures::StreamExt;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
struct Tap {
    window: Window,
    /// Requests waiting on each worker, from its latest report.
    waiting: BTreeMap<WorkerId, usize>,
    /// Requests producing output now (first output came, not finished), and the tokens
    /// they have produced so far: not a window, they span intervals.
    producing: u64,
    produced: f64,
}

#[derive(Default)]
struct Window {
    requests: u64,
    isl_sum: f64,
    isl_n: u64,
    /// Of `isl_sum`, the tokens the prefix cache served.
    cached_sum: f64,
    osl_sum: f64,
    osl_n: u64,
    ttft_sum: f64,
    ttft_n: u64,
    itl_sum: f64,
    itl_n: u64,
    batch_sum: f64,
    batch_n: u64,
}

fn mean(sum: f64, n: u64) -> Option<f64> {
    (n > 0).then(|| sum / n as f64)
}

/// One interval's observations, shared between the serving path and the planner.
#[derive(Clone, Default)]
pub struct LoadTap {
    tap: Arc<Mutex<Tap>>,
}

impl LoadTap {
    pub fn new() -> LoadTap {
        LoadTap::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut Window) -> T) -> T {
        self.with_tap(|t| f(&mut t.window))
    }

    fn with_tap<T>(&self, f: impl FnOnce(&mut Tap) -> T) -> T {
        // A poisoned window still holds counts worth keeping.
        f(&mut self.tap.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// A request arrived (counted even if it then fails: it was load).
    pub fn arrived(&self) {
        self.with(|w| w.requests += 1);
    }

    /// A request's prompt is `prompt_tokens` long, `cached_tokens` of them served from the
    /// prefix cache.
    pub fn prompt(&self, prompt_tokens: usize, cached_tokens: usize) {
        self.with(|w| {
            w.isl_sum += prompt_tokens as f64;
            w.isl_n += 1;
            w.cached_sum += cached_tokens.min(prompt_tokens) as f64;
        });
    }

    /// A request's first token came `ttft` after it arrived.
    pub fn first_token(&self, ttft: Duration) {
        self.with(|w| {
            w.ttft_sum += ttft.as_secs_f64();
            w.ttft_n += 1;
        });
    }

    /// A request produced `tokens` more output tokens; `first`: its first output.
    pub fn produced(&self, first: bool, tokens: usize) {
        self.with_tap(|t| {
            t.producing += u64::from(first);
            t.produced += tokens as f64;
        });
    }

    /// A request that had produced `tokens` (through [`LoadTap::produced`]) stopped.
    pub fn stopped_producing(&self, tokens: usize) {
        self.with_tap(|t| {
            t.producing = t.producing.saturating_sub(1);
            t.produced = (t.produced - tokens as f64).max(0.0);
        });
    }

    /// A request finished with `output_tokens`; `itl` is its mean gap between tokens
    /// (`None` with fewer than two tokens).
    pub fn finished(&self, output_tokens: usize, itl: Option<Duration>) {
        self.with(|w| {
            w.osl_sum += output_tokens as f64;
            w.osl_n += 1;
            if let Some(itl) = itl {
                w.itl_sum += itl.as_secs_f64();
                w.itl_n += 1;
            }
        });
    }

    /// A worker's load report: `running` sequences in its batch (a decode batch unless it is
    /// a prefill worker), `waiting` requests not yet admitted.
    pub fn worker_load(&self, worker: WorkerId, role: PoolRole, running: usize, waiting: usize) {
        self.with_tap(|t| {
            if role == PoolRole::Decode && running > 0 {
                t.window.batch_sum += running as f64;
                t.window.batch_n += 1;
            }
            t.waiting.insert(worker, waiting);
        });
    }

    /// The worker left: its last report no longer counts.
    pub fn worker_left(&self, worker: WorkerId) {
        self.with_tap(|t| t.waiting.remove(&worker));
    }

    /// Requests waiting on the workers now (`None` before any report).
    pub fn queued(&self) -> Option<u64> {
        self.with_tap(|t| {
            (!t.waiting.is_empty()).then(|| t.waiting.values().map(|&n| n as u64).sum())
        })
    }

    /// What the planner reacts to between two intervals: the arrivals so far this interval
    /// (and the lengths and cache hits seen so far), and the requests waiting now. The
    /// output length is the finished requests' mean; before any finished this interval,
    /// the mean of the tokens the requests producing now have so far (a lower bound of
    /// their OSL).
    pub fn pressure(&self) -> Pressure {
        let (arrivals, mean_isl, mean_osl, cached_fraction) = self.with_tap(|t| {
            let w = &t.window;
            (
                w.requests,
                mean(w.isl_sum, w.isl_n),
                mean(w.osl_sum, w.osl_n).or(mean(t.produced, t.producing)),
                (w.isl_sum > 0.0).then(|| w.cached_sum / w.isl_sum),
            )
        });
        Pressure {
            arrivals,
            queued: self.queued(),
            mean_isl,
            mean_osl,
            cached_fraction,
        }
    }

    /// The interval so far, and a fresh window for the next one.
    pub fn take(&self) -> IntervalMetrics {
        let queued = self.queued();
        let w = self.with(std::mem::take);
        IntervalMetrics {
            requests: w.requests,
            mean_isl: mean(w.isl_sum, w.isl_n),
            mean_osl: mean(w.osl_sum, w.osl_n),
            mean_ttft_s: mean(w.ttft_sum, w.ttft_n),
            mean_itl_s: mean(w.itl_sum, w.itl_n),
            mean_decode_batch: mean(w.batch_sum, w.batch_n),
            queued,
            cached_fraction: (w.isl_sum > 0.0).then(|| w.cached_sum / w.isl_sum),
        }
    }
}

/// The frontend's engine with every request's arrival, TTFT, ITL and output length written
/// into a [`LoadTap`]. Prompt length is the engine's own count (the first delta's usage).
/// A request that fails before its first token counts as an arrival only.
pub struct MeteredEngine {
    inner: Arc<dyn ChatEngine>,
    tap: LoadTap,
}

impl MeteredEngine {
    pub fn new(inner: Arc<dyn ChatEngine>, tap: LoadTap) -> MeteredEngine {
        MeteredEngine { inner, tap }
    }
}

/// Per-request timing as its deltas pass.
struct Timing {
    tap: LoadTap,
    arrived: Instant,
    first: Option<Instant>,
    last: Option<Instant>,
    tokens: usize,
    counted_prompt: bool,
    done: bool,
}

impl Timing {
    fn finish(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        let itl = match (self.first, self.last) {
            (Some(f), Some(l)) if self.tokens > 1 => {
                Some(l.duration_since(f) / (self.tokens as u32 - 1))
            }
            _ => None,
        };
        if self.first.is_some() {
            self.tap.stopped_producing(self.tokens);
        }
        self.tap.finished(self.tokens, itl);
    }
}

impl Drop for Timing {
    /// A stream dropped early (client gone, stop string) still ends its request.
    fn drop(&mut self) {
        if self.first.is_some() {
            self.finish();
        }
    }
}

#[async_trait]
impl ChatEngine for MeteredEngine {
    fn model_id(&self) -> &str {
        self.inner.model_id()
    }

    fn context_length(&self) -> usize {
        self.inner.context_length()
    }

    fn tokenize(
        &self,
        prompt: &crate::frontend::Prompt,
        add_special: bool,
    ) -> Result<Vec<u32>, EngineError> {
        self.inner.tokenize(prompt, add_special)
    }

    fn detokenize(&self, ids: &[u32]) -> Result<String, EngineError> {
        self.inner.detokenize(ids)
    }

    async fn generate(&self, req: GenerateRequest) -> Result<DeltaStream, EngineError> {
        let arrived = Instant::now();
        self.tap.arrived();
        let stream = self.inner.generate(req).await?;
        let mut timing = Timing {
            tap: self.tap.clone(),
            arrived,
            first: None,
            last: None,
            tokens: 0,
            counted_prompt: false,
            done: false,
        };
        Ok(stream
            .map(move |item| {
                if let Ok(delta) = &item {
                    let now = Instant::now();
                    if !timing.counted_prompt {
                        if let Some(u) = delta.usage {
                            timing
                                .tap
                                .prompt(u.prompt_tokens as usize, u.cached_tokens as usize);
                            timing.counted_prompt = true;
                        }
                    }
                    if !delta.token_ids.is_empty() {
                        let first = timing.first.is_none();
                        if first {
                            timing.first = Some(now);
                            timing.tap.first_token(now.duration_since(timing.arrived));
                        }
                        timing.last = Some(now);
                        timing.tokens += delta.token_ids.len();
                        timing.tap.produced(first, delta.token_ids.len());
                    }
                    if delta.finish.is_some() {
                        timing.finish();
                    }
                }
                item
            })
            .boxed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_averages_and_resets() {
        let tap = LoadTap::new();
        tap.arrived();
        tap.prompt(100, 0);
        tap.arrived();
        tap.prompt(300, 200);
        tap.first_token(Duration::from_millis(200));
        tap.finished(10, Some(Duration::from_millis(20)));
        tap.finished(1, None);
        let m = tap.take();
        assert_eq!(m.requests, 2);
        assert_eq!(m.mean_isl, Some(200.0));
        assert_eq!(m.mean_osl, Some(5.5));
        assert_eq!(m.mean_ttft_s, Some(0.2));
        assert_eq!(m.mean_itl_s, Some(0.02));
        assert_eq!(m.mean_decode_batch, None);
        assert_eq!(m.queued, None);
        assert_eq!(m.cached_fraction, Some(0.5), "200 of 400 prompt tokens");
        assert_eq!(tap.take(), IntervalMetrics::default());
    }

    #[test]
    fn the_pressure_knows_a_lower_bound_of_the_output_length_before_anything_finished() {
        let tap = LoadTap::new();
        assert_eq!(tap.pressure().mean_osl, None);
        // Two requests producing: 3 and 1 tokens so far.
        tap.produced(true, 2);
        tap.produced(true, 1);
        tap.produced(false, 1);
        assert_eq!(tap.pressure().mean_osl, Some(2.0));
        // The first finishes with 10: a finished length is the better estimate.
        tap.produced(false, 7);
        tap.stopped_producing(10);
        tap.finished(10, None);
        assert_eq!(tap.pressure().mean_osl, Some(10.0));
        // The interval's end takes the finished one; the producing one stays, with its 1.
        assert_eq!(tap.take().mean_osl, Some(10.0));
        assert_eq!(tap.pressure().mean_osl, Some(1.0));
        tap.stopped_producing(1);
        assert_eq!(tap.pressure().mean_osl, None);
    }

    #[test]
    fn load_reports_give_the_decode_batch_and_the_queue_of_the_workers_still_there() {
        let tap = LoadTap::new();
        tap.worker_load(WorkerId(1), PoolRole::Decode, 4, 2);
        tap.worker_load(WorkerId(2), PoolRole::Decode, 2, 0);
        // A prefill worker's batch is prompts: it is not a decode batch, but its queue counts.
        tap.worker_load(WorkerId(3), PoolRole::Prefill, 6, 5);
        tap.worker_load(WorkerId(1), PoolRole::Decode, 6, 3);
        tap.arrived();
        assert_eq!(
            tap.pressure(),
            Pressure {
                arrivals: 1,
                queued: Some(8),
                mean_isl: None,
                mean_osl: None,
                cached_fraction: None,
            }
        );
        tap.worker_left(WorkerId(3));
        let m = tap.take();
        assert_eq!(m.mean_decode_batch, Some(4.0));
        assert_eq!(
            m.queued,
            Some(3),
            "the latest report of each worker still there"
        );
        // The queue is a level, not a count per interval: it stays until reports change it.
        assert_eq!(tap.take().queued, Some(3));
        assert_eq!(tap.take().mean_decode_batch, None);
    }
}
