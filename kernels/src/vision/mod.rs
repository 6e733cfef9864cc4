//! The vision side of multimodal models: images decoded from the bytes a client sent
//! (`decode`), and (as they land) the processor that turns pixels into a model's input and
//! the vision tower that turns those into embeddings for the text model.

pub mod decode;
pub mod encoder;
pub mod processor;
pub mod resize;
pub mod tower;

pub use decode::{decode, DecodeLimits, ImageError, RgbImage};
pub use encoder::ImageEncoder;
pub use processor::{layout, process, ProcessedImage, ProcessedLayout, ProcessorConfig};
pub use tower::{pixel_shuffle_rows, VisionConfig, VisionError, VisionTower};
