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

use super::kv_router::WorkerRouteCounts;
use super::policy::{RouteError, RouteRequest};
use super::service::{RouterReply, RouterRequest, RouterService};
use crate::disagg::flow::DisaggSettings;
use crate::disagg::metrics::DisaggMetrics;
use crate::ids::{RequestId, WorkerId};
use crate::kv::{hash_blocks, BlockSize};
use crate::protocol::EngineError;
use crate::protocol::{PreprocessedRequest, SamplingParams, StopConditions, TokenOutput};
use crate::worker::service::{WorkerReply, WorkerRequest, WorkerService};
use futures::StreamExt;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, RwLock};
use turbine_runtime::{Addr, CallError, ReplyStream};

/// A request as the dispatcher takes it: prompt token ids and generation settings.
#[derive(Clone, Debug)]
pub struct DispatchRequest {
    pub token_ids: Vec<u32>,
    pub sampling: SamplingParams,
    pub stop: StopConditions,
    pub logprobs: Option<u32>,
}

/// A request under way on a worker. Dropping it cancels the request.
pub struct Dispatched {
    pub id: RequestId,
    pub worker: WorkerId,
    tokens: ReplyStream<WorkerReply>,
    received: bool,
    /// A first token that arrived before the stream (from a prefill worker).
    first: Option<TokenOutput>,
    /// Where a decode worker's import report is counted (disaggregated serving).
    disagg: Option<DisaggMetrics>,
    _guard: RouteGuard,
}

impl Dispatched {
    /// The next output of the worker (see [`token_output`] for how failures are classed);
    /// `None` once the stream has ended. A lost connection to the worker is reported to
    /// the router, which leaves the worker out of routing for a while.
    pub async fn next_output(&mut self) -> Option<Result<TokenOutput, EngineError>> {
        if let Some(first) = self.first.take() {
            self.received = true;
            return Some(Ok(first));
        }
        let mut item = self.tokens.next().await?;
        while let Ok(WorkerReply::Import(outcome)) = &item {
            if let Some(m) = &self.disagg {
                crate::disagg::flow::count_import(m, outcome);
            }
            item = self.tokens.next().await?;
        }
        if matches!(item, Err(CallError::PeerGone(_) | CallError::Transport(_))) {
            self._guard
                .router
                .cast(RouterRequest::Unreachable(self.worker));
        }
        let out = token_output(item, !self.received);
        if out.is_ok() {
            self.received = true;
        }
        Some(out)
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
    /// Set when the cluster has prefill workers: requests go through
    /// [`crate::disagg::flow`].
    disagg: OnceLock<DisaggSettings>,
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
            disagg: OnceLock::new(),
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
    ) -> Result<Dispatched, EngineError> {
        let Some(addr) = self.worker_addr(worker) else {
            guard.router.cast(RouterRequest::Unreachable(worker));
            return Err(EngineError::Overloaded(format!(
                "worker {worker} has just left"
            )));
        };
        let tokens = match addr.stream(request).await {
            Ok(tokens) => tokens,
            Err(e) => {
                if matches!(e, CallError::PeerGone(_) | CallError::Transport(_)) {
                    guard.router.cast(RouterRequest::Unreachable(worker));
                }
                return Err(EngineError::Overloaded(format!("worker {worker}: {e}")));
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
        Dispatched {
            id,
            worker,
            tokens,
            received: false,
            first,
            disagg: self.disagg.get().map(|s| s.metrics.clone()),
            _guard: guard,
        }
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

    /// Gives `req` an id, routes it and opens its stream on the chosen worker. Fails with
    /// `Overloaded` (retryable) when no worker is available or the chosen one cannot be
    /// reached.
    pub async fn dispatch(&self, req: DispatchRequest) -> Result<Dispatched, EngineError> {
        let id = RequestId(self.next_request.fetch_add(1, Ordering::Relaxed));
        let mut sampling = req.sampling;
        if sampling.seed.is_none() && sampling.temperature > 0.0 {
            // No seed asked for: still reproducible within this request across preemption.
            sampling.seed = Some(id.0.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        }
        let route = RouteRequest {
            id,
            hashes: hash_blocks(&req.token_ids, self.block_size, 0),
            token_count: req.token_ids.len(),
        };
        let Some(router) = self.router() else {
            return Err(EngineError::Overloaded("no router is available".into()));
        };
        let pre = PreprocessedRequest {
            id,
            token_ids: req.token_ids,
            sampling,
            stop: req.stop,
            logprobs: req.logprobs,
            salt: 0,
        };
        if let Some(settings) = self.disagg.get() {
            return crate::disagg::flow::dispatch(self, settings, router, route, pre).await;
        }
        let decision = match router.call(RouterRequest::Route(route)).await {
            Ok(RouterReply::Routed(Ok(decision))) => decision,
            Ok(RouterReply::Routed(Err(RouteError::NoWorkers))) => {
                return Err(EngineError::Overloaded("no worker is available".into()))
            }
            Ok(_) => {
                return Err(EngineError::Internal(
                    "the router answered a route request with something else".into(),
                ))
            }
            Err(e) => return Err(EngineError::Overloaded(format!("router unavailable: {e}"))),
        };
        self.count_route(&decision);
        let guard = RouteGuard { router, id };
        let worker = self
            .workers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&decision.worker)
            .cloned();
        let Some(worker) = worker else {
            // Left between the decision and now (the router's membership feed will drop it
            // too): keep it out of routing until then, and let the client retry.
            guard
                .router
                .cast(RouterRequest::Unreachable(decision.worker));
            return Err(EngineError::Overloaded(format!(
                "worker {} has just left",
                decision.worker
            )));
        };
        let tokens = match worker.stream(WorkerRequest::Generate(Box::new(pre))).await {
            Ok(tokens) => tokens,
            Err(e) => {
                if matches!(e, CallError::PeerGone(_) | CallError::Transport(_)) {
                    guard
                        .router
                        .cast(RouterRequest::Unreachable(decision.worker));
                }
                return Err(EngineError::Overloaded(format!(
                    "worker {}: {e}",
                    decision.worker
                )));
            }
        };
        Ok(self.dispatched(guard, id, decision.worker, tokens, None))
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
