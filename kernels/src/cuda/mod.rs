//! The CUDA backend (cargo feature `cuda`): NVRTC-compiled kernels in CUDA C
//! (`kernels.cu`), cuBLAS bf16 GEMMs with f32 accumulation, a paged bf16 KV pool, and
//! [`CudaBackend`] implementing [`crate::backend::Backend`]; and the vision tower of
//! multimodal models ([`CudaVisionTower`]).
//!
//! The CUDA libraries (libcuda, libnvrtc, libcublas) are loaded at run time, so building
//! with the feature needs no CUDA toolkit; [`device_count`] reports why no device is usable.

pub mod backend;
pub mod device;
pub mod ops;
pub mod synthetic;
pub mod vision;

pub use backend::{
    CudaBackend, CudaBackendOptions, KvExportJob, KvImportJob, KvPool, DEFAULT_PREFILL_ATTENTION,
};
pub use device::{
    device_count, CudaError, DBuf, Gpu, IpcMapping, KernelSpec, PinnedBytes, SharedAlloc,
    StridedGemm, GEMV_MAX_ROWS,
};
pub use ops::PrefillAttention;
pub use synthetic::{synthetic_config, synthetic_weights};
pub use vision::{CudaVisionOptions, CudaVisionTower};
