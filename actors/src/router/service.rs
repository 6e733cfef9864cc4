//! The router as a supervised service on the request plane: [`RouterService`].
//!
//! A frontend reaches the router through an `Addr<RouterService>`: in its own process by
//! default (a local actor, no serialisation), or in a router process of its own
//! (`turbine worker --role router`) that several frontends share. The state is the pure
//! [`KvRouter`] (policy, load view, quarantine) plus the KV index its membership feed fills
//! ([`super::membership`]); [`RouterCore`] holds both and is what the actor, the membership
//! feed and the `/metrics` collector share. One lock, taken for one pure call at a time.
//!
//! The actor is restarted by its supervisor if it panics; the core outlives it, so a restart
//! loses nothing but the request being handled.
//!
//! With `router.replica_sync` the core also hands every [`RouterEvent`] its decisions
//! return to an outbox ([`RouterCore::publish_events_to`]) and applies its peers' events
//! ([`RouterCore::apply_peer_event`]); [`super::replica_sync`] carries them over the event
//! plane.

use super::events::{RouterEvent, RouterReplicaId};
use super::kv_router::{KvRouter, RouterMetrics, WorkerRouteCounts};
use super::policy::{RouteDecision, RouteError, RouteRequest};
use crate::cluster_config::WorkerRole;
use crate::disagg::route::{decide_prefill, plan_prefill, DisaggRoute};
use crate::disagg::DisaggregationConfig;
use crate::ids::{RequestId, WorkerId};
use crate::kv::indexer::FlashIndexer;
use crate::kv::{BlockSize, KvEventBatch};
use crate::worker::SchedulerStats;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;
use tokio::time::Instant;
use turbine_runtime::{
    Addr, Handler, HandlerError, Node, NodeError, RequestCtx, Service, SharedClock,
};

/// Name the router serves its [`RouterService`] under on its node.
pub const ROUTER_SERVICE: &str = "router";
/// The discovery component a router process registers under.
pub const ROUTER_COMPONENT: &str = "router";

/// The router's protocol.
pub struct RouterService;

impl Service for RouterService {
    type Req = RouterRequest;
    type Resp = RouterReply;
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum RouterRequest {
    /// Call: pick a worker for the request and count it towards that worker's load.
    Route(RouteRequest),
    /// Cast: a routed request ended (finished, failed or dropped).
    Finished(RequestId),
    /// Cast: the caller could not reach this worker; quarantine it.
    Unreachable(WorkerId),
    /// Call: a stream on this worker made no progress for `quiet_for_ms`. The router answers
    /// `Stalled(true)` when the worker has not reported its load in that time either (or
    /// `force`), and then leaves it out of routing until a load report shows its engine
    /// made progress (it proves alive);
    /// `Stalled(false)`: it is alive, only slow.
    Stalled {
        worker: WorkerId,
        quiet_for_ms: u64,
        force: bool,
    },
    /// Call: the router's counters.
    Metrics,
    /// Call: how many workers it knows and how many it would route to now (readiness).
    Routable,
    /// Call: pick the decode worker, then decide where the prefill runs (see
    /// [`crate::disagg::route`]).
    RouteDisagg(RouteRequest),
    /// Cast: the remote prefill of a request ended (its KV descriptor arrived, or it
    /// failed): it no longer counts towards the prefill pool's load.
    PrefillDone(RequestId),
    /// Call: [`RouterRequest::Routable`] leaving these workers out of the routable count
    /// (a migrating request's avoid list).
    RoutableBesides(Vec<WorkerId>),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum RouterReply {
    Routed(Result<RouteDecision, RouteError>),
    RoutedDisagg(Result<DisaggRoute, RouteError>),
    Metrics {
        totals: RouterMetrics,
        per_worker: Vec<(WorkerId, WorkerRouteCounts)>,
    },
    Done,
    Stalled(bool),
    /// Workers known, and of those routable now (not quarantined, stalled or draining).
    Routable {
        workers: u32,
        routable: u32,
    },
}

/// What a [`LoadWatcher`] is told.
#[derive(Clone, Copy, Debug)]
pub enum LoadNotice<'a> {
    /// A worker's load report arrived; `role` is the pool it serves.
    Report {
        worker: WorkerId,
        role: PoolRole,
        stats: &'a SchedulerStats,
    },
    /// The worker left routing (it left membership, or its lease expired).
    Left(WorkerId),
}

/// Which of the router's pools a worker is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolRole {
    /// Prefill workers (remote prefills only).
    Prefill,
    /// Aggregated and decode workers (every request's decode).
    Decode,
}

