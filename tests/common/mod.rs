//! What the integration tests share: starting the `turbine` binary and waiting until it
//! serves, plain HTTP/1.1 requests with a read timeout (a test never hangs), and reading
//! gauges from `/metrics`.
#![allow(dead_code)] // each test binary uses its own subset

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

/// Writes `yaml` as `cluster.yaml` in a directory of its own (named by `tag` and this
/// process) and returns its path.
pub fn cluster_file(tag: &str, yaml: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("turbine-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("cluster.yaml");
    std::fs::write(&file, yaml).unwrap();
    file
}

/// The Python with the official `openai` client: $TURBINE_TEST_PYTHON (set by
/// scripts/test.sh), else the test venv `scripts/setup-test-deps.sh` installs.
pub fn test_python() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("TURBINE_TEST_PYTHON") {
        return std::path::PathBuf::from(p);
    }
    let home = std::env::var_os("HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_default();
    home.join(".cache/turbine/test-venv/bin/python")
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A running `turbine` process, killed when dropped.
pub struct Turbine {
    pub child: Child,
    /// The HTTP port from the "turbine serving ... http://HOST:PORT" line, when it printed one.
    pub port: Option<u16>,
    /// The stdout line it was waited for (e.g. "turbine worker w12 serving on ...").
    pub ready_line: String,
}

impl Drop for Turbine {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Turbine {
    /// The HTTP port; panics if the process printed none (a test bug).
    pub fn http_port(&self) -> u16 {
        self.port
            .expect("this turbine process prints no HTTP address")
    }
}

/// Spawns `turbine ARGS` and waits for a stdout line containing `ready`; stdout keeps being
/// drained afterwards so the process never blocks on a full pipe.
pub fn spawn_turbine(args: &[&str], ready: &str) -> Turbine {
    spawn_turbine_with(args, &[], ready)
}

/// [`spawn_turbine`] with extra environment variables (a test's fault hooks).
pub fn spawn_turbine_with(args: &[&str], env: &[(&str, &str)], ready: &str) -> Turbine {
    let mut child = Command::new(env!("CARGO_BIN_EXE_turbine"))
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawning turbine");
    let stdout: ChildStdout = child.stdout.take().expect("stdout is piped");
    let mut lines = BufReader::new(stdout).lines();
    let line = loop {
        match lines.next() {
            Some(Ok(l)) if l.contains(ready) => break l,
            Some(Ok(_)) => continue,
            _ => {
                let status = child.wait().ok();
                panic!(
                    "turbine {args:?} exited ({status:?}) before printing {ready:?}; is the \
                     default model fetched? run scripts/setup-test-deps.sh"
                );
            }
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Turbine {
        child,
        port: port_in(&line),
        ready_line: line,
    }
}

/// [`spawn_turbine_with`] with stderr captured: every stderr line the process writes is
/// appended to the returned list (by a thread that reads until the process exits).
pub fn spawn_turbine_capturing(
    args: &[&str],
    env: &[(&str, &str)],
    ready: &str,
) -> (Turbine, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_turbine"))
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning turbine");
    let captured = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let stderr = child.stderr.take().expect("stderr is piped");
    let sink = captured.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap_or_else(|p| p.into_inner()).push(line);
        }
    });
    let stdout: ChildStdout = child.stdout.take().expect("stdout is piped");
    let mut lines = BufReader::new(stdout).lines();
    let line = loop {
        match lines.next() {
            Some(Ok(l)) if l.contains(ready) => break l,
            Some(Ok(_)) => continue,
            _ => {
                let status = child.wait().ok();
                let err = captured
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .join("\n");
                panic!("turbine {args:?} exited ({status:?}) before printing {ready:?}:\n{err}");
            }
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let turbine = Turbine {
        child,
        port: port_in(&line),
        ready_line: line,
    };
    (turbine, captured)
}

fn port_in(line: &str) -> Option<u16> {
    let rest = line.split("http://").nth(1)?;
    let addr = rest.split(|c: char| c.is_whitespace() || c == ')').next()?;
    addr.rsplit(':').next()?.parse().ok()
}

/// Sends one HTTP/1.1 request (`Connection: close`) and returns the open connection, for
/// tests that read a streamed answer as it arrives. Reads time out after two minutes.
pub fn send_request(port: u16, method: &str, path: &str, body: &str) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    s
}

/// One HTTP/1.1 request; returns (status, body). Fails the test instead of hanging when the
/// server does not answer within two minutes.
pub fn http(port: u16, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut out = String::new();
    if let Err(e) = send_request(port, method, path, body).read_to_string(&mut out) {
        panic!("no answer from the server to {method} {path} ({e}); got so far: {out}");
    }
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    (status, body)
}

/// The value of one sample of /metrics, named with its labels as the exposition writes them
/// (`turbine_router_decisions_total{worker="w3"}`); 0 when absent.
pub fn sample(port: u16, series: &str) -> f64 {
    let (_, text) = http(port, "GET", "/metrics", "");
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// Sum over all label sets of the metric `name`, from /metrics.
pub fn gauge(port: u16, name: &str) -> f64 {
    let (_, text) = http(port, "GET", "/metrics", "");
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A greedy completion body (`ignore_eos`, so it runs `max_tokens` long).
pub fn completion_body(prompt: &str, max_tokens: u32, stream: bool) -> String {
    serde_json::json!({
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": true,
        "stream": stream,
    })
    .to_string()
}

/// A non-streaming two-token completion; returns (prompt_tokens, cached_tokens) from its
/// usage.
pub fn complete_usage(port: u16, prompt: &str) -> (u64, u64) {
    let (status, body) = http(
        port,
        "POST",
        "/v1/completions",
        &completion_body(prompt, 2, false),
    );
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
    let usage = &v["usage"];
    (
        usage["prompt_tokens"].as_u64().expect("prompt_tokens"),
        usage["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .expect("cached_tokens"),
    )
}

/// Per-worker values of one labelled metric family, from /metrics.
pub fn per_worker(port: u16, name: &str) -> std::collections::BTreeMap<String, f64> {
    let (status, text) = http(port, "GET", "/metrics", "");
    assert_eq!(status, 200);
    let prefix = format!("{name}{{worker=\"");
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (worker, rest) = rest.split_once('"')?;
            let value = rest.rsplit(' ').next()?.parse().ok()?;
            Some((worker.to_string(), value))
        })
        .collect()
}

/// The router's decisions per worker.
pub fn decisions(port: u16) -> std::collections::BTreeMap<String, f64> {
    per_worker(port, "turbine_router_decisions_total")
}
