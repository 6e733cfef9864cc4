//! The simulated network between the shells' in-memory nodes.
//!
//! Latency, loss, reordering and partitions come from the same [`Network`] model as the
//! discrete-event core (one seeded stream). On top of it this module tracks which
//! *incarnation* of each node is alive: a worker that crashes and restarts comes back as a
//! new incarnation, and links to the old one fail for good, as TCP connections to a dead
//! process do.
//!
//! - Request plane: [`SimLink`] implements the runtime's [`Link`], so a real `Addr` placed
//!   behind it with `Addr::via` crosses the simulated wire: FIFO per direction, held back
//!   across a partition, `PeerGone` once either end is dead.
//! - Event plane: [`SimPublisher`] numbers events per topic like the real PUB socket, and
//!   [`SimNet::subscribe`] feeds them through the runtime's real [`GapDetector`]; messages
//!   may be lost (`loss`), reordered (`reorder`) or dropped across a partition.

use super::clock::ScaledClock;
use crate::eventlog::EventLog;
use crate::network::{NetStats, Network, NodeId, Plane};
use crate::time::SimTime;
use futures::StreamExt;
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use turbine_actors::router::membership::EventFeed;
use turbine_runtime::events::{Delivery, Event, GapDetector};
use turbine_runtime::Clock;
use turbine_runtime::{wire, CallError, Direction, Link, Transit};

/// One incarnation of a node: links and publishers are bound to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Endpoint {
    pub node: NodeId,
    pub incarnation: u64,
}

struct NetState {
    network: Network,
    /// The live incarnation of each node; absent while the node is down.
    live: BTreeMap<NodeId, u64>,
    next_incarnation: u64,
    /// Last arrival time per directed request-plane link: the wire is TCP, always FIFO
    /// (the model's `reorder` applies to the event plane only).
    link_arrivals: BTreeMap<(NodeId, NodeId), SimTime>,
    /// Event-plane subscriptions by publisher name (the frontend subscribes to each worker).
    subscribers: BTreeMap<String, mpsc::UnboundedSender<Event>>,
    /// KV-topic gaps the subscribers noticed (each makes the frontend clear that worker's
    /// index entries).
    kv_gaps: u64,
}

/// The shared network of one run.
pub struct SimNet {
    state: Mutex<NetState>,
    clock: ScaledClock,
    log: Arc<Mutex<EventLog>>,
}

