//! Router replicas that share one view (`router.replica_sync`), end to end: two frontends
//! (`turbine up`, each with its own router; the second joins the first's registry with
//! `--registry`) and two `turbine worker` processes. Each router follows the workers' KV
//! events itself and publishes its decisions and finished requests on the event plane;
//! the other applies them.
//!
//! Checked on the frontends' /metrics and by their decisions:
//! - a request routed by frontend A and still decoding shows in frontend B's router as in
//!   flight on A's worker (`turbine_router_in_flight_requests{worker}`), and leaves B's view
//!   when it finishes;
//! - a request through B while A's is decoding goes to the other worker (B weighs A's load);
//! - after A's request, a request with the same prefix through B goes to the worker A used,
//!   with most of its blocks cached there (B's KV overlap is A's);
//! - when B is gone, A drops B from its peers (its lease expires) and counts a resync.
//!
//! Needs the default model (`scripts/setup-test-deps.sh`, run by `scripts/test.sh`).

mod common;

use common::{
    cluster_file, complete_usage, completion_body, decisions, free_port, http, per_worker,
    send_request as send, spawn_turbine,
};
use std::collections::BTreeMap;
use std::io::Read;
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn in_flight(port: u16) -> BTreeMap<String, f64> {
    per_worker(port, "turbine_router_in_flight_requests")
}

/// An unlabelled sample of /metrics (0 when absent).
fn value(port: u16, name: &str) -> f64 {
    common::sample(port, name)
}

