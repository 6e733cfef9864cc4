//! Follow one vLLM worker's KV-event publisher into the [`FlashIndexer`].
//!
//! vLLM (`--kv-events-config '{"enable_kv_cache_events": true, "publisher": "zmq",
//! "endpoint": "tcp://*:5557"}'`) binds a ZeroMQ PUB socket and sends each batch as three
//! frames: `[topic, seq (8 bytes, big-endian), msgspec KVEventBatch]` (decoded in
//! [`super::vllm`]). [`VllmFeed`] is the pure part: it checks the sequence, translates the
//! blocks into turbine's hash domain ([`VllmHashTranslator`]) and applies them.
//! [`follow_vllm_publisher`] is the socket shell around it; [`keep_following_vllm_publisher`]
//! the one a deployment runs (`turbine epp` for each of the cluster file's
//! `external_workers`: `kv_events: {source: vllm, endpoint, topic}`), which reconnects.
//!
//! # Sequence gaps
//! vLLM numbers its batches from 0, one per batch. A batch whose number is not the next one
//! (a lost message, a subscriber that joined late, a vLLM restart that starts again at 0)
//! means this view of the worker's cache is no longer exact: the feed drops every entry of
//! that worker from the index and forgets its hash translations, then goes on from the
//! batch that revealed the gap. Blocks stored after the gap whose parent was stored before
//! it cannot be translated (counted in [`VllmFeedStats::unresolved_blocks`]); prompts the
//! worker stores from their first block are indexed again at once. vLLM's replay socket
//! (which re-sends missed batches on request) is not used.

use super::indexer::FlashIndexer;
use super::vllm::{decode_vllm_batch, parse_vllm_seq, VllmDecodeError, VllmHashTranslator};
use crate::ids::WorkerId;
use std::sync::{Arc, Mutex};
use zeromq::{Socket, SocketRecv, SubSocket};

/// Counters of one feed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VllmFeedStats {
    /// Batches decoded and applied.
    pub batches: u64,
    /// Batches whose sequence number was not the next one (each cleared the worker).
    pub gaps: u64,
    /// Messages that were not `[topic, seq, payload]` or whose payload did not decode.
    pub malformed: u64,
    /// Stored blocks that could not be translated (unknown parent, partial tokens).
    pub unresolved_blocks: u64,
}

/// What one message did.
#[derive(Debug, PartialEq)]
pub enum FeedOutcome {
    Applied,
    /// Applied after batches `expected..got` were missed; the worker's entries were cleared
    /// first.
    AppliedAfterGap {
        expected: u64,
        got: u64,
    },
    /// Dropped: the message was not a vLLM KV-event batch.
    Malformed(VllmDecodeError),
}

/// One vLLM worker's feed: sequence check, translation, indexing.
pub struct VllmFeed {
    worker: WorkerId,
    index: Arc<FlashIndexer>,
    translator: VllmHashTranslator,
    next_seq: Option<u64>,
    stats: VllmFeedStats,
    /// Unresolved blocks of translators dropped at gaps.
    carried_unresolved: u64,
}

impl VllmFeed {
    /// A feed whose blocks are indexed as `worker`'s.
    pub fn new(worker: WorkerId, index: Arc<FlashIndexer>) -> VllmFeed {
        VllmFeed {
            worker,
            index,
            translator: VllmHashTranslator::new(),
            next_seq: None,
            stats: VllmFeedStats::default(),
            carried_unresolved: 0,
        }
    }

    pub fn stats(&self) -> VllmFeedStats {
        VllmFeedStats {
            unresolved_blocks: self.carried_unresolved + self.translator.unresolved_blocks(),
            ..self.stats
        }
    }

    /// Takes one ZeroMQ message (its frames in order).
    pub fn on_message(&mut self, frames: &[&[u8]]) -> FeedOutcome {
        match self.decode(frames) {
            Ok((seq, payload)) => self.on_batch(seq, payload),
            Err(e) => {
                self.stats.malformed += 1;
                FeedOutcome::Malformed(e)
            }
        }
    }

