//! The migration shell: one request's stream that survives its worker. It opens the request
//! through the [`Dispatcher`], passes each output on, and when the worker's stream ends
//! short of a finish (lost connection, nothing for the liveness timeout, released by a
//! draining worker) it asks the pure [`Progress`] what next and re-issues the continuation
//! to another worker. Before the first token the same path retries instead of failing
//! while a worker remains.
//!
//! A stream silent for the liveness timeout is checked with the router
//! (`RouterRequest::Stalled`): when the worker's load reports stopped too (or the silence is
//! past the slow bound) it is stalled, left out of routing until its load reports show progress again,
//! and the request migrates, unless no other worker is routable: then the stream keeps
//! waiting, up to the slow bound, since moving it could only fail it; a lost one is quarantined
//! (`RouterRequest::Unreachable`); one whose lease expires (it leaves the dispatcher's
//! members) has its streams migrated at once. The liveness timer runs on the dispatcher's clock, so
//! the simulator's virtual clock drives it too.

use super::dispatch::{DispatchError, DispatchRequest, Dispatched, Dispatcher};
use super::hints::{HintOutcome, RoutingHints};
use super::migration::{Interruption, MigrationConfig, Next, Progress};
use super::service::RouterRequest;
use crate::ids::{RequestId, WorkerId};
use crate::protocol::{EngineError, FinishReason, TokenOutput};
use crate::worker::service::WorkerReply;
use std::sync::Arc;
use std::time::Duration;

/// A request's token stream across workers. Dropping it cancels the request.
pub struct MigratingStream {
    dispatcher: Arc<Dispatcher>,
    cfg: MigrationConfig,
    id: RequestId,
    progress: Progress,
    /// The worker stream now open (`None` between a failure and the re-issue).
    current: Option<Attempt>,
    /// Workers this request ran on, in order.
    workers: Vec<WorkerId>,
    /// Why the last attempt ended, while no attempt is open.
    pending: Option<Interruption>,
    /// Workers a re-issue must not go to: every one an attempt of this request ended short
    /// on (lost, stalled, released) or could not reach. The router learns of a crash only
    /// when the lease expires or a loss is reported, and two workers may die at once: a
    /// continuation routed back to one of them would spend a migration for nothing.
    avoid: Vec<WorkerId>,
    done: bool,
}

struct Attempt {
    stream: Dispatched,
    /// Whether this worker produced anything yet.
    produced: bool,
}

impl MigratingStream {
    /// Opens `req` under a fresh id, retrying a lost worker before the first token. Fails
    /// only when the request is refused, or no worker is left (or the limit is reached).
    pub async fn open(
        dispatcher: Arc<Dispatcher>,
        req: DispatchRequest,
    ) -> Result<MigratingStream, EngineError> {
        MigratingStream::open_hinted(dispatcher, req, RoutingHints::default()).await
    }

    /// [`MigratingStream::open`] whose first attempt follows a gateway's routing `hints`
    /// ([`Dispatcher::dispatch_hinted`]); retries and migrations are routed here.
    pub async fn open_hinted(
        dispatcher: Arc<Dispatcher>,
        req: DispatchRequest,
        hints: RoutingHints,
    ) -> Result<MigratingStream, EngineError> {
        let cfg = dispatcher.migration().clone();
        let id = dispatcher.next_request_id();
        let mut stream = MigratingStream {
            dispatcher,
            cfg,
            id,
            progress: Progress::new(req),
            current: None,
            workers: Vec::new(),
            pending: None,
            avoid: Vec::new(),
            done: false,
        };
        let mut req = stream.progress.request();
        let mut hints = Some(hints);
        loop {
            let attempt = match hints.take() {
                Some(h) => stream.dispatcher.dispatch_hinted(id, req, h).await,
                None => {
                    let avoid = stream.avoid.clone();
                    stream.dispatcher.dispatch_avoiding(id, req, avoid).await
                }
            };
            match attempt {
                Ok(d) => {
                    stream.start(d);
                    return Ok(stream);
                }
                Err(e) => {
                    stream.avoid_unreachable(&e);
                    match stream.progress.decide(&stream.cfg, interruption_of(e)) {
                        Next::Reissue(next) => req = next,
                        Next::Fail(e) => return Err(e),
                        Next::Finish(_) => {
                            return Err(EngineError::Internal(
                                "a request with nothing generated cannot be finished".into(),
                            ))
                        }
                    }
                }
            }
        }
    }

