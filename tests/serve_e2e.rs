//! End to end against the real server: `turbine up` (the binary) serving the default model,
//! driven by the official `openai` Python client, then checked for leaks and cancellation.
//!
//! Needs the default model and the test venv, both installed by `scripts/test.sh`
//! (`scripts/setup-test-deps.sh`). Without them the test fails and says how to get them.

mod common;

use common::{gauge, http, spawn_turbine, test_python};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

/// Waits (bounded) until no KV block is held by a request and nothing runs.
fn wait_until_idle(port: u16) -> (f64, f64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let used = gauge(port, "turbine_kv_blocks_used");
        let running =
            gauge(port, "turbine_requests_running") + gauge(port, "turbine_requests_waiting");
        if (used == 0.0 && running == 0.0) || Instant::now() > deadline {
            return (used, running);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn openai_client_drives_turbine_up_and_nothing_leaks() {
    let python = test_python();
    assert!(
        python.exists(),
        "{} is missing: run scripts/setup-test-deps.sh (scripts/test.sh does)",
        python.display()
    );
    let server = spawn_turbine(&["up", "--port", "0", "--no-fetch"], "turbine serving");
    let port = server.http_port();

    // 1. The official client: chat and completions, streaming and not, stop strings, bad
    //    requests, and 32 concurrent greedy streams equal to their solo answers.
    let driver = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e/openai_e2e.py");
    let out = Command::new(&python)
        .arg(driver)
        .arg(format!("http://127.0.0.1:{port}"))
        .output()
        .expect("running the openai driver");
    let log = String::from_utf8_lossy(&out.stdout);
    println!("{log}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "the openai-client driver failed:\n{log}"
    );

    // 1b. OpenAI-API parity (issue 18) on the same server: n > 1, logit_bias, echo,
    //     token-id and batched prompts, stop_token_ids, min_tokens, penalties,
    //     /tokenize and /detokenize, human 400s.
    let parity = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e/parity_e2e.py");
    let out = Command::new(&python)
        .arg(parity)
        .arg(format!("http://127.0.0.1:{port}"))
        .output()
        .expect("running the parity driver");
    let log = String::from_utf8_lossy(&out.stdout);
    println!("{log}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the parity driver failed:\n{log}");

    // 2. After every request ended, no KV block is held by a request.
    assert_eq!(
        wait_until_idle(port),
        (0.0, 0.0),
        "blocks or requests left behind"
    );

    // 3. A client that disconnects mid-stream cancels its request and frees its blocks.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let body = r#"{"prompt":"Write a very long story about a lighthouse keeper.","max_tokens":4000,"ignore_eos":true,"stream":true,"temperature":0}"#;
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut chunks = 0;
    let mut line = String::new();
    while chunks < 5 {
        line.clear();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "stream ended early"
        );
        if line.starts_with("data: {") {
            chunks += 1;
        }
    }
    assert!(
        gauge(port, "turbine_kv_blocks_used") > 0.0,
        "a running request holds blocks"
    );
    drop(reader);
    s.shutdown(std::net::Shutdown::Both).unwrap();
    drop(s);
    assert_eq!(
        wait_until_idle(port),
        (0.0, 0.0),
        "the disconnected request still holds KV blocks"
    );

    // 4. A prompt longer than the context is a 400 in OpenAI's shape, and the server serves on.
    let long_prompt = "hello ".repeat(9000);
    let (status, body) = http(
        port,
        "POST",
        "/v1/completions",
        &format!(r#"{{"prompt":"{long_prompt}","max_tokens":4}}"#),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("context_length_exceeded"), "{body}");
    let (status, body) = http(
        port,
        "POST",
        "/v1/completions",
        r#"{"prompt":"One, two,","max_tokens":3,"temperature":0}"#,
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"completion_tokens\":3"), "{body}");
}

/// Resident memory of process `pid` in MiB.
fn rss_mib(pid: u32) -> f64 {
    turbine_runtime::telemetry::resident_memory_kb(Some(pid)).expect("/proc") as f64 / 1024.0
}

/// Memory that requests used is given back: after 12 concurrent streams with distinct
/// 40-word prompts (a few hundred tokens, so over a hundred KV blocks of 0.7 MiB in all), the
/// server's RSS is back within `RSS_MARGIN_MIB` of its idle level. Before the KV pool was
/// committed at start, this load alone grew the RSS by the KV it touched and kept it.
#[cfg(target_os = "linux")]
#[test]
fn rss_after_a_burst_of_streams_returns_near_its_idle_level() {
    /// Allocator arenas keep the scratch of the largest batch step (bounded by
    /// `max_num_batched_tokens`) and of the most concurrent requests; measured growth was
    /// 28-37 MiB under heavier loads (docs/BENCHMARKS.md).
    const RSS_MARGIN_MIB: f64 = 64.0;
    let python = test_python();
    let server = spawn_turbine(&["up", "--port", "0", "--no-fetch"], "turbine serving");
    let port = server.http_port();
    let pid = server.child.id();
    let (status, _) = http(port, "GET", "/ready", "");
    assert_eq!(status, 200, "a local worker serves from the start");
    let idle = rss_mib(pid);
    let driver = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/e2e/concurrent_streams.py"
    );
    let out = Command::new(&python)
        .args([driver, &format!("http://127.0.0.1:{port}"), "12", "2", "40"])
        .output()
        .expect("running the load driver");
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "load failed: {log}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(wait_until_idle(port), (0.0, 0.0), "requests left behind");
    let after = rss_mib(pid);
    println!("rss idle {idle:.0} MiB, after 12 streams {after:.0} MiB");
    assert!(
        after <= idle + RSS_MARGIN_MIB,
        "RSS grew from {idle:.0} MiB to {after:.0} MiB and stayed"
    );
}

/// Overload through the official client: a `turbine up` that runs 2 generations and queues
/// 2 more, hit by 16 concurrent streams at once. A client that does not retry sees the
/// refusals as `openai.RateLimitError` (429) with `Retry-After: 1`; every request that was
/// admitted streams to its finish; a client that retries (the SDK backs off on 429, honouring
/// Retry-After) gets all 16 through. The server's RSS stays within a margin of its idle level
/// throughout (sampled every 100 ms) and after.
#[cfg(target_os = "linux")]
#[test]
fn a_saturated_frontend_refuses_with_429_and_retry_after_and_finishes_what_it_admitted() {
    const STREAMS: &str = "16";
    const RSS_MARGIN_MIB: f64 = 64.0;
    let file = common::cluster_file(
        "overload",
        "http: {port: 0, max_concurrent_requests: 2, max_queued_requests: 2}\n\
         workers:\n  - {replicas: 1, kv_blocks: 256}\n",
    );
    let server = spawn_turbine(
        &["up", "-f", file.to_str().unwrap(), "--no-fetch"],
        "turbine serving",
    );
    let port = server.http_port();
    let pid = server.child.id();
    let idle = rss_mib(pid);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut peak = 0.0f64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                peak = peak.max(rss_mib(pid));
                std::thread::sleep(Duration::from_millis(100));
            }
            peak
        })
    };
    let driver = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e/overload_driver.py");
    let out = Command::new(test_python())
        .args([driver, &format!("http://127.0.0.1:{port}"), STREAMS, "4"])
        .output()
        .expect("running the overload driver (is the test venv installed?)");
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let peak = sampler.join().expect("the RSS sampler");
    let log = String::from_utf8_lossy(&out.stdout);
    println!("{log}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the overload driver failed: {log}");
    let rounds: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON round line"))
        .collect();
    assert_eq!(rounds.len(), 2, "{log}");
    let count = |round: &serde_json::Value, status: &str| round["statuses"][status].as_u64();
    let n: u64 = STREAMS.parse().unwrap();

    // Without retries: some refused with 429 + Retry-After, every admitted one finished.
    let refused = &rounds[0];
    let limited = count(refused, "rate_limited").unwrap_or(0);
    let ok = count(refused, "ok").unwrap_or(0);
    assert!(
        limited > 0,
        "no 429 at 16 streams over 2 + 2 slots: {refused}"
    );
    assert!(
        ok >= 2,
        "fewer than the running slots were served: {refused}"
    );
    assert_eq!(
        ok + limited,
        n,
        "a request neither finished nor refused: {refused}"
    );
    let retry_after = refused["retry_after"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(retry_after.len() as u64, limited, "{refused}");
    assert!(
        retry_after.iter().all(|v| v == "1"),
        "every 429 carries Retry-After: 1: {refused}"
    );

    // With the SDK's retries: all through.
    let retried = &rounds[1];
    assert_eq!(count(retried, "ok"), Some(n), "{retried}");

    assert_eq!(wait_until_idle(port), (0.0, 0.0), "requests left behind");
    let after = rss_mib(pid);
    println!("rss idle {idle:.0} MiB, peak {peak:.0} MiB, after {after:.0} MiB");
    assert!(
        peak <= idle + RSS_MARGIN_MIB && after <= idle + RSS_MARGIN_MIB,
        "RSS went from {idle:.0} MiB to a peak of {peak:.0} MiB ({after:.0} MiB after)"
    );
}

