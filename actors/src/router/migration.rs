//! Migration policy: what to do when a request's stream on a worker stops short of a finish.
//!
//! The frontend keeps the tokens streamed so far ([`Progress`]). When the worker's
//! connection is lost, its stream stalls past the liveness timeout, or the worker releases
//! the request (draining), the request is re-issued to another worker as a continuation:
//! prompt + generated tokens, the remaining `max_tokens` budget, the same request id and
//! seed, and the sample index continuing where it stopped (`generated_before`), so a greedy
//! or seeded request produces the text it would have produced without the fault. The client
//! sees one stream: every token once, in order.
//!
//! Pure: no clock, no I/O. The shell is [`super::migrating::MigratingStream`], which feeds
//! it the outputs and the interruptions it observes and carries out the [`Next`] step.

use super::dispatch::DispatchRequest;
use crate::ids::TokenId;
use crate::protocol::{EngineError, FinishReason, TokenOutput};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use turbine_runtime::CallError;

/// Migration settings, under `migration:` in the cluster file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MigrationConfig {
    /// How many times one request may be re-issued to another worker (its worker died,
    /// stalled or drained; or it could not be reached before the first token). 0 disables
    /// migration: an interrupted stream fails.
    pub migration_limit: u32,
    /// A worker stream that delivers nothing for this long while its worker has not
    /// reported its load in that time either (frozen, partitioned) is declared stalled: the
    /// worker is left out of routing until its load reports show its engine moving again, and
    /// the request migrates. A worker that keeps reporting, leaves the stream silent for
    /// [`SLOW_BOUND_FACTOR`] times this long, and whose reports show no engine step in that
    /// time (its engine stuck, or so overloaded that a step takes that long) is treated the
    /// same. One whose engine keeps stepping is busy, and keeps the stream.
    pub liveness_timeout_ms: u64,
}

impl Default for MigrationConfig {
    fn default() -> Self {
        MigrationConfig {
            migration_limit: 3,
            liveness_timeout_ms: 15_000,
        }
    }
}

/// How many liveness timeouts a stream may stay silent on a worker that still reports its
/// load before it migrates, if the worker's engine made no step in that time either.
pub const SLOW_BOUND_FACTOR: u32 = 4;

impl MigrationConfig {
    pub fn liveness_timeout(&self) -> Duration {
        Duration::from_millis(self.liveness_timeout_ms)
    }

    /// Whether a stream silent for `quiet` is past the bound even on a live worker.
    pub fn past_slow_bound(&self, quiet: Duration) -> bool {
        quiet >= self.liveness_timeout() * SLOW_BOUND_FACTOR
    }

    /// Rejects a zero liveness timeout (every stream would stall at once).
    pub fn validate(&self) -> Result<(), String> {
        if self.liveness_timeout_ms == 0 {
            return Err("migration.liveness_timeout_ms must be > 0".into());
        }
        Ok(())
    }
}

/// Why a request's stream on a worker ended without a finish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Interruption {
    /// No worker (or no router) to route to: nothing is left to retry on.
    NoWorker(String),
    /// The worker could not be reached or its connection was lost (crash, partition,
    /// lease expired, left between the routing decision and the stream's opening).
    Lost(String),
    /// Nothing arrived within the liveness timeout (frozen, partitioned, overloaded).
    Stalled(Duration),
    /// The worker gave the request up (it is draining or stopping).
    Released,
    /// The worker refused the request at admission (too long for its pool, ...).
    Refused(String),
    /// Anything else: a failure that another worker would repeat.
    Failed(String),
}

