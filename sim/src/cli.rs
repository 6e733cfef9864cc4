//! `turbine sim`: command-line arguments and the command itself.

use crate::faults::FaultPlan;
use crate::network::{JitterKind, NetConfig};
use crate::plot;
use crate::report::{latency_svg, Report, Slo};
use crate::rng::SeedSplitter;
use crate::run::{simulate, SimConfig, SimOutcome};
use crate::time::{SimDuration, SimTime};
use crate::workload::{load_trace, reshape, ArrivalKind, RequestSpec, Synthetic, TraceFormat};
use anyhow::{bail, Context};
use std::fmt::Write as _;
use std::path::PathBuf;
use turbine_actors::planner::Replicas;
use turbine_actors::router::PolicyKind;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum JitterArg {
    Exponential,
    Lognormal,
}

/// Simulate a turbine cluster on virtual time (deterministic for a given seed).
#[derive(Clone, Debug, clap::Parser)]
#[command(name = "sim")]
pub struct SimArgs {
    /// Seed of the run's one RNG (workload, network, router, faults).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Fault campaign: run this many seeds (from --seed on), check every run's invariants
    /// and print each failing seed with its replay command (see `campaign`).
    #[arg(long)]
    pub seeds: Option<u64>,
    /// Number of workers.
    #[arg(long, default_value_t = 4)]
    pub workers: u32,
    /// Engine profile: a built-in name (smollm2-cpu, llama3-8b-h100) or a YAML path.
    #[arg(long, default_value = "smollm2-cpu")]
    pub profile: String,
    /// Routing policy: kv, round-robin (or round_robin) or random (the router's own
    /// `PolicyKind` names).
    #[arg(long, default_value = "kv", value_parser = parse_policy)]
    pub router: PolicyKind,
    /// Accepted for old command lines: the real actor shells are what every run uses now
    /// (there is no other engine).
    #[arg(long, hide = true)]
    pub actors: bool,
    /// Run kv, round-robin and random on the same workload and print a comparison.
    #[arg(long)]
    pub compare_routers: bool,
    /// Disaggregated serving: this many prefill workers (with --decode-workers). The run
    /// is then compared with aggregated serving on as many workers in all (--workers is
    /// ignored).
    #[arg(long, requires = "decode_workers")]
    pub prefill_workers: Option<u32>,
    /// Disaggregated serving: this many decode workers (with --prefill-workers).
    #[arg(long, requires = "prefill_workers")]
    pub decode_workers: Option<u32>,
    /// Disaggregated serving: uncached prompt tokens from which a prefill goes remote.
    #[arg(long, default_value_t = 512)]
    pub remote_prefill_min_tokens: u32,
    /// Bandwidth of a simulated link for KV transfers (Gbit/s).
    #[arg(long, default_value_t = 100.0)]
    pub link_gbps: f64,

    /// Replay a trace (Mooncake JSONL or Azure-style CSV) instead of a synthetic workload.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Trace format (default: from the extension, .csv = azure, else mooncake).
    #[arg(long, value_enum)]
    pub trace_format: Option<TraceFormat>,
    /// Divide trace timestamps by this factor (2 = twice the request rate).
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
    /// Simulated seconds of arrivals: repeats a trace to fill it, or sizes a synthetic run.
    #[arg(long)]
    pub duration_s: Option<f64>,

    /// Synthetic: number of requests (ignored with --duration-s).
    #[arg(long, default_value_t = 200)]
    pub requests: usize,
    /// Synthetic: mean arrival rate (requests/s).
    #[arg(long, default_value_t = 4.0)]
    pub rate: f64,
    #[arg(long, value_enum, default_value_t = ArrivalKind::Poisson)]
    pub arrival: ArrivalKind,
    /// Synthetic: mean input tokens (uniform in [mean/2, 3·mean/2]).
    #[arg(long, default_value_t = 512)]
    pub input_mean: u32,
    /// Synthetic: mean output tokens.
    #[arg(long, default_value_t = 32)]
    pub output_mean: u32,
    /// Synthetic: shared-prefix groups (0 = none).
    #[arg(long, default_value_t = 8)]
    pub prefix_groups: u32,
    /// Synthetic: shared prefix length in tokens.
    #[arg(long, default_value_t = 384)]
    pub prefix_len: u32,

