//! Scenario pieces shared by the simulator's integration tests.
#![allow(dead_code)]

use clap::Parser;
use turbine_sim::faults::FaultPlan;
use turbine_sim::network::NetConfig;
use turbine_sim::profile::Profile;
use turbine_sim::rng::SeedSplitter;
use turbine_sim::time::SimTime;
use turbine_sim::workload::{RequestSpec, Synthetic};
use turbine_sim::{build_config, build_workload, SimArgs, SimConfig, SimError, SimOutcome};

pub const TINY_PROFILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/profiles/tiny-test.yaml");

/// A small engine with a small KV pool, so preemption and eviction happen too.
pub fn tiny_profile() -> Profile {
    turbine_sim::profile::load(TINY_PROFILE).unwrap()
}

/// `n` short requests at 40/s in 3 shared-prefix groups.
pub fn workload(seed: u64, n: usize) -> Vec<RequestSpec> {
    Synthetic {
        num_requests: n,
        rate: 40.0,
        input_mean: 96,
        output_mean: 12,
        prefix_groups: 3,
        prefix_len: 64,
        ..Synthetic::default()
    }
    .generate(&SeedSplitter::new(seed))
}

/// 3 tiny workers on a lossy, reordering network, with the faults `spec` describes.
pub fn faulty_config(seed: u64, wl: &[RequestSpec], spec: &str) -> SimConfig {
    let mut cfg = SimConfig::new(seed, 3, tiny_profile());
    cfg.net = NetConfig {
        loss: 0.05,
        reorder: 0.1,
        jitter_mean_us: 300.0,
        ..NetConfig::default()
    };
    let span = wl.last().map(|r| r.arrival).unwrap_or(SimTime::ZERO);
    cfg.faults = FaultPlan::parse(spec, &SeedSplitter::new(seed), 3, span).unwrap();
    cfg
}

/// The arguments of the fault scenario, as `turbine sim` takes them (so a failing seed can be
/// replayed from the command line exactly); `extra` first (`--actors`, ...).
pub fn fault_args(seed: u64, extra: &str) -> Vec<String> {
    format!(
        "{extra} --seed {seed} --profile {TINY_PROFILE} --workers 3 --requests 24 --rate 40 \
         --input-mean 96 --output-mean 12 --prefix-groups 3 --prefix-len 64 --faults random:3 \
         --loss 0.05 --reorder 0.1 --net-jitter-us 300"
    )
    .split_whitespace()
    .map(String::from)
    .collect()
}

/// Runs the fault scenario for `seed` with `argv` (see [`fault_args`]) through `simulate`;
/// returns the outcome, and a line naming the command to replay when an invariant failed.
pub fn run_fault_seed(
    seed: u64,
    argv: &[String],
    simulate: impl Fn(&SimConfig, &[RequestSpec]) -> Result<SimOutcome, SimError>,
) -> (SimOutcome, Option<String>) {
    let args = SimArgs::parse_from(std::iter::once("sim".to_string()).chain(argv.iter().cloned()));
    let wl = build_workload(&args).unwrap();
    let cfg = build_config(&args, &wl).unwrap();
    let o = simulate(&cfg, &wl).unwrap();
    let failure = (!o.invariant_violations.is_empty()).then(|| {
        format!(
            "seed {seed}: replay with `turbine sim {}`: {:?}",
            argv.join(" "),
            o.invariant_violations
        )
    });
    (o, failure)
}

/// The determinism contract for one engine: `cfg` run twice gives the same event log (lines,
/// count and hash); with the next seed, another hash.
pub fn assert_seed_determines_log(
    simulate: impl Fn(&SimConfig, &[RequestSpec]) -> Result<SimOutcome, SimError>,
    wl: &[RequestSpec],
    mut cfg: SimConfig,
) {
    cfg.keep_event_log = true;
    let a = simulate(&cfg, wl).unwrap();
    let b = simulate(&cfg, wl).unwrap();
    assert!(a.event_log_lines.as_ref().is_some_and(|l| !l.is_empty()));
    assert_eq!(a.event_log_lines, b.event_log_lines);
    assert_eq!(a.event_log_hash, b.event_log_hash);
    assert_eq!(a.events, b.events);
    cfg.seed += 1;
    let c = simulate(&cfg, wl).unwrap();
    assert_ne!(a.event_log_hash, c.event_log_hash);
}
