//! The simulated cluster: one router node (node 0: frontend + router + KV indexer) and N
//! worker nodes, advanced by the discrete-event queue.
//!
//! # Failure handling policy (what the router does when a worker is lost)
//! Workers heartbeat on the event plane every `heartbeat`; a worker not heard from for
//! `lease` is declared down (a crash looks the same as a partition from the router's side).
//! Declaring a worker down removes it from the router, which drops all its blocks from the
//! index. Each request that was running there is *migrated*: re-routed with its prompt plus
//! the tokens already streamed to the client as the new prompt and the remaining tokens as
//! `max_tokens` (the client sees one uninterrupted stream), up to `max_attempts` attempts in
//! all; past that it fails with an error. A worker that is heard from again (partition
//! healed, or restarted under a fresh id) rejoins: the router cancels the attempts it gave
//! up on there and asks for a KV snapshot (resync) before trusting its events. A gap in a
//! worker's KV event sequence (a lost batch) also triggers a resync.
//!
//! # Run end
//! The run stops once every request is resolved, every fault is over plus `settle`, every
//! live worker is idle and the index agrees with the workers; then invariants are checked.

use crate::eventlog::EventLog;
use crate::faults::FaultPlan;
use crate::network::{NetConfig, NetStats, Network, NodeId, Plane};
use crate::profile::Profile;
use crate::queue::EventQueue;
use crate::real_router::RealRouter;
use crate::rng::{SeedSplitter, Stream};
use crate::router::{PolicyName, SimRouter, StandInRouter};
use crate::time::{SimDuration, SimTime};
use crate::worker::{IndexedOutput, SimWorker};
use crate::workload::RequestSpec;
use rand::Rng;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use turbine_actors::ids::{RequestId, TokenId, WorkerId};
use turbine_actors::kv::{hash_blocks, BlockHash, KvEventBatch};
use turbine_actors::protocol::{FinishReason, PreprocessedRequest, SamplingParams, StopConditions};

/// Everything that shapes a run besides the workload.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub seed: u64,
    pub workers: u32,
    pub profile: Profile,
    pub policy: PolicyName,
    pub router_impl: RouterImpl,
    pub net: NetConfig,
    pub faults: FaultPlan,
    pub max_attempts: u32,
    pub heartbeat: SimDuration,
    pub lease: SimDuration,
    pub settle: SimDuration,
    /// Keep the event log as text lines too (memory grows with the run).
    pub keep_event_log: bool,
}

impl SimConfig {
    pub fn new(seed: u64, workers: u32, profile: Profile) -> Self {
        SimConfig {
            seed,
            workers,
            profile,
            policy: PolicyName::Kv,
            router_impl: RouterImpl::Real,
            net: NetConfig::default(),
            faults: FaultPlan::default(),
            max_attempts: 3,
            heartbeat: SimDuration::from_millis(250),
            lease: SimDuration::from_millis(1000),
            settle: SimDuration::from_millis(3000),
            keep_event_log: false,
        }
    }
}

/// How a request ended.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub enum Outcome {
    Completed,
    Failed(String),
}

/// One request's client-side record.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RequestRecord {
    pub arrival: SimTime,
    pub input_len: u32,
    pub output_len: u32,
    /// When each streamed token reached the client (router), in order.
    pub token_times: Vec<SimTime>,
    pub finished: Option<SimTime>,
    pub outcome: Option<Outcome>,
    pub attempts: u32,
    /// How many times the request was resolved (must be exactly 1).
    pub resolutions: u32,
}

impl RequestRecord {
    /// A request that has not arrived yet.
    pub fn new(spec: &RequestSpec) -> Self {
        RequestRecord {
            arrival: spec.arrival,
            input_len: spec.input_len,
            output_len: spec.output_len,
            token_times: Vec::new(),
            finished: None,
            outcome: None,
            attempts: 0,
            resolutions: 0,
        }
    }
}

