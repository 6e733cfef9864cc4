//! Event plane: PUB/SUB with topics (`kv.<worker>`, `metrics.<worker>`, `membership`, ...).
//!
//! Every event carries its publisher's id and a sequence number counted per (publisher,
//! topic), starting at 1. Subscribers run a [`GapDetector`] and surface a [`Gap`] whenever
//! a sequence number is skipped (lost message, slow joiner) or goes backwards (publisher
//! restarted), so the consumer knows to resync that publisher's state.
//!
//! Frames: `[topic, WIRE_VERSION ++ msgpack(EventFrame)]`; ZeroMQ filters on the topic
//! part by prefix. Malformed frames are dropped and counted.
//!
//! # The flush nudge
//!
//! `zeromq` 0.7's PUB socket hands each message to a background fan-out task through a
//! queue and a "wake pending" flag. The task clears the flag with a release store and then
//! checks the queue; the sender pushes and then loads the flag. That is a store→load pair
//! on each side with no full fence between, so on x86 both can read the stale value: the
//! message sits in the queue, nobody is woken, and it goes out only with the *next* send.
//! A publisher that goes quiet (a worker's last KV event before idling) would strand its
//! last event indefinitely; CI caught it as a test that waited for one forever.
//!
//! Any later send wakes the task, so [`EventPublisher`] sends a [`FLUSH_TOPIC`] frame
//! [`FLUSH_AFTER`] after each burst of publishes. No subscription matches it (subscribers
//! drop it even under the catch-all prefix), and by then the fan-out task is asleep, so
//! the nudge itself cannot race. A stranded event is late by at most [`FLUSH_AFTER`].
//!
//! # A known hang in `zeromq` 0.7's PUB backend
//!
//! A subscription that arrives while the socket fans a message out can park a runtime
//! thread for good: the backend's per-subscriber reader calls a *synchronous* `scc` map
//! lock (`PubSocketBackend::message_received` -> `get_sync`) on a tokio thread while the
//! fan-out task holds that bucket across an await. `runtime/tests/event_plane.rs` hit it in
//! about one run in a thousand (stack taken with gdb). The process goes on with its other
//! runtime threads; the publisher's later events may stop, which subscribers see as silence
//! (a router then treats the worker as stalled, see `router::migrating`). The fix belongs
//! upstream; until then the tests shut their runtimes down with a deadline.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, Notify};
use zeromq::{PubSocket, Socket, SocketRecv, SocketSend, SubSocket, ZmqMessage};

use crate::telemetry::{DropReason, RuntimeMetrics};
use crate::wire::{self, WIRE_VERSION};

/// Event-plane failures.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// Socket bind/connect/send/recv failed.
    #[error("event socket: {0}")]
    Socket(String),
    /// The event could not be encoded.
    #[error("event encoding: {0}")]
    Codec(String),
}

#[derive(Debug, Serialize, Deserialize)]
struct EventFrame {
    publisher: String,
    topic: String,
    seq: u64,
    payload: Bytes,
}

/// A received event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Topic it was published on.
    pub topic: String,
    /// Publisher id.
    pub publisher: String,
    /// Sequence number per (publisher, topic), from 1.
    pub seq: u64,
    /// MessagePack body; see [`Event::decode`].
    pub payload: Bytes,
}

impl Event {
    /// Decodes the body.
    pub fn decode<T: serde::de::DeserializeOwned>(&self) -> Result<T, EventError> {
        wire::from_payload(&self.payload).map_err(EventError::Codec)
    }
}

/// Sequence numbers `expected..got` of (`publisher`, `topic`) were not seen.
/// `got < expected` means the publisher restarted its numbering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    /// Publisher id.
    pub publisher: String,
    /// Topic.
    pub topic: String,
    /// The sequence number that should have come next.
    pub expected: u64,
    /// The sequence number that came.
    pub got: u64,
}

/// What a subscriber receives: events, and gap notices placed just before the event that
/// revealed them.
#[derive(Debug, Clone, PartialEq)]
pub enum Delivery {
    /// An event.
    Event(Event),
    /// Some events were missed; resync before trusting incremental state.
    Gap(Gap),
}

/// Pure gap detection over (publisher, topic, seq) observations.
#[derive(Debug, Default, Clone)]
pub struct GapDetector {
    /// Next expected sequence number by publisher, then topic (nested so that a lookup
    /// borrows the names instead of allocating a key per event).
    next: BTreeMap<String, BTreeMap<String, u64>>,
}

