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
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex};
use tokio::task::JoinHandle;
use turbine_actors::cluster_config::WorkerRole;
use turbine_actors::planner::actor::{spawn_planner, DecisionLog, Inputs, Observe, Sense};
use turbine_actors::planner::connector::{Connector, ConnectorError};
use turbine_actors::planner::{IntervalMetrics, Planner, Pressure, Replicas};
use turbine_actors::router::service::RouterCore;

/// How often a draining worker's idleness is checked.
const DRAIN_POLL: SimDuration = SimDuration(50_000_000);

/// The requests of `records` as the frontend saw them in `(from, to]`: arrivals (with their
/// prompt lengths), first tokens (TTFT, and the share of the prompt the prefix cache served)
/// and finished requests (output length, mean ITL).
pub fn interval_metrics(records: &[RequestRecord], from: SimTime, to: SimTime) -> IntervalMetrics {
    let within = |t: SimTime| t > from && t <= to;
    let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    let (mut isl, mut osl, mut ttft, mut itl) = (vec![], vec![], vec![], vec![]);
    let mut requests = 0;
    // Prompt tokens, and of them served from the prefix cache, of the first outputs.
    let (mut prompted, mut cached) = (0.0, 0.0);
    for r in records {
        if within(r.arrival) {
            requests += 1;
            isl.push(f64::from(r.input_len));
        }
        if let Some(&first) = r.token_times.first() {
            if within(first) {
                ttft.push(first.as_secs_f64() - r.arrival.as_secs_f64());
                prompted += f64::from(r.input_len);
                cached += f64::from(r.cached_tokens.unwrap_or(0).min(r.input_len));
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
        queued: None,
        cached_fraction: (prompted > 0.0).then(|| cached / prompted),
    }
}

/// The output length a reaction reads, as [`LoadTap::pressure`] reports it: the mean of
/// the requests finished since `from`; before any has, the mean of the tokens the requests
/// producing now have so far (a lower bound of their OSL).
///
/// [`LoadTap::pressure`]: turbine_actors::planner::tap::LoadTap::pressure
fn output_so_far(records: &[RequestRecord], from: SimTime) -> Option<f64> {
    let mean = |finished: bool| {
        let (mut tokens, mut n) = (0usize, 0usize);
        for r in records.iter().filter(|r| !r.token_times.is_empty()) {
            let counts = match r.finished {
                Some(done) => finished && done > from,
                None => !finished,
            };
            if counts {
                tokens += r.token_times.len();
                n += 1;
            }
        }
        (n > 0).then(|| tokens as f64 / n as f64)
    };
    mean(true).or_else(|| mean(false))
}

/// Provisioned slots: a start pending (its delay), or a worker up.
struct Provisioned {
    start: Option<JoinHandle<()>>,
}

/// The simulator's connector: per pool (aggregated; or prefill, decode), a range of the
/// run's slots (see `shells::prefill_slots`).
pub(super) struct SimFleet {
    world: Arc<World>,
    router: Arc<RouterCore>,
    startup_delay: SimDuration,
    shape: Replicas,
    pools: Vec<RangeInclusive<u32>>,
    live: BTreeMap<u32, Provisioned>,
    /// The pools as the timeline last recorded them.
    recorded: Replicas,
    timeline: Timeline,
}

impl SimFleet {
    fn in_pool(&self, pool: usize) -> Vec<u32> {
        let range = &self.pools[pool];
        self.live
            .keys()
            .copied()
            .filter(|s| range.contains(s))
            .collect()
    }

    /// Moves one pool to `want` workers: new ones start after the delay in its free slots;
    /// leaving ones (the highest slots first) are drained and retired.
    fn resize(&mut self, pool: usize, want: usize) {
        let mut have = self.in_pool(pool);
        let free: Vec<u32> = self.pools[pool]
            .clone()
            .filter(|s| !self.live.contains_key(s))
            .collect();
        for slot in free.into_iter().take(want.saturating_sub(have.len())) {
            let (world, delay) = (self.world.clone(), self.startup_delay);
            let start = tokio::spawn(async move {
                world.clock.sleep_for(delay).await;
                let _ = world.start_worker(slot).await;
            });
            self.live.insert(slot, Provisioned { start: Some(start) });
        }
        while have.len() > want {
            let Some(slot) = have.pop() else { break };
            let Some(p) = self.live.remove(&slot) else {
                continue;
            };
            if let Some(start) = p.start {
                if !start.is_finished() {
                    start.abort(); // never came up: nothing to drain
                    continue;
                }
            }
            tokio::spawn(drain(self.world.clone(), self.router.clone(), slot));
        }
    }

    fn current(&self) -> Replicas {
        let sizes: Vec<usize> = (0..self.pools.len())
            .map(|p| self.in_pool(p).len())
            .collect();
        self.shape.with_pools(&sizes)
    }
}

#[async_trait]
impl Connector for SimFleet {
    async fn apply(&mut self, target: Replicas) -> Result<Replicas, ConnectorError> {
        let want = target.pools();
        if want.len() != self.pools.len() {
            return Err(ConnectorError::Shape(format!(
                "{} pool(s) asked of a fleet of {}",
                want.len(),
                self.pools.len()
            )));
        }
        for (pool, &n) in want.iter().enumerate() {
            self.resize(pool, n);
        }
        let now = self.current();
        if now != self.recorded {
            lock(&self.timeline).push((self.world.clock.sim_now(), now));
            self.recorded = now;
        }
        Ok(now)
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

/// The mean running batch over the decode (or aggregated) workers that run one now (the
/// load reports' figure, read at the tick, as a `turbine worker`'s latest report would give
/// it). Prefill workers' batches are prompts, not decodes.
fn decode_batch_now(world: &World) -> Option<f64> {
    let running: Vec<usize> = world
        .live_roles()
        .iter()
        .filter(|(role, _)| *role != WorkerRole::Prefill)
        .map(|(_, h)| h.stats().num_running)
        .filter(|&n| n > 0)
        .collect();
    (!running.is_empty()).then(|| running.iter().sum::<usize>() as f64 / running.len() as f64)
}

/// Requests waiting on the live workers now (their load reports' figure, read at the tick).
fn queued_now(world: &World) -> u64 {
    world
        .live_roles()
        .iter()
        .map(|(_, h)| h.stats().num_waiting as u64)
        .sum()
}

/// (workload time, pools provisioned) at each change of the fleet.
type Timeline = Arc<Mutex<Vec<(SimTime, Replicas)>>>;

/// Starts the planner on `world`, whose slots `initial` are up; `slots` is how many the run
/// has.
pub(super) fn start(
    world: Arc<World>,
    router: Arc<RouterCore>,
    records: Arc<Mutex<Vec<RequestRecord>>>,
    cfg: &SimPlanner,
    initial: &[u32],
    slots: u32,
) -> Result<(JoinHandle<()>, DecisionLog, Timeline), String> {
    let split = world.prefill_slots;
    let (shape, pools) = if split == 0 {
        (Replicas::Aggregated { workers: 0 }, vec![1..=slots])
    } else {
        (
            Replicas::Disaggregated {
                prefill: 0,
                decode: 0,
            },
            vec![1..=split, split + 1..=slots],
        )
    };
    let sizes: Vec<usize> = pools
        .iter()
        .map(|r| initial.iter().filter(|s| r.contains(s)).count())
        .collect();
    let current = shape.with_pools(&sizes);
    let planner =
        Planner::new(&cfg.config, world.cfg.profile.clone(), current).map_err(|e| e.to_string())?;
    let timeline = Arc::new(Mutex::new(Vec::new()));
    let fleet = SimFleet {
        world: world.clone(),
        router,
        startup_delay: cfg.startup_delay,
        shape,
        pools,
        live: initial
            .iter()
            .map(|&s| (s, Provisioned { start: None }))
            .collect(),
        recorded: current,
        timeline: timeline.clone(),
    };
    // The interval's start, shared by the interval's observation and the reactions'.
    let last = Arc::new(Mutex::new(world.clock.sim_now()));
    let observe: Observe = {
        let (world, records, last) = (world.clone(), records.clone(), last.clone());
        Box::new(move || {
            let now = world.clock.sim_now();
            let mut from = lock(&last);
            let mut m = interval_metrics(&lock(&records), *from, now);
            m.mean_decode_batch = decode_batch_now(&world);
            m.queued = Some(queued_now(&world));
            *from = now;
            m
        })
    };
    let every = std::time::Duration::from_millis(cfg.config.reaction_interval_ms);
    let react = (!every.is_zero()).then(|| {
        let world = world.clone();
        let sense: Sense = Box::new(move || {
            let (from, now) = (*lock(&last), world.clock.sim_now());
            let records = lock(&records);
            let m = interval_metrics(&records, from, now);
            Pressure {
                arrivals: m.requests,
                queued: Some(queued_now(&world)),
                mean_isl: m.mean_isl,
                mean_osl: output_so_far(&records, from),
                cached_fraction: m.cached_fraction,
            }
        });
        (every, sense)
    });
    let inputs = Inputs {
        interval: std::time::Duration::from_millis(cfg.config.adjustment_interval_ms),
        observe,
        react,
    };
    let log = DecisionLog::default();
    let task = spawn_planner(
        planner,
        inputs,
        Box::new(fleet),
        world.shared_clock.clone(),
        log.clone(),
    );
    Ok((task, log, timeline))
}