/// Issue 16, aggregated: `turbine up` serving the tiny Idefics3 fixture (an HF directory with
/// a vision tower), driven by the official client with images as data: URIs. The answers
/// equal transformers' greedy tokens (decoded by HF `tokenizers`, committed in
/// tests/fixtures/tiny-idefics3/serving.json); the same text with another image reuses
/// none of the first image's KV, the same image again is a prefix-cache hit; bad images are
/// 400s and the next request is served.
#[test]
fn images_through_the_openai_client_match_transformers() {
    let python = test_python();
    assert!(
        python.exists(),
        "{} is missing: run scripts/setup-test-deps.sh (scripts/test.sh does)",
        python.display()
    );
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-idefics3");
    let server = spawn_turbine(
        &["up", "--port", "0", "--no-fetch", "--model", fixture],
        "turbine serving",
    );
    let port = server.http_port();
    let driver = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e/vlm_e2e.py");
    let out = Command::new(&python)
        .arg(driver)
        .arg(format!("http://127.0.0.1:{port}"))
        .arg(fixture)
        .output()
        .expect("running the vlm driver");
    let log = String::from_utf8_lossy(&out.stdout);
    println!("{log}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the vlm driver failed:\n{log}");
    let (used, running) = wait_until_idle(port);
    assert_eq!(
        (used, running),
        (0.0, 0.0),
        "KV blocks or requests left over"
    );
}

