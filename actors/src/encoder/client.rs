//! The frontend's side of E/P/D: before a request with images is dispatched, its images go
//! to the least busy encoder, whose answers (descriptors of the embeddings on its transfer
//! plane) travel with the request to the worker. An encoder that cannot be reached or fails
//! is skipped for the next; with none left, the images go without embeddings and the worker
//! encodes them itself: a lost encoder costs time, never the request.

use super::service::{EncoderReply, EncoderRequest, EncoderService};
use crate::frontend::Metrics;
use crate::protocol::PromptImage;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use turbine_runtime::Addr;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

/// `turbine_encoder_images{outcome}`: encoded by an encoder, served from its cache, or left
/// to the worker (`local`: no encoder answered).
#[derive(Clone, Default, Debug)]
pub struct EncoderMetrics {
    images: Family<OutcomeLabel, Counter>,
    failed_calls: Counter,
    known: Gauge,
}

impl EncoderMetrics {
    pub fn register(metrics: &Metrics) -> EncoderMetrics {
        let m = EncoderMetrics::default();
        metrics.register(
            "turbine_encoder_images",
            "Images of requests by where their embeddings came from: encoded, cached (an \
             encoder's embedding cache), local (no encoder answered: the worker encoded)",
            m.images.clone(),
        );
        metrics.register(
            "turbine_encoder_failed_calls",
            "Calls to an encoder that failed (unreachable, lost mid-request, timed out or out \
             of protocol); the images went to the next encoder, or to the worker",
            m.failed_calls.clone(),
        );
        metrics.register(
            "turbine_encoders",
            "Encoders this frontend sends images to now (in process, or joined through \
             discovery)",
            m.known.clone(),
        );
        m
    }

    /// Failed encoder calls so far.
    pub fn failed_calls(&self) -> u64 {
        self.failed_calls.get()
    }

    fn count(&self, outcome: &str, n: usize) {
        self.images
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_string(),
            })
            .inc_by(n as u64);
    }

    /// The count of one outcome so far.
    pub fn get(&self, outcome: &str) -> u64 {
        self.images
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_string(),
            })
            .get()
    }
}

struct Member {
    addr: Addr<EncoderService>,
    in_flight: AtomicUsize,
}

/// The encoders a frontend sends images to, by name (a local index, or the discovery
/// instance of an encoder process).
pub struct EncoderPool {
    members: RwLock<BTreeMap<String, Arc<Member>>>,
    metrics: EncoderMetrics,
}

impl EncoderPool {
    pub fn new(metrics: EncoderMetrics) -> EncoderPool {
        EncoderPool {
            members: RwLock::new(BTreeMap::new()),
            metrics,
        }
    }

    /// An encoder joined (or came back under the same name).
    pub fn add(&self, name: String, addr: Addr<EncoderService>) {
        let member = Arc::new(Member {
            addr,
            in_flight: AtomicUsize::new(0),
        });
        let mut members = self.members.write().unwrap_or_else(|e| e.into_inner());
        members.insert(name, member);
        self.metrics.known.set(members.len() as i64);
    }

    /// An encoder left.
    pub fn remove(&self, name: &str) {
        let mut members = self.members.write().unwrap_or_else(|e| e.into_inner());
        members.remove(name);
        self.metrics.known.set(members.len() as i64);
    }

    /// Encoders known now.
    pub fn len(&self) -> usize {
        self.members.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn metrics(&self) -> &EncoderMetrics {
        &self.metrics
    }

    /// Gives each image its embeddings' descriptor from an encoder, least busy first; an
    /// image no encoder could encode is left for the worker.
    pub async fn attach(&self, images: &mut [PromptImage]) {
        if images.is_empty() {
            return;
        }
        let mut order: Vec<Arc<Member>> = self
            .members
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        order.sort_by_key(|m| m.in_flight.load(Ordering::Relaxed));
        let wire: Vec<PromptImage> = images
            .iter()
            .map(|i| PromptImage {
                decoded: None,
                embeds: None,
                ..i.clone()
            })
            .collect();
        for m in order {
            m.in_flight.fetch_add(1, Ordering::Relaxed);
            let answer = m.addr.call(EncoderRequest::Encode(wire.clone())).await;
            m.in_flight.fetch_sub(1, Ordering::Relaxed);
            match answer {
                Ok(EncoderReply::Encoded(list)) if list.len() == images.len() => {
                    for (img, got) in images.iter_mut().zip(list) {
                        match got {
                            Ok(r) => {
                                self.metrics
                                    .count(if r.cached { "cached" } else { "encoded" }, 1);
                                img.embeds = Some(r);
                            }
                            Err(why) => {
                                tracing::warn!("an encoder refused an image: {why}");
                                self.metrics.count("local", 1);
                            }
                        }
                    }
                    return;
                }
                Ok(_) => {
                    self.metrics.failed_calls.inc();
                    tracing::warn!("an encoder answered out of protocol; trying the next")
                }
                Err(e) => {
                    self.metrics.failed_calls.inc();
                    tracing::warn!("encoder call failed ({e}); trying the next")
                }
            }
        }
        self.metrics.count("local", images.len());
    }
}