impl GapDetector {
    /// A detector that has seen nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `seq` and reports a gap if it is not the successor of the last one seen
    /// (the first event of a stream is expected to be seq 1).
    pub fn observe(&mut self, publisher: &str, topic: &str, seq: u64) -> Option<Gap> {
        let topics = match self.next.get_mut(publisher) {
            Some(topics) => topics,
            None => self.next.entry(publisher.to_string()).or_default(),
        };
        let expected = match topics.get_mut(topic) {
            Some(next) => std::mem::replace(next, seq.saturating_add(1)),
            None => {
                topics.insert(topic.to_string(), seq.saturating_add(1));
                1
            }
        };
        (seq != expected).then(|| Gap {
            publisher: publisher.to_string(),
            topic: topic.to_string(),
            expected,
            got: seq,
        })
    }
}

/// Topic of the flush nudge (see the module docs). It starts with a NUL byte, which no
/// real topic does, so no subscription prefix but the empty one matches it.
pub const FLUSH_TOPIC: &str = "\0flush";

/// How long after a burst of publishes the flush nudge follows.
pub const FLUSH_AFTER: Duration = Duration::from_millis(5);

/// Publishes events under one publisher id on a bound PUB socket.
pub struct EventPublisher {
    publisher: String,
    endpoint: String,
    inner: Arc<Mutex<PubInner>>,
    /// Wakes the flush task after a publish (and once more on drop, so it can exit).
    published: Arc<Notify>,
}

struct PubInner {
    socket: PubSocket,
    seqs: BTreeMap<String, u64>,
}

impl EventPublisher {
    /// Binds a PUB socket at `endpoint` (port 0 picks a free port).
    pub async fn bind(endpoint: &str, publisher: &str) -> Result<Self, EventError> {
        let mut socket = PubSocket::new();
        let bound = socket
            .bind(endpoint)
            .await
            .map_err(|e| EventError::Socket(format!("bind {endpoint}: {e}")))?;
        let inner = Arc::new(Mutex::new(PubInner {
            socket,
            seqs: BTreeMap::new(),
        }));
        let published = Arc::new(Notify::new());
        tokio::spawn(flush_after_bursts(
            Arc::downgrade(&inner),
            published.clone(),
        ));
        Ok(Self {
            publisher: publisher.to_string(),
            endpoint: bound.to_string(),
            inner,
            published,
        })
    }

    /// The bound endpoint subscribers connect to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Publishes `event` on `topic`; returns its sequence number. PUB semantics: a
    /// subscriber that is not connected or too slow misses it (and will see a [`Gap`]).
    pub async fn publish<T: Serialize>(&self, topic: &str, event: &T) -> Result<u64, EventError> {
        let payload = wire::to_payload(event).map_err(EventError::Codec)?;
        let mut inner = self.inner.lock().await;
        let seq = {
            let counter = inner.seqs.entry(topic.to_string()).or_insert(0);
            *counter += 1;
            *counter
        };
        let frame = EventFrame {
            publisher: self.publisher.clone(),
            topic: topic.to_string(),
            seq,
            payload,
        };
        let mut body = vec![WIRE_VERSION];
        rmp_serde::encode::write(&mut body, &frame)
            .map_err(|e| EventError::Codec(e.to_string()))?;
        let msg = ZmqMessage::try_from(vec![Bytes::from(topic.to_string()), Bytes::from(body)])
            .map_err(|e| EventError::Codec(e.to_string()))?;
        inner
            .socket
            .send(msg)
            .await
            .map_err(|e| EventError::Socket(e.to_string()))?;
        drop(inner);
        self.published.notify_one();
        Ok(seq)
    }
}

impl Drop for EventPublisher {
    fn drop(&mut self) {
        // The flush task finds the socket gone and exits.
        self.published.notify_one();
    }
}

/// Sends one [`FLUSH_TOPIC`] frame [`FLUSH_AFTER`] after each burst of publishes, until
/// the publisher is dropped. Publishes during the wait fold into the same nudge.
async fn flush_after_bursts(inner: Weak<Mutex<PubInner>>, published: Arc<Notify>) {
    loop {
        published.notified().await;
        tokio::time::sleep(FLUSH_AFTER).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let Ok(nudge) = ZmqMessage::try_from(vec![Bytes::from_static(FLUSH_TOPIC.as_bytes())])
        else {
            return;
        };
        // PUB sends never block; a failed nudge leaves things as they were.
        let _ = inner.lock().await.socket.send(nudge).await;
    }
}