    /// Faults: `crash:SLOT@AT+DOWN`, `partition:A-B@AT+FOR` (node 0 = router),
    /// `slow:SLOT@AT+FORxK` (steps K times as long), `random:N` (crashes or partitions),
    /// `random-slow:N`; comma-separated, times in seconds.
    #[arg(long)]
    pub faults: Option<String>,
    /// Event-plane loss probability per message.
    #[arg(long, default_value_t = 0.0)]
    pub loss: f64,
    /// Probability that a message may overtake earlier ones on its link.
    #[arg(long, default_value_t = 0.0)]
    pub reorder: f64,
    /// Base one-way network latency (µs).
    #[arg(long, default_value_t = 200.0)]
    pub net_base_us: f64,
    /// Mean (exponential) or median (log-normal) jitter on top of the base (µs).
    #[arg(long, default_value_t = 50.0)]
    pub net_jitter_us: f64,
    #[arg(long, value_enum, default_value_t = JitterArg::Exponential)]
    pub jitter: JitterArg,
    /// Attempts per request: the first try plus client retries of a retryable refusal (no
    /// worker, or its worker was lost before the first token).
    #[arg(long, default_value_t = 3)]
    pub max_attempts: u32,

    /// Goodput SLO: time to first token (ms).
    #[arg(long, default_value_t = 2000.0)]
    pub slo_ttft_ms: f64,
    /// Goodput SLO: mean inter-token latency (ms).
    #[arg(long, default_value_t = 200.0)]
    pub slo_itl_ms: f64,

    /// Write the report(s) as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write an SVG plot of latency over time here (first policy when comparing).
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Write the report's plots into this folder (created if missing), as SVG:
    /// `latency.svg` (TTFT and end-to-end against arrival), `ttft_cdf.svg`, `itl_cdf.svg`,
    /// `e2e_cdf.svg` (one line per policy when comparing), `queue.svg` (requests in flight
    /// and waiting for their first token over time) and `replicas.svg` (workers provisioned
    /// over time: the planner's, or `--workers` all along), of the first run.
    #[arg(long)]
    pub plots: Option<PathBuf>,
    /// Calibration (`turbine sim` only, not the stand-alone example): measure the engine
    /// (`turbine profile`, unless --validate-profile), run this workload against a real
    /// `turbine up` cluster on this machine, then through the simulator with the measured
    /// profile, and print TTFT, ITL and end-to-end p50/p90 side by side with the error.
    /// Keep the workload small: the real side runs in real time. `--json` writes the
    /// comparison, `--plots` real-against-simulated CDFs.
    #[arg(long)]
    pub validate: bool,
    /// With --validate: the profile to simulate with (measured earlier on this machine),
    /// instead of measuring one first.
    #[arg(long, requires = "validate")]
    pub validate_profile: Option<PathBuf>,
    /// With --validate: the cluster file `turbine up -f` serves (its first worker group is
    /// profiled; --workers must be its number of workers). Default: the default model on
    /// CPU, one worker.
    #[arg(long, requires = "validate")]
    pub validate_cluster: Option<PathBuf>,
    /// Write the full event log (one line per event) here.
    #[arg(long)]
    pub event_log: Option<PathBuf>,

    /// Size the fleet with the planner of this cluster file's `planner:` section (its
    /// connector is replaced by the simulator's; `--workers` is the starting size). The
    /// planner reads `--profile`, the engine the run simulates.
    #[arg(long)]
    pub planner: Option<PathBuf>,
    /// Simulated start-up time of a worker the planner adds (seconds).
    #[arg(long, default_value_t = 10.0)]
    pub planner_startup_s: f64,
    /// Write the planner's decisions here as CSV: time, observed and forecast requests per
    /// interval, target and provisioned workers.
    #[arg(long)]
    pub planner_log: Option<PathBuf>,
}

