//! Fault plans: worker crashes (with restart), network partitions and slow workers, given
//! explicitly or drawn from the run's seed.
//!
//! Spec syntax (comma-separated): `crash:SLOT@AT+DOWN` (worker slot SLOT crashes at AT seconds
//! and restarts DOWN seconds later), `partition:A-B@AT+FOR` (nodes A and B cannot talk from AT
//! for FOR seconds; node 0 is the router, k the worker slot k), `slow:SLOT@AT+FORxK` (every
//! step worker slot SLOT starts from AT for FOR seconds takes K times as long: an overloaded
//! or throttled machine; with a large K a stuck engine that still heartbeats), `random:N` (N
//! crashes or partitions drawn from the fault stream within the workload's time span),
//! `random-slow:N` (N slowdowns drawn likewise, K log-uniform in [2, 1000]).

use crate::network::{NodeId, Partition};
use crate::rng::{SeedSplitter, Stream};
use crate::time::{SimDuration, SimTime};
use rand::Rng;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Crash {
    /// Worker slot (1-based, as node ids).
    pub slot: u32,
    pub at: SimTime,
    pub down_for: SimDuration,
}

/// A worker whose steps take `factor` times as long while it lasts. Its heartbeats, load
/// reports and network are untouched: only its engine is slow.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Slowdown {
    /// Worker slot (1-based, as node ids); every incarnation in the slot is slow.
    pub slot: u32,
    pub at: SimTime,
    pub lasts: SimDuration,
    pub factor: f64,
}