/// Invariant 1: every request resolved exactly once, and a completed one with exactly its
/// output length.
pub fn request_violations(records: &[RequestRecord]) -> Vec<String> {
    let mut violations = Vec::new();
    for (i, r) in records.iter().enumerate() {
        if r.resolutions != 1 {
            violations.push(format!("request {i} resolved {} times", r.resolutions));
        }
        if r.outcome == Some(Outcome::Completed) && r.token_times.len() != r.output_len as usize {
            violations.push(format!(
                "request {i} completed with {} of {} tokens",
                r.token_times.len(),
                r.output_len
            ));
        }
    }
    violations
}

/// Per-worker-slot figures.
#[derive(Clone, Debug, serde::Serialize)]
pub struct WorkerRecord {
    pub slot: u32,
    pub final_id: WorkerId,
    pub busy_s: f64,
    pub steps: u64,
    pub crashes: u32,
    pub prefix_query_tokens: u64,
    pub prefix_hit_tokens: u64,
}

/// The raw result of a run (see `report` for the derived figures).
#[derive(Clone, Debug, serde::Serialize)]
pub struct SimOutcome {
    pub router_impl: String,
    pub end: SimTime,
    pub event_log_hash: u64,
    pub events: u64,
    pub requests: Vec<RequestRecord>,
    pub workers: Vec<WorkerRecord>,
    pub net: NetStats,
    pub resyncs: u64,
    pub leases_expired: u64,
    pub migrations: u64,
    /// Router-side prefix overlap: blocks predicted cached / blocks routed.
    pub routed_overlap_blocks: u64,
    pub routed_blocks: u64,
    pub invariant_violations: Vec<String>,
    #[serde(skip)]
    pub event_log_lines: Option<Vec<String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("invalid engine profile: {0}")]
    Config(#[from] turbine_actors::worker::ConfigError),
    #[error("invalid router config: {0}")]
    Router(#[from] turbine_actors::router::RouterConfigError),
    #[error("the simulation needs at least one worker")]
    NoWorkers,
    #[error("starting the actor shells: {0}")]
    Shells(String),
}

enum WorkerMsg {
    Submit(PreprocessedRequest),
    Cancel(RequestId),
    Resync,
}

enum RouterMsg {
    Outputs(Vec<IndexedOutput>),
    Kv(KvEventBatch),
    Snapshot {
        next_seq: u64,
        hashes: Vec<BlockHash>,
    },
    Heartbeat {
        next_seq: u64,
        active_blocks: u64,
        active_requests: u32,
    },
}

enum Ev {
    Arrive(usize),
    ToWorker { to: WorkerId, msg: WorkerMsg },
    ToRouter { from: WorkerId, msg: RouterMsg },
    StepDone { worker: WorkerId },
    Crash { slot: u32, down_for: SimDuration },
    Restart { slot: u32 },
    Heartbeat { worker: WorkerId },
    LeaseCheck,
}

struct Member {
    last_heard: SimTime,
    next_seq: u64,
    resyncing: bool,
}

/// The router node's view of one request.
struct ReqState {
    prompt: Vec<TokenId>,
    /// Current attempt: (worker, attempt request id).
    current: Option<(WorkerId, RequestId)>,
    /// Tokens received in order (over all attempts).
    tokens: Vec<TokenId>,
    /// Tokens generated by earlier attempts (the current attempt's indices start here).
    base: u32,
    /// Out-of-order outputs of the current attempt, by attempt-local index.
    parked: BTreeMap<u32, IndexedOutput>,
}

struct Sim<'a> {
    cfg: &'a SimConfig,
    workload: &'a [RequestSpec],
    q: EventQueue<Ev>,
    log: EventLog,
    net: Network,
    router: Box<dyn SimRouter>,
    members: BTreeMap<WorkerId, Member>,
    workers: Vec<SimWorker>, // index = slot - 1
    /// Every worker id ever used (incarnations included) → its slot.
    slot_by_id: BTreeMap<WorkerId, u32>,
    next_worker_id: u64,
    reqs: Vec<ReqState>,
    records: Vec<RequestRecord>,
    /// Attempt ids currently assigned per worker.
    assigned: BTreeMap<WorkerId, BTreeSet<RequestId>>,
    /// Attempts given up on, to cancel if the worker comes back.
    abandoned: BTreeMap<WorkerId, Vec<RequestId>>,
    /// Requests waiting for any worker to be up.
    backlog: VecDeque<usize>,
    unresolved: usize,
    resyncs: u64,
    leases_expired: u64,
    migrations: u64,
    routed_overlap_blocks: u64,
    routed_blocks: u64,
}