    /// The request's id (the same on every worker it runs on).
    pub fn id(&self) -> RequestId {
        self.id
    }

    /// The worker serving it now (the last one, once it ended).
    pub fn worker(&self) -> Option<WorkerId> {
        self.workers.last().copied()
    }

    /// The workers it ran on, in order (more than one: it migrated).
    pub fn workers(&self) -> &[WorkerId] {
        &self.workers
    }

    /// Times it was re-issued.
    pub fn migrations(&self) -> u32 {
        self.progress.migrations()
    }

    /// Keeps a worker the dispatch could not reach out of this request's re-issues.
    fn avoid_unreachable(&mut self, e: &DispatchError) {
        if let DispatchError::Unreachable { worker, .. } = e {
            self.avoid(*worker);
        }
    }

    fn avoid(&mut self, worker: WorkerId) {
        if !self.avoid.contains(&worker) {
            self.avoid.push(worker);
        }
    }

    fn start(&mut self, stream: Dispatched) {
        self.workers.push(stream.worker);
        self.current = Some(Attempt {
            stream,
            produced: false,
        });
    }

    /// The next output for the client; `None` after the finish (or the error).
    pub async fn next_output(&mut self) -> Option<Result<TokenOutput, EngineError>> {
        if self.done {
            return None;
        }
        loop {
            let why = match self.current.take() {
                Some(mut attempt) => {
                    match next_of(
                        &mut attempt,
                        &self.dispatcher,
                        &self.cfg,
                        self.id,
                        &self.avoid,
                    )
                    .await
                    {
                        Step::Output(mut out) => {
                            if self.progress.migrations() > 0 {
                                // A continuation's prefix-cache hit is not the client's
                                // prompt's.
                                out.cached_tokens = None;
                            }
                            self.progress.record(&out);
                            self.done = out.finish.is_some();
                            self.current = Some(attempt);
                            return Some(Ok(out));
                        }
                        Step::Released(out) => {
                            // Tokens that came with the release still reach the client;
                            // the next call re-issues.
                            self.avoid(attempt.stream.worker);
                            self.progress.record(&out);
                            self.pending = Some(Interruption::Released);
                            return Some(Ok(out));
                        }
                        // Dropping the attempt here tells the router the request ended on
                        // that worker before the continuation is routed under the same id.
                        Step::Interrupted(why) => {
                            self.avoid(attempt.stream.worker);
                            if attempt.stream.hinted {
                                self.dispatcher.count_hint(HintOutcome::Unreachable);
                            }
                            why
                        }
                    }
                }
                None => self.pending.take().unwrap_or(Interruption::Released),
            };
            match self.progress.decide(&self.cfg, why) {
                Next::Reissue(req) => {
                    tracing::info!(
                        request = %self.id,
                        from = ?self.worker(),
                        generated = self.progress.generated().len(),
                        "migrating request"
                    );
                    let avoid = self.avoid.clone();
                    match self.dispatcher.dispatch_avoiding(self.id, req, avoid).await {
                        Ok(d) => self.start(d),
                        Err(e) => {
                            self.avoid_unreachable(&e);
                            self.pending = Some(interruption_of(e));
                        }
                    }
                }
                Next::Finish(out) => {
                    self.done = true;
                    return Some(Ok(out));
                }
                Next::Fail(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
    }
}

/// What one read of an attempt gave.
enum Step {
    /// An output for the client (with its finish, if it is the last).
    Output(TokenOutput),
    /// The worker released the request (draining); these tokens (maybe none) came first.
    Released(TokenOutput),
    /// The attempt ended short of a finish.
    Interrupted(Interruption),
}

/// Reads the next item of `attempt`, bounded by the liveness timeout.
async fn next_of(
    attempt: &mut Attempt,
    dispatcher: &Dispatcher,
    cfg: &MigrationConfig,
    id: RequestId,
    avoid: &[WorkerId],
) -> Step {
    let worker = attempt.stream.worker;
    let timeout = cfg.liveness_timeout();
    let mut quiet = Duration::ZERO;
    let item = loop {
        tokio::select! {
            item = attempt.stream.next_reply() => break item,
            _ = dispatcher.clock().sleep(timeout) => {}
            // Its lease expired (or it left) with this stream open: nothing more will come.
            _ = dispatcher.departed(worker) => {
                return Step::Interrupted(Interruption::Lost(format!(
                    "worker {worker} left the cluster"
                )))
            }
        }
        quiet += timeout;
        tracing::debug!(request = %id, %worker, ?quiet, "no output yet; asking whether the worker is stalled");
        // Silent this long: stalled if its load reports stopped too, or past the bound.
        let past_bound = cfg.past_slow_bound(quiet);
        if attempt.stream.is_stalled(quiet, past_bound).await {
            // A stall is a suspicion (an overloaded machine goes quiet too); moving the
            // request is worth it only where another worker could take it. Without one,
            // failing it would turn a slow answer into an error: wait, up to the bound. The
            // workers this request must avoid could not take it either.
            if !past_bound && !dispatcher.any_routable_besides(avoid).await {
                tracing::warn!(request = %id, %worker, "no output for {quiet:?} and the worker looks stalled, but no other worker could take the request: waiting");
                continue;
            }
            tracing::warn!(request = %id, %worker, "no output for {quiet:?}: the worker is stalled");
            return Step::Interrupted(Interruption::Stalled(quiet));
        }
    };
    let item = match item {
        None => {
            return Step::Interrupted(Interruption::Lost(
                "the worker's stream ended without a finish".into(),
            ))
        }
        Some(item) => item,
    };
    let mut out = match item {
        Ok(WorkerReply::Token(out)) => out,
        Ok(WorkerReply::Stats(_) | WorkerReply::Kv(_) | WorkerReply::Import(_)) => {
            return Step::Interrupted(Interruption::Failed(
                "worker sent something other than a token on a stream".into(),
            ))
        }
        Err(e) => {
            return Step::Interrupted(match Interruption::of_call_error(&e) {
                // A handler error after outputs is no admission refusal.
                Interruption::Refused(msg) if attempt.produced => {
                    Interruption::Failed(format!("worker: {msg}"))
                }
                why => why,
            });
        }
    };
    attempt.produced = true;
    if std::mem::take(&mut attempt.stream.hinted) {
        dispatcher.count_hint(HintOutcome::Followed);
    }
    if out.finish == Some(FinishReason::Migrate) {
        // Draining: keep routing away from it until discovery drops it.
        attempt.stream.report(RouterRequest::Unreachable(worker));
        out.finish = None;
        if out.token_ids.is_empty() {
            return Step::Interrupted(Interruption::Released);
        }
        return Step::Released(out);
    }
    Step::Output(out)
}

/// The migration policy's view of a failed dispatch.
fn interruption_of(e: DispatchError) -> Interruption {
    match e {
        DispatchError::NoWorker(m) => Interruption::NoWorker(m),
        e @ DispatchError::Router(_) => Interruption::NoWorker(e.to_string()),
        e @ DispatchError::Unreachable { .. } => Interruption::Lost(e.to_string()),
        DispatchError::Refused(m) => Interruption::Refused(m),
        DispatchError::Internal(m) => Interruption::Failed(m),
    }
}
