//! `turbine profile`: measure the configured engine and write the profile YAML that the
//! planner (`planner.profile`) and the simulator's cost model (`turbine sim --profile`) read.
//!
//! It drives the compute backend of the cluster file's worker group directly (no scheduler,
//! no actors), on the backend's own thread like an executor does:
//! - prefill: one prompt of each length, alone, from an empty cache, in one forward pass;
//! - decode: a step of `batch` one-token decodes, each at `context` positions, for every
//!   (batch, context) of the grid. Only the timing matters, so the cache positions before
//!   the decoded token are not filled by a real prompt first: attention reads the same
//!   amount of KV either way, and the grid takes seconds instead of minutes.
//!
//! Each point is run once to warm up, then `--repeats` times; the median is kept. The linear
//! `step_time` model the simulator prices steps with is fitted to the same points.

use crate::fetch::resolve_model;
use anyhow::{bail, ensure, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::time::Instant;
use turbine_actors::cluster_config::{ClusterConfig, WorkerGroup};
use turbine_actors::engine_profile::{
    DecodePoint, KvProfile, Measurements, PrefillPoint, Profile, StepCost,
};
use turbine_actors::executor::device::{backend_builder, Device};
use turbine_kernels::backend::{Backend, SeqStep};

#[derive(clap::Args, Debug)]
pub struct ProfileArgs {
    /// Cluster file: its worker group (`--group`, default the first) gives the device, the
    /// KV pool and the CPU threads. Without it: the default model on CPU.
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    /// Which entry of the file's `workers:` list to measure (0-based).
    #[arg(long, default_value_t = 0)]
    pub group: usize,
    /// Model to measure; overrides the file's `model.path`.
    #[arg(long)]
    pub model: Option<String>,
    /// Prompt lengths to measure prefill at (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "32,128,256")]
    pub prefill_lengths: Vec<usize>,
    /// Decode batch sizes of the ITL grid (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    pub batches: Vec<usize>,
    /// Context lengths of the ITL grid: positions each decoded token attends to.
    #[arg(long, value_delimiter = ',', default_value = "128,512")]
    pub contexts: Vec<usize>,
    /// Timed runs per point, after one warm-up run; the median is kept.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Where to write the profile.
    #[arg(short = 'o', long, default_value = "profile.yaml")]
    pub output: PathBuf,
    /// The profile's `name`; default: the model's name and the device.
    #[arg(long)]
    pub name: Option<String>,
    /// Fail instead of downloading the default model when it is not cached.
    #[arg(long)]
    pub no_fetch: bool,
}

/// The points to measure, checked against the model and the KV pool.
#[derive(Clone, Debug)]
struct Grid {
    prefill: Vec<usize>,
    batches: Vec<usize>,
    contexts: Vec<usize>,
    repeats: usize,
}

fn sorted_unique(mut v: Vec<usize>) -> Vec<usize> {
    v.sort_unstable();
    v.dedup();
    v
}

impl Grid {
    fn new(
        args: &ProfileArgs,
        max_position: usize,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<Grid> {
        let grid = Grid {
            prefill: sorted_unique(args.prefill_lengths.clone()),
            batches: sorted_unique(args.batches.clone()),
            contexts: sorted_unique(args.contexts.clone()),
            repeats: args.repeats,
        };
        ensure!(grid.repeats >= 1, "--repeats must be at least 1");
        for (flag, values) in [
            ("--prefill-lengths", &grid.prefill),
            ("--batches", &grid.batches),
            ("--contexts", &grid.contexts),
        ] {
            ensure!(
                !values.is_empty() && values[0] >= 1,
                "{flag}: give at least one value, each at least 1"
            );
        }
        let blocks = |positions: usize| positions.div_ceil(block_size);
        let pool = num_blocks * block_size;
        for &n in grid.prefill.iter().chain(&grid.contexts) {
            ensure!(
                n <= max_position,
                "a prompt or context of {n} tokens exceeds the model's context ({max_position})"
            );
        }
        if let Some(&n) = grid.prefill.last() {
            ensure!(
                blocks(n) <= num_blocks,
                "--prefill-lengths: {n} tokens do not fit the KV pool ({pool} tokens: kv_blocks × block_size)"
            );
        }
        if let (Some(&b), Some(&c)) = (grid.batches.last(), grid.contexts.last()) {
            ensure!(
                b * blocks(c) <= num_blocks,
                "--batches/--contexts: {b} sequences of {c} tokens do not fit the KV pool \
                 ({num_blocks} blocks of {block_size}); raise kv_blocks or shrink the grid"
            );
        }
        Ok(grid)
    }

    fn runs(&self) -> u64 {
        let points = self.prefill.len() + self.batches.len() * self.contexts.len();
        (points * (self.repeats + 1)) as u64
    }
}

/// Measures group `args.group` of `cfg` and writes the profile to `args.output`.
pub fn run(cfg: ClusterConfig, args: &ProfileArgs) -> Result<()> {
    let mut cfg = cfg;
    if let Some(m) = &args.model {
        cfg.model.path = m.clone();
    }
    let group = cfg
        .workers
        .get(args.group)
        .with_context(|| {
            format!(
                "--group {}: the file has {} worker group(s) (0-based)",
                args.group,
                cfg.workers.len()
            )
        })?
        .clone();
    let device = Device::parse(&group.device)?;
    let path = resolve_model(&cfg.model.path, !args.no_fetch)?;
    eprintln!("loading {}", path.display());
    let model = turbine_kernels::loader::load_model(&path).context("loading the model")?;
    let block_size = group.block_size.as_usize();
    let grid = Grid::new(args, model.config.max_position, group.kv_blocks, block_size)?;
    let build = backend_builder(device, &group, &model)?;
    let vocab = model.config.vocab_size;
    eprintln!(
        "measuring {} on {device}: prefill at {:?} tokens, decode batch {:?} × context {:?}",
        model.name, grid.prefill, grid.batches, grid.contexts
    );
    // The backend is built, used and dropped on one thread (a CUDA context belongs to the
    // thread that made it), as in an executor.
    let measured = {
        let grid = grid.clone();
        std::thread::Builder::new()
            .name("profile".into())
            .spawn(move || -> Result<(Vec<PrefillPoint>, Vec<DecodePoint>)> {
                let mut backend = build().context("building the backend")?;
                measure(backend.as_mut(), &grid, vocab)
            })
            .context("starting the measuring thread")?
            .join()
            .map_err(|_| anyhow::anyhow!("the measuring thread panicked"))??
    };
    let profile = assemble(&cfg, &group, &model, device, args, measured)?;
    let text = format!(
        "# Engine profile measured by `turbine profile`. Read by the planner (planner.profile)\n\
         # and by `turbine sim --profile {}`; format: docs/PLANNER.md.\n{}",
        args.output.display(),
        profile.to_yaml().context("writing the profile as YAML")?
    );
    std::fs::write(&args.output, text)
        .with_context(|| format!("writing {}", args.output.display()))?;
    print_summary(&profile);
    println!("wrote {}", args.output.display());
    Ok(())
}

/// Deterministic token ids spread over the vocabulary (xorshift): realistic embeddings rows,
/// no dependence on a tokenizer.
fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % vocab.max(1) as u64) as u32
        })
        .collect()
}