const ATTEMPT_BITS: u32 = 8;

fn attempt_id(req: usize, attempt: u32) -> RequestId {
    RequestId(((req as u64) << ATTEMPT_BITS) | u64::from(attempt))
}

fn req_of(id: RequestId) -> usize {
    (id.0 >> ATTEMPT_BITS) as usize
}

fn slot_node(slot: u32) -> NodeId {
    NodeId(slot)
}

/// Which router implementation a run uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum RouterImpl {
    /// `turbine_actors::router::KvRouter` + `FlashIndexer`: the logic the router actor runs.
    Real,
    /// The simulator's own small router (a cross-check).
    StandIn,
}

/// Runs one simulation to completion with the router `cfg.router_impl` names.
pub fn simulate(cfg: &SimConfig, workload: &[RequestSpec]) -> Result<SimOutcome, SimError> {
    let mut rng = SeedSplitter::new(cfg.seed).stream(Stream::Router);
    let router: Box<dyn SimRouter> = match cfg.router_impl {
        RouterImpl::Real => Box::new(RealRouter::new(
            cfg.policy,
            cfg.profile.block_size(),
            rng.gen(),
        )?),
        RouterImpl::StandIn => Box::new(StandInRouter::new(
            cfg.policy,
            cfg.profile.block_size(),
            rng,
        )),
    };
    simulate_with(cfg, workload, router)
}

/// Runs one simulation with a caller-supplied router implementation.
pub fn simulate_with(
    cfg: &SimConfig,
    workload: &[RequestSpec],
    router: Box<dyn SimRouter>,
) -> Result<SimOutcome, SimError> {
    if cfg.workers == 0 {
        return Err(SimError::NoWorkers);
    }
    let seeds = SeedSplitter::new(cfg.seed);
    let mut workers = Vec::with_capacity(cfg.workers as usize);
    for slot in 1..=cfg.workers {
        workers.push(SimWorker::new(WorkerId(u64::from(slot)), &cfg.profile)?);
    }
    let mut sim = Sim {
        cfg,
        workload,
        q: EventQueue::default(),
        log: EventLog::new(cfg.keep_event_log),
        net: Network::new(
            cfg.net.clone(),
            cfg.faults.partitions.clone(),
            seeds.stream(Stream::Network),
        ),
        router,
        members: BTreeMap::new(),
        slot_by_id: (1..=cfg.workers)
            .map(|s| (WorkerId(u64::from(s)), s))
            .collect(),
        workers,
        next_worker_id: u64::from(cfg.workers) + 1,
        reqs: Vec::with_capacity(workload.len()),
        records: Vec::with_capacity(workload.len()),
        assigned: BTreeMap::new(),
        abandoned: BTreeMap::new(),
        backlog: VecDeque::new(),
        unresolved: workload.len(),
        resyncs: 0,
        leases_expired: 0,
        migrations: 0,
        routed_overlap_blocks: 0,
        routed_blocks: 0,
    };
    sim.init();
    sim.run();
    Ok(sim.finish())
}

