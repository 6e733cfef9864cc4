//! End-to-end tests of the OpenAI HTTP frontend over a real TCP socket, with a fake engine
//! that echoes the prompt's words back one word per delta.

use async_trait::async_trait;
use futures::StreamExt;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Notify};
use turbine_actors::frontend::{
    router, serve, ChatEngine, Delta, DeltaStream, EngineError, GenerateRequest, HttpConfig,
    Metrics, Prompt, Readiness, TokenLogprobs, TopLogprob, Usage,
};
use turbine_actors::protocol::FinishReason;

const MODEL: &str = "echo-model";
const CONTEXT: usize = 32;
/// Generous bound so a broken test fails instead of hanging; not a timing assertion.
const HANG_GUARD: Duration = Duration::from_secs(20);

// ------------------------------------------------------------------------------------------
// Fake engine

/// Set when a stream the engine handed out is dropped (= the request was cancelled).
#[derive(Clone, Default)]
struct DropProbe {
    dropped: Arc<AtomicBool>,
    notify: Arc<Notify>,
}

impl DropProbe {
    async fn wait(&self) {
        tokio::time::timeout(HANG_GUARD, async {
            while !self.dropped.load(Ordering::SeqCst) {
                self.notify.notified().await;
            }
        })
        .await
        .expect("the engine stream was never dropped");
    }
}

struct DropGuard(DropProbe);

impl Drop for DropGuard {
    fn drop(&mut self) {
        self.0.dropped.store(true, Ordering::SeqCst);
        self.0.notify.notify_one();
    }
}

/// Echoes the prompt's words. Special first words change its behaviour:
/// `overloaded` refuses, `fail` fails after one delta, `endless` streams "tick " forever,
/// `gated` sends one delta and waits for `gate` before finishing.
#[derive(Default)]
struct EchoEngine {
    probe: DropProbe,
    gate: Arc<Notify>,
    seen: Mutex<Vec<GenerateRequest>>,
}

fn prompt_words(req: &GenerateRequest) -> Vec<String> {
    let text = match &req.prompt {
        Prompt::Text(text) => text.clone(),
        Prompt::Chat(messages) => messages
            .last()
            .map(|m| m.content.clone())
            .unwrap_or_default(),
        Prompt::Tokens(ids) => ids.iter().map(|id| format!("t{id} ")).collect(),
    };
    text.split_whitespace().map(str::to_string).collect()
}

fn logprobs_for(word: &str, k: u32) -> Vec<TokenLogprobs> {
    vec![TokenLogprobs {
        token: word.to_string(),
        bytes: word.as_bytes().to_vec(),
        logprob: -0.5,
        top: (0..k)
            .map(|i| TopLogprob {
                token: format!("alt{i}"),
                bytes: format!("alt{i}").into_bytes(),
                logprob: -1.0 - i as f32,
            })
            .collect(),
    }]
}

#[async_trait]
impl ChatEngine for EchoEngine {
    fn model_id(&self) -> &str {
        MODEL
    }

    fn context_length(&self) -> usize {
        CONTEXT
    }

    async fn generate(&self, req: GenerateRequest) -> Result<DeltaStream, EngineError> {
        self.seen.lock().unwrap().push(req.clone());
        let words = prompt_words(&req);
        if words.len() > CONTEXT {
            return Err(EngineError::ContextLengthExceeded {
                prompt_tokens: words.len(),
                context_length: CONTEXT,
            });
        }
        let prompt_tokens = words.len() as u32;
        let guard = DropGuard(self.probe.clone());
        match words.first().map(String::as_str) {
            Some("overloaded") => return Err(EngineError::Overloaded("queue full".into())),
            Some("fail") => {
                let first = Ok(Delta {
                    text: "partial".into(),
                    token_ids: vec![1],
                    ..Delta::default()
                });
                let failure = Err(EngineError::Internal("device lost".into()));
                return Ok(futures::stream::iter([first, failure]).boxed());
            }
            Some("endless") => {
                let ticks = futures::stream::unfold(guard, |guard| async move {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    let delta = Delta {
                        text: "tick ".into(),
                        token_ids: vec![7],
                        ..Delta::default()
                    };
                    Some((Ok(delta), guard))
                });
                return Ok(ticks.boxed());
            }
            Some("gated") => {
                let gate = Arc::clone(&self.gate);
                let first = Delta {
                    text: "before".into(),
                    token_ids: vec![1],
                    ..Delta::default()
                };
                let rest = futures::stream::once(async move {
                    gate.notified().await;
                    let _keep = guard;
                    Ok(Delta {
                        text: " after".into(),
                        token_ids: vec![2],
                        finish: Some(FinishReason::Stop),
                        usage: Some(Usage {
                            prompt_tokens,
                            completion_tokens: 2,
                            cached_tokens: 0,
                        }),
                        ..Delta::default()
                    })
                });
                return Ok(futures::stream::iter([Ok(first)]).chain(rest).boxed());
            }
            _ => {}
        }
        let budget = req
            .max_tokens
            .map_or(usize::MAX, |n| n as usize)
            .min(CONTEXT - words.len());
        let produced = words.len().min(budget);
        let finish = if produced < words.len() {
            FinishReason::Length
        } else {
            FinishReason::Stop
        };
        let deltas: Vec<Result<Delta, EngineError>> = words
            .iter()
            .take(produced)
            .enumerate()
            .map(|(i, word)| {
                let last = i + 1 == produced;
                Ok(Delta {
                    text: if i == 0 {
                        word.clone()
                    } else {
                        format!(" {word}")
                    },
                    token_ids: vec![i as u32],
                    logprobs: req.logprobs.map(|k| logprobs_for(word, k)),
                    // The prompt is the words: the first has no logprob (NaN).
                    prompt_logprobs: req.sampling.prompt_logprobs.filter(|_| i == 0).map(|k| {
                        let mut first = logprobs_for(&words[0], 0);
                        first[0].logprob = f32::NAN;
                        first
                            .into_iter()
                            .chain(words[1..].iter().flat_map(|w| logprobs_for(w, k)))
                            .collect()
                    }),
                    finish: last.then(|| finish.clone()),
                    usage: (i == 0 || last).then_some(Usage {
                        prompt_tokens,
                        completion_tokens: i as u32 + 1,
                        cached_tokens: 1,
                    }),
                })
            })
            .collect();
        let deltas = if deltas.is_empty() {
            vec![Ok(Delta {
                finish: Some(finish),
                usage: Some(Usage {
                    prompt_tokens,
                    completion_tokens: 0,
                    cached_tokens: 0,
                }),
                ..Delta::default()
            })]
        } else {
            deltas
        };
        Ok(futures::stream::iter(deltas)
            .chain(futures::stream::once(async move {
                drop(guard);
                // Never reached by a well-behaved consumer: the last delta ends the request.
                Err(EngineError::Internal("read past the end".into()))
            }))
            .boxed())
    }
}

