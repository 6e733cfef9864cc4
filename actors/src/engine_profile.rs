//! Engine profiles: what one model on one device costs, in the ONE format that the planner,
//! the simulator's cost model and `turbine profile` share.
//!
//! A profile has two views of the same engine:
//! - `step_time`: a linear cost model of one forward pass, which the simulator prices every
//!   step with (linear in three batch features, a roofline-style first approximation):
//!
//!   ```text
//!   step_time = base + per_prefill_token × (tokens fed by non-decode entries)
//!             + per_decode_seq × (decode entries)
//!             + per_context_token × (Σ context length of every entry: KV read by attention)
//!   ```
//! - `measured` (optional): the tables `turbine profile` measured on the real backend:
//!   prefill time by prompt length, decode inter-token latency (ITL) by batch × context.
//!   The planner reads these; `turbine profile` also fits `step_time` to them by least
//!   squares, so a measured profile prices simulated steps from the same measurements.
//!
//! A profile without `measured` (an estimate) still answers every planner question from
//! its `step_time` model: see [`crate::planner::capacity`].
//!
//! The type lives here, not in the simulator, because the planner (this crate) reads it and
//! the simulator depends on this crate, not the other way round.

use crate::kv::BlockSize;
use crate::worker::{BlockManagerConfig, ScheduledSeq, SchedulerConfig, StepPlan};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The linear step-time model (microseconds).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepCost {
    pub base_us: f64,
    pub per_prefill_token_us: f64,
    pub per_decode_seq_us: f64,
    pub per_context_token_us: f64,
}

/// The three batch features the step-time model is linear in.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepFeatures {
    /// Tokens fed by entries that are not decodes (prompt chunks, recomputation).
    pub prefill_tokens: f64,
    /// Decode entries (one token on top of cached KV).
    pub decode_seqs: f64,
    /// Σ over entries of the context the last fed token attends to.
    pub context_tokens: f64,
}

impl StepFeatures {
    /// The features of a forward pass over `seqs`.
    pub fn of<'a>(seqs: impl IntoIterator<Item = &'a ScheduledSeq>) -> StepFeatures {
        let mut f = StepFeatures::default();
        for s in seqs {
            if s.is_decode() {
                f.decode_seqs += 1.0;
            } else {
                f.prefill_tokens += s.tokens.len() as f64;
            }
            f.context_tokens += s.context_len() as f64;
        }
        f
    }

    /// One prompt of `tokens` tokens prefilled from position 0 in one step.
    pub fn prefill(tokens: usize) -> StepFeatures {
        StepFeatures {
            prefill_tokens: tokens as f64,
            decode_seqs: 0.0,
            context_tokens: tokens as f64,
        }
    }

    /// `batch` decodes, each attending to `context` positions.
    pub fn decode(batch: usize, context: usize) -> StepFeatures {
        StepFeatures {
            prefill_tokens: 0.0,
            decode_seqs: batch as f64,
            context_tokens: batch as f64 * context as f64,
        }
    }
}

impl StepCost {
    /// Duration in microseconds of a forward pass with features `f` (never negative).
    pub fn micros(&self, f: StepFeatures) -> f64 {
        let us = self.base_us
            + self.per_prefill_token_us * f.prefill_tokens
            + self.per_decode_seq_us * f.decode_seqs
            + self.per_context_token_us * f.context_tokens;
        us.max(0.0)
    }

    /// Duration in microseconds of the forward pass that runs `plan`.
    pub fn plan_micros(&self, plan: &StepPlan) -> f64 {
        self.micros(StepFeatures::of(&plan.seqs))
    }

