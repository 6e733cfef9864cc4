//! Engine profiles for the simulator: the format itself lives in
//! [`turbine_actors::engine_profile`] (the planner reads the same files); this module adds
//! the built-in profiles of sim/profiles and prices steps in virtual time.

use crate::time::SimDuration;
use turbine_actors::worker::{ScheduledSeq, StepPlan};

pub use turbine_actors::engine_profile::{
    KvProfile, Measurements, Profile, ProfileError, StepCost, StepFeatures,
};

/// Prices a step in virtual time with a profile's [`StepCost`].
pub trait StepPricing {
    /// Virtual duration of the forward pass that runs `plan`.
    fn step_time(&self, plan: &StepPlan) -> SimDuration;
    /// Virtual duration of a forward pass over `seqs`.
    fn step_time_of<'a>(&self, seqs: impl IntoIterator<Item = &'a ScheduledSeq>) -> SimDuration;
}

impl StepPricing for StepCost {
    fn step_time(&self, plan: &StepPlan) -> SimDuration {
        SimDuration::from_micros_f64(self.plan_micros(plan))
    }

    fn step_time_of<'a>(&self, seqs: impl IntoIterator<Item = &'a ScheduledSeq>) -> SimDuration {
        SimDuration::from_micros_f64(self.micros(StepFeatures::of(seqs)))
    }
}

/// The profiles shipped in sim/profiles, compiled in so `--profile NAME` works anywhere.
const BUILTIN: &[(&str, &str)] = &[
    ("smollm2-cpu", include_str!("../profiles/smollm2-cpu.yaml")),
    (
        "llama3-8b-h100",
        include_str!("../profiles/llama3-8b-h100.yaml"),
    ),
];

/// A built-in name, or a path to a YAML file (e.g. one `turbine profile` wrote).
pub fn load(name_or_path: &str) -> Result<Profile, ProfileError> {
    if let Some((_, text)) = BUILTIN.iter().find(|(n, _)| *n == name_or_path) {
        return Profile::from_yaml(text, name_or_path);
    }
    let path = std::path::Path::new(name_or_path);
    if !path.exists() {
        let known: Vec<&str> = BUILTIN.iter().map(|(n, _)| *n).collect();
        return Err(ProfileError::Unknown {
            name: name_or_path.to_string(),
            known: known.join(", "),
        });
    }
    Profile::from_file(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_profiles_parse_and_h100_is_marked_placeholder() {
        let cpu = load("smollm2-cpu").unwrap();
        let gpu = load("llama3-8b-h100").unwrap();
        assert!(gpu.placeholder);
        assert!(cpu.scheduler.validate().is_ok() && gpu.scheduler.validate().is_ok());
    }

    #[test]
    fn an_unknown_name_lists_the_built_in_ones() {
        let e = load("no-such-profile").unwrap_err().to_string();
        assert!(e.contains("smollm2-cpu, llama3-8b-h100"), "{e}");
    }
}
