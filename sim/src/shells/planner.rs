//! The planner in a simulated run: the real planner shell (`turbine_actors::planner::actor`)
//! on virtual time, observing the clients' records, acting through [`SimFleet`]: a worker
//! added joins after the start-up delay (a model load, a pod start), a worker removed is
//! taken out of routing, drained (its loop reports nothing running or waiting), then its
//! lease is revoked and it stops.

use super::fleet::World;
use super::lock;
use crate::run::{RequestRecord, SimPlanner};
use crate::time::{SimDuration, SimTime};
use async_trait::async_trait;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tokio::task::JoinHandle;
use turbine_actors::planner::actor::{spawn_planner, DecisionLog};
use turbine_actors::planner::connector::{Connector, ConnectorError};
use turbine_actors::planner::{IntervalMetrics, Planner, Replicas};
use turbine_actors::router::service::RouterCore;

/// How often a draining worker's idleness is checked.
const DRAIN_POLL: SimDuration = SimDuration(50_000_000);

/// The requests of `records` as the frontend saw them in `(from, to]`: arrivals (with their
/// prompt lengths), first tokens (TTFT) and finished requests (output length, mean ITL).
pub fn interval_metrics(records: &[RequestRecord], from: SimTime, to: SimTime) -> IntervalMetrics {
    let within = |t: SimTime| t > from && t <= to;
    let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    let (mut isl, mut osl, mut ttft, mut itl) = (vec![], vec![], vec![], vec![]);
    let mut requests = 0;
    for r in records {
        if within(r.arrival) {
            requests += 1;
            isl.push(f64::from(r.input_len));
        }
        if let Some(&first) = r.token_times.first() {
            if within(first) {
                ttft.push(first.as_secs_f64() - r.arrival.as_secs_f64());
            }
        }
        if let (Some(done), Some(&first), Some(&last)) =
            (r.finished, r.token_times.first(), r.token_times.last())
        {
            if within(done) {
                osl.push(r.token_times.len() as f64);
                if r.token_times.len() > 1 {
                    itl.push(
                        (last.as_secs_f64() - first.as_secs_f64())
                            / (r.token_times.len() - 1) as f64,
                    );
                }
            }
        }
    }
    IntervalMetrics {
        requests,
        mean_isl: mean(&isl),
        mean_osl: mean(&osl),
        mean_ttft_s: mean(&ttft),
        mean_itl_s: mean(&itl),
        // Not from the clients: the caller samples the workers.
        mean_decode_batch: None,
    }
}

/// Provisioned slots: a start pending (its delay), or a worker up.
struct Provisioned {
    start: Option<JoinHandle<()>>,
}

/// The simulator's connector: slots 1..=max of the run's fleet.
pub(super) struct SimFleet {
    world: Arc<World>,
    router: Arc<RouterCore>,
    startup_delay: SimDuration,
    max_slots: u32,
    live: BTreeMap<u32, Provisioned>,
    timeline: Timeline,
}

#[async_trait]
impl Connector for SimFleet {
    async fn apply(&mut self, target: Replicas) -> Result<Replicas, ConnectorError> {
        let Replicas::Aggregated { workers } = target else {
            return Err(ConnectorError::Shape(
                "the simulator runs aggregated workers only".into(),
            ));
        };
        let before = self.live.len();
        while self.live.len() < workers {
            let Some(slot) = (1..=self.max_slots).find(|s| !self.live.contains_key(s)) else {
                break;
            };
            let (world, delay) = (self.world.clone(), self.startup_delay);
            let start = tokio::spawn(async move {
                world.clock.sleep_for(delay).await;
                let _ = world.start_worker(slot).await;
            });
            self.live.insert(slot, Provisioned { start: Some(start) });
        }
        while self.live.len() > workers {
            let Some((slot, p)) = self.live.pop_last() else {
                break;
            };
            if let Some(start) = p.start {
                if !start.is_finished() {
                    start.abort(); // never came up: nothing to drain
                    continue;
                }
            }
            tokio::spawn(drain(self.world.clone(), self.router.clone(), slot));
        }
        if self.live.len() != before {
            lock(&self.timeline).push((self.world.clock.sim_now(), self.live.len()));
        }
        Ok(Replicas::Aggregated {
            workers: self.live.len(),
        })
    }
}

/// Out of routing, wait until idle, then stop (see the module doc).
async fn drain(world: Arc<World>, router: Arc<RouterCore>, slot: u32) {
    let Some((id, handle)) = world.running_in(slot) else {
        return;
    };
    router.remove_worker(id);
    loop {
        let s = handle.stats();
        if s.num_running + s.num_waiting == 0 {
            break;
        }
        world.clock.sleep_for(DRAIN_POLL).await;
    }
    world.retire(slot).await;
}

/// The mean running batch over the workers that run one now (the load reports' figure, read
/// at the tick, as a `turbine worker`'s latest report would give it).
fn decode_batch_now(world: &World) -> Option<f64> {
    let running: Vec<usize> = world
        .live_workers()
        .iter()
        .map(|(_, h, _)| h.stats().num_running)
        .filter(|&n| n > 0)
        .collect();
    (!running.is_empty()).then(|| running.iter().sum::<usize>() as f64 / running.len() as f64)
}

/// (workload time, workers provisioned) at each change of the fleet.
type Timeline = Arc<Mutex<Vec<(SimTime, usize)>>>;

/// Starts the planner on `world`, whose first `initial` slots are up.
pub(super) fn start(
    world: Arc<World>,
    router: Arc<RouterCore>,
    records: Arc<Mutex<Vec<RequestRecord>>>,
    cfg: &SimPlanner,
    initial: u32,
) -> Result<(JoinHandle<()>, DecisionLog, Timeline), String> {
    let current = Replicas::Aggregated {
        workers: initial as usize,
    };
    let planner =
        Planner::new(&cfg.config, world.cfg.profile.clone(), current).map_err(|e| e.to_string())?;
    let timeline = Arc::new(Mutex::new(Vec::new()));
    let fleet = SimFleet {
        world: world.clone(),
        router,
        startup_delay: cfg.startup_delay,
        max_slots: cfg.config.max_replicas as u32,
        live: (1..=initial)
            .map(|s| (s, Provisioned { start: None }))
            .collect(),
        timeline: timeline.clone(),
    };
    let clock = world.clock.clone();
    let mut last = clock.sim_now();
    let sampled = world.clone();
    let observe = Box::new(move || {
        let now = clock.sim_now();
        let mut m = interval_metrics(&lock(&records), last, now);
        m.mean_decode_batch = decode_batch_now(&sampled);
        last = now;
        m
    });
    let log = DecisionLog::default();
    let task = spawn_planner(
        planner,
        std::time::Duration::from_millis(cfg.config.adjustment_interval_ms),
        observe,
        Box::new(fleet),
        world.shared_clock.clone(),
        log.clone(),
    );
    Ok((task, log, timeline))
}