impl Interruption {
    /// Classes a request-plane error on a worker stream.
    pub fn of_call_error(e: &CallError) -> Interruption {
        match e {
            CallError::PeerGone(_)
            | CallError::Transport(_)
            | CallError::Timeout(_)
            | CallError::ActorFailed(_)
            | CallError::UnknownActor(_) => Interruption::Lost(format!("worker: {e}")),
            CallError::Handler(msg) => Interruption::Refused(msg.clone()),
            CallError::TypeMismatch(_)
            | CallError::BadRequest(_)
            | CallError::Unsupported(_)
            | CallError::Codec(_) => Interruption::Failed(format!("worker: {e}")),
        }
    }
}

/// The step after an interruption.
#[derive(Clone, Debug, PartialEq)]
pub enum Next {
    /// Dispatch this continuation (same request id) to a worker.
    Reissue(DispatchRequest),
    /// The budget was already spent: end the stream with this output.
    Finish(TokenOutput),
    /// End the stream with this error.
    Fail(EngineError),
}

/// One request's progress across workers: the original request and the tokens the client
/// has received.
#[derive(Clone, Debug)]
pub struct Progress {
    original: DispatchRequest,
    generated: Vec<TokenId>,
    migrations: u32,
    finished: bool,
}

impl Progress {
    pub fn new(original: DispatchRequest) -> Progress {
        Progress {
            original,
            generated: Vec::new(),
            migrations: 0,
            finished: false,
        }
    }

    /// The request to send now: the original, or its continuation after tokens arrived.
    pub fn request(&self) -> DispatchRequest {
        let mut req = self.original.clone();
        if self.generated.is_empty() {
            return req;
        }
        req.token_ids.extend_from_slice(&self.generated);
        let done = self.generated.len() as u32;
        req.stop.max_tokens = req.stop.max_tokens.saturating_sub(done);
        req.generated_before = self.original.generated_before + done;
        // The client has the prompt's logprobs already (they came with the first token).
        req.sampling.prompt_logprobs = None;
        req
    }

    /// Records an output the client is about to receive.
    pub fn record(&mut self, out: &TokenOutput) {
        self.generated.extend_from_slice(&out.token_ids);
        if out.finish.is_some() {
            self.finished = true;
        }
    }

    /// Tokens the client has received.
    pub fn generated(&self) -> &[TokenId] {
        &self.generated
    }

    /// Times the request was re-issued so far.
    pub fn migrations(&self) -> u32 {
        self.migrations
    }

    /// Whether the client's stream has its finish.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Decides what follows `why` under `cfg`, counting a re-issue against the limit.
    pub fn decide(&mut self, cfg: &MigrationConfig, why: Interruption) -> Next {
        let started = !self.generated.is_empty();
        let retryable = match &why {
            Interruption::Lost(_) | Interruption::Stalled(_) | Interruption::Released => true,
            // Refused at admission on a first attempt: the request's fault. On a later
            // attempt the request was already accepted elsewhere, so it is the worker's
            // (a stale incarnation of this id, a smaller pool): try another.
            Interruption::Refused(_) => self.migrations > 0,
            Interruption::NoWorker(_) | Interruption::Failed(_) => false,
        };
        if retryable && self.migrations < cfg.migration_limit {
            if let Some(out) = self.already_done() {
                self.finished = true;
                return Next::Finish(out);
            }
            self.migrations += 1;
            return Next::Reissue(self.request());
        }
        Next::Fail(self.failure(why, started, retryable))
    }

    /// The finish to send when nothing is left to generate: the budget is spent, or the
    /// last token received is a stop token.
    fn already_done(&self) -> Option<TokenOutput> {
        let stop = &self.original.stop;
        let finish = match self.generated.last() {
            Some(t) if !stop.ignore_eos && stop.stop_token_ids.contains(t) => FinishReason::Stop,
            _ if self.generated.len() as u32 >= stop.max_tokens => FinishReason::Length,
            _ => return None,
        };
        Some(TokenOutput {
            token_ids: Vec::new(),
            logprobs: None,
            finish: Some(finish),
            cached_tokens: None,
            prompt_logprobs: None,
        })
    }

