//! Which compute backend a worker group's `device` names, and how to build it.
//!
//! `device: cpu` builds the pure-Rust CPU backend; `device: cuda:N` the CUDA backend on GPU
//! `N` (only in a build with the cargo feature `cuda`). The backend is returned as a
//! [`BackendBuilder`]: a closure the executor runs on its own OS thread, so the CUDA context,
//! its streams and every CUDA call live on that one thread (DESIGN.md: executors). Whether the
//! device exists is checked before, so a bad config fails with a precise message instead of
//! a thread that dies.

use super::BackendBuilder;
use crate::cluster_config::WorkerGroup;
use std::fmt;
use turbine_kernels::backend::Backend;
use turbine_kernels::cpu::{CpuBackend, CpuBackendOptions};
use turbine_kernels::loader::{LoadedModel, VisionModel};

/// A parsed `device` field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    /// CUDA device ordinal `N` of `cuda:N`.
    Cuda(usize),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Why a worker's device could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// The `device` text is neither `cpu` nor `cuda:N` (a config error).
    #[error(
        "field `device`: {0:?} is not a device (expected \"cpu\" or \"cuda:N\", N = 0, 1, ...)"
    )]
    Unparsable(String),
    #[error("device {0}: this build has no CUDA support (rebuild with --features cuda)")]
    NoCudaSupport(Device),
    #[error("no CUDA device {ordinal} (found {found})")]
    NoSuchDevice { ordinal: usize, found: usize },
    #[error("device cuda:{ordinal}: CUDA is not usable on this machine ({reason}); the NVIDIA driver (libcuda) and the CUDA libraries libnvrtc and libcublas must be installed")]
    DriverMissing { ordinal: usize, reason: String },
    /// The vision tower's weights could not be placed on the device.
    #[error("device {device}: the vision tower could not be set up there: {reason}")]
    Vision { device: Device, reason: String },
}

impl Device {
    /// Parses `cpu` or `cuda:N` (surrounding spaces and letter case ignored).
    pub fn parse(text: &str) -> Result<Device, DeviceError> {
        let t = text.trim().to_ascii_lowercase();
        if t == "cpu" {
            return Ok(Device::Cpu);
        }
        let ordinal = t
            .strip_prefix("cuda:")
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|n| n.parse::<usize>().ok());
        match ordinal {
            Some(n) => Ok(Device::Cuda(n)),
            None => Err(DeviceError::Unparsable(text.to_string())),
        }
    }
}

/// Checks that `device` exists and this build can drive it (a CUDA device: the driver
/// loads and the ordinal is below the device count).
pub fn check_device(device: Device) -> Result<(), DeviceError> {
    match device {
        Device::Cpu => Ok(()),
        Device::Cuda(ordinal) => cuda::check(ordinal),
    }
}

/// Checks that `device` can be used and returns the closure that builds the group's backend
/// for `model` (run it on the executor's thread: [`super::executor::Executor::spawn_with`]).
pub fn backend_builder(
    device: Device,
    group: &WorkerGroup,
    model: &LoadedModel,
) -> Result<BackendBuilder, DeviceError> {
    // Weights are memory-mapped (or Arc-owned): cloning them copies handles, not bytes.
    let config = model.config.clone();
    let weights = model.weights.clone();
    let (num_blocks, block_size) = (group.kv_blocks, group.block_size.as_usize());
    match device {
        Device::Cpu => {
            let threads = group.threads;
            Ok(Box::new(move || {
                let backend = CpuBackend::new(
                    config,
                    &weights,
                    CpuBackendOptions {
                        num_blocks,
                        block_size,
                        threads,
                    },
                )?;
                Ok(Box::new(backend) as Box<dyn Backend>)
            }))
        }
        Device::Cuda(ordinal) => cuda::builder(ordinal, config, weights, num_blocks, block_size),
    }
}

