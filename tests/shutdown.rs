//! Ctrl-C (SIGINT) drains: a stream in flight when the signal arrives runs to its end
//! (`data: [DONE]`), new connections are refused, and the process exits cleanly.
//!
//! Needs the default model (`scripts/setup-test-deps.sh`, run by `scripts/test.sh`).

mod common;

use common::{free_port, send_request, spawn_turbine};
use std::io::{BufRead, BufReader, Read};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

#[cfg(unix)]
#[test]
fn sigint_drains_the_stream_in_flight_then_exits() {
    let port = free_port();
    let mut server = spawn_turbine(
        &["up", "--no-fetch", "--port", &port.to_string()],
        "turbine serving",
    );
    let body = r#"{"prompt":"Once upon a time","max_tokens":48,"temperature":0,"stream":true,"ignore_eos":true}"#;
    let s = send_request(port, "POST", "/v1/completions", body);
    // Wait for the first streamed token, then interrupt the server.
    let mut reader = BufReader::new(s);
    let mut seen = String::new();
    while !seen.contains("data: {") {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        seen.push_str(&line);
    }
    assert!(seen.contains("data: {"), "no first token: {seen}");
    let pid = server.child.id().to_string();
    let sent = Command::new("kill").args(["-INT", &pid]).status().unwrap();
    assert!(sent.success());

    // New connections are refused once the signal is handled (bounded wait).
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_ok() {
        assert!(Instant::now() < deadline, "still accepting after SIGINT");
        std::thread::sleep(Duration::from_millis(50));
    }

    // The stream in flight still runs to its end.
    let mut rest = String::new();
    reader.read_to_string(&mut rest).expect("the stream ends");
    let all = seen + &rest;
    let tokens = all.matches("data: {").count();
    assert!(all.contains("data: [DONE]"), "stream cut short: {all}");
    assert!(all.contains("\"finish_reason\":\"length\""), "{all}");
    assert!(tokens >= 48, "only {tokens} chunks arrived: {all}");

    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = server.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "turbine did not exit after draining"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status after SIGINT: {status:?}");
}
