//! `turbine epp` end to end: a frontend (`turbine up`, the embedded registry), two
//! `turbine worker` processes that register gateway endpoints of their own, and the
//! endpoint picker, driven by a tonic client that plays Envoy's ext_proc sequence
//! (request headers, answer, request body, answer; with and without a subset hint).
//!
//! Two prompt families are first served through the frontend, each landing on its own
//! worker (read from the frontend's /metrics). The picker, fed by the same KV events,
//! must then answer each family's follow-up with its worker's endpoint and hint headers;
//! a subset hint that leaves out that worker sends it to the other; a subset of unknown
//! endpoints is a 503; a malformed body gets the frontend's 400 error and the server keeps
//! serving.
//!
//! The same cluster then checks that the frontend follows routing hints (`x-turbine-worker`,
//! `x-turbine-mode`): a hinted worker serves the request even against the KV; a worker it
//! does not know, or a dead one, falls back to its own routing (counted on /metrics as
//! `turbine_routing_hints_total{outcome}`), never an error; a malformed hint is a 400.
//!
//! With the tiny Idefics3 fixture (tests/fixtures/tiny-idefics3), a second cluster checks
//! image prompts: the picker salts its block hashes with each image's content hash as the
//! workers do, so the same question about two pictures, each first served (by hint) on its
//! own worker, is sent by the picker to the worker that holds that picture's blocks.
//!
//! Needs the default model (`scripts/setup-test-deps.sh`, run by `scripts/test.sh`).

mod common;

use common::{
    cluster_file, completion_body, decisions, free_port, http, send_request as send, spawn_turbine,
    Turbine,
};
use std::collections::BTreeMap;
use std::io::Read;
use std::time::{Duration, Instant};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use turbine_actors::epp::proto::{
    processing_request::Request, processing_response::Response, HeaderMap, HeaderValue, HttpBody,
    HttpHeaders, Kind, ListValue, Metadata, ProcessingRequest, ProcessingResponse, Struct, Value,
    PROCESS_PATH,
};

const ENDPOINTS: [&str; 2] = ["127.0.0.2:8000", "127.0.0.3:8000"];

/// From cluster file `f`: the frontend, `turbine epp` listening for Envoy on `grpc`, and
/// one worker per gateway endpoint of [`ENDPOINTS`] (in that order).
fn start_frontend_picker_and_workers(f: &str, grpc: u16) -> (Turbine, Turbine, Vec<Turbine>) {
    let frontend = spawn_turbine(&["up", "-f", f, "--no-fetch"], "turbine serving");
    let listen = format!("127.0.0.1:{grpc}");
    let epp = spawn_turbine(
        &[
            "epp",
            "-f",
            f,
            "--bind",
            "127.0.0.1:0",
            "--listen",
            &listen,
            "--no-fetch",
        ],
        "turbine epp serving",
    );
    let workers = ENDPOINTS
        .iter()
        .map(|ep| {
            spawn_turbine(
                &[
                    "worker",
                    "-f",
                    f,
                    "--bind",
                    "127.0.0.1:0",
                    "--no-fetch",
                    "--gateway-endpoint",
                    ep,
                ],
                "registered with",
            )
        })
        .collect();
    (frontend, epp, workers)
}

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
    // The metric labels a worker `w<id>`; the hint header carries `<id>`.
    grew[0].trim_start_matches('w').to_string()
}

fn prefix(topic: &str) -> String {
    (0..18)
        .map(|i| format!("Note {i} about the {topic}: step {i} is checked and logged. "))
        .collect()
}

fn headers_msg(path: &str, subset: Option<&[&str]>) -> ProcessingRequest {
    let header = |k: &str, v: &str| HeaderValue {
        key: k.into(),
        value: String::new(),
        raw_value: v.as_bytes().to_vec(),
    };
    let metadata_context = subset.map(|s| Metadata {
        filter_metadata: [(
            "envoy.lb.subset_hint".to_string(),
            Struct {
                fields: [(
                    "x-gateway-destination-endpoint-subset".to_string(),
                    Value {
                        kind: Some(Kind::ListValue(ListValue {
                            values: s.iter().map(|e| Value::string(*e)).collect(),
                        })),
                    },
                )]
                .into(),
            },
        )]
        .into(),
    });
    ProcessingRequest {
        request: Some(Request::RequestHeaders(HttpHeaders {
            headers: Some(HeaderMap {
                headers: vec![
                    header(":method", "POST"),
                    header(":path", path),
                    header("content-type", "application/json"),
                    // A client trying to steer the frontend itself: the picker strips it.
                    header("x-turbine-prefill-worker", "99"),
                ],
            }),
            end_of_stream: false,
        })),
        metadata_context,
        observability_mode: false,
    }
}