    fn decode<'a>(&self, frames: &[&'a [u8]]) -> Result<(u64, &'a [u8]), VllmDecodeError> {
        let [_topic, seq, payload] = frames else {
            return Err(VllmDecodeError::Shape {
                at: "message",
                what: format!("{} frames, expected 3 (topic, seq, payload)", frames.len()),
            });
        };
        Ok((parse_vllm_seq(seq)?, payload))
    }

    fn on_batch(&mut self, seq: u64, payload: &[u8]) -> FeedOutcome {
        let batch = match decode_vllm_batch(seq, payload) {
            Ok(b) => b,
            Err(e) => {
                self.stats.malformed += 1;
                return FeedOutcome::Malformed(e);
            }
        };
        // The first batch seen must be 0 (vLLM's first): anything else means we joined late.
        let expected = self.next_seq.unwrap_or(0);
        let outcome = if seq == expected {
            FeedOutcome::Applied
        } else {
            self.stats.gaps += 1;
            self.carried_unresolved += self.translator.unresolved_blocks();
            self.translator = VllmHashTranslator::new();
            // Drops the worker's entries; the index then takes our next batch as a new start.
            self.index.clear_worker(self.worker);
            FeedOutcome::AppliedAfterGap { expected, got: seq }
        };
        self.next_seq = Some(seq.wrapping_add(1));
        let mut ours = self.translator.translate(self.worker, batch);
        // The index checks its own per-worker numbering, which this feed keeps gap-free.
        ours.seq = self.stats.batches;
        self.index.apply(&ours);
        self.stats.batches += 1;
        outcome
    }
}

/// Why the feed could not start.
#[derive(Debug, thiserror::Error)]
#[error("vLLM KV events {endpoint}: {message}")]
pub struct FollowError {
    pub endpoint: String,
    pub message: String,
}

/// How long [`keep_following_vllm_publisher`] waits before connecting again.
pub const RECONNECT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Connects a SUB socket to a vLLM worker's KV-event `endpoint` (e.g. `tcp://10.0.0.5:5557`),
/// subscribes to `topic` (vLLM's `topic` setting; `""` for all) and applies every batch to
/// `index` as `worker`'s until the socket fails. The feed's counters are readable through
/// the returned handle while it runs.
pub async fn follow_vllm_publisher(
    endpoint: &str,
    topic: &str,
    worker: WorkerId,
    index: Arc<FlashIndexer>,
) -> Result<(tokio::task::JoinHandle<()>, Arc<Mutex<VllmFeed>>), FollowError> {
    let socket = connect(endpoint, topic).await?;
    let feed = Arc::new(Mutex::new(VllmFeed::new(worker, index)));
    let shared = feed.clone();
    let name = endpoint.to_string();
    let task = tokio::spawn(async move { pump(socket, &shared, &name, worker).await });
    Ok((task, feed))
}

/// [`follow_vllm_publisher`] for a deployment: connecting is retried every
/// [`RECONNECT_EVERY`] until the publisher is there (a vLLM engine starts after its
/// router), and again whenever the socket fails, until the task is aborted. One feed
/// throughout: batches missed meanwhile show as a sequence gap, which clears the worker.
pub fn keep_following_vllm_publisher(
    endpoint: String,
    topic: String,
    worker: WorkerId,
    index: Arc<FlashIndexer>,
) -> (tokio::task::JoinHandle<()>, Arc<Mutex<VllmFeed>>) {
    let feed = Arc::new(Mutex::new(VllmFeed::new(worker, index)));
    let shared = feed.clone();
    let task = tokio::spawn(async move {
        loop {
            match connect(&endpoint, &topic).await {
                Ok(socket) => {
                    tracing::info!(%endpoint, %worker, "following vLLM KV events");
                    pump(socket, &shared, &endpoint, worker).await;
                }
                Err(e) => tracing::debug!("{e}; retrying in {RECONNECT_EVERY:?}"),
            }
            tokio::time::sleep(RECONNECT_EVERY).await;
        }
    });
    (task, feed)
}

async fn connect(endpoint: &str, topic: &str) -> Result<SubSocket, FollowError> {
    let fail = |message: String| FollowError {
        endpoint: endpoint.to_string(),
        message,
    };
    let mut socket = SubSocket::new();
    socket
        .connect(endpoint)
        .await
        .map_err(|e| fail(format!("connect: {e}")))?;
    socket
        .subscribe(topic)
        .await
        .map_err(|e| fail(format!("subscribe: {e}")))?;
    Ok(socket)
}

/// Feeds every message of `socket` into `feed` until the socket fails.
async fn pump(mut socket: SubSocket, feed: &Mutex<VllmFeed>, name: &str, worker: WorkerId) {
    loop {
        let msg = match socket.recv().await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(endpoint = %name, %worker, "vLLM KV event feed ended: {e}");
                return;
            }
        };
        let frames: Vec<&[u8]> = msg.iter().map(|f| f.as_ref()).collect();
        let outcome = feed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .on_message(&frames);
        match outcome {
            FeedOutcome::Applied => {}
            FeedOutcome::AppliedAfterGap { expected, got } => tracing::warn!(
                endpoint = %name, %worker, expected, got,
                "vLLM KV event gap; cleared the worker's index entries"
            ),
            FeedOutcome::Malformed(e) => {
                tracing::warn!(endpoint = %name, %worker, "bad vLLM KV event message: {e}")
            }
        }
    }
}
