//! Observability end to end, through the `turbine` binary and the official `openai` client
//! (tests/e2e/observability_driver.py):
//!
//! 1. Traces: an OTLP/gRPC receiver inside the test (a tonic server of the OTLP
//!    `TraceService`, decoding the protobuf export), a frontend process (`turbine up`) and a
//!    worker process (`turbine worker`), both exporting to it. A streamed chat completion
//!    that sends a W3C `traceparent` is one trace across both processes: the frontend's
//!    `request` span is a child of the client's span, the worker's spans (its `serve` span,
//!    then `queue`, `prefill`, `decode`) hang under the frontend's across the request plane,
//!    and every parent link points at a span of the same trace. A request without
//!    `traceparent` starts a trace of its own, joined by the worker too. Disaggregated
//!    (frontend, prefill and decode processes), the prefill worker's `queue`, `prefill`,
//!    `kv_export` and the decode worker's `kv_transfer`, `queue`, `decode` are one trace.
//! 2. Logs: `turbine up --log-format json`: every stderr line is a JSON object, and every
//!    line a request causes (the handler, routing, the worker, its loop, the SSE stream, the
//!    end of the response) names that request's id, the one in its `x-request-id` response
//!    header (the client's own, or a fresh one).
//!
//! Needs the default model and the test venv (`scripts/setup-test-deps.sh`).

mod common;

use common::{cluster_file, free_port, spawn_turbine_capturing, spawn_turbine_with, test_python};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value::Value, KeyValue};
use std::collections::HashMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MODEL: &str = "SmolLM2-135M-Instruct";

/// One span as the receiver decoded it, with the resource it came from.
#[derive(Clone, Debug)]
struct Received {
    trace_id: String,
    span_id: String,
    /// Empty for a root span.
    parent: String,
    name: String,
    start_ns: u64,
    pid: i64,
    service: String,
    role: String,
}

/// The OTLP receiver: keeps every span exported to it.
#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<Received>>>);

impl Receiver {
    fn spans(&self) -> Vec<Received> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = Vec::new();
        for rs in request.into_inner().resource_spans {
            let attrs = rs.resource.map(|r| r.attributes).unwrap_or_default();
            let pid = match attr(&attrs, "process.pid") {
                Some(Value::IntValue(p)) => *p,
                _ => -1,
            };
            let text = |key| match attr(&attrs, key) {
                Some(Value::StringValue(s)) => s.clone(),
                _ => String::new(),
            };
            let (service, role) = (text("service.name"), text("turbine.role"));
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                got.push(Received {
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent: hex(&span.parent_span_id),
                    name: span.name,
                    start_ns: span.start_time_unix_nano,
                    pid,
                    service: service.clone(),
                    role: role.clone(),
                });
            }
        }
        self.0.lock().unwrap_or_else(|p| p.into_inner()).extend(got);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// Starts the receiver on a free port of `rt`; returns it and the port.
fn start_receiver(rt: &tokio::runtime::Runtime) -> (Receiver, u16) {
    let receiver = Receiver::default();
    let _in_runtime = rt.enter();
    let incoming = tonic::transport::server::TcpIncoming::bind(([127, 0, 0, 1], 0).into())
        .expect("binding the OTLP receiver");
    let port = incoming.local_addr().expect("its address").port();
    let server = tonic::transport::Server::builder()
        .serve_with_incoming(TraceServiceServer::new(receiver.clone()), incoming);
    rt.spawn(server);
    (receiver, port)
}

/// Runs the openai-client driver; returns the request ids the server answered its streamed
/// and its plain request with.
fn drive(port: u16, client_id: &str, traceparent: Option<&str>) -> (String, String) {
    let driver = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/e2e/observability_driver.py"
    );
    let base = format!("http://127.0.0.1:{port}/v1");
    let mut args = vec![driver, &base, MODEL, client_id];
    args.extend(traceparent);
    let out = Command::new(test_python())
        .args(&args)
        .output()
        .expect("running the observability driver (is the test venv installed?)");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && log.contains("observability: all passed"),
        "the openai-client driver failed:\n{log}"
    );
    let id = |kind: &str| {
        log.lines()
            .find_map(|l| l.strip_prefix(kind)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("the driver printed no {kind} id:\n{log}"))
            .to_string()
    };
    (id("stream"), id("plain"))
}

