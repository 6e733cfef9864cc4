//! Runs `turbine bench serve` against a tiny in-test OpenAI-style server that streams fake
//! tokens, so the load generator's counting is checked without a model.

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use turbine::bench::serve::{measure, run, ServeBenchArgs};

const MODEL: &str = "fake-model";

/// How the fake misbehaves. Requests are numbered 1, 2, ... in arrival order.
#[derive(Clone, Copy, Default)]
struct Faults {
    /// Every n-th request gets HTTP 500.
    http_error_every: Option<usize>,
    /// Every n-th request (not already failed) sends one token, then an error event.
    mid_stream_error_every: Option<usize>,
    /// Omit the usage chunk even when asked for it.
    no_usage: bool,
}

#[derive(Default)]
struct Fake {
    faults: Faults,
    received: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    wrong_model: AtomicUsize,
}

/// Decrements the in-flight gauge when the response stream is finished or dropped.
struct InFlight(Arc<Fake>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

fn sse(value: &Value) -> String {
    format!("data: {value}\n\n")
}

fn chunk(content: Option<&str>, role: Option<&str>, finish: Option<&str>) -> Value {
    let mut delta = serde_json::Map::new();
    if let Some(role) = role {
        delta.insert("role".into(), json!(role));
    }
    if let Some(content) = content {
        delta.insert("content".into(), json!(content));
    }
    json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": MODEL,
           "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]})
}

async fn models() -> Json<Value> {
    Json(
        json!({"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0,
                                            "owned_by": "test"}]}),
    )
}