/// A cluster file serving the Idefics3 fixture with `groups` (YAML flow mappings).
fn vlm_cluster(tag: &str, http: u16, plane: u16, groups: &[&str]) -> std::path::PathBuf {
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-idefics3");
    let mut yaml = format!("model: {{path: \"{fixture}\"}}\nhttp: {{port: {http}}}\nworkers:\n");
    for g in groups {
        yaml.push_str(&format!("  - {g}\n"));
    }
    yaml.push_str(&format!(
        "transport: {{bind: \"127.0.0.1:{plane}\", call_timeout_ms: 3000}}\n\
         discovery: {{backend: embedded, registry: \"tcp://127.0.0.1:{plane}\", lease_ms: 600}}\n"
    ));
    common::cluster_file(tag, &yaml)
}

/// Runs tests/e2e/vlm_e2e.py against `port` (`quick`: one request) and fails on its failure.
fn vlm_driver(port: u16, quick: bool) {
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-idefics3");
    let driver = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e/vlm_e2e.py");
    let mut cmd = Command::new(test_python());
    cmd.arg(driver)
        .arg(format!("http://127.0.0.1:{port}"))
        .arg(fixture);
    if quick {
        cmd.arg("--quick");
    }
    let out = cmd.output().expect("running the vlm driver");
    let log = String::from_utf8_lossy(&out.stdout);
    println!("{log}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the vlm driver failed:\n{log}");
}

fn encoder_images(port: u16, outcome: &str) -> f64 {
    common::sample(
        port,
        &format!("turbine_encoder_images_total{{outcome=\"{outcome}\"}}"),
    )
}

/// Issue 16, E/P/D in one process: an encoder worker beside an aggregated one. Same answers
/// as in-process encoding (the reference), the encoder's cache serves the repeated image,
/// no image was left to the worker.
#[test]
fn images_through_an_encoder_worker_match_transformers_and_hit_its_cache() {
    let (http_port, plane) = (common::free_port(), common::free_port());
    let file = vlm_cluster(
        "vlm-enc",
        http_port,
        plane,
        &[
            "{role: encoder, embedding_cache_bytes: 1048576}",
            "{role: aggregated, kv_blocks: 64, threads: 1}",
        ],
    );
    let _server = spawn_turbine(
        &["up", "-f", file.to_str().unwrap(), "--no-fetch"],
        "turbine serving",
    );
    vlm_driver(http_port, false);
    assert!(
        encoder_images(http_port, "encoded") >= 2.0,
        "a and b encoded by the encoder"
    );
    assert!(
        encoder_images(http_port, "cached") >= 3.0,
        "image a again came from the encoder's cache"
    );
    assert_eq!(encoder_images(http_port, "local"), 0.0);
}

/// Issue 16, an encoder in a process of its own (`turbine worker --role encoder`), its
/// embeddings pulled over ZeroMQ by the frontend process's worker; once it dies, requests
/// with images are still answered, the same, by the worker encoding them itself.
#[test]
fn an_encoder_process_serves_and_its_loss_costs_no_request() {
    let (http_port, plane) = (common::free_port(), common::free_port());
    let file = vlm_cluster(
        "vlm-encp",
        http_port,
        plane,
        &[
            "{role: encoder, remote: true}",
            "{role: aggregated, kv_blocks: 64, threads: 1}",
        ],
    );
    let file = file.to_str().unwrap();
    let _server = spawn_turbine(&["up", "-f", file, "--no-fetch"], "turbine serving");
    let encoder = spawn_turbine(
        &[
            "worker",
            "-f",
            file,
            "--role",
            "encoder",
            "--bind",
            "127.0.0.1:0",
            "--no-fetch",
        ],
        "registered with",
    );
    // Discovery tells the frontend soon after; until then the worker encodes (also right).
    let deadline = Instant::now() + Duration::from_secs(30);
    while encoder_images(http_port, "encoded") == 0.0 && Instant::now() < deadline {
        vlm_driver(http_port, true);
    }
    assert!(
        encoder_images(http_port, "encoded") >= 1.0,
        "the encoder process was never used"
    );
    // Again: the encoder's cache answers, the worker pulls the embeddings over ZeroMQ.
    vlm_driver(http_port, true);
    assert!(encoder_images(http_port, "cached") >= 1.0);

    drop(encoder);
    let local = encoder_images(http_port, "local");
    // Whether the frontend still lists it (lease not yet expired: the call fails) or not,
    // the answer is the same.
    vlm_driver(http_port, true);
    std::thread::sleep(Duration::from_millis(1500));
    vlm_driver(http_port, true);
    assert!(
        encoder_images(http_port, "local") >= local + 2.0,
        "the worker encoded once the encoder was gone"
    );
}