/// Polls `ready` (bounded) and fails with `what` when it never holds.
fn wait_until(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn by_name<'a>(spans: &'a [Received], name: &str) -> Vec<&'a Received> {
    spans.iter().filter(|s| s.name == name).collect()
}

/// The only span named `name` of `spans` from process `pid`.
fn one<'a>(spans: &'a [Received], name: &str, pid: i64) -> &'a Received {
    let found: Vec<_> = by_name(spans, name)
        .into_iter()
        .filter(|s| s.pid == pid)
        .collect();
    assert_eq!(found.len(), 1, "one {name} span from {pid}, got {spans:#?}");
    found[0]
}

/// Checks that `spans` form one tree under `root` (every parent link points at a span of
/// the trace) and returns each span's id -> span.
fn check_tree<'a>(spans: &'a [Received], root: &Received) -> HashMap<&'a str, &'a Received> {
    let ids: HashMap<&str, &Received> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    for span in spans {
        if span.span_id == root.span_id {
            continue;
        }
        // Walk up: every link resolves, and the walk ends at the root.
        let mut at = span;
        for _ in 0..spans.len() {
            if at.span_id == root.span_id {
                break;
            }
            at = ids.get(at.parent.as_str()).unwrap_or_else(|| {
                panic!(
                    "span {} ({}) links to parent {} that is not in its trace: {spans:#?}",
                    at.name, at.span_id, at.parent
                )
            });
        }
        assert_eq!(at.span_id, root.span_id, "{span:?} is not under the root");
    }
    ids
}

/// The worker's side of a trace: its serve span (a child of a frontend span, across the
/// request plane) and the request's phases under it, in order.
fn check_worker_side(spans: &[Received], frontend: i64, worker: i64) {
    let ids: HashMap<&str, &Received> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let serve: Vec<_> = spans
        .iter()
        .filter(|s| s.pid == worker && s.name.starts_with("worker/"))
        .collect();
    assert_eq!(serve.len(), 1, "one serve span on the worker: {spans:#?}");
    let serve = serve[0];
    let caller = ids
        .get(serve.parent.as_str())
        .unwrap_or_else(|| panic!("the worker's serve span has no parent in the trace"));
    assert_eq!(
        caller.pid, frontend,
        "the worker's serve span's parent is the frontend's {caller:?}"
    );
    let phases: Vec<&Received> = ["queue", "prefill", "decode"]
        .iter()
        .map(|name| one(spans, name, worker))
        .collect();
    for phase in &phases {
        assert_eq!(
            phase.parent, serve.span_id,
            "{phase:?} is under the serve span"
        );
        assert_eq!(phase.role, "worker");
        assert_eq!(
            phase.service, "turbine-e2e-worker",
            "OTEL_SERVICE_NAME applies"
        );
    }
    assert!(
        phases.windows(2).all(|w| w[0].start_ns <= w[1].start_ns),
        "queue, prefill, decode in order: {phases:#?}"
    );
}

