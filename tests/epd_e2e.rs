//! Encode / prefill / decode across processes on the CPU, with the tiny Idefics3 fixture
//! (tests/fixtures/tiny-idefics3): `turbine up` (frontend, router, registry; no local
//! workers), two `turbine worker --role encoder`, one `--role prefill` and one `--role
//! decode`, driven by the official `openai` client (tests/e2e/epd_driver.py).
//!
//! - The answers equal in-process aggregated serving (`turbine up --model FIXTURE`, run
//!   first), image prompts prefilled remotely (their KV crossed to the decode worker), every
//!   image encoded by an encoder and by no worker (`turbine_worker_images_encoded` of the
//!   prefill and the decode worker stay 0: the decode worker needs only the KV);
//! - the same image again is a prefix-cache hit (`cached_tokens`, the router's overlap on
//!   /metrics) and an encoder-cache hit (`turbine_encoder_images_total{outcome="cached"}`);
//! - bad images are 400s naming the part, and the next good request is served;
//! - images by http URL from a local HTTP server the driver runs (no internet) are fetched by
//!   the frontend within `http.images` (size, time, redirects, allowed hosts): the same
//!   answer and cache hits as inline, each failure a 400 that says why; with
//!   `remote_urls: false` (the reference server) a URL is refused;
//! - an encoder killed while it holds a request (the test-only hook
//!   `TURBINE_FAULT_STALL_FILE` keeps it busy until the kill) costs nothing but time: the
//!   request is retried on the other encoder (`turbine_encoder_failed_calls_total`) and
//!   answered the same, within the client's timeout.
//!
//! Needs the test venv (`scripts/setup-test-deps.sh`, run by `scripts/test.sh`).

mod common;

use common::{cluster_file, free_port, gauge, http, sample, spawn_turbine, spawn_turbine_with};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-idefics3");
const DRIVER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e/epd_driver.py");

/// One answer as the driver prints it.
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
struct Answer {
    name: String,
    text: String,
    prompt_tokens: u64,
    cached_tokens: u64,
}

fn driver(port: u16, args: &[&str]) -> Command {
    let python = common::test_python();
    assert!(
        python.exists(),
        "{} is missing: run scripts/setup-test-deps.sh (scripts/test.sh does)",
        python.display()
    );
    let mut cmd = Command::new(python);
    cmd.arg(DRIVER)
        .arg(format!("http://127.0.0.1:{port}"))
        .arg(FIXTURE)
        .args(args);
    cmd
}

