//! Structured fuzzing of the OpenAI frontend: valid chat and completion bodies, mutated
//! (fields dropped, retyped, renamed, duplicated, nested absurdly; text cut, flipped, made
//! invalid UTF-8), sent through the real axum router in-process to an engine that streams.
//!
//! CI runs [`BODIES_CI`] bodies. The soak (10^5 bodies):
//! `cargo test --release -p turbine-actors --test integration fuzz_http:: -- --ignored --nocapture`.
//!
//! Asserted for every body: no panic, an answer (never a 5xx: the fake engine never fails,
//! so a server error is the frontend's own bug), an OpenAI-shaped error for every refusal, a
//! complete body (JSON, or SSE ending in `[DONE]`) for every success; a valid request is
//! served after every batch; resident memory stays bounded.

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{header, Request};
use futures::StreamExt;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use tower::ServiceExt;
use turbine_actors::frontend::{
    router, ChatEngine, Delta, DeltaStream, EngineError, GenerateRequest, HttpConfig, Metrics,
    Usage,
};
use turbine_actors::protocol::FinishReason;

const MODEL: &str = "fuzz-model";
const BODIES_CI: u64 = 3_000;
const BODIES_SOAK: u64 = 100_000;
const BATCH: u64 = 250;

/// Streams up to `max_tokens` (at most 8) deltas of "w".
struct TickEngine;

#[async_trait]
impl ChatEngine for TickEngine {
    fn model_id(&self) -> &str {
        MODEL
    }

    fn context_length(&self) -> usize {
        64
    }

    async fn generate(&self, req: GenerateRequest) -> Result<DeltaStream, EngineError> {
        let n = req.max_tokens.unwrap_or(8).min(8);
        let deltas = (0..n.max(1)).map(move |i| {
            let last = i + 1 == n.max(1);
            Ok(Delta {
                text: "w ".into(),
                token_ids: vec![i],
                finish: last.then_some(FinishReason::Length),
                usage: last.then_some(Usage {
                    prompt_tokens: 3,
                    completion_tokens: i + 1,
                    cached_tokens: 0,
                }),
                ..Delta::default()
            })
        });
        Ok(futures::stream::iter(deltas.collect::<Vec<_>>()).boxed())
    }
}

fn valid_chat() -> Value {
    json!({
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hello there"}]},
            {"role": "assistant", "content": "hi"},
            {"role": "user", "content": "again"}
        ],
        "max_tokens": 4,
        "temperature": 0.7,
        "top_p": 0.9,
        "stop": ["\n\n", "END"],
        "seed": 7,
        "stream": true,
        "stream_options": {"include_usage": true},
        "logprobs": true,
        "top_logprobs": 2,
        "n": 1,
        "presence_penalty": 0.1,
        "frequency_penalty": 0.2,
        "user": "fuzzer"
    })
}

fn valid_completion() -> Value {
    json!({
        "model": MODEL,
        "prompt": "once upon a time",
        "max_tokens": 3,
        "temperature": 0,
        "stop": "the end",
        "stream": false,
        "logprobs": 1,
        "echo": false,
        "seed": 1
    })
}

/// A JSON value of a random type, sometimes extreme.
fn random_value(rng: &mut ChaCha8Rng, depth: u32) -> Value {
    match rng.gen_range(0..14) {
        0 => Value::Null,
        1 => json!(rng.gen::<bool>()),
        2 => json!(rng.gen::<i64>()),
        3 => json!(u64::MAX),
        4 => json!(-1),
        5 => json!(rng.gen::<f64>() * 1e308),
        6 => json!(0),
        7 => json!("x".repeat(rng.gen_range(0..3000))),
        8 => json!("\u{0}\u{202e}\u{fffd}ünï"),
        9 if depth < 3 => Value::Array(
            (0..rng.gen_range(0..6))
                .map(|_| random_value(rng, depth + 1))
                .collect(),
        ),
        10 if depth < 3 => {
            let mut map = serde_json::Map::new();
            for _ in 0..rng.gen_range(0..4) {
                let key = ["role", "content", "type", "text", "image_url", "x"]
                    .choose(rng)
                    .unwrap_or(&"x")
                    .to_string();
                map.insert(key, random_value(rng, depth + 1));
            }
            Value::Object(map)
        }
        11 => json!([]),
        12 => json!({}),
        _ => json!(rng.gen_range(-3..100_000)),
    }
}