#[test]
fn one_request_is_one_trace_across_the_frontend_and_a_worker_process() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime for the receiver");
    let (receiver, otlp) = start_receiver(&rt);
    let (http, plane) = (free_port(), free_port());
    let file = cluster_file(
        "otel",
        &format!(
            "http: {{port: {http}}}\n\
             workers:\n  - {{replicas: 1, remote: true, kv_blocks: 256, threads: 1}}\n\
             transport: {{bind: \"127.0.0.1:{plane}\"}}\n\
             discovery: {{backend: embedded, registry: \"tcp://127.0.0.1:{plane}\", lease_ms: 2000}}\n\
             observability:\n  tracing: {{otlp_endpoint: \"http://127.0.0.1:{otlp}\", service_name: turbine-e2e}}\n"
        ),
    );
    let file = file.to_str().unwrap();
    // Batches go out every 100 ms instead of the SDK's 5 s.
    let quick = ("OTEL_BSP_SCHEDULE_DELAY", "100");
    let frontend = spawn_turbine_with(
        &["up", "-f", file, "--no-fetch"],
        &[quick],
        "waiting for 1 remote worker(s) to join",
    );
    let worker = spawn_turbine_with(
        &["worker", "-f", file, "--bind", "127.0.0.1:0", "--no-fetch"],
        &[quick, ("OTEL_SERVICE_NAME", "turbine-e2e-worker")],
        "registered with",
    );
    wait_until("the worker to be routable", Duration::from_secs(60), || {
        common::http(http, "GET", "/ready", "").0 == 200
    });
    let (frontend_pid, worker_pid) = (i64::from(frontend.child.id()), i64::from(worker.child.id()));

    let trace_id = format!("{:032x}", rand_u128());
    let client_span = "00f067aa0ba902b7";
    let traceparent = format!("00-{trace_id}-{client_span}-01");
    let (stream_id, _) = drive(http, "otel-e2e-1", Some(&traceparent));
    assert_eq!(stream_id, "otel-e2e-1");

    // The plain request's trace: rooted at its frontend span, since it sent no traceparent.
    let plain_trace = |spans: &[Received]| {
        spans
            .iter()
            .find(|s| s.name == "POST /v1/completions" && s.parent.is_empty())
            .map(|s| s.trace_id.clone())
    };
    // A trace is in once the worker's last phase and the frontend's request span are.
    let complete = |spans: &[Received], trace: &str| {
        let has = |name: &str, pid: i64| {
            spans
                .iter()
                .any(|s| s.trace_id == trace && s.name == name && s.pid == pid)
        };
        has("decode", worker_pid)
            && (has("POST /v1/chat/completions", frontend_pid)
                || has("POST /v1/completions", frontend_pid))
    };
    wait_until(
        "both traces at the receiver",
        Duration::from_secs(30),
        || {
            let spans = receiver.spans();
            complete(&spans, &trace_id) && plain_trace(&spans).is_some_and(|t| complete(&spans, &t))
        },
    );
    // Let the last batches in (the frontend's request span closes after the response).
    std::thread::sleep(Duration::from_millis(500));
    let all = receiver.spans();

    // 1. The client's trace: one tree across both processes, under the client's span.
    let traced: Vec<Received> = all
        .iter()
        .filter(|s| s.trace_id == trace_id)
        .cloned()
        .collect();
    let root = one(&traced, "POST /v1/chat/completions", frontend_pid);
    assert_eq!(
        root.parent, client_span,
        "the incoming traceparent is the parent"
    );
    assert_eq!(
        (root.service.as_str(), root.role.as_str()),
        ("turbine-e2e", "frontend")
    );
    let ids = check_tree(&traced, root);
    for name in ["admission", "preprocess", "route"] {
        let span = one(&traced, name, frontend_pid);
        assert_eq!(
            span.parent, root.span_id,
            "{name} is a child of the request"
        );
    }
    let router = one(&traced, "router", frontend_pid);
    assert_eq!(
        ids[router.parent.as_str()].name,
        "route",
        "the router serves the route call"
    );
    check_worker_side(&traced, frontend_pid, worker_pid);

    // 2. The plain request: a trace of its own, rooted at the frontend, joined by the worker.
    let plain = plain_trace(&all).expect("the plain request's trace");
    assert_ne!(plain, trace_id);
    let plain: Vec<Received> = all
        .iter()
        .filter(|s| s.trace_id == plain)
        .cloned()
        .collect();
    let root = one(&plain, "POST /v1/completions", frontend_pid);
    check_tree(&plain, root);
    check_worker_side(&plain, frontend_pid, worker_pid);
    drop(worker);
    drop(frontend);
}

