//! Engine profiles: the step-time cost model and the engine limits of one model on one device.
//!
//! step_time = base + per_prefill_token × (tokens fed by non-decode entries)
//!           + per_decode_seq × (decode entries) + per_context_token × (Σ context length of
//!           every entry, i.e. KV read by attention).
//! Linear in the three batch features, as a roofline-style first approximation; the
//! coefficients are meant to be fitted from real step timings.

use crate::time::SimDuration;
use serde::{Deserialize, Serialize};
use std::path::Path;
use turbine_actors::kv::BlockSize;
use turbine_actors::worker::{BlockManagerConfig, ScheduledSeq, SchedulerConfig, StepPlan};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepCost {
    pub base_us: f64,
    pub per_prefill_token_us: f64,
    pub per_decode_seq_us: f64,
    pub per_context_token_us: f64,
}

impl StepCost {
    /// Virtual duration of the forward pass that runs `plan`.
    pub fn step_time(&self, plan: &StepPlan) -> SimDuration {
        self.step_time_of(&plan.seqs)
    }

    /// Virtual duration of a forward pass over `seqs`.
    pub fn step_time_of<'a>(
        &self,
        seqs: impl IntoIterator<Item = &'a ScheduledSeq>,
    ) -> SimDuration {
        let mut prefill_tokens = 0usize;
        let mut decode_seqs = 0usize;
        let mut context = 0usize;
        for s in seqs {
            if s.is_decode() {
                decode_seqs += 1;
            } else {
                prefill_tokens += s.tokens.len();
            }
            context += s.start_pos + s.tokens.len();
        }
        let us = self.base_us
            + self.per_prefill_token_us * prefill_tokens as f64
            + self.per_decode_seq_us * decode_seqs as f64
            + self.per_context_token_us * context as f64;
        SimDuration::from_micros_f64(us)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KvProfile {
    pub num_blocks: u32,
    pub block_size: u32,
    #[serde(default = "yes")]
    pub enable_prefix_caching: bool,
}

fn yes() -> bool {
    true
}

/// One model on one device.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub name: String,
    /// True while the coefficients are estimates, not fitted to measured step times.
    #[serde(default)]
    pub placeholder: bool,
    #[serde(default)]
    pub notes: String,
    pub step_time: StepCost,
    pub kv: KvProfile,
    #[serde(default)]
    pub scheduler: SchedulerConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("cannot read profile {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid profile {path}: {source}")]
    Parse {
        path: String,
        source: serde_yaml::Error,
    },
    #[error("profile {0}: block_size must be at least 1")]
    BlockSize(String),
    #[error("unknown built-in profile {0:?} (known: smollm2-cpu, llama3-8b-h100)")]
    Unknown(String),
}

/// The profiles shipped in sim/profiles, compiled in so `--profile NAME` works anywhere.
const BUILTIN: &[(&str, &str)] = &[
    ("smollm2-cpu", include_str!("../profiles/smollm2-cpu.yaml")),
    (
        "llama3-8b-h100",
        include_str!("../profiles/llama3-8b-h100.yaml"),
    ),
];

impl Profile {
    pub fn from_yaml(text: &str, origin: &str) -> Result<Profile, ProfileError> {
        let p: Profile = serde_yaml::from_str(text).map_err(|source| ProfileError::Parse {
            path: origin.to_string(),
            source,
        })?;
        if p.kv.block_size == 0 {
            return Err(ProfileError::BlockSize(origin.to_string()));
        }
        Ok(p)
    }

    /// A built-in name, or a path to a YAML file.
    pub fn load(name_or_path: &str) -> Result<Profile, ProfileError> {
        if let Some((_, text)) = BUILTIN.iter().find(|(n, _)| *n == name_or_path) {
            return Profile::from_yaml(text, name_or_path);
        }
        let path = Path::new(name_or_path);
        if !path.exists() {
            return Err(ProfileError::Unknown(name_or_path.to_string()));
        }
        let text = std::fs::read_to_string(path).map_err(|source| ProfileError::Read {
            path: name_or_path.to_string(),
            source,
        })?;
        Profile::from_yaml(&text, name_or_path)
    }

    pub fn block_size(&self) -> BlockSize {
        BlockSize::new(self.kv.block_size).unwrap_or_default()
    }

    pub fn block_manager_config(&self) -> BlockManagerConfig {
        BlockManagerConfig {
            num_blocks: self.kv.num_blocks,
            block_size: self.block_size(),
            enable_prefix_caching: self.kv.enable_prefix_caching,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_profiles_parse_and_h100_is_marked_placeholder() {
        let cpu = Profile::load("smollm2-cpu").unwrap();
        let gpu = Profile::load("llama3-8b-h100").unwrap();
        assert!(gpu.placeholder);
        assert!(cpu.scheduler.validate().is_ok() && gpu.scheduler.validate().is_ok());
    }
}
