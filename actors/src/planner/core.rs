//! The planner's pure core: `observe(now, metrics)` after each adjustment interval,
//! `decide(now)` for the replica counts. No clock, no I/O: the shell (`actor.rs`)
//! feeds it the workers' metrics and carries the decision out through a connector.

use super::capacity::Capacity;
use super::config::{PlannerConfig, PlannerConfigError};
use super::limits::{release_reactions, settle, Ask, Limits, PoolState};
use super::predictor::{self, Predictor};
use super::sla::{
    correction, decode_need, prefill_need, whole, Corrections, DecodeNeed, Load, PrefillNeed,
    Targets,
};
use crate::cluster_config::{WorkerGroup, WorkerRole};
use crate::engine_profile::Profile;
use std::time::Duration;

/// How many workers of each pool: one pool when workers are aggregated, two when prefill
/// and decode are disaggregated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replicas {
    Aggregated { workers: usize },
    Disaggregated { prefill: usize, decode: usize },
}

impl Replicas {
    /// The pool sizes in order: aggregated; or prefill, decode.
    pub fn pools(self) -> Vec<usize> {
        match self {
            Replicas::Aggregated { workers } => vec![workers],
            Replicas::Disaggregated { prefill, decode } => vec![prefill, decode],
        }
    }

    /// The same shape (its variant) with these pool sizes, in [`Replicas::pools`] order.
    pub fn with_pools(self, sizes: &[usize]) -> Replicas {
        let at = |i: usize| sizes.get(i).copied().unwrap_or(0);
        match self {
            Replicas::Aggregated { .. } => Replicas::Aggregated { workers: at(0) },
            Replicas::Disaggregated { .. } => Replicas::Disaggregated {
                prefill: at(0),
                decode: at(1),
            },
        }
    }

    /// Workers over all pools.
    pub fn total(self) -> usize {
        self.pools().iter().sum()
    }

    /// The pools of a cluster file's worker groups and their configured sizes: aggregated
    /// groups form one pool, prefill and decode groups two. A mix, or prefill without
    /// decode, is not a cluster the planner can size.
    pub fn of_workers(groups: &[WorkerGroup]) -> Result<Replicas, PlannerConfigError> {
        let count = |role: WorkerRole| {
            groups
                .iter()
                .filter(|g| g.role == role)
                .map(|g| g.replicas)
                .sum::<usize>()
        };
        let has = |role: WorkerRole| groups.iter().any(|g| g.role == role);
        match (
            has(WorkerRole::Aggregated),
            has(WorkerRole::Prefill),
            has(WorkerRole::Decode),
        ) {
            (true, false, false) => Ok(Replicas::Aggregated {
                workers: count(WorkerRole::Aggregated),
            }),
            (false, true, true) => Ok(Replicas::Disaggregated {
                prefill: count(WorkerRole::Prefill),
                decode: count(WorkerRole::Decode),
            }),
            _ => Err(PlannerConfigError::UnplannableWorkers),
        }
    }
}

/// What the cluster saw over the adjustment interval that ended at `now` (from the
/// frontend's request metrics and the workers' step metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct IntervalMetrics {
    /// Requests that arrived.
    pub requests: u64,
    /// Mean prompt length of those requests (tokens); `None` when there were none.
    pub mean_isl: Option<f64>,
    /// Mean output length of the requests that finished (tokens).
    pub mean_osl: Option<f64>,
    /// Mean time to first token (seconds).
    pub mean_ttft_s: Option<f64>,
    /// Mean inter-token latency (seconds).
    pub mean_itl_s: Option<f64>,
    /// Mean sequences per decode step on the decode (or aggregated) workers: where on the
    /// profile's ITL grid the observed ITL belongs.
    pub mean_decode_batch: Option<f64>,
    /// Requests waiting on the workers at the interval's end, not yet admitted (their
    /// latest load reports); `None`: no report.
    pub queued: Option<u64>,
    /// Share of the prompt tokens the prefix cache served (0..=1), over the requests whose
    /// first output came this interval; `None`: none came.
    pub cached_fraction: Option<f64>,
}

/// What the planner reacts to between two adjustment intervals ([`Planner::react`]).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Pressure {
    /// Requests that arrived since the last observation.
    pub arrivals: u64,
    /// Requests waiting on the workers now; `None`: no report.
    pub queued: Option<u64>,
    /// Mean prompt length of those arrivals: the lengths before any forecast has one.
    pub mean_isl: Option<f64>,
    /// Mean output length of the requests that finished since the last observation; before
    /// any has, of the tokens the requests producing now have so far (a lower bound of their
    /// OSL): the decode side's length before any forecast has one.
    pub mean_osl: Option<f64>,
    /// Share of the prompt tokens the prefix cache served, over the first outputs since the
    /// last observation: the prefill demand's share before any interval observed one.
    pub cached_fraction: Option<f64>,
}

/// How many standard deviations below the observed count a reaction takes the arrival
/// rate to be (a one-sided Poisson bound, about 2.3 % false alarms): a few requests in the
/// first second of an interval are noise, a surge is not.
const REACT_SIGMAS: f64 = 2.0;

