//! [`ImageEncoder`]: the vision tower a model's images go through, on the device that runs
//! it. A model loads with the CPU tower; a worker or encoder on `device: cuda:N` moves a
//! copy of its weights to that GPU ([`ImageEncoder::on_cuda`], with the `cuda` feature).
//! Both take the processor's tiles and give the same embeddings (the CUDA tower in bf16
//! arithmetic: `kernels/tests/cuda_vision.rs` bounds the difference).

use super::tower::{VisionConfig, VisionError, VisionTower};
use std::sync::Arc;

/// A vision tower on one device; cheap to clone (shared weights).
#[derive(Clone)]
pub enum ImageEncoder {
    Cpu(Arc<VisionTower>),
    #[cfg(feature = "cuda")]
    Cuda(Arc<crate::cuda::CudaVisionTower>),
}

impl ImageEncoder {
    pub fn config(&self) -> &VisionConfig {
        match self {
            ImageEncoder::Cpu(t) => t.config(),
            #[cfg(feature = "cuda")]
            ImageEncoder::Cuda(t) => t.config(),
        }
    }

    /// The device, as a group's `device` field names it (`cpu`, `cuda:N`).
    pub fn device(&self) -> String {
        match self {
            ImageEncoder::Cpu(_) => "cpu".to_string(),
            #[cfg(feature = "cuda")]
            ImageEncoder::Cuda(t) => format!("cuda:{}", t.options().device),
        }
    }

    /// Tiles (`[channels, image_size, image_size]` each, normalised) to their embeddings,
    /// `[tiles * tokens_per_tile, text_hidden]` row-major (the CUDA tower runs them in
    /// batches; the CPU one tile by tile).
    pub fn encode_tiles(&self, tiles: &[Vec<f32>]) -> Result<Vec<f32>, VisionError> {
        match self {
            ImageEncoder::Cpu(t) => t.encode_tiles(tiles),
            #[cfg(feature = "cuda")]
            ImageEncoder::Cuda(t) => t.encode_tiles(tiles),
        }
    }

    /// This tower on GPU `device`: the CPU tower's weights uploaded (the CPU tower stays as
    /// it is); a tower already on that GPU is shared. One already on another GPU cannot move
    /// (its host weights are not kept).
    #[cfg(feature = "cuda")]
    pub fn on_cuda(&self, device: usize) -> Result<ImageEncoder, VisionError> {
        match self {
            ImageEncoder::Cpu(t) => Ok(ImageEncoder::Cuda(Arc::new(
                crate::cuda::CudaVisionTower::new(
                    t,
                    crate::cuda::CudaVisionOptions {
                        device,
                        ..Default::default()
                    },
                )?,
            ))),
            ImageEncoder::Cuda(t) if t.options().device == device => Ok(self.clone()),
            ImageEncoder::Cuda(t) => Err(VisionError::Device(format!(
                "the vision tower is on cuda:{}, it cannot move to cuda:{device}",
                t.options().device
            ))),
        }
    }
}

impl From<VisionTower> for ImageEncoder {
    fn from(t: VisionTower) -> Self {
        ImageEncoder::Cpu(Arc::new(t))
    }
}

impl From<Arc<VisionTower>> for ImageEncoder {
    fn from(t: Arc<VisionTower>) -> Self {
        ImageEncoder::Cpu(t)
    }
}
