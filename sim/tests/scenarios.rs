//! Whole runs on larger or shipped workloads: failures without retries, the sample traces,
//! and the KV policy against round robin. (Determinism and the 100-seed fault sweep are in
//! `shells.rs`.)

use crate::common;

use clap::Parser;
use common::{tiny_profile, workload};
use turbine_actors::router::PolicyKind;
use turbine_sim::faults::FaultPlan;
use turbine_sim::rng::SeedSplitter;
use turbine_sim::time::SimTime;
use turbine_sim::{build_config, build_workload, simulate, Outcome, SimArgs, SimConfig};

/// Two workers, 40 requests, worker 1 crashing at 0.3 s for 1 s; no client retries.
fn crash_run(migration_limit: u32) -> turbine_sim::SimOutcome {
    let wl = workload(2, 40);
    let mut cfg = SimConfig::new(2, 2, tiny_profile());
    cfg.max_attempts = 1;
    cfg.migration.migration_limit = migration_limit;
    cfg.faults =
        FaultPlan::parse("crash:1@0.3+1", &SeedSplitter::new(2), 2, SimTime::ZERO).unwrap();
    simulate(&cfg, &wl).unwrap()
}

#[test]
fn without_retries_or_migration_a_crash_fails_its_requests_once_with_an_error() {
    let o = crash_run(0);
    assert!(
        o.invariant_violations.is_empty(),
        "{:?}",
        o.invariant_violations
    );
    let failed = o
        .requests
        .iter()
        .filter(|r| matches!(r.outcome, Some(Outcome::Failed(_))))
        .count();
    assert!(failed > 0);
    assert!(o.requests.iter().all(|r| r.resolutions == 1));
}

#[test]
fn with_migration_a_crash_loses_no_request_and_changes_no_token() {
    let o = crash_run(3);
    // The invariants include: each completed request's tokens equal its fault-free tokens.
    assert!(
        o.invariant_violations.is_empty(),
        "{:?}",
        o.invariant_violations
    );
    assert!(
        o.requests
            .iter()
            .all(|r| r.outcome == Some(Outcome::Completed)),
        "{:?}",
        o.requests.iter().map(|r| &r.outcome).collect::<Vec<_>>()
    );
    let migrated = o.requests.iter().filter(|r| r.migrations > 0).count();
    assert!(migrated > 0, "the crash interrupted no stream");
}

#[test]
fn shipped_sample_traces_replay_cleanly() {
    for (trace, shared) in [("mooncake_sample.jsonl", true), ("azure_sample.csv", false)] {
        let path = format!("{}/traces/{trace}", env!("CARGO_MANIFEST_DIR"));
        let args = SimArgs::parse_from([
            "sim",
            "--trace",
            &path,
            "--workers",
            "4",
            "--profile",
            "llama3-8b-h100",
        ]);
        let wl = build_workload(&args).unwrap();
        assert_eq!(wl.len(), 300, "{trace}");
        let wl = &wl[..60];
        let o = simulate(&build_config(&args, wl).unwrap(), wl).unwrap();
        assert!(
            o.invariant_violations.is_empty(),
            "{trace}: {:?}",
            o.invariant_violations
        );
        assert!(o
            .requests
            .iter()
            .all(|r| r.outcome == Some(Outcome::Completed)));
        let hits: u64 = o.workers.iter().map(|w| w.prefix_hit_tokens).sum();
        assert_eq!(hits > 0, shared, "{trace}: prefix hits {hits}");
    }
}

#[test]
fn kv_routing_weighs_queued_work_so_hot_prefixes_do_not_pile_up() {
    // 64 long shared prefixes, 16 workers near capacity. The KV policy sends a request where
    // its prefix is cached unless that worker is loaded; when load counted only the blocks
    // running requests hold, a hot prefix's holder kept winning while its queue grew (kv p99
    // TTFT 408 ms against round-robin's 312 ms). Load now includes the queue's blocks.
    let args = SimArgs::parse_from(
        "sim --seed 42 --workers 16 --profile llama3-8b-h100 --requests 2000 --rate 40 \
         --input-mean 4096 --output-mean 64 --prefix-groups 64 --prefix-len 3584"
            .split_whitespace(),
    );
    let wl = build_workload(&args).unwrap();
    let slo = turbine_sim::Slo {
        ttft_ms: 2000.0,
        itl_ms: 200.0,
    };
    let mut ttft = Vec::new();
    for policy in [PolicyKind::Kv, PolicyKind::RoundRobin] {
        let mut cfg = build_config(&args, &wl).unwrap();
        cfg.policy = policy;
        let o = simulate(&cfg, &wl).unwrap();
        assert!(o.invariant_violations.is_empty());
        let r = turbine_sim::Report::build(&o, 42, policy.as_str(), "llama3-8b-h100", slo);
        ttft.push((r.ttft_ms.p50, r.ttft_ms.p99, r.prefix_hit_rate));
    }
    let ((kv50, kv99, kv_hit), (rr50, rr99, rr_hit)) = (ttft[0], ttft[1]);
    assert!(kv_hit > rr_hit + 0.1, "hit rate {kv_hit} vs {rr_hit}");
    assert!(kv50 < 0.85 * rr50, "TTFT p50 {kv50} vs {rr50}");
    // Through the real nodes kv's p99 sits 12 % above round-robin's (348 vs 311 ms at the
    // move off the discrete-event core, which had them level); the regression this guards
    // was 31 % above (408 vs 312 ms).
    assert!(kv99 < 1.2 * rr99, "TTFT p99 {kv99} vs {rr99}");
}

