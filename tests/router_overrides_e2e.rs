//! Per-request router overrides through the official `openai` client: `turbine up` with two
//! workers and the KV router, driven by tests/e2e/router_overrides_driver.py, which sends
//! `x-turbine-overlap-weight` / `x-turbine-router-temperature` with `extra_headers` and reads
//! each decision from /metrics: the headers change where requests go, and a bad value is an
//! OpenAI-style 400 naming the header.
//!
//! Needs the default model and the test venv (`scripts/setup-test-deps.sh`).

mod common;

use common::{cluster_file, free_port, spawn_turbine, test_python};
use std::process::Command;

#[test]
fn override_headers_from_the_openai_client_change_the_routing_decision() {
    let port = free_port();
    let file = cluster_file(
        "router-overrides",
        &format!(
            "http: {{port: {port}}}\n\
             router: {{policy: kv, overlap_weight: 1.0, temperature: 0.0, seed: 0}}\n\
             workers:\n  - {{replicas: 2, kv_blocks: 96, block_size: 16, threads: 1}}\n"
        ),
    );
    let _turbine = spawn_turbine(
        &["up", "-f", file.to_str().unwrap(), "--no-fetch"],
        "turbine serving",
    );
    let driver = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/e2e/router_overrides_driver.py"
    );
    let out = Command::new(test_python())
        .args([
            driver,
            &format!("http://127.0.0.1:{port}"),
            "SmolLM2-135M-Instruct",
        ])
        .output()
        .expect("running the driver (is the test venv installed?)");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "the openai-client driver failed:\n{log}"
    );
    assert!(log.contains("router overrides: all passed"), "{log}");
    if let Some(dir) = file.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
}
