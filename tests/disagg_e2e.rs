//! Disaggregated serving across three processes: `turbine up` (frontend, router, registry;
//! no local workers), a `turbine worker --role prefill` and a `turbine worker --role decode`,
//! KV moving between the workers over ZeroMQ. Greedy outputs must equal aggregated serving
//! (a fourth process, run first); the long prompt's KV must have crossed (bytes = blocks x
//! bytes per block, from /metrics); the short prompt is prefilled on the decode worker; with
//! the prefill worker killed while the decode worker pulls its KV (the transfer plane is
//! capped at a few MB/s so the pull lasts seconds), the request completes with the same
//! text, and so does one sent to the dead worker before its lease expires; afterwards the
//! live worker holds no KV block, read where a user reads it (the frontend's /metrics, fed
//! by the worker's load reports).
//!
//! Needs the default model (`scripts/setup-test-deps.sh`, run by `scripts/test.sh`).

mod common;

use common::{cluster_file, free_port, gauge, http, send_request, spawn_turbine};
use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

const MAX_TOKENS: u32 = 6;

/// A debug build on a busy machine may take longer than the default liveness timeout (15 s)
/// for one prefill step; this test is about disaggregation, not migration.
const SLOW_OK: &str = "migration: {liveness_timeout_ms: 120000}\n";

