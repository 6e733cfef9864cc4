//! `KvRouter`: the router's whole pure state — KV overlap source, policy and load view.
//!
//! # Load view
//! A worker's decode load is what it last reported (`update_load`) plus the blocks of
//! requests routed to it since that report (by this replica or, through `RouterEvent`s, by
//! its peers), which the report could not include yet. A report acknowledges every request
//! in flight on that worker. A finished request's blocks leave the view at once: from the
//! pending part if unacknowledged, else subtracted from the reported figure until the next
//! report replaces it. A request whose prompt is being prefilled on a prefill worker has not
//! reached its decode worker yet, so that worker's reports cannot count it: it stays
//! pending until its prefill is over ([`KvRouter::awaiting_prefill`],
//! [`KvRouter::prefill_over`]). The prefill pool (a `KvRouter` of its own) keeps the
//! same request pending on its prefill worker until the prefill is done
//! ([`KvRouter::on_request_finished`]): a prefill of one scheduler step is over before any
//! report of that worker counts it. Acknowledged at once, every such request would leave the
//! decode pool's view as soon as the next report came, and the pool would look idle while
//! each of its workers waits on prefills (every decode would then go to one worker).
//!
//! # Replicas
//! Several routers (one per frontend) keep one load view by publishing the
//! [`RouterEvent`] each decision and each finished request returns, and applying their
//! peers' ([`KvRouter::apply_router_event`]). In-flight requests are keyed by the replica
//! that routed them as well as their id, so two frontends' request ids never collide. A
//! peer's events that were lost (a sequence gap) or a peer that left make its requests
//! unknowable: [`KvRouter::forget_replica`] drops them, and the workers' load reports carry
//! that load from then on.
//!
//! # Quarantine
//! A worker the frontend found unreachable (its connection is gone) is left out of
//! selection until `now + UNREACHABLE_QUARANTINE` ([`KvRouter::mark_unreachable`]), with
//! its load and cached blocks kept, so a worker that was only cut off briefly keeps its
//! prefix affinity. Discovery drops a dead worker when its lease expires, which takes up to
//! a lease period; until then every request routed there would fail.

use super::config::{RouterConfig, RouterConfigError, RouterIndexMode};
use super::events::{RouterEvent, RouterEventKind, RouterReplicaId};
use super::policy::{Policy, RouteDecision, RouteError, RouteRequest, RoutingPolicy, WorkerLoad};
use crate::ids::{RequestId, WorkerId};
use crate::kv::approx::ApproxIndexer;
use crate::kv::hash::BlockHash;
use crate::kv::indexer::{FlashIndexer, OverlapScores};
use crate::worker::announce::LOAD_REPORT_EVERY;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

/// Where overlap scores come from.
pub enum IndexSource {
    /// Shared with the KV event subscribers, which `apply` batches into it.
    Events(Arc<FlashIndexer>),
    /// Approximate mode: this router's memory of what it (and its peers) sent where.
    Approximate(ApproxIndexer),
}

impl IndexSource {
    fn find_matches(&self, now: Duration, hashes: &[BlockHash]) -> OverlapScores {
        match self {
            IndexSource::Events(ix) => ix.find_matches(hashes),
            IndexSource::Approximate(ax) => ax.find_matches(now, hashes),
        }
    }

    fn block_count(&self) -> usize {
        match self {
            IndexSource::Events(ix) => ix.block_count(),
            IndexSource::Approximate(ax) => ax.block_count(),
        }
    }
}

/// Counters the actor shell exports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouterMetrics {
    pub decisions: u64,
    /// Sum over decisions of the chosen worker's overlap blocks.
    pub overlap_blocks: u64,
    /// Sum over decisions of the request's blocks.
    pub request_blocks: u64,
    /// Decisions whose chosen worker held at least one block.
    pub decisions_with_overlap: u64,
    pub no_worker_errors: u64,
    pub peer_events_applied: u64,
    /// Route requests answered "every worker is busy" (`router.busy_threshold`).
    #[serde(default)]
    pub all_busy: u64,
}

impl RouterMetrics {
    /// Fraction of request blocks found cached on the chosen worker (0 when no decisions).
    pub fn hit_rate(&self) -> f64 {
        if self.request_blocks == 0 {
            0.0
        } else {
            self.overlap_blocks as f64 / self.request_blocks as f64
        }
    }
}

/// Decisions this replica took for one worker (monotonic; kept after the worker leaves so
/// exported counters never go backwards).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRouteCounts {
    pub decisions: u64,
    /// Sum of the request blocks the index said this worker already held.
    pub overlap_blocks: u64,
    /// Sum of the blocks of the requests routed here.
    pub request_blocks: u64,
}

