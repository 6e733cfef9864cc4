//! The simulated fleet: worker incarnations started (real engine loop, `WorkerService` actor,
//! registration, KV and load publishing), crashed and restarted, and the connector through
//! which the frontend's discovery watch reaches them.

use super::clock::ScaledClock;
use super::engine::{CostModelEngine, EngineCounters};
use super::net::{Endpoint, SimNet, SimPublisher};
use super::{lock, record, Held, Log};
use crate::network::NodeId;
use crate::run::{SimConfig, SimError};
use crate::time::SimTime;
use crate::worker::track_held;
use async_trait::async_trait;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;
use turbine_actors::cluster_config::WorkerRole;
use turbine_actors::executor::Executor;
use turbine_actors::ids::WorkerId;
use turbine_actors::node::{self, Announce, Announcement};
use turbine_actors::router::membership::{EventFeed, WorkerConnector};
use turbine_actors::worker::announce::{kv_topic, metrics_topic, REGISTRY_SERVICE};
use turbine_actors::worker::service::{worker_service_name, WorkerService};
use turbine_actors::worker::{BlockManager, BlockStats, Scheduler};
use turbine_actors::worker::{EngineTime, WorkerHandle};
use turbine_runtime::discovery::{embedded::Registry, EmbeddedDiscovery, Instance, Lease};
use turbine_runtime::transfer::{TransferHub, TransferPlane};
use turbine_runtime::{Addr, MetricsRegistry, Node, NodeConfig, SharedClock};

/// What the frontend's connector needs to reach a registered worker.
#[derive(Clone)]
pub(super) struct Reachable {
    pub(super) node: Node,
    pub(super) endpoint: Endpoint,
    pub(super) publisher: String,
}

/// Reaches simulated workers: their service through a simulated link, their events through
/// a simulated subscription.
pub(super) struct SimConnector {
    pub(super) net: Arc<SimNet>,
    pub(super) frontend: Endpoint,
    pub(super) directory: Arc<Mutex<BTreeMap<String, Reachable>>>,
}

impl SimConnector {
    fn target(&self, inst: &Instance) -> Result<Reachable, String> {
        lock(&self.directory)
            .get(&inst.endpoint)
            .cloned()
            .ok_or_else(|| format!("no simulated node at {}", inst.endpoint))
    }
}

#[async_trait]
impl WorkerConnector for SimConnector {
    async fn addr(&self, inst: &Instance, id: WorkerId) -> Result<Addr<WorkerService>, String> {
        let target = self.target(inst)?;
        Ok(target
            .node
            .local::<WorkerService>(&worker_service_name(id))
            .map_err(|e| e.to_string())?
            .via(self.net.link(self.frontend, target.endpoint)))
    }

    async fn events(&self, inst: &Instance, _id: WorkerId) -> Result<EventFeed, String> {
        Ok(self.net.subscribe(&self.target(inst)?.publisher))
    }
}

/// One running worker incarnation.
pub(super) struct Running {
    pub(super) id: WorkerId,
    pub(super) node: Node,
    pub(super) handle: WorkerHandle,
    pub(super) counters: Arc<Mutex<EngineCounters>>,
    /// From its own events, before the network.
    pub(super) held: Held,
    pub(super) lease: Arc<Mutex<Option<Lease>>>,
    pub(super) tasks: Vec<JoinHandle<()>>,
}

/// A worker slot over its incarnations.
pub(super) struct Slot {
    pub(super) running: Option<Running>,
    pub(super) last_id: WorkerId,
    pub(super) crashes: u32,
    /// Figures of incarnations that crashed.
    pub(super) retired_busy: Duration,
    pub(super) retired_steps: u64,
    pub(super) retired_kv: BlockStats,
}

/// Everything the run shares between its tasks.
pub(super) struct World {
    pub(super) cfg: SimConfig,
    pub(super) clock: ScaledClock,
    pub(super) shared_clock: SharedClock,
    pub(super) log: Log,
    pub(super) net: Arc<SimNet>,
    pub(super) frontend: Node,
    pub(super) frontend_ep: Endpoint,
    pub(super) directory: Arc<Mutex<BTreeMap<String, Reachable>>>,
    pub(super) slots: Mutex<Vec<Slot>>,
    pub(super) next_worker_id: Mutex<u64>,
    /// The transfer planes of the running prefill and decode workers, by slot: pulls
    /// between them cross the simulated link (`transit_bytes`).
    pub(super) hub: TransferHub,
    pub(super) planes: Mutex<BTreeMap<u32, (Endpoint, TransferPlane)>>,
    /// The slots of prefill workers are 1..=prefill_slots (none: all aggregated).
    pub(super) prefill_slots: u32,
    /// When the last step slowed by a `slow:` fault ends (see `CostModelEngine`).
    pub(super) slowed_until: Arc<Mutex<SimTime>>,
}

