//! Custom stages in the `turbine` binary: the example stages (`key_guard`, `redact`) in the
//! frontend's process and in a process of their own, driven by the official `openai` client
//! (tests/e2e/stages_driver.py); an unknown stage name stops start-up naming it.
//!
//! Needs the default model and the test venv (`scripts/setup-test-deps.sh`).

mod common;

use common::{cluster_file, free_port, http, spawn_turbine, test_python};
use std::process::Command;
use std::time::{Duration, Instant};

const MODEL: &str = "SmolLM2-135M-Instruct";

fn drive(port: u16, scenario: &str) {
    let driver = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e/stages_driver.py");
    let out = Command::new(test_python())
        .args([
            driver,
            &format!("http://127.0.0.1:{port}/v1"),
            MODEL,
            scenario,
        ])
        .output()
        .expect("running the stages driver (is the test venv installed?)");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "the openai-client driver failed:\n{log}"
    );
    assert!(log.contains("stages: all passed"), "{log}");
}

#[test]
fn example_stages_guard_rewrite_and_redact_for_the_openai_client() {
    let port = free_port();
    let file = cluster_file(
        "stages-local",
        &format!(
            "http: {{port: {port}}}\n\
             workers:\n  - {{replicas: 1, kv_blocks: 256, threads: 1}}\n\
             stages:\n\
             \x20 - name: key_guard\n\
             \x20   config:\n\
             \x20     keys:\n\
             \x20       sk-cap: {{max_tokens: 3}}\n\
             \x20       sk-slow: {{requests_per_minute: 1}}\n\
             \x20       sk-open: {{}}\n\
             \x20 - name: redact\n\
             \x20   config: {{min_digits: 1}}\n"
        ),
    );
    let _turbine = spawn_turbine(
        &["up", "-f", file.to_str().unwrap(), "--no-fetch"],
        "turbine serving",
    );
    drive(port, "local");
    // The cluster has served requests: every metric the Grafana dashboard queries is there.
    dashboard_metrics_exist(port);
}

/// Every metric name in an `expr` of deploy/grafana-dashboard.json is on /metrics (a
/// sample of that series, or the family's `# TYPE` line for one without samples yet).
fn dashboard_metrics_exist(port: u16) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut names = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
            for word in expr.split(|c: char| !is_name(c)) {
                if ["turbine_", "dynamo_", "vllm:"]
                    .iter()
                    .any(|p| word.starts_with(p))
                {
                    names.insert(word.to_string());
                }
            }
        }
    }
    assert!(names.len() >= 20, "the dashboard queries only {names:?}");
    let (status, text) = http(port, "GET", "/metrics", "");
    assert_eq!(status, 200);
    let missing: Vec<&String> = names
        .iter()
        .filter(|name| {
            let sample = text.lines().any(|l| {
                l.strip_prefix(name.as_str())
                    .is_some_and(|rest| rest.starts_with(['{', ' ']))
            });
            let family = ["_total", "_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name);
            let typed = text.lines().any(|l| {
                l.strip_prefix("# TYPE ").and_then(|r| r.split(' ').next()) == Some(family)
            });
            !(sample || typed)
        })
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics /metrics lacks: {missing:?}"
    );
}

#[test]
fn an_unknown_stage_stops_start_up_naming_it() {
    let file = cluster_file(
        "stages-unknown",
        "stages:\n  - name: key_guard\n  - name: redcat\n",
    );
    let out = Command::new(env!("CARGO_BIN_EXE_turbine"))
        .args(["up", "-f", file.to_str().unwrap(), "--no-fetch"])
        .output()
        .expect("running turbine");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "turbine started with an unknown stage"
    );
    assert!(
        stderr.contains("stages[1]: unknown stage `redcat`")
            && stderr.contains("key_guard, redact"),
        "{stderr}"
    );
    // A stage's bad config is refused the same way, naming the field.
    let file = cluster_file(
        "stages-badcfg",
        "stages:\n  - name: redact\n    config: {min_digit: 1}\n",
    );
    let out = Command::new(env!("CARGO_BIN_EXE_turbine"))
        .args(["up", "-f", file.to_str().unwrap(), "--no-fetch"])
        .output()
        .expect("running turbine");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("stages[0] (`redact`).config") && stderr.contains("min_digit"),
        "{stderr}"
    );
}

#[test]
fn a_stage_in_its_own_process_is_reached_over_the_request_plane() {
    let (port, plane) = (free_port(), free_port());
    let file = cluster_file(
        "stages-remote",
        &format!(
            "http: {{port: {port}}}\n\
             workers:\n  - {{replicas: 1, kv_blocks: 256, threads: 1}}\n\
             transport: {{bind: \"127.0.0.1:{plane}\"}}\n\
             discovery: {{backend: embedded, registry: \"tcp://127.0.0.1:{plane}\", lease_ms: 600}}\n\
             stages:\n  - {{name: redact, remote: true, config: {{min_digits: 1}}}}\n"
        ),
    );
    let file = file.to_str().unwrap();
    let _frontend = spawn_turbine(&["up", "-f", file, "--no-fetch"], "turbine serving");
    let body = r#"{"prompt":"1, 2, 3,","max_tokens":4,"temperature":0}"#;
    // Not joined yet: a 503 naming the stage, not a hang and not an unfiltered answer.
    let (status, text) = http(port, "POST", "/v1/completions", body);
    assert_eq!(status, 503, "{text}");
    assert!(
        text.contains("stage `redact`") && text.contains("stage_unavailable"),
        "{text}"
    );

    let _stage = spawn_turbine(
        &[
            "worker",
            "-f",
            file,
            "--role",
            "stage",
            "--stage",
            "redact",
            "--bind",
            "127.0.0.1:0",
        ],
        "turbine stage redact serving",
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while http(port, "POST", "/v1/completions", body).0 != 200 {
        assert!(Instant::now() < deadline, "the stage process never joined");
        std::thread::sleep(Duration::from_millis(100));
    }
    drive(port, "remote");
}