/// `v` rounded to six significant digits.
fn round_sig(v: f64) -> f64 {
    if v == 0.0 || !v.is_finite() {
        return v;
    }
    let scale = 10f64.powi(5 - v.abs().log10().floor() as i32);
    (v * scale).round() / scale
}

fn median_ms(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    let n = samples.len();
    if n % 2 == 1 {
        samples[n / 2]
    } else {
        (samples[n / 2 - 1] + samples[n / 2]) / 2.0
    }
}

/// Runs `step` once to warm up and `repeats` times timed; the median in milliseconds.
fn time_point(
    bar: &ProgressBar,
    repeats: usize,
    mut step: impl FnMut() -> Result<()>,
) -> Result<f64> {
    step()?;
    bar.inc(1);
    let mut samples = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let start = Instant::now();
        step()?;
        samples.push(start.elapsed().as_secs_f64() * 1e3);
        bar.inc(1);
    }
    Ok(median_ms(samples))
}

fn measure(
    backend: &mut dyn Backend,
    grid: &Grid,
    vocab: usize,
) -> Result<(Vec<PrefillPoint>, Vec<DecodePoint>)> {
    let block_size = backend.kv_layout().block_size;
    let bar = ProgressBar::new(grid.runs());
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} runs  {msg}  [{elapsed}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut prefill = Vec::with_capacity(grid.prefill.len());
    for &n in &grid.prefill {
        bar.set_message(format!("prefill {n} tokens"));
        let prompt = tokens(n, vocab, n as u64);
        let table: Vec<u32> = (0..n.div_ceil(block_size) as u32).collect();
        let time_ms = time_point(&bar, grid.repeats, || {
            let step = SeqStep {
                tokens: &prompt,
                start_pos: 0,
                block_table: &table,
                want_logits: true,
            };
            backend.forward(&[step]).map(|_| ()).map_err(Into::into)
        })?;
        prefill.push(PrefillPoint {
            prompt_tokens: n,
            time_ms,
        });
    }
    let mut decode = Vec::with_capacity(grid.batches.len() * grid.contexts.len());
    for &batch in &grid.batches {
        for &context in &grid.contexts {
            bar.set_message(format!("decode batch {batch} at context {context}"));
            // Sequence i owns blocks [i × per, (i + 1) × per): no two write the same slot.
            let per = context.div_ceil(block_size);
            let tables: Vec<Vec<u32>> = (0..batch)
                .map(|i| ((i * per) as u32..((i + 1) * per) as u32).collect())
                .collect();
            let next: Vec<Vec<u32>> = (0..batch)
                .map(|i| tokens(1, vocab, (batch * 1000 + i) as u64))
                .collect();
            let itl_ms = time_point(&bar, grid.repeats, || {
                let steps: Vec<SeqStep<'_>> = (0..batch)
                    .map(|i| SeqStep {
                        tokens: &next[i],
                        start_pos: context - 1,
                        block_table: &tables[i],
                        want_logits: true,
                    })
                    .collect();
                backend.forward(&steps).map(|_| ()).map_err(Into::into)
            })?;
            decode.push(DecodePoint {
                batch,
                context,
                itl_ms,
            });
        }
    }
    bar.finish_and_clear();
    Ok((prefill, decode))
}

