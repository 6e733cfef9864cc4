//! `turbine profile` from the command line: it measures the default model on CPU over a tiny
//! grid and writes a profile that the planner and the simulator both read.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;
use turbine_actors::engine_profile::Profile;
use turbine_actors::planner::{IntervalMetrics, Planner, PlannerConfig, Replicas};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("turbine-cli-profile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn turbine(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_turbine"))
        .args(args)
        .output()
        .expect("running turbine")
}

#[test]
fn turbine_profile_writes_a_profile_the_planner_and_the_simulator_read() {
    let out_path = scratch("tiny.yaml");
    let out_arg = out_path.to_str().unwrap();
    // Tiny grid: 2 prefill lengths, 2 × 2 decode points, one timed run each.
    let out = turbine(&[
        "profile",
        "--no-fetch",
        "--prefill-lengths",
        "16,8",
        "--batches",
        "1,2",
        "--contexts",
        "16,32",
        "--repeats",
        "1",
        "-o",
        out_arg,
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "turbine profile failed: {stdout}\n{}\n(is the default model fetched? run \
         scripts/setup-test-deps.sh)",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(&format!("wrote {out_arg}")), "{stdout}");

    let profile = Profile::from_file(&out_path).expect("the written profile parses");
    assert!(!profile.placeholder);
    let m = profile.measured.as_ref().expect("measured tables");
    assert_eq!(m.device, "cpu");
    let lengths: Vec<usize> = m.prefill.iter().map(|p| p.prompt_tokens).collect();
    assert_eq!(lengths, vec![8, 16], "sorted");
    let grid: Vec<(usize, usize)> = m.decode.iter().map(|d| (d.batch, d.context)).collect();
    assert_eq!(grid, vec![(1, 16), (1, 32), (2, 16), (2, 32)]);
    assert!(m.prefill.iter().all(|p| p.time_ms > 0.0));
    assert!(m.decode.iter().all(|d| d.itl_ms > 0.0));

    // The planner sizes pools from it.
    let cfg = PlannerConfig {
        profile: out_arg.to_string(),
        ttft_ms: 60_000.0,
        itl_ms: 60_000.0,
        ..PlannerConfig::default()
    };
    let mut planner =
        Planner::new(&cfg, profile, Replicas::Aggregated { workers: 1 }).expect("a planner");
    planner.observe(
        Duration::from_secs(30),
        &IntervalMetrics {
            requests: 30,
            mean_isl: Some(16.0),
            mean_osl: Some(8.0),
            ..IntervalMetrics::default()
        },
    );
    let decision = planner.decide(Duration::from_secs(30));
    assert!(decision.forecast.is_some() && decision.replicas.total() >= 1);

    // And the simulator prices steps with it.
    let out = turbine(&[
        "sim",
        "--profile",
        out_arg,
        "--workers",
        "1",
        "--requests",
        "5",
        "--input-mean",
        "16",
        "--output-mean",
        "4",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "turbine sim failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("invariants: ok"), "{stdout}");
}

#[test]
fn a_grid_larger_than_the_kv_pool_is_refused_with_the_reason() {
    let out = turbine(&[
        "profile",
        "--no-fetch",
        "--batches",
        "4096",
        "--contexts",
        "64",
        "-o",
        scratch("never.yaml").to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("do not fit the KV pool"), "{stderr}");
}

#[test]
fn turbine_up_refuses_a_planner_whose_profile_is_missing_naming_the_field() {
    let file = scratch("planner-cluster.yaml");
    std::fs::write(&file, "planner: {profile: p.yaml}\n").unwrap();
    let out = turbine(&["up", "--no-fetch", "-f", file.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("planner.profile") && stderr.contains("p.yaml"),
        "{stderr}"
    );
}

#[test]
fn turbine_up_refuses_a_long_prefill_share_out_of_range_naming_the_field() {
    for bad in ["0", "1.5"] {
        let file = scratch(&format!("share-{bad}.yaml"));
        std::fs::write(
            &file,
            format!("workers:\n  - {{role: aggregated, replicas: 1, long_prefill_share: {bad}}}\n"),
        )
        .unwrap();
        let out = turbine(&["up", "--no-fetch", "-f", file.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            stderr.contains("long_prefill_share must be more than 0 and at most 1"),
            "{stderr}"
        );
    }
}

/// `turbine sim --validate` on a tiny workload: it profiles the engine, replays the requests
/// against a real `turbine up` child and through the simulator, and compares. The bound is
/// loose (CI machines are shared and the workload is tiny); docs/SIMULATOR.md has the
/// figures of a real calibration run.
#[test]
fn turbine_sim_validate_compares_a_real_cluster_with_the_simulator() {
    let json = scratch("validate.json");
    let plots = scratch("validate-plots");
    let out = turbine(&[
        "sim",
        "--validate",
        "--workers",
        "1",
        "--requests",
        "4",
        "--rate",
        "4",
        "--input-mean",
        "16",
        "--output-mean",
        "4",
        "--prefix-groups",
        "0",
        "--seed",
        "3",
        "--json",
        json.to_str().unwrap(),
        "--plots",
        plots.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "turbine sim --validate failed: {stdout}\n{}\n(is the default model fetched? run \
         scripts/setup-test-deps.sh)",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("| TTFT |") && stdout.contains("| E2E |"),
        "{stdout}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["requests"], 4);
    assert_eq!(v["real_failed"], 0, "{v}");
    assert_eq!(v["sim_failed"], 0, "{v}");
    for row in v["rows"].as_array().unwrap() {
        for side in ["real_p50_ms", "sim_p50_ms", "real_p90_ms", "sim_p90_ms"] {
            let ms = row[side].as_f64().unwrap_or(f64::NAN);
            assert!(ms > 0.0, "{side} of {row}");
        }
        // Loose: the simulator within a factor of ~3 of the real cluster at the median.
        let err = row["p50_error"].as_f64().unwrap();
        assert!(err.abs() < 2.0, "p50 error of {row}");
    }
    for name in ["ttft_cdf.svg", "itl_cdf.svg", "e2e_cdf.svg"] {
        let svg = std::fs::read_to_string(plots.join(name)).unwrap();
        assert!(svg.starts_with("<svg"), "{name}");
    }
}