/// 128 bits that differ from run to run (a trace id of this run's own).
fn rand_u128() -> u128 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(1);
    nanos.wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835) ^ u128::from(std::process::id())
}

/// The per-request lines the test expects from each request: what each layer logs at debug.
const REQUEST_LINES: [&str; 5] = [
    "generation admitted", // the HTTP handler
    "routed",              // the dispatcher (a `route` span)
    "admitted",            // the worker loop (the request's `queue` span)
    "finished",            // the worker loop (its `decode` span)
    "request finished",    // the end of the response body
];

/// The request id a JSON log line names (the innermost span with a `request_id`).
fn request_id_of(line: &serde_json::Value) -> Option<&str> {
    line.get("spans")?
        .as_array()?
        .iter()
        .rev()
        .find_map(|s| s.get("request_id")?.as_str())
}

fn message_of(line: &serde_json::Value) -> Option<&str> {
    line.get("fields")?.get("message")?.as_str()
}

#[test]
fn every_log_line_of_a_request_names_its_request_id() {
    let http = free_port();
    let file = cluster_file(
        "jsonlogs",
        &format!(
            "http: {{port: {http}}}\nworkers:\n  - {{replicas: 1, kv_blocks: 256, threads: 1}}\n"
        ),
    );
    let (server, stderr) = spawn_turbine_capturing(
        &[
            "up",
            "-f",
            file.to_str().unwrap(),
            "--no-fetch",
            "--log-format",
            "json",
            "--log",
            "turbine_actors=debug",
        ],
        &[],
        "turbine serving",
    );
    let (stream_id, plain_id) = drive(http, "log-e2e-1", None);
    assert_eq!(stream_id, "log-e2e-1", "the client's id is kept");
    assert_eq!(plain_id.len(), 32, "a fresh id: {plain_id}");
    let finished = |id: &str| {
        stderr.lock().unwrap().iter().any(|l| {
            l.contains("request finished") && l.contains(&format!("\"request_id\":\"{id}\""))
        })
    };
    wait_until(
        "both requests' last log lines",
        Duration::from_secs(30),
        || finished(&stream_id) && finished(&plain_id),
    );
    drop(server);
    let lines: Vec<String> = stderr.lock().unwrap().clone();

    let parsed: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("a stderr line is not JSON ({e}): {l}"));
            assert!(v.get("level").is_some() && v.get("target").is_some(), "{l}");
            v
        })
        .collect();
    assert!(
        parsed
            .iter()
            .any(|l| message_of(l).is_some_and(|m| m.starts_with("loading "))),
        "start-up notices are JSON lines too"
    );
    let request_lines: Vec<&serde_json::Value> = parsed
        .iter()
        .filter(|l| {
            message_of(l)
                .is_some_and(|m| REQUEST_LINES.contains(&m) || m == "event stream complete")
        })
        .collect();
    for line in &request_lines {
        let id = request_id_of(line);
        assert!(
            id == Some(stream_id.as_str()) || id == Some(plain_id.as_str()),
            "a request's line names no request id (or another one): {line}"
        );
    }
    let seen = |message: &str, id: &str| {
        request_lines
            .iter()
            .any(|l| message_of(l) == Some(message) && request_id_of(l) == Some(id))
    };
    for id in [&stream_id, &plain_id] {
        for message in REQUEST_LINES {
            assert!(seen(message, id), "no {message:?} line names {id}");
        }
    }
    assert!(
        seen("event stream complete", &stream_id),
        "the SSE path's line names the streamed request"
    );
}

