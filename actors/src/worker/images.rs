//! A worker's side of a prompt's images: their embeddings, pulled from the encoder that
//! made them (E/P/D) or encoded here with the model's vision tower on a blocking thread (no
//! encoder group, or a pull that failed: the request goes on).
//!
//! Who calls it: a prefill or aggregated worker before admitting a request (its prompt is
//! computed here), and the engine loop for a request the scheduler parked for want of them
//! (a decode worker's, whose KV came from a prefill worker, when it must recompute the
//! prompt after all: see `scheduler/embeds.rs`). A decode worker whose KV import succeeds
//! never encodes anything. Images encoded here are counted (`images_encoded` in the load
//! reports, `turbine_worker_images_encoded` on `/metrics`).

use crate::encoder::{EncodeError, PromptEmbeds};
use crate::ids::{TokenId, WorkerId};
use crate::protocol::PromptImage;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use turbine_kernels::loader::VisionModel;
use turbine_runtime::transfer::TransferPlane;

/// Makes a prompt's image embeddings on one worker. Cheap to clone (shared counter).
#[derive(Clone)]
pub struct ImageEmbedder {
    worker: WorkerId,
    vision: Option<Arc<VisionModel>>,
    /// Where embeddings made by encoders are pulled from.
    plane: Option<TransferPlane>,
    /// Images this worker ran through its own vision tower.
    encoded: Arc<AtomicU64>,
}

impl ImageEmbedder {
    pub fn new(
        worker: WorkerId,
        vision: Option<Arc<VisionModel>>,
        plane: Option<TransferPlane>,
    ) -> ImageEmbedder {
        ImageEmbedder {
            worker,
            vision,
            plane,
            encoded: Arc::default(),
        }
    }

    /// Images encoded by this worker's vision tower so far.
    pub fn images_encoded(&self) -> u64 {
        self.encoded.load(Ordering::Relaxed)
    }

    /// The embeddings of `images`, placed over `prompt`'s placeholders.
    pub async fn embeds(
        &self,
        prompt: Vec<TokenId>,
        images: Vec<PromptImage>,
    ) -> Result<PromptEmbeds, EncodeError> {
        let Some(vision) = self.vision.clone() else {
            return Err(EncodeError::NoVision);
        };
        let mut pulled: Vec<Option<Vec<f32>>> = Vec::with_capacity(images.len());
        for (i, img) in images.iter().enumerate() {
            let rows = match (&img.embeds, &self.plane) {
                (Some(r), Some(plane)) => match crate::encoder::pull_embeds(plane, r).await {
                    Ok(rows) => Some(rows),
                    Err(e) => {
                        tracing::warn!(worker = %self.worker, "image {i}: pulling its embeddings failed ({e}); encoding it here");
                        None
                    }
                },
                _ => None,
            };
            pulled.push(rows);
        }
        let counter = self.encoded.clone();
        tokio::task::spawn_blocking(move || {
            let per_image = images
                .iter()
                .zip(pulled)
                .enumerate()
                .map(|(i, (img, rows))| match rows {
                    Some(rows) => Ok(rows),
                    None => {
                        counter.fetch_add(1, Ordering::Relaxed);
                        crate::encoder::local::encode_image(&vision, i, img)
                    }
                })
                .collect::<Result<Vec<_>, _>>()?;
            PromptEmbeds::place(
                &prompt,
                vision.image_token_id,
                &images,
                per_image,
                vision.tower.config().text_hidden,
            )
            .map_err(EncodeError::Layout)
        })
        .await
        .map_err(|e| EncodeError::Task(e.to_string()))?
    }
}