/// One structural mutation of an object body.
fn mutate_value(rng: &mut ChaCha8Rng, body: &mut Value) {
    let Some(map) = body.as_object_mut() else {
        return;
    };
    let keys: Vec<String> = map.keys().cloned().collect();
    let key = keys.choose(rng).cloned().unwrap_or_default();
    match rng.gen_range(0..8) {
        0 => {
            map.remove(&key);
        }
        1 | 2 => {
            let v = random_value(rng, 0);
            map.insert(key, v);
        }
        3 => {
            // An unknown field (misspelt or invented).
            let name = format!("{key}_{}", rng.gen_range(0..3));
            let v = random_value(rng, 0);
            map.insert(name, v);
        }
        4 => {
            if let Some(Value::Array(messages)) = map.get_mut("messages") {
                match rng.gen_range(0..4) {
                    0 => messages.clear(),
                    1 => messages.push(random_value(rng, 1)),
                    2 => {
                        let field = *["role", "content"].choose(rng).unwrap_or(&"role");
                        let v = random_value(rng, 1);
                        if let Some(m) = messages.choose_mut(rng).and_then(Value::as_object_mut) {
                            m.insert(field.to_string(), v);
                        }
                    }
                    _ => {
                        for _ in 0..rng.gen_range(100..2000) {
                            messages.push(json!({"role": "user", "content": "m"}));
                        }
                    }
                }
            } else if let Some(prompt) = map.get_mut("prompt") {
                *prompt = random_value(rng, 0);
            }
        }
        5 => {
            let v = random_value(rng, 0);
            map.insert("stream_options".into(), v);
            map.insert("stream".into(), json!(rng.gen::<bool>()));
        }
        6 => {
            let v = random_value(rng, 0);
            map.insert("model".into(), v);
        }
        _ => {
            let v = random_value(rng, 0);
            map.insert(
                ["n", "logit_bias", "tools", "response_format", "best_of"]
                    .choose(rng)
                    .unwrap_or(&"n")
                    .to_string(),
                v,
            );
        }
    }
}

/// One byte-level mutation of the serialized text.
fn mutate_bytes(rng: &mut ChaCha8Rng, text: &mut Vec<u8>) {
    match rng.gen_range(0..7) {
        0 if !text.is_empty() => {
            let cut = rng.gen_range(0..text.len());
            text.truncate(cut);
        }
        1 if !text.is_empty() => {
            for _ in 0..rng.gen_range(1..5) {
                let i = rng.gen_range(0..text.len());
                text[i] ^= 1 << rng.gen_range(0..8);
            }
        }
        2 => {
            let i = rng.gen_range(0..=text.len());
            text.splice(i..i, [0xff, 0xfe, 0xc3]);
        }
        3 => {
            let depth = rng.gen_range(100..20_000);
            *text = format!(
                "{{\"model\":\"{MODEL}\",\"prompt\":{}{}}}",
                "[".repeat(depth),
                "]".repeat(depth)
            )
            .into_bytes();
        }
        4 => {
            // A duplicated key: the last one wins or the parse fails; either is an answer.
            if let Some(pos) = text.iter().position(|&b| b == b'{') {
                text.splice(pos + 1..pos + 1, b"\"max_tokens\":-1,".iter().copied());
            }
        }
        5 => text.extend_from_slice(b" trailing garbage"),
        _ => {}
    }
}

fn content_type(rng: &mut ChaCha8Rng) -> Option<&'static str> {
    match rng.gen_range(0..20) {
        0 => None,
        1 => Some("text/plain"),
        2 => Some("application/json; charset=latin1"),
        3 => Some("application/vnd.api+json"),
        4 => Some("application/json;;; q=x"),
        _ => Some("application/json"),
    }
}

