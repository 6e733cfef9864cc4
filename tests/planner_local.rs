//! The planner's local connector end to end: `turbine up` with a `planner:` section, load
//! rises -> the planner starts `turbine worker` processes, which join through discovery and
//! serve; load stops -> after the cooldown each is taken out of routing, drained, sent
//! SIGTERM and exits. No request fails. Two clusters: aggregated (one worker in its
//! process, at most two), and disaggregated (one prefill and one decode worker in its
//! process, at most two of each: the long prompts are prefilled remotely, on the prefill
//! child too, and their KV crosses to the decode workers).
//!
//! The profiles are hand-made so that any load needs two workers of every pool (one decode
//! sequence per worker meets the ITL target, at 2 tokens/s; a prompt token takes a second
//! to prefill) and no load needs none: the decisions do not depend on how fast this
//! machine is. Needs the default model (`scripts/test.sh`).

mod common;

use common::{cluster_file, free_port, gauge, http, per_worker};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

const PROFILE: &str = "name: planner-test\nplaceholder: true\nnotes: test fixture\n\
step_time: {base_us: 10000.0, per_prefill_token_us: 10.0, per_decode_seq_us: 490000.0, per_context_token_us: 0.0}\n\
kv: {num_blocks: 1024, block_size: 16}\n\
scheduler: {max_num_batched_tokens: 512, max_num_seqs: 8, max_model_len: 2048, enable_chunked_prefill: true}\n";

/// Decode as in [`PROFILE`]; prefill at 1 s per prompt token: the TTFT target is out of
/// reach, and the need is the prompt tokens per second at full use, two workers (the
/// pool's most) for any stream of prompts.
const DISAGG_PROFILE: &str = "name: planner-disagg-test\nplaceholder: true\nnotes: test fixture\n\
step_time: {base_us: 10000.0, per_prefill_token_us: 1000000.0, per_decode_seq_us: 490000.0, per_context_token_us: 0.0}\n\
kv: {num_blocks: 1024, block_size: 16}\n\
scheduler: {max_num_batched_tokens: 512, max_num_seqs: 8, max_model_len: 2048, enable_chunked_prefill: true}\n";