/// The lower confidence bound, `z` standard deviations, of a Poisson mean from one observed
/// count `n`: the exact (Garwood) bound `χ²(2n, α) / 2` by the Wilson–Hilferty cube-root
/// approximation, `n (1 − 1/(9n) − z / (3 √n))³`. The normal bound `n − z √n` is far
/// below the exact one at the small counts of a surge's first second (9 arrivals at z = 2:
/// 3.0 where the exact bound is 4.0, and 0 for 4 arrivals where it is 1.0), so it asked for
/// much more evidence than the stated false-alarm rate needs.
pub fn poisson_lower_bound(n: f64, z: f64) -> f64 {
    if !(n.is_finite() && n > 0.0) {
        return 0.0;
    }
    let root = 1.0 - 1.0 / (9.0 * n) - z / (3.0 * n.sqrt());
    n * root.max(0.0).powi(3)
}

/// The forecast behind a decision, for the next interval.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Forecast {
    pub requests: f64,
    pub isl: f64,
    pub osl: f64,
}

/// The planner's answer, with the reasoning that led to it.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub replicas: Replicas,
    /// `None` before the first observation: the replicas are left as they are.
    pub forecast: Option<Forecast>,
    pub prefill: Option<PrefillNeed>,
    pub decode: Option<DecodeNeed>,
    pub corrections: Corrections,
    /// The device budget held a pool below its need.
    pub budget_limited: bool,
}

pub struct Planner {
    interval: Duration,
    targets: Targets,
    limits: Limits,
    use_corrections: bool,
    capacity: Capacity,
    shape: Replicas,
    requests: Box<dyn Predictor>,
    isl: Box<dyn Predictor>,
    osl: Box<dyn Predictor>,
    corrections: Corrections,
    last_observed: Option<Duration>,
    /// Requests waiting at the last observation (a reaction acts on the growth since).
    queued: u64,
    /// Share of the prompt tokens the prefix cache served, as last observed (`None`: no
    /// interval has observed one): the prefill demand is net of it.
    cached: Option<f64>,
    /// While a reaction's growth is held: the queue before the first reaction of the
    /// episode. An interval that ends with the queue back there releases the growth.
    reacted_at_queue: Option<u64>,
    pools: Vec<PoolState>,
}

impl Planner {
    /// A planner for a cluster whose pools have `current` workers now (its variant says
    /// whether the cluster is aggregated or disaggregated).
    pub fn new(
        cfg: &PlannerConfig,
        profile: Profile,
        current: Replicas,
    ) -> Result<Planner, PlannerConfigError> {
        let pools = current.pools();
        cfg.validate(pools.len())?;
        // A profile read from YAML was checked already; one built in code may not be.
        profile.validate().map_err(PlannerConfigError::Profile)?;
        Ok(Planner {
            interval: Duration::from_millis(cfg.adjustment_interval_ms),
            targets: Targets {
                ttft_s: cfg.ttft_ms / 1e3,
                itl_s: cfg.itl_ms / 1e3,
            },
            limits: Limits {
                min_replicas: cfg.min_replicas,
                max_replicas: cfg.max_replicas,
                devices_per_worker: cfg.devices_per_worker,
                max_devices: cfg.max_devices,
                cooldown: Duration::from_millis(cfg.cooldown_ms),
            },
            use_corrections: cfg.correction,
            capacity: Capacity::new(profile),
            shape: current,
            requests: predictor::build(&cfg.predictor),
            isl: predictor::build(&cfg.predictor),
            osl: predictor::build(&cfg.predictor),
            corrections: Corrections::default(),
            last_observed: None,
            queued: 0,
            cached: None,
            reacted_at_queue: None,
            pools: pools.into_iter().map(PoolState::new).collect(),
        })
    }

    /// The pools' sizes as last decided.
    pub fn replicas(&self) -> Replicas {
        let sizes: Vec<usize> = self.pools.iter().map(PoolState::current).collect();
        self.shape.with_pools(&sizes)
    }

    /// Takes in the interval that ended at `now`. A request count over an interval longer
    /// or shorter than `adjustment_interval` (a late or early tick) is rescaled to one
    /// interval, so the forecast stays per interval.
    pub fn observe(&mut self, now: Duration, m: &IntervalMetrics) {
        let elapsed = self
            .last_observed
            .map(|t| now.saturating_sub(t))
            .filter(|d| !d.is_zero())
            .unwrap_or(self.interval);
        self.last_observed = Some(now);
        let per_interval = m.requests as f64 * self.interval.as_secs_f64() / elapsed.as_secs_f64();
        self.requests.observe(per_interval);
        if m.requests > 0 {
            if let Some(isl) = m.mean_isl {
                self.isl.observe(isl);
            }
        }
        if let Some(osl) = m.mean_osl {
            self.osl.observe(osl);
        }
        if let Some(q) = m.queued {
            self.queued = q;
        }
        // The reactions answered arrivals this interval has now measured (the decision
        // sizes for them) and a queue: once that is back where it was, their cause is gone.
        // With no report, the arrivals were all there was to see.
        if let Some(before) = self.reacted_at_queue {
            if m.queued.is_none_or(|q| q <= before) {
                release_reactions(&mut self.pools);
                self.reacted_at_queue = None;
            }
        }
        if let Some(c) = m.cached_fraction.filter(|c| c.is_finite()) {
            self.cached = Some(c.clamp(0.0, 1.0));
        }
        if self.use_corrections {
            self.update_corrections(m);
        }
    }