pub(super) fn node_config(name: String) -> NodeConfig {
    NodeConfig {
        name,
        ..NodeConfig::default()
    }
}

impl World {
    /// Slots 1..=prefill_slots are prefill workers, the rest decode workers (all
    /// aggregated without prefill workers).
    pub(super) fn role_of(&self, slot: u32) -> WorkerRole {
        match self.prefill_slots {
            0 => WorkerRole::Aggregated,
            n if slot <= n => WorkerRole::Prefill,
            _ => WorkerRole::Decode,
        }
    }

    /// A fresh in-memory transfer plane for this incarnation of `slot`, linked both ways
    /// to every other running plane over the simulated network.
    fn plane_for(
        &self,
        slot: u32,
        endpoint: Endpoint,
        id: WorkerId,
        role: WorkerRole,
    ) -> Option<TransferPlane> {
        if role == WorkerRole::Aggregated {
            return None;
        }
        let plane = TransferPlane::in_memory(
            &format!("worker-{}", id.0),
            self.cfg.disagg.transfer.to_runtime(),
            self.shared_clock.clone(),
            &MetricsRegistry::new(),
            &self.hub,
        );
        let mut planes = lock(&self.planes);
        for (other_slot, (other_ep, other)) in planes.iter() {
            if *other_slot == slot {
                continue;
            }
            plane.set_link(other.endpoint(), self.net.link(endpoint, *other_ep));
            other.set_link(plane.endpoint(), self.net.link(*other_ep, endpoint));
        }
        planes.insert(slot, (endpoint, plane.clone()));
        Some(plane)
    }

    /// Starts a fresh incarnation of worker `slot` (1-based) and registers it in the
    /// background (registration crosses the network, so it may be held by a partition).
    pub(super) async fn start_worker(self: &Arc<Self>, slot: u32) -> Result<(), SimError> {
        let id = {
            let mut next = lock(&self.next_worker_id);
            *next += 1;
            WorkerId(*next)
        };
        let endpoint = self.net.bring_up(NodeId(slot));
        let name = format!("worker-{}", id.0);
        let node = Node::in_memory(
            node_config(name.clone()),
            self.shared_clock.clone(),
            MetricsRegistry::new(),
        );
        let profile = &self.cfg.profile;
        let counters = Arc::new(Mutex::new(EngineCounters::default()));
        // The executor seam: a priced step instead of a backend.
        let engine = Arc::new(CostModelEngine {
            worker: id,
            slot,
            faults: Arc::new(self.cfg.faults.clone()),
            slowed_until: self.slowed_until.clone(),
            cost: profile.step_time.clone(),
            clock: self.clock.clone(),
            log: self.log.clone(),
            counters: counters.clone(),
        });
        let role = self.role_of(slot);
        let executor = if role == WorkerRole::Aggregated {
            Executor::simulated(engine, self.shared_clock.clone())
        } else {
            Executor::simulated_with_kv(engine, self.shared_clock.clone(), self.cfg.kv_shape)
        };
        let plane = self.plane_for(slot, endpoint, id, role);
        let scheduler = Scheduler::new(
            profile.scheduler.clone(),
            BlockManager::new(profile.block_manager_config()),
        )?;
        // The event-publisher seam: a simulated PUB socket (and the blocks it announced,
        // before the network, for the end-of-run checks).
        let publisher = Arc::new(SimPublisher::new(self.net.clone(), endpoint, name.clone()));
        let held = Arc::new(Mutex::new(BTreeSet::new()));
        let announce: Announce = {
            let (publisher, held) = (publisher.clone(), held.clone());
            Arc::new(move |a| match a {
                Announcement::Kv(batch) => {
                    track_held(&mut lock(&held), &batch.events);
                    publisher.publish(&kv_topic(batch.worker), &batch);
                }
                Announcement::Load(stats) => publisher.publish(&metrics_topic(id), &stats),
            })
        };
        let time = EngineTime {
            clock: self.shared_clock.clone(),
            wall_epoch_s: 0.0,
        };
        let disagg = node::WorkerDisagg { role, plane };
        let worker = node::start_worker_as(
            &node,
            id,
            scheduler,
            executor,
            time,
            announce.clone(),
            None,
            disagg,
        )
        .await
        .map_err(|e| SimError::Shells(e.to_string()))?;
        // Load when what the router reads changes and at least every LOAD_REPORT_EVERY, as
        // `turbine worker` publishes it.
        let load_task = node::report_loads(&worker.handle, self.shared_clock.clone(), announce);
        let handle = worker.handle;

        lock(&self.directory).insert(
            node.endpoint().to_string(),
            Reachable {
                node: node.clone(),
                endpoint,
                publisher: name,
            },
        );
        let lease = Arc::new(Mutex::new(None));
        let register_task = tokio::spawn(register(
            self.clone(),
            endpoint,
            worker.instance,
            lease.clone(),
        ));
        record(
            &self.log,
            self.clock.sim_now(),
            "start",
            id.0,
            u64::from(slot),
            0,
        );
        let mut slots = lock(&self.slots);
        if let Some(s) = slots.get_mut(slot as usize - 1) {
            s.last_id = id;
            s.running = Some(Running {
                id,
                node,
                handle,
                counters,
                held,
                lease,
                tasks: vec![load_task, register_task],
            });
        }
        Ok(())
    }