/// `vision` with its tower on `device`: the CPU tower as loaded for `cpu`; for `cuda:N` a
/// copy of its weights on GPU N (checked like the backend's device first). Encoding then
/// runs there for this worker or encoder.
pub fn vision_on(device: Device, vision: &VisionModel) -> Result<VisionModel, DeviceError> {
    match device {
        Device::Cpu => Ok(vision.clone()),
        Device::Cuda(ordinal) => cuda::vision(ordinal, vision),
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::{BackendBuilder, Device, DeviceError, VisionModel};
    use turbine_kernels::backend::Backend;
    use turbine_kernels::cuda::{device_count, CudaBackend, CudaBackendOptions};
    use turbine_kernels::model::{ModelConfig, ModelWeights};

    /// Checks that GPU `ordinal` exists. Calls cuInit and cuDeviceGetCount only: no context
    /// is made on the calling thread.
    pub fn check(ordinal: usize) -> Result<(), DeviceError> {
        let found = device_count().map_err(|e| DeviceError::DriverMissing {
            ordinal,
            reason: e.to_string(),
        })?;
        if ordinal >= found {
            return Err(DeviceError::NoSuchDevice { ordinal, found });
        }
        Ok(())
    }

    /// `vision`'s tower uploaded to GPU `ordinal` (NVRTC build and upload: seconds).
    pub fn vision(ordinal: usize, vision: &VisionModel) -> Result<VisionModel, DeviceError> {
        check(ordinal)?;
        vision.on_cuda(ordinal).map_err(|e| DeviceError::Vision {
            device: Device::Cuda(ordinal),
            reason: e.to_string(),
        })
    }

    /// Checks that GPU `device` exists, then returns the closure that uploads the weights.
    pub fn builder(
        device: usize,
        config: ModelConfig,
        weights: ModelWeights,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<BackendBuilder, DeviceError> {
        check(device)?;
        Ok(Box::new(move || {
            let backend = CudaBackend::new(
                config,
                &weights,
                CudaBackendOptions {
                    device,
                    num_blocks,
                    block_size,
                },
            )?;
            Ok(Box::new(backend) as Box<dyn Backend>)
        }))
    }
}

#[cfg(not(feature = "cuda"))]
mod cuda {
    use super::{BackendBuilder, Device, DeviceError, VisionModel};
    use turbine_kernels::model::{ModelConfig, ModelWeights};

    pub fn check(ordinal: usize) -> Result<(), DeviceError> {
        Err(DeviceError::NoCudaSupport(Device::Cuda(ordinal)))
    }

    pub fn vision(ordinal: usize, _vision: &VisionModel) -> Result<VisionModel, DeviceError> {
        Err(DeviceError::NoCudaSupport(Device::Cuda(ordinal)))
    }

    pub fn builder(
        device: usize,
        _config: ModelConfig,
        _weights: ModelWeights,
        _num_blocks: usize,
        _block_size: usize,
    ) -> Result<BackendBuilder, DeviceError> {
        check(device).map(|()| unreachable_builder())
    }

    /// `check` always fails in this build; this only satisfies the type.
    fn unreachable_builder() -> BackendBuilder {
        Box::new(|| {
            Err(turbine_kernels::backend::BackendError::Device(
                "no CUDA support in this build".into(),
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_and_cuda_ordinals() {
        assert_eq!(Device::parse("cpu"), Ok(Device::Cpu));
        assert_eq!(Device::parse(" CPU "), Ok(Device::Cpu));
        assert_eq!(Device::parse("cuda:0"), Ok(Device::Cuda(0)));
        assert_eq!(Device::parse("cuda:12"), Ok(Device::Cuda(12)));
        assert_eq!(Device::Cuda(3).to_string(), "cuda:3");
    }

    #[test]
    fn refuses_malformed_devices_naming_the_field() {
        for bad in [
            "", "gpu", "cuda", "cuda:", "cuda:-1", "cuda:x", "cuda:1:2", "cuda: 1",
        ] {
            let err = Device::parse(bad).unwrap_err();
            assert_eq!(err, DeviceError::Unparsable(bad.to_string()));
            assert!(err.to_string().contains("field `device`"), "{err}");
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_rebuild() {
        assert_eq!(check_device(Device::Cpu), Ok(()));
        let err = check_device(Device::Cuda(0)).unwrap_err();
        assert_eq!(err, DeviceError::NoCudaSupport(Device::Cuda(0)));
        assert!(err.to_string().contains("--features cuda"), "{err}");
    }

    /// In a CUDA build on a machine without the device: a precise error, never a panic.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_device_beyond_the_count_is_refused() {
        match check_device(Device::Cuda(999)).unwrap_err() {
            DeviceError::NoSuchDevice { ordinal, found } => {
                assert_eq!(ordinal, 999);
                assert!(found < 999);
            }
            DeviceError::DriverMissing { ordinal, reason } => {
                assert_eq!(ordinal, 999);
                assert!(!reason.is_empty());
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    /// The fixture's vision model stays on the CPU for `cpu`; a GPU that is not there is
    /// refused with the reason, never a panic.
    #[test]
    fn the_vision_tower_goes_to_the_groups_device() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/tiny-idefics3");
        let model = turbine_kernels::loader::load_model(&dir).unwrap();
        let vision = model.vision.unwrap();
        assert_eq!(
            vision_on(Device::Cpu, &vision).unwrap().tower.device(),
            "cpu"
        );
        let err = vision_on(Device::Cuda(999), &vision).unwrap_err();
        assert!(
            matches!(
                err,
                DeviceError::NoSuchDevice { ordinal: 999, .. }
                    | DeviceError::DriverMissing { ordinal: 999, .. }
                    | DeviceError::NoCudaSupport(Device::Cuda(999))
            ),
            "{err}"
        );
    }
}