    /// Observed/expected latencies of this interval; a factor without data this interval
    /// keeps its last value.
    fn update_corrections(&mut self, m: &IntervalMetrics) {
        if let (Some(ttft), Some(isl)) = (m.mean_ttft_s, m.mean_isl) {
            // The profile's time for the tokens the engine computed: the cache's share
            // is already out of the demand, and counting it here again would halve it twice.
            let expected = self
                .capacity
                .prefill_s(isl * (1.0 - self.cached.unwrap_or(0.0)));
            if let Some(f) = correction(ttft, expected) {
                self.corrections.prefill = f;
            }
        }
        if let (Some(itl), Some(batch), Some(isl), Some(osl)) =
            (m.mean_itl_s, m.mean_decode_batch, m.mean_isl, m.mean_osl)
        {
            let expected = self.capacity.decode_itl_s(batch, isl + osl / 2.0);
            if let Some(f) = correction(itl, expected) {
                self.corrections.decode = f;
            }
        }
    }

    /// The replica counts for the next interval, from the forecast. (The queue is not added
    /// here: workers ordered for a backlog serve only after they start, by when the backlog
    /// is served or missed; measured on the bursty trace, adding it kept 8 workers up where
    /// 5 served, at no gain. It acts through [`Planner::react`], on its growth.)
    pub fn decide(&mut self, now: Duration) -> Decision {
        let Some(requests) = self.requests.predict() else {
            return Decision {
                replicas: self.replicas(),
                forecast: None,
                prefill: None,
                decode: None,
                corrections: self.corrections,
                budget_limited: false,
            };
        };
        // No lengths yet means no request yet: zero demand either way.
        let forecast = Forecast {
            requests,
            isl: self.isl.predict().unwrap_or(0.0),
            osl: self.osl.predict().unwrap_or(0.0),
        };
        let rate = requests / self.interval.as_secs_f64();
        let needs = self.needs(forecast, rate, self.cached.unwrap_or(0.0));
        self.settled(now, forecast, needs, Ask::Decision)
    }

    /// Between two intervals (`now` after the last observation): when the requests that
    /// arrived since it, or the ones waiting now, need more workers than the pools have,
    /// the pools grow at once; otherwise `None` and the next interval decides. The arrival
    /// rate taken is the observed count less [`REACT_SIGMAS`] of Poisson noise over the
    /// time since the last observation, never below the forecast; a queue that grew since
    /// the last observation adds its growth over the next interval (or the TTFT target, if
    /// longer). A reaction never shrinks a pool. Its growth is held until an interval ends
    /// with the queue back where it was before the reaction (see `limits.rs`), then the
    /// decisions' own asks decide.
    pub fn react(&mut self, now: Duration, p: &Pressure) -> Option<Decision> {
        let since = now.saturating_sub(self.last_observed.unwrap_or_default());
        if since.is_zero() {
            return None;
        }
        let forecast_rate = self.requests.predict().unwrap_or(0.0) / self.interval.as_secs_f64();
        let seen_rate = poisson_lower_bound(p.arrivals as f64, REACT_SIGMAS) / since.as_secs_f64();
        let grown = p.queued.unwrap_or(self.queued).saturating_sub(self.queued);
        let rate = forecast_rate.max(seen_rate) + self.queue_rate(grown);
        if rate <= forecast_rate {
            return None; // nothing the last decision did not know
        }
        // The lengths and the cache's share are the forecast's and the last interval's;
        // before the first, what this interval has seen so far (a surge at the very start:
        // the arrivals' prompts, the outputs so far, the first outputs' cache hits); with
        // no prompt length at all, nothing can be sized. Before any output the decode side
        // is priced at nothing, before any cache hit was seen whole prompts are.
        let usable = |v: Option<f64>| v.filter(|v| v.is_finite() && *v >= 0.0);
        let isl = self.isl.predict().or(usable(p.mean_isl))?;
        let osl = self.osl.predict().or(usable(p.mean_osl)).unwrap_or(0.0);
        let cached = self
            .cached
            .or(usable(p.cached_fraction).map(|c| c.min(1.0)))
            .unwrap_or(0.0);
        let forecast = Forecast {
            requests: rate * self.interval.as_secs_f64(),
            isl,
            osl,
        };
        let (prefill, decode, mut needs) = self.needs(forecast, rate, cached);
        // Only a pool that needs more acts: a reaction asking for the current size would
        // count as an ask for the cooldown and hold the pools up.
        let limit = self.limits.max_replicas;
        let grows = needs
            .iter()
            .zip(&self.pools)
            .any(|(&n, p)| n.min(limit) > p.current());
        if !grows {
            return None;
        }
        for (n, p) in needs.iter_mut().zip(&self.pools) {
            *n = (*n).max(p.current());
        }
        let current = self.replicas().pools();
        let d = self.settled(now, forecast, (prefill, decode, needs), Ask::Reaction);
        let grew = d.replicas.pools().iter().zip(&current).any(|(n, c)| n > c);
        if grew {
            self.reacted_at_queue.get_or_insert(self.queued);
        }
        grew.then_some(d)
    }

