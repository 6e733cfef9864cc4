//! Encoding one image where it is (an encoder, or a worker without an encoder group):
//! decode it (unless the frontend in this process already did) and run the vision tower on
//! it (`worker::images` places the rows over the prompt's placeholders).

use std::sync::Arc;
use turbine_kernels::loader::VisionModel;
use turbine_kernels::vision::{decode, DecodeLimits};

/// Why a request's images could not become embeddings. A request error: the client's 400.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EncodeError {
    #[error("this model takes no images (it has no vision tower)")]
    NoVision,
    #[error("image {index}: {reason}")]
    Image { index: usize, reason: String },
    #[error("the image embeddings do not fit the prompt: {0}")]
    Layout(String),
    #[error("the encoding task failed: {0}")]
    Task(String),
}

/// The frontend checked the images against its own limits; these only keep a worker
/// reached directly from decoding something absurd.
const WORKER_DECODE_LIMITS: DecodeLimits = DecodeLimits {
    max_side: 1 << 15,
    max_pixels: 1 << 28,
};

/// One image's embeddings: `[tokens, hidden]`, checked against the tokens the frontend
/// laid out for it (the same processor config on both sides).
pub fn encode_image(
    vision: &VisionModel,
    index: usize,
    image: &crate::protocol::PromptImage,
) -> Result<Vec<f32>, EncodeError> {
    let fail = |reason: String| EncodeError::Image { index, reason };
    let decoded = match &image.decoded {
        Some(d) => d.clone(),
        None => Arc::new(
            decode(&image.encoded, &WORKER_DECODE_LIMITS).map_err(|e| fail(e.to_string()))?,
        ),
    };
    let out = vision.encode(&decoded).map_err(|e| fail(e.to_string()))?;
    if out.tokens != image.tokens as usize {
        return Err(fail(format!(
            "the prompt has {} placeholder tokens for it, the processor makes {}",
            image.tokens, out.tokens
        )));
    }
    Ok(out.embeds)
}