    fn failure(&self, why: Interruption, started: bool, retryable: bool) -> EngineError {
        let tried = if retryable && self.migrations > 0 {
            format!(" (after {} migration(s))", self.migrations)
        } else {
            String::new()
        };
        match why {
            Interruption::Refused(msg) => EngineError::InvalidRequest(msg),
            Interruption::NoWorker(msg) if !started => EngineError::Overloaded(msg),
            Interruption::NoWorker(msg) => EngineError::Internal(format!(
                "the request's worker was lost and no worker is left to continue it: {msg}"
            )),
            Interruption::Lost(msg) if !started => {
                EngineError::Overloaded(format!("worker unavailable{tried}: {msg}"))
            }
            Interruption::Stalled(d) if !started => {
                EngineError::Overloaded(format!("no worker answered within {d:?}{tried}"))
            }
            Interruption::Released if !started => {
                EngineError::Overloaded(format!("the worker is draining{tried}"))
            }
            Interruption::Lost(msg) => EngineError::Internal(format!("{msg}{tried}")),
            Interruption::Stalled(d) => {
                EngineError::Internal(format!("the worker stalled for {d:?}{tried}"))
            }
            Interruption::Released => {
                EngineError::Internal(format!("the worker gave the request up{tried}"))
            }
            Interruption::Failed(msg) => EngineError::Internal(msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{SamplingParams, StopConditions};

    fn request(max_tokens: u32) -> DispatchRequest {
        DispatchRequest {
            token_ids: vec![1, 2, 3],
            sampling: SamplingParams::greedy(),
            stop: StopConditions {
                max_tokens,
                stop_token_ids: vec![2],
                ignore_eos: false,
            },
            logprobs: None,
            generated_before: 0,
            images: Vec::new(),
        }
    }

    fn tokens(ids: &[TokenId]) -> TokenOutput {
        TokenOutput {
            token_ids: ids.to_vec(),
            logprobs: None,
            finish: None,
            cached_tokens: None,
            prompt_logprobs: None,
        }
    }

    fn cfg(limit: u32) -> MigrationConfig {
        MigrationConfig {
            migration_limit: limit,
            ..MigrationConfig::default()
        }
    }

    #[test]
    fn a_continuation_carries_the_generated_tokens_and_the_rest_of_the_budget() {
        let mut p = Progress::new(request(10));
        p.record(&tokens(&[7, 8]));
        p.record(&tokens(&[9]));
        let Next::Reissue(next) = p.decide(&cfg(3), Interruption::Lost("gone".into())) else {
            panic!("expected a re-issue");
        };
        assert_eq!(next.token_ids, vec![1, 2, 3, 7, 8, 9]);
        assert_eq!(next.stop.max_tokens, 7);
        assert_eq!(next.generated_before, 3);
        assert_eq!(next.sampling, SamplingParams::greedy());
        assert_eq!(p.migrations(), 1);
        // A second migration continues from the original, not from the continuation.
        p.record(&tokens(&[10]));
        let Next::Reissue(next) = p.decide(&cfg(3), Interruption::Released) else {
            panic!("expected a re-issue");
        };
        assert_eq!(next.token_ids, vec![1, 2, 3, 7, 8, 9, 10]);
        assert_eq!(next.stop.max_tokens, 6);
        assert_eq!(next.generated_before, 4);
    }

    #[test]
    fn before_the_first_token_a_lost_worker_is_retried_with_the_original() {
        let mut p = Progress::new(request(10));
        let Next::Reissue(next) = p.decide(&cfg(3), Interruption::Lost("gone".into())) else {
            panic!("expected a re-issue");
        };
        assert_eq!(next.token_ids, request(10).token_ids);
        assert_eq!(next.stop.max_tokens, 10);
        assert_eq!(next.generated_before, 0);
    }

    #[test]
    fn the_limit_bounds_the_attempts_and_the_error_says_how_many() {
        let mut p = Progress::new(request(10));
        for _ in 0..2 {
            assert!(matches!(
                p.decide(&cfg(2), Interruption::Stalled(Duration::from_secs(1))),
                Next::Reissue(_)
            ));
        }
        match p.decide(&cfg(2), Interruption::Stalled(Duration::from_secs(1))) {
            Next::Fail(EngineError::Overloaded(msg)) => assert!(msg.contains("2 migration")),
            other => panic!("expected a 503, got {other:?}"),
        }
        let mut p = Progress::new(request(10));
        p.record(&tokens(&[5]));
        match p.decide(&cfg(0), Interruption::Lost("peer gone".into())) {
            Next::Fail(EngineError::Internal(msg)) => assert!(msg.contains("peer gone")),
            other => panic!("expected an internal error, got {other:?}"),
        }
    }

    #[test]
    fn no_worker_left_fails_at_once() {
        let mut p = Progress::new(request(10));
        assert!(matches!(
            p.decide(&cfg(3), Interruption::NoWorker("no worker".into())),
            Next::Fail(EngineError::Overloaded(_))
        ));
        p.record(&tokens(&[5]));
        assert!(matches!(
            p.decide(&cfg(3), Interruption::NoWorker("no worker".into())),
            Next::Fail(EngineError::Internal(_))
        ));
        assert_eq!(p.migrations(), 0);
    }

    #[test]
    fn a_refusal_is_the_requests_fault_only_on_the_first_attempt() {
        let mut p = Progress::new(request(10));
        assert!(matches!(
            p.decide(&cfg(3), Interruption::Refused("too long".into())),
            Next::Fail(EngineError::InvalidRequest(_))
        ));
        let mut p = Progress::new(request(10));
        assert!(matches!(
            p.decide(&cfg(3), Interruption::Lost("gone".into())),
            Next::Reissue(_)
        ));
        assert!(matches!(
            p.decide(&cfg(3), Interruption::Refused("duplicate".into())),
            Next::Reissue(_)
        ));
        assert!(matches!(
            p.decide(&cfg(3), Interruption::Failed("codec".into())),
            Next::Fail(EngineError::Internal(_))
        ));
    }

    #[test]
    fn a_spent_budget_or_a_stop_token_finishes_instead_of_migrating() {
        let mut p = Progress::new(request(2));
        p.record(&tokens(&[5, 6]));
        match p.decide(&cfg(3), Interruption::Lost("gone".into())) {
            Next::Finish(out) => assert_eq!(out.finish, Some(FinishReason::Length)),
            other => panic!("expected a finish, got {other:?}"),
        }
        assert!(p.is_finished());
        let mut p = Progress::new(request(10));
        p.record(&tokens(&[5, 2]));
        match p.decide(&cfg(3), Interruption::Released) {
            Next::Finish(out) => assert_eq!(out.finish, Some(FinishReason::Stop)),
            other => panic!("expected a finish, got {other:?}"),
        }
    }

    #[test]
    fn the_slow_bound_is_a_multiple_of_the_liveness_timeout() {
        let c = MigrationConfig {
            migration_limit: 3,
            liveness_timeout_ms: 1000,
        };
        assert!(!c.past_slow_bound(Duration::from_millis(3999)));
        assert!(c.past_slow_bound(Duration::from_secs(4)));
        assert!(MigrationConfig {
            liveness_timeout_ms: 0,
            ..c
        }
        .validate()
        .is_err());
    }

    #[test]
    fn call_errors_are_classed() {
        assert!(matches!(
            Interruption::of_call_error(&CallError::PeerGone("p".into())),
            Interruption::Lost(_)
        ));
        assert!(matches!(
            Interruption::of_call_error(&CallError::Handler("too long".into())),
            Interruption::Refused(_)
        ));
        assert!(matches!(
            Interruption::of_call_error(&CallError::Codec("bad".into())),
            Interruption::Failed(_)
        ));
    }
}