fn assemble(
    cfg: &ClusterConfig,
    group: &WorkerGroup,
    model: &turbine_kernels::loader::LoadedModel,
    device: Device,
    args: &ProfileArgs,
    (prefill, decode): (Vec<PrefillPoint>, Vec<DecodePoint>),
) -> Result<Profile> {
    let measured = Measurements {
        device: device.to_string(),
        model: model.path.display().to_string(),
        prefill,
        decode,
    };
    let Some(fit) = StepCost::fit(&measured.step_samples()) else {
        bail!(
            "cannot fit the step-time model to this grid: measure at least two batch sizes or \
             two contexts, and one prefill length"
        );
    };
    // Six significant digits: far below the run-to-run noise, and readable.
    let step_time = StepCost {
        base_us: round_sig(fit.base_us),
        per_prefill_token_us: round_sig(fit.per_prefill_token_us),
        per_decode_seq_us: round_sig(fit.per_decode_seq_us),
        per_context_token_us: round_sig(fit.per_context_token_us),
    };
    let mut measured = measured;
    for p in &mut measured.prefill {
        p.time_ms = round_sig(p.time_ms);
    }
    for d in &mut measured.decode {
        d.itl_ms = round_sig(d.itl_ms);
    }
    let kv_tokens = group.kv_blocks * group.block_size.as_usize();
    let threads = match (device, group.threads) {
        (Device::Cpu, 0) => ", all cores".to_string(),
        (Device::Cpu, n) => format!(", {n} threads"),
        _ => String::new(),
    };
    let profile = Profile {
        name: args
            .name
            .clone()
            .unwrap_or_else(|| format!("{} on {device}", model.name)),
        placeholder: false,
        notes: format!(
            "Measured by `turbine profile` on {device}{threads}: median of {} runs per point. \
             step_time is the least-squares fit of the linear step model to these points.",
            args.repeats
        ),
        step_time,
        kv: KvProfile {
            num_blocks: u32::try_from(group.kv_blocks).context("kv_blocks is too large")?,
            block_size: group.block_size.get(),
            enable_prefix_caching: true,
        },
        scheduler: turbine_actors::node::scheduler_config(
            group,
            cfg.model
                .max_context
                .unwrap_or(model.config.max_position.min(kv_tokens)),
        )
        .map_err(anyhow::Error::msg)?,
        measured: Some(measured),
    };
    profile
        .validate()
        .map_err(|reason| anyhow::anyhow!("the measured profile is not valid: {reason}"))?;
    Ok(profile)
}

fn print_summary(p: &Profile) {
    let Some(m) = &p.measured else { return };
    println!("prefill (one prompt per step):");
    for x in &m.prefill {
        println!(
            "  {:>6} tokens  {:>9.2} ms  {:>9.0} tokens/s",
            x.prompt_tokens,
            x.time_ms,
            x.tokens_per_s()
        );
    }
    println!("decode ITL (ms), batch × context:");
    for d in &m.decode {
        println!(
            "  batch {:>4}  context {:>6}  {:>8.2} ms",
            d.batch, d.context, d.itl_ms
        );
    }
    let s = &p.step_time;
    println!(
        "step_time fit: base {:.0} µs + {:.2} µs/prefill token + {:.1} µs/decode seq + {:.4} µs/context token",
        s.base_us, s.per_prefill_token_us, s.per_decode_seq_us, s.per_context_token_us
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_keeps_six_significant_digits() {
        assert_eq!(round_sig(759.162116), 759.162);
        assert_eq!(round_sig(0.000123456789), 0.000123457);
        assert_eq!(round_sig(26281.1325), 26281.1);
        assert_eq!(round_sig(0.0), 0.0);
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median_ms(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median_ms(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn tokens_are_deterministic_and_in_the_vocabulary() {
        let a = tokens(100, 50, 7);
        assert_eq!(a, tokens(100, 50, 7));
        assert!(a.iter().all(|&t| t < 50));
    }
}