    /// The worker in `slot` dies: its loop, its actors, its heartbeats and its links.
    /// False when the slot was already down (overlapping crashes): nothing to restart then.
    pub(super) fn crash(&self, slot: u32) -> bool {
        let mut slots = lock(&self.slots);
        let Some(s) = slots.get_mut(slot as usize - 1) else {
            return false;
        };
        let Some(r) = s.running.take() else {
            return false;
        };
        self.net.take_down(NodeId(slot));
        r.handle.stop_now();
        r.node.shutdown();
        for t in &r.tasks {
            t.abort();
        }
        // Dropping the lease stops its heartbeats: the registry expires it, as for a
        // process that died.
        drop(lock(&r.lease).take());
        let c = *lock(&r.counters);
        s.retired_busy += c.busy;
        s.retired_steps += c.steps;
        let kv = r.handle.stats().kv;
        s.retired_kv.prefix_query_tokens += kv.prefix_query_tokens;
        s.retired_kv.prefix_hit_tokens += kv.prefix_hit_tokens;
        s.crashes += 1;
        record(
            &self.log,
            self.clock.sim_now(),
            "crash",
            r.id.0,
            u64::from(slot),
            0,
        );
        true
    }

    /// The running workers' engine loops with their roles.
    pub(super) fn live_roles(&self) -> Vec<(WorkerRole, WorkerHandle)> {
        lock(&self.slots)
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.running.as_ref().map(|r| (i as u32 + 1, r)))
            .map(|(slot, r)| (self.role_of(slot), r.handle.clone()))
            .collect()
    }

    pub(super) fn live_workers(&self) -> Vec<(WorkerId, WorkerHandle, Held)> {
        lock(&self.slots)
            .iter()
            .filter_map(|s| s.running.as_ref())
            .map(|r| (r.id, r.handle.clone(), r.held.clone()))
            .collect()
    }
}

/// Registers a worker with the frontend's registry across the network, retrying until it
/// gets through (a partition may hold the first attempts back past the call timeout).
async fn register(
    world: Arc<World>,
    from: Endpoint,
    instance: Instance,
    slot_lease: Arc<Mutex<Option<Lease>>>,
) {
    let registry = match world.frontend.local::<Registry>(REGISTRY_SERVICE) {
        Ok(addr) => addr.via(world.net.link(from, world.frontend_ep)),
        Err(_) => return,
    };
    let discovery = EmbeddedDiscovery::new(registry, world.shared_clock.clone());
    let lease = node::register_until_done(
        &discovery,
        instance,
        world.cfg.lease.as_duration(),
        world.cfg.heartbeat.as_duration(),
        &world.shared_clock,
    )
    .await;
    *lock(&slot_lease) = Some(lease);
}

impl World {
    /// The planner's scale-down of `slot`: its lease revoked (it leaves membership at once),
    /// then its loop and node stopped, like a `turbine worker` that drained and exited.
    /// The caller has drained it first.
    pub(super) async fn retire(&self, slot: u32) {
        let running = {
            let mut slots = lock(&self.slots);
            slots
                .get_mut(slot as usize - 1)
                .and_then(|s| s.running.take())
        };
        let Some(r) = running else { return };
        let lease = lock(&r.lease).take();
        if let Some(lease) = lease {
            lease.revoke().await;
        }
        self.net.take_down(NodeId(slot));
        r.handle.stop_now();
        r.node.shutdown();
        for t in &r.tasks {
            t.abort();
        }
        let c = *lock(&r.counters);
        let mut slots = lock(&self.slots);
        if let Some(s) = slots.get_mut(slot as usize - 1) {
            s.retired_busy += c.busy;
            s.retired_steps += c.steps;
        }
        record(
            &self.log,
            self.clock.sim_now(),
            "retire",
            r.id.0,
            u64::from(slot),
            0,
        );
    }

    /// The id and engine loop of the worker running in `slot`, if any.
    pub(super) fn running_in(&self, slot: u32) -> Option<(WorkerId, WorkerHandle)> {
        lock(&self.slots)
            .get(slot as usize - 1)
            .and_then(|s| s.running.as_ref())
            .map(|r| (r.id, r.handle.clone()))
    }
}