/// Two workers, 40 requests; worker 1's steps are `factor` times as long from 0.2 s for 2 s,
/// while its heartbeats and load reports go on; no client retries.
fn slow_run(factor: u32) -> turbine_sim::SimOutcome {
    let wl = workload(2, 40);
    let mut cfg = SimConfig::new(2, 2, tiny_profile());
    cfg.max_attempts = 1;
    let spec = format!("slow:1@0.2+2x{factor}");
    cfg.faults = FaultPlan::parse(&spec, &SeedSplitter::new(2), 2, SimTime::ZERO).unwrap();
    simulate(&cfg, &wl).unwrap()
}

#[test]
fn a_stuck_worker_that_still_heartbeats_loses_no_request_a_slow_one_keeps_its_streams() {
    for (factor, expect_migrations) in [(4, false), (20_000, true)] {
        let o = slow_run(factor);
        assert!(
            o.invariant_violations.is_empty(),
            "x{factor}: {:?}",
            o.invariant_violations
        );
        assert!(
            o.requests
                .iter()
                .all(|r| r.outcome == Some(Outcome::Completed)),
            "x{factor}: {:?}",
            o.requests.iter().map(|r| &r.outcome).collect::<Vec<_>>()
        );
        let migrated = o.requests.iter().filter(|r| r.migrations > 0).count();
        // Slow but moving: its streams stay. Stuck past the liveness bound (its steps take
        // seconds, its reports keep coming): they move, with their exact tokens.
        assert_eq!(
            migrated > 0,
            expect_migrations,
            "x{factor}: {migrated} migrated"
        );
        assert_eq!(o.leases_expired, 0, "x{factor}: its lease stayed valid");
    }
}

/// One worker whose link to the frontend is cut from 0.3 s for 2 s: its load reports stop
/// (events are dropped) and its streams go quiet past the 1 s liveness timeout, while its
/// 6 s lease holds. With no other worker to move them to, its streams wait for the link
/// instead of failing; what was sent during the cut arrives after it (held, like TCP).
#[test]
fn a_quiet_sole_worker_keeps_its_streams_instead_of_failing_them() {
    let wl = turbine_sim::workload::Synthetic {
        num_requests: 8,
        rate: 80.0,
        input_mean: 96,
        output_mean: 400,
        prefix_groups: 0,
        ..turbine_sim::workload::Synthetic::default()
    }
    .generate(&SeedSplitter::new(3));
    let mut cfg = SimConfig::new(3, 1, tiny_profile());
    cfg.max_attempts = 1;
    cfg.lease = turbine_sim::time::SimDuration::from_millis(6_000);
    cfg.migration.liveness_timeout_ms = 1_000;
    cfg.faults = FaultPlan::parse(
        "partition:0-1@0.3+2",
        &SeedSplitter::new(3),
        1,
        SimTime::ZERO,
    )
    .unwrap();
    let o = simulate(&cfg, &wl).unwrap();
    // Every completed stream has all its tokens, in order, none twice.
    assert!(
        o.invariant_violations.is_empty(),
        "{:?}",
        o.invariant_violations
    );
    assert_eq!(o.leases_expired, 0, "the lease outlived the cut");
    let outcomes: Vec<_> = o.requests.iter().map(|r| &r.outcome).collect();
    assert!(
        outcomes.iter().all(|r| **r == Some(Outcome::Completed)),
        "{outcomes:?}"
    );
    assert!(
        o.requests.iter().all(|r| r.migrations == 0),
        "nothing to migrate to"
    );
    // Streams that had tokens before the cut and got the rest after it.
    let (cut_start, cut_end) = (SimTime::from_millis(300), SimTime::from_millis(2_300));
    let across = o
        .requests
        .iter()
        .filter(|r| {
            r.token_times.first().is_some_and(|t| *t < cut_start)
                && r.token_times.last().is_some_and(|t| *t > cut_end)
        })
        .count();
    assert!(
        across > 0,
        "some streams were open across the cut: {:?}",
        o.requests.iter().map(|r| r.finished).collect::<Vec<_>>()
    );
}