impl Slowdown {
    /// Whether a step that starts at `now` is slowed.
    pub fn covers(&self, now: SimTime) -> bool {
        now >= self.at && now < self.at.plus(self.lasts)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FaultPlan {
    pub crashes: Vec<Crash>,
    pub partitions: Vec<Partition>,
    #[serde(default)]
    pub slowdowns: Vec<Slowdown>,
}

#[derive(Debug, thiserror::Error)]
#[error("bad fault spec {spec:?}: {msg}")]
pub struct FaultSpecError {
    pub spec: String,
    pub msg: String,
}

impl FaultPlan {
    /// Parses a spec; `random:N` draws from the seed within `[0, span)` over `workers` slots.
    pub fn parse(
        spec: &str,
        seeds: &SeedSplitter,
        workers: u32,
        span: SimTime,
    ) -> Result<FaultPlan, FaultSpecError> {
        let mut plan = FaultPlan::default();
        let mut rng = seeds.stream(Stream::Faults);
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let err = |msg: &str| FaultSpecError {
                spec: item.to_string(),
                msg: msg.to_string(),
            };
            let (kind, rest) = item
                .split_once(':')
                .ok_or_else(|| err("expected KIND:..."))?;
            match kind {
                "random" => {
                    let n: u32 = rest.parse().map_err(|_| err("expected random:N"))?;
                    let span_s = span.as_secs_f64().max(1.0);
                    for _ in 0..n {
                        let at = SimTime::from_secs_f64(rng.gen_range(0.0..span_s));
                        let dur = SimDuration::from_secs_f64(rng.gen_range(0.5..5.0));
                        let slot = rng.gen_range(1..=workers.max(1));
                        if rng.gen_bool(0.5) {
                            plan.crashes.push(Crash {
                                slot,
                                at,
                                down_for: dur,
                            });
                        } else {
                            plan.partitions.push(Partition {
                                a: NodeId::ROUTER,
                                b: NodeId(slot),
                                from: at,
                                until: at.plus(dur),
                            });
                        }
                    }
                }
                "random-slow" => {
                    let n: u32 = rest.parse().map_err(|_| err("expected random-slow:N"))?;
                    let span_s = span.as_secs_f64().max(1.0);
                    for _ in 0..n {
                        let at = SimTime::from_secs_f64(rng.gen_range(0.0..span_s));
                        let lasts = SimDuration::from_secs_f64(rng.gen_range(0.5..5.0));
                        let slot = rng.gen_range(1..=workers.max(1));
                        // Log-uniform: as many mildly slow workers as stuck ones.
                        let factor = 2.0 * 500f64.powf(rng.gen_range(0.0..1.0));
                        plan.slowdowns.push(Slowdown {
                            slot,
                            at,
                            lasts,
                            factor,
                        });
                    }
                }
                "slow" => {
                    let (who, when) = rest
                        .split_once('@')
                        .ok_or_else(|| err("expected slow:SLOT@AT+FORxK"))?;
                    let (at, rest) = when
                        .split_once('+')
                        .ok_or_else(|| err("expected @AT+FORxK"))?;
                    let (lasts, factor) = rest
                        .split_once('x')
                        .ok_or_else(|| err("expected +FORxK (K: how many times slower)"))?;
                    let slot: u32 = who.parse().map_err(|_| err("bad worker slot"))?;
                    if slot == 0 || slot > workers {
                        return Err(err("worker slot out of range (1..=workers)"));
                    }
                    let at: f64 = at.parse().map_err(|_| err("bad AT seconds"))?;
                    let lasts: f64 = lasts.parse().map_err(|_| err("bad FOR seconds"))?;
                    let factor: f64 = factor.parse().map_err(|_| err("bad factor K"))?;
                    if !(factor.is_finite() && factor >= 1.0) {
                        return Err(err("the factor K must be a number >= 1"));
                    }
                    plan.slowdowns.push(Slowdown {
                        slot,
                        at: SimTime::from_secs_f64(at),
                        lasts: SimDuration::from_secs_f64(lasts),
                        factor,
                    });
                }
                "crash" | "partition" => {
                    let (who, when) = rest
                        .split_once('@')
                        .ok_or_else(|| err("expected ...@AT+DURATION"))?;
                    let (at, dur) = when
                        .split_once('+')
                        .ok_or_else(|| err("expected @AT+DURATION"))?;
                    let at: f64 = at.parse().map_err(|_| err("bad AT seconds"))?;
                    let dur: f64 = dur.parse().map_err(|_| err("bad DURATION seconds"))?;
                    let at = SimTime::from_secs_f64(at);
                    let dur = SimDuration::from_secs_f64(dur);
                    if kind == "crash" {
                        let slot: u32 = who.parse().map_err(|_| err("bad worker slot"))?;
                        if slot == 0 || slot > workers {
                            return Err(err("worker slot out of range (1..=workers)"));
                        }
                        plan.crashes.push(Crash {
                            slot,
                            at,
                            down_for: dur,
                        });
                    } else {
                        let (a, b) = who.split_once('-').ok_or_else(|| err("expected A-B"))?;
                        let a: u32 = a.parse().map_err(|_| err("bad node A"))?;
                        let b: u32 = b.parse().map_err(|_| err("bad node B"))?;
                        if a > workers || b > workers || a == b {
                            return Err(err("nodes must be distinct and within 0..=workers"));
                        }
                        plan.partitions.push(Partition {
                            a: NodeId(a),
                            b: NodeId(b),
                            from: at,
                            until: at.plus(dur),
                        });
                    }
                }
                _ => {
                    return Err(err(
                        "unknown fault kind (crash, partition, slow, random, random-slow)",
                    ))
                }
            }
        }
        Ok(plan)
    }

    /// When the last fault is over (restart done, partition healed, slowdown over; a slowed
    /// step that started before may still run).
    pub fn last_fault_end(&self) -> SimTime {
        let c = self.crashes.iter().map(|c| c.at.plus(c.down_for));
        let p = self.partitions.iter().map(|p| p.until);
        let s = self.slowdowns.iter().map(|s| s.at.plus(s.lasts));
        c.chain(p).chain(s).max().unwrap_or(SimTime::ZERO)
    }

    /// How many times as long a step of worker `slot` that starts at `now` takes (1: not
    /// slowed; overlapping slowdowns: the largest).
    pub fn slowdown(&self, slot: u32, now: SimTime) -> f64 {
        self.slowdowns
            .iter()
            .filter(|s| s.slot == slot && s.covers(now))
            .map(|s| s.factor)
            .fold(1.0, f64::max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_explicit_and_random_faults() {
        let s = SeedSplitter::new(3);
        let p = FaultPlan::parse(
            "crash:2@1.5+2, partition:0-1@3+1",
            &s,
            4,
            SimTime::from_millis(10_000),
        )
        .unwrap();
        assert_eq!(p.crashes[0].slot, 2);
        assert_eq!(p.last_fault_end(), SimTime::from_millis(4000));
        let r1 = FaultPlan::parse("random:5", &s, 4, SimTime::from_millis(10_000)).unwrap();
        let r2 = FaultPlan::parse("random:5", &s, 4, SimTime::from_millis(10_000)).unwrap();
        assert_eq!(r1, r2);
        assert_eq!(r1.crashes.len() + r1.partitions.len(), 5);
        assert!(FaultPlan::parse("crash:9@1+1", &s, 4, SimTime::ZERO).is_err());
    }

    #[test]
    fn parses_slowdowns_and_prices_a_step_by_the_largest_factor() {
        let s = SeedSplitter::new(3);
        let p = FaultPlan::parse("slow:2@1+3x20, slow:2@2+0.5x4", &s, 4, SimTime::ZERO).unwrap();
        assert_eq!(p.slowdowns.len(), 2);
        assert_eq!(p.slowdown(2, SimTime::from_millis(500)), 1.0);
        assert_eq!(p.slowdown(2, SimTime::from_millis(2200)), 20.0);
        assert_eq!(p.slowdown(1, SimTime::from_millis(2200)), 1.0);
        assert_eq!(p.slowdown(2, SimTime::from_millis(4000)), 1.0);
        assert_eq!(p.last_fault_end(), SimTime::from_millis(4000));
        for bad in [
            "slow:2@1+3",
            "slow:0@1+3x2",
            "slow:2@1+3x0.5",
            "slow:2@1+3xinf",
        ] {
            assert!(
                FaultPlan::parse(bad, &s, 4, SimTime::ZERO).is_err(),
                "{bad}"
            );
        }
        // Drawn slowdowns come after the crashes and partitions, which stay as they were.
        let span = SimTime::from_millis(10_000);
        let r = FaultPlan::parse("random:2, random-slow:3", &s, 4, span).unwrap();
        let crashes_only = FaultPlan::parse("random:2", &s, 4, span).unwrap();
        assert_eq!(
            (&r.crashes, &r.partitions),
            (&crashes_only.crashes, &crashes_only.partitions)
        );
        assert_eq!(r.slowdowns.len(), 3);
        assert!(r
            .slowdowns
            .iter()
            .all(|d| (2.0..=1000.0).contains(&d.factor)));
    }
}