/// The phases under a worker's serve span in `spans` (by start), checking the serve span's
/// parent is the frontend's request span `root`.
fn phases_under<'a>(spans: &'a [Received], root: &Received, role: &str) -> Vec<&'a str> {
    let serve: Vec<_> = spans
        .iter()
        .filter(|s| s.role == role && s.name.starts_with("worker/"))
        .collect();
    assert_eq!(
        serve.len(),
        1,
        "one serve span on the {role} worker: {spans:#?}"
    );
    assert_eq!(
        serve[0].parent, root.span_id,
        "the {role} worker serves the request"
    );
    let mut phases: Vec<&Received> = spans
        .iter()
        .filter(|s| s.parent == serve[0].span_id)
        .collect();
    phases.sort_by_key(|s| s.start_ns);
    phases.iter().map(|s| s.name.as_str()).collect()
}

#[test]
fn a_disaggregated_request_is_one_trace_across_frontend_prefill_and_decode() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime for the receiver");
    let (receiver, otlp) = start_receiver(&rt);
    let (http, plane) = (free_port(), free_port());
    let file = cluster_file(
        "otel-disagg",
        &format!(
            "http: {{port: {http}}}\n\
             workers:\n  \
             - {{role: prefill, replicas: 1, remote: true, kv_blocks: 256, threads: 1}}\n  \
             - {{role: decode, replicas: 1, remote: true, kv_blocks: 256, threads: 1}}\n\
             disaggregation: {{remote_prefill_min_tokens: 16, remote_prefill_timeout_ms: 60000}}\n\
             transport: {{bind: \"127.0.0.1:{plane}\"}}\n\
             discovery: {{backend: embedded, registry: \"127.0.0.1:{plane}\", lease_ms: 10000}}\n\
             observability: {{tracing: {{otlp_endpoint: \"http://127.0.0.1:{otlp}\"}}}}\n"
        ),
    );
    let file = file.to_str().unwrap();
    let quick = [("OTEL_BSP_SCHEDULE_DELAY", "100")];
    let _frontend =
        spawn_turbine_with(&["up", "-f", file, "--no-fetch"], &quick, "turbine serving");
    let worker = |role: &str| {
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
            &quick,
            "registered with",
        )
    };
    let (_prefill, _decode) = (worker("prefill"), worker("decode"));
    wait_until(
        "both workers to be routable",
        Duration::from_secs(60),
        || common::http(http, "GET", "/ready", "").0 == 200,
    );
    // Over `remote_prefill_min_tokens`: prefilled remotely, its KV pulled by the decode worker.
    let prompt = "Note about Lyon: the weather was mild, the river calm and the streets quiet.";
    let body = format!(r#"{{"prompt":"{prompt}","max_tokens":4,"temperature":0}}"#);
    let (status, answer) = common::http(http, "POST", "/v1/completions", &body);
    assert_eq!(status, 200, "{answer}");
    let pulled = |spans: &[Received]| {
        spans
            .iter()
            .find(|s| s.name == "kv_transfer")
            .map(|s| s.trace_id.clone())
    };
    wait_until(
        "the disaggregated trace at the receiver",
        Duration::from_secs(30),
        || {
            let spans = receiver.spans();
            pulled(&spans).is_some_and(|t| {
                spans.iter().any(|s| {
                    s.trace_id == t && s.name == "POST /v1/completions" && s.role == "frontend"
                }) && spans.iter().any(|s| s.trace_id == t && s.name == "decode")
            })
        },
    );
    let all = receiver.spans();
    let trace = pulled(&all).expect("a kv_transfer span");
    let spans: Vec<Received> = all.into_iter().filter(|s| s.trace_id == trace).collect();
    let root = spans
        .iter()
        .find(|s| s.name == "POST /v1/completions")
        .expect("the frontend's request span");
    assert!(
        root.parent.is_empty(),
        "no traceparent: the frontend's span is the root"
    );
    check_tree(&spans, root);
    assert_eq!(
        phases_under(&spans, root, "prefill"),
        ["queue", "prefill", "kv_export"]
    );
    assert_eq!(
        phases_under(&spans, root, "decode"),
        ["kv_transfer", "queue", "decode"]
    );
}
