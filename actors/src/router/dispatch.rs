//! The dispatcher: the frontend's side of routing. It gives each request an id, hashes its
//! token ids, asks the router ([`RouterService`], through an `Addr`: in this process or in a
//! router process) for a worker, and opens the request's token stream on that worker. It
//! tells the router when a request ends and when a worker could not be reached (the router
//! quarantines it, see [`super::kv_router::UNREACHABLE_QUARANTINE`]).
//!
//! It speaks token ids only, so the text [`crate::frontend::pipeline::Pipeline`] (templates,
//! tokenizer, detokenizer) and the simulator (which has no tokenizer) drive the same code.
//! Request ids come from a caller-chosen start, so on a paused-time runtime every decision
//! is a pure function of the inputs.

use super::hints::{HintMetrics, HintMode, HintOutcome, RoutingHints};
use super::kv_router::WorkerRouteCounts;
use super::migration::MigrationConfig;
use super::policy::{RouteDecision, RouteError, RouteOverrides, RouteRequest};
use super::service::{RouterReply, RouterRequest, RouterService};
use crate::disagg::flow::DisaggSettings;
use crate::disagg::metrics::DisaggMetrics;
use crate::disagg::policy::{PrefillDecision, PrefillPoolLoad};
use crate::disagg::route::{DisaggRoute, PrefillPlan};
use crate::ids::{RequestId, WorkerId};
use crate::kv::BlockSize;
use crate::protocol::EngineError;
use crate::protocol::{PreprocessedRequest, SamplingParams, StopConditions, TokenOutput};
use crate::worker::service::{WorkerReply, WorkerRequest, WorkerService};
use futures::StreamExt;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, RwLock};
use std::time::Duration;
use tracing::Instrument;
use turbine_runtime::{Addr, CallError, ReplyStream, SharedClock, TokioClock};

/// How long a readiness check waits for the router (a probe must answer promptly; a router
/// that cannot is itself a reason not to be ready).
const READINESS_TIMEOUT: Duration = Duration::from_secs(2);

/// How often a request held while every worker is busy asks the router again. Short next to
/// a decode step, so a freed slot is taken within a few milliseconds; each ask is one
/// router call, cheap next to the request it holds.
const QUEUE_RETRY: Duration = Duration::from_millis(5);

/// A request as the dispatcher takes it: prompt token ids and generation settings.
#[derive(Clone, Debug, PartialEq)]
pub struct DispatchRequest {
    pub token_ids: Vec<u32>,
    pub sampling: SamplingParams,
    pub stop: StopConditions,
    pub logprobs: Option<u32>,
    /// Tokens at the end of `token_ids` that earlier workers generated for this request (a
    /// migrated continuation, see [`super::migration`]); 0 for a new request.
    pub generated_before: u32,
    /// The prompt's images (placeholders, content hashes, the images themselves).
    pub images: Vec<crate::protocol::PromptImage>,
}

impl DispatchRequest {
    /// The prompt's block hashes, salted by its images (the worker hashes the same way).
    pub fn block_hashes(&self, block_size: BlockSize) -> Vec<crate::kv::BlockHash> {
        crate::protocol::image_salts(&self.images).hash_blocks(&self.token_ids, block_size, 0)
    }
}

/// Why a request could not be opened on a worker, in the terms the migration policy
/// needs ([`super::migration::Interruption`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DispatchError {
    /// No router, or no routable worker.
    #[error("{0}")]
    NoWorker(String),
    /// The router could not be asked.
    #[error("router unavailable: {0}")]
    Router(String),
    /// The chosen worker left before its stream opened, or could not be reached.
    #[error("worker {worker}: {reason}")]
    Unreachable { worker: WorkerId, reason: String },
    /// The chosen worker refused the request at admission.
    #[error("{0}")]
    Refused(String),
    /// A protocol failure.
    #[error("{0}")]
    Internal(String),
}