/// Follows the workers' load reports as the router receives them (the planner: mean decode
/// batch and waiting requests of workers in other processes). Called with no lock held.
pub type LoadWatcher = Arc<dyn Fn(LoadNotice<'_>) + Send + Sync>;

/// The router's state, shared by its actor, its membership feed and its metrics collector.
pub struct RouterCore {
    block_size: BlockSize,
    watchers: Mutex<Vec<LoadWatcher>>,
    router: Mutex<KvRouter>,
    /// The prefill pool (workers of role `prefill`), routed over the same index.
    prefill: Mutex<KvRouter>,
    disagg: Mutex<DisaggregationConfig>,
    index: Arc<FlashIndexer>,
    clock: SharedClock,
    started: Instant,
    /// Where this replica's router events go (set when replicas sync; else dropped).
    outbox: OnceLock<tokio::sync::mpsc::UnboundedSender<RouterEvent>>,
    replicas: ReplicaCounters,
}

/// What replica sync counted (exported on `/metrics`).
#[derive(Debug, Default)]
struct ReplicaCounters {
    peers: AtomicU64,
    resyncs: AtomicU64,
}

/// A snapshot of [`RouterCore`]'s replica figures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplicaStats {
    /// Peer replicas followed now.
    pub peers: u64,
    /// Peer events applied.
    pub events_applied: u64,
    /// Times a peer's in-flight requests were dropped (a gap in its events, or it left).
    pub resyncs: u64,
}

impl RouterCore {
    /// A core around `router`, whose KV overlaps come from `index` (the one the router was
    /// built with in events mode).
    pub fn new(router: KvRouter, index: Arc<FlashIndexer>, clock: SharedClock) -> Arc<RouterCore> {
        // The router's config was validated when it was built, so the prefill pool's (the
        // same config) builds too.
        let prefill = KvRouter::new(
            super::RouterReplicaId(0),
            router.config().clone(),
            Some(index.clone()),
        )
        .unwrap_or_else(|_| unreachable!("a validated router config"));
        Arc::new(RouterCore {
            block_size: router.config().block_size,
            watchers: Mutex::new(Vec::new()),
            router: Mutex::new(router),
            prefill: Mutex::new(prefill),
            disagg: Mutex::new(DisaggregationConfig::default()),
            index,
            started: clock.now(),
            clock,
            outbox: OnceLock::new(),
            replicas: ReplicaCounters::default(),
        })
    }

    /// This router's replica id (its peers tell its events apart by it).
    pub fn replica(&self) -> RouterReplicaId {
        self.lock().replica()
    }

    /// From now on every router event (a decision, a finished request) goes to `outbox`
    /// for peer replicas (once; a second call is ignored).
    pub fn publish_events_to(&self, outbox: tokio::sync::mpsc::UnboundedSender<RouterEvent>) {
        let _ = self.outbox.set(outbox);
    }

    fn emit(&self, event: RouterEvent) {
        if let Some(outbox) = self.outbox.get() {
            // The publisher task is gone only while the process shuts down.
            let _ = outbox.send(event);
        }
    }

    /// A peer replica's event into this replica's view.
    pub fn apply_peer_event(&self, event: &RouterEvent) {
        let now = self.now();
        self.lock().apply_router_event(now, event);
    }