/// How long a worker that was found unreachable is left out of routing (see the module doc).
pub const UNREACHABLE_QUARANTINE: Duration = Duration::from_secs(5);

/// A decision plus the event to publish to peer replicas.
#[derive(Clone, Debug, PartialEq)]
pub struct Routed {
    pub decision: RouteDecision,
    pub event: RouterEvent,
}

#[derive(Clone, Debug, Default)]
struct LoadView {
    reported_blocks: u64,
    reported_requests: u32,
    pending_blocks: u64,
    pending_requests: u32,
    /// Left out of selection until then (unreachable for now; `Duration::MAX`: until
    /// lifted); its load and index entries are kept.
    suspended_until: Option<Duration>,
    /// A stream on it stalled: left out of selection until a load report shows it made
    /// progress since (see [`KvRouter::note_report`]).
    stalled: bool,
    /// Its engine's step count in its last load report (its progress).
    last_steps: u64,
    /// When a load report last showed its step count move (router time).
    progressed_at: Option<Duration>,
    /// `last_steps` when it was found stalled: a report proves it alive again only with more
    /// steps than this (or with nothing left to run). A worker whose engine is stuck keeps
    /// reporting (the reporter and the lease heartbeat are tasks of their own), so a report
    /// alone proves nothing.
    stalled_at_steps: u64,
    /// It said it is draining (its load report): no new requests.
    draining: bool,
    /// When its last load report arrived (router time).
    last_report: Option<Duration>,
}

impl LoadView {
    fn selectable(&self, now: Duration) -> bool {
        !self.stalled && !self.draining && self.suspended_until.is_none_or(|until| until <= now)
    }
}

impl LoadView {
    fn load(&self, worker: WorkerId) -> WorkerLoad {
        WorkerLoad {
            worker,
            active_blocks: self.reported_blocks + self.pending_blocks,
            active_requests: self.reported_requests.saturating_add(self.pending_requests),
        }
    }
}

/// An in-flight request: the replica that routed it and its id there.
type FlightKey = (RouterReplicaId, RequestId);

#[derive(Clone, Copy, Debug)]
struct InFlight {
    worker: WorkerId,
    blocks: u32,
    acknowledged: bool,
}

/// The router's pure state. Single owner (`&mut self`); the actor shell serialises calls.
pub struct KvRouter {
    config: RouterConfig,
    replica: RouterReplicaId,
    index: IndexSource,
    policy: Policy,
    workers: BTreeMap<WorkerId, LoadView>,
    in_flight: BTreeMap<FlightKey, InFlight>,
    /// Per worker, the requests routed there since its last load report (some may have
    /// finished since): a report acknowledges exactly these, without scanning `in_flight`.
    unacknowledged: BTreeMap<WorkerId, Vec<FlightKey>>,
    /// Requests of this replica routed here whose prompt is prefilled elsewhere: no report
    /// acknowledges them until the prefill is over.
    awaiting: BTreeSet<FlightKey>,
    next_seq: u64,
    metrics: RouterMetrics,
    per_worker: BTreeMap<WorkerId, WorkerRouteCounts>,
}

impl KvRouter {
    /// A router from its config. In `Events` mode `events_index` is the indexer the KV
    /// subscribers feed (a fresh one if `None`); in approximate mode it is ignored.
    pub fn new(
        replica: RouterReplicaId,
        config: RouterConfig,
        events_index: Option<Arc<FlashIndexer>>,
    ) -> Result<KvRouter, RouterConfigError> {
        config.validate()?;
        let index = match &config.index {
            RouterIndexMode::Events => IndexSource::Events(events_index.unwrap_or_default()),
            RouterIndexMode::Approximate(a) => IndexSource::Approximate(ApproxIndexer::new(a)),
        };
        Ok(KvRouter {
            policy: Policy::from_config(&config),
            config,
            replica,
            index,
            workers: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            unacknowledged: BTreeMap::new(),
            awaiting: BTreeSet::new(),
            next_seq: 0,
            metrics: RouterMetrics::default(),
            per_worker: BTreeMap::new(),
        })
    }

    pub fn config(&self) -> &RouterConfig {
        &self.config
    }

    pub fn replica(&self) -> RouterReplicaId {
        self.replica
    }

    /// The indexer, in events mode (for the KV event subscribers).
    pub fn events_index(&self) -> Option<&Arc<FlashIndexer>> {
        match &self.index {
            IndexSource::Events(ix) => Some(ix),
            IndexSource::Approximate(_) => None,
        }
    }