/// Receives events from one or more publishers, with gap detection.
pub struct EventSubscriber {
    socket: SubSocket,
    gaps: GapDetector,
    held: Option<Event>,
    max_frame: usize,
    metrics: RuntimeMetrics,
}

impl EventSubscriber {
    /// A subscriber with no connections; frames above `max_frame` bytes are dropped and
    /// counted in `metrics`.
    pub fn new(max_frame: usize, metrics: RuntimeMetrics) -> Self {
        Self {
            socket: SubSocket::new(),
            gaps: GapDetector::new(),
            held: None,
            max_frame,
            metrics,
        }
    }

    /// Connects to a publisher's endpoint.
    pub async fn connect(&mut self, endpoint: &str) -> Result<(), EventError> {
        self.socket
            .connect(endpoint)
            .await
            .map_err(|e| EventError::Socket(format!("connect {endpoint}: {e}")))
    }

    /// Subscribes to every topic starting with `prefix` (`""` for all).
    pub async fn subscribe(&mut self, prefix: &str) -> Result<(), EventError> {
        self.socket
            .subscribe(prefix)
            .await
            .map_err(|e| EventError::Socket(e.to_string()))
    }

    /// The next delivery: a gap notice (then, on the next call, the event that revealed
    /// it) or an event.
    pub async fn recv(&mut self) -> Result<Delivery, EventError> {
        if let Some(event) = self.held.take() {
            return Ok(Delivery::Event(event));
        }
        loop {
            let msg = self
                .socket
                .recv()
                .await
                .map_err(|e| EventError::Socket(e.to_string()))?;
            self.metrics.frame_in();
            let Some(event) = self.decode(msg) else {
                continue;
            };
            return Ok(
                match self.gaps.observe(&event.publisher, &event.topic, event.seq) {
                    Some(gap) => {
                        self.held = Some(event);
                        Delivery::Gap(gap)
                    }
                    None => Delivery::Event(event),
                },
            );
        }
    }

    fn decode(&self, msg: ZmqMessage) -> Option<Event> {
        if msg
            .get(0)
            .is_some_and(|topic| topic == FLUSH_TOPIC.as_bytes())
        {
            return None; // the publisher's flush nudge, not an event
        }
        let (Some(_topic), Some(body), None) = (msg.get(0), msg.get(1), msg.get(2)) else {
            self.metrics.drop_frame(DropReason::Malformed);
            return None;
        };
        if body.len() > self.max_frame {
            self.metrics.drop_frame(DropReason::Oversized);
            return None;
        }
        let Some((&version, rest)) = body.split_first() else {
            self.metrics.drop_frame(DropReason::Truncated);
            return None;
        };
        if version != WIRE_VERSION {
            self.metrics.drop_frame(DropReason::UnknownVersion);
            return None;
        }
        match rmp_serde::from_slice::<EventFrame>(rest) {
            Ok(f) => Some(Event {
                topic: f.topic,
                publisher: f.publisher,
                seq: f.seq,
                payload: f.payload,
            }),
            Err(_) => {
                self.metrics.drop_frame(DropReason::Malformed);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_sequences_have_no_gap() {
        let mut d = GapDetector::new();
        assert_eq!(d.observe("w1", "kv.w1", 1), None);
        assert_eq!(d.observe("w1", "kv.w1", 2), None);
        // Topics and publishers are counted independently.
        assert_eq!(d.observe("w1", "metrics.w1", 1), None);
        assert_eq!(d.observe("w2", "kv.w1", 1), None);
    }

    #[test]
    fn skipped_and_reset_sequences_are_gaps() {
        let mut d = GapDetector::new();
        d.observe("w1", "kv", 1);
        let gap = d.observe("w1", "kv", 4).unwrap();
        assert_eq!((gap.expected, gap.got), (2, 4));
        assert_eq!(d.observe("w1", "kv", 5), None);
        let reset = d.observe("w1", "kv", 1).unwrap();
        assert_eq!((reset.expected, reset.got), (6, 1));
        // A late joiner learns it missed the beginning.
        assert!(d.observe("w9", "kv", 10).is_some());
    }
}