/// The workers whose decision count grew between two readings.
fn grew(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> Vec<String> {
    after
        .iter()
        .filter(|(w, n)| **n > before.get(*w).copied().unwrap_or(0.0))
        .map(|(w, _)| w.clone())
        .collect()
}

fn routed_to(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> String {
    let g = grew(before, after);
    assert_eq!(
        g.len(),
        1,
        "one request, one decision: {before:?} -> {after:?}"
    );
    g[0].clone()
}

fn prefix(topic: &str, sentences: usize) -> String {
    (0..sentences)
        .map(|i| format!("Note {i} about the {topic}: step {i} is checked and logged. "))
        .collect()
}

/// Opens a streamed completion and returns once its first chunk is in (it has been routed
/// and prefilled, and keeps decoding).
fn open_stream(port: u16, prompt: &str, max_tokens: u32) -> TcpStream {
    let mut s = send(
        port,
        "POST",
        "/v1/completions",
        &completion_body(prompt, max_tokens, true),
    );
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("data:") {
        let n = s.read(&mut buf).expect("streamed answer");
        assert!(
            n > 0,
            "stream ended early: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    s
}

fn finish_stream(mut s: TcpStream) {
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).expect("rest of the stream");
    assert!(
        String::from_utf8_lossy(&rest).contains("[DONE]"),
        "the stream completes"
    );
}

/// Polls `check` every 100 ms until it holds, failing with `what` after `limit`.
fn eventually(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "{what} (waited {limit:?})");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until `port`'s router routes to both workers: a request held open on one sends
/// the next one to the other.
fn wait_until_both_workers_are_routable(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let before = decisions(port);
        let mut held = send(
            port,
            "POST",
            "/v1/completions",
            &completion_body("Warm-up: count slowly from one.", 24, true),
        );
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains("data:") {
            let n = held.read(&mut buf).expect("streamed answer");
            if n == 0 {
                break; // refused (no worker yet)
            }
            got.extend_from_slice(&buf[..n]);
        }
        let first = decisions(port);
        let (status, _) = http(
            port,
            "POST",
            "/v1/completions",
            &completion_body("Warm-up: name a colour.", 2, false),
        );
        let second = decisions(port);
        let mut rest = Vec::new();
        let _ = held.read_to_end(&mut rest);
        let (a, b) = (grew(&before, &first), grew(&first, &second));
        if status == 200 && a.len() == 1 && b.len() == 1 && a != b {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "frontend on {port} never routed to both workers"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn two_frontends_share_kv_overlaps_and_in_flight_load_through_the_event_plane() {
    let (port_a, port_b, plane) = (free_port(), free_port(), free_port());
    let file = cluster_file(
        "router-replicas",
        &format!(
            "http: {{port: {port_a}}}\n\
             router: {{policy: kv, overlap_weight: 1.0, temperature: 0.0, replica_sync: true}}\n\
             workers:\n  - {{role: aggregated, replicas: 2, device: cpu, kv_blocks: 96, \
             block_size: 16, max_num_batched_tokens: 512, threads: 1, remote: true}}\n\
             transport: {{bind: \"127.0.0.1:{plane}\"}}\n\
             discovery: {{backend: embedded, registry: \"127.0.0.1:{plane}\", lease_ms: 2000}}\n"
        ),
    );
    let f = file.to_str().unwrap();
    let _a = spawn_turbine(&["up", "-f", f, "--no-fetch"], "turbine serving");
    let registry = format!("tcp://127.0.0.1:{plane}");
    let port_b_arg = port_b.to_string();
    let b = spawn_turbine(
        &[
            "up",
            "-f",
            f,
            "--no-fetch",
            "--port",
            &port_b_arg,
            "--bind",
            "127.0.0.1:0",
            "--registry",
            &registry,
        ],
        "turbine serving",
    );
    let joined = ["worker", "-f", f, "--bind", "127.0.0.1:0", "--no-fetch"];
    let _workers: Vec<_> = (0..2)
        .map(|_| spawn_turbine(&joined, "registered with"))
        .collect();
    wait_until_both_workers_are_routable(port_a);
    wait_until_both_workers_are_routable(port_b);
    eventually(
        Duration::from_secs(30),
        "the frontends never followed each other's router",
        || {
            value(port_a, "turbine_router_replica_peers") == 1.0
                && value(port_b, "turbine_router_replica_peers") == 1.0
        },
    );
    // PUB/SUB drops what is sent before a subscription reaches the publisher: route
    // through A until B has applied some of A's events.
    eventually(
        Duration::from_secs(30),
        "B never received A's routing events",
        || {
            complete_usage(port_a, "Warm-up: say yes.");
            value(port_b, "turbine_router_replica_events_total") > 0.0
        },
    );
    eventually(
        Duration::from_secs(30),
        "the warm-up requests never left B's view",
        || in_flight(port_b).values().all(|n| *n == 0.0),
    );

    // 1. A routes a long-prompt request and keeps it decoding: B's router has it in flight
    //    on A's worker, from A's event (B routed nothing).
    let family = prefix("lighthouse", 18);
    let before_a = decisions(port_a);
    let before_b = decisions(port_b);
    let stream = open_stream(port_a, &format!("{family}Question 0: what comes next?"), 64);
    let home = routed_to(&before_a, &decisions(port_a));
    eventually(
        Duration::from_secs(10),
        "B's router never saw A's request in flight",
        || in_flight(port_b).get(&home) == Some(&1.0),
    );
    assert_eq!(decisions(port_b), before_b, "B routed nothing itself");
    assert_eq!(in_flight(port_a), in_flight(port_b), "one view");

    // 2. A request through B with no cached prefix while A's decodes: the other worker.
    let before = decisions(port_b);
    let (_, cached) = complete_usage(
        port_b,
        &format!("{}Question 0: why?", prefix("greenhouse", 18)),
    );
    let elsewhere = routed_to(&before, &decisions(port_b));
    assert_ne!(
        elsewhere, home,
        "B weighs A's request on {home}: a request with nothing cached goes to the idle worker"
    );
    assert_eq!(cached, 0);
    finish_stream(stream);
    eventually(
        Duration::from_secs(10),
        "A's finished request never left B's view",
        || in_flight(port_b).values().all(|n| *n == 0.0),
    );

    // 3. The same prefix through B: to A's worker, mostly from its prefix cache (B's KV
    //    overlaps come from the worker's own events, which both routers follow).
    for round in 1..=2 {
        let before = decisions(port_b);
        let (prompt_tokens, cached) =
            complete_usage(port_b, &format!("{family}Question {round}: and then?"));
        assert_eq!(
            routed_to(&before, &decisions(port_b)),
            home,
            "round {round}: the prefix A sent to {home} is cached there"
        );
        assert!(
            cached * 10 >= prompt_tokens * 7,
            "round {round}: only {cached} of {prompt_tokens} prompt tokens were cached"
        );
    }
    let overlap = per_worker(port_b, "turbine_router_overlap_blocks_total");
    let requested = per_worker(port_b, "turbine_router_request_blocks_total");
    assert!(
        overlap[&home] >= requested[&home] * 0.6,
        "B's router saw the overlap it routed on: {} of {} blocks",
        overlap[&home],
        requested[&home]
    );

    // 4. B goes away: A drops it from its peers once its lease expires, and resyncs.
    let resyncs = value(port_a, "turbine_router_replica_resyncs_total");
    drop(b);
    eventually(
        Duration::from_secs(30),
        "A never noticed that B left",
        || value(port_a, "turbine_router_replica_peers") == 0.0,
    );
    assert!(value(port_a, "turbine_router_replica_resyncs_total") > resyncs);
    // A still serves.
    complete_usage(port_a, "After B: say yes.");
    if let Some(dir) = file.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
}