    /// Makes `worker` routable (again: a worker that re-joins leaves its quarantine).
    pub fn add_worker(&mut self, worker: WorkerId) {
        let view = self.workers.entry(worker).or_default();
        view.suspended_until = None;
        view.stalled = false;
    }

    /// Forget a worker: its load, its in-flight requests and its cached blocks.
    pub fn remove_worker(&mut self, worker: WorkerId) {
        self.workers.remove(&worker);
        self.unacknowledged.remove(&worker);
        self.in_flight.retain(|_, f| f.worker != worker);
        let in_flight = &self.in_flight;
        self.awaiting.retain(|k| in_flight.contains_key(k));
        match &mut self.index {
            IndexSource::Events(ix) => ix.remove_worker(worker),
            IndexSource::Approximate(ax) => ax.remove_worker(worker),
        }
    }

    /// Leaves `worker` out of (or back in) selection without forgetting its load or its
    /// cached blocks: for a worker that is unreachable for now but may come back.
    pub fn set_suspended(&mut self, worker: WorkerId, suspended: bool) {
        if let Some(view) = self.workers.get_mut(&worker) {
            view.suspended_until = suspended.then_some(Duration::MAX);
        }
    }

    /// The frontend could not reach `worker`: leave it out of selection for
    /// [`UNREACHABLE_QUARANTINE`] from `now`. True when it was not in quarantine already
    /// (the caller logs that once); false too for a worker the router does not know.
    pub fn mark_unreachable(&mut self, now: Duration, worker: WorkerId) -> bool {
        let Some(view) = self.workers.get_mut(&worker) else {
            return false;
        };
        if view.suspended_until.is_some_and(|until| until > now) {
            return false;
        }
        view.suspended_until = Some(now.saturating_add(UNREACHABLE_QUARANTINE));
        true
    }

    /// [`KvRouter::mark_unreachable`], and the event that tells peer replicas, when it newly
    /// quarantined `worker`.
    pub fn quarantine(&mut self, now: Duration, worker: WorkerId) -> Option<RouterEvent> {
        self.mark_unreachable(now, worker)
            .then(|| self.emit(RouterEventKind::Unreachable { worker }))
    }

    /// Leaves a draining worker out of selection (or lets it back in), keeping its load
    /// and cached blocks while its requests finish.
    pub fn set_draining(&mut self, worker: WorkerId, draining: bool) {
        if let Some(view) = self.workers.get_mut(&worker) {
            view.draining = draining;
        }
    }

    /// Notes that `worker`'s load report arrived at `now` (the liveness evidence
    /// [`KvRouter::check_stalled`] reads), with its engine's step count `steps` and its
    /// requests `active` (running and waiting). A stalled worker proves alive again, and is
    /// routed to again, when its steps moved past the count it had when it stalled, or it has
    /// nothing left to run (its stalled requests migrated away and were cancelled).
    pub fn note_report(&mut self, now: Duration, worker: WorkerId, steps: u64, active: u32) {
        if let Some(view) = self.workers.get_mut(&worker) {
            if view.last_report.is_none() || steps != view.last_steps {
                view.progressed_at = Some(now);
            }
            view.last_report = Some(now);
            view.last_steps = steps;
            if view.stalled && (steps > view.stalled_at_steps || active == 0) {
                view.stalled = false;
            }
        }
    }

    /// A stream on `worker` made no progress for `quiet_for`. If the worker has not
    /// reported its load within that time either (frozen, partitioned), or `force` (the
    /// silence is past the hard bound) and its reports showed no new engine step in that
    /// time (less two report periods of slack: it heartbeats, but its engine is stuck, or
    /// one step takes that long), it is stalled:
    /// left out of selection until a report shows progress ([`KvRouter::note_report`]).
    /// A worker whose engine keeps stepping is busy, not stalled: its queue is the
    /// admission limits' business, and moving its streams would only load another worker.
    /// Returns whether it is stalled; false means it is alive, only slow.
    pub fn check_stalled(
        &mut self,
        now: Duration,
        worker: WorkerId,
        quiet_for: Duration,
        force: bool,
    ) -> bool {
        self.check_stalled_event(now, worker, quiet_for, force).0
    }

