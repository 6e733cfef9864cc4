//! The encoder as a service on the request plane (`role: encoder` workers): images in,
//! embeddings out by descriptor on its transfer plane. A prefill or aggregated worker pulls
//! them before admitting the request (see [`crate::worker::WorkerHandle`]); the encoder
//! keeps the bytes pinned until they are pulled or expire.
//!
//! The vision tower runs on a blocking thread; the embedding cache ([`EmbeddingCache`])
//! answers an image seen before without it.

use super::cache::{CacheCounts, EmbeddingCache};
use super::local::encode_image;
use crate::protocol::{EmbedsRef, PromptImage};
use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use turbine_kernels::loader::VisionModel;
use turbine_runtime::transfer::TransferPlane;
use turbine_runtime::{Handler, HandlerError, RequestCtx, Service};

/// The discovery component encoder processes register under.
pub const ENCODER_COMPONENT: &str = "encoder";

/// Service name of encoder `index` on its node (an encoder process serves index 0).
pub fn encoder_service_name(index: u64) -> String {
    format!("encoder/{index}")
}

/// The encoder's protocol.
pub struct EncoderService;

impl Service for EncoderService {
    type Req = EncoderRequest;
    type Resp = EncoderReply;
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum EncoderRequest {
    /// Call: the embeddings of each image, by descriptor, in order.
    Encode(Vec<PromptImage>),
    /// Call: the cache's counts.
    Stats,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum EncoderReply {
    /// One answer per image: its embeddings' descriptor, or why there is none.
    Encoded(Vec<Result<EmbedsRef, String>>),
    Stats(EncoderStats),
}

/// What an encoder has done (wire form of [`CacheCounts`] plus images encoded).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncoderStats {
    pub encoded: u64,
    pub cache_hits: u64,
    pub cache_entries: u64,
    pub cache_bytes: u64,
}

/// The state every actor instance of one encoder shares.
pub struct Encoder {
    vision: Arc<VisionModel>,
    plane: TransferPlane,
    cache: Mutex<EmbeddingCache>,
    encoded: std::sync::atomic::AtomicU64,
    /// The test-only stall hook (`crate::fault`), read once at start.
    stall: Option<Arc<crate::fault::StallHook>>,
}

impl Encoder {
    /// An encoder running `vision`, exporting on `plane`, caching up to `cache_bytes`.
    pub fn new(vision: Arc<VisionModel>, plane: TransferPlane, cache_bytes: usize) -> Arc<Encoder> {
        Arc::new(Encoder {
            vision,
            plane,
            cache: Mutex::new(EmbeddingCache::new(cache_bytes)),
            encoded: Default::default(),
            stall: crate::fault::StallHook::from_env().map(Arc::new),
        })
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, EmbeddingCache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn stats(&self) -> EncoderStats {
        let c: CacheCounts = self.cache().counts();
        EncoderStats {
            encoded: self.encoded.load(std::sync::atomic::Ordering::Relaxed),
            cache_hits: c.hits,
            cache_entries: c.entries as u64,
            cache_bytes: c.bytes as u64,
        }
    }

    /// One image's embeddings (cached, or from the tower on a blocking thread), pinned on
    /// the plane.
    pub async fn encode(
        self: &Arc<Self>,
        index: usize,
        image: PromptImage,
    ) -> Result<EmbedsRef, String> {
        let hidden = self.vision.tower.config().text_hidden;
        let cached = self.cache().get(image.hash);
        let (rows, was_cached) = match cached {
            Some(rows) => (rows, true),
            None => {
                let me = self.clone();
                let hash = image.hash;
                let rows = tokio::task::spawn_blocking(move || {
                    if let Some(hook) = &me.stall {
                        hook.hold();
                    }
                    encode_image(&me.vision, index, &image).map(Arc::new)
                })
                .await
                .map_err(|e| format!("the encoding task failed: {e}"))?
                .map_err(|e| e.to_string())?;
                self.encoded
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.cache().insert(hash, rows.clone());
                (rows, false)
            }
        };
        let mut bytes = Vec::with_capacity(rows.len() * 4);
        for x in rows.iter() {
            bytes.extend_from_slice(&x.to_le_bytes());
        }
        let descriptor = self.plane.register(vec![Bytes::from(bytes)]);
        Ok(EmbedsRef {
            descriptor,
            rows: (rows.len() / hidden.max(1)) as u32,
            hidden: hidden as u32,
            cached: was_cached,
        })
    }
}

/// Serves [`EncoderService`] for one [`Encoder`].
pub struct EncoderActor {
    encoder: Arc<Encoder>,
}

impl EncoderActor {
    pub fn new(encoder: Arc<Encoder>) -> Self {
        EncoderActor { encoder }
    }
}

#[async_trait]
impl Handler<EncoderService> for EncoderActor {
    async fn call(
        &mut self,
        req: EncoderRequest,
        _ctx: &RequestCtx,
    ) -> Result<EncoderReply, HandlerError> {
        match req {
            EncoderRequest::Encode(images) => {
                let mut out = Vec::with_capacity(images.len());
                for (i, image) in images.into_iter().enumerate() {
                    out.push(self.encoder.encode(i, image).await);
                }
                Ok(EncoderReply::Encoded(out))
            }
            EncoderRequest::Stats => Ok(EncoderReply::Stats(self.encoder.stats())),
        }
    }
}