impl From<DispatchError> for EngineError {
    fn from(e: DispatchError) -> EngineError {
        match e {
            DispatchError::NoWorker(m) => EngineError::Overloaded(m),
            e @ (DispatchError::Router(_) | DispatchError::Unreachable { .. }) => {
                EngineError::Overloaded(e.to_string())
            }
            DispatchError::Refused(m) => EngineError::InvalidRequest(m),
            DispatchError::Internal(m) => EngineError::Internal(m),
        }
    }
}

/// The opening of a worker's stream that waits on something first (a disaggregated
/// request's decode worker, opened once the prefill worker's KV descriptor is in), running
/// on a task of its own from the start; aborted (so dropped, cancelling what it opened)
/// when the request is.
struct Opening(tokio::task::JoinHandle<Result<ReplyStream<WorkerReply>, CallError>>);

impl Drop for Opening {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The worker's stream of a [`Dispatched`]: open, or still opening.
enum Tokens {
    Open(ReplyStream<WorkerReply>),
    Opening(Opening),
    /// The opening failed (reported once, on the read that saw it).
    Failed,
}

/// A request under way on a worker. Dropping it cancels the request.
pub struct Dispatched {
    pub id: RequestId,
    /// The worker whose stream this is (a disaggregated request: the decode worker, also
    /// while its first token, from the prefill worker, is handed out).
    pub worker: WorkerId,
    tokens: Tokens,
    received: bool,
    /// A first token that arrived before the stream (from a prefill worker).
    first: Option<TokenOutput>,
    /// Where a decode worker's import report is counted (disaggregated serving).
    disagg: Option<DisaggMetrics>,
    /// Opened where a gateway's routing hints said: whether that holds is known once the
    /// worker produces (the migration shell counts it, see [`Dispatcher::dispatch_hinted`]).
    pub(crate) hinted: bool,
    _guard: RouteGuard,
}

impl Dispatched {
    /// The next output of the worker (see [`token_output`] for how failures are classed);
    /// `None` once the stream has ended. A lost connection to the worker is reported to
    /// the router, which leaves the worker out of routing for a while.
    pub async fn next_output(&mut self) -> Option<Result<TokenOutput, EngineError>> {
        let first = !self.received;
        let item = self.next_reply().await?;
        let out = token_output(item, first);
        if out.is_ok() {
            self.received = true;
        }
        Some(out)
    }

    /// The next raw item of the worker's stream (a prefill worker's first token first;
    /// import reports counted and skipped), for the migration shell, which classes failures
    /// itself; a lost connection is reported to the router as above.
    pub async fn next_reply(&mut self) -> Option<Result<WorkerReply, CallError>> {
        if let Some(first) = self.first.take() {
            // The first token came from a prefill worker, before this stream's outputs.
            self.received = true;
            return Some(Ok(WorkerReply::Token(first)));
        }
        if let Tokens::Opening(opening) = &mut self.tokens {
            // Cancel-safe: the opening lives in `self` until it resolves.
            let opened = (&mut opening.0).await.unwrap_or_else(|e| {
                Err(CallError::ActorFailed(format!("opening the stream: {e}")))
            });
            match opened {
                Ok(stream) => self.tokens = Tokens::Open(stream),
                Err(e) => {
                    self.tokens = Tokens::Failed;
                    if matches!(e, CallError::PeerGone(_) | CallError::Transport(_)) {
                        self.report(RouterRequest::Unreachable(self.worker));
                    }
                    return Some(Err(e));
                }
            }
        }
        let Tokens::Open(tokens) = &mut self.tokens else {
            return None;
        };
        let mut item = tokens.next().await?;
        while let Ok(WorkerReply::Import(outcome)) = &item {
            if let Some(m) = &self.disagg {
                crate::disagg::flow::count_import(m, outcome);
            }
            item = tokens.next().await?;
        }
        if matches!(item, Err(CallError::PeerGone(_) | CallError::Transport(_))) {
            self.report(RouterRequest::Unreachable(self.worker));
        }
        Some(item)
    }

    /// Tells the router something about this request's worker (unreachable, draining).
    pub fn report(&self, what: RouterRequest) {
        self._guard.router.cast(what);
    }