fn rss_kb() -> u64 {
    turbine_runtime::telemetry::resident_memory_kb(None).unwrap_or(0)
}

/// Sends one request through the router; returns (status, content type, body).
async fn send(
    app: &axum::Router,
    path: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> (u16, String, Vec<u8>) {
    let mut request = Request::post(path);
    if let Some(ct) = content_type {
        request = request.header(header::CONTENT_TYPE, ct);
    }
    let request = request.body(Body::from(body)).expect("a request");
    let response = app.clone().oneshot(request).await.expect("infallible");
    let status = response.status().as_u16();
    let ct = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let bytes = axum::body::to_bytes(response.into_body(), 64 << 20)
        .await
        .expect("the body completes");
    (status, ct, bytes.to_vec())
}

/// Checks one answer; returns its status.
fn check(status: u16, ct: &str, body: &[u8], sent: &[u8]) -> u16 {
    let shown = String::from_utf8_lossy(&sent[..sent.len().min(300)]).to_string();
    assert!(
        status < 500,
        "{status} for {shown}: {}",
        String::from_utf8_lossy(body)
    );
    if status == 200 {
        if ct.starts_with("text/event-stream") {
            assert!(
                body.ends_with(b"data: [DONE]\n\n"),
                "unterminated stream for {shown}"
            );
        } else {
            let v: Value = serde_json::from_slice(body).expect("a JSON body");
            assert!(v["choices"].is_array(), "{v}");
        }
    } else {
        let v: Value = serde_json::from_slice(body)
            .unwrap_or_else(|e| panic!("{status} body is not JSON ({e}) for {shown}"));
        assert!(v["error"]["message"].is_string(), "{status}: {v}");
        assert!(v["error"]["type"].is_string(), "{status}: {v}");
    }
    status
}

async fn fuzz(bodies: u64, seed: u64) -> BTreeMap<u16, u64> {
    let app = router(
        std::sync::Arc::new(TickEngine),
        Metrics::new(),
        HttpConfig::default(),
    );
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut statuses = BTreeMap::new();
    let rss_start = rss_kb();
    let mut sent = 0;
    while sent < bodies {
        for _ in 0..BATCH.min(bodies - sent) {
            let chat = rng.gen::<bool>();
            let mut body = if chat {
                valid_chat()
            } else {
                valid_completion()
            };
            for _ in 0..rng.gen_range(0..4) {
                mutate_value(&mut rng, &mut body);
            }
            let mut text = serde_json::to_vec(&body).unwrap_or_default();
            if rng.gen_range(0..3) == 0 {
                mutate_bytes(&mut rng, &mut text);
            }
            let path = if chat {
                "/v1/chat/completions"
            } else {
                "/v1/completions"
            };
            let ct = content_type(&mut rng);
            let (status, rct, answer) = send(&app, path, ct, text.clone()).await;
            *statuses
                .entry(check(status, &rct, &answer, &text))
                .or_default() += 1;
            sent += 1;
        }
        let ok = send(
            &app,
            "/v1/completions",
            Some("application/json"),
            serde_json::to_vec(&json!({"model": MODEL, "prompt": "alive"})).unwrap_or_default(),
        )
        .await;
        assert_eq!(ok.0, 200, "not serving after {sent} bodies");
        let rss = rss_kb();
        assert!(
            rss <= rss_start + 200 * 1024,
            "resident memory grew from {rss_start} kB to {rss} kB after {sent} bodies"
        );
    }
    statuses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_thousand_mutated_bodies_get_answers_and_the_frontend_keeps_serving() {
    let statuses = fuzz(BODIES_CI, 3).await;
    eprintln!("statuses: {statuses:?}");
    assert!(statuses.get(&200).copied().unwrap_or(0) > 0, "{statuses:?}");
    assert!(statuses.get(&400).copied().unwrap_or(0) > 0, "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak: 10^5 bodies, run with --release -- --ignored"]
async fn a_hundred_thousand_mutated_bodies() {
    let statuses = fuzz(BODIES_SOAK, 4).await;
    eprintln!("statuses: {statuses:?}");
}