impl Sim<'_> {
    fn init(&mut self) {
        for (i, r) in self.workload.iter().enumerate() {
            self.records.push(RequestRecord::new(r));
            self.reqs.push(ReqState {
                prompt: Vec::new(),
                current: None,
                tokens: Vec::new(),
                base: 0,
                parked: BTreeMap::new(),
            });
            self.q.push(r.arrival, Ev::Arrive(i));
        }
        for w in &self.workers {
            self.router.add_worker(w.id);
            self.members.insert(
                w.id,
                Member {
                    last_heard: SimTime::ZERO,
                    next_seq: 0,
                    resyncing: false,
                },
            );
            self.q.push(
                SimTime::ZERO.plus(self.cfg.heartbeat),
                Ev::Heartbeat { worker: w.id },
            );
        }
        for c in &self.cfg.faults.crashes {
            self.q.push(
                c.at,
                Ev::Crash {
                    slot: c.slot,
                    down_for: c.down_for,
                },
            );
        }
        self.q
            .push(SimTime::ZERO.plus(self.cfg.heartbeat), Ev::LeaseCheck);
    }

    fn quiet_after(&self) -> SimTime {
        self.cfg.faults.last_fault_end().plus(self.cfg.settle)
    }

    fn run(&mut self) {
        let last_arrival = self.workload.last().map(|r| r.arrival).unwrap_or_default();
        // A backstop against a run that never settles (reported as invariant violations).
        let hard_stop = last_arrival
            .max(self.quiet_after())
            .plus(SimDuration::from_secs_f64(3600.0));
        let mut all_resolved_at: Option<SimTime> = None;
        while let Some((now, ev)) = self.q.pop() {
            let is_check = matches!(ev, Ev::LeaseCheck);
            self.handle(now, ev);
            if self.unresolved == 0 && all_resolved_at.is_none() {
                all_resolved_at = Some(now);
            }
            if now >= hard_stop {
                break;
            }
            let (true, Some(done_at)) = (is_check, all_resolved_at) else {
                continue;
            };
            if now < self.quiet_after() {
                continue;
            }
            let waited_long = now.since(done_at) > SimDuration::from_secs_f64(120.0)
                && now.since(self.quiet_after()) > SimDuration::from_secs_f64(120.0);
            if waited_long || self.settled() {
                break;
            }
        }
    }

    fn worker_mut(&mut self, id: WorkerId) -> Option<&mut SimWorker> {
        let slot = self.slot_of(id)?;
        self.workers
            .get_mut(slot as usize - 1)
            .filter(|w| w.id == id && w.alive)
    }

    fn slot_of(&self, id: WorkerId) -> Option<u32> {
        self.slot_by_id.get(&id).copied()
    }

    fn send_to_worker(&mut self, now: SimTime, to: WorkerId, msg: WorkerMsg) {
        let Some(slot) = self.slot_of(to) else { return };
        if let Some(at) = self
            .net
            .deliver_at(now, NodeId::ROUTER, slot_node(slot), Plane::Request)
        {
            self.q.push(at, Ev::ToWorker { to, msg });
        }
    }

    fn send_to_router(&mut self, now: SimTime, from: WorkerId, msg: RouterMsg, plane: Plane) {
        let Some(slot) = self.slot_of(from) else {
            return;
        };
        if let Some(at) = self
            .net
            .deliver_at(now, slot_node(slot), NodeId::ROUTER, plane)
        {
            self.q.push(at, Ev::ToRouter { from, msg });
        }
    }

    fn handle(&mut self, now: SimTime, ev: Ev) {
        match ev {
            Ev::Arrive(i) => {
                self.log.record(now, "arrive", i as u64, 0, 0);
                self.reqs[i].prompt = self.workload[i].prompt(i as u64);
                self.dispatch(now, i);
            }
            Ev::ToWorker { to, msg } => self.on_worker_msg(now, to, msg),
            Ev::ToRouter { from, msg } => self.on_router_msg(now, from, msg),
            Ev::StepDone { worker } => self.on_step_done(now, worker),
            Ev::Crash { slot, down_for } => self.on_crash(now, slot, down_for),
            Ev::Restart { slot } => self.on_restart(now, slot),
            Ev::Heartbeat { worker } => {
                let Some(w) = self.worker_mut(worker) else {
                    return;
                };
                let next_seq = w.kv_seq;
                let active_blocks = w.scheduler().stats().load_blocks();
                let active_requests =
                    (w.scheduler().num_running() + w.scheduler().num_waiting()) as u32;
                self.log
                    .record(now, "hb", worker.0, next_seq, active_blocks);
                let msg = RouterMsg::Heartbeat {
                    next_seq,
                    active_blocks,
                    active_requests,
                };
                self.send_to_router(now, worker, msg, Plane::Event);
                self.q
                    .push(now.plus(self.cfg.heartbeat), Ev::Heartbeat { worker });
            }
            Ev::LeaseCheck => {
                self.on_lease_check(now);
                self.q.push(now.plus(self.cfg.heartbeat), Ev::LeaseCheck);
            }
        }
    }

    // ---- router node -------------------------------------------------------------------

    /// Routes request `i` (a new attempt) or parks it until a worker is up.
    fn dispatch(&mut self, now: SimTime, i: usize) {
        let attempt = self.records[i].attempts;
        if attempt >= self.cfg.max_attempts {
            self.resolve(
                now,
                i,
                Outcome::Failed(format!("gave up after {attempt} attempts (workers lost)")),
            );
            return;
        }
        let rec = &self.records[i];
        let id = attempt_id(i, attempt);
        let st = &self.reqs[i];
        let mut tokens = st.prompt.clone();
        tokens.extend_from_slice(&st.tokens);
        let remaining = rec.output_len.saturating_sub(st.tokens.len() as u32);
        let hashes = hash_blocks(&tokens, self.cfg.profile.block_size(), 0);
        let Some(choice) = self.router.route(now, id, &hashes, tokens.len()) else {
            self.log.record(now, "backlog", i as u64, 0, 0);
            self.backlog.push_back(i);
            return;
        };
        self.records[i].attempts += 1;
        self.routed_blocks += hashes.len() as u64;
        self.routed_overlap_blocks += u64::from(choice.overlap_blocks);
        self.log.record(
            now,
            "route",
            id.0,
            choice.worker.0,
            u64::from(choice.overlap_blocks),
        );
        let st = &mut self.reqs[i];
        st.current = Some((choice.worker, id));
        st.base = st.tokens.len() as u32;
        st.parked.clear();
        self.assigned.entry(choice.worker).or_default().insert(id);
        let req = PreprocessedRequest {
            id,
            token_ids: tokens,
            sampling: SamplingParams::greedy(),
            stop: StopConditions {
                max_tokens: remaining.max(1),
                stop_token_ids: vec![],
                ignore_eos: true,
            },
            logprobs: None,
            salt: 0,
        };
        self.send_to_worker(now, choice.worker, WorkerMsg::Submit(req));
    }

    fn resolve(&mut self, now: SimTime, i: usize, outcome: Outcome) {
        let rec = &mut self.records[i];
        rec.resolutions += 1;
        if rec.resolutions == 1 {
            self.unresolved -= 1;
        }
        let code = matches!(outcome, Outcome::Failed(_)) as u64;
        rec.finished = Some(now);
        rec.outcome = Some(outcome);
        self.log
            .record(now, "resolve", i as u64, code, rec.token_times.len() as u64);
        let st = &mut self.reqs[i];
        if let Some((w, id)) = st.current.take() {
            self.router.on_finished(id);
            if let Some(set) = self.assigned.get_mut(&w) {
                set.remove(&id);
            }
        }
        st.prompt = Vec::new();
        st.tokens = Vec::new();
        st.parked.clear();
    }

    fn on_router_msg(&mut self, now: SimTime, from: WorkerId, msg: RouterMsg) {
        match msg {
            RouterMsg::Outputs(outs) => {
                self.log
                    .record(now, "outputs", from.0, outs.len() as u64, 0);
                for o in outs {
                    self.on_output(now, o);
                }
            }
            RouterMsg::Heartbeat {
                next_seq,
                active_blocks,
                active_requests,
            } => {
                self.log
                    .record(now, "hb_rx", from.0, next_seq, active_blocks);
                self.on_heard(now, from);
                if self.members.contains_key(&from) {
                    self.router
                        .update_load(from, active_blocks, active_requests);
                }
                if let Some(m) = self.members.get(&from) {
                    if !m.resyncing && next_seq > m.next_seq {
                        self.start_resync(now, from);
                    }
                }
            }
            RouterMsg::Kv(batch) => {
                self.log
                    .record(now, "kv_rx", from.0, batch.seq, batch.events.len() as u64);
                let Some(m) = self.members.get_mut(&from) else {
                    return;
                };
                if m.resyncing || batch.seq < m.next_seq {
                    return; // covered by the snapshot on its way, or a duplicate/stale batch
                }
                if batch.seq > m.next_seq {
                    self.start_resync(now, from);
                    return;
                }
                m.next_seq += 1;
                self.router.apply_batch(now, &batch);
            }
            RouterMsg::Snapshot { next_seq, hashes } => {
                self.log
                    .record(now, "snapshot_rx", from.0, next_seq, hashes.len() as u64);
                let Some(m) = self.members.get_mut(&from) else {
                    return;
                };
                if !m.resyncing {
                    return;
                }
                m.resyncing = false;
                m.next_seq = next_seq;
                self.router.resync(now, from, next_seq, &hashes);
            }
        }
    }

    fn start_resync(&mut self, now: SimTime, worker: WorkerId) {
        if let Some(m) = self.members.get_mut(&worker) {
            m.resyncing = true;
            self.resyncs += 1;
            self.log.record(now, "resync", worker.0, 0, 0);
            self.send_to_worker(now, worker, WorkerMsg::Resync);
        }
    }

    /// A message from a worker proves it is up: refresh its lease, or let it (re)join.
    fn on_heard(&mut self, now: SimTime, worker: WorkerId) {
        if let Some(m) = self.members.get_mut(&worker) {
            m.last_heard = now;
            return;
        }
        let Some(slot) = self.slot_of(worker) else {
            return;
        };
        if !self.workers[slot as usize - 1].alive {
            return;
        }
        self.log.record(now, "join", worker.0, u64::from(slot), 0);
        self.router.add_worker(worker);
        self.members.insert(
            worker,
            Member {
                last_heard: now,
                next_seq: 0,
                resyncing: false,
            },
        );
        for id in self.abandoned.remove(&worker).unwrap_or_default() {
            self.send_to_worker(now, worker, WorkerMsg::Cancel(id));
        }
        self.start_resync(now, worker);
        while let Some(i) = self.backlog.pop_front() {
            self.dispatch(now, i);
        }
    }

    fn on_output(&mut self, now: SimTime, o: IndexedOutput) {
        let i = req_of(o.request);
        let Some(st) = self.reqs.get_mut(i) else {
            return;
        };
        if st.current.map(|(_, id)| id) != Some(o.request) {
            return; // a stale attempt's output
        }
        st.parked.insert(o.index, o);
        loop {
            let st = &mut self.reqs[i];
            let next = st.tokens.len() as u32 - st.base;
            let Some(o) = st.parked.remove(&next) else {
                break;
            };
            st.tokens.extend_from_slice(&o.output.token_ids);
            let rec = &mut self.records[i];
            for _ in &o.output.token_ids {
                rec.token_times.push(now);
            }
            match o.output.finish {
                None => {}
                Some(FinishReason::Error(e)) => {
                    self.resolve(now, i, Outcome::Failed(e));
                    break;
                }
                Some(_) => {
                    self.resolve(now, i, Outcome::Completed);
                    break;
                }
            }
        }
    }

    fn on_lease_check(&mut self, now: SimTime) {
        let expired: Vec<WorkerId> = self
            .members
            .iter()
            .filter(|(_, m)| now.since(m.last_heard) > self.cfg.lease)
            .map(|(w, _)| *w)
            .collect();
        for w in expired {
            self.leases_expired += 1;
            self.log.record(now, "lease_expired", w.0, 0, 0);
            self.members.remove(&w);
            self.router.remove_worker(w);
            let lost = self.assigned.remove(&w).unwrap_or_default();
            for id in lost {
                self.abandoned.entry(w).or_default().push(id);
                let i = req_of(id);
                if self.reqs[i].current.map(|(_, c)| c) == Some(id) {
                    self.reqs[i].current = None;
                    self.migrations += 1;
                    self.dispatch(now, i);
                }
            }
        }
    }

    // ---- worker nodes ------------------------------------------------------------------

    fn on_worker_msg(&mut self, now: SimTime, to: WorkerId, msg: WorkerMsg) {
        let profile = &self.cfg.profile;
        let slot = self.slot_of(to);
        let Some(w) = slot
            .and_then(|s| self.workers.get_mut(s as usize - 1))
            .filter(|w| w.id == to && w.alive)
        else {
            self.log.record(now, "drop_dead", to.0, 0, 0);
            return;
        };
        match msg {
            WorkerMsg::Submit(req) => {
                let (rid, len) = (req.id.0, req.token_ids.len() as u64);
                let refused = w.submit(req, now);
                let started = w.start_step(now, profile);
                self.log.record(now, "submit", to.0, rid, len);
                if let Some(err) = refused {
                    self.send_to_router(now, to, RouterMsg::Outputs(vec![err]), Plane::Request);
                }
                if let Some(d) = started {
                    self.q.push(now.plus(d), Ev::StepDone { worker: to });
                }
            }
            WorkerMsg::Cancel(id) => {
                w.cancel(id);
                self.log.record(now, "cancel", to.0, id.0, 0);
            }
            WorkerMsg::Resync => {
                let msg = RouterMsg::Snapshot {
                    next_seq: w.kv_seq,
                    hashes: w.held_blocks(),
                };
                self.log.record(now, "snapshot", to.0, 0, 0);
                self.send_to_router(now, to, msg, Plane::Request);
            }
        }
    }

    fn on_step_done(&mut self, now: SimTime, id: WorkerId) {
        let profile = &self.cfg.profile;
        let slot = self.slot_of(id);
        let Some(w) = slot
            .and_then(|s| self.workers.get_mut(s as usize - 1))
            .filter(|w| w.id == id && w.alive)
        else {
            return;
        };
        if !w.has_step_in_flight() {
            return;
        }
        let result = w.finish_step(now);
        let next = w.start_step(now, profile);
        let batch = (!result.kv_events.is_empty()).then(|| {
            let b = KvEventBatch {
                worker: id,
                seq: w.kv_seq,
                ts: now.as_secs_f64(),
                events: result.kv_events,
            };
            w.kv_seq += 1;
            b
        });
        self.log.record(
            now,
            "step",
            id.0,
            result.outputs.len() as u64,
            batch.as_ref().map_or(0, |b| b.events.len() as u64),
        );
        if let Some(d) = next {
            self.q.push(now.plus(d), Ev::StepDone { worker: id });
        }
        if !result.outputs.is_empty() {
            self.send_to_router(now, id, RouterMsg::Outputs(result.outputs), Plane::Request);
        }
        if let Some(b) = batch {
            self.send_to_router(now, id, RouterMsg::Kv(b), Plane::Event);
        }
    }

    fn on_crash(&mut self, now: SimTime, slot: u32, down_for: SimDuration) {
        let Some(w) = self.workers.get_mut((slot as usize).wrapping_sub(1)) else {
            return;
        };
        if !w.alive {
            return; // already down
        }
        self.log.record(now, "crash", w.id.0, u64::from(slot), 0);
        w.crash();
        self.q.push(now.plus(down_for), Ev::Restart { slot });
    }

    fn on_restart(&mut self, now: SimTime, slot: u32) {
        let id = WorkerId(self.next_worker_id);
        self.next_worker_id += 1;
        self.slot_by_id.insert(id, slot);
        let profile = &self.cfg.profile;
        let Some(w) = self.workers.get_mut((slot as usize).wrapping_sub(1)) else {
            return;
        };
        if w.alive || w.restart(id, profile).is_err() {
            return;
        }
        self.log.record(now, "restart", id.0, u64::from(slot), 0);
        self.q.push(now, Ev::Heartbeat { worker: id });
    }

    // ---- end of run --------------------------------------------------------------------

    /// Every live worker idle, every live worker a member whose index view matches its
    /// announced blocks.
    fn settled(&self) -> bool {
        if self
            .workers
            .iter()
            .any(|w| w.alive && (w.has_step_in_flight() || !w.scheduler().is_idle()))
        {
            return false;
        }
        self.index_problems().is_empty()
    }

    /// Disagreements between the index and the live workers' caches: every worker the index
    /// lists must be live, and list exactly the blocks that worker announced (all cached).
    fn index_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let indexed: BTreeMap<WorkerId, usize> =
            self.router.indexed_workers().into_iter().collect();
        for (w, n) in &indexed {
            if *n > 0 && !self.workers.iter().any(|x| x.id == *w && x.alive) {
                problems.push(format!(
                    "index holds {n} blocks of {w}, which is not a live worker"
                ));
            }
        }
        for w in self.workers.iter().filter(|w| w.alive) {
            let held = w.held_blocks();
            let n = indexed.get(&w.id).copied().unwrap_or(0);
            if n != held.len() {
                problems.push(format!(
                    "index has {n} blocks of {} but it announced {}",
                    w.id,
                    held.len()
                ));
            } else if let Some(h) = held.iter().find(|h| !self.router.index_holds(w.id, **h)) {
                problems.push(format!("index lacks block {h} announced by {}", w.id));
            }
        }
        problems
    }

    fn finish(self) -> SimOutcome {
        let mut violations = request_violations(&self.records);
        for w in self.workers.iter().filter(|w| w.alive) {
            if let Err(e) = w.check_settled() {
                violations.push(e.0);
            }
            if !w.scheduler().is_idle() {
                violations.push(format!("{} still has requests after the run", w.id));
            }
        }
        violations.extend(self.index_problems());
        SimOutcome {
            router_impl: self.router.implementation().to_string(),
            end: self.q.now(),
            event_log_hash: self.log.hash(),
            events: self.log.count(),
            workers: self
                .workers
                .iter()
                .enumerate()
                .map(|(i, w)| {
                    let (q, h) = w.prefix_tokens();
                    WorkerRecord {
                        slot: i as u32 + 1,
                        final_id: w.id,
                        busy_s: w.busy.as_secs_f64(),
                        steps: w.steps,
                        crashes: w.crashes,
                        prefix_query_tokens: q,
                        prefix_hit_tokens: h,
                    }
                })
                .collect(),
            requests: self.records,
            net: self.net.stats.clone(),
            resyncs: self.resyncs,
            leases_expired: self.leases_expired,
            migrations: self.migrations,
            routed_overlap_blocks: self.routed_overlap_blocks,
            routed_blocks: self.routed_blocks,
            invariant_violations: violations,
            event_log_lines: self.log.lines().map(<[String]>::to_vec),
        }
    }
}