fn body_msg(body: &str) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(Request::RequestBody(HttpBody {
            body: body.as_bytes().to_vec(),
            end_of_stream: true,
        })),
        metadata_context: None,
        observability_mode: false,
    }
}

/// What the picker answered to the body.
#[derive(Debug)]
enum Answer {
    Routed {
        headers: BTreeMap<String, String>,
        removed: Vec<String>,
        lb_endpoint: String,
    },
    Immediate {
        status: i32,
        body: serde_json::Value,
    },
}

/// One request as Envoy sends it (BUFFERED body): headers, wait for the answer, then the
/// body, and its answer.
async fn play(addr: &str, path: &str, body: &str, subset: Option<&[&str]>) -> Answer {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect to the picker");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let codec = tonic_prost::ProstCodec::<ProcessingRequest, ProcessingResponse>::default();
    tx.send(headers_msg(path, subset)).await.unwrap();
    let mut answers = grpc
        .streaming(
            tonic::Request::new(ReceiverStream::new(rx)),
            PathAndQuery::from_static(PROCESS_PATH),
            codec,
        )
        .await
        .expect("Process")
        .into_inner();
    let first = answers
        .message()
        .await
        .expect("answer")
        .expect("an answer to the headers");
    assert!(
        matches!(&first.response, Some(Response::RequestHeaders(h)) if h.response.is_none()),
        "headers are answered CONTINUE: {first:?}"
    );
    tx.send(body_msg(body)).await.unwrap();
    let second = answers
        .message()
        .await
        .expect("answer")
        .expect("an answer to the body");
    drop(tx);
    match second.response {
        Some(Response::RequestBody(b)) => {
            let common = b.response.expect("a common response");
            assert!(common.clear_route_cache);
            let m = common.header_mutation.expect("a header mutation");
            let lb = &second.dynamic_metadata.expect("dynamic metadata").fields["envoy.lb"];
            let Some(Kind::StructValue(lb)) = &lb.kind else {
                panic!("envoy.lb is a struct: {lb:?}")
            };
            let Some(Kind::StringValue(lb_endpoint)) =
                &lb.fields["x-gateway-destination-endpoint"].kind
            else {
                panic!("the endpoint is a string")
            };
            Answer::Routed {
                headers: m
                    .set_headers
                    .into_iter()
                    .filter_map(|o| o.header)
                    .map(|h| (h.key.clone(), h.text()))
                    .collect(),
                removed: m.remove_headers,
                lb_endpoint: lb_endpoint.clone(),
            }
        }
        Some(Response::ImmediateResponse(i)) => Answer::Immediate {
            status: i.status.expect("a status").code,
            body: serde_json::from_slice(&i.body).expect("a JSON error body"),
        },
        other => panic!("unexpected answer to the body: {other:?}"),
    }
}

/// The worker (hint) and endpoint a routed answer names.
fn destination(a: &Answer) -> (String, String) {
    match a {
        Answer::Routed {
            headers,
            removed,
            lb_endpoint,
        } => {
            let ep = headers["x-gateway-destination-endpoint"].clone();
            assert_eq!(
                &ep, lb_endpoint,
                "header and metadata name the same endpoint"
            );
            assert_eq!(headers["x-turbine-mode"], "aggregated");
            assert!(removed.contains(&"x-turbine-prefill-worker".to_string()));
            (headers["x-turbine-worker"].clone(), ep)
        }
        other => panic!("not routed: {other:?}"),
    }
}

