//! The simulated network between nodes (node 0 = the router/frontend, node k = worker slot k).
//!
//! Per message: latency = `base` + jitter (exponential with mean `jitter_mean`, or log-normal
//! with median `jitter_mean`), unless the link is FIFO-clamped. Two planes behave differently,
//! as their real transports do:
//! - **request plane** (ZeroMQ over TCP): never loses a message on its own; across a
//!   partition a message is held back and delivered after the partition heals (TCP
//!   retransmission), by which time the receiver may have given up on it;
//! - **event plane** (PUB/SUB): each message is dropped with probability `loss`, and dropped
//!   outright while its link is partitioned. Subscribers detect the gap by sequence number.
//!
//! Reordering: by default each directed link delivers in send order (a message never
//! overtakes an earlier one on the same link); with probability `reorder` a message skips that
//! clamp and may arrive after later ones.

use crate::rng::{exponential, lognormal};
use crate::time::{SimDuration, SimTime};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A simulated machine: 0 is the router, k ≥ 1 is worker slot k.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId(pub u32);

impl NodeId {
    pub const ROUTER: NodeId = NodeId(0);
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JitterKind {
    Exponential,
    LogNormal,
}

/// Latency, loss and reordering of every link (one model for all links).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct NetConfig {
    pub base_us: f64,
    pub jitter_mean_us: f64,
    pub jitter: JitterKind,
    /// Sigma of the log-normal jitter (ignored for exponential).
    pub lognormal_sigma: f64,
    /// Event-plane loss probability per message.
    pub loss: f64,
    /// Probability that a message is not held behind earlier ones on its link.
    pub reorder: f64,
    /// Bandwidth of a link for bulk data (transfer-plane pieces: KV blocks), bytes per
    /// second; a piece costs a message's latency plus its size over this.
    pub bulk_bytes_per_s: f64,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            base_us: 200.0,
            jitter_mean_us: 50.0,
            jitter: JitterKind::Exponential,
            lognormal_sigma: 0.5,
            loss: 0.0,
            reorder: 0.0,
            bulk_bytes_per_s: 12.5e9,
        }
    }
}

/// Which transport a message uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plane {
    Request,
    Event,
}

/// Links cut between two instants (both directions).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Partition {
    pub a: NodeId,
    pub b: NodeId,
    pub from: SimTime,
    pub until: SimTime,
}

impl Partition {
    fn cuts(&self, x: NodeId, y: NodeId, at: SimTime) -> bool {
        let pair = (self.a == x && self.b == y) || (self.a == y && self.b == x);
        pair && at >= self.from && at < self.until
    }
}

/// Decides when (and whether) each message arrives.
pub struct Network {
    cfg: NetConfig,
    partitions: Vec<Partition>,
    rng: ChaCha8Rng,
    /// Last delivery time per directed link, for the FIFO clamp.
    last_delivery: BTreeMap<(NodeId, NodeId), SimTime>,
    pub stats: NetStats,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NetStats {
    pub sent: u64,
    pub dropped_loss: u64,
    pub dropped_partition: u64,
    pub held_by_partition: u64,
}

impl Network {
    /// The link settings.
    pub fn config(&self) -> &NetConfig {
        &self.cfg
    }

    pub fn new(cfg: NetConfig, partitions: Vec<Partition>, rng: ChaCha8Rng) -> Self {
        Network {
            cfg,
            partitions,
            rng,
            last_delivery: BTreeMap::new(),
            stats: NetStats::default(),
        }
    }

    /// Arrival time of a message sent now from `from` to `to`, or `None` if it is lost.
    pub fn deliver_at(
        &mut self,
        now: SimTime,
        from: NodeId,
        to: NodeId,
        plane: Plane,
    ) -> Option<SimTime> {
        self.stats.sent += 1;
        let mut depart = now;
        if let Some(p) = self.partitions.iter().find(|p| p.cuts(from, to, now)) {
            match plane {
                Plane::Event => {
                    self.stats.dropped_partition += 1;
                    return None;
                }
                Plane::Request => {
                    self.stats.held_by_partition += 1;
                    depart = p.until;
                }
            }
        }
        if plane == Plane::Event && self.cfg.loss > 0.0 && self.rng.gen::<f64>() < self.cfg.loss {
            self.stats.dropped_loss += 1;
            return None;
        }
        let jitter = match self.cfg.jitter {
            JitterKind::Exponential => exponential(&mut self.rng, self.cfg.jitter_mean_us),
            JitterKind::LogNormal => lognormal(
                &mut self.rng,
                self.cfg.jitter_mean_us,
                self.cfg.lognormal_sigma,
            ),
        };
        let mut at = depart.plus(SimDuration::from_micros_f64(self.cfg.base_us + jitter));
        let skip_fifo = self.cfg.reorder > 0.0 && self.rng.gen::<f64>() < self.cfg.reorder;
        let last = self
            .last_delivery
            .entry((from, to))
            .or_insert(SimTime::ZERO);
        if !skip_fifo {
            at = at.max(*last);
        }
        *last = (*last).max(at);
        Some(at)
    }

    /// Forgets the last delivery times (the caller's clock went back to zero).
    pub fn reset_fifo(&mut self) {
        self.last_delivery.clear();
    }

    /// When the last partition ends (faults are over from then on).
    pub fn last_partition_end(&self) -> SimTime {
        self.partitions
            .iter()
            .map(|p| p.until)
            .max()
            .unwrap_or(SimTime::ZERO)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{SeedSplitter, Stream};

    fn net(cfg: NetConfig, parts: Vec<Partition>) -> Network {
        Network::new(cfg, parts, SeedSplitter::new(1).stream(Stream::Network))
    }

    #[test]
    fn fifo_links_never_reorder() {
        let mut n = net(
            NetConfig {
                jitter_mean_us: 1000.0,
                ..NetConfig::default()
            },
            vec![],
        );
        let mut last = SimTime::ZERO;
        for i in 0..200 {
            let at = n
                .deliver_at(SimTime(i * 1000), NodeId(0), NodeId(1), Plane::Request)
                .unwrap();
            assert!(at >= last);
            last = at;
        }
    }

    #[test]
    fn partition_holds_requests_and_drops_events() {
        let p = Partition {
            a: NodeId(0),
            b: NodeId(2),
            from: SimTime::from_millis(10),
            until: SimTime::from_millis(20),
        };
        let mut n = net(NetConfig::default(), vec![p]);
        let at = n
            .deliver_at(
                SimTime::from_millis(12),
                NodeId(2),
                NodeId(0),
                Plane::Request,
            )
            .unwrap();
        assert!(at >= SimTime::from_millis(20));
        assert!(n
            .deliver_at(SimTime::from_millis(12), NodeId(2), NodeId(0), Plane::Event)
            .is_none());
        assert!(n
            .deliver_at(SimTime::from_millis(12), NodeId(1), NodeId(0), Plane::Event)
            .is_some());
    }
}
