//! Two processes: `turbine up` (frontend, router, embedded registry; no local workers) and
//! `turbine worker`, which joins over ZeroMQ through discovery, serves requests, and is
//! forgotten when it dies (lease expiry).
//!
//! Needs the default model (`scripts/setup-test-deps.sh`, run by `scripts/test.sh`).

mod common;

use common::{cluster_file, free_port, http, spawn_turbine};
use std::time::{Duration, Instant};

fn complete(port: u16, prompt: &str) -> (u16, String) {
    let body = format!(r#"{{"prompt":"{prompt}","max_tokens":6,"temperature":0}}"#);
    http(port, "POST", "/v1/completions", &body)
}

/// Polls (bounded) until a completion gets `want`.
fn wait_for_status(port: u16, want: u16) -> (u16, String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = complete(port, "The capital of France is");
        if status == want || Instant::now() > deadline {
            return (status, body);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_worker_process_joins_serves_and_is_forgotten_when_it_dies() {
    let (http, plane) = (free_port(), free_port());
    let file = cluster_file(
        "mp",
        &format!(
            "http: {{port: {http}}}\n\
             workers:\n  - {{replicas: 1, remote: true, kv_blocks: 256, threads: 1}}\n\
             transport: {{bind: \"127.0.0.1:{plane}\"}}\n\
             discovery: {{backend: embedded, registry: \"tcp://127.0.0.1:{plane}\", lease_ms: 600}}\n"
        ),
    );
    let file = file.to_str().unwrap();
    // The banner tells the truth: no worker has joined yet.
    let _frontend = spawn_turbine(
        &["up", "-f", file, "--no-fetch"],
        "no worker yet, waiting for 1 remote worker(s) to join",
    );

    // No worker yet: the frontend says so instead of hanging, and is live but not ready.
    let (status, body) = complete(http, "Hello");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no worker"), "{body}");
    assert_eq!(common::http(http, "GET", "/health", "").0, 200);
    let (status, body) = common::http(http, "GET", "/ready", "");
    assert_eq!(status, 503, "{body}");

    let worker = spawn_turbine(
        &["worker", "-f", file, "--bind", "127.0.0.1:0", "--no-fetch"],
        "registered with",
    );
    let (status, body) = wait_for_status(http, 200);
    assert_eq!(status, 200, "the worker never became routable: {body}");
    assert!(body.contains("\"completion_tokens\":6"), "{body}");
    assert!(
        body.contains("Paris"),
        "greedy answer from the remote worker: {body}"
    );
    assert_eq!(common::http(http, "GET", "/ready", "").0, 200);

    // The worker dies without deregistering: its lease expires and it is no longer routed to.
    drop(worker);
    let (status, body) = wait_for_status(http, 503);
    assert_eq!(status, 503, "a dead worker is still routed to: {body}");
    // Not ready once discovery has dropped it (lease expiry; bounded wait).
    let deadline = Instant::now() + Duration::from_secs(30);
    while common::http(http, "GET", "/ready", "").0 != 503 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(common::http(http, "GET", "/ready", "").0, 503);
}