    /// Least-squares fit of the four coefficients to measured step times `(features, µs)`,
    /// in relative error (each sample weighted by 1 / its time, so a 20 ms decode step
    /// counts as much as a 10 s prefill), with every coefficient kept non-negative (a
    /// negative cost would price some batch below zero): a coefficient that comes out
    /// negative is fixed at zero and the rest are refitted. Samples whose time is not a
    /// positive number are skipped. `None` when the samples cannot determine the model.
    pub fn fit(samples: &[(StepFeatures, f64)]) -> Option<StepCost> {
        let samples: Vec<(StepFeatures, f64)> = samples
            .iter()
            .copied()
            .filter(|(_, y)| y.is_finite() && *y > 0.0)
            .collect();
        // Row and target divided by the target: minimises Σ ((model − y) / y)².
        let row = |f: &StepFeatures, y: f64| {
            [1.0, f.prefill_tokens, f.decode_seqs, f.context_tokens].map(|v| v / y)
        };
        let mut active = [true; 4];
        for _ in 0..4 {
            let idx: Vec<usize> = (0..4).filter(|&i| active[i]).collect();
            if idx.is_empty() {
                return None;
            }
            let n = idx.len();
            // Normal equations AᵀA x = Aᵀy over the active columns.
            let mut m = vec![vec![0.0; n + 1]; n];
            for (f, y) in &samples {
                let r = row(f, *y);
                for (a, &i) in idx.iter().enumerate() {
                    for (b, &j) in idx.iter().enumerate() {
                        m[a][b] += r[i] * r[j];
                    }
                    m[a][n] += r[i];
                }
            }
            let x = solve(m)?;
            let mut coef = [0.0; 4];
            for (a, &i) in idx.iter().enumerate() {
                coef[i] = x[a];
            }
            match (0..4).find(|&i| active[i] && coef[i] < 0.0) {
                Some(neg) => active[neg] = false,
                None => {
                    return Some(StepCost {
                        base_us: coef[0],
                        per_prefill_token_us: coef[1],
                        per_decode_seq_us: coef[2],
                        per_context_token_us: coef[3],
                    })
                }
            }
        }
        None
    }
}

/// Gaussian elimination with partial pivoting on an augmented `n × (n+1)` matrix; `None`
/// when it is singular (the samples do not vary a feature).
fn solve(mut m: Vec<Vec<f64>>) -> Option<Vec<f64>> {
    let n = m.len();
    let scale = m
        .iter()
        .flat_map(|r| r[..n].iter())
        .fold(0.0f64, |a, v| a.max(v.abs()));
    for col in 0..n {
        let pivot = (col..n).max_by(|&a, &b| m[a][col].abs().total_cmp(&m[b][col].abs()))?;
        if m[pivot][col].abs() <= scale * 1e-12 {
            return None;
        }
        m.swap(col, pivot);
        let pivot_row = m[col].clone();
        for (r, row) in m.iter_mut().enumerate() {
            if r != col {
                let k = row[col] / pivot_row[col];
                for (v, p) in row[col..].iter_mut().zip(&pivot_row[col..]) {
                    *v -= k * p;
                }
            }
        }
    }
    let x: Vec<f64> = (0..n).map(|i| m[i][n] / m[i][i]).collect();
    x.iter().all(|v| v.is_finite()).then_some(x)
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvProfile {
    pub num_blocks: u32,
    pub block_size: u32,
    #[serde(default = "yes")]
    pub enable_prefix_caching: bool,
}

fn yes() -> bool {
    true
}

/// One prefill measurement: a single prompt of `prompt_tokens` tokens, prefilled alone from
/// an empty cache in one forward pass, took `time_ms` (the TTFT of that prompt on an idle
/// worker). Its throughput is `prompt_tokens / time_ms`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefillPoint {
    pub prompt_tokens: usize,
    pub time_ms: f64,
}

impl PrefillPoint {
    pub fn tokens_per_s(&self) -> f64 {
        self.prompt_tokens as f64 * 1e3 / self.time_ms
    }
}

/// One decode measurement: a step of `batch` decodes, each attending to `context`
/// positions, took `itl_ms` (so each of the `batch` requests got one token in `itl_ms`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecodePoint {
    pub batch: usize,
    pub context: usize,
    pub itl_ms: f64,
}

/// What `turbine profile` measured on a real backend.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Measurements {
    /// The device measured (`cpu`, `cuda:0`).
    pub device: String,
    /// The model file measured.
    pub model: String,
    /// Sorted by `prompt_tokens`, each length once.
    pub prefill: Vec<PrefillPoint>,
    /// A full grid: every batch with every context, sorted by (batch, context).
    pub decode: Vec<DecodePoint>,
}

/// One model on one device.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
    /// The measured tables (`turbine profile` writes them); absent in an estimated profile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured: Option<Measurements>,
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
    #[error("profile {path}: {reason}")]
    Invalid { path: String, reason: String },
    #[error("unknown built-in profile {name:?} and no such file (known: {known})")]
    Unknown { name: String, known: String },
}

impl Profile {
    pub fn from_yaml(text: &str, origin: &str) -> Result<Profile, ProfileError> {
        let p: Profile = serde_yaml::from_str(text).map_err(|source| ProfileError::Parse {
            path: origin.to_string(),
            source,
        })?;
        p.validate().map_err(|reason| ProfileError::Invalid {
            path: origin.to_string(),
            reason,
        })?;
        Ok(p)
    }