    /// [`KvRouter::check_stalled`], and the event that tells peer replicas, when this check
    /// newly marked `worker` stalled.
    pub fn check_stalled_event(
        &mut self,
        now: Duration,
        worker: WorkerId,
        quiet_for: Duration,
        force: bool,
    ) -> (bool, Option<RouterEvent>) {
        let Some(view) = self.workers.get_mut(&worker) else {
            return (true, None); // gone from the router's view: nothing will come from it
        };
        let silent = view
            .last_report
            .is_none_or(|t| t.saturating_add(quiet_for) <= now);
        // No engine step planned since about when the stream went silent: its reports lag
        // a step by up to a report period, and the step that would have produced the next
        // token is planned right after the last one, so allow two periods.
        let window = quiet_for.saturating_sub(2 * LOAD_REPORT_EVERY);
        let stuck = view
            .progressed_at
            .is_none_or(|t| t.saturating_add(window) <= now);
        let newly = (silent || (force && stuck)) && !view.stalled;
        if newly {
            view.stalled = true;
            view.stalled_at_steps = view.last_steps;
        }
        let stalled = view.stalled;
        (
            stalled,
            newly.then(|| self.emit(RouterEventKind::Stalled { worker })),
        )
    }

    /// Whether `worker` is left out of selection at `now`.
    pub fn is_suspended(&self, now: Duration, worker: WorkerId) -> bool {
        self.workers
            .get(&worker)
            .is_some_and(|v| !v.selectable(now))
    }

    /// Workers it knows and, of those, how many it would route to at `now` (not in
    /// quarantine, not stalled, not draining): what readiness reports.
    pub fn routable(&self, now: Duration) -> (usize, usize) {
        let routable = self.workers.values().filter(|v| v.selectable(now)).count();
        (self.workers.len(), routable)
    }

    /// How many workers it would route to at `now` leaving out `besides` (the workers a
    /// migrating request must avoid): whether moving that request is worth trying.
    pub fn routable_besides(&self, now: Duration, besides: &[WorkerId]) -> usize {
        self.workers
            .iter()
            .filter(|(w, v)| !besides.contains(w) && v.selectable(now))
            .count()
    }

    /// Workers and their current load view, sorted by id.
    pub fn loads(&self) -> Vec<WorkerLoad> {
        self.workers.iter().map(|(w, v)| v.load(*w)).collect()
    }

    /// A worker's report of its decode load; acknowledges requests routed to it so far.
    pub fn update_load(&mut self, worker: WorkerId, active_blocks: u64, active_requests: u32) {
        let Some(view) = self.workers.get_mut(&worker) else {
            return; // not a worker we route to (yet)
        };
        *view = LoadView {
            reported_blocks: active_blocks,
            reported_requests: active_requests,
            pending_blocks: 0,
            pending_requests: 0,
            suspended_until: view.suspended_until,
            // Whether it is alive is the progress in its report (`note_report`).
            stalled: view.stalled,
            last_steps: view.last_steps,
            progressed_at: view.progressed_at,
            stalled_at_steps: view.stalled_at_steps,
            draining: view.draining,
            last_report: view.last_report,
        };
        let mut still = Vec::new();
        for key in self.unacknowledged.remove(&worker).unwrap_or_default() {
            let Some(f) = self.in_flight.get_mut(&key) else {
                continue;
            };
            if self.awaiting.contains(&key) {
                // Not on the worker yet: it stays pending, on top of the report.
                view.pending_blocks += u64::from(f.blocks);
                view.pending_requests = view.pending_requests.saturating_add(1);
                still.push(key);
            } else {
                f.acknowledged = true;
            }
        }
        if !still.is_empty() {
            self.unacknowledged.insert(worker, still);
        }
    }

    /// `request` (routed here by this replica) has its prompt prefilled on another worker
    /// first: its decode worker's reports cannot count it until [`KvRouter::prefill_over`].
    /// In a prefill pool: no report acknowledges it until it finishes (a one-step prefill
    /// is over before a report could count it).
    pub fn awaiting_prefill(&mut self, request: RequestId) {
        let key = (self.replica, request);
        if self.in_flight.contains_key(&key) {
            self.awaiting.insert(key);
        }
    }

    /// `request`'s remote prefill is over (done, or given up): its decode worker has it, or
    /// is about to, and its next report counts it.
    pub fn prefill_over(&mut self, request: RequestId) {
        self.awaiting.remove(&(self.replica, request));
    }

    /// Overlap of `hashes` per worker, from the configured source.
    pub fn find_matches(&self, now: Duration, hashes: &[BlockHash]) -> OverlapScores {
        self.index.find_matches(now, hashes)
    }

    /// Decide only: no state changes except the policy's own (round-robin position, RNG).
    pub fn select(
        &mut self,
        now: Duration,
        request: &RouteRequest,
    ) -> Result<RouteDecision, RouteError> {
        self.select_among(now, request, &|_| true)
    }