    /// A peer's events were lost or it left: drop the requests it routed (see
    /// [`KvRouter::forget_replica`]).
    pub fn forget_peer(&self, peer: RouterReplicaId) {
        let dropped = self.lock().forget_replica(peer);
        self.replicas.resyncs.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            peer = peer.0,
            dropped,
            "router replica resync: its in-flight requests left this view"
        );
    }

    /// How many peer replicas are followed now (the sync shell keeps it).
    pub fn set_peer_count(&self, peers: usize) {
        self.replicas.peers.store(peers as u64, Ordering::Relaxed);
    }

    /// Replica sync's figures.
    pub fn replica_stats(&self) -> ReplicaStats {
        ReplicaStats {
            peers: self.replicas.peers.load(Ordering::Relaxed),
            events_applied: self.lock().metrics().peer_events_applied,
            resyncs: self.replicas.resyncs.load(Ordering::Relaxed),
        }
    }

    /// Requests in flight per worker, as this router knows them (its own and its peers').
    pub fn in_flight_by_worker(&self) -> Vec<(WorkerId, u32)> {
        self.lock().in_flight_by_worker()
    }

    /// Router time: since the core was made, on its clock.
    pub fn now(&self) -> Duration {
        self.clock.now().saturating_duration_since(self.started)
    }

    pub fn block_size(&self) -> BlockSize {
        self.block_size
    }

    /// The KV index the membership feed fills.
    pub fn index(&self) -> &Arc<FlashIndexer> {
        &self.index
    }

    /// The pure router, for one call. A panic while holding the lock cannot leave the router
    /// half-updated in a way that matters more than refusing all further requests would, so
    /// the guard is recovered.
    pub fn lock(&self) -> MutexGuard<'_, KvRouter> {
        self.router.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn route(&self, request: &RouteRequest) -> Result<RouteDecision, RouteError> {
        let now = self.now();
        let routed = self.lock().route(now, request)?;
        self.emit(routed.event);
        Ok(routed.decision)
    }

    fn prefill_pool(&self) -> MutexGuard<'_, KvRouter> {
        self.prefill.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The disaggregation settings [`RouterCore::route_disagg`] decides with.
    pub fn set_disaggregation(&self, cfg: DisaggregationConfig) {
        *self.disagg.lock().unwrap_or_else(|e| e.into_inner()) = cfg;
    }

    /// The decode worker, then where the prefill runs.
    pub fn route_disagg(&self, request: &RouteRequest) -> Result<DisaggRoute, RouteError> {
        let now = self.now();
        let routed = self.lock().route(now, request)?;
        self.emit(routed.event);
        let decode = routed.decision;
        let cfg = self
            .disagg
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let prefill = plan_prefill(
            &cfg,
            self.block_size,
            &mut self.prefill_pool(),
            now,
            request,
            decode.overlap_blocks,
        );
        if prefill.worker.is_some() {
            self.lock().awaiting_prefill(request.id);
            // On the prefill worker too: a prefill of one scheduler step is over before any
            // of its reports counts it, and the report after the routing would acknowledge
            // it; pending until `prefill_done`, the pool sees that worker busy meanwhile
            // (counted twice while a report also shows it running).
            self.prefill_pool().awaiting_prefill(request.id);
        }
        Ok(DisaggRoute { decode, prefill })
    }

    /// Decides, without recording, where a gateway should send `request`: the decode (or
    /// aggregated) worker among those `eligible` accepts, and, when the cluster has prefill
    /// workers and the policy says so, the prefill worker. The endpoint picker asks this; it
    /// never learns when the request ends, so nothing is counted in flight (the workers'
    /// load reports carry what they run).
    pub fn pick(
        &self,
        request: &RouteRequest,
        eligible: &dyn Fn(WorkerId) -> bool,
    ) -> Result<DisaggRoute, RouteError> {
        let now = self.now();
        let decode = self.lock().select_among(now, request, eligible)?;
        let cfg = self
            .disagg
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let prefill = decide_prefill(
            &cfg,
            self.block_size,
            &mut self.prefill_pool(),
            now,
            request,
            decode.overlap_blocks,
        );
        Ok(DisaggRoute { decode, prefill })
    }

    /// A request's remote prefill is over.
    pub fn prefill_done(&self, request: RequestId) {
        self.prefill_pool().on_request_finished(request);
        self.lock().prefill_over(request);
    }

    pub fn finished(&self, request: RequestId) {
        let event = self.lock().on_request_finished(request);
        if let Some(event) = event {
            self.emit(event);
        }
        self.prefill_pool().on_request_finished(request);
    }

    pub fn unreachable(&self, worker: WorkerId) {
        let now = self.now();
        let prefill = self.prefill_pool().mark_unreachable(now, worker);
        let event = self.lock().quarantine(now, worker);
        if event.is_some() || prefill {
            tracing::warn!(
                %worker,
                "worker unreachable; not routing to it for {:?}",
                super::kv_router::UNREACHABLE_QUARANTINE
            );
        }
        if let Some(event) = event {
            self.emit(event); // peer replicas quarantine it too
        }
    }

    /// A stream on `worker` made no progress for `quiet_for`: whether the worker is stalled
    /// (see [`KvRouter::check_stalled`]); a stalled one gets no routing until a report shows
    /// progress.
    pub fn check_stalled(&self, worker: WorkerId, quiet_for: Duration, force: bool) -> bool {
        let now = self.now();
        let (stalled, event) = self
            .lock()
            .check_stalled_event(now, worker, quiet_for, force);
        if let Some(event) = event {
            self.emit(event); // peer replicas leave it out too
        }
        tracing::debug!(%worker, ?quiet_for, force, stalled, "stall check");
        if stalled {
            tracing::warn!(%worker, "worker stalled; not routing to it until it makes progress");
        }
        stalled
    }

    pub fn add_worker(&self, worker: WorkerId) {
        self.lock().add_worker(worker);
    }

    /// Workers of the serving pool (aggregated and decode) it knows, and how many of them it
    /// would route to now (see [`KvRouter::routable`]).
    pub fn routable(&self) -> (usize, usize) {
        let now = self.now();
        self.lock().routable(now)
    }

    /// Of the serving pool, the workers it would route to now that are not in `besides`
    /// (see [`KvRouter::routable_besides`]).
    pub fn routable_besides(&self, besides: &[WorkerId]) -> usize {
        let now = self.now();
        self.lock().routable_besides(now, besides)
    }

    /// Adds `worker` to the pool its role serves: prefill workers are routed to only for
    /// remote prefills, every other role takes requests.
    pub fn add_worker_as(&self, worker: WorkerId, role: WorkerRole) {
        match role {
            WorkerRole::Prefill => self.prefill_pool().add_worker(worker),
            WorkerRole::Aggregated | WorkerRole::Decode => self.add_worker(worker),
            // An encoder takes images, not requests (see `encoder::client`).
            WorkerRole::Encoder => {}
        }
    }

    /// Stops routing to `worker` (it left, or its lease expired) and forgets its KV blocks.
    pub fn remove_worker(&self, worker: WorkerId) {
        self.lock().remove_worker(worker);
        self.prefill_pool().remove_worker(worker);
        self.notify(LoadNotice::Left(worker));
    }

    /// Adds a follower of the workers' load reports (see [`LoadWatcher`]).
    pub fn watch_loads(&self, watcher: LoadWatcher) {
        self.watchers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(watcher);
    }

    fn notify(&self, notice: LoadNotice<'_>) {
        let watchers = self
            .watchers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for w in &watchers {
            w(notice);
        }
    }

    /// A worker's latest stats into the router's load view.
    pub fn update_load(&self, worker: WorkerId, stats: &SchedulerStats) {
        let active = (stats.num_running + stats.num_waiting) as u32;
        let now = self.now();
        let mut router = self.lock();
        router.update_load(worker, stats.load_blocks(), active);
        router.note_report(now, worker, stats.num_steps, active);
        // A draining worker takes no new requests (its in-flight ones run to the end).
        router.set_draining(worker, stats.draining);
        drop(router);
        let mut prefill = self.prefill_pool();
        prefill.update_load(worker, stats.load_blocks(), active);
        if self
            .watchers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
        {
            return;
        }
        let role = if prefill.loads().iter().any(|l| l.worker == worker) {
            PoolRole::Prefill
        } else {
            PoolRole::Decode
        };
        drop(prefill);
        self.notify(LoadNotice::Report {
            worker,
            role,
            stats,
        });
    }

    /// A worker is alive (a heartbeat from its reporter between load reports): liveness
    /// evidence only, its load view untouched (see [`KvRouter::note_report`]).
    pub fn note_alive(&self, worker: WorkerId, stats: &SchedulerStats) {
        let active = (stats.num_running + stats.num_waiting) as u32;
        let now = self.now();
        self.lock()
            .note_report(now, worker, stats.num_steps, active);
    }

    /// A worker's KV events into the index.
    pub fn apply_kv(&self, batch: &KvEventBatch) {
        self.index.apply(batch);
    }

    /// Lost KV events: the view of `worker`'s cache is no longer exact; treat it as cold.
    pub fn clear_kv(&self, worker: WorkerId) {
        self.index.clear_worker(worker);
    }

    pub fn metrics(&self) -> RouterMetrics {
        self.lock().metrics()
    }

    pub fn worker_route_counts(&self) -> Vec<(WorkerId, WorkerRouteCounts)> {
        self.lock().worker_route_counts()
    }

    /// Serves this core as [`RouterService`] `name` on `node`; returns its local address.
    pub async fn serve(
        self: &Arc<Self>,
        node: &Node,
        name: &str,
    ) -> Result<Addr<RouterService>, NodeError> {
        let core = self.clone();
        node.serve::<RouterService, _, _>(name, move || RouterActor { core: core.clone() })
            .await?;
        node.local::<RouterService>(name)
            .map_err(|e| NodeError::Spawn {
                name: name.to_string(),
                message: e.to_string(),
            })
    }
}

