//! The dispatcher: the frontend's routing actor shell. It owns the KV-aware router and the
//! set of reachable workers, gives each request an id, routes its token ids and opens its
//! token stream on the chosen worker.
//!
//! It speaks token ids only, so the text [`super::pipeline::Pipeline`] (templates,
//! tokenizer, detokenizer) and the simulator (which has no tokenizer) drive the same code.
//! Time comes from a [`SharedClock`] and request ids from a caller-chosen start, so on a
//! paused-time runtime every decision is a pure function of the inputs.

use super::service::{WorkerReply, WorkerRequest, WorkerService};
use crate::frontend::EngineError;
use crate::ids::{RequestId, WorkerId};
use crate::kv::{hash_blocks, BlockSize};
use crate::protocol::{PreprocessedRequest, SamplingParams, StopConditions, TokenOutput};
use crate::router::{KvRouter, RouteError, RouteRequest};
use crate::worker::SchedulerStats;
use futures::StreamExt;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::time::Instant;
use turbine_runtime::{Addr, CallError, ReplyStream, SharedClock};

/// A request as the dispatcher takes it: prompt token ids and generation settings.
#[derive(Clone, Debug)]
pub struct DispatchRequest {
    pub token_ids: Vec<u32>,
    pub sampling: SamplingParams,
    pub stop: StopConditions,
    pub logprobs: Option<u32>,
}

/// How long a worker that was found unreachable (its connection is gone) is left out of
/// routing. Discovery drops a dead worker when its lease expires, which takes up to a lease
/// period; until then every request routed there would fail. A worker that was only cut off
/// briefly is routed to again after this.
pub const UNREACHABLE_QUARANTINE: Duration = Duration::from_secs(5);

/// A request under way on a worker. Dropping it cancels the request.
pub struct Dispatched {
    pub id: RequestId,
    pub worker: WorkerId,
    tokens: ReplyStream<WorkerReply>,
    received: bool,
    health: Arc<Health>,
    _guard: RouteGuard,
}

impl Dispatched {
    /// The next output of the worker (see [`token_output`] for how failures are classed);
    /// `None` once the stream has ended. A lost connection to the worker takes it out of
    /// routing for [`UNREACHABLE_QUARANTINE`].
    pub async fn next_output(&mut self) -> Option<Result<TokenOutput, EngineError>> {
        let item = self.tokens.next().await?;
        if matches!(item, Err(CallError::PeerGone(_) | CallError::Transport(_))) {
            self.health.unreachable(self.worker);
        }
        let out = token_output(item, !self.received);
        if out.is_ok() {
            self.received = true;
        }
        Some(out)
    }
}

/// Which workers are left out of routing because their connection was lost, and until when.
struct Health {
    router: Arc<Mutex<KvRouter>>,
    quarantined: Mutex<BTreeMap<WorkerId, Duration>>,
    clock: SharedClock,
    started: Instant,
}

impl Health {
    fn now(&self) -> Duration {
        self.clock.now().saturating_duration_since(self.started)
    }

    /// Takes `worker` out of routing for a while (its load and cached blocks are kept, so
    /// a worker that was only cut off briefly keeps its prefix affinity).
    fn unreachable(&self, worker: WorkerId) {
        let until = self.now() + UNREACHABLE_QUARANTINE;
        let mut q = self.quarantined.lock().unwrap_or_else(|e| e.into_inner());
        if q.insert(worker, until).is_none() {
            tracing::warn!(%worker, "worker unreachable; not routing to it for {UNREACHABLE_QUARANTINE:?}");
            lock(&self.router).set_suspended(worker, true);
        }
    }

    /// Routes to the workers whose quarantine is over again.
    fn lift_expired(&self) {
        let now = self.now();
        let mut q = self.quarantined.lock().unwrap_or_else(|e| e.into_inner());
        let over: Vec<WorkerId> = q
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(w, _)| *w)
            .collect();
        for w in over {
            q.remove(&w);
            // A worker removed meanwhile is unknown to the router: nothing to lift.
            lock(&self.router).set_suspended(w, false);
        }
    }

    fn forget(&self, worker: WorkerId) {
        self.quarantined
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&worker);
    }
}