    /// Extra requests per second that work `queued` requests off within the next interval
    /// (or the TTFT target, if longer): a worker added now serves only after it starts, so
    /// sizing a backlog to the TTFT target alone overshoots.
    fn queue_rate(&self, queued: u64) -> f64 {
        queued as f64 / self.targets.ttft_s.max(self.interval.as_secs_f64())
    }

    /// The SLA math at `rate` requests/s with the forecast's lengths and `cached` of the
    /// prompt tokens served by the prefix cache: each pool's need.
    fn needs(
        &self,
        forecast: Forecast,
        rate: f64,
        cached: f64,
    ) -> (PrefillNeed, DecodeNeed, Vec<usize>) {
        let load = Load {
            requests_per_s: rate,
            isl: forecast.isl,
            osl: forecast.osl,
            cached,
        };
        let prefill = prefill_need(&self.capacity, load, self.targets, self.corrections);
        let decode = decode_need(&self.capacity, load, self.targets, self.corrections);
        let needs = match self.shape {
            Replicas::Aggregated { .. } => vec![whole(prefill.workers + decode.workers)],
            Replicas::Disaggregated { .. } => vec![whole(prefill.workers), whole(decode.workers)],
        };
        (prefill, decode, needs)
    }

    /// The needs through the limits (committed): the decision.
    fn settled(
        &mut self,
        now: Duration,
        forecast: Forecast,
        (prefill, decode, needs): (PrefillNeed, DecodeNeed, Vec<usize>),
        ask: Ask,
    ) -> Decision {
        let (sizes, budget_limited) = settle(&self.limits, now, &mut self.pools, &needs, ask);
        Decision {
            replicas: self.shape.with_pools(&sizes),
            forecast: Some(forecast),
            prefill: Some(prefill),
            decode: Some(decode),
            corrections: self.corrections,
            budget_limited,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::capacity::tests::HAND;
    use super::super::config::PredictorConfig;
    use super::*;
    use proptest::prelude::*;

    const TICK: Duration = Duration::from_secs(10);

    fn config(predictor: PredictorConfig) -> PlannerConfig {
        PlannerConfig {
            profile: "hand.yaml".into(),
            adjustment_interval_ms: 10_000,
            ttft_ms: 110.0,
            itl_ms: 14.0,
            predictor,
            min_replicas: 1,
            max_replicas: 40,
            cooldown_ms: 0,
            ..PlannerConfig::default()
        }
    }

    fn planner(cfg: &PlannerConfig, current: Replicas) -> Planner {
        Planner::new(cfg, Profile::from_yaml(HAND, "hand").unwrap(), current).unwrap()
    }

    fn interval(requests: u64, isl: f64, osl: f64) -> IntervalMetrics {
        IntervalMetrics {
            requests,
            mean_isl: Some(isl),
            mean_osl: Some(osl),
            ..IntervalMetrics::default()
        }
    }

    const DISAGG: Replicas = Replicas::Disaggregated {
        prefill: 1,
        decode: 1,
    };

    #[test]
    fn nothing_changes_before_the_first_observation() {
        let mut p = planner(&config(PredictorConfig::Constant {}), DISAGG);
        let d = p.decide(TICK);
        assert_eq!(d.replicas, DISAGG);
        assert!(d.forecast.is_none());
    }

    #[test]
    fn a_disaggregated_cluster_gets_both_pools_from_the_hand_profile() {
        // 600 requests per 10 s = 60 req/s, ISL 550, OSL 200.
        // Prefill: 60 × 550 = 33 000 tok/s over 12 000 usable (see sla.rs) → 2.75 → 3.
        // Decode: context 650, ITL(b) = 5.55 + (b − 1) × 9.95 / 7 ms; 14 ms → b = 6 at
        // 12.657 ms → 474.0 tok/s; 60 × 200 = 12 000 tok/s → 25.3 → 26.
        let mut p = planner(&config(PredictorConfig::Constant {}), DISAGG);
        p.observe(TICK, &interval(600, 550.0, 200.0));
        let d = p.decide(TICK);
        assert_eq!(d.decode.unwrap().point.batch, 6);
        assert_eq!(
            d.replicas,
            Replicas::Disaggregated {
                prefill: 3,
                decode: 26
            }
        );
    }

    #[test]
    fn a_surge_within_the_interval_grows_the_pools_at_once() {
        let mut p = planner(&config(PredictorConfig::Constant {}), DISAGG);
        p.observe(TICK, &interval(10, 550.0, 200.0));
        assert_eq!(p.decide(TICK).replicas, DISAGG);
        // A few arrivals in the first second are noise: 3 - 2·√3 < 0.
        let noise = Pressure {
            arrivals: 3,
            queued: None,
            mean_isl: None,
            mean_osl: None,
            cached_fraction: None,
        };
        assert_eq!(p.react(TICK + Duration::from_secs(1), &noise), None);
        // 100 in 2 s: taken as the Poisson bound 81.01 / 2 = 40.51 req/s. Prefill
        // 40.51 × 550 / 12 000 = 1.86 → 2; decode 40.51 × 200 / 474.0 = 17.09 → 18 (the
        // hand profile, as above).
        let surge = Pressure {
            arrivals: 100,
            queued: None,
            mean_isl: None,
            mean_osl: None,
            cached_fraction: None,
        };
        let d = p.react(TICK + Duration::from_secs(2), &surge).unwrap();
        let grown = Replicas::Disaggregated {
            prefill: 2,
            decode: 18,
        };
        assert_eq!(d.replicas, grown);
        assert_eq!(p.replicas(), grown);
        // A reaction never shrinks: the quiet second after it changes nothing.
        let quiet = Pressure::default();
        assert_eq!(p.react(TICK + Duration::from_secs(3), &quiet), None);
        assert_eq!(p.replicas(), grown);
    }

    #[test]
    fn the_reaction_rate_is_the_exact_poisson_bound() {
        // The exact (Garwood) one-sided bounds at z = 2 (α = 2.28 %), computed from the
        // Poisson tail: 1 → 0.023, 4 → 1.058, 9 → 4.046, 100 → 81.016; the approximation
        // is within 0.02 + 0.5 % of each. The normal bound n − 2 √n gives −1, 0, 3 and 80.
        for (n, exact) in [(1.0, 0.023), (4.0, 1.058), (9.0, 4.046), (100.0, 81.016)] {
            let b = poisson_lower_bound(n, 2.0);
            assert!((b - exact).abs() < 0.02 + 0.005 * exact, "{n}: {b}");
        }
        assert_eq!(poisson_lower_bound(0.0, 2.0), 0.0);
        assert_eq!(poisson_lower_bound(f64::NAN, 2.0), 0.0);
        assert!(poisson_lower_bound(1e300, 2.0).is_finite());
    }

    #[test]
    fn a_surge_before_the_first_interval_is_sized_from_what_it_has_shown() {
        // No interval observed yet. 100 arrivals in the first 2 s (40.51 req/s, as above),
        // ISL 1000; 45 % of the first outputs' prompt tokens came from the cache; finished
        // requests averaged 200 output tokens. Prefill: 550 new tokens, 40.51 × 550 over
        // 12 000 usable (sla.rs) = 1.86 → 2. Decode: context 1000 + 100 = 1100, b = 5 at
        // 14 ms, 357.1 tok/s: 40.51 × 200 / 357.1 = 22.68 → 23. Sized on the prompts alone
        // (whole prompts, no decode): R(1000) = 20 000, ρ = 0.706, 40 507 / 14 118 = 2.87
        // → 3 prefill workers and 1 decode worker, for a load that needs 23.
        let surge = Pressure {
            arrivals: 100,
            queued: None,
            mean_isl: Some(1000.0),
            mean_osl: Some(200.0),
            cached_fraction: Some(0.45),
        };
        let mut p = planner(&config(PredictorConfig::Constant {}), DISAGG);
        let d = p.react(Duration::from_secs(2), &surge).unwrap();
        let (prefill, decode) = (d.prefill.unwrap(), d.decode.unwrap());
        assert!((prefill.workers - 1.8566).abs() < 1e-3, "{prefill:?}");
        assert_eq!((decode.context, decode.point.batch), (1100.0, 5));
        assert!((decode.workers - 22.684).abs() < 1e-2, "{decode:?}");
        let sized = Replicas::Disaggregated {
            prefill: 2,
            decode: 23,
        };
        assert_eq!(d.replicas, sized);
        // Before anything finished or came from the cache: whole prompts, no decode.
        let blind = Pressure {
            mean_osl: None,
            cached_fraction: None,
            ..surge
        };
        let mut p = planner(&config(PredictorConfig::Constant {}), DISAGG);
        let d = p.react(Duration::from_secs(2), &blind).unwrap();
        assert!((d.prefill.unwrap().workers - 2.8692).abs() < 1e-3);
        assert_eq!(
            d.replicas,
            Replicas::Disaggregated {
                prefill: 3,
                decode: 1
            }
        );
        // Once an interval is observed its lengths and cache share are the ones used.
        let mut p = planner(&config(PredictorConfig::Constant {}), DISAGG);
        p.observe(
            TICK,
            &IntervalMetrics {
                cached_fraction: Some(0.0),
                ..interval(10, 1000.0, 10.0)
            },
        );
        p.decide(TICK);
        let d = p.react(TICK + Duration::from_secs(2), &surge).unwrap();
        assert_eq!(d.forecast.unwrap().osl, 10.0);
        assert!((d.prefill.unwrap().workers - 2.8692).abs() < 1e-3);
    }

    #[test]
    fn reactions_that_need_no_more_do_not_hold_the_pools_up_past_the_cooldown() {
        let cfg = PlannerConfig {
            cooldown_ms: 30_000,
            ..config(PredictorConfig::Constant {})
        };
        let mut p = planner(&cfg, DISAGG);
        let s = Duration::from_secs;
        // A queue that stays up: the reaction's growth is never released, so the cooldown
        // from the reaction is what holds it.
        let queued = |n| IntervalMetrics {
            queued: Some(n),
            ..interval(10, 550.0, 200.0)
        };
        p.observe(TICK, &queued(0));
        p.decide(TICK);
        let surge = Pressure {
            arrivals: 100,
            queued: None,
            mean_isl: None,
            mean_osl: None,
            cached_fraction: None,
        };
        assert!(p.react(TICK + s(2), &surge).is_some());
        for i in 2..=5u32 {
            let now = TICK * i;
            p.observe(now, &queued(50));
            let d = p.decide(now);
            if i < 5 {
                assert_ne!(d.replicas, DISAGG, "within the cooldown at {now:?}");
            } else {
                assert_eq!(d.replicas, DISAGG, "38 s after the change, quiet for 30 s");
                break;
            }
            // Busier than the forecast, but within what the pools have: 4.7 to 8 req/s.
            for k in 1..10 {
                let busier = Pressure {
                    arrivals: 10 * k,
                    queued: None,
                    mean_isl: None,
                    mean_osl: None,
                    cached_fraction: None,
                };
                assert_eq!(p.react(now + s(k), &busier), None);
            }
        }
    }

    #[test]
    fn a_reactions_growth_goes_once_the_queue_it_answered_is_gone() {
        // Aggregated, 60 s cooldown. 100 arrivals in 2 s: 40.51 req/s → 1.86 + 17.09 → 19
        // workers at once. The interval then measures 20 req/s (0.92 + 8.44 → 10) with 30
        // requests still waiting: the growth is held. The next ends with the queue back at
        // its level before the reaction: the pool goes to the decisions' 10 at once, not
        // 60 s after the reaction.
        let cfg = PlannerConfig {
            cooldown_ms: 60_000,
            ..config(PredictorConfig::Constant {})
        };
        let agg = Replicas::Aggregated { workers: 1 };
        let queued = |requests, n| IntervalMetrics {
            queued: Some(n),
            ..interval(requests, 550.0, 200.0)
        };
        let workers = |p: &Planner| p.replicas().total();
        for served in [true, false] {
            let mut p = planner(&cfg, agg);
            p.observe(TICK, &queued(10, 0));
            p.decide(TICK);
            let surge = Pressure {
                arrivals: 100,
                queued: None,
                mean_isl: None,
                mean_osl: None,
                cached_fraction: None,
            };
            assert!(p.react(TICK + Duration::from_secs(2), &surge).is_some());
            assert_eq!(workers(&p), 19);
            p.observe(2 * TICK, &queued(200, 30));
            p.decide(2 * TICK);
            assert_eq!(workers(&p), 19, "the queue is still there");
            p.observe(3 * TICK, &queued(200, if served { 0 } else { 30 }));
            p.decide(3 * TICK);
            assert_eq!(
                workers(&p),
                if served { 10 } else { 19 },
                "served: {served}"
            );
        }
    }

    #[test]
    fn a_growing_queue_adds_its_growth_over_the_interval_to_the_rate() {
        // 1 req/s forecast; the queue grew from 5 to 205 since the last observation: 200
        // requests to work off within the 10 s interval, + 20 req/s. Aggregated: 21 × 550 /
        // 12 000 + 21 × 200 / 474.0 = 0.96 + 8.86 → 10.
        let agg = Replicas::Aggregated { workers: 1 };
        let mut p = planner(&config(PredictorConfig::Constant {}), agg);
        let queued = |n| IntervalMetrics {
            queued: Some(n),
            ..interval(10, 550.0, 200.0)
        };
        p.observe(TICK, &queued(5));
        assert_eq!(
            p.decide(TICK).replicas,
            agg,
            "a standing queue is no growth"
        );
        let steady = Pressure {
            arrivals: 0,
            queued: Some(5),
            mean_isl: None,
            mean_osl: None,
            cached_fraction: None,
        };
        assert_eq!(p.react(TICK + Duration::from_secs(1), &steady), None);
        let growing = Pressure {
            arrivals: 0,
            queued: Some(205),
            mean_isl: None,
            mean_osl: None,
            cached_fraction: None,
        };
        let d = p.react(TICK + Duration::from_secs(2), &growing).unwrap();
        assert_eq!(d.replicas, Replicas::Aggregated { workers: 10 });
    }

    #[test]
    fn the_prefill_pool_is_sized_for_the_tokens_the_prefix_cache_does_not_serve() {
        // 60 req/s at ISL 1000: all 1000 tokens priced, 60 000 tok/s over 14 118 usable
        // (R = 20 000, p = 50 ms, ρ = 0.706) → 4.25 → 5 prefill workers. With 45 % of the
        // prompt tokens served from the cache, 550 new tokens each: 33 000 over 12 000
        // (sla.rs) → 2.75 → 3. The decode pool is the same either way (context 1100).
        let mut p = planner(&config(PredictorConfig::Constant {}), DISAGG);
        let m = interval(600, 1000.0, 200.0);
        p.observe(TICK, &m);
        let all = p.decide(TICK);
        assert_eq!(all.replicas.pools()[0], 5);
        let hits = IntervalMetrics {
            cached_fraction: Some(0.45),
            ..m
        };
        p.observe(2 * TICK, &hits);
        let net = p.decide(2 * TICK);
        assert_eq!(net.replicas.pools()[0], 3);
        assert_eq!(net.replicas.pools()[1], all.replicas.pools()[1]);
        // An interval without first outputs keeps the share; a NaN one changes nothing.
        for cached_fraction in [None, Some(f64::NAN)] {
            p.observe(
                3 * TICK,
                &IntervalMetrics {
                    cached_fraction,
                    ..m
                },
            );
            assert_eq!(p.decide(3 * TICK).replicas.pools()[0], 3);
        }
    }

    #[test]
    fn a_ttft_that_matches_the_uncached_work_is_no_correction() {
        // 45 % cached, ISL 1000: the engine computes 550 tokens, 36.67 ms idle. A TTFT of
        // that is the profile exactly (factor 1), not a cache effect to take off again.
        let mut p = planner(&config(PredictorConfig::Constant {}), DISAGG);
        p.observe(
            TICK,
            &IntervalMetrics {
                cached_fraction: Some(0.45),
                ..interval(600, 1000.0, 200.0)
            },
        );
        p.observe(
            2 * TICK,
            &IntervalMetrics {
                mean_ttft_s: Some(550.0 / 15_000.0),
                ..interval(600, 1000.0, 200.0)
            },
        );
        let d = p.decide(2 * TICK);
        assert!(
            (d.corrections.prefill - 1.0).abs() < 1e-9,
            "{:?}",
            d.corrections
        );
        assert_eq!(d.replicas.pools()[0], 3);
    }

    #[test]
    fn an_aggregated_cluster_adds_the_two_needs_in_one_pool() {
        // 2.75 + 25.31 = 28.06 workers → 29.
        let mut p = planner(
            &config(PredictorConfig::Constant {}),
            Replicas::Aggregated { workers: 1 },
        );
        p.observe(TICK, &interval(600, 550.0, 200.0));
        assert_eq!(
            p.decide(TICK).replicas,
            Replicas::Aggregated { workers: 29 }
        );
    }

    #[test]
    fn no_traffic_means_the_minimum() {
        let mut p = planner(&config(PredictorConfig::Constant {}), DISAGG);
        p.observe(TICK, &IntervalMetrics::default());
        assert_eq!(p.decide(TICK).replicas, DISAGG);
    }

    #[test]
    fn a_late_tick_is_rescaled_to_one_interval() {
        // 1200 requests over 20 s is 600 per 10-s interval: the same need as above.
        let mut p = planner(&config(PredictorConfig::Constant {}), DISAGG);
        p.observe(TICK, &interval(600, 550.0, 200.0));
        p.observe(3 * TICK, &interval(1200, 550.0, 200.0));
        assert_eq!(p.decide(3 * TICK).forecast.unwrap().requests, 600.0);
    }

    #[test]
    fn the_kalman_planner_scales_ahead_of_the_constant_one_on_a_ramp() {
        let kalman = config(PredictorConfig::default());
        let constant = config(PredictorConfig::Constant {});
        let (mut k, mut c) = (planner(&kalman, DISAGG), planner(&constant, DISAGG));
        let mut ahead = 0;
        for i in 1..=20u32 {
            let m = interval(100 * u64::from(i), 550.0, 200.0);
            k.observe(TICK * i, &m);
            c.observe(TICK * i, &m);
            let (kd, cd) = (k.decide(TICK * i), c.decide(TICK * i));
            assert!(kd.replicas.total() >= cd.replicas.total(), "interval {i}");
            ahead += usize::from(kd.replicas.total() > cd.replicas.total());
            if i >= 5 {
                // The Kalman forecast is the next interval's true count.
                let next = 100.0 * f64::from(i + 1);
                assert!((kd.forecast.unwrap().requests - next).abs() < 0.01 * next);
            }
        }
        assert!(ahead >= 10, "ahead in {ahead} of 20 intervals");
    }

    #[test]
    fn a_slow_engine_observed_raises_the_decode_pool() {
        let cfg = config(PredictorConfig::Constant {});
        let mut p = planner(&cfg, DISAGG);
        let mut m = interval(200, 550.0, 200.0);
        p.observe(TICK, &m);
        let before = p.decide(TICK);
        // Observed ITL at batch 1, context 650: twice the profile's 5.55 ms.
        m.mean_decode_batch = Some(1.0);
        m.mean_itl_s = Some(2.0 * 0.00555);
        p.observe(2 * TICK, &m);
        let after = p.decide(2 * TICK);
        assert!((after.corrections.decode - 2.0).abs() < 1e-9);
        let decode = |r: Replicas| match r {
            Replicas::Disaggregated { decode, .. } => decode,
            Replicas::Aggregated { .. } => unreachable!(),
        };
        assert!(decode(after.replicas) > decode(before.replicas));
        // With corrections off the same observations change nothing.
        let mut off = planner(
            &PlannerConfig {
                correction: false,
                ..cfg
            },
            DISAGG,
        );
        off.observe(TICK, &interval(200, 550.0, 200.0));
        off.observe(2 * TICK, &m);
        assert_eq!(off.decide(2 * TICK).replicas, before.replicas);
    }

    #[test]
    fn the_budget_caps_the_whole_cluster() {
        let cfg = PlannerConfig {
            max_devices: Some(10),
            ..config(PredictorConfig::Constant {})
        };
        let mut p = planner(&cfg, DISAGG);
        p.observe(TICK, &interval(600, 550.0, 200.0));
        let d = p.decide(TICK);
        assert!(d.budget_limited);
        assert_eq!(d.replicas.total(), 10);
        assert_eq!(p.replicas(), d.replicas);
    }

    #[test]
    fn pools_follow_the_worker_roles() {
        let group = |role, replicas| WorkerGroup {
            role,
            replicas,
            ..WorkerGroup::default()
        };
        let agg = [
            group(WorkerRole::Aggregated, 2),
            group(WorkerRole::Aggregated, 1),
        ];
        assert_eq!(
            Replicas::of_workers(&agg),
            Ok(Replicas::Aggregated { workers: 3 })
        );
        let disagg = [group(WorkerRole::Prefill, 1), group(WorkerRole::Decode, 4)];
        assert_eq!(
            Replicas::of_workers(&disagg),
            Ok(Replicas::Disaggregated {
                prefill: 1,
                decode: 4
            })
        );
        let mixed = [
            group(WorkerRole::Aggregated, 1),
            group(WorkerRole::Decode, 1),
        ];
        assert!(Replicas::of_workers(&mixed).is_err());
        assert!(Replicas::of_workers(&[group(WorkerRole::Prefill, 1)]).is_err());
    }

    #[test]
    fn an_impossible_config_is_refused() {
        let cfg = PlannerConfig {
            max_devices: Some(1),
            ..config(PredictorConfig::Constant {})
        };
        let profile = Profile::from_yaml(HAND, "hand").unwrap();
        assert!(Planner::new(&cfg, profile.clone(), DISAGG).is_err());
        let mut broken = profile;
        broken.kv.block_size = 0;
        let e = Planner::new(&config(PredictorConfig::Constant {}), broken, DISAGG);
        assert!(e.err().unwrap().to_string().contains("block_size"));
    }

    fn any_value() -> impl Strategy<Value = Option<f64>> {
        prop_oneof![
            Just(None),
            Just(Some(0.0)),
            (0.0..5e3f64).prop_map(Some),
            Just(Some(1e300)),
            Just(Some(f64::NAN)),
            Just(Some(-3.0)),
        ]
    }

    proptest! {
        /// Whatever the metrics (none, zeros, garbage, absurd values), for either predictor
        /// kind and cluster shape: every pool stays within its range, the cluster within the
        /// budget, and the forecast is finite.
        #[test]
        fn decisions_respect_the_limits_on_any_metrics(
            steps in prop::collection::vec(
                (0u64..100_000, any_value(), any_value(), any_value(), any_value(), any_value(), any_value()),
                1..25,
            ),
            kalman in any::<bool>(),
            aggregated in any::<bool>(),
            budget in 2usize..20,
        ) {
            let predictor = if kalman {
                PredictorConfig::default()
            } else {
                PredictorConfig::MovingAverage { window: 3 }
            };
            let cfg = PlannerConfig {
                max_replicas: 12,
                max_devices: Some(budget),
                cooldown_ms: 20_000,
                ..config(predictor)
            };
            let shape = if aggregated { Replicas::Aggregated { workers: 1 } } else { DISAGG };
            let mut p = planner(&cfg, shape);
            for (i, (requests, isl, osl, ttft, itl, batch, cached)) in steps.into_iter().enumerate() {
                let now = TICK * (i as u32 + 1);
                p.observe(now, &IntervalMetrics {
                    requests,
                    mean_isl: isl,
                    mean_osl: osl,
                    mean_ttft_s: ttft,
                    mean_itl_s: itl,
                    mean_decode_batch: batch,
                    queued: isl.map(|v| v as u64),
                    cached_fraction: cached.map(|v| v / 1e3),
                });
                if let Some(d) = p.react(now + TICK / 2, &Pressure {
                    arrivals: requests,
                    queued: osl.map(|v| v as u64),
                    mean_isl: None,
                    mean_osl: None,
                    cached_fraction: None,
                }) {
                    prop_assert!(d.replicas.pools().iter().all(|&n| (1..=12).contains(&n)));
                    prop_assert!(d.replicas.total() <= budget);
                }
                let d = p.decide(now);
                let sizes = d.replicas.pools();
                prop_assert!(sizes.iter().all(|&n| (1..=12).contains(&n)), "{sizes:?}");
                prop_assert!(d.replicas.total() <= budget, "{sizes:?} > {budget}");
                let f = d.forecast.unwrap();
                prop_assert!(f.requests.is_finite() && f.isl.is_finite() && f.osl.is_finite());
            }
        }
    }
}