/// Waits (bounded) for `child` and returns its stdout; fails the test if it fails or hangs.
fn finish(mut child: Child, what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        match child.try_wait().expect("waiting for the driver") {
            Some(_) => break,
            None if Instant::now() > deadline => {
                let _ = child.kill();
                panic!("the driver ({what}) did not finish in 300 s");
            }
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    let out = child.wait_with_output().expect("the driver's output");
    let log = String::from_utf8_lossy(&out.stdout).to_string();
    eprintln!("{log}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the driver ({what}) failed:\n{log}");
    log
}

/// Runs the driver in `mode` (no arguments) to its end.
fn run_driver(port: u16, mode: &str) {
    let child = driver(port, &[mode])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running the driver");
    finish(child, mode);
}

fn start_ask(port: u16, names: &[&str]) -> Child {
    let mut args = vec!["ask"];
    args.extend(names);
    driver(port, &args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running the driver")
}

fn answers(log: &str) -> Vec<Answer> {
    log.lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("an answer line"))
        .collect()
}

/// Asks for `names` in order; returns their answers.
fn ask(port: u16, names: &[&str]) -> Vec<Answer> {
    let got = answers(&finish(start_ask(port, names), "ask"));
    assert_eq!(got.len(), names.len());
    got
}

fn metric(port: u16, series: &str) -> f64 {
    sample(port, series)
}

fn encoder_images(port: u16, outcome: &str) -> f64 {
    metric(
        port,
        &format!("turbine_encoder_images_total{{outcome=\"{outcome}\"}}"),
    )
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

/// Polls (bounded) until `ok` holds.
fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ok() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The marker the stall hook writes while it holds work (see `turbine_actors::fault`).
fn holding(stall: &Path) -> PathBuf {
    let mut name = stall.as_os_str().to_owned();
    name.push(".holding");
    PathBuf::from(name)
}

#[test]
fn encoder_prefill_and_decode_processes_serve_images_like_aggregated() {
    let first = ["a", "b:stream", "g1"];
    // Aggregated reference: one process, the vision tower on its worker; it fetches no
    // image URL.
    let reference: BTreeMap<String, Answer> = {
        let port = free_port();
        let file = cluster_file(
            "epd-agg",
            &format!(
                "model: {{path: \"{FIXTURE}\"}}\n\
                 http: {{port: {port}, images: {{remote_urls: false}}}}\n\
                 workers:\n  - {{replicas: 1, kv_blocks: 64, threads: 1}}\n"
            ),
        );
        let _server = spawn_turbine(
            &["up", "-f", file.to_str().unwrap(), "--no-fetch"],
            "turbine serving",
        );
        let answers = ask(port, &["a", "b:stream", "g1", "g2"])
            .into_iter()
            .map(|a| (a.name.split(':').next().unwrap().to_string(), a))
            .collect();
        run_driver(port, "urls-off");
        answers
    };

    let (port, plane) = (free_port(), free_port());
    let file = cluster_file(
        "epd",
        &format!(
            "model: {{path: \"{FIXTURE}\"}}\n\
             http: {{port: {port}, images: {{allowed_hosts: [\"127.0.0.1\"], \
               fetch_timeout_ms: 1000, max_image_bytes: 16384, max_redirects: 2}}}}\n\
             workers:\n  \
             - {{role: encoder, replicas: 2, remote: true, embedding_cache_bytes: 1048576}}\n  \
             - {{role: prefill, replicas: 1, remote: true, kv_blocks: 64, threads: 1}}\n  \
             - {{role: decode, replicas: 1, remote: true, kv_blocks: 64, threads: 1}}\n\
             disaggregation: {{policy: conditional, remote_prefill_min_tokens: 16, \
               remote_prefill_timeout_ms: 60000}}\n\
             migration: {{liveness_timeout_ms: 120000}}\n\
             transport: {{bind: \"127.0.0.1:{plane}\"}}\n\
             discovery: {{backend: embedded, registry: \"127.0.0.1:{plane}\", lease_ms: 3000}}\n"
        ),
    );
    let dir = file.parent().unwrap().to_path_buf();
    let file = file.to_str().unwrap();
    // https image URLs: the driver's https server has a certificate from a test CA, which
    // the frontend trusts through the variable the machine's root store reads.
    let ca = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e/tls/ca.pem");
    let _frontend = spawn_turbine_with(
        &["up", "-f", file, "--no-fetch"],
        &[("SSL_CERT_FILE", ca)],
        "turbine serving",
    );
    let role = |role: &str, env: &[(&str, &str)]| {
        spawn_turbine_with(
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
            env,
            "registered with",
        )
    };
    let stalls: Vec<PathBuf> = (0..2).map(|i| dir.join(format!("stall-{i}"))).collect();
    for s in &stalls {
        let _ = std::fs::remove_file(s);
        let _ = std::fs::remove_file(holding(s));
    }
    let mut encoders: Vec<Option<common::Turbine>> = stalls
        .iter()
        .map(|s| {
            Some(role(
                "encoder",
                &[("TURBINE_FAULT_STALL_FILE", s.to_str().unwrap())],
            ))
        })
        .collect();
    let prefill = role("prefill", &[]);
    let decode = role("decode", &[]);
    let (prefill_id, decode_id) = (
        worker_id(&prefill.ready_line),
        worker_id(&decode.ready_line),
    );
    // Everyone has joined the frontend: both encoders, and both workers' load reports.
    wait_until("both encoders joined", || {
        gauge(port, "turbine_encoders") == 2.0
    });
    wait_until("both workers report their load", || {
        worker_gauge(port, "turbine_kv_blocks_used", &prefill_id).is_some()
            && worker_gauge(port, "turbine_kv_blocks_used", &decode_id).is_some()
    });

    // The same answers as aggregated serving; every image prompt prefilled remotely.
    for got in ask(port, &first) {
        let name = got.name.split(':').next().unwrap();
        let want = &reference[name];
        assert_eq!(
            (&got.text, got.prompt_tokens),
            (&want.text, want.prompt_tokens),
            "{name}: E/P/D answers as aggregated serving"
        );
        assert_eq!(got.cached_tokens, 0, "{name}: first time, nothing cached");
    }
    let remote = metric(
        port,
        "turbine_disagg_prefill_decisions_total{decision=\"remote\"}",
    );
    assert_eq!(remote, 3.0, "each image prompt was prefilled remotely");
    assert_eq!(
        gauge(port, "turbine_disagg_transfers_total"),
        3.0,
        "their KV crossed"
    );
    assert_eq!(gauge(port, "turbine_disagg_prefill_fallbacks_total"), 0.0);
    assert_eq!(
        (
            encoder_images(port, "encoded"),
            encoder_images(port, "local")
        ),
        (3.0, 0.0),
        "every image encoded by an encoder"
    );
    // No worker encoded anything: the prefill worker pulled the encoders' embeddings, the
    // decode worker needed none (read once its report shows the requests done).
    wait_until("the decode worker's report after the requests", || {
        worker_gauge(port, "turbine_requests_running", &decode_id) == Some(0.0)
            && worker_gauge(port, "turbine_kv_blocks_cached", &decode_id).unwrap_or(0.0) > 0.0
    });
    for w in [&prefill_id, &decode_id] {
        assert_eq!(
            worker_gauge(port, "turbine_worker_images_encoded", w),
            Some(0.0),
            "worker {w} ran no image through its vision tower"
        );
    }

    // The same image again: a prefix-cache hit and an encoder-cache hit.
    let overlap = gauge(port, "turbine_router_overlap_blocks_total");
    let again = ask(port, &["a"]).remove(0);
    assert_eq!(again.text, reference["a"].text);
    assert!(
        again.cached_tokens >= 32,
        "image a again: a prefix-cache hit ({} tokens)",
        again.cached_tokens
    );
    assert!(
        gauge(port, "turbine_router_overlap_blocks_total") >= overlap + 2.0,
        "the router saw the cached blocks of the image's prompt"
    );
    assert_eq!(
        encoder_images(port, "cached"),
        1.0,
        "the encoder's cache answered"
    );
    assert_eq!(encoder_images(port, "encoded"), 3.0);

    // Bad images: 400s naming the part, then a good request is served.
    run_driver(port, "bad");

    // Image URLs: fetched within the limits, the same image as inline (cache hits).
    let cached = encoder_images(port, "cached");
    run_driver(port, "urls");
    assert!(
        encoder_images(port, "cached") >= cached + 3.0,
        "image a by URL is image a: the encoder's cache answered"
    );

    // An encoder killed while it holds a request: retried on the other one.
    for s in &stalls {
        std::fs::write(s, b"").expect("creating a stall file");
    }
    let failed = gauge(port, "turbine_encoder_failed_calls_total");
    let encoded = encoder_images(port, "encoded");
    let pending = start_ask(port, &["g2"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let busy = loop {
        if let Some(i) = stalls.iter().position(|s| holding(s).exists()) {
            break i;
        }
        assert!(Instant::now() < deadline, "no encoder ever got the request");
        std::thread::sleep(Duration::from_millis(20));
    };
    drop(encoders[busy].take());
    for s in &stalls {
        let _ = std::fs::remove_file(s);
    }
    let got = answers(&finish(pending, "ask during the kill")).remove(0);
    assert_eq!(
        got.text, reference["g2"].text,
        "answered as if nothing happened"
    );
    assert_eq!(
        gauge(port, "turbine_encoder_failed_calls_total"),
        failed + 1.0,
        "the killed encoder's call failed"
    );
    assert_eq!(
        encoder_images(port, "encoded"),
        encoded + 1.0,
        "the other encoder encoded it"
    );
    assert_eq!(encoder_images(port, "local"), 0.0, "no worker had to");
    drop(encoders);
    let _ = std::fs::remove_dir_all(&dir);
}