    pub fn from_file(path: &Path) -> Result<Profile, ProfileError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ProfileError::Read {
            path: origin.clone(),
            source,
        })?;
        Profile::from_yaml(&text, &origin)
    }

    pub fn to_yaml(&self) -> Result<String, serde_yaml::Error> {
        serde_yaml::to_string(self)
    }

    /// Checks what serde cannot: a usable block size, finite non-negative costs, and
    /// measured tables the planner can interpolate (positive, sorted, a full decode grid).
    pub fn validate(&self) -> Result<(), String> {
        if self.kv.block_size == 0 {
            return Err("kv.block_size must be at least 1".into());
        }
        let c = &self.step_time;
        for (name, v) in [
            ("base_us", c.base_us),
            ("per_prefill_token_us", c.per_prefill_token_us),
            ("per_decode_seq_us", c.per_decode_seq_us),
            ("per_context_token_us", c.per_context_token_us),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("step_time.{name} must be a finite number >= 0"));
            }
        }
        if c.micros(StepFeatures::prefill(1)) <= 0.0 || c.micros(StepFeatures::decode(1, 1)) <= 0.0
        {
            return Err("step_time prices a one-token step at zero time".into());
        }
        if let Some(m) = &self.measured {
            m.validate()?;
        }
        Ok(())
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

impl Measurements {
    fn validate(&self) -> Result<(), String> {
        if self.prefill.is_empty() || self.decode.is_empty() {
            return Err("measured.prefill and measured.decode need at least one point".into());
        }
        for w in self.prefill.windows(2) {
            if w[0].prompt_tokens >= w[1].prompt_tokens {
                return Err("measured.prefill must be sorted by prompt_tokens, each once".into());
            }
        }
        for p in &self.prefill {
            if p.prompt_tokens == 0 || !(p.time_ms.is_finite() && p.time_ms > 0.0) {
                return Err(format!(
                    "measured.prefill: prompt_tokens {} with time_ms {}: both must be > 0",
                    p.prompt_tokens, p.time_ms
                ));
            }
        }
        let batches = self.decode_batches();
        let contexts = self.decode_contexts();
        if batches.len() * contexts.len() != self.decode.len() {
            return Err(
                "measured.decode must be a full grid (every batch with every context, \
                        each pair once)"
                    .into(),
            );
        }
        for (i, d) in self.decode.iter().enumerate() {
            let want = (batches[i / contexts.len()], contexts[i % contexts.len()]);
            if (d.batch, d.context) != want {
                return Err("measured.decode must be sorted by batch, then context".into());
            }
            if d.batch == 0 || !(d.itl_ms.is_finite() && d.itl_ms > 0.0) {
                return Err(format!(
                    "measured.decode: batch {} context {} itl_ms {}: batch and itl_ms must be > 0",
                    d.batch, d.context, d.itl_ms
                ));
            }
        }
        Ok(())
    }