struct Frontend {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Drop for Frontend {
    /// SIGTERM first, so `turbine up` stops the worker processes its planner started (a
    /// SIGKILL would leave them running after a failed test); SIGKILL after 20 s.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
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

/// Starts `turbine up -f file` (its profile written next to it) and waits until it serves.
fn start_up(file: &std::path::Path, profile: &str) -> Frontend {
    std::fs::write(file.with_file_name("profile.yaml"), profile).unwrap();
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
    up
}

/// Clients sending completions in a loop until stopped; every answer must be a 200.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    clients: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    /// `clients` threads, each sending the bodies `body(client, n)` for n = 0, 1, ...
    fn start(port: u16, clients: usize, body: fn(usize, u64) -> String) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let clients = (0..clients)
            .map(|i| {
                let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
                std::thread::spawn(move || {
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let (status, text) = http(port, "POST", "/v1/completions", &body(i, n));
                        n += 1;
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
        Load {
            stop,
            ok,
            failed,
            clients,
        }
    }

    /// Stops the clients; (answered, failed).
    fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for c in self.clients {
            c.join().unwrap();
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// The worker id (`w12`) in a line.
fn worker_in(line: &str) -> String {
    line.split_whitespace()
        .find(|w| w.starts_with('w') && w[1..].parse::<u64>().is_ok())
        .unwrap_or_else(|| panic!("a worker id in {line:?}"))
        .to_string()
}

/// Polls (bounded) until `done` says yes; a failure shows the routing and worker series of
/// the frontend on `port`'s /metrics.
fn wait_until(port: u16, what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        if Instant::now() >= deadline {
            let (_, text) = http(port, "GET", "/metrics", "");
            let series: Vec<&str> = text
                .lines()
                .filter(|l| !l.starts_with('#') && l.contains("worker=\""))
                .chain(text.lines().filter(|l| l.starts_with("turbine_disagg")))
                .collect();
            panic!(
                "{what}: not within {within:?}; /metrics:\n{}",
                series.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
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
    let up = start_up(&file, PROFILE);
    let load = Load::start(port, 3, |i, _| {
        format!(r#"{{"prompt":"Client {i} counts: one, two,","max_tokens":8,"temperature":0}}"#)
    });

    up.wait_line("started a worker process", Duration::from_secs(60));
    let worker = worker_in(&up.wait_line("serving", Duration::from_secs(120)));
    wait_until(
        port,
        &format!("the planner's worker {worker} routed to"),
        Duration::from_secs(60),
        || decisions_for(port, &worker) > 0,
    );

    let (ok, failed) = load.stop();
    up.wait_line("stopping a worker process", Duration::from_secs(60));
    let exited = up.wait_line("exited", Duration::from_secs(60));
    assert!(exited.contains("exit status: 0"), "{exited}");
    assert_eq!(failed, 0, "requests failed");
    assert!(ok > 0);
    // The floor still serves.
    let (status, body) = http(
        port,
        "POST",
        "/v1/completions",
        r#"{"prompt":"Hi","max_tokens":2}"#,
    );
    assert_eq!(status, 200, "{body}");
}

/// A prompt of about 270 tokens that shares no block with any other (its number first):
/// one scheduler step (512 tokens) prefills it, so no load report of the prefill worker
/// ever shows it busy; the router keeps it pending there until the prefill is done, or
/// the child (ties go to the lowest worker id) would never be picked.
fn long_prompt(client: usize, n: u64) -> String {
    let notes: Vec<String> = (0..20)
        .map(|k| format!("Note {k}: the river was calm and the weather mild."))
        .collect();
    format!(
        r#"{{"prompt":"Request {n} of client {client}. {}","max_tokens":8,"temperature":0}}"#,
        notes.join(" ")
    )
}

#[test]
fn load_starts_prefill_and_decode_worker_processes_and_its_end_drains_and_stops_them() {
    let (port, plane) = (free_port(), free_port());
    let file = cluster_file(
        "planner-disagg",
        &format!(
            "http: {{port: {port}}}\n\
             workers:\n  \
             - {{role: prefill, replicas: 1, kv_blocks: 256, threads: 1, max_num_seqs: 8}}\n  \
             - {{role: decode, replicas: 1, kv_blocks: 256, threads: 1, max_num_seqs: 8}}\n\
             disaggregation: {{remote_prefill_min_tokens: 32, remote_prefill_timeout_ms: 120000,\n  \
               transfer: {{bind: \"127.0.0.1:0\"}}}}\n\
             migration: {{liveness_timeout_ms: 120000}}\n\
             transport: {{bind: \"127.0.0.1:{plane}\", events_bind: \"127.0.0.1:0\"}}\n\
             discovery: {{backend: embedded, lease_ms: 3000}}\n\
             planner:\n  profile: profile.yaml\n  adjustment_interval_ms: 1000\n  \
             ttft_ms: 5000\n  itl_ms: 600\n  predictor: {{kind: constant}}\n  \
             correction: false\n  min_replicas: 1\n  max_replicas: 2\n  cooldown_ms: 30000\n  \
             connector: {{kind: local, drain_timeout_ms: 30000}}\n"
        ),
    );
    let up = start_up(&file, DISAGG_PROFILE);
    let remote_before = remote_prefills(port);
    // Enough clients that prefills overlap: the child is chosen while the floor's prefill
    // worker is busy.
    let load = Load::start(port, 6, long_prompt);

    // The planner's children, from its lines: (group, id) of each that served; how many
    // it started and how many exited (each with status 0).
    let mut children = Children::default();
    let routed_and_prefilled = |children: &mut Children| {
        children.read(&up);
        let cached = per_worker(port, "turbine_kv_blocks_cached");
        let decoded = children.of(1).iter().any(|w| decisions_for(port, w) > 0);
        let prefilled = children
            .of(0)
            .iter()
            .any(|w| cached.get(w).is_some_and(|&b| b > 0.0));
        decoded && prefilled
    };
    // A decode child is routed to, and a prefill child computed prompts: it keeps their
    // blocks in its prefix cache (its load reports, on the frontend's /metrics).
    wait_until(
        port,
        "a decode child routed to and a prefill child prefilling",
        Duration::from_secs(300),
        || routed_and_prefilled(&mut children),
    );

    let (ok, failed) = load.stop();
    wait_until(
        port,
        "every child drained and exited",
        Duration::from_secs(180),
        || {
            children.read(&up);
            children.started > 0 && children.exited == children.started
        },
    );
    assert_eq!(failed, 0, "requests failed");
    assert!(ok > 0);
    // The long prompts went remote and their KV crossed to the decode workers.
    assert!(
        remote_prefills(port) > remote_before,
        "no remote prefill counted"
    );
    assert!(gauge(port, "turbine_disagg_transfers_total") > 0.0);
    assert!(gauge(port, "turbine_disagg_transfer_blocks_total") > 0.0);
    // A remote prefill that reaches a prefill child after it was told to stop falls back
    // to a local prefill on the decode worker: served, not failed (docs/PLANNER.md).
    let (_, text) = http(port, "GET", "/metrics", "");
    for l in text
        .lines()
        .filter(|l| l.starts_with("turbine_disagg_prefill_fallbacks_total"))
    {
        eprintln!("remote prefills given up: {l}");
    }
    // The floors still serve, the long prompt remotely too.
    let (status, body) = http(port, "POST", "/v1/completions", &long_prompt(9, 0));
    assert_eq!(status, 200, "{body}");
}

/// What the planner's lines said of its children.
#[derive(Default)]
struct Children {
    /// (group, worker id) of each child that served.
    serving: Vec<(usize, String)>,
    started: usize,
    exited: usize,
}

impl Children {
    /// Takes in the lines printed so far.
    fn read(&mut self, up: &Frontend) {
        while let Ok(line) = up.lines.try_recv() {
            if line.contains("started a worker process") {
                self.started += 1;
            } else if line.contains("exited") && line.contains("turbine planner") {
                assert!(line.contains("exit status: 0"), "{line}");
                self.exited += 1;
            } else if line.contains("turbine planner: worker process") && line.contains("serving") {
                let group = usize::from(!line.contains("of group 0"));
                self.serving.push((group, worker_in(&line)));
            }
        }
    }

    fn of(&self, group: usize) -> Vec<String> {
        self.serving
            .iter()
            .filter(|(g, _)| *g == group)
            .map(|(_, w)| w.clone())
            .collect()
    }
}

/// Prefills decided remote so far (the frontend's /metrics).
fn remote_prefills(port: u16) -> f64 {
    let (_, text) = http(port, "GET", "/metrics", "");
    text.lines()
        .filter(|l| l.starts_with("turbine_disagg_prefill_decisions_total{decision=\"remote\"}"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