/// Routes requests over the workers it knows.
pub struct Dispatcher {
    block_size: BlockSize,
    router: Arc<Mutex<KvRouter>>,
    workers: RwLock<BTreeMap<WorkerId, Addr<WorkerService>>>,
    health: Arc<Health>,
    next_request: AtomicU64,
}

impl Dispatcher {
    /// A dispatcher with no workers yet; request ids count up from `first_request_id`.
    pub fn new(
        block_size: BlockSize,
        router: KvRouter,
        first_request_id: u64,
        clock: SharedClock,
    ) -> Dispatcher {
        let router = Arc::new(Mutex::new(router));
        Dispatcher {
            block_size,
            health: Arc::new(Health {
                router: router.clone(),
                quarantined: Mutex::new(BTreeMap::new()),
                started: clock.now(),
                clock,
            }),
            router,
            workers: RwLock::new(BTreeMap::new()),
            next_request: AtomicU64::new(first_request_id),
        }
    }

    /// Makes `worker` routable.
    pub fn add_worker(&self, id: WorkerId, worker: Addr<WorkerService>) {
        // The address map's lock is held across the router update so that the two never
        // disagree for a concurrent `dispatch`.
        let mut workers = self.workers.write().unwrap_or_else(|e| e.into_inner());
        workers.insert(id, worker);
        self.health.forget(id);
        let mut router = lock(&self.router);
        router.add_worker(id);
        router.set_suspended(id, false);
    }

    /// Stops routing to `id` (it left, or its lease expired) and forgets its KV blocks.
    pub fn remove_worker(&self, id: WorkerId) {
        let mut workers = self.workers.write().unwrap_or_else(|e| e.into_inner());
        workers.remove(&id);
        self.health.forget(id);
        lock(&self.router).remove_worker(id);
    }

    /// Feeds a worker's latest stats into the router's load view.
    pub fn update_load(&self, id: WorkerId, stats: &SchedulerStats) {
        let active = (stats.num_running + stats.num_waiting) as u32;
        lock(&self.router).update_load(id, stats.load_blocks(), active);
    }

    /// The workers it knows (routable or in quarantine), in id order.
    pub fn worker_ids(&self) -> Vec<WorkerId> {
        self.workers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect()
    }

    pub fn router(&self) -> &Arc<Mutex<KvRouter>> {
        &self.router
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
        self.health.lift_expired();
        let decision = lock(&self.router)
            .route(self.health.now(), &route)
            .map_err(|RouteError::NoWorkers| {
                EngineError::Overloaded("no worker is available".into())
            })?
            .decision;
        let guard = RouteGuard {
            router: self.router.clone(),
            id,
        };
        let worker = self
            .workers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&decision.worker)
            .cloned();
        let Some(worker) = worker else {
            // Removed between the decision and now: forget it and let the client retry.
            lock(&self.router).remove_worker(decision.worker);
            return Err(EngineError::Overloaded(format!(
                "worker {} has just left",
                decision.worker
            )));
        };
        let pre = PreprocessedRequest {
            id,
            token_ids: req.token_ids,
            sampling,
            stop: req.stop,
            logprobs: req.logprobs,
            salt: 0,
        };
        let tokens = match worker.stream(WorkerRequest::Generate(Box::new(pre))).await {
            Ok(tokens) => tokens,
            Err(e) => {
                if matches!(e, CallError::PeerGone(_) | CallError::Transport(_)) {
                    self.health.unreachable(decision.worker);
                }
                return Err(EngineError::Overloaded(format!(
                    "worker {}: {e}",
                    decision.worker
                )));
            }
        };
        Ok(Dispatched {
            id,
            worker: decision.worker,
            tokens,
            received: false,
            health: self.health.clone(),
            _guard: guard,
        })
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
        Ok(WorkerReply::Stats(_)) => Err(EngineError::Internal(
            "worker sent stats on a stream".into(),
        )),
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
    router: Arc<Mutex<KvRouter>>,
    id: RequestId,
}

impl Drop for RouteGuard {
    fn drop(&mut self) {
        lock(&self.router).on_request_finished(self.id);
    }
}

fn lock(router: &Mutex<KvRouter>) -> std::sync::MutexGuard<'_, KvRouter> {
    // A panic while holding the lock cannot leave the router half-updated in a way that
    // matters more than refusing all further requests would, so recover the guard.
    router.lock().unwrap_or_else(|e| e.into_inner())
}