    /// [`KvRouter::select`] over the selectable workers `eligible` accepts (a gateway's
    /// subset of endpoints), never one of the request's `avoid` list.
    pub fn select_among(
        &mut self,
        now: Duration,
        request: &RouteRequest,
        eligible: &dyn Fn(WorkerId) -> bool,
    ) -> Result<RouteDecision, RouteError> {
        let overlaps = self.find_matches(now, &request.hashes);
        let mut loads: Vec<WorkerLoad> = self
            .workers
            .iter()
            .filter(|(w, v)| v.selectable(now) && eligible(**w) && !request.avoid.contains(w))
            .map(|(w, v)| v.load(*w))
            .collect();
        if let Some(busy) = self.config.busy_threshold {
            let any = !loads.is_empty();
            loads.retain(|l| l.active_requests < busy);
            if any && loads.is_empty() {
                self.metrics.all_busy += 1;
                return Err(RouteError::AllBusy {
                    hold_ms: self.config.queue_timeout_ms,
                });
            }
        }
        let result = self.policy.select(now, request, &loads, &overlaps);
        if result.is_err() {
            self.metrics.no_worker_errors += 1;
        }
        result
    }

    /// Decide and record: the request counts towards the chosen worker's load (and, in
    /// approximate mode, its blocks are assumed cached there). Publish `event` to peers.
    pub fn route(&mut self, now: Duration, request: &RouteRequest) -> Result<Routed, RouteError> {
        let decision = self.select(now, request)?;
        let event = self.on_request_routed(now, request, &decision);
        Ok(Routed { decision, event })
    }

    /// Record a decision taken by `select` (or by the caller); returns the event to publish.
    pub fn on_request_routed(
        &mut self,
        now: Duration,
        request: &RouteRequest,
        decision: &RouteDecision,
    ) -> RouterEvent {
        let m = &mut self.metrics;
        m.decisions += 1;
        m.overlap_blocks += u64::from(decision.overlap_blocks);
        m.request_blocks += u64::from(decision.request_blocks);
        if decision.overlap_blocks > 0 {
            m.decisions_with_overlap += 1;
        }
        let w = self.per_worker.entry(decision.worker).or_default();
        w.decisions += 1;
        w.overlap_blocks += u64::from(decision.overlap_blocks);
        w.request_blocks += u64::from(decision.request_blocks);
        let hashes = match &self.index {
            IndexSource::Approximate(_) => request.hashes.clone(),
            IndexSource::Events(_) => Vec::new(),
        };
        let kind = RouterEventKind::Routed {
            request: request.id,
            worker: decision.worker,
            blocks: decision.request_blocks,
            hashes,
        };
        self.apply_kind(now, self.replica, &kind, &request.hashes);
        self.emit(kind)
    }

    /// A request ended; returns the event to publish (none if it was unknown).
    pub fn on_request_finished(&mut self, request: RequestId) -> Option<RouterEvent> {
        let kind = RouterEventKind::Finished { request };
        let key = (self.replica, request);
        self.in_flight.contains_key(&key).then(|| {
            self.finish(key);
            self.emit(kind)
        })
    }

    /// Apply a peer replica's event to this replica's view. Own events (echoed back) are
    /// ignored; returns whether it was a peer's.
    pub fn apply_router_event(&mut self, now: Duration, event: &RouterEvent) -> bool {
        if event.replica == self.replica {
            return false;
        }
        self.metrics.peer_events_applied += 1;
        let hashes = match &event.kind {
            RouterEventKind::Routed { hashes, .. } => hashes.as_slice(),
            RouterEventKind::Finished { .. }
            | RouterEventKind::Unreachable { .. }
            | RouterEventKind::Stalled { .. } => &[],
        };
        self.apply_kind(now, event.replica, &event.kind, hashes);
        true
    }

    /// Forgets every in-flight request `replica` routed (its events were lost, or it left):
    /// their load leaves the view now, and the workers' next load reports count what still
    /// runs. Returns how many were dropped. Its approximate-mode entries stay (they expire
    /// on their TTL like this replica's own).
    pub fn forget_replica(&mut self, replica: RouterReplicaId) -> usize {
        if replica == self.replica {
            return 0;
        }
        let keys: Vec<FlightKey> = self
            .in_flight
            .keys()
            .filter(|(r, _)| *r == replica)
            .copied()
            .collect();
        for key in &keys {
            self.finish(*key);
        }
        for pending in self.unacknowledged.values_mut() {
            pending.retain(|(r, _)| *r != replica);
        }
        keys.len()
    }

