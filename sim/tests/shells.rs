//! The simulator's runs (turbine's real nodes on paused time): determinism of the event log,
//! and the settled-state invariants with and without faults.

use crate::common;

use common::{
    assert_seed_determines_log, fault_args, faulty_config, run_fault_seed, tiny_profile, workload,
};
use turbine_sim::faults::FaultPlan;
use turbine_sim::network::NetConfig;
use turbine_sim::rng::SeedSplitter;
use turbine_sim::time::SimTime;
use turbine_sim::{simulate, Outcome, SimConfig};

#[test]
fn a_quiet_run_completes_every_request_through_the_real_shells() {
    let wl = workload(3, 30);
    let mut cfg = faulty_config(3, &wl, "");
    cfg.net = NetConfig::default();
    let out = simulate(&cfg, &wl).unwrap();
    assert!(
        out.invariant_violations.is_empty(),
        "{:?}",
        out.invariant_violations
    );
    for (i, r) in out.requests.iter().enumerate() {
        assert_eq!(r.outcome, Some(Outcome::Completed), "request {i}");
        assert_eq!(r.token_times.len(), r.max_tokens as usize);
    }
    let steps: u64 = out.workers.iter().map(|w| w.steps).sum();
    assert!(steps > 0);
    let hits: u64 = out.workers.iter().map(|w| w.prefix_hit_tokens).sum();
    assert!(hits > 0, "shared prefixes should hit the workers' caches");
}

/// The simulated clients cap `max_tokens` by the context as the HTTP frontend does: a
/// prompt of 140 tokens asking for 484 in the tiny profile's 512-token context gets 372 (the
/// worker would end it there anyway), and a prompt that fills the context is refused.
#[test]
fn a_request_longer_than_the_context_gets_what_fits_and_a_full_prompt_is_refused() {
    let spec = |input_len| turbine_sim::workload::RequestSpec {
        arrival: SimTime::ZERO,
        input_len,
        output_len: 484,
        chunk_ids: Vec::new(),
        chunk_tokens: 16,
    };
    let wl = vec![spec(140), spec(512)];
    let cfg = SimConfig::new(5, 1, tiny_profile());
    let out = simulate(&cfg, &wl).unwrap();
    assert!(
        out.invariant_violations.is_empty(),
        "{:?}",
        out.invariant_violations
    );
    let fits = &out.requests[0];
    assert_eq!(fits.outcome, Some(Outcome::Completed));
    assert_eq!((fits.max_tokens, fits.token_times.len()), (372, 372));
    match &out.requests[1].outcome {
        Some(Outcome::Failed(e)) => assert!(e.contains("maximum context length is 512"), "{e}"),
        other => panic!("a prompt filling the context must be refused: {other:?}"),
    }
}

#[test]
fn same_seed_same_event_log_and_different_seed_differs() {
    let wl = workload(11, 30);
    assert_seed_determines_log(simulate, &wl, faulty_config(11, &wl, "random:2"));
}

#[test]
fn requests_after_a_crash_go_to_the_live_worker_without_waiting_for_the_lease() {
    // Worker 1 dies at 0.3 s for 5 s; its lease (1 s) keeps it in discovery until ~1.3 s.
    // A request that finds its connection gone migrates (before or after its first token)
    // and the dispatcher stops routing there, so every request completes, none needing a
    // client retry or more than one migration.
    let wl = workload(2, 40);
    let mut cfg = SimConfig::new(2, 2, tiny_profile());
    cfg.faults =
        FaultPlan::parse("crash:1@0.3+5", &SeedSplitter::new(2), 2, SimTime::ZERO).unwrap();
    let o = simulate(&cfg, &wl).unwrap();
    assert!(
        o.invariant_violations.is_empty(),
        "{:?}",
        o.invariant_violations
    );
    assert_eq!(o.workers[0].crashes, 1);
    for (i, r) in o.requests.iter().enumerate() {
        assert_eq!(r.outcome, Some(Outcome::Completed), "request {i}");
        assert_eq!(r.attempts, 1, "request {i} needed a client retry");
        assert!(
            r.migrations <= 1,
            "request {i} migrated {} times",
            r.migrations
        );
    }
    assert!(
        o.requests.iter().any(|r| r.migrations == 1),
        "the crash should be noticed"
    );
}

#[test]
fn invariants_hold_under_random_faults_for_100_seeds() {
    let mut failures = Vec::new();
    let (mut dropped, mut crashes, mut retried, mut failed) = (0, 0, 0, 0);
    for seed in 0..100u64 {
        let (o, failure) = run_fault_seed(seed, &fault_args(seed, ""), simulate);
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
