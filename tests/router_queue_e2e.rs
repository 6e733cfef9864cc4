//! The router's queue on /metrics (`router.busy_threshold`): `turbine up` with one worker
//! that is busy at one request, its engine held by the executor's stall hook
//! (`TURBINE_FAULT_STALL_FILE`) so the first request stays in flight as long as the test
//! needs. A second request is held at the frontend (`turbine_router_queued_requests` 1,
//! `turbine_router_all_busy_total` 1) until `router.queue_timeout_ms`, then refused with a
//! retryable 503 (`turbine_router_queue_timeouts_total` 1). A third is held, and served once
//! the engine goes on and the first request finishes; the queue is empty again.
//!
//! Needs the default model (`scripts/setup-test-deps.sh`, run by `scripts/test.sh`).

mod common;

use common::{cluster_file, free_port, http, sample, spawn_turbine_with};
use std::time::{Duration, Instant};

fn body(prompt: &str, max_tokens: u32) -> String {
    serde_json::json!({
        "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true,
    })
    .to_string()
}

/// Sends a completion on a thread of its own; joins to (status, body).
fn in_background(
    port: u16,
    prompt: &str,
    max_tokens: u32,
) -> std::thread::JoinHandle<(u16, String)> {
    let body = body(prompt, max_tokens);
    std::thread::spawn(move || http(port, "POST", "/v1/completions", &body))
}

/// Polls `check` every 50 ms until it holds, failing with `what` after `limit`.
fn eventually(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "{what} (waited {limit:?})");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn requests_held_while_every_worker_is_busy_show_on_metrics() {
    let port = free_port();
    let file = cluster_file(
        "router-queue",
        &format!(
            "http: {{port: {port}}}\n\
             router: {{busy_threshold: 1, queue_timeout_ms: 4000}}\n\
             workers:\n  - {{replicas: 1, kv_blocks: 64, threads: 1}}\n"
        ),
    );
    let stall = file.with_file_name("stall");
    let stall_env = stall.to_str().unwrap().to_string();
    let _turbine = spawn_turbine_with(
        &["up", "-f", file.to_str().unwrap(), "--no-fetch"],
        &[("TURBINE_FAULT_STALL_FILE", &stall_env)],
        "turbine serving",
    );
    let queued = || sample(port, "turbine_router_queued_requests");
    let all_busy = || sample(port, "turbine_router_all_busy_total");
    let timeouts = || sample(port, "turbine_router_queue_timeouts_total");
    let routed = || common::gauge(port, "turbine_router_decisions_total");
    // The families are there from the start, at 0.
    let (_, text) = http(port, "GET", "/metrics", "");
    for family in [
        "turbine_router_queued_requests 0",
        "turbine_router_all_busy_total 0",
        "turbine_router_queue_timeouts_total 0",
    ] {
        assert!(text.contains(family), "{family} missing:\n{text}");
    }

    // 1. The engine is held: the first request is routed and stays in flight.
    std::fs::write(&stall, b"").unwrap();
    let first = in_background(port, "Count from one to ten.", 8);
    eventually(
        Duration::from_secs(30),
        "the first request was never routed",
        || routed() == 1.0,
    );

    // 2. The only worker is busy: the second request is held at the frontend...
    let second = in_background(port, "Name a colour.", 2);
    eventually(
        Duration::from_secs(10),
        "the second request was never held",
        || queued() == 1.0,
    );
    assert_eq!(all_busy(), 1.0);
    assert_eq!(timeouts(), 0.0);
    // ...until the queue timeout, then refused as retryable.
    let (status, text) = second.join().unwrap();
    assert_eq!(status, 503, "{text}");
    let err: serde_json::Value = serde_json::from_str(&text).expect("a JSON error body");
    assert_eq!(err["error"]["code"], "overloaded", "{text}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("queue_timeout_ms"),
        "{text}"
    );
    assert_eq!((queued(), timeouts()), (0.0, 1.0));

    // 3. A third request is held; the engine goes on, the first request finishes and frees
    //    the worker, and the held one is served.
    let third = in_background(port, "Name a fruit.", 2);
    eventually(
        Duration::from_secs(10),
        "the third request was never held",
        || queued() == 1.0,
    );
    assert_eq!(all_busy(), 2.0);
    std::fs::remove_file(&stall).unwrap();
    let (status, text) = first.join().unwrap();
    assert_eq!(status, 200, "{text}");
    let (status, text) = third.join().unwrap();
    assert_eq!(
        status, 200,
        "the held request is served once a worker frees: {text}"
    );
    assert_eq!((queued(), all_busy(), timeouts()), (0.0, 2.0, 1.0));
    assert_eq!(routed(), 2.0, "the refused request was never routed");
    if let Some(dir) = file.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
}
