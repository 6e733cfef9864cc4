//! KV-aware routing end to end: `turbine up -f <yaml>` with two CPU workers and the KV
//! router. Two long prompt families (a shared prefix of many KV blocks, then varying
//! suffixes) are sent repeatedly; the server's own reporting on GET /metrics
//! (`turbine_router_decisions_total{worker}`, `turbine_prefix_cache_hit_rate{worker}`) and the
//! responses' `usage.prompt_tokens_details.cached_tokens` must show that every follow-up goes
//! to the worker that holds its prefix, and that the prefix cache then serves it.
//!
//! The same scenario runs a second time with the router in a process of its own
//! (`turbine worker --role router`, `router.remote`) and the two workers as `turbine worker`
//! processes: the frontend reaches the router over the request plane and must route exactly
//! as with the router in its process.
//!
//! Needs the default model (`scripts/setup-test-deps.sh`, run by `scripts/test.sh`).

mod common;

use common::{
    cluster_file, complete_usage, completion_body, decisions, free_port, http, per_worker,
    send_request as send, spawn_turbine,
};
use std::collections::BTreeMap;
use std::io::Read;

/// The one worker whose decision count grew between two readings.
fn routed_to(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> String {
    let grew: Vec<&String> = after
        .iter()
        .filter(|(w, n)| **n > before.get(*w).copied().unwrap_or(0.0))
        .map(|(w, _)| w)
        .collect();
    assert_eq!(
        grew.len(),
        1,
        "one request, one decision: {before:?} -> {after:?}"
    );
    grew[0].clone()
}

/// A long prefix of `sentences` sentences about `topic`: many 16-token KV blocks.
fn prefix(topic: &str, sentences: usize) -> String {
    (0..sentences)
        .map(|i| format!("Note {i} about the {topic}: step {i} is checked and logged. "))
        .collect()
}

#[test]
fn repeated_prefixes_follow_their_kv_blocks() {
    let port = free_port();
    let file = cluster_file(
        "kvroute",
        &format!(
            "http: {{port: {port}}}\n\
             router: {{policy: kv, overlap_weight: 1.0, temperature: 0.0}}\n\
             workers:\n  - {{role: aggregated, replicas: 2, device: cpu, kv_blocks: 96, \
             block_size: 16, max_num_batched_tokens: 512, threads: 1}}\n\
             transport: {{bind: \"127.0.0.1:0\"}}\n"
        ),
    );
    let _server = spawn_turbine(
        &["up", "-f", file.to_str().unwrap(), "--no-fetch"],
        "turbine serving",
    );
    scenario(port, true);
    if let Some(dir) = file.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[test]
fn a_router_process_routes_as_the_local_router_does() {
    let (port, plane) = (free_port(), free_port());
    let file = cluster_file(
        "kvroute-remote",
        &format!(
            "http: {{port: {port}}}\n\
             router: {{policy: kv, overlap_weight: 1.0, temperature: 0.0, remote: true}}\n\
             workers:\n  - {{role: aggregated, replicas: 2, device: cpu, kv_blocks: 96, \
             block_size: 16, max_num_batched_tokens: 512, threads: 1, remote: true}}\n\
             transport: {{bind: \"127.0.0.1:{plane}\"}}\n\
             discovery: {{backend: embedded, registry: \"127.0.0.1:{plane}\", lease_ms: 2000}}\n"
        ),
    );
    let file_arg = file.to_str().unwrap();
    let _frontend = spawn_turbine(&["up", "-f", file_arg, "--no-fetch"], "turbine serving");
    let joined = [
        "worker",
        "-f",
        file_arg,
        "--bind",
        "127.0.0.1:0",
        "--no-fetch",
    ];
    let _router = spawn_turbine(
        &[&joined[..], &["--role", "router"]].concat(),
        "registered with",
    );
    let _workers: Vec<_> = (0..2)
        .map(|_| spawn_turbine(&joined, "registered with"))
        .collect();
    wait_until_both_workers_are_routable(port);
    scenario(port, false);
    if let Some(dir) = file.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Waits (bounded) until the router process routes to both workers: a request held open on
/// one worker sends the next one to the other. The warm-up prompts share no block with the
/// scenario's.
fn wait_until_both_workers_are_routable(port: u16) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
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
                break; // refused (no router or no worker yet)
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
        let to_first: Vec<_> = first
            .keys()
            .filter(|w| first[*w] > before.get(*w).copied().unwrap_or(0.0))
            .collect();
        let to_second: Vec<_> = second
            .keys()
            .filter(|w| second[*w] > first.get(*w).copied().unwrap_or(0.0))
            .collect();
        if status == 200 && to_first.len() == 1 && to_second.len() == 1 && to_first != to_second {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the router process never routed to both workers"
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
}

/// The scenario: two prefix families, each follow-up routed to its family's worker.
/// `worker_gauges`: the workers are in the frontend's process, so their prefix-cache
/// gauges are on its /metrics too.
fn scenario(port: u16, worker_gauges: bool) {
    let family_a = prefix("lighthouse", 18);
    let family_b = prefix("greenhouse", 18);

    // 1. First A request, streamed: once its first chunk is here it has been routed and
    //    prefilled (its blocks are on a worker and in the index), and it keeps decoding.
    let before = decisions(port);
    let mut a_first = send(
        port,
        "POST",
        "/v1/completions",
        &completion_body(&format!("{family_a}Question 0: what comes next?"), 48, true),
    );
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("data:") {
        let n = a_first.read(&mut buf).expect("streamed answer");
        assert!(
            n > 0,
            "stream ended early: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    let after = decisions(port);
    let home_a = routed_to(&before, &after);

    // 2. First B request while A's is still decoding on its worker: no worker holds B's
    //    blocks, so the router's load term sends it to the idle worker.
    let (b_prompt_tokens, b_cached) = complete_usage(port, &format!("{family_b}Question 0: why?"));
    let after_b = decisions(port);
    let home_b = routed_to(&after, &after_b);
    assert_ne!(
        home_a, home_b,
        "with A still decoding on {home_a}, a request with no cached prefix goes elsewhere"
    );
    assert!(b_prompt_tokens >= 200, "the prefix spans many blocks");
    assert_eq!(b_cached, 0, "nothing of B was cached yet");
    let mut rest = Vec::new();
    a_first.read_to_end(&mut rest).expect("rest of A's stream");
    assert!(
        String::from_utf8_lossy(&rest).contains("[DONE]"),
        "A's stream completes"
    );

    let hit_rate_before = per_worker(port, "turbine_prefix_cache_hit_rate");

    // 3. Follow-ups with new suffixes, in an order no load-only policy would reproduce
    //    (round robin would send the second A to B's worker): each goes to its family's
    //    worker, and most of its prompt comes from that worker's prefix cache.
    let order = [
        (&family_a, &home_a),
        (&family_a, &home_a),
        (&family_b, &home_b),
        (&family_b, &home_b),
        (&family_a, &home_a),
        (&family_b, &home_b),
    ];
    for (round, (family, home)) in order.into_iter().enumerate() {
        let before = decisions(port);
        let (prompt_tokens, cached) = complete_usage(
            port,
            &format!("{family}Question {round}: and then {round}?"),
        );
        let to = routed_to(&before, &decisions(port));
        assert_eq!(
            &to, home,
            "follow-up {round}: the prefix's blocks are on {home}"
        );
        assert!(
            cached * 10 >= prompt_tokens * 7,
            "follow-up {round}: only {cached} of {prompt_tokens} prompt tokens were cached"
        );
    }

    // 4. The workers' own prefix-cache hit rate rose on both homes, and the router saw the
    //    overlap it routed on.
    let hit_rate_after = per_worker(port, "turbine_prefix_cache_hit_rate");
    for home in [&home_a, &home_b].into_iter().filter(|_| worker_gauges) {
        let (was, now) = (
            hit_rate_before.get(home).copied().unwrap_or(0.0),
            hit_rate_after.get(home).copied().unwrap_or(0.0),
        );
        assert!(
            now > was && now > 0.5,
            "{home}: prefix-cache hit rate {was} -> {now}"
        );
    }
    let overlap = per_worker(port, "turbine_router_overlap_blocks_total");
    let requested = per_worker(port, "turbine_router_request_blocks_total");
    for home in [&home_a, &home_b] {
        let (o, r) = (overlap[home], requested[home]);
        assert!(o >= r * 0.6, "{home}: router overlap {o} of {r} blocks");
    }
}
