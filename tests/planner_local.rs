//! The planner's local connector end to end: `turbine up` with a `planner:` section (one
//! worker in its process, at most two), load rises -> the planner starts a `turbine worker`
//! process, which joins through discovery and serves; load stops -> after the cooldown it
//! is taken out of routing, drained, sent SIGTERM and exits. No request fails.
//!
//! The profile is hand-made so that any load needs two workers (one decode sequence per
//! worker meets the ITL target, at 2 tokens/s) and no load needs none: the decisions do not
//! depend on how fast this machine is. Needs the default model (`scripts/test.sh`).

mod common;

use common::{cluster_file, free_port, http};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

const PROFILE: &str = "name: planner-test\nplaceholder: true\nnotes: test fixture\n\
step_time: {base_us: 10000.0, per_prefill_token_us: 10.0, per_decode_seq_us: 490000.0, per_context_token_us: 0.0}\n\
kv: {num_blocks: 1024, block_size: 16}\n\
scheduler: {max_num_batched_tokens: 512, max_num_seqs: 8, max_model_len: 2048, enable_chunked_prefill: true}\n";

struct Frontend {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Drop for Frontend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Frontend {
    /// The next stdout line containing `want`, within `within`.
    fn wait_line(&self, want: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(want) => return l,
                Ok(_) => continue,
                Err(_) => panic!("no line with {want:?} within {within:?}"),
            }
        }
    }
}

fn decisions_for(port: u16, worker: &str) -> u64 {
    let (_, text) = http(port, "GET", "/metrics", "");
    let key = format!("turbine_router_decisions_total{{worker=\"{worker}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn load_starts_a_worker_process_and_its_end_drains_and_stops_it() {
    let (port, plane) = (free_port(), free_port());
    let file = cluster_file(
        "planner-local",
        &format!(
            "http: {{port: {port}}}\n\
             workers:\n  - {{replicas: 1, kv_blocks: 256, threads: 1, max_num_seqs: 8}}\n\
             transport: {{bind: \"127.0.0.1:{plane}\"}}\n\
             discovery: {{backend: embedded, lease_ms: 3000}}\n\
             planner:\n  profile: profile.yaml\n  adjustment_interval_ms: 1000\n  \
             ttft_ms: 5000\n  itl_ms: 600\n  predictor: {{kind: constant}}\n  \
             correction: false\n  min_replicas: 1\n  max_replicas: 2\n  cooldown_ms: 3000\n  \
             connector: {{kind: local, drain_timeout_ms: 20000}}\n"
        ),
    );
    std::fs::write(file.with_file_name("profile.yaml"), PROFILE).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_turbine"))
        .args(["up", "-f", file.to_str().unwrap(), "--no-fetch"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawning turbine up");
    let stdout = child.stdout.take().expect("piped");
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            eprintln!("[turbine up] {l}");
            let _ = tx.send(l);
        }
    });
    let up = Frontend { child, lines };
    up.wait_line("turbine serving", Duration::from_secs(120));

    // Load: three clients in a loop until told to stop; every answer must be a 200.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let clients: Vec<_> = (0..3)
        .map(|i| {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let body = format!(
                        r#"{{"prompt":"Client {i} counts: one, two,","max_tokens":8,"temperature":0}}"#
                    );
                    let (status, text) = http(port, "POST", "/v1/completions", &body);
                    if status == 200 {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        eprintln!("request failed: {status} {text}");
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();

    up.wait_line("started a worker process", Duration::from_secs(60));
    let serving = up.wait_line("serving", Duration::from_secs(120));
    let worker = serving
        .split_whitespace()
        .find(|w| w.starts_with('w') && w[1..].parse::<u64>().is_ok())
        .expect("a worker id in the serving line")
        .to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    while decisions_for(port, &worker) == 0 {
        assert!(
            Instant::now() < deadline,
            "the planner's worker {worker} was never routed to"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    up.wait_line("stopping a worker process", Duration::from_secs(60));
    let exited = up.wait_line("exited", Duration::from_secs(60));
    assert!(exited.contains("exit status: 0"), "{exited}");
    assert_eq!(failed.load(Ordering::Relaxed), 0, "requests failed");
    assert!(ok.load(Ordering::Relaxed) > 0);
    // The floor still serves.
    let (status, body) = http(
        port,
        "POST",
        "/v1/completions",
        r#"{"prompt":"Hi","max_tokens":2}"#,
    );
    assert_eq!(status, 200, "{body}");
}