fn parse_policy(name: &str) -> Result<PolicyKind, String> {
    PolicyKind::parse(name).ok_or_else(|| format!("{name:?}: expected kv, round-robin or random"))
}

/// The workload the arguments describe.
pub fn build_workload(args: &SimArgs) -> anyhow::Result<Vec<RequestSpec>> {
    let seeds = SeedSplitter::new(args.seed);
    let duration = args.duration_s.map(SimTime::from_secs_f64);
    match &args.trace {
        Some(path) => {
            let trace = load_trace(path, args.trace_format)?;
            Ok(reshape(&trace, args.time_scale, duration))
        }
        None => {
            let num_requests = match args.duration_s {
                Some(d) => (d * args.rate).ceil().max(1.0) as usize,
                None => args.requests,
            };
            let syn = Synthetic {
                num_requests,
                rate: args.rate,
                arrival: args.arrival,
                burst_factor: 4.0,
                input_mean: args.input_mean,
                output_mean: args.output_mean,
                prefix_groups: args.prefix_groups,
                prefix_len: args.prefix_len,
            };
            Ok(syn.generate(&seeds))
        }
    }
}

/// The run configuration the arguments describe, for `workload`.
pub fn build_config(args: &SimArgs, workload: &[RequestSpec]) -> anyhow::Result<SimConfig> {
    let profile = crate::profile::load(&args.profile)?;
    let seeds = SeedSplitter::new(args.seed);
    let span = workload.last().map(|r| r.arrival).unwrap_or_default();
    let mut cfg = SimConfig::new(args.seed, args.workers, profile);
    cfg.policy = args.router;
    cfg.max_attempts = args.max_attempts.max(1);
    cfg.keep_event_log = args.event_log.is_some();
    cfg.net = NetConfig {
        base_us: args.net_base_us,
        jitter_mean_us: args.net_jitter_us,
        jitter: match args.jitter {
            JitterArg::Exponential => JitterKind::Exponential,
            JitterArg::Lognormal => JitterKind::LogNormal,
        },
        loss: args.loss.clamp(0.0, 1.0),
        reorder: args.reorder.clamp(0.0, 1.0),
        bulk_bytes_per_s: (args.link_gbps * 1e9 / 8.0).max(1.0),
        ..NetConfig::default()
    };
    cfg.disagg.remote_prefill_min_tokens = args.remote_prefill_min_tokens;
    if let Some(spec) = &args.faults {
        cfg.faults = FaultPlan::parse(spec, &seeds, args.workers, span)?;
    }
    if let Some(path) = &args.planner {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let file: turbine_actors::cluster_config::ClusterConfig =
            serde_yaml::from_str(&text).with_context(|| format!("in {}", path.display()))?;
        let config = file
            .planner
            .with_context(|| format!("{}: no planner: section", path.display()))?;
        cfg.planner = Some(crate::run::SimPlanner {
            config,
            startup_delay: SimDuration::from_secs_f64(args.planner_startup_s.max(0.0)),
        });
    }
    Ok(cfg)
}

/// Runs the simulation(s) the arguments ask for and returns the reports.
pub fn run(args: &SimArgs) -> anyhow::Result<Vec<(Report, SimOutcome)>> {
    let workload = build_workload(args)?;
    let base = build_config(args, &workload)?;
    let slo = Slo {
        ttft_ms: args.slo_ttft_ms,
        itl_ms: args.slo_itl_ms,
    };
    let policies = if args.compare_routers {
        PolicyKind::ALL.to_vec()
    } else {
        vec![args.router]
    };
    let mut out = Vec::new();
    if let (Some(p), Some(d)) = (args.prefill_workers, args.decode_workers) {
        // Aggregated vs disaggregated on as many workers, same workload.
        for (prefill, label) in [(0, "aggregated".to_string()), (p, format!("{p}P+{d}D"))] {
            let mut cfg = base.clone();
            cfg.workers = p + d;
            cfg.prefill_workers = prefill;
            let outcome = simulate(&cfg, &workload)?;
            let policy = format!("{} {label}", args.router.as_str());
            let report = Report::build(&outcome, args.seed, &policy, &cfg.profile.name, slo);
            out.push((report, outcome));
        }
        return Ok(out);
    }
    for p in policies {
        let mut cfg = base.clone();
        cfg.policy = p;
        let outcome = simulate(&cfg, &workload)?;
        let report = Report::build(&outcome, args.seed, p.as_str(), &cfg.profile.name, slo);
        out.push((report, outcome));
    }
    Ok(out)
}

