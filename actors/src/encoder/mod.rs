//! Images to embeddings: what an encoder computes for a prompt's images, and how those
//! embeddings are laid over the prompt's placeholder tokens for the forward pass.
//!
//! `embeds.rs` is the pure layout ([`PromptEmbeds`]: which prompt positions take which
//! embedding rows, cut per step); `local.rs` encodes one image with the model's vision tower
//! (an encoder, or a worker with no encoder group: see `worker::images`).

pub mod cache;
pub mod client;
pub mod embeds;
pub mod local;
pub mod service;

pub use embeds::{PromptEmbeds, StepSplice};
pub use local::EncodeError;

use crate::protocol::EmbedsRef;
use turbine_runtime::transfer::TransferPlane;

/// Pulls the embeddings `r` describes (`[rows, hidden]` little-endian f32).
pub async fn pull_embeds(plane: &TransferPlane, r: &EmbedsRef) -> Result<Vec<f32>, String> {
    let bytes = plane
        .pull(&r.descriptor)
        .into_bytes()
        .await
        .map_err(|e| e.to_string())?;
    let want = r.rows as usize * r.hidden as usize * 4;
    if bytes.len() != want {
        return Err(format!(
            "{} bytes of embeddings, {want} expected",
            bytes.len()
        ));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}
