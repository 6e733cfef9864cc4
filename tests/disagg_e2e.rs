//! Disaggregated serving across three processes: `turbine up` (frontend, router, registry;
//! no local workers), a `turbine worker --role prefill` and a `turbine worker --role decode`,
//! KV moving between the workers over ZeroMQ. Greedy outputs must equal aggregated serving
//! (a fourth process, run first); the long prompt's KV must have crossed (bytes = blocks x
//! bytes per block, from /metrics); the short prompt is prefilled on the decode worker; and
//! with the prefill worker killed, a long request still completes with the same text.
//!
//! Needs the default model (`scripts/setup-test-deps.sh`, run by `scripts/test.sh`).

mod common;

use common::{cluster_file, free_port, gauge, http, spawn_turbine};
use std::time::{Duration, Instant};

const MAX_TOKENS: u32 = 6;

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
fn prefill_and_decode_processes_match_aggregated_and_survive_a_dead_prefill_worker() {
    let prompts = [
        long_prompt("Lyon"),
        "The capital of France is".to_string(),
        long_prompt("Oslo"),
    ];

    // Aggregated reference: one process, one worker.
    let reference: Vec<String> = {
        let port = free_port();
        let file = cluster_file(
            "disagg-agg",
            &format!("http: {{port: {port}}}\nworkers:\n  - {{replicas: 1, kv_blocks: 256, threads: 1}}\n"),
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
               transfer: {{pull_timeout_ms: 5000}}}}\n\
             transport: {{bind: \"127.0.0.1:{plane}\"}}\n\
             discovery: {{backend: embedded, registry: \"127.0.0.1:{plane}\", lease_ms: 10000}}\n"
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
    let _decode = worker("decode");
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

    // The prefill worker dies (its lease has not expired: the router still picks it). The
    // request falls back to a local prefill and the text is the same.
    drop(prefill);
    let t = Instant::now();
    assert_eq!(
        complete(port, &prompts[2]),
        reference[2],
        "long prompt, prefill worker dead"
    );
    eprintln!(
        "the request with the prefill worker dead took {:?}",
        t.elapsed()
    );
    assert_eq!(gauge(port, "turbine_disagg_prefill_fallbacks_total"), 1.0);
    assert_eq!(gauge(port, "turbine_disagg_transfers_total"), 1.0);
}