fn long_prompt(topic: &str) -> String {
    (0..20)
        .map(|i| format!("Note {i} about {topic}: the weather was mild and the river calm."))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The completion's text (status 200 asserted).
fn complete(port: u16, prompt: &str) -> String {
    let body = format!(r#"{{"prompt":"{prompt}","max_tokens":{MAX_TOKENS},"temperature":0}}"#);
    let (status, body) = http(port, "POST", "/v1/completions", &body);
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    v["choices"][0]["text"].as_str().expect("text").to_string()
}

/// A streamed completion of `prompt`: `on_first` runs once the first token has arrived,
/// then the rest is read; returns the whole text.
fn complete_streamed(port: u16, prompt: &str, on_first: impl FnOnce()) -> String {
    let body = format!(
        r#"{{"prompt":"{prompt}","max_tokens":{MAX_TOKENS},"temperature":0,"stream":true}}"#
    );
    let mut reader = BufReader::new(send_request(port, "POST", "/v1/completions", &body));
    let (mut text, mut chunks, mut on_first, mut done) = (String::new(), 0, Some(on_first), false);
    let mut line = String::new();
    while reader.read_line(&mut line).expect("the stream reads") > 0 {
        if let Some(json) = line.trim().strip_prefix("data: ") {
            if json == "[DONE]" {
                done = true;
                break;
            }
            let v: serde_json::Value = serde_json::from_str(json).expect("a JSON chunk");
            text.push_str(v["choices"][0]["text"].as_str().unwrap_or(""));
            chunks += 1;
            if let Some(f) = on_first.take() {
                f();
            }
        }
        line.clear();
    }
    assert!(
        done && chunks > 0,
        "the stream ended early after {chunks} chunks: {text:?}"
    );
    text
}

/// The value of `name{worker="<worker>"}` on /metrics, if that series exists.
fn worker_gauge(port: u16, name: &str, worker: &str) -> Option<f64> {
    let (_, text) = http(port, "GET", "/metrics", "");
    let series = format!("{name}{{worker=\"{worker}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series)?.parse::<f64>().ok())
}

/// The worker id in "turbine worker w12 serving on ...".
fn worker_id(ready_line: &str) -> String {
    let rest = ready_line
        .split("turbine worker ")
        .nth(1)
        .expect("a worker line");
    rest.split_whitespace().next().expect("an id").to_string()
}

/// Polls (bounded) until a completion succeeds.
fn wait_until_serving(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let body = r#"{"prompt":"Hi","max_tokens":1,"temperature":0}"#;
        let (status, _) = http(port, "POST", "/v1/completions", body);
        if status == 200 {
            return;
        }
        assert!(Instant::now() < deadline, "the cluster never served");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn metric(port: u16, name: &str, label: &str) -> f64 {
    let (_, text) = http(port, "GET", "/metrics", "");
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// KV bytes of one block of the default model: K and V, every layer, f32.
fn bytes_per_block(block_size: usize) -> f64 {
    let path = turbine_kernels::loader::default_model_path();
    let m = turbine_kernels::loader::load_model(&path).expect("the default model");
    (2 * block_size * m.config.n_kv_heads * m.config.head_dim * 4 * m.config.n_layers) as f64
}

#[test]
fn prefill_and_decode_processes_match_aggregated_and_survive_a_prefill_worker_killed_mid_pull() {
    let prompts = [
        long_prompt("Lyon"),
        "The capital of France is".to_string(),
        long_prompt("Oslo"),
        long_prompt("Rome"),
    ];

    // Aggregated reference: one process, one worker.
    let reference: Vec<String> = {
        let port = free_port();
        let file = cluster_file(
            "disagg-agg",
            &format!("http: {{port: {port}}}\nworkers:\n  - {{replicas: 1, kv_blocks: 256, threads: 1}}\n{SLOW_OK}"),
        );
        let _agg = spawn_turbine(
            &["up", "-f", file.to_str().unwrap(), "--no-fetch"],
            "turbine serving",
        );
        prompts.iter().map(|p| complete(port, p)).collect()
    };

    let (port, plane) = (free_port(), free_port());
    let file = cluster_file(
        "disagg",
        &format!(
            "http: {{port: {port}}}\n\
             workers:\n  \
             - {{role: prefill, replicas: 1, remote: true, kv_blocks: 256, threads: 1}}\n  \
             - {{role: decode, replicas: 1, remote: true, kv_blocks: 256, threads: 1}}\n\
             disaggregation: {{remote_prefill_min_tokens: 256, remote_prefill_timeout_ms: 60000,\n  \
               transfer: {{pull_timeout_ms: 1000, max_bytes_per_s: 6000000}}}}\n\
             transport: {{bind: \"127.0.0.1:{plane}\"}}\n\
             discovery: {{backend: embedded, registry: \"127.0.0.1:{plane}\", lease_ms: 10000}}\n{SLOW_OK}"
        ),
    );
    let file = file.to_str().unwrap();
    let _frontend = spawn_turbine(&["up", "-f", file, "--no-fetch"], "turbine serving");
    let worker = |role: &str| {
        spawn_turbine(
            &[
                "worker",
                "-f",
                file,
                "--role",
                role,
                "--bind",
                "127.0.0.1:0",
                "--no-fetch",
            ],
            "registered with",
        )
    };
    let prefill = worker("prefill");
    let decode = worker("decode");
    let decode_id = worker_id(&decode.ready_line);
    wait_until_serving(port);
    let before = metric(
        port,
        "turbine_disagg_prefill_decisions_total",
        "local_short",
    );

    // The long prompt goes remote; its KV crosses.
    assert_eq!(
        complete(port, &prompts[0]),
        reference[0],
        "long prompt, remote prefill"
    );
    assert_eq!(
        metric(port, "turbine_disagg_prefill_decisions_total", "\"remote\""),
        1.0
    );
    let blocks = gauge(port, "turbine_disagg_transfer_blocks_total");
    let bytes = gauge(port, "turbine_disagg_transfer_bytes_total");
    let text = http(port, "GET", "/metrics", "").1;
    let disagg: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("turbine_disagg"))
        .collect();
    assert!(
        blocks >= 16.0,
        "a ~300-token prompt is ~20 blocks of 16: {disagg:#?}"
    );
    assert_eq!(
        bytes,
        blocks * bytes_per_block(16),
        "transfer bytes = blocks x bytes per block"
    );
    assert_eq!(gauge(port, "turbine_disagg_prefill_fallbacks_total"), 0.0);

    // The short prompt is prefilled on the decode worker.
    assert_eq!(
        complete(port, &prompts[1]),
        reference[1],
        "short prompt, local prefill"
    );
    assert_eq!(
        metric(
            port,
            "turbine_disagg_prefill_decisions_total",
            "local_short"
        ),
        before + 1.0
    );

    // The prefill worker dies while the decode worker pulls the KV of the next long
    // request: ~15 MB at 6 MB/s takes ~2.5 s, and the kill comes 0.7 s after the client
    // got the first token (the export, the descriptor and the decode worker's admission
    // take tens of ms). The pull fails, the decode worker recomputes, the text is the same.
    let transfers = gauge(port, "turbine_disagg_transfers_total");
    let mut prefill = Some(prefill);
    let t = Instant::now();
    let text = complete_streamed(port, &prompts[2], || {
        std::thread::sleep(Duration::from_millis(700));
        drop(prefill.take());
    });
    assert_eq!(
        text, reference[2],
        "long prompt, prefill worker killed mid-pull"
    );
    eprintln!("the request whose pull was cut took {:?}", t.elapsed());
    let text = http(port, "GET", "/metrics", "").1;
    let fallbacks: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("turbine_disagg_prefill_fallbacks_total"))
        .collect();
    let mid_pull = metric(port, "turbine_disagg_prefill_fallbacks_total", "owner_gone")
        + metric(
            port,
            "turbine_disagg_prefill_fallbacks_total",
            "transfer_timeout",
        );
    assert_eq!(mid_pull, 1.0, "the pull itself failed: {fallbacks:#?}");
    assert_eq!(
        gauge(port, "turbine_disagg_transfers_total"),
        transfers,
        "the cut pull is no transfer"
    );

    // The dead prefill worker is still routed to until its lease expires (10 s; a slow
    // machine may get there first): the next long request falls back to a local prefill,
    // or is decided local for want of a prefill worker. Same text either way.
    let local = |port| {
        gauge(port, "turbine_disagg_prefill_fallbacks_total")
            + metric(
                port,
                "turbine_disagg_prefill_decisions_total",
                "local_no_prefill_worker",
            )
    };
    let before = local(port);
    assert_eq!(
        complete(port, &prompts[3]),
        reference[3],
        "long prompt, prefill worker dead"
    );
    assert_eq!(local(port), before + 1.0, "prefilled on the decode worker");
    assert_eq!(gauge(port, "turbine_disagg_transfers_total"), 1.0);

    // The live worker holds no KV block and runs nothing (its load reports, on the
    // frontend's /metrics).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let used = worker_gauge(port, "turbine_kv_blocks_used", &decode_id);
        let running = worker_gauge(port, "turbine_requests_running", &decode_id);
        if used == Some(0.0) && running == Some(0.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "decode worker {decode_id}: {used:?} KV blocks used, {running:?} running"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
