//! `turbine sim` from the command line: the subcommand is wired, deterministic for a seed,
//! and writes the JSON report it is asked for.

use std::process::Command;

fn sim(args: &[&str]) -> (String, serde_json::Value) {
    let dir = std::env::temp_dir().join(format!(
        "turbine-cli-sim-{}-{}",
        std::process::id(),
        args.join("_").replace(['/', ' '], "")
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("report.json");
    let out = Command::new(env!("CARGO_BIN_EXE_turbine"))
        .arg("sim")
        .args(args)
        .arg("--json")
        .arg(&json)
        .output()
        .expect("running turbine sim");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "turbine sim failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = std::fs::read_to_string(&json).expect("the --json report");
    (stdout, serde_json::from_str(&report).expect("valid JSON"))
}

fn log_hash(stdout: &str) -> String {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("event log hash "))
        .expect("the table names the event log hash")
        .trim()
        .to_string()
}

#[test]
fn turbine_sim_runs_deterministically_and_writes_a_json_report() {
    let base = ["--workers", "3", "--requests", "60"];
    let (a, report) = sim(&[&base[..], &["--seed", "11"]].concat());
    let (b, _) = sim(&[&base[..], &["--seed", "11"]].concat());
    let (c, _) = sim(&[&base[..], &["--seed", "12"]].concat());
    assert!(a.contains("invariants: ok"), "{a}");
    assert_eq!(log_hash(&a), log_hash(&b), "same seed, same event log");
    assert_ne!(log_hash(&a), log_hash(&c), "another seed, another log");
    assert_eq!(report["requests"], 60, "{report}");
    assert_eq!(
        report["completed"].as_u64().unwrap_or(0) + report["failed"].as_u64().unwrap_or(0),
        60,
        "every request finishes exactly once: {report}"
    );
    assert_eq!(report["seed"], 11, "{report}");
}

#[test]
fn turbine_sim_actors_runs_the_real_shells_deterministically_with_a_trace() {
    let trace = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/sim/traces/mooncake_sample.jsonl"
    );
    let base = [
        "--actors",
        "--workers",
        "4",
        "--profile",
        "llama3-8b-h100",
        "--trace",
        trace,
        "--faults",
        "crash:2@5+3",
    ];
    let (a, report) = sim(&[&base[..], &["--seed", "3"]].concat());
    let (b, _) = sim(&[&base[..], &["--seed", "3"]].concat());
    assert!(a.contains("(actors)"), "the table names the engine: {a}");
    assert!(a.contains("invariants: ok"), "{a}");
    assert_eq!(log_hash(&a), log_hash(&b), "same seed, same event log");
    let n = report["requests"].as_u64().unwrap_or(0);
    assert!(n > 0, "{report}");
    assert_eq!(
        report["completed"].as_u64().unwrap_or(0) + report["failed"].as_u64().unwrap_or(0),
        n,
        "every request finishes exactly once: {report}"
    );
}

#[test]
fn turbine_sim_compares_aggregated_with_prefill_and_decode_workers_deterministically() {
    let args = [
        "--prefill-workers",
        "1",
        "--decode-workers",
        "1",
        "--requests",
        "20",
        "--remote-prefill-min-tokens",
        "256",
        "--seed",
        "5",
    ];
    let (a, reports) = sim(&args);
    let (b, _) = sim(&args);
    assert!(
        a.contains("| kv aggregated |") && a.contains("| kv 1P+1D |"),
        "{a}"
    );
    assert_eq!(a.matches("invariants: ok").count(), 2, "{a}");
    let hashes = |s: &str| -> Vec<String> {
        s.lines()
            .filter_map(|l| l.strip_prefix("event log hash "))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(hashes(&a), hashes(&b), "same seed, same event logs");
    let reports = reports.as_array().expect("two reports");
    for r in reports {
        assert_eq!(r["completed"], 20, "{r}");
    }
    // The disaggregated run reports its KV transfers; the aggregated one has none.
    assert!(reports[0]["disagg"].is_null(), "{}", reports[0]);
    let d = &reports[1]["disagg"];
    let (transfers, blocks, bytes) = (
        d["transfers"].as_u64().expect("transfers"),
        d["blocks"].as_u64().expect("blocks"),
        d["bytes"].as_u64().expect("bytes"),
    );
    assert!(transfers > 0 && blocks >= transfers && bytes > 0, "{d}");
    assert_eq!(bytes % blocks, 0, "bytes = blocks x bytes per block: {d}");
    assert!(
        a.contains(&format!("KV transfers {transfers}: {blocks} blocks")),
        "{a}"
    );
}