    /// Asks the router whether this request's worker, silent on this stream for `quiet`, is
    /// stalled (see `RouterRequest::Stalled`); an unreachable router counts as yes.
    pub async fn is_stalled(&self, quiet: Duration, force: bool) -> bool {
        let ask = RouterRequest::Stalled {
            worker: self.worker,
            quiet_for_ms: quiet.as_millis() as u64,
            force,
        };
        !matches!(
            self._guard.router.call(ask).await,
            Ok(RouterReply::Stalled(false))
        )
    }
}

/// What the frontend's queue of held requests counted (`router.busy_threshold`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Requests held now, waiting for a worker below the busy threshold.
    pub queued: u64,
    /// Requests that found every worker busy and were held (each counted once).
    pub all_busy: u64,
    /// Held requests refused once `router.queue_timeout_ms` was over.
    pub timeouts: u64,
}

#[derive(Debug, Default)]
struct QueueCounters {
    queued: AtomicU64,
    all_busy: AtomicU64,
    timeouts: AtomicU64,
}

/// One held request in [`QueueCounters::queued`], however its wait ends (routed, refused,
/// or the client went away and the dispatch was dropped).
struct Held<'a>(&'a QueueCounters);

impl<'a> Held<'a> {
    fn new(counters: &'a QueueCounters) -> Held<'a> {
        counters.queued.fetch_add(1, Ordering::Relaxed);
        counters.all_busy.fetch_add(1, Ordering::Relaxed);
        Held(counters)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Routes requests over the workers it knows, through a router it reaches by address.
pub struct Dispatcher {
    block_size: BlockSize,
    /// The router: in this process, or the router process discovery lists (`None` until
    /// one registered).
    router: RwLock<Option<Addr<RouterService>>>,
    workers: RwLock<BTreeMap<WorkerId, Addr<WorkerService>>>,
    next_request: AtomicU64,
    /// The decisions this frontend received, per worker (for `/metrics`: the router may
    /// be in another process).
    route_counts: Mutex<BTreeMap<WorkerId, WorkerRouteCounts>>,
    /// When to re-issue an interrupted request (see [`super::migration`]).
    migration: MigrationConfig,
    /// What the liveness timeout is measured on (the simulator's clock in the simulator).
    clock: SharedClock,
    /// Bumped whenever a worker is forgotten, so open streams on it migrate at once when
    /// its lease expires (see [`Dispatcher::departed`]).
    departures: tokio::sync::watch::Sender<u64>,
    /// Set when the cluster has prefill workers: requests go through
    /// [`crate::disagg::flow`].
    disagg: OnceLock<DisaggSettings>,
    /// Where what became of routing hints is counted (`/metrics`), once set.
    hint_metrics: OnceLock<HintMetrics>,
    /// Requests held while every worker is busy.
    queue: QueueCounters,
}

impl Dispatcher {
    /// A dispatcher with no workers yet; request ids count up from `first_request_id`.
    /// `router` is `None` when the router is found later ([`Dispatcher::set_router`]).
    pub fn new(
        block_size: BlockSize,
        router: Option<Addr<RouterService>>,
        first_request_id: u64,
    ) -> Dispatcher {
        Dispatcher {
            block_size,
            router: RwLock::new(router),
            workers: RwLock::new(BTreeMap::new()),
            next_request: AtomicU64::new(first_request_id),
            route_counts: Mutex::new(BTreeMap::new()),
            migration: MigrationConfig::default(),
            clock: TokioClock::shared(),
            departures: tokio::sync::watch::Sender::new(0),
            disagg: OnceLock::new(),
            hint_metrics: OnceLock::new(),
            queue: QueueCounters::default(),
        }
    }

    /// The queue of requests held while every worker is busy, for `/metrics`.
    pub fn queue_stats(&self) -> QueueStats {
        QueueStats {
            queued: self.queue.queued.load(Ordering::Relaxed),
            all_busy: self.queue.all_busy.load(Ordering::Relaxed),
            timeouts: self.queue.timeouts.load(Ordering::Relaxed),
        }
    }

    /// Counts what becomes of routing hints into `metrics` from now on (once).
    pub fn count_hints_into(&self, metrics: HintMetrics) {
        let _ = self.hint_metrics.set(metrics);
    }

    pub(crate) fn count_hint(&self, outcome: HintOutcome) {
        if let Some(m) = self.hint_metrics.get() {
            m.count(outcome);
        }
        if outcome != HintOutcome::Followed {
            tracing::info!(
                outcome = outcome.label(),
                "routing hint not followed; routing the request here"
            );
        }
    }

    /// Routes every request through the disaggregated flow from now on (once).
    pub fn enable_disaggregation(&self, settings: DisaggSettings) {
        let _ = self.disagg.set(settings);
    }

    /// `id`'s address, if this frontend can reach it.
    pub(crate) fn worker_addr(&self, id: WorkerId) -> Option<Addr<WorkerService>> {
        self.workers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
    }

    /// Counts a decision this frontend received, for `/metrics`.
    pub(crate) fn count_route(&self, decision: &super::policy::RouteDecision) {
        let mut counts = self.route_counts.lock().unwrap_or_else(|e| e.into_inner());
        let c = counts.entry(decision.worker).or_default();
        c.decisions += 1;
        c.overlap_blocks += u64::from(decision.overlap_blocks);
        c.request_blocks += u64::from(decision.request_blocks);
    }

    /// Opens `request`'s stream on `worker` (already routed, under `guard`); `first` is an
    /// output to hand out before the stream's.
    pub(crate) async fn open(
        &self,
        guard: RouteGuard,
        id: RequestId,
        worker: WorkerId,
        request: WorkerRequest,
        first: Option<TokenOutput>,
    ) -> Result<Dispatched, DispatchError> {
        let Some(addr) = self.worker_addr(worker) else {
            // Left between the decision and now (the router's membership feed will drop it
            // too): keep it out of routing until then, and let the client retry.
            guard.router.cast(RouterRequest::Unreachable(worker));
            return Err(DispatchError::Unreachable {
                worker,
                reason: "it has just left".into(),
            });
        };
        let tokens = match addr.stream(request).await {
            Ok(tokens) => tokens,
            Err(CallError::Handler(msg)) => return Err(DispatchError::Refused(msg)),
            Err(e) => {
                if matches!(e, CallError::PeerGone(_) | CallError::Transport(_)) {
                    guard.router.cast(RouterRequest::Unreachable(worker));
                }
                return Err(DispatchError::Unreachable {
                    worker,
                    reason: e.to_string(),
                });
            }
        };
        Ok(self.dispatched(guard, id, worker, tokens, first))
    }

    /// A request under way on `worker`'s stream `tokens`.
    pub(crate) fn dispatched(
        &self,
        guard: RouteGuard,
        id: RequestId,
        worker: WorkerId,
        tokens: ReplyStream<WorkerReply>,
        first: Option<TokenOutput>,
    ) -> Dispatched {
        self.dispatched_as(guard, id, worker, Tokens::Open(tokens), first)
    }

    /// A request whose `first` output is in, and whose stream on `worker` is `opening`
    /// (run on a task of its own from now; awaited on the read after `first`).
    pub(crate) fn opening(
        &self,
        guard: RouteGuard,
        id: RequestId,
        worker: WorkerId,
        first: TokenOutput,
        opening: impl std::future::Future<Output = Result<ReplyStream<WorkerReply>, CallError>>
            + Send
            + 'static,
    ) -> Dispatched {
        // In the request's span: the decode worker's stream opens as part of the request.
        let opening = Opening(tokio::spawn(opening.in_current_span()));
        self.dispatched_as(guard, id, worker, Tokens::Opening(opening), Some(first))
    }

    fn dispatched_as(
        &self,
        guard: RouteGuard,
        id: RequestId,
        worker: WorkerId,
        tokens: Tokens,
        first: Option<TokenOutput>,
    ) -> Dispatched {
        Dispatched {
            id,
            worker,
            tokens,
            received: false,
            first,
            disagg: self.disagg.get().map(|s| s.metrics.clone()),
            hinted: false,
            _guard: guard,
        }
    }

    /// Sets the migration settings (the default: [`MigrationConfig::default`]) and the
    /// clock the liveness timeout runs on (the default: tokio's).
    pub fn with_migration(mut self, migration: MigrationConfig, clock: SharedClock) -> Dispatcher {
        self.migration = migration;
        self.clock = clock;
        self
    }

    /// The clock the liveness timeout runs on.
    pub fn clock(&self) -> &SharedClock {
        &self.clock
    }

    /// The migration settings the dispatcher's streams follow.
    pub fn migration(&self) -> &MigrationConfig {
        &self.migration
    }

    /// A fresh request id.
    pub fn next_request_id(&self) -> RequestId {
        RequestId(self.next_request.fetch_add(1, Ordering::Relaxed))
    }

    /// Makes `worker` reachable from this frontend (the router learns of it from its own
    /// membership feed).
    pub fn add_worker(&self, id: WorkerId, worker: Addr<WorkerService>) {
        self.workers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, worker);
    }

    /// Forgets `id`'s address (it left, or its lease expired).
    pub fn remove_worker(&self, id: WorkerId) {
        self.workers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        self.departures.send_modify(|n| *n += 1);
    }

    /// Whether `id` is a worker this dispatcher can reach (joined, not left).
    pub fn has_worker(&self, id: WorkerId) -> bool {
        self.workers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&id)
    }

    /// Resolves once `id` is no longer a member (it left, or its lease expired); never, while
    /// it stays.
    pub async fn departed(&self, id: WorkerId) {
        let mut rx = self.departures.subscribe();
        while self.has_worker(id) {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// The workers it can reach (routable or in quarantine), in id order.
    pub fn worker_ids(&self) -> Vec<WorkerId> {
        self.workers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect()
    }

    /// Whether a request could be routed now (what GET /ready reports): a worker has
    /// joined, and the router would route to at least one of them. Workers it left out of
    /// routing (unreachable, stalled, draining) do not count: with all of them out a
    /// request would wait for the liveness machinery, not be served.
    pub async fn readiness(&self) -> Result<(), String> {
        let joined = self.worker_ids().len();
        if joined == 0 {
            return Err("no worker has joined yet".into());
        }
        let Some(router) = self.router() else {
            return Err("no router has joined yet".into());
        };
        match tokio::time::timeout(READINESS_TIMEOUT, router.call(RouterRequest::Routable)).await {
            Ok(Ok(RouterReply::Routable { routable, .. })) if routable > 0 => Ok(()),
            Ok(Ok(RouterReply::Routable { workers, .. })) => Err(format!(
                "none of the {workers} worker(s) can take requests now \
                 (unreachable, stalled or draining)"
            )),
            Ok(Ok(_)) => Err("the router gave no worker count to a readiness check".into()),
            Ok(Err(e)) => Err(format!("router unavailable: {e}")),
            Err(_) => Err(format!(
                "the router did not answer within {READINESS_TIMEOUT:?}"
            )),
        }
    }

    /// Whether the router would route a request to some worker not in `besides` now (see
    /// [`Dispatcher::readiness`]): no when there is no router or it counts none. A router
    /// that fails or does not answer (on this dispatcher's clock) counts as yes, so a caller
    /// that would move a request goes on to try.
    pub async fn any_routable_besides(&self, besides: &[WorkerId]) -> bool {
        let Some(router) = self.router() else {
            return false;
        };
        let asked = turbine_runtime::clock::timeout(
            self.clock.as_ref(),
            READINESS_TIMEOUT,
            router.call(RouterRequest::RoutableBesides(besides.to_vec())),
        );
        !matches!(
            asked.await,
            Ok(Ok(RouterReply::Routable { routable: 0, .. }))
        )
    }

    /// The router this dispatcher asks, if it has one.
    pub fn router(&self) -> Option<Addr<RouterService>> {
        self.router
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Points the dispatcher at another router (a router process joined or left).
    pub fn set_router(&self, router: Option<Addr<RouterService>>) {
        *self.router.write().unwrap_or_else(|e| e.into_inner()) = router;
    }

    /// Per-worker counts of the decisions this frontend received, in worker order.
    pub fn worker_route_counts(&self) -> Vec<(WorkerId, WorkerRouteCounts)> {
        self.route_counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(w, c)| (*w, *c))
            .collect()
    }

    /// `req` as a worker runs it, under id `id`.
    fn preprocessed(&self, id: RequestId, req: DispatchRequest) -> PreprocessedRequest {
        let mut sampling = req.sampling;
        if sampling.seed.is_none() && sampling.temperature > 0.0 {
            // No seed asked for: still reproducible within this request across preemption
            // and migration (the id stays).
            sampling.seed = Some(id.0.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        }
        PreprocessedRequest {
            id,
            token_ids: req.token_ids,
            sampling,
            stop: req.stop,
            logprobs: req.logprobs,
            salt: 0,
            generated_before: req.generated_before,
            images: req.images,
            embeds: None,
        }
    }

    /// Gives `req` an id, routes it and opens its stream on the chosen worker. Fails with
    /// `Overloaded` (retryable) when no worker is available or the chosen one cannot be
    /// reached. No migration: see [`super::migrating::MigratingStream`] for that.
    pub async fn dispatch(&self, req: DispatchRequest) -> Result<Dispatched, EngineError> {
        Ok(self.dispatch_as(self.next_request_id(), req).await?)
    }

    /// Routes `req` under id `id` (a migrated request keeps its id, so its seed and a
    /// sampler keyed by request see the same request) and opens its stream.
    pub async fn dispatch_as(
        &self,
        id: RequestId,
        req: DispatchRequest,
    ) -> Result<Dispatched, DispatchError> {
        self.dispatch_routed(id, req, RouteOverrides::default(), Vec::new())
            .await
    }

    /// [`Dispatcher::dispatch_as`] with this request's own overlap weight and temperature.
    pub async fn dispatch_with(
        &self,
        id: RequestId,
        req: DispatchRequest,
        overrides: RouteOverrides,
    ) -> Result<Dispatched, DispatchError> {
        self.dispatch_routed(id, req, overrides, Vec::new()).await
    }

    /// [`Dispatcher::dispatch_as`] never choosing one of `avoid`: the workers a migrating
    /// request was already lost, stalled or released on. The router may not know yet that
    /// they are gone (a crash is seen when a lease expires, or when some stream's loss
    /// reaches it), and a continuation sent back to one of them would spend a migration
    /// for nothing.
    pub async fn dispatch_avoiding(
        &self,
        id: RequestId,
        req: DispatchRequest,
        avoid: Vec<WorkerId>,
    ) -> Result<Dispatched, DispatchError> {
        self.dispatch_routed(id, req, RouteOverrides::default(), avoid)
            .await
    }

    async fn dispatch_routed(
        &self,
        id: RequestId,
        req: DispatchRequest,
        overrides: RouteOverrides,
        avoid: Vec<WorkerId>,
    ) -> Result<Dispatched, DispatchError> {
        let route = RouteRequest {
            id,
            hashes: req.block_hashes(self.block_size),
            token_count: req.token_ids.len(),
            avoid,
            overrides,
        };
        let Some(router) = self.router() else {
            return Err(DispatchError::NoWorker("no router is available".into()));
        };
        let pre = self.preprocessed(id, req);
        // Prompt logprobs are read from the prompt's own step, so the worker that
        // decodes computes the prompt (never a prefill worker).
        let disagg = self
            .disagg
            .get()
            .filter(|_| pre.sampling.prompt_logprobs.is_none());
        if let Some(settings) = disagg {
            return crate::disagg::flow::dispatch(self, settings, router, route, pre).await;
        }
        // Held here while every worker is busy (`router.busy_threshold`), asking again every
        // QUEUE_RETRY until one is not or the router's hold time is over: the `route` span
        // covers that wait.
        let span = tracing::info_span!(
            "route",
            request = %id,
            worker = tracing::field::Empty,
            overlap_blocks = tracing::field::Empty,
        );
        let decision = self.route(&router, route).instrument(span.clone()).await?;
        span.record("worker", tracing::field::display(decision.worker));
        span.record("overlap_blocks", decision.overlap_blocks);
        span.in_scope(|| tracing::debug!(worker = %decision.worker, overlap_blocks = decision.overlap_blocks, "routed"));
        drop(span);
        self.count_route(&decision);
        let guard = RouteGuard { router, id };
        let request = WorkerRequest::Generate(Box::new(pre));
        self.open(guard, id, decision.worker, request, None).await
    }

    /// Asks `router` for a worker for `route`, asking again while every worker is busy.
    async fn route(
        &self,
        router: &Addr<RouterService>,
        route: RouteRequest,
    ) -> Result<RouteDecision, DispatchError> {
        let mut held: Option<(tokio::time::Instant, Held<'_>)> = None;
        let decision = loop {
            match router.call(RouterRequest::Route(route.clone())).await {
                Ok(RouterReply::Routed(Ok(decision))) => break decision,
                Ok(RouterReply::Routed(Err(RouteError::NoWorkers))) => {
                    return Err(DispatchError::NoWorker("no worker is available".into()))
                }
                Ok(RouterReply::Routed(Err(RouteError::AllBusy { hold_ms }))) => {
                    let now = self.clock.now();
                    let since = held.get_or_insert_with(|| (now, Held::new(&self.queue))).0;
                    if now.duration_since(since) >= Duration::from_millis(hold_ms) {
                        self.queue.timeouts.fetch_add(1, Ordering::Relaxed);
                        return Err(DispatchError::NoWorker(format!(
                            "every worker stayed busy for {hold_ms} ms (router.queue_timeout_ms)"
                        )));
                    }
                    self.clock.sleep(QUEUE_RETRY).await;
                }
                Ok(_) => {
                    return Err(DispatchError::Internal(
                        "the router answered a route request with something else".into(),
                    ))
                }
                Err(e) => return Err(DispatchError::Router(e.to_string())),
            }
        };
        drop(held);
        Ok(decision)
    }
}

impl Dispatcher {
    /// [`Dispatcher::dispatch_as`] following a gateway's routing `hints` (see
    /// [`super::hints`]): the hinted worker (and, disaggregated, the hinted prefill worker)
    /// serve the request without asking the router. A hint this frontend cannot follow (a
    /// worker it does not know, one that cannot be reached, an incomplete or
    /// disaggregated hint on a cluster without prefill workers) is counted and the request
    /// is routed here as if it had no hints: a hint never fails a request.
    ///
    /// The router does not see hinted requests as routed; the workers' load reports carry
    /// them into its load view. The stream returned is marked `hinted`: the migration shell
    /// counts it followed once the worker produces, or unreachable when it fails first (a
    /// dead worker whose lease has not expired yet); either way the request goes on.
    pub async fn dispatch_hinted(
        &self,
        id: RequestId,
        req: DispatchRequest,
        hints: RoutingHints,
    ) -> Result<Dispatched, DispatchError> {
        if hints.is_empty() {
            return self.dispatch_with(id, req, hints.overrides).await;
        }
        let Some(router) = self.router() else {
            return self.dispatch_with(id, req, hints.overrides).await;
        };
        let Some(worker) = hints.worker else {
            self.count_hint(HintOutcome::Incomplete);
            return self.dispatch_with(id, req, hints.overrides).await;
        };
        if !self.has_worker(worker) {
            self.count_hint(HintOutcome::UnknownWorker);
            return self.dispatch_with(id, req, hints.overrides).await;
        }
        let disaggregated = match (hints.mode, hints.prefill_worker) {
            (Some(HintMode::Disaggregated), None) => {
                self.count_hint(HintOutcome::Incomplete);
                return self.dispatch_with(id, req, hints.overrides).await;
            }
            (Some(HintMode::Aggregated), _) | (None, None) => None,
            // Prompt logprobs: the decode worker computes the prompt (see `dispatch_as`).
            (_, Some(_)) if req.sampling.prompt_logprobs.is_some() => None,
            (_, Some(prefill)) => match self.disagg.get() {
                Some(settings) if self.has_worker(prefill) => Some((settings, prefill)),
                _ => {
                    self.count_hint(HintOutcome::UnknownPrefillWorker);
                    return self.dispatch_with(id, req, hints.overrides).await;
                }
            },
        };
        let route = RouteRequest {
            id,
            hashes: req.block_hashes(self.block_size),
            token_count: req.token_ids.len(),
            avoid: Vec::new(),
            overrides: hints.overrides,
        };
        let pre = self.preprocessed(id, req.clone());
        let hinted = |w| RouteDecision {
            worker: w,
            overlap_blocks: 0,
            request_blocks: route.blocks(self.block_size),
            cost: 0.0,
        };
        let opened = match disaggregated {
            None => {
                let guard = RouteGuard::new(router, id);
                let request = WorkerRequest::Generate(Box::new(pre));
                let opened = self.open(guard, id, worker, request, None).await;
                if opened.is_ok() {
                    self.count_route(&hinted(worker));
                }
                opened
            }
            Some((settings, prefill)) => {
                let plan = DisaggRoute {
                    decode: hinted(worker),
                    prefill: PrefillPlan {
                        decision: PrefillDecision::Remote,
                        worker: Some(hinted(prefill)),
                        pool: PrefillPoolLoad {
                            workers: 1,
                            queued: 0,
                        },
                    },
                };
                crate::disagg::flow::run_plan(self, settings, router, plan, pre).await
            }
        };
        match opened {
            Err(DispatchError::Unreachable { .. }) => {
                self.count_hint(HintOutcome::Unreachable);
                self.dispatch_with(id, req, hints.overrides).await
            }
            other => other.map(|mut d| {
                d.hinted = true;
                d
            }),
        }
    }
}

/// Classes one item of a worker's token stream; `first` is true until an output arrived.
/// Failures before the first output are the request's fault (`InvalidRequest`, refused at
/// admission) or retryable (`Overloaded`: the worker went away before producing anything);
/// later ones are `Internal`.
pub fn token_output(
    item: Result<WorkerReply, CallError>,
    first: bool,
) -> Result<TokenOutput, EngineError> {
    match item {
        Ok(WorkerReply::Token(out)) => Ok(out),
        Ok(WorkerReply::Stats(_) | WorkerReply::Kv(_) | WorkerReply::Import(_)) => Err(
            EngineError::Internal("worker sent something other than a token on a stream".into()),
        ),
        // Refused at admission: the request itself is at fault (too long for the worker's
        // pool, empty, ...).
        Err(CallError::Handler(msg)) if first => Err(EngineError::InvalidRequest(msg)),
        // The worker went away (crash, network) before it produced anything: nothing was
        // generated, so the client may simply retry (503); discovery drops the worker.
        Err(e @ (CallError::PeerGone(_) | CallError::Timeout(_) | CallError::Transport(_)))
            if first =>
        {
            Err(EngineError::Overloaded(format!("worker unavailable: {e}")))
        }
        Err(e) => Err(EngineError::Internal(format!("worker: {e}"))),
    }
}

/// Tells the router a request is over however its stream ends (finished, failed, dropped).
pub struct RouteGuard {
    router: Addr<RouterService>,
    id: RequestId,
}

impl RouteGuard {
    pub(crate) fn new(router: Addr<RouterService>, id: RequestId) -> RouteGuard {
        RouteGuard { router, id }
    }
}

impl Drop for RouteGuard {
    fn drop(&mut self) {
        self.router.cast(RouterRequest::Finished(self.id));
    }
}