impl SimNet {
    pub fn new(network: Network, clock: ScaledClock, log: Arc<Mutex<EventLog>>) -> Arc<SimNet> {
        Arc::new(SimNet {
            state: Mutex::new(NetState {
                network,
                live: BTreeMap::new(),
                next_incarnation: 1,
                link_arrivals: BTreeMap::new(),
                subscribers: BTreeMap::new(),
                kv_gaps: 0,
            }),
            clock,
            log,
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, NetState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Time went back to zero (the workload starts): forget arrival times kept so far.
    pub fn restart_time(&self) {
        let mut s = self.state();
        s.link_arrivals.clear();
        s.network.reset_fifo();
    }

    /// Starts a new incarnation of `node`.
    pub fn bring_up(&self, node: NodeId) -> Endpoint {
        let mut s = self.state();
        let incarnation = s.next_incarnation;
        s.next_incarnation += 1;
        s.live.insert(node, incarnation);
        Endpoint { node, incarnation }
    }

    /// The node's current incarnation dies: its links fail, its messages stop.
    pub fn take_down(&self, node: NodeId) {
        self.state().live.remove(&node);
    }

    pub fn is_live(&self, ep: Endpoint) -> bool {
        self.state().live.get(&ep.node) == Some(&ep.incarnation)
    }

    pub fn stats(&self) -> NetStats {
        self.state().network.stats.clone()
    }

    /// Gaps in KV event sequences the frontend's subscriptions noticed.
    pub fn kv_gaps(&self) -> u64 {
        self.state().kv_gaps
    }

    /// The request-plane wire from `caller` to `service`.
    pub fn link(self: &Arc<Self>, caller: Endpoint, service: Endpoint) -> Arc<dyn Link> {
        Arc::new(SimLink {
            net: self.clone(),
            caller,
            service,
        })
    }

    /// Subscribes to `publisher`'s events (replacing an earlier subscription): what arrives
    /// goes through a gap detector, as on the real SUB socket.
    pub fn subscribe(self: &Arc<Self>, publisher: &str) -> EventFeed {
        let (tx, rx) = mpsc::unbounded_channel();
        self.state().subscribers.insert(publisher.to_string(), tx);
        let state = (rx, GapDetector::new(), VecDeque::new(), self.clone());
        futures::stream::unfold(state, |(mut rx, mut gaps, mut ready, net)| async move {
            loop {
                if let Some(d) = ready.pop_front() {
                    return Some((Ok(d), (rx, gaps, ready, net)));
                }
                let ev: Event = rx.recv().await?;
                if let Some(gap) = gaps.observe(&ev.publisher, &ev.topic, ev.seq) {
                    if gap.topic.starts_with("kv.") {
                        net.state().kv_gaps += 1;
                    }
                    ready.push_back(Delivery::Gap(gap));
                }
                ready.push_back(Delivery::Event(ev));
            }
        })
        .boxed()
    }

    /// Sends an event from `from` to the frontend's subscriber of its publisher, if any by
    /// the time it arrives (a message sent before the subscription is missed, like a slow
    /// joiner's). Lost, reordered or dropped per the network model.
    fn send_event(self: &Arc<Self>, from: Endpoint, event: Event) {
        let now = self.clock.sim_now();
        let at = {
            let mut s = self.state();
            if s.live.get(&from.node) != Some(&from.incarnation) {
                return;
            }
            s.network
                .deliver_at(now, from.node, NodeId::ROUTER, Plane::Event)
        };
        let Some(at) = at else {
            self.log_event(now, "ev_lost", from.node.0, event.seq);
            return;
        };
        let net = self.clone();
        tokio::spawn(async move {
            net.clock.sleep_until(at).await;
            let tx = net.state().subscribers.get(&event.publisher).cloned();
            if let Some(tx) = tx {
                let _ = tx.send(event);
            }
        });
    }

    fn log_event(&self, at: crate::time::SimTime, kind: &'static str, a: u32, b: u64) {
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(at, kind, u64::from(a), b, 0);
    }
}

/// The request-plane wire between two node incarnations.
#[derive(Debug)]
struct SimLink {
    net: Arc<SimNet>,
    caller: Endpoint,
    service: Endpoint,
}

impl std::fmt::Debug for SimNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SimNet")
    }
}

impl Link for SimLink {
    /// A piece of bulk data: the latency of a message, then its size over the link's
    /// bandwidth (`NetConfig::bulk_bytes_per_s`).
    fn transit_bytes(&self, dir: Direction, bytes: u64) -> Transit {
        let passage = self.transit(dir);
        let bw = self.net.state().network.config().bulk_bytes_per_s.max(1.0);
        let serialise = Duration::from_secs_f64(bytes as f64 / bw);
        let net = self.net.clone();
        Box::pin(async move {
            passage.await?;
            net.clock.sleep(serialise).await;
            Ok(())
        })
    }

    fn transit(&self, dir: Direction) -> Transit {
        let (from, to) = match dir {
            Direction::Request => (self.caller, self.service),
            Direction::Reply => (self.service, self.caller),
        };
        let gone = move || CallError::PeerGone(format!("sim://node-{}", to.node.0));
        // The arrival time is fixed now, in send order, so the link stays FIFO.
        let arrival = {
            let now = self.net.clock.sim_now();
            let mut s = self.net.state();
            let live = |ep: Endpoint| s.live.get(&ep.node) == Some(&ep.incarnation);
            if live(from) && live(to) {
                let at = s
                    .network
                    .deliver_at(now, from.node, to.node, Plane::Request);
                at.map(|at| {
                    let last = s.link_arrivals.entry((from.node, to.node)).or_default();
                    *last = (*last).max(at);
                    *last
                })
            } else {
                None
            }
        };
        let net = self.net.clone();
        Box::pin(async move {
            let at = arrival.ok_or_else(gone)?;
            net.clock.sleep_until(at).await;
            // A message reaches a live process only.
            if net.is_live(to) {
                Ok(())
            } else {
                Err(gone())
            }
        })
    }
}

/// A worker's event-plane publisher: sequence numbers per topic from 1, as on the real PUB
/// socket (see `turbine_runtime::events`).
pub struct SimPublisher {
    net: Arc<SimNet>,
    from: Endpoint,
    name: String,
    seqs: Mutex<BTreeMap<String, u64>>,
}

impl SimPublisher {
    pub fn new(net: Arc<SimNet>, from: Endpoint, name: String) -> Self {
        SimPublisher {
            net,
            from,
            name,
            seqs: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn publish<T: Serialize>(&self, topic: &str, body: &T) {
        let Ok(payload) = wire::to_payload(body) else {
            return;
        };
        let seq = {
            let mut seqs = self.seqs.lock().unwrap_or_else(|e| e.into_inner());
            let n = seqs.entry(topic.to_string()).or_insert(0);
            *n += 1;
            *n
        };
        self.net.send_event(
            self.from,
            Event {
                topic: topic.to_string(),
                publisher: self.name.clone(),
                seq,
                payload,
            },
        );
    }
}
