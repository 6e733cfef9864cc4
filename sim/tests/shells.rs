//! The real actor shells on paused time (`turbine sim --actors`): determinism of the event
//! log, and the settled-state invariants with and without faults.

mod common;

use common::{
    assert_seed_determines_log, fault_args, faulty_config, run_fault_seed, tiny_profile, workload,
};
use turbine_sim::faults::FaultPlan;
use turbine_sim::network::NetConfig;
use turbine_sim::rng::SeedSplitter;
use turbine_sim::time::SimTime;
use turbine_sim::workload::Synthetic;
use turbine_sim::{simulate, simulate_actors, Outcome, Report, SimConfig, Slo};

#[test]
fn a_quiet_run_completes_every_request_through_the_real_shells() {
    let wl = workload(3, 30);
    let mut cfg = faulty_config(3, &wl, "");
    cfg.net = NetConfig::default();
    let out = simulate_actors(&cfg, &wl).unwrap();
    assert!(
        out.invariant_violations.is_empty(),
        "{:?}",
        out.invariant_violations
    );
    for (i, r) in out.requests.iter().enumerate() {
        assert_eq!(r.outcome, Some(Outcome::Completed), "request {i}");
        assert_eq!(r.token_times.len(), r.output_len as usize);
    }
    let steps: u64 = out.workers.iter().map(|w| w.steps).sum();
    assert!(steps > 0);
    let hits: u64 = out.workers.iter().map(|w| w.prefix_hit_tokens).sum();
    assert!(hits > 0, "shared prefixes should hit the workers' caches");
}

#[test]
fn same_seed_same_event_log_and_different_seed_differs() {
    let wl = workload(11, 30);
    assert_seed_determines_log(simulate_actors, &wl, faulty_config(11, &wl, "random:2"));
}

#[test]
fn requests_after_a_crash_go_to_the_live_worker_without_waiting_for_the_lease() {
    // Worker 1 dies at 0.3 s for 5 s; its lease (1 s) keeps it in discovery until ~1.3 s.
    // The first request that finds its connection gone is refused as retryable (503) and
    // the dispatcher stops routing there, so every request completes, none needing more
    // than one retry.
    let wl = workload(2, 40);
    let mut cfg = SimConfig::new(2, 2, tiny_profile());
    cfg.faults =
        FaultPlan::parse("crash:1@0.3+5", &SeedSplitter::new(2), 2, SimTime::ZERO).unwrap();
    let o = simulate_actors(&cfg, &wl).unwrap();
    assert!(
        o.invariant_violations.is_empty(),
        "{:?}",
        o.invariant_violations
    );
    assert_eq!(o.workers[0].crashes, 1);
    for (i, r) in o.requests.iter().enumerate() {
        assert_eq!(r.outcome, Some(Outcome::Completed), "request {i}");
        assert!(r.attempts <= 2, "request {i} took {} attempts", r.attempts);
    }
    assert!(
        o.requests.iter().any(|r| r.attempts == 2),
        "the crash should be noticed"
    );
}

#[test]
fn invariants_hold_under_random_faults_for_100_seeds() {
    let mut failures = Vec::new();
    let (mut dropped, mut crashes, mut retried, mut failed) = (0, 0, 0, 0);
    for seed in 0..100u64 {
        let (o, failure) = run_fault_seed(seed, &fault_args(seed, "--actors"), simulate_actors);
        dropped += o.net.dropped_loss + o.net.dropped_partition;
        crashes += o.workers.iter().map(|w| w.crashes).sum::<u32>();
        retried += o.requests.iter().filter(|r| r.attempts > 1).count();
        failed += o
            .requests
            .iter()
            .filter(|r| matches!(r.outcome, Some(Outcome::Failed(_))))
            .count();
        failures.extend(failure);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The scenario must actually exercise the fault paths.
    assert!(
        dropped > 0 && crashes > 0 && retried > 0,
        "{dropped} {crashes} {retried} {failed}"
    );
    println!("100 seeds: {dropped} events dropped, {crashes} crashes, {retried} requests retried, {failed} failed");
}

#[test]
fn the_shells_and_the_discrete_event_core_agree_on_a_quiet_run() {
    // Same workload, profile, router and seed, no faults: the two engines drive the same
    // scheduler and router logic, so latency and cache figures must come out close (they
    // differ only in message timing: the shells send real load reports and registrations).
    let wl = Synthetic {
        num_requests: 300,
        rate: 30.0,
        input_mean: 256,
        output_mean: 24,
        prefix_groups: 4,
        prefix_len: 128,
        ..Synthetic::default()
    }
    .generate(&SeedSplitter::new(9));
    let mut cfg = SimConfig::new(9, 4, turbine_sim::profile::load("smollm2-cpu").unwrap());
    cfg.net = NetConfig::default();
    let core = simulate(&cfg, &wl).unwrap();
    let shells = simulate_actors(&cfg, &wl).unwrap();
    let slo = Slo {
        ttft_ms: 2000.0,
        itl_ms: 200.0,
    };
    let a = Report::build(&core, 9, "kv", "smollm2-cpu", slo);
    let b = Report::build(&shells, 9, "kv", "smollm2-cpu", slo);
    assert_eq!((a.completed, b.completed), (300, 300));
    let close = |x: f64, y: f64, rel: f64| (x - y).abs() <= rel * x.abs().max(y.abs());
    assert!(
        close(a.ttft_ms.p50, b.ttft_ms.p50, 0.15),
        "TTFT p50 {} vs {}",
        a.ttft_ms.p50,
        b.ttft_ms.p50
    );
    assert!(
        close(a.e2e_ms.p50, b.e2e_ms.p50, 0.15),
        "E2E p50 {} vs {}",
        a.e2e_ms.p50,
        b.e2e_ms.p50
    );
    assert!(
        (a.prefix_hit_rate - b.prefix_hit_rate).abs() < 0.05,
        "hit rate {} vs {}",
        a.prefix_hit_rate,
        b.prefix_hit_rate
    );
}