// ------------------------------------------------------------------------------------------
// Server and a raw HTTP/1.1 client

struct Server {
    addr: SocketAddr,
    engine: Arc<EchoEngine>,
    metrics: Metrics,
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn start_with(cfg: HttpConfig) -> Server {
    let engine = Arc::new(EchoEngine::default());
    let metrics = Metrics::new();
    let app = router(engine.clone(), metrics.clone(), cfg);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, app, async {
        let _ = rx.await;
    }));
    Server {
        addr,
        engine,
        metrics,
        shutdown: Some(tx),
        task,
    }
}

async fn start() -> Server {
    start_with(HttpConfig::default()).await
}

#[derive(Debug)]
struct HttpResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl HttpResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    fn text(&self) -> String {
        String::from_utf8(self.body.clone()).unwrap()
    }

    /// The `data:` payloads of an SSE body, in order.
    fn sse_data(&self) -> Vec<String> {
        let text = self.text();
        assert!(
            text.ends_with("\n\n"),
            "SSE body must end with a blank line: {text:?}"
        );
        text.split("\n\n")
            .filter(|event| !event.is_empty())
            .map(|event| {
                event
                    .strip_prefix("data: ")
                    .unwrap_or_else(|| panic!("not a data line: {event:?}"))
                    .to_string()
            })
            .collect()
    }
}

fn raw_request(method: &str, path: &str, content_type: Option<&str>, body: &[u8]) -> Vec<u8> {
    raw_request_with(method, path, content_type, &[], body)
}