    fn apply_kind(
        &mut self,
        now: Duration,
        origin: RouterReplicaId,
        kind: &RouterEventKind,
        hashes: &[BlockHash],
    ) {
        match kind {
            RouterEventKind::Routed {
                request,
                worker,
                blocks,
                ..
            } => {
                let Some(view) = self.workers.get_mut(worker) else {
                    return;
                };
                let key = (origin, *request);
                if self.in_flight.contains_key(&key) {
                    return; // duplicate delivery
                }
                view.pending_blocks += u64::from(*blocks);
                view.pending_requests = view.pending_requests.saturating_add(1);
                self.in_flight.insert(
                    key,
                    InFlight {
                        worker: *worker,
                        blocks: *blocks,
                        acknowledged: false,
                    },
                );
                self.unacknowledged.entry(*worker).or_default().push(key);
                if let IndexSource::Approximate(ax) = &mut self.index {
                    ax.record(now, *worker, hashes);
                }
            }
            RouterEventKind::Finished { request } => self.finish((origin, *request)),
            // A peer's marks are applied like this replica's own, but never re-published.
            RouterEventKind::Unreachable { worker } => {
                self.mark_unreachable(now, *worker);
            }
            RouterEventKind::Stalled { worker } => {
                if let Some(view) = self.workers.get_mut(worker) {
                    if !view.stalled {
                        view.stalled = true;
                        view.stalled_at_steps = view.last_steps;
                    }
                }
            }
        }
    }

    fn finish(&mut self, key: FlightKey) {
        self.awaiting.remove(&key);
        let Some(f) = self.in_flight.remove(&key) else {
            return;
        };
        let Some(view) = self.workers.get_mut(&f.worker) else {
            return;
        };
        if f.acknowledged {
            view.reported_blocks = view.reported_blocks.saturating_sub(u64::from(f.blocks));
            view.reported_requests = view.reported_requests.saturating_sub(1);
        } else {
            view.pending_blocks = view.pending_blocks.saturating_sub(u64::from(f.blocks));
            view.pending_requests = view.pending_requests.saturating_sub(1);
        }
    }

    fn emit(&mut self, kind: RouterEventKind) -> RouterEvent {
        let seq = self.next_seq;
        self.next_seq += 1;
        RouterEvent {
            replica: self.replica,
            seq,
            kind,
        }
    }

    /// Drop approximate-mode entries expired at `now` (a no-op in events mode).
    pub fn expire(&mut self, now: Duration) {
        if let IndexSource::Approximate(ax) = &mut self.index {
            ax.expire(now);
        }
    }

    /// Requests routed and not finished, as far as this replica knows.
    pub fn in_flight_count(&self) -> usize {
        self.in_flight.len()
    }

    /// Requests in flight per worker (this replica's and its peers'), sorted by worker;
    /// every known worker is listed, with 0 when it runs none.
    pub fn in_flight_by_worker(&self) -> Vec<(WorkerId, u32)> {
        let mut counts: BTreeMap<WorkerId, u32> = self.workers.keys().map(|w| (*w, 0)).collect();
        for f in self.in_flight.values() {
            *counts.entry(f.worker).or_default() += 1;
        }
        counts.into_iter().collect()
    }

    /// Distinct blocks in the overlap source.
    pub fn index_size(&self) -> usize {
        self.index.block_count()
    }

    pub fn metrics(&self) -> RouterMetrics {
        self.metrics
    }

    /// Per-worker decision counts of this replica, sorted by worker.
    pub fn worker_route_counts(&self) -> Vec<(WorkerId, WorkerRouteCounts)> {
        self.per_worker.iter().map(|(w, c)| (*w, *c)).collect()
    }
}

#[cfg(test)]
mod liveness_tests {
    use super::*;

    fn router() -> KvRouter {
        let mut r = KvRouter::new(RouterReplicaId(0), RouterConfig::default(), None).unwrap();
        r.add_worker(WorkerId(1));
        r.add_worker(WorkerId(2));
        r
    }

    const S: Duration = Duration::from_secs(1);

    fn request(id: u64, blocks: usize) -> RouteRequest {
        RouteRequest {
            id: RequestId(id),
            hashes: Vec::new(),
            token_count: blocks * 16,
            avoid: Vec::new(),
            overrides: Default::default(),
        }
    }

    /// `w`'s load as the router sees it.
    fn load(r: &KvRouter, w: WorkerId) -> WorkerLoad {
        r.loads().into_iter().find(|l| l.worker == w).unwrap()
    }