#[test]
fn the_picker_sends_each_prompt_family_to_the_worker_that_caches_it() {
    let (port, plane, grpc) = (free_port(), free_port(), free_port());
    let file = cluster_file(
        "epp",
        &format!(
            "http: {{port: {port}}}\n\
             router: {{policy: kv, overlap_weight: 1.0, temperature: 0.0}}\n\
             workers:\n  - {{role: aggregated, replicas: 2, device: cpu, kv_blocks: 96, \
             block_size: 16, max_num_batched_tokens: 512, threads: 1, remote: true}}\n\
             transport: {{bind: \"127.0.0.1:{plane}\"}}\n\
             discovery: {{backend: embedded, registry: \"127.0.0.1:{plane}\", lease_ms: 2000}}\n"
        ),
    );
    let f = file.to_str().unwrap();
    let (_frontend, _epp, workers) = start_frontend_picker_and_workers(f, grpc);
    let listen = format!("127.0.0.1:{grpc}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    // Until both workers have joined the picker: each endpoint alone is eligible.
    for ep in ENDPOINTS {
        loop {
            let a = rt.block_on(play(
                &listen,
                "/v1/completions",
                &completion_body("Hi.", 1, false),
                Some(&[ep]),
            ));
            if let Answer::Routed { .. } = a {
                assert_eq!(destination(&a).1, ep);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{ep} never joined the picker: {a:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    // Until both have joined the frontend: a held stream on one sends the next elsewhere.
    // Each attempt uses fresh families, so a family's blocks are only ever on its home.
    let mut attempt = 0;
    let (family_a, family_b, home_a, home_b) = loop {
        attempt += 1;
        let family_a = prefix(&format!("lighthouse {attempt}"));
        let family_b = prefix(&format!("greenhouse {attempt}"));
        let before = decisions(port);
        let mut held = send(
            port,
            "POST",
            "/v1/completions",
            &completion_body(&format!("{family_a}Question 0: what comes next?"), 48, true),
        );
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains("data:") {
            let n = held.read(&mut buf).expect("streamed answer");
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        let mid = decisions(port);
        let (status, _) = http(
            port,
            "POST",
            "/v1/completions",
            &completion_body(&format!("{family_b}Question 0: why?"), 2, false),
        );
        let after = decisions(port);
        let mut rest = Vec::new();
        let _ = held.read_to_end(&mut rest);
        if status == 200 && mid != before && after != mid {
            let (a, b) = (routed_to(&before, &mid), routed_to(&mid, &after));
            if a != b {
                break (family_a, family_b, a, b);
            }
        }
        assert!(
            Instant::now() < deadline,
            "the frontend never routed to both workers"
        );
        std::thread::sleep(Duration::from_millis(300));
    };

    // Each family's follow-up: the picker names its home worker and that worker's
    // endpoint (its KV events may take a moment to reach the picker's index).
    let mut ep_of = BTreeMap::new();
    for (family, home) in [(&family_a, &home_a), (&family_b, &home_b)] {
        let body = completion_body(&format!("{family}Question 1: and then?"), 2, false);
        // A liveness bound, not a timing goal: generous for a loaded CI machine.
        let settled = Instant::now() + Duration::from_secs(60);
        let (worker, ep) = loop {
            let d = destination(&rt.block_on(play(&listen, "/v1/completions", &body, None)));
            if &d.0 == home || Instant::now() > settled {
                break d;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        assert_eq!(&worker, home, "the picker follows the cached prefix");
        ep_of.insert(home.clone(), ep);
    }
    assert_ne!(ep_of[&home_a], ep_of[&home_b], "two workers, two endpoints");
    // Again, alternating: KV-aware, not sticky or round robin.
    for (family, home) in [
        (&family_b, &home_b),
        (&family_a, &home_a),
        (&family_a, &home_a),
    ] {
        let body = completion_body(&format!("{family}Question 2: finally?"), 2, false);
        let d = destination(&rt.block_on(play(&listen, "/v1/completions", &body, None)));
        assert_eq!((&d.0, &d.1), (home, &ep_of[home]));
    }

    // A subset that leaves out A's home sends A's prompt to the other worker.
    let only_b = [ep_of[&home_b].as_str()];
    let body_a = completion_body(&format!("{family_a}Question 3: subset?"), 2, false);
    let d = destination(&rt.block_on(play(&listen, "/v1/completions", &body_a, Some(&only_b))));
    assert_eq!(d, (home_b.clone(), ep_of[&home_b].clone()));

    // No eligible endpoint: 503.
    match rt.block_on(play(
        &listen,
        "/v1/completions",
        &body_a,
        Some(&["127.0.0.9:1"]),
    )) {
        Answer::Immediate { status, body } => {
            assert_eq!(status, 503);
            assert_eq!(body["error"]["code"], "no_eligible_endpoint", "{body}");
        }
        other => panic!("expected a 503: {other:?}"),
    }

    // Malformed bodies: the frontend's 400s, and the picker keeps serving.
    for (path, bad, param) in [
        ("/v1/completions", "{not json", None),
        ("/v1/completions", "{\"max_tokens\": 2}", Some("prompt")),
        (
            "/v1/chat/completions",
            "{\"messages\": []}",
            Some("messages"),
        ),
    ] {
        match rt.block_on(play(&listen, path, bad, None)) {
            Answer::Immediate { status, body } => {
                assert_eq!(status, 400, "{bad}: {body}");
                assert_eq!(body["error"]["type"], "invalid_request_error");
                if let Some(p) = param {
                    assert_eq!(body["error"]["param"], p, "{body}");
                }
            }
            other => panic!("{bad}: expected a 400: {other:?}"),
        }
    }
    let chat = serde_json::json!({"messages": [{"role": "user", "content": format!("{family_b}Question 4?")}]}).to_string();
    assert!(matches!(
        rt.block_on(play(&listen, "/v1/chat/completions", &chat, None)),
        Answer::Routed { .. }
    ));

    // The frontend follows a gateway's hints: A's prompt, hinted to B's home, runs there.
    let metric = |outcome: &str| {
        common::gauge(
            port,
            &format!("turbine_routing_hints_total{{outcome=\"{outcome}\"}}"),
        )
    };
    let hinted = |prompt: &str, hints: &[(&str, &str)]| {
        let before = decisions(port);
        let (status, body) = post_with_headers(port, &completion_body(prompt, 2, false), hints);
        (status, body, before)
    };
    let (status, body, before) = hinted(
        &format!("{family_a}Question 5: hinted?"),
        &[
            ("x-turbine-worker", &home_b),
            ("x-turbine-mode", "aggregated"),
        ],
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        routed_to(&before, &decisions(port)),
        home_b,
        "the hint wins over the KV"
    );
    assert_eq!(metric("followed"), 1.0);

    // A worker nobody knows: the frontend routes by itself (A goes home), counted.
    let (status, body, before) = hinted(
        &format!("{family_a}Question 6: unknown?"),
        &[("x-turbine-worker", "424242")],
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(routed_to(&before, &decisions(port)), home_a);
    assert_eq!(metric("fallback_unknown_worker"), 1.0);

    // A malformed hint is the client's mistake.
    let (status, body, _) = hinted("Hello", &[("x-turbine-mode", "both")]);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("x-turbine-mode"), "{body}");

    // A dead worker: every hinted request still succeeds, served elsewhere; once its lease
    // is gone the hint is counted as naming an unknown worker.
    let b_index = ENDPOINTS.iter().position(|e| *e == ep_of[&home_b]).unwrap();
    let mut workers = workers;
    drop(workers.remove(b_index));
    // The lease is 2 s; the bound only has to outlast a loaded machine's slow requests.
    let until = Instant::now() + Duration::from_secs(120);
    for round in 0.. {
        let (status, body, _) = hinted(
            &format!("{family_b}Question {round}: dead?"),
            &[("x-turbine-worker", &home_b)],
        );
        assert_eq!(
            status, 200,
            "a hint to a dead worker never fails the request: {body}"
        );
        if metric("fallback_unknown_worker") >= 2.0 {
            break;
        }
        assert!(
            Instant::now() < until,
            "the dead worker's hint was never counted as a fallback"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        metric("followed"),
        1.0,
        "no request on the dead worker counts as followed"
    );
    if let Some(dir) = file.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// POST /v1/completions with extra headers; returns (status, body).
fn post_with_headers(port: u16, body: &str, headers: &[(&str, &str)]) -> (u16, String) {
    post_to(port, "/v1/completions", body, headers)
}

/// POST `path` with extra headers; returns (status, body).
fn post_to(port: u16, path: &str, body: &str, headers: &[(&str, &str)]) -> (u16, String) {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         {extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).expect("an answer");
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (status, body)
}

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-idefics3");

/// A chat request about the fixture's image `name` (a or b), with one question for both.
fn image_chat(name: &str) -> String {
    use base64::Engine as _;
    let png = std::fs::read(format!("{FIXTURE}/images/{name}.png")).expect("a fixture image");
    let uri = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png)
    );
    serde_json::json!({
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": uri}},
            {"type": "text", "text": "What is in this picture? Tell me in a few words."},
        ]}],
        "max_tokens": 2, "temperature": 0,
    })
    .to_string()
}

#[test]
fn the_picker_salts_image_prompts_as_the_workers_do() {
    let (port, plane, grpc) = (free_port(), free_port(), free_port());
    let file = cluster_file(
        "epp-images",
        &format!(
            "model: {{path: \"{FIXTURE}\"}}\n\
             http: {{port: {port}}}\n\
             router: {{policy: kv, overlap_weight: 1.0, temperature: 0.0}}\n\
             workers:\n  - {{role: aggregated, replicas: 2, kv_blocks: 64, block_size: 16, \
             threads: 1, remote: true}}\n\
             transport: {{bind: \"127.0.0.1:{plane}\"}}\n\
             discovery: {{backend: embedded, registry: \"127.0.0.1:{plane}\", lease_ms: 2000}}\n"
        ),
    );
    let f = file.to_str().unwrap();
    let (_frontend, _epp, workers) = start_frontend_picker_and_workers(f, grpc);
    let listen = format!("127.0.0.1:{grpc}");
    // "turbine worker w12 serving on ...": the hint header carries 12.
    let ids: Vec<String> = workers
        .iter()
        .map(|w| {
            let rest = w
                .ready_line
                .split("turbine worker ")
                .nth(1)
                .expect("a worker line");
            let id = rest.split_whitespace().next().expect("an id");
            id.trim_start_matches('w').to_string()
        })
        .collect();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    for ep in ENDPOINTS {
        loop {
            let a = rt.block_on(play(
                &listen,
                "/v1/completions",
                &completion_body("Hi.", 1, false),
                Some(&[ep]),
            ));
            if let Answer::Routed { .. } = a {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{ep} never joined the picker: {a:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    // Image a on the first worker, image b on the second: each prompt's blocks, salted by
    // its picture, are cached on one worker only. (A hint names a worker the frontend may
    // not know yet: retried until followed.)
    let followed =
        |n: f64| common::gauge(port, "turbine_routing_hints_total{outcome=\"followed\"}") >= n;
    for (i, (name, id)) in [("a", &ids[0]), ("b", &ids[1])].into_iter().enumerate() {
        loop {
            let (status, body) = post_to(
                port,
                "/v1/chat/completions",
                &image_chat(name),
                &[("x-turbine-worker", id), ("x-turbine-mode", "aggregated")],
            );
            assert_eq!(status, 200, "{body}");
            if followed(i as f64 + 1.0) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the hint to {id} was never followed"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    // The same text about each picture: the picker names the worker holding that picture
    // (its KV events may take a moment to reach the picker's index).
    for (name, id) in [("a", &ids[0]), ("b", &ids[1]), ("a", &ids[0])] {
        let body = image_chat(name);
        let settled = Instant::now() + Duration::from_secs(60);
        let worker = loop {
            let (worker, _) =
                destination(&rt.block_on(play(&listen, "/v1/chat/completions", &body, None)));
            if &worker == id || Instant::now() > settled {
                break worker;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        assert_eq!(
            &worker, id,
            "image {name}: the picker follows the picture's blocks"
        );
    }
    // An image by URL is not fetched by the picker: placed by load, never an error.
    let remote = serde_json::json!({
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/a.png"}},
            {"type": "text", "text": "What is in this picture?"},
        ]}],
    })
    .to_string();
    assert!(matches!(
        rt.block_on(play(&listen, "/v1/chat/completions", &remote, None)),
        Answer::Routed { .. }
    ));
    if let Some(dir) = file.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
}