fn raw_request_with(
    method: &str,
    path: &str,
    content_type: Option<&str>,
    extra_headers: &[(&str, &str)],
    body: &[u8],
) -> Vec<u8> {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in extra_headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(content_type) = content_type {
        head.push_str(&format!("Content-Type: {content_type}\r\n"));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

fn parse_response(raw: &[u8]) -> HttpResponse {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("no end of headers");
    let head = std::str::from_utf8(&raw[..split]).unwrap();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .map(|line| {
            let (k, v) = line.split_once(':').unwrap();
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect();
    let payload = &raw[split + 4..];
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked {
        dechunk(payload)
    } else {
        payload.to_vec()
    };
    HttpResponse {
        status,
        headers,
        body,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("chunk size line");
        let size_text = std::str::from_utf8(&data[..line_end]).unwrap();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap();
        data = &data[line_end + 2..];
        if size == 0 {
            return body;
        }
        body.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> HttpResponse {
    tokio::time::timeout(HANG_GUARD, async {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(&raw_request(method, path, content_type, body))
            .await
            .unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.unwrap();
        parse_response(&raw)
    })
    .await
    .expect("request hung")
}

/// A JSON POST with extra header lines.
async fn post_with(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &Value,
) -> HttpResponse {
    tokio::time::timeout(HANG_GUARD, async {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let request = raw_request_with(
            "POST",
            path,
            Some("application/json"),
            headers,
            body.to_string().as_bytes(),
        );
        stream.write_all(&request).await.unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.unwrap();
        parse_response(&raw)
    })
    .await
    .expect("request hung")
}

async fn get(addr: SocketAddr, path: &str) -> HttpResponse {
    send(addr, "GET", path, None, b"").await
}

async fn post(addr: SocketAddr, path: &str, body: &Value) -> HttpResponse {
    send(
        addr,
        "POST",
        path,
        Some("application/json"),
        body.to_string().as_bytes(),
    )
    .await
}

fn chat_body(content: &str) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": content}]})
}

fn with(mut body: Value, extra: Value) -> Value {
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// Concatenated chat `delta.content` (or completions `text`) of SSE chunks.
fn streamed_text(chunks: &[Value]) -> String {
    chunks
        .iter()
        .filter_map(|c| c["choices"].get(0))
        .filter_map(|choice| {
            choice["delta"]["content"]
                .as_str()
                .or_else(|| choice["text"].as_str())
        })
        .collect()
}

fn parse_chunks(response: &HttpResponse) -> Vec<Value> {
    let data = response.sse_data();
    assert_eq!(
        data.last().map(String::as_str),
        Some("[DONE]"),
        "stream must end with [DONE]"
    );
    data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

/// A 2x1 PNG (a red and a green pixel).
const PNG_2X1: &str = "iVBORw0KGgoAAAANSUhEUgAAAAIAAAABCAIAAAB7QOjdAAAAD0lEQVR4nGP4z8DA8J8BAAf/Af8Bf4mnAAAAAElFTkSuQmCC";

fn png_url() -> String {
    format!("data:image/png;base64,{PNG_2X1}")
}

/// A chat body whose one user message is a text part then an image part per url.
fn image_body(urls: &[&str]) -> Value {
    let mut parts = vec![json!({"type": "text", "text": "look"})];
    parts.extend(
        urls.iter()
            .map(|u| json!({"type": "image_url", "image_url": {"url": u}})),
    );
    json!({"messages": [{"role": "user", "content": parts}]})
}

async fn assert_still_serving(addr: SocketAddr) {
    let ok = post(addr, "/v1/chat/completions", &chat_body("still alive")).await;
    assert_eq!(ok.status, 200, "server stopped serving: {}", ok.text());
    assert_eq!(ok.json()["choices"][0]["message"]["content"], "still alive");
}

// ------------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn models_health_and_unknown_routes() {
    let server = start().await;
    let models = get(server.addr, "/v1/models").await;
    assert_eq!(models.status, 200);
    let models = models.json();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], MODEL);
    assert_eq!(models["data"][0]["object"], "model");
    assert_eq!(models["data"][0]["max_model_len"], CONTEXT);

    assert_eq!(
        get(server.addr, &format!("/v1/models/{MODEL}"))
            .await
            .status,
        200
    );
    let missing = get(server.addr, "/v1/models/other").await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["error"]["code"], "model_not_found");

    let health = get(server.addr, "/health").await;
    assert_eq!(health.status, 200);

    let unknown = get(server.addr, "/v2/nothing").await;
    assert_eq!(unknown.status, 404);
    assert!(unknown.json()["error"]["message"].is_string());
    let wrong_method = get(server.addr, "/v1/chat/completions").await;
    assert_eq!(wrong_method.status, 405);
    assert!(wrong_method.json()["error"]["message"].is_string());
}

#[tokio::test]
async fn chat_non_streaming_aggregates_the_deltas() {
    let server = start().await;
    let response = post(
        server.addr,
        "/v1/chat/completions",
        &chat_body("hello big world"),
    )
    .await;
    assert_eq!(response.status, 200);
    assert!(response
        .header("content-type")
        .unwrap()
        .starts_with("application/json"));
    let body = response.json();
    assert_eq!(body["object"], "chat.completion");
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["model"], MODEL);
    let choice = &body["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], "hello big world");
    assert_eq!(choice["finish_reason"], "stop");
    assert_eq!(choice["logprobs"], Value::Null);
    assert_eq!(body["usage"]["prompt_tokens"], 3);
    assert_eq!(body["usage"]["completion_tokens"], 3);
    assert_eq!(body["usage"]["total_tokens"], 6);
    assert_eq!(body["usage"]["prompt_tokens_details"]["cached_tokens"], 1);

    let seen = server.engine.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert!(!seen[0].stream);
}

#[tokio::test]
async fn sampling_fields_reach_the_engine() {
    let server = start().await;
    let body = with(
        chat_body("a b"),
        json!({"temperature": 0.5, "top_p": 0.9, "top_k": 40, "min_p": 0.05,
               "repetition_penalty": 1.1, "seed": 42, "max_completion_tokens": 9,
               "ignore_eos": true, "user": "someone", "n": 1, "stop": "zz",
               "presence_penalty": 0.5, "frequency_penalty": -0.5, "min_tokens": 2,
               "logit_bias": {"3": -100}, "stop_token_ids": [7]}),
    );
    assert_eq!(
        post(server.addr, "/v1/chat/completions", &body)
            .await
            .status,
        200
    );
    let seen = server.engine.seen.lock().unwrap()[0].clone();
    assert_eq!(seen.sampling.temperature, 0.5);
    assert_eq!(seen.sampling.top_p, 0.9);
    assert_eq!(seen.sampling.top_k, 40);
    assert_eq!(seen.sampling.min_p, 0.05);
    assert_eq!(seen.sampling.repetition_penalty, 1.1);
    assert_eq!(seen.sampling.seed, Some(42));
    assert_eq!(seen.max_tokens, Some(9));
    assert!(seen.ignore_eos);
    assert_eq!(seen.stop, vec!["zz".to_string()]);
    assert_eq!(seen.sampling.presence_penalty, 0.5);
    assert_eq!(seen.sampling.frequency_penalty, -0.5);
    assert_eq!(seen.sampling.min_tokens, 2);
    assert_eq!(seen.sampling.logit_bias, vec![(3, -100.0)]);
    assert_eq!(seen.stop_token_ids, vec![7]);
}

#[tokio::test]
async fn max_tokens_ends_with_length() {
    let server = start().await;
    let body = with(chat_body("one two three four"), json!({"max_tokens": 2}));
    let body = post(server.addr, "/v1/chat/completions", &body)
        .await
        .json();
    assert_eq!(body["choices"][0]["message"]["content"], "one two");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"]["completion_tokens"], 2);

    // Huge limits are accepted; the engine caps them.
    let body = with(
        chat_body("one two"),
        json!({"max_tokens": 99_999_999_999u64}),
    );
    let response = post(server.addr, "/v1/chat/completions", &body).await;
    assert_eq!(response.status, 200);
    assert_eq!(
        server.engine.seen.lock().unwrap()[1].max_tokens,
        Some(u32::MAX)
    );
}

#[tokio::test]
async fn chat_streaming_sends_role_content_finish_and_done() {
    let server = start().await;
    let body = with(chat_body("hello big world"), json!({"stream": true}));
    let response = post(server.addr, "/v1/chat/completions", &body).await;
    assert_eq!(response.status, 200);
    assert!(response
        .header("content-type")
        .unwrap()
        .starts_with("text/event-stream"));
    let chunks = parse_chunks(&response);
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let ids: Vec<&Value> = chunks.iter().map(|c| &c["id"]).collect();
    assert!(ids.iter().all(|id| *id == ids[0]), "one id per stream");
    assert_eq!(streamed_text(&chunks), "hello big world");
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
    assert!(chunks[..chunks.len() - 1]
        .iter()
        .all(|c| c["choices"][0]["finish_reason"].is_null()));
    assert!(
        chunks.iter().all(|c| c.get("usage").is_none()),
        "no usage unless asked"
    );
}

#[tokio::test]
async fn streaming_include_usage_adds_a_usage_chunk() {
    let server = start().await;
    for path in ["/v1/chat/completions", "/v1/completions"] {
        let body = if path == "/v1/completions" {
            json!({"model": MODEL, "prompt": "a b c", "stream": true,
                   "stream_options": {"include_usage": true}})
        } else {
            with(
                chat_body("a b c"),
                json!({"stream": true, "stream_options": {"include_usage": true}}),
            )
        };
        let chunks = parse_chunks(&post(server.addr, path, &body).await);
        let usage_chunk = chunks.last().unwrap();
        assert_eq!(usage_chunk["choices"], json!([]), "{path}");
        assert_eq!(usage_chunk["usage"]["prompt_tokens"], 3);
        assert_eq!(usage_chunk["usage"]["completion_tokens"], 3);
        assert_eq!(usage_chunk["usage"]["total_tokens"], 6);
        let finish = &chunks[chunks.len() - 2];
        assert_eq!(finish["choices"][0]["finish_reason"], "stop");
        assert_eq!(streamed_text(&chunks), "a b c");
    }
}

#[tokio::test]
async fn completions_streaming_and_not() {
    let server = start().await;
    let body = json!({"model": MODEL, "prompt": ["say this please"], "max_tokens": 2});
    let response = post(server.addr, "/v1/completions", &body).await;
    assert_eq!(response.status, 200);
    let body = response.json();
    assert_eq!(body["object"], "text_completion");
    assert!(body["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(body["choices"][0]["text"], "say this");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"]["completion_tokens"], 2);

    let body = json!({"model": MODEL, "prompt": "say this please", "stream": true});
    let chunks = parse_chunks(&post(server.addr, "/v1/completions", &body).await);
    assert!(chunks.iter().all(|c| c["object"] == "text_completion"));
    assert_eq!(streamed_text(&chunks), "say this please");
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "stop"
    );
}

#[tokio::test]
async fn stop_strings_cut_across_deltas() {
    let server = start().await;
    // Deltas are "alpha", " beta", " gamma", " delta": the stop string spans two of them.
    let prompt = "alpha beta gamma delta";
    let body = with(chat_body(prompt), json!({"stop": ["nomatch", "ta gam"]}));
    let body = post(server.addr, "/v1/chat/completions", &body)
        .await
        .json();
    assert_eq!(body["choices"][0]["message"]["content"], "alpha be");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");

    let body = json!({"model": MODEL, "prompt": prompt, "stop": "a g", "stream": true});
    let chunks = parse_chunks(&post(server.addr, "/v1/completions", &body).await);
    assert_eq!(streamed_text(&chunks), "alpha bet");
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "stop"
    );

    // A stop string that never completes releases the held text at the end.
    let body = with(chat_body(prompt), json!({"stop": "delta!", "stream": true}));
    let chunks = parse_chunks(&post(server.addr, "/v1/chat/completions", &body).await);
    assert_eq!(streamed_text(&chunks), prompt);
}

#[tokio::test]
async fn logprobs_shapes() {
    let server = start().await;
    let body = with(
        chat_body("x y"),
        json!({"logprobs": true, "top_logprobs": 2}),
    );
    let body = post(server.addr, "/v1/chat/completions", &body)
        .await
        .json();
    let content = body["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert_eq!(content.len(), 2);
    assert_eq!(content[1]["token"], "y");
    assert_eq!(content[1]["logprob"], -0.5);
    assert_eq!(content[1]["top_logprobs"].as_array().unwrap().len(), 2);

    let body = json!({"model": MODEL, "prompt": "x y", "logprobs": 1});
    let body = post(server.addr, "/v1/completions", &body).await.json();
    let logprobs = &body["choices"][0]["logprobs"];
    assert_eq!(logprobs["tokens"], json!(["x", "y"]));
    assert_eq!(logprobs["token_logprobs"], json!([-0.5, -0.5]));
    assert_eq!(logprobs["text_offset"], json!([0, 1]));
    assert_eq!(logprobs["top_logprobs"][0]["alt0"], -1.0);

    // `echo` with `logprobs`: the prompt's tokens first, the first one without a logprob.
    let body = json!({"model": MODEL, "prompt": "x y", "logprobs": 1, "echo": true});
    let body = post(server.addr, "/v1/completions", &body).await.json();
    let choice = &body["choices"][0];
    assert_eq!(choice["text"], "x yx y");
    let logprobs = &choice["logprobs"];
    assert_eq!(logprobs["tokens"], json!(["x", "y", "x", "y"]));
    assert_eq!(logprobs["token_logprobs"], json!([null, -0.5, -0.5, -0.5]));
    assert_eq!(logprobs["top_logprobs"][0], json!(null));
    assert_eq!(logprobs["top_logprobs"][1]["alt0"], -1.0);
    assert_eq!(logprobs["text_offset"], json!([0, 1, 2, 3]));
    let body =
        json!({"model": MODEL, "prompt": "x y", "logprobs": 1, "echo": true, "stream": true});
    let chunks = parse_chunks(&post(server.addr, "/v1/completions", &body).await);
    let tokens: Vec<Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["logprobs"]["tokens"].as_array())
        .flatten()
        .cloned()
        .collect();
    assert_eq!(tokens, vec![json!("x"), json!("y"), json!("x"), json!("y")]);

    let body = with(chat_body("x y"), json!({"logprobs": true, "stream": true}));
    let chunks = parse_chunks(&post(server.addr, "/v1/chat/completions", &body).await);
    let streamed: usize = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array())
        .map(Vec::len)
        .sum();
    assert_eq!(streamed, 2);
}

