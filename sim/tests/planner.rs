//! The planner in the simulator: the real planner shell sizing the simulated fleet through
//! the simulator's connector. Same seed, same decisions; and the fleet follows a surge up
//! and back down without failing a request, aggregated and with prefill and decode pools
//! sized separately.

use clap::Parser;
use turbine_actors::planner::Replicas;
use turbine_sim::{build_config, build_workload, simulate, Outcome, SimArgs};

fn run(seed: u64) -> turbine_sim::SimOutcome {
    run_pools(seed, 3, None)
}

/// Surges at 3 × `rate`; with `pools`, (prefill, decode) workers at the start,
/// disaggregated.
fn run_pools(seed: u64, rate: u32, pools: Option<(u32, u32)>) -> turbine_sim::SimOutcome {
    let planner = test_planner();
    let planner = planner.to_str().unwrap();
    let args = SimArgs::parse_from([
        "sim",
        "--seed",
        &seed.to_string(),
        "--workers",
        "1",
        "--arrival",
        "surges",
        "--rate",
        &rate.to_string(),
        "--duration-s",
        "150",
        "--planner",
        planner,
        "--planner-startup-s",
        "5",
    ]);
    let workload = build_workload(&args).unwrap();
    let mut cfg = build_config(&args, &workload).unwrap();
    if let Some((p, d)) = pools {
        cfg.workers = p + d;
        cfg.prefill_workers = p;
        // Every prompt prefills remotely: the prefill pool has work of its own.
        cfg.disagg.remote_prefill_min_tokens = 1;
    }
    simulate(&cfg, &workload).unwrap()
}

/// The evaluation's `planner/kalman.yaml` with a 30 s cooldown: its own (120 s, the bursty
/// trace's period) would hold the fleet past the end of these 150 s runs.
fn test_planner() -> std::path::PathBuf {
    let dir = env!("CARGO_MANIFEST_DIR");
    let text = std::fs::read_to_string(format!("{dir}/planner/kalman.yaml")).unwrap();
    let cooldown = text
        .lines()
        .find(|l| l.trim_start().starts_with("cooldown_ms:"))
        .expect("a cooldown in kalman.yaml");
    let text = text
        .replace(cooldown, "  cooldown_ms: 30000")
        .replace("../profiles/", &format!("{dir}/profiles/"));
    let path =
        std::env::temp_dir().join(format!("turbine-sim-planner-{}.yaml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}

fn decision_lines(o: &turbine_sim::SimOutcome) -> Vec<String> {
    o.planner
        .as_ref()
        .expect("a planner ran")
        .decisions
        .iter()
        .map(|d| d.line())
        .collect()
}

#[test]
fn same_seed_same_planner_decisions_and_the_fleet_follows_the_surge() {
    let (a, b) = (run(7), run(7));
    let (da, db) = (decision_lines(&a), decision_lines(&b));
    assert!(da.len() >= 10, "{da:?}");
    assert_eq!(da, db, "same seed, different decisions");
    assert_eq!(a.event_log_hash, b.event_log_hash);

    let provisioned: Vec<usize> = a
        .planner
        .as_ref()
        .unwrap()
        .decisions
        .iter()
        .filter_map(|d| d.applied.map(|r| r.total()))
        .collect();
    let peak = provisioned.iter().copied().max().unwrap();
    assert!(peak > 1, "the surge added workers: {provisioned:?}");
    let first_peak = provisioned.iter().position(|&n| n == peak).unwrap();
    assert!(
        provisioned[first_peak..].iter().any(|&n| n < peak),
        "the fleet shrank after the surge: {provisioned:?}"
    );
    assert!(
        a.invariant_violations.is_empty(),
        "{:?}",
        a.invariant_violations
    );
    let failed = a
        .requests
        .iter()
        .filter(|r| r.outcome != Some(Outcome::Completed))
        .count();
    assert_eq!(failed, 0, "requests failed while the fleet changed");
}

#[test]
fn prefill_and_decode_pools_are_sized_separately_and_the_same_seed_decides_the_same() {
    // Surges at 15 req/s: one prefill and one decode worker serve the 9 req/s of the
    // aggregated test's surges within target (the planner rightly keeps them), not these.
    let (a, b) = (run_pools(7, 5, Some((1, 1))), run_pools(7, 5, Some((1, 1))));
    let (da, db) = (decision_lines(&a), decision_lines(&b));
    assert_eq!(da, db, "same seed, different decisions");
    assert_eq!(a.event_log_hash, b.event_log_hash);
    let pools: Vec<(usize, usize)> = a
        .planner
        .as_ref()
        .unwrap()
        .decisions
        .iter()
        .filter_map(|d| match d.applied {
            Some(Replicas::Disaggregated { prefill, decode }) => Some((prefill, decode)),
            _ => None,
        })
        .collect();
    assert_eq!(
        pools.len(),
        da.len(),
        "every decision sized both pools: {da:?}"
    );
    let peak_prefill = pools.iter().map(|p| p.0).max().unwrap();
    let peak_decode = pools.iter().map(|p| p.1).max().unwrap();
    assert!(
        peak_prefill > 1 || peak_decode > 1,
        "the surge grew a pool: {pools:?}"
    );
    assert!(
        pools.iter().any(|&(p, d)| p != d),
        "the pools moved separately: {pools:?}"
    );
    assert!(
        a.invariant_violations.is_empty(),
        "{:?}",
        a.invariant_violations
    );
    let failed = a
        .requests
        .iter()
        .filter(|r| r.outcome != Some(Outcome::Completed))
        .count();
    assert_eq!(failed, 0, "requests failed while the pools changed");
}