/// `turbine sim`: runs, prints the table(s), writes the requested files. Fails (after
/// printing) when an invariant was violated, naming the seed to replay.
pub fn run_cli(args: SimArgs) -> anyhow::Result<()> {
    if args.validate {
        bail!("--validate starts a real cluster: run it as `turbine sim --validate ...`");
    }
    if let Some(count) = args.seeds {
        let summary = crate::campaign::run_campaign(&args, count);
        print!("{}", summary.report(&args));
        if !summary.failing.is_empty() {
            bail!(
                "{} of {count} seeds violated an invariant",
                summary.failing.len()
            );
        }
        return Ok(());
    }
    let runs = run(&args)?;
    for (r, o) in &runs {
        println!("{}", r.table());
        println!(
            "worker-hours {:.4} ({} at start{})",
            o.worker_seconds(args.workers) / 3600.0,
            args.workers,
            if o.planner.is_some() {
                ", planner-sized"
            } else {
                ", static"
            }
        );
    }
    if let (Some(path), Some((_, o))) = (&args.planner_log, runs.first()) {
        std::fs::write(path, planner_csv(o))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if runs.len() > 1 {
        println!("{}", comparison_table(runs.iter().map(|(r, _)| r)));
    }
    if let Some(path) = &args.json {
        let reports: Vec<&Report> = runs.iter().map(|(r, _)| r).collect();
        let text = if reports.len() == 1 {
            serde_json::to_string_pretty(reports[0])?
        } else {
            serde_json::to_string_pretty(&reports)?
        };
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    if let (Some(path), Some((r, o))) = (&args.svg, runs.first()) {
        let title = format!(
            "{} router, {} workers, seed {}",
            r.policy, r.workers, r.seed
        );
        std::fs::write(path, latency_svg(o, &title))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(dir) = &args.plots {
        write_plots(dir, &runs, args.workers)?;
    }
    if let (Some(path), Some((_, o))) = (&args.event_log, runs.first()) {
        let mut text = String::new();
        for l in o.event_log_lines.as_deref().unwrap_or(&[]) {
            let _ = writeln!(text, "{l}");
        }
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    let bad: Vec<&Report> = runs
        .iter()
        .map(|(r, _)| r)
        .filter(|r| !r.invariant_violations.is_empty())
        .collect();
    if let Some(r) = bad.first() {
        bail!("invariants violated under policy {}; replay with `turbine sim --seed {} ...` (same arguments)", r.policy, r.seed);
    }
    Ok(())
}

/// The report's plots (see `--plots`) of `runs` into `dir`.
pub fn write_plots(
    dir: &std::path::Path,
    runs: &[(Report, SimOutcome)],
    workers: u32,
) -> anyhow::Result<()> {
    let Some((r, o)) = runs.first() else {
        return Ok(());
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let title = format!(
        "{} router, {} workers, seed {}",
        r.policy, r.workers, r.seed
    );
    let lat: Vec<(String, plot::Latencies)> = runs
        .iter()
        .map(|(r, o)| (r.policy.clone(), plot::Latencies::of(o)))
        .collect();
    let named: Vec<(&str, &plot::Latencies)> = lat.iter().map(|(n, l)| (n.as_str(), l)).collect();
    let [ttft, itl, e2e] = plot::latency_cdfs(&format!("seed {}", r.seed), &named);
    for (name, text) in [
        ("latency.svg", latency_svg(o, &title)),
        ("ttft_cdf.svg", ttft),
        ("itl_cdf.svg", itl),
        ("e2e_cdf.svg", e2e),
        ("queue.svg", plot::queue_svg(o, &title)),
        ("replicas.svg", plot::replicas_svg(o, workers, &title)),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    println!("plots written to {}", dir.display());
    Ok(())
}

/// Side-by-side TTFT and hit rates of several runs (markdown).
pub fn comparison_table<'a>(reports: impl Iterator<Item = &'a Report>) -> String {
    let mut s = String::from("| policy | TTFT p50 ms | TTFT p99 ms | E2E p50 ms | prefix hit rate | goodput req/s |\n|---|---|---|---|---|---|\n");
    for r in reports {
        let _ = writeln!(
            s,
            "| {} | {:.1} | {:.1} | {:.1} | {:.1}% | {:.2} |",
            r.policy,
            r.ttft_ms.p50,
            r.ttft_ms.p99,
            r.e2e_ms.p50,
            100.0 * r.prefix_hit_rate,
            r.goodput_rps
        );
    }
    s
}

/// The planner's decisions of a run as CSV (see `--planner-log`): one row per interval and
/// per reaction (`reaction` 1, load columns empty); per-pool targets when disaggregated;
/// then the SLA math behind each target: the requests per interval and lengths it sized for
/// (a reaction's included), the prefill demand (tokens/s), each side's fractional need, the
/// decode batch of its operating point and the two correction factors.
pub fn planner_csv(o: &SimOutcome) -> String {
    let mut s = String::from(
        "t_s,observed_requests,forecast_requests,target_workers,provisioned_workers,reaction,target_prefill,target_decode,\
         sized_requests,isl,osl,prefill_demand_tps,need_prefill,need_decode,decode_batch,correction_prefill,correction_decode\n",
    );
    for d in o.planner.iter().flat_map(|p| &p.decisions) {
        // A reaction (between intervals) observed no interval: its load columns are empty.
        let tick = d.reaction.is_none();
        let (prefill, decode) = match d.target {
            Replicas::Disaggregated { prefill, decode } => {
                (prefill.to_string(), decode.to_string())
            }
            Replicas::Aggregated { .. } => (String::new(), String::new()),
        };
        let opt = |v: Option<f64>| v.map(|v| format!("{v:.3}")).unwrap_or_default();
        let _ = writeln!(
            s,
            "{:.3},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{:.3},{:.3}",
            d.at.as_secs_f64(),
            if tick {
                d.observed.requests.to_string()
            } else {
                String::new()
            },
            d.forecast
                .filter(|_| tick)
                .map(|f| format!("{:.3}", f.requests))
                .unwrap_or_default(),
            d.target.total(),
            d.applied.map(|r| r.total().to_string()).unwrap_or_default(),
            u8::from(!tick),
            prefill,
            decode,
            opt(d.forecast.map(|f| f.requests)),
            opt(d.forecast.map(|f| f.isl)),
            opt(d.forecast.map(|f| f.osl)),
            opt(d.prefill.map(|p| p.demand_tokens_per_s)),
            opt(d.prefill.map(|p| p.workers)),
            opt(d.decode.map(|n| n.workers)),
            d.decode
                .map(|n| n.point.batch.to_string())
                .unwrap_or_default(),
            d.corrections.prefill,
            d.corrections.decode,
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Parser, Subcommand};

    /// The lead's CLI embeds `SimArgs` as `turbine sim ...`; this checks that shape works.
    #[derive(Parser)]
    struct Top {
        #[command(subcommand)]
        cmd: Cmd,
    }

    #[derive(Subcommand)]
    enum Cmd {
        Sim(SimArgs),
    }

    #[test]
    fn sim_args_work_as_a_subcommand() {
        let Top { cmd: Cmd::Sim(a) } = Top::parse_from([
            "turbine",
            "sim",
            "--seed",
            "9",
            "--router",
            "round-robin",
            "--compare-routers",
        ]);
        assert_eq!(
            (a.seed, a.router, a.compare_routers),
            (9, PolicyKind::RoundRobin, true)
        );
    }
}