/// One bad request: where it goes, what it sends, what must come back.
struct BadCase {
    name: &'static str,
    path: &'static str,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    status: u16,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

fn bad(name: &'static str, body: Value, status: u16, param: Option<&'static str>) -> BadCase {
    BadCase {
        name,
        path: "/v1/chat/completions",
        content_type: Some("application/json"),
        body: body.to_string().into_bytes(),
        status,
        param,
        code: None,
    }
}

#[tokio::test]
async fn bad_requests_get_openai_errors_and_the_server_keeps_serving() {
    let server = start_with(HttpConfig {
        max_body_bytes: 1024,
        ..HttpConfig::default()
    })
    .await;
    let long_prompt = vec!["w"; CONTEXT + 1].join(" ");
    let mut cases = vec![
        BadCase {
            body: b"{\"messages\": [".to_vec(),
            ..bad("malformed json", json!(null), 400, None)
        },
        BadCase {
            body: b"[1, 2]".to_vec(),
            ..bad("not an object", json!(null), 400, None)
        },
        BadCase {
            content_type: Some("text/plain"),
            ..bad("wrong content type", chat_body("x"), 415, None)
        },
        BadCase {
            body: b"{\"messages\": [{\"role\": \"user\", \"content\": \"\xff\xfe\"}]}".to_vec(),
            ..bad("non utf-8", json!(null), 400, None)
        },
        BadCase {
            body: format!(
                "{{\"messages\": [{{\"role\": \"user\", \"content\": \"{}\"}}]}}",
                "x".repeat(2048)
            )
            .into_bytes(),
            ..bad("too large", json!(null), 413, None)
        },
        bad(
            "empty messages",
            json!({"messages": []}),
            400,
            Some("messages"),
        ),
        bad(
            "missing messages",
            json!({"model": MODEL}),
            400,
            Some("messages"),
        ),
        bad(
            "temperature high",
            with(chat_body("x"), json!({"temperature": 2.5})),
            400,
            Some("temperature"),
        ),
        bad(
            "temperature negative",
            with(chat_body("x"), json!({"temperature": -0.1})),
            400,
            Some("temperature"),
        ),
        bad(
            "temperature type",
            with(chat_body("x"), json!({"temperature": "hot"})),
            400,
            Some("temperature"),
        ),
        bad(
            "top_p zero",
            with(chat_body("x"), json!({"top_p": 0})),
            400,
            Some("top_p"),
        ),
        bad(
            "top_p high",
            with(chat_body("x"), json!({"top_p": 1.5})),
            400,
            Some("top_p"),
        ),
        bad(
            "max_tokens zero",
            with(chat_body("x"), json!({"max_tokens": 0})),
            400,
            Some("max_tokens"),
        ),
        bad(
            "max_tokens negative",
            with(chat_body("x"), json!({"max_tokens": -3})),
            400,
            Some("max_tokens"),
        ),
        bad(
            "n zero",
            with(chat_body("x"), json!({"n": 0})),
            400,
            Some("n"),
        ),
        bad(
            "unknown field",
            with(chat_body("x"), json!({"temprature": 0.5})),
            400,
            Some("temprature"),
        ),
        bad(
            "refused field",
            with(chat_body("x"), json!({"functions": []})),
            400,
            Some("functions"),
        ),
        bad(
            "null user content",
            json!({"messages": [{"role": "user", "content": null}]}),
            400,
            Some("messages[0].content"),
        ),
        bad(
            "five stops",
            with(chat_body("x"), json!({"stop": ["a", "b", "c", "d", "e"]})),
            400,
            Some("stop"),
        ),
        bad(
            "stop type",
            with(chat_body("x"), json!({"stop": 5})),
            400,
            Some("stop"),
        ),
        bad(
            "stream type",
            with(chat_body("x"), json!({"stream": "yes"})),
            400,
            Some("stream"),
        ),
        bad(
            "bad role",
            json!({"messages": [{"role": "wizard", "content": "x"}]}),
            400,
            Some("messages[0].role"),
        ),
        bad(
            "message type",
            json!({"messages": [{"role": "user", "content": "x"}, 7]}),
            400,
            Some("messages[1]"),
        ),
        bad(
            "image url not a data uri",
            image_body(&["x"]),
            400,
            Some("messages[0].content[1].image_url.url"),
        ),
        bad(
            "remote image url that cannot be fetched",
            image_body(&["http://127.0.0.1:1/cat.png"]),
            400,
            Some("messages[0].content[1].image_url.url"),
        ),
        bad(
            "corrupt image",
            image_body(&[&format!("data:image/png;base64,{}", &PNG_2X1[..40])]),
            400,
            Some("messages[0].content[1].image_url.url"),
        ),
        bad(
            "unsupported image format",
            image_body(&["data:image/gif;base64,R0lGODlhAQABAAAAACw="]),
            400,
            Some("messages[0].content[1].image_url.url"),
        ),
        bad(
            "image part without image_url",
            json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
            400,
            Some("messages[0].content[0]"),
        ),
        BadCase {
            code: Some("model_not_found"),
            ..bad(
                "unknown model",
                with(chat_body("x"), json!({"model": "gpt-9"})),
                404,
                Some("model"),
            )
        },
        BadCase {
            code: Some("context_length_exceeded"),
            ..bad(
                "prompt too long",
                chat_body(&long_prompt),
                400,
                Some("messages"),
            )
        },
        BadCase {
            code: Some("overloaded"),
            ..bad("overloaded", chat_body("overloaded now"), 503, None)
        },
        BadCase {
            path: "/v1/completions",
            ..bad(
                "missing prompt",
                json!({"model": MODEL}),
                400,
                Some("prompt"),
            )
        },
        BadCase {
            path: "/v1/completions",
            ..bad(
                "empty token-id prompt",
                json!({"prompt": [[1], []]}),
                400,
                Some("prompt[1]"),
            )
        },
        BadCase {
            path: "/v1/completions",
            code: Some("context_length_exceeded"),
            ..bad(
                "completion too long",
                json!({"prompt": long_prompt}),
                400,
                Some("prompt"),
            )
        },
    ];
    cases.push(BadCase {
        body: b"{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"stream\": true, \"temperature\": 9}".to_vec(),
        ..bad("streaming validation", json!(null), 400, Some("temperature"))
    });
    for case in cases {
        let response = send(
            server.addr,
            "POST",
            case.path,
            case.content_type,
            &case.body,
        )
        .await;
        assert_eq!(
            response.status,
            case.status,
            "{}: {}",
            case.name,
            response.text()
        );
        let body = response.json();
        let error = &body["error"];
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{}: {body}",
            case.name
        );
        assert!(error["type"].is_string(), "{}: {body}", case.name);
        let message = error["message"].as_str().unwrap_or_default();
        for serde_words in [
            "variant",
            "untagged",
            "invalid type",
            "expected f64",
            "expected u64",
        ] {
            assert!(
                !message.contains(serde_words),
                "{}: a serde message reached the client: {message}",
                case.name
            );
        }
        assert!(
            error.get("param").is_some() && error.get("code").is_some(),
            "{}: {body}",
            case.name
        );
        if let Some(param) = case.param {
            assert_eq!(error["param"], param, "{}: {body}", case.name);
        }
        if let Some(code) = case.code {
            assert_eq!(error["code"], code, "{}: {body}", case.name);
        }
        if case.status == 400 {
            assert_eq!(error["type"], "invalid_request_error", "{}", case.name);
        }
        assert_still_serving(server.addr).await;
    }
}