async fn chat(State(fake): State<Arc<Fake>>, Json(body): Json<Value>) -> Response {
    let n = fake.received.fetch_add(1, Ordering::SeqCst) + 1;
    if body["model"] != MODEL {
        fake.wrong_model.fetch_add(1, Ordering::SeqCst);
    }
    if fake.faults.http_error_every.is_some_and(|k| n % k == 0) {
        let error = json!({"error": {"message": "injected failure", "type": "server_error"}});
        return (StatusCode::INTERNAL_SERVER_ERROR, Json(error)).into_response();
    }
    let now = fake.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    fake.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let guard = InFlight(fake.clone());

    let max_tokens = body["max_tokens"].as_u64().unwrap_or(16) as usize;
    let include_usage = body["stream_options"]["include_usage"] == true;
    let mut events = vec![sse(&chunk(Some(""), Some("assistant"), None))];
    if fake
        .faults
        .mid_stream_error_every
        .is_some_and(|k| n % k == 0)
    {
        events.push(sse(&chunk(Some("tok"), None, None)));
        events.push(sse(
            &json!({"error": {"message": "injected mid-stream failure",
                                          "type": "server_error"}}),
        ));
    } else {
        events.extend((0..max_tokens).map(|i| sse(&chunk(Some(&format!(" t{i}")), None, None))));
        events.push(sse(&chunk(None, None, Some("length"))));
        if include_usage && !fake.faults.no_usage {
            events.push(sse(
                &json!({"id": "chatcmpl-1", "object": "chat.completion.chunk",
                "created": 0, "model": MODEL, "choices": [],
                "usage": {"prompt_tokens": 7, "completion_tokens": max_tokens,
                          "total_tokens": 7 + max_tokens}}),
            ));
        }
    }
    events.push("data: [DONE]\n\n".to_string());
    let stream = futures::stream::iter(events).then(move |event| {
        let _keep = &guard;
        async move {
            // A little pacing so concurrent streams really overlap.
            tokio::time::sleep(Duration::from_millis(1)).await;
            Ok::<_, Infallible>(Bytes::from(event))
        }
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn start(faults: Faults) -> (SocketAddr, Arc<Fake>) {
    let fake = Arc::new(Fake {
        faults,
        ..Fake::default()
    });
    let app = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, fake)
}

fn args(addr: SocketAddr, levels: &[usize], per_level: usize) -> ServeBenchArgs {
    ServeBenchArgs {
        concurrency: levels.to_vec(),
        requests_per_level: Some(per_level),
        max_tokens: 5,
        prompt_tokens: 20,
        warmup: 0,
        seed: Some(1),
        request_timeout_secs: 30,
        level_timeout_secs: 60,
        ..ServeBenchArgs::new(format!("http://{addr}"))
    }
}

#[tokio::test]
async fn counts_requests_tokens_and_errors_per_level() {
    let (addr, fake) = start(Faults {
        http_error_every: Some(5),
        mid_stream_error_every: Some(7),
        no_usage: false,
    })
    .await;
    let report = measure(args(addr, &[1, 4], 10)).await.unwrap();

    assert_eq!(report.model, MODEL, "model discovered from /v1/models");
    assert_eq!(fake.wrong_model.load(Ordering::SeqCst), 0);
    assert_eq!(fake.received.load(Ordering::SeqCst), 20);
    assert!(fake.max_in_flight.load(Ordering::SeqCst) <= 4);
    assert_eq!(report.levels.len(), 2);
    // Level 1 got requests 1..=10 (500s at 5 and 10, mid-stream error at 7); level 2 got
    // 11..=20 (500s at 15 and 20, mid-stream error at 14).
    for (level, concurrency) in report.levels.iter().zip([1, 4]) {
        assert_eq!(level.concurrency, concurrency);
        assert_eq!(level.requests, 10);
        assert_eq!(level.errors, 3);
        assert_eq!(level.not_started, 0);
        assert_eq!(
            level.error_kinds.get("HTTP 500: injected failure"),
            Some(&2),
            "{:?}",
            level.error_kinds
        );
        assert_eq!(
            level.error_kinds.get("injected mid-stream failure"),
            Some(&1)
        );
        assert_eq!(level.output_tokens, 7 * 5);
        assert!(level.tokens_from_usage);
        assert_eq!(level.mean_prompt_tokens, Some(7.0));
        assert_eq!(level.ttft.count, 7);
        assert_eq!(level.e2e.count, 7);
        assert_eq!(level.itl.count, 7 * 4, "4 gaps between 5 tokens");
        assert!(level.output_tokens_per_sec > 0.0);
        assert!(level.requests_per_sec > 0.0);
    }
}

#[tokio::test]
async fn without_usage_counts_chunks_and_warmup_is_not_measured() {
    let (addr, fake) = start(Faults {
        no_usage: true,
        ..Faults::default()
    })
    .await;
    let report = measure(ServeBenchArgs {
        warmup: 3,
        ..args(addr, &[2], 8)
    })
    .await
    .unwrap();
    assert_eq!(fake.received.load(Ordering::SeqCst), 3 + 8);
    let level = &report.levels[0];
    assert_eq!(level.requests, 8);
    assert_eq!(level.errors, 0);
    assert_eq!(level.output_tokens, 8 * 5);
    assert!(!level.tokens_from_usage);
    assert_eq!(level.mean_prompt_tokens, None);
}

#[tokio::test]
async fn run_writes_json_results() {
    let (addr, _fake) = start(Faults::default()).await;
    let path = std::env::temp_dir().join(format!("turbine-bench-{}.json", std::process::id()));
    run(ServeBenchArgs {
        json: Some(path.clone()),
        ..args(addr, &[1, 3], 6)
    })
    .await
    .unwrap();
    let written: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    std::fs::remove_file(&path).ok();
    assert_eq!(written["model"], MODEL);
    assert_eq!(written["percentile_method"], "nearest-rank");
    let levels = written["levels"].as_array().unwrap();
    assert_eq!(levels.len(), 2);
    assert_eq!(levels[1]["concurrency"], 3);
    assert_eq!(levels[1]["requests"], 6);
    assert_eq!(levels[1]["errors"], 0);
    assert_eq!(levels[1]["output_tokens"], 30);
}

#[tokio::test]
async fn an_unreachable_server_is_an_error_not_a_hang() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let err = measure(args(addr, &[1], 8)).await.unwrap_err();
    assert!(format!("{err:#}").contains("/v1/models"), "{err:#}");
}

// ------------------------------------------------------------------------------------------
// Against turbine's own HTTP frontend (real SSE shapes) with a counting engine.

mod turbine_frontend {
    use super::*;
    use async_trait::async_trait;
    use turbine::bench::serve::measure;
    use turbine_actors::frontend::{
        router, serve, ChatEngine, Delta, DeltaStream, EngineError, GenerateRequest, HttpConfig,
        Metrics, Usage,
    };
    use turbine_actors::protocol::FinishReason;

    /// Emits `max_tokens` one-token deltas ("w0 w1 ..."), reporting 11 prompt tokens.
    struct CountingEngine;

    #[async_trait]
    impl ChatEngine for CountingEngine {
        fn model_id(&self) -> &str {
            "counting"
        }

        fn context_length(&self) -> usize {
            4096
        }

        async fn generate(&self, req: GenerateRequest) -> Result<DeltaStream, EngineError> {
            let n = req.max_tokens.unwrap_or(8);
            let deltas: Vec<Result<Delta, EngineError>> = (0..n)
                .map(|i| {
                    let last = i + 1 == n;
                    Ok(Delta {
                        text: format!(" w{i}"),
                        token_ids: vec![i],
                        finish: last.then_some(FinishReason::Length),
                        usage: (i == 0 || last).then_some(Usage {
                            prompt_tokens: 11,
                            completion_tokens: i + 1,
                            cached_tokens: 0,
                        }),
                        ..Delta::default()
                    })
                })
                .collect();
            let paced = futures::stream::iter(deltas).then(|delta| async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                delta
            });
            Ok(paced.boxed())
        }
    }

    #[tokio::test]
    async fn measures_turbines_frontend() {
        let app = router(
            Arc::new(CountingEngine),
            Metrics::new(),
            HttpConfig::default(),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, app, std::future::pending()));

        let report = measure(ServeBenchArgs {
            ignore_eos: true,
            temperature: Some(0.0),
            ..args(addr, &[1, 4], 8)
        })
        .await
        .unwrap();
        assert_eq!(report.model, "counting");
        for level in &report.levels {
            assert_eq!(level.errors, 0, "{:?}", level.error_kinds);
            assert_eq!(level.requests, 8);
            assert_eq!(level.output_tokens, 8 * 5);
            assert!(level.tokens_from_usage);
            assert_eq!(level.mean_prompt_tokens, Some(11.0));
            assert_eq!(level.ttft.count, 8);
            assert_eq!(level.itl.count, 8 * 4);
        }
    }
}