    /// The grid's batch sizes, ascending, each once.
    pub fn decode_batches(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self.decode.iter().map(|d| d.batch).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The grid's context lengths, ascending, each once.
    pub fn decode_contexts(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self.decode.iter().map(|d| d.context).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// ITL (ms) at grid point (`batch`, `context`), if measured.
    pub fn itl_ms(&self, batch: usize, context: usize) -> Option<f64> {
        self.decode
            .iter()
            .find(|d| d.batch == batch && d.context == context)
            .map(|d| d.itl_ms)
    }

    /// Every measurement as a (features, µs) sample for [`StepCost::fit`].
    pub fn step_samples(&self) -> Vec<(StepFeatures, f64)> {
        let prefill = self
            .prefill
            .iter()
            .map(|p| (StepFeatures::prefill(p.prompt_tokens), p.time_ms * 1e3));
        let decode = self
            .decode
            .iter()
            .map(|d| (StepFeatures::decode(d.batch, d.context), d.itl_ms * 1e3));
        prefill.chain(decode).collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A hand-made measured profile with round numbers, shared with the planner's tests.
    ///
    /// prefill: 100 tokens in 10 ms (10 000 tok/s), 1 000 tokens in 50 ms (20 000 tok/s).
    /// decode ITL (ms):   context 100   context 1100
    ///        batch 1         5             6
    ///        batch 8         10            20
    /// KV pool 6250 × 16 = 100 000 tokens, so `max_num_seqs` (8) is the batch limit at
    /// these contexts.
    pub(crate) const HAND: &str = r#"
name: hand
step_time: {base_us: 1000, per_prefill_token_us: 10, per_decode_seq_us: 100, per_context_token_us: 0.1}
kv: {num_blocks: 6250, block_size: 16}
scheduler: {max_num_batched_tokens: 2048, max_num_seqs: 8, max_model_len: 4096}
measured:
  device: cpu
  model: hand.gguf
  prefill:
    - {prompt_tokens: 100, time_ms: 10}
    - {prompt_tokens: 1000, time_ms: 50}
  decode:
    - {batch: 1, context: 100, itl_ms: 5}
    - {batch: 1, context: 1100, itl_ms: 6}
    - {batch: 8, context: 100, itl_ms: 10}
    - {batch: 8, context: 1100, itl_ms: 20}
"#;

    #[test]
    fn measured_profile_round_trips_through_yaml() {
        let p = Profile::from_yaml(HAND, "hand").unwrap();
        let m = p.measured.as_ref().unwrap();
        assert_eq!(m.decode_batches(), vec![1, 8]);
        assert_eq!(m.itl_ms(8, 1100), Some(20.0));
        assert_eq!(m.prefill[1].tokens_per_s(), 20_000.0);
        let again = Profile::from_yaml(&p.to_yaml().unwrap(), "again").unwrap();
        assert_eq!(again, p);
    }

    #[test]
    fn a_profile_without_measurements_omits_the_section() {
        let mut p = Profile::from_yaml(HAND, "hand").unwrap();
        p.measured = None;
        assert!(!p.to_yaml().unwrap().contains("measured"));
    }

    #[test]
    fn typos_holes_and_unsorted_tables_are_rejected() {
        let typo = HAND.replace("itl_ms: 5}", "itl: 5}");
        assert!(Profile::from_yaml(&typo, "t").is_err());
        let hole = HAND.replace("    - {batch: 8, context: 1100, itl_ms: 20}\n", "");
        let e = Profile::from_yaml(&hole, "t").unwrap_err().to_string();
        assert!(e.contains("full grid"), "{e}");
        let unsorted = HAND
            .replace("prompt_tokens: 100,", "prompt_tokens: X,")
            .replace("prompt_tokens: 1000,", "prompt_tokens: 100,")
            .replace("prompt_tokens: X,", "prompt_tokens: 1000,");
        assert!(Profile::from_yaml(&unsorted, "t").is_err());
        let zero = HAND.replace("time_ms: 10}", "time_ms: 0}");
        assert!(Profile::from_yaml(&zero, "t").is_err());
        let negative = HAND.replace("base_us: 1000", "base_us: -1");
        assert!(Profile::from_yaml(&negative, "t").is_err());
    }

    #[test]
    fn the_fit_recovers_the_coefficients_that_generated_the_samples() {
        let truth = StepCost {
            base_us: 2000.0,
            per_prefill_token_us: 30.0,
            per_decode_seq_us: 250.0,
            per_context_token_us: 0.5,
        };
        let mut samples = Vec::new();
        for n in [16, 64, 256] {
            samples.push((
                StepFeatures::prefill(n),
                truth.micros(StepFeatures::prefill(n)),
            ));
        }
        for b in [1, 4, 16] {
            for c in [128, 1024] {
                let f = StepFeatures::decode(b, c);
                samples.push((f, truth.micros(f)));
            }
        }
        let fit = StepCost::fit(&samples).unwrap();
        for (got, want) in [
            (fit.base_us, truth.base_us),
            (fit.per_prefill_token_us, truth.per_prefill_token_us),
            (fit.per_decode_seq_us, truth.per_decode_seq_us),
            (fit.per_context_token_us, truth.per_context_token_us),
        ] {
            assert!((got - want).abs() < 1e-6 * want.max(1.0), "{fit:?}");
        }
    }

    #[test]
    fn the_fit_never_returns_a_negative_coefficient() {
        // Decode steps cheaper per sequence as the batch grows: unconstrained least squares
        // would give a negative per-context cost.
        let samples = vec![
            (StepFeatures::prefill(10), 1000.0),
            (StepFeatures::prefill(100), 1900.0),
            (StepFeatures::decode(1, 1000), 1200.0),
            (StepFeatures::decode(8, 1000), 1100.0),
            (StepFeatures::decode(8, 10), 1150.0),
        ];
        let fit = StepCost::fit(&samples).unwrap();
        for v in [
            fit.base_us,
            fit.per_prefill_token_us,
            fit.per_decode_seq_us,
            fit.per_context_token_us,
        ] {
            assert!(v >= 0.0, "{fit:?}");
        }
    }
}