    #[test]
    fn a_request_prefilled_elsewhere_stays_in_its_decode_workers_load_until_the_prefill_is_over() {
        let mut r = router();
        let first = r
            .route(Duration::ZERO, &request(1, 6))
            .unwrap()
            .decision
            .worker;
        r.awaiting_prefill(RequestId(1));
        // The decode worker reports before the request reaches it: still counted.
        r.update_load(first, 0, 0);
        assert_eq!(load(&r, first).active_requests, 1);
        assert!(load(&r, first).active_blocks > 0);
        // So the next request goes to the other, idle, worker.
        let second = r
            .route(Duration::ZERO, &request(2, 6))
            .unwrap()
            .decision
            .worker;
        assert_ne!(second, first);
        // Once the prefill is over, the worker's next report is the truth.
        r.prefill_over(RequestId(1));
        r.update_load(first, 0, 0);
        assert_eq!(load(&r, first).active_requests, 0);
        // A request routed without a remote prefill is acknowledged by the next report.
        r.update_load(second, 0, 0);
        assert_eq!(load(&r, second).active_requests, 0);
    }

    #[test]
    fn a_prefill_stays_in_its_prefill_workers_load_until_it_is_done() {
        // The prefill pool: a report sent before (or while) the prefill ran shows nothing;
        // the request still counts, so the next prefill goes to the other, idle, worker.
        let mut r = router();
        let first = r
            .route(Duration::ZERO, &request(1, 6))
            .unwrap()
            .decision
            .worker;
        r.awaiting_prefill(RequestId(1));
        r.update_load(first, 0, 0);
        assert_eq!(load(&r, first).active_requests, 1);
        let second = r
            .route(Duration::ZERO, &request(2, 6))
            .unwrap()
            .decision
            .worker;
        assert_ne!(second, first);
        // Done: it leaves the view at once, whatever the reports said.
        assert!(r.on_request_finished(RequestId(1)).is_some());
        assert_eq!(load(&r, first).active_requests, 0);
        r.update_load(first, 0, 0);
        assert_eq!(load(&r, first).active_requests, 0);
    }

    #[test]
    fn a_silent_worker_is_stalled_until_it_reports_a_reporting_one_is_only_slow() {
        let mut r = router();
        r.note_report(Duration::ZERO, WorkerId(1), 10, 1);
        r.note_report(3 * S, WorkerId(2), 10, 1);
        // Both streams silent for 2 s at t=4 s: worker 1 has not reported since t=0.
        assert!(r.check_stalled(4 * S, WorkerId(1), 2 * S, false));
        assert!(!r.check_stalled(4 * S, WorkerId(2), 2 * S, false));
        assert!(r.is_suspended(4 * S, WorkerId(1)));
        assert!(!r.is_suspended(4 * S, WorkerId(2)));
        // Past the slow bound a reporting worker whose engine steps is busy, not stalled;
        // one whose steps did not move in that time is stalled.
        assert!(!r.check_stalled(4 * S, WorkerId(2), 8 * S, true));
        r.note_report(9 * S, WorkerId(2), 10, 1);
        assert!(r.check_stalled(9 * S, WorkerId(2), 8 * S, true));
        // A report with progress proves it alive again.
        r.update_load(WorkerId(1), 0, 1);
        r.note_report(5 * S, WorkerId(1), 11, 1);
        assert!(!r.is_suspended(5 * S, WorkerId(1)));
        // A worker the router does not know is gone: stalled.
        assert!(r.check_stalled(5 * S, WorkerId(9), S, false));
    }

    #[test]
    fn a_stuck_worker_that_keeps_reporting_stays_out_until_its_engine_moves() {
        let mut r = router();
        r.note_report(Duration::ZERO, WorkerId(1), 40, 3);
        // Its stream has been silent past the bound while it reports: stalled.
        assert!(r.check_stalled(S, WorkerId(1), S, true));
        // Heartbeats with the same step count (the engine is stuck) do not lift it, however
        // many arrive; asking again does not move the mark either.
        for t in 2..6 {
            r.update_load(WorkerId(1), 8, 3);
            r.note_report(t * S, WorkerId(1), 40, 3);
            assert!(
                r.is_suspended(t * S, WorkerId(1)),
                "a heartbeat without progress"
            );
        }
        assert!(r.check_stalled(6 * S, WorkerId(1), S, true));
        // One step more: alive.
        r.note_report(7 * S, WorkerId(1), 41, 3);
        assert!(!r.is_suspended(7 * S, WorkerId(1)));
        // Stalled again, then its requests are gone (migrated and cancelled): nothing left
        // to be stuck on, so it may take requests again.
        assert!(r.check_stalled(8 * S, WorkerId(1), S, true));
        r.note_report(9 * S, WorkerId(1), 41, 0);
        assert!(!r.is_suspended(9 * S, WorkerId(1)));
    }