/// Serves [`RouterService`] from a [`RouterCore`].
pub struct RouterActor {
    core: Arc<RouterCore>,
}

#[async_trait]
impl Handler<RouterService> for RouterActor {
    async fn call(
        &mut self,
        req: RouterRequest,
        _ctx: &RequestCtx,
    ) -> Result<RouterReply, HandlerError> {
        Ok(match req {
            RouterRequest::Route(r) => RouterReply::Routed(self.core.route(&r)),
            RouterRequest::Finished(id) => {
                self.core.finished(id);
                RouterReply::Done
            }
            RouterRequest::RouteDisagg(r) => RouterReply::RoutedDisagg(self.core.route_disagg(&r)),
            RouterRequest::PrefillDone(id) => {
                self.core.prefill_done(id);
                RouterReply::Done
            }
            RouterRequest::Unreachable(w) => {
                self.core.unreachable(w);
                RouterReply::Done
            }
            RouterRequest::Stalled {
                worker,
                quiet_for_ms,
                force,
            } => RouterReply::Stalled(self.core.check_stalled(
                worker,
                Duration::from_millis(quiet_for_ms),
                force,
            )),
            RouterRequest::Routable => {
                let (workers, routable) = self.core.routable();
                RouterReply::Routable {
                    workers: workers as u32,
                    routable: routable as u32,
                }
            }
            RouterRequest::RoutableBesides(besides) => {
                let (workers, _) = self.core.routable();
                RouterReply::Routable {
                    workers: workers as u32,
                    routable: self.core.routable_besides(&besides) as u32,
                }
            }
            RouterRequest::Metrics => RouterReply::Metrics {
                totals: self.core.metrics(),
                per_worker: self.core.worker_route_counts(),
            },
        })
    }
}
