//! Encoding a request's images where the request is (a worker without an encoder group):
//! decode each image (unless the frontend in this process already did), run the vision
//! tower on it, and place the rows over the prompt's placeholders.

use super::PromptEmbeds;
use crate::protocol::PreprocessedRequest;
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

/// The embeddings of every image of `req`, placed over its prompt (blocking: CPU work;
/// callers run it on a blocking thread).
pub fn encode_request(
    vision: &VisionModel,
    req: &PreprocessedRequest,
) -> Result<PromptEmbeds, EncodeError> {
    let per_image = req
        .images
        .iter()
        .enumerate()
        .map(|(i, img)| encode_image(vision, i, img))
        .collect::<Result<Vec<_>, _>>()?;
    place(vision, req, per_image)
}

/// Places already computed per-image rows (local, cached or pulled from an encoder).
pub fn place(
    vision: &VisionModel,
    req: &PreprocessedRequest,
    per_image: Vec<Vec<f32>>,
) -> Result<PromptEmbeds, EncodeError> {
    PromptEmbeds::place(
        &req.token_ids,
        vision.image_token_id,
        &req.images,
        per_image,
        vision.tower.config().text_hidden,
    )
    .map_err(EncodeError::Layout)
}
