//! Fault plans: worker crashes (with restart) and network partitions, given explicitly or
//! drawn from the run's seed.
//!
//! Spec syntax (comma-separated): `crash:SLOT@AT+DOWN` (worker slot SLOT crashes at AT seconds
//! and restarts DOWN seconds later), `partition:A-B@AT+FOR` (nodes A and B cannot talk from AT
//! for FOR seconds; node 0 is the router, k the worker slot k), `random:N` (N faults drawn
//! from the fault stream within the workload's time span).

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

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FaultPlan {
    pub crashes: Vec<Crash>,
    pub partitions: Vec<Partition>,
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
                _ => return Err(err("unknown fault kind (crash, partition, random)")),
            }
        }
        Ok(plan)
    }

    /// When the last fault is over (restart done, partition healed).
    pub fn last_fault_end(&self) -> SimTime {
        let c = self.crashes.iter().map(|c| c.at.plus(c.down_for));
        let p = self.partitions.iter().map(|p| p.until);
        c.chain(p).max().unwrap_or(SimTime::ZERO)
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
}