    #[test]
    fn routable_counts_leave_out_quarantined_stalled_and_draining_workers() {
        let mut r = router();
        r.add_worker(WorkerId(3));
        r.add_worker(WorkerId(4));
        assert_eq!(r.routable(Duration::ZERO), (4, 4));
        assert!(r.mark_unreachable(Duration::ZERO, WorkerId(1)));
        r.set_suspended(WorkerId(2), true);
        assert!(r.check_stalled(S, WorkerId(3), S, true));
        r.set_draining(WorkerId(4), true);
        assert_eq!(r.routable(S), (4, 0));
        // The unreachable worker's quarantine ends on its own.
        assert_eq!(r.routable(UNREACHABLE_QUARANTINE), (4, 1));
    }

    /// Replica sync of marks: a worker one replica finds unreachable or stalled is left out
    /// by a peer that applies its event (through the wire format), once; the peer lifts the
    /// marks as it would its own (quarantine expiry, a report with progress), and applying
    /// a peer's mark publishes nothing.
    #[test]
    fn quarantine_and_stall_marks_reach_peer_replicas() {
        let mut a = router();
        let mut b = KvRouter::new(RouterReplicaId(1), RouterConfig::default(), None).unwrap();
        b.add_worker(WorkerId(1));
        b.add_worker(WorkerId(2));
        let wire = |e: &RouterEvent| RouterEvent::from_msgpack(&e.to_msgpack().unwrap()).unwrap();
        let ev = a.quarantine(S, WorkerId(1)).expect("newly quarantined");
        assert_eq!(
            ev.kind,
            RouterEventKind::Unreachable {
                worker: WorkerId(1)
            }
        );
        assert!(
            a.quarantine(S, WorkerId(1)).is_none(),
            "already in quarantine"
        );
        assert!(b.apply_router_event(S, &wire(&ev)));
        assert!(b.is_suspended(S, WorkerId(1)));
        assert_eq!(b.routable(S), (2, 1));
        assert!(!b.is_suspended(S + UNREACHABLE_QUARANTINE, WorkerId(1)));

        a.note_report(Duration::ZERO, WorkerId(2), 10, 1);
        b.note_report(Duration::ZERO, WorkerId(2), 10, 1);
        let (stalled, ev) = a.check_stalled_event(4 * S, WorkerId(2), 2 * S, false);
        let ev = ev.expect("newly stalled");
        assert!(stalled);
        assert_eq!(
            ev.kind,
            RouterEventKind::Stalled {
                worker: WorkerId(2)
            }
        );
        assert_eq!(ev.seq, 1, "one event per mark");
        assert_eq!(
            a.check_stalled_event(5 * S, WorkerId(2), 2 * S, false),
            (true, None)
        );
        assert!(b.apply_router_event(4 * S, &wire(&ev)));
        assert!(b.is_suspended(4 * S, WorkerId(2)));
        // A heartbeat without progress does not lift the peer's mark; a step more does.
        b.note_report(5 * S, WorkerId(2), 10, 1);
        assert!(b.is_suspended(5 * S, WorkerId(2)));
        b.note_report(6 * S, WorkerId(2), 11, 1);
        assert!(!b.is_suspended(6 * S, WorkerId(2)));
        // Its own event echoed back is ignored.
        assert!(!a.apply_router_event(6 * S, &ev));
    }

    #[test]
    fn routable_besides_leaves_out_the_workers_a_request_avoids() {
        let mut r = router();
        r.add_worker(WorkerId(3));
        assert_eq!(r.routable_besides(Duration::ZERO, &[]), 3);
        assert!(r.check_stalled(S, WorkerId(1), S, true));
        assert_eq!(r.routable_besides(S, &[]), 2);
        // The only routable workers left are ones this request already ran on.
        assert_eq!(r.routable_besides(S, &[WorkerId(2), WorkerId(3)]), 0);
        assert_eq!(r.routable_besides(S, &[WorkerId(2)]), 1);
    }

    #[test]
    fn a_draining_worker_is_left_out_until_it_says_otherwise() {
        let mut r = router();
        r.set_draining(WorkerId(1), true);
        assert!(r.is_suspended(Duration::ZERO, WorkerId(1)));
        r.update_load(WorkerId(1), 0, 0);
        assert!(
            r.is_suspended(Duration::ZERO, WorkerId(1)),
            "a report keeps it draining"
        );
        r.set_draining(WorkerId(1), false);
        assert!(!r.is_suspended(Duration::ZERO, WorkerId(1)));
    }
}