#[tokio::test]
async fn engine_failure_mid_stream() {
    let server = start().await;
    let response = post(server.addr, "/v1/chat/completions", &chat_body("fail soon")).await;
    assert_eq!(response.status, 500);
    assert!(response.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("device lost"));

    let body = with(chat_body("fail soon"), json!({"stream": true}));
    let response = post(server.addr, "/v1/chat/completions", &body).await;
    assert_eq!(response.status, 200, "headers go out with the first delta");
    let data = response.sse_data();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let error: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(error["error"]["type"], "server_error");
    let chunks: Vec<Value> = data[..data.len() - 2]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(streamed_text(&chunks), "partial");
    assert_still_serving(server.addr).await;
}

#[tokio::test]
async fn client_disconnect_mid_stream_drops_the_engine_stream() {
    let server = start().await;
    let body = with(chat_body("endless please"), json!({"stream": true}));
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(&raw_request(
            "POST",
            "/v1/chat/completions",
            Some("application/json"),
            body.to_string().as_bytes(),
        ))
        .await
        .unwrap();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(HANG_GUARD, async {
        while !String::from_utf8_lossy(&received).contains("tick") {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "server closed the stream early");
            received.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("no tokens streamed");
    assert!(!server.engine.probe.dropped.load(Ordering::SeqCst));
    drop(stream);
    server.engine.probe.wait().await;
    assert_still_serving(server.addr).await;
}

#[tokio::test]
async fn a_matched_stop_string_cancels_the_engine() {
    let server = start().await;
    let body = with(
        chat_body("endless please"),
        json!({"stop": "ck ti", "stream": true}),
    );
    let chunks = parse_chunks(&post(server.addr, "/v1/chat/completions", &body).await);
    assert_eq!(
        streamed_text(&chunks),
        "tick tick ti".split("ck ti").next().unwrap()
    );
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "stop"
    );
    server.engine.probe.wait().await;
}

#[tokio::test]
async fn metrics_expose_counters_and_shared_registry() {
    let server = start().await;
    let body = with(chat_body("one two three"), json!({"stream": true}));
    assert_eq!(
        post(server.addr, "/v1/chat/completions", &body)
            .await
            .status,
        200
    );
    assert_eq!(
        post(server.addr, "/v1/chat/completions", &chat_body("a b"))
            .await
            .status,
        200
    );
    let bad_body = with(chat_body("x"), json!({"temperature": 7}));
    assert_eq!(
        post(server.addr, "/v1/chat/completions", &bad_body)
            .await
            .status,
        400
    );

    // Another component registers into the same registry after the router exists.
    let queue_depth = prometheus_client::metrics::gauge::Gauge::<i64>::default();
    queue_depth.set(5);
    server
        .metrics
        .register("turbine_worker_queue_depth", "queued requests", queue_depth);
    let kv_blocks_free = prometheus_client::metrics::gauge::Gauge::<i64>::default();
    kv_blocks_free.set(12);
    server.metrics.registry().lock().unwrap().register(
        "turbine_kv_blocks_free",
        "free KV blocks",
        kv_blocks_free,
    );

    let response = get(server.addr, "/metrics").await;
    assert_eq!(response.status, 200);
    let text = response.text();
    let value = |series: &str| -> f64 {
        text.lines()
            .find_map(|line| {
                line.strip_prefix(series)
                    .and_then(|rest| rest.trim().parse().ok())
            })
            .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
    };
    assert_eq!(
        value(r#"turbine_http_requests_total{endpoint="/v1/chat/completions",status="200"}"#),
        2.0
    );
    assert_eq!(
        value(r#"turbine_http_requests_total{endpoint="/v1/chat/completions",status="400"}"#),
        1.0
    );
    assert_eq!(value("turbine_prompt_tokens_total"), 5.0);
    assert_eq!(value("turbine_completion_tokens_total"), 5.0);
    assert_eq!(value("turbine_time_to_first_token_seconds_count"), 2.0);
    assert_eq!(value("turbine_inter_token_latency_seconds_count"), 3.0);
    assert_eq!(value("turbine_request_duration_seconds_count"), 2.0);
    assert_eq!(value("turbine_http_requests_in_flight"), 0.0);
    assert_eq!(value("turbine_worker_queue_depth"), 5.0);
    assert_eq!(value("turbine_kv_blocks_free"), 12.0);
}

#[tokio::test]
async fn graceful_shutdown_drains_in_flight_streams() {
    let mut server = start().await;
    let body = with(chat_body("gated request"), json!({"stream": true}));
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(&raw_request(
            "POST",
            "/v1/chat/completions",
            Some("application/json"),
            body.to_string().as_bytes(),
        ))
        .await
        .unwrap();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(HANG_GUARD, async {
        while !String::from_utf8_lossy(&received).contains("before") {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0);
            received.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("first delta never arrived");

    server.shutdown.take().unwrap().send(()).unwrap();
    // The stream is still open: shutting down must not cut it.
    tokio::task::yield_now().await;
    assert!(!server.task.is_finished());
    server.engine.gate.notify_one();
    tokio::time::timeout(HANG_GUARD, stream.read_to_end(&mut received))
        .await
        .expect("stream never finished")
        .unwrap();
    let response = parse_response(&received);
    let chunks = parse_chunks(&response);
    assert_eq!(streamed_text(&chunks), "before after");
    tokio::time::timeout(HANG_GUARD, &mut server.task)
        .await
        .expect("server did not stop after draining")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn client_disconnect_while_waiting_for_a_non_streaming_answer_cancels() {
    let server = start().await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let body = chat_body("endless please");
    stream
        .write_all(&raw_request(
            "POST",
            "/v1/chat/completions",
            Some("application/json"),
            body.to_string().as_bytes(),
        ))
        .await
        .unwrap();
    // Wait until the engine has the request, then hang up.
    tokio::time::timeout(HANG_GUARD, async {
        while server.engine.seen.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("the engine never saw the request");
    drop(stream);
    server.engine.probe.wait().await;
    assert_still_serving(server.addr).await;
}

/// The value of an unlabelled gauge in the server's metrics text.
fn gauge(metrics: &Metrics, name: &str) -> f64 {
    let text = metrics.encode().unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no gauge {name} in {text}"))
}

async fn wait_until(what: &str, cond: impl Fn() -> bool) {
    tokio::time::timeout(HANG_GUARD, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("never happened: {what}"));
}

#[tokio::test]
async fn overload_is_refused_with_429_and_every_admitted_request_finishes() {
    let server = start_with(HttpConfig {
        max_concurrent_requests: 2,
        max_queued_requests: 2,
        ..HttpConfig::default()
    })
    .await;
    let gated = with(chat_body("gated request"), json!({"stream": true}));
    // Two run (held at the gate), two wait in the queue.
    let admitted: Vec<_> = (0..4)
        .map(|_| {
            let (addr, body) = (server.addr, gated.clone());
            tokio::spawn(async move { post(addr, "/v1/chat/completions", &body).await })
        })
        .collect();
    wait_until("two running and two queued", || {
        server.engine.seen.lock().unwrap().len() == 2
            && gauge(&server.metrics, "turbine_http_requests_queued") == 2.0
    })
    .await;

    // Past the queue: refused at once, OpenAI-shaped, with Retry-After.
    for _ in 0..3 {
        let refused = post(server.addr, "/v1/chat/completions", &chat_body("one more")).await;
        assert_eq!(refused.status, 429, "{}", refused.text());
        assert_eq!(refused.header("retry-after"), Some("1"));
        let error = &refused.json()["error"];
        assert_eq!(error["type"], "rate_limit_error");
        assert_eq!(error["code"], "rate_limit_exceeded");
        assert!(error["message"].as_str().unwrap().contains("capacity"));
    }
    assert_eq!(
        server.engine.seen.lock().unwrap().len(),
        2,
        "refused ones never reach the engine"
    );

    // Open the gate until every admitted request is through: all four finish in full.
    let all_done = || admitted.iter().all(|t| t.is_finished());
    tokio::time::timeout(HANG_GUARD, async {
        while !all_done() {
            server.engine.gate.notify_waiters();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("admitted requests never finished");
    for task in admitted {
        let response = task.await.unwrap();
        assert_eq!(response.status, 200, "{}", response.text());
        assert_eq!(streamed_text(&parse_chunks(&response)), "before after");
    }
    assert_eq!(gauge(&server.metrics, "turbine_http_requests_queued"), 0.0);
    assert_eq!(
        gauge(&server.metrics, "turbine_http_requests_in_flight"),
        0.0
    );
    assert_still_serving(server.addr).await;
}

#[tokio::test]
async fn a_stream_past_its_deadline_ends_with_an_error_and_is_cancelled() {
    let server = start().await;
    let body = with(chat_body("endless stream"), json!({"stream": true}));
    let response = post_with(
        server.addr,
        "/v1/chat/completions",
        &[("x-request-timeout-ms", "200")],
        &body,
    )
    .await;
    assert_eq!(response.status, 200);
    let data = response.sse_data();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let error: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(error["error"]["code"], "request_timeout", "{error}");
    assert!(error["error"]["message"]
        .as_str()
        .unwrap()
        .contains("200 ms"));
    assert!(streamed_text(&parse_chunks(&response)).starts_with("tick"));
    server.engine.probe.wait().await;
    assert_still_serving(server.addr).await;
}

#[tokio::test]
async fn the_configured_deadline_answers_504_and_a_bad_header_400() {
    let server = start_with(HttpConfig {
        request_timeout: Some(Duration::from_millis(150)),
        ..HttpConfig::default()
    })
    .await;
    let late = post(
        server.addr,
        "/v1/chat/completions",
        &chat_body("endless please"),
    )
    .await;
    assert_eq!(late.status, 504, "{}", late.text());
    assert_eq!(late.json()["error"]["code"], "request_timeout");
    server.engine.probe.wait().await;
    let bad = post_with(
        server.addr,
        "/v1/chat/completions",
        &[("x-request-timeout-ms", "soon")],
        &chat_body("x"),
    )
    .await;
    assert_eq!(bad.status, 400);
    assert!(bad.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("x-request-timeout-ms"));
    // Within the deadline, a request is served as usual.
    assert_still_serving(server.addr).await;
}

#[tokio::test]
async fn health_is_liveness_and_ready_follows_the_engine() {
    let ready = Arc::new(AtomicBool::new(false));
    let flag = ready.clone();
    let server = start_with(HttpConfig {
        readiness: Readiness::from_fn(move || {
            if flag.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err("no worker has joined yet".to_string())
            }
        }),
        ..HttpConfig::default()
    })
    .await;
    assert_eq!(get(server.addr, "/health").await.status, 200);
    let not_ready = get(server.addr, "/ready").await;
    assert_eq!(not_ready.status, 503);
    assert_eq!(not_ready.json()["reason"], "no worker has joined yet");
    ready.store(true, Ordering::SeqCst);
    assert_eq!(get(server.addr, "/ready").await.status, 200);
    assert_eq!(get(server.addr, "/health").await.status, 200);
}

#[tokio::test]
async fn a_good_image_passes_the_frontend_to_the_engine() {
    let server = start().await;
    let url = png_url();
    let many = post(
        server.addr,
        "/v1/chat/completions",
        &image_body(&[url.as_str(); 9]),
    )
    .await;
    assert_eq!(many.status, 400, "{}", many.text());
    let error = &many.json()["error"];
    assert_eq!(error["param"], "messages[0].content[9]", "{error}");
    assert!(
        error["message"].as_str().unwrap().contains("at most 8"),
        "{error}"
    );
    let ok = post(
        server.addr,
        "/v1/chat/completions",
        &image_body(&[png_url().as_str()]),
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    // The echo engine sees the text part (the image travels beside it).
    assert_eq!(ok.json()["choices"][0]["message"]["content"], "look");
}

// ------------------------------------------------------------------------------------------
// Custom stages (the actor API) in front of the engine

mod stages {
    use super::*;
    use turbine_actors::stages::{
        Stage, StageChain, StageError, StageHandler, StageLink, StageRegistry, StageRequest,
        StageService, StreamFilter,
    };
    use turbine_runtime::{Node, NodeConfig};

    /// Rewrites "cats" to "dogs", refuses "forbidden", panics on "explode", and
    /// upper-cases the output.
    struct TestStage;

    struct Upper;

    impl StreamFilter for Upper {
        fn on_text(&mut self, text: &str) -> String {
            text.to_uppercase()
        }
    }

    #[async_trait]
    impl Stage for TestStage {
        async fn on_request(&mut self, request: &mut StageRequest) -> Result<(), StageError> {
            for prompt in &mut request.prompts {
                if let Prompt::Chat(messages) = prompt {
                    for m in messages.iter_mut() {
                        if m.content.contains("explode") {
                            panic!("kaboom");
                        }
                        if m.content.contains("forbidden") {
                            return Err(StageError::forbidden("that word is not allowed here"));
                        }
                        m.content = m.content.replace("cats", "dogs");
                    }
                }
            }
            Ok(())
        }

        fn on_stream(&mut self, _request: &StageRequest) -> Option<Box<dyn StreamFilter>> {
            Some(Box::new(Upper))
        }
    }

    async fn start_staged() -> (Server, Node) {
        let node = Node::start(NodeConfig {
            name: "stages-test".into(),
            ..NodeConfig::default()
        })
        .await
        .unwrap();
        let mut registry = StageRegistry::new();
        registry.register("test_stage", |_| Ok(Box::new(TestStage)));
        let spec = turbine_actors::cluster_config::StageSpec {
            name: "test_stage".into(),
            remote: false,
            config: serde_yaml::Value::Null,
        };
        let factory = registry.factory(0, &spec).unwrap();
        node.serve::<StageService, _, _>("stage.test_stage", move || {
            StageHandler::new("test_stage", &factory, &serde_yaml::Value::Null)
        })
        .await
        .unwrap();
        let addr = node.local::<StageService>("stage.test_stage").unwrap();
        let chain = StageChain::new(vec![Arc::new(StageLink::new("test_stage", Some(addr)))]);
        let server = start_with(HttpConfig {
            stages: Arc::new(chain),
            ..HttpConfig::default()
        })
        .await;
        (server, node)
    }

    #[tokio::test]
    async fn a_stage_rewrites_rejects_and_filters_and_survives_its_panic() {
        let (server, _node) = start_staged().await;
        // Rewrite: the engine sees "dogs"; the filter upper-cases what the client gets.
        let r = post(
            server.addr,
            "/v1/chat/completions",
            &chat_body("I like cats"),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["choices"][0]["message"]["content"], "I LIKE DOGS");
        let seen = server.engine.seen.lock().unwrap().last().cloned().unwrap();
        assert_eq!(prompt_words(&seen), ["I", "like", "dogs"]);
        assert_eq!(r.header("x-request-id").map(str::len), Some(32));

        // The same through a stream, with the client's request id honoured.
        let r = post_with(
            server.addr,
            "/v1/chat/completions",
            &[("x-request-id", "client-id-7")],
            &with(chat_body("cats and more cats"), json!({"stream": true})),
        )
        .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-request-id"), Some("client-id-7"));
        assert_eq!(streamed_text(&parse_chunks(&r)), "DOGS AND MORE DOGS");

        // Reject: the stage's own status and message, OpenAI-shaped.
        let r = post(
            server.addr,
            "/v1/chat/completions",
            &chat_body("a forbidden word"),
        )
        .await;
        assert_eq!(r.status, 403, "{}", r.text());
        let err = &r.json()["error"];
        assert_eq!(err["type"], "permission_error");
        assert_eq!(err["message"], "that word is not allowed here");
        assert!(r.header("x-request-id").is_some());

        // Panic: that request gets a 500 naming the stage ...
        let r = post(
            server.addr,
            "/v1/chat/completions",
            &chat_body("explode now"),
        )
        .await;
        assert_eq!(r.status, 500, "{}", r.text());
        let err = &r.json()["error"];
        assert!(
            err["message"]
                .as_str()
                .unwrap()
                .contains("stage `test_stage`"),
            "{err}"
        );
        assert_eq!(err["code"], "stage_failed");
        // ... and the restarted stage serves the next one.
        let r = post(
            server.addr,
            "/v1/chat/completions",
            &chat_body("hello cats"),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["choices"][0]["message"]["content"], "HELLO DOGS");
    }

    #[tokio::test]
    async fn requests_without_stages_pass_untouched() {
        let server = start().await;
        let r = post(
            server.addr,
            "/v1/chat/completions",
            &chat_body("I like cats"),
        )
        .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["choices"][0]["message"]["content"], "I like cats");
    }
}
