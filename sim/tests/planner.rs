//! The planner in the simulator: the real planner shell sizing the simulated fleet through
//! the simulator's connector. Same seed, same decisions; and the fleet follows a surge up
//! and back down without failing a request.

use clap::Parser;
use turbine_sim::{build_config, build_workload, simulate, Outcome, SimArgs};

fn run(seed: u64) -> turbine_sim::SimOutcome {
    let planner = concat!(env!("CARGO_MANIFEST_DIR"), "/planner/kalman.yaml");
    let args = SimArgs::parse_from([
        "sim",
        "--seed",
        &seed.to_string(),
        "--workers",
        "1",
        "--arrival",
        "surges",
        "--rate",
        "3",
        "--duration-s",
        "150",
        "--planner",
        planner,
        "--planner-startup-s",
        "5",
    ]);
    let workload = build_workload(&args).unwrap();
    let cfg = build_config(&args, &workload).unwrap();
    simulate(&cfg, &workload).unwrap()
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
    assert!(
        provisioned.iter().rev().take(2).any(|&n| n < peak),
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
