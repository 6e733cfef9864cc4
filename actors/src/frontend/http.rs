//! The OpenAI-compatible HTTP server (axum).
//!
//! Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models,
//! GET /v1/models/{id}, POST /tokenize and /detokenize (vLLM's), GET /health (the process is up), GET /ready (a worker is there to
//! serve), GET /metrics. Every error is OpenAI-shaped JSON; the server never panics on
//! input, so it keeps serving after any bad request. Generations pass [`Admission`] first:
//! bounded concurrency, a bounded queue, 429 beyond it, and an optional per-request deadline.

use super::admission::{Admission, Admitted, Deadline};
use super::engine::{ChatEngine, EngineError, Prompt, Usage};
use super::error::ApiError;
use super::generation::FinishKind;
use super::generation::{GenEvent, Generation};
use super::images::ImageLimits;
use super::metrics::{HttpMetrics, Metrics};
use super::openai::{DetokenizeResponse, ModelCard, ModelList, TokenizeResponse};
use super::render::{Aggregate, Endpoint, ResponseMeta, SseWriter};
use super::tools::{ToolEvent, ToolParser, ToolSetup};
use super::validate::{self, Validated};
use super::{request_id, stages};
use crate::router::hints::RoutingHints;
use crate::stages::{RequestMeta, StageChain, StageFlow};
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::StreamExt;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tracing::Instrument;

/// Server settings.
#[derive(Clone, Debug)]
pub struct HttpConfig {
    /// Larger request bodies get 413.
    pub max_body_bytes: usize,
    /// Generations running at once (0: no limit, no queue).
    pub max_concurrent_requests: usize,
    /// Generations waiting for a running slot; beyond this, 429 with `Retry-After`.
    pub max_queued_requests: usize,
    /// Default deadline of a generation, arrival to last byte (`None`: none). A client can
    /// ask for a shorter one with the `x-request-timeout-ms` header.
    pub request_timeout: Option<Duration>,
    /// What GET /ready reports.
    pub readiness: Readiness,
    /// Limits on the images of a chat request.
    pub images: ImageLimits,
    /// The custom stages every generation passes before the engine (empty: none).
    pub stages: Arc<StageChain>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            max_body_bytes: 4 * 1024 * 1024,
            max_concurrent_requests: 256,
            max_queued_requests: 1024,
            request_timeout: None,
            readiness: Readiness::always(),
            images: ImageLimits::default(),
            stages: Arc::new(StageChain::empty()),
        }
    }
}

/// Whether the engine can serve now (`Err(why)` if not): e.g. whether any worker has joined
/// and can take requests. GET /ready answers 200 or 503 from it; GET /health only says the
/// process is alive. The check may ask another actor (the router), so it is async.
#[derive(Clone)]
pub struct Readiness(Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>);

impl Readiness {
    /// Ready whenever the process is up (an engine that needs nothing else).
    pub fn always() -> Readiness {
        Readiness::from_fn(|| Ok(()))
    }

    /// A check that needs nothing but memory.
    pub fn from_fn(check: impl Fn() -> Result<(), String> + Send + Sync + 'static) -> Readiness {
        Readiness(Arc::new(move || {
            let ready = check();
            Box::pin(async move { ready })
        }))
    }

    /// A check that awaits something (a call to the router).
    pub fn from_async<F, Fut>(check: F) -> Readiness
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        Readiness(Arc::new(move || Box::pin(check())))
    }

    pub async fn check(&self) -> Result<(), String> {
        (self.0)().await
    }
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Readiness(..)")
    }
}

#[derive(Clone)]
struct AppState {
    engine: Arc<dyn ChatEngine>,
    metrics: Metrics,
    ids: Arc<ResponseIds>,
    admission: Arc<Admission>,
    request_timeout: Option<Duration>,
    readiness: Readiness,
    images: Arc<ImageLimits>,
    /// Fetches the images chat requests name by http(s) URL.
    fetcher: Arc<super::fetch::ImageFetcher>,
    stages: Arc<StageChain>,
}

/// Response ids: a per-process random prefix (ids stay unique across restarts) and a counter.
struct ResponseIds {
    nonce: u64,
    next: AtomicU64,
}

impl ResponseIds {
    fn next(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("{:016x}{n:08x}", self.nonce)
    }
}

/// Builds the router serving `engine`. `metrics` is also scraped at GET /metrics.
pub fn router(engine: Arc<dyn ChatEngine>, metrics: Metrics, cfg: HttpConfig) -> Router {
    let state = AppState {
        engine,
        metrics: metrics.clone(),
        ids: Arc::new(ResponseIds {
            nonce: rand::random(),
            next: AtomicU64::new(0),
        }),
        admission: Arc::new(Admission::new(
            cfg.max_concurrent_requests,
            cfg.max_queued_requests,
            metrics.http().queued_gauge(),
        )),
        request_timeout: cfg.request_timeout,
        readiness: cfg.readiness.clone(),
        images: Arc::new(cfg.images.clone()),
        fetcher: Arc::new(super::fetch::ImageFetcher::new(cfg.images.clone())),
        stages: cfg.stages.clone(),
    };
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(scrape_metrics))
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(cfg.max_body_bytes))
        .layer(middleware::from_fn_with_state(metrics, count_requests))
        .layer(middleware::from_fn(request_id::layer))
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown` resolves, then stops accepting and waits
/// for in-flight requests (streams included) to finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn count_requests(
    State(metrics): State<Metrics>,
    matched: Option<MatchedPath>,
    request: Request,
    next: Next,
) -> Response {
    let endpoint = matched.map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string());
    let response = next.run(request).await;
    let streamed = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    metrics
        .http()
        .record_request(&endpoint, response.status().as_u16(), streamed);
    response
}

async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let result = async {
        let deadline = Deadline::for_request(started.into(), state.request_timeout, &headers)?;
        let body = json_body(&headers, body)?;
        let mut req = validate_chat(&state, body).await?;
        state.fetcher.fetch_request(&mut req).await?;
        req.request.hints = routing_hints(&headers)?;
        generate(&state, req, Endpoint::Chat, &headers, started, deadline).await
    };
    result.await.unwrap_or_else(error_response)
}

/// Bodies at least this large may carry images: they are validated (images decoded) on a
/// blocking thread, not on the runtime's.
const DECODE_OFF_RUNTIME_BYTES: usize = 16 << 10;

async fn validate_chat(state: &AppState, body: Bytes) -> Result<Validated, ApiError> {
    if body.len() < DECODE_OFF_RUNTIME_BYTES {
        return validate::chat_request(&body, state.engine.model_id(), &state.images);
    }
    let (model, images) = (state.engine.model_id().to_string(), state.images.clone());
    tokio::task::spawn_blocking(move || validate::chat_request(&body, &model, &images))
        .await
        .unwrap_or_else(|e| {
            Err(ApiError::server(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("validating the request: {e}"),
            ))
        })
}

async fn completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let result = async {
        let deadline = Deadline::for_request(started.into(), state.request_timeout, &headers)?;
        let body = json_body(&headers, body)?;
        let mut req = validate::completion_request(&body, state.engine.model_id())?;
        req.request.hints = routing_hints(&headers)?;
        generate(
            &state,
            req,
            Endpoint::Completion,
            &headers,
            started,
            deadline,
        )
        .await
    };
    result.await.unwrap_or_else(error_response)
}

/// POST /tokenize (vLLM's): the token ids a prompt or a conversation is generated from.
async fn tokenize(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = (|| {
        let body = json_body(&headers, body)?;
        let (prompt, add_special) = validate::tokenize_request(&body, state.engine.model_id())?;
        let tokens = state
            .engine
            .tokenize(&prompt, add_special)
            .map_err(|e| ApiError::from_engine(e, "prompt"))?;
        Ok::<_, ApiError>(Json(TokenizeResponse {
            count: tokens.len(),
            max_model_len: u64::try_from(state.engine.context_length()).unwrap_or(u64::MAX),
            tokens,
        }))
    })();
    result.map_or_else(error_response, IntoResponse::into_response)
}

/// POST /detokenize (vLLM's): the text of token ids.
async fn detokenize(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = (|| {
        let body = json_body(&headers, body)?;
        let ids = validate::detokenize_request(&body, state.engine.model_id())?;
        let prompt = state
            .engine
            .detokenize(&ids)
            .map_err(|e| ApiError::from_engine(e, "tokens"))?;
        Ok::<_, ApiError>(Json(DetokenizeResponse { prompt }))
    })();
    result.map_or_else(error_response, IntoResponse::into_response)
}

/// The request's routing hint headers; a malformed one is the client's 400 (a hint naming
/// a worker that is not there is not an error: the engine routes the request itself).
fn routing_hints(headers: &HeaderMap) -> Result<RoutingHints, ApiError> {
    RoutingHints::from_headers(|name| headers.get(name).and_then(|v| v.to_str().ok()))
        .map_err(|e| ApiError::invalid(None, e.to_string()))
}

/// Logs server-side failures (client mistakes are the client's to see) and renders the error.
fn error_response(error: ApiError) -> Response {
    if error.status.is_server_error() {
        tracing::warn!(status = error.status.as_u16(), message = %error.message, "generation failed");
    } else {
        tracing::debug!(status = error.status.as_u16(), message = %error.message, "rejected request");
    }
    error.into_response()
}

/// Checks the content type and the body read (413 when over the limit).
fn json_body(headers: &HeaderMap, body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    if let Some(content_type) = headers.get(header::CONTENT_TYPE) {
        let is_json = content_type
            .to_str()
            .ok()
            .and_then(|value| value.split(';').next())
            .map(|mime| {
                let mime = mime.trim().to_ascii_lowercase();
                mime == "application/json" || mime.ends_with("+json")
            })
            .unwrap_or(false);
        if !is_json {
            return Err(
                ApiError::invalid(None, "Content-Type must be application/json")
                    .with_status(StatusCode::UNSUPPORTED_MEDIA_TYPE),
            );
        }
    }
    body.map_err(|rejection| {
        let status = rejection.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "request body is too large".to_string()
        } else {
            format!("could not read the request body: {}", rejection.body_text())
        };
        ApiError::invalid(None, message).with_status(status)
    })
}

/// Admits the request, starts the engine for every choice, waits for the first event of
/// each prompt's first sample (so early failures get a proper status), then answers with
/// SSE or one JSON body, all within `deadline`.
///
/// `n` > 1: a prompt's later samples start once its first sample has produced a token. By
/// then the prompt's full KV blocks are committed to the worker's prefix cache, so the
/// other samples are routed to them (KV-aware routing sees the overlap) and share them
/// (reference-counted, read-only) instead of prefilling the prompt again; only the
/// trailing partial block is computed per sample.
async fn generate(
    state: &AppState,
    mut req: Validated,
    endpoint: Endpoint,
    headers: &HeaderMap,
    started: Instant,
    deadline: Option<Deadline>,
) -> Result<Response, ApiError> {
    // The `admission` span is the frontend's queue: it lasts while the request waits for a
    // running slot.
    let admitted = state
        .admission
        .admit(deadline)
        .instrument(tracing::info_span!("admission"))
        .await?;
    tracing::debug!(
        choices = req.num_choices(),
        stream = req.request.stream,
        "generation admitted"
    );
    let in_flight = InFlight::start(state.metrics.http().clone(), started, admitted);
    let flow = run_stages(state, &mut req, endpoint, headers).await?;
    let meta = ResponseMeta::new(
        endpoint,
        &state.ids.next(),
        unix_now(),
        req.request.model.clone(),
        req.request.logprobs.is_some(),
    );
    let to_api = |err| ApiError::from_engine(err, endpoint.prompt_param());
    let echoes = if req.echo {
        let texts = req
            .prompts
            .iter()
            .map(|p| prompt_text(state.engine.as_ref(), p))
            .collect::<Result<Vec<_>, _>>()
            .map_err(to_api)?;
        Some(texts)
    } else {
        None
    };
    let n = req.n as usize;
    let total = req.num_choices();
    let mut choices: Vec<Option<Bounded>> = (0..total).map(|_| None).collect();
    let echo = |index: usize| {
        echoes
            .as_ref()
            .and_then(|t| t.get(index / n.max(1)).cloned())
    };
    for p in 0..req.prompts.len() {
        let first = start_choice(state, &req, p * n, echo(p * n), &flow, started, deadline).await?;
        choices[p * n] = Some(first);
    }
    // Each prompt's first event: a refusal found before any token is the response's status.
    for p in 0..req.prompts.len() {
        if let Some(choice) = choices[p * n].as_mut() {
            let first = choice.next().await;
            if let Some(GenEvent::Failed(err)) = first {
                return Err(to_api(err));
            }
            choice.replay = first;
        }
    }
    for (index, slot) in choices.iter_mut().enumerate() {
        if slot.is_none() {
            let choice = start_choice(state, &req, index, echo(index), &flow, started, deadline);
            *slot = Some(choice.await?);
        }
    }
    let tools = req
        .request
        .tools
        .clone()
        .filter(|t| t.parses())
        .map(Arc::new);
    let merged = merge(choices, tools);
    if req.request.stream {
        Ok(sse_response(
            merged,
            n,
            SseWriter::new(meta, req.request.include_usage, total),
            in_flight,
        ))
    } else {
        aggregate(merged, total, n, &meta).await
    }
}

/// The prompt's text, for `echo`.
fn prompt_text(engine: &dyn ChatEngine, prompt: &Prompt) -> Result<String, EngineError> {
    match prompt {
        Prompt::Text(text) => Ok(text.clone()),
        Prompt::Tokens(ids) => engine.detokenize(ids),
        Prompt::Chat(_) => Err(EngineError::InvalidRequest(
            "`echo` is served on /v1/completions only".into(),
        )),
    }
}

/// Passes `req` through the custom stages (rewritten in place; a refusal is the response).
async fn run_stages(
    state: &AppState,
    req: &mut Validated,
    endpoint: Endpoint,
    headers: &HeaderMap,
) -> Result<Option<StageFlow>, ApiError> {
    if state.stages.is_empty() {
        return Ok(None);
    }
    let meta = RequestMeta {
        request_id: request_id::of(headers),
        api_key: stages::api_key(headers),
        endpoint: match endpoint {
            Endpoint::Chat => "/v1/chat/completions",
            Endpoint::Completion => "/v1/completions",
        }
        .to_string(),
        model: req.request.model.clone(),
        stream: req.request.stream,
        n: req.n,
    };
    let streams = u32::try_from(req.num_choices()).unwrap_or(u32::MAX);
    let (staged, flow) = state
        .stages
        .admit(stages::stage_request(req, meta), streams)
        .await
        .map_err(stages::api_error)?;
    stages::apply(req, staged)?;
    Ok(Some(flow))
}

async fn start_choice(
    state: &AppState,
    req: &Validated,
    index: usize,
    echo: Option<String>,
    flow: &Option<StageFlow>,
    started: Instant,
    deadline: Option<Deadline>,
) -> Result<Bounded, ApiError> {
    let request = req.choice(index);
    let endpoint_param = match request.prompt {
        Prompt::Chat(_) => "messages",
        _ => "prompt",
    };
    let to_api = |err| ApiError::from_engine(err, endpoint_param);
    let stop = request.stop.clone();
    let deltas = match deadline {
        Some(d) => tokio::time::timeout_at(d.at, state.engine.generate(request))
            .await
            .map_err(|_| to_api(d.exceeded()))?,
        None => state.engine.generate(request).await,
    }
    .map_err(to_api)?;
    let deltas = match flow {
        Some(flow) => StageChain::filter(flow, index as u32, deltas),
        None => deltas,
    };
    Ok(Bounded {
        generation: Some(
            Generation::new(deltas, &stop, started, state.metrics.http().clone()).with_echo(echo),
        ),
        deadline,
        replay: None,
    })
}

/// Every choice's events as one stream of (choice index, event), in arrival order.
fn merge(choices: Vec<Option<Bounded>>, tools: Option<Arc<ToolSetup>>) -> Merged {
    let streams = choices
        .into_iter()
        .enumerate()
        .filter_map(|(index, choice)| {
            let generation = choice?;
            let events = futures::stream::unfold(generation, |mut generation| async move {
                generation.next().await.map(|e| (e, generation))
            });
            let events = match &tools {
                Some(tools) => with_tools(events.boxed(), tools.clone()),
                None => events.boxed(),
            };
            Some(events.map(move |e| (index, e)).boxed())
        });
    futures::stream::select_all(streams)
}

/// One choice's events with tool calls parsed out of its text (see `tools::ToolParser`):
/// text inside `<tool_call>` tags becomes `ToolCall` events, and a choice that called a
/// tool finishes with `tool_calls` (unless it was cut at `length`).
fn with_tools(
    events: BoxStream<'static, GenEvent>,
    setup: Arc<ToolSetup>,
) -> BoxStream<'static, GenEvent> {
    let parser = ToolParser::new(!setup.parallel);
    events
        .scan(parser, move |parser, event| {
            let (found, tail) = match event {
                GenEvent::Text { text, logprobs } => {
                    let found = parser.push(&text, &setup.tools);
                    // Logprobs go out with the first piece, or alone when the text was held.
                    (found, (!logprobs.is_empty()).then_some(logprobs))
                }
                GenEvent::Finished { reason, usage } => {
                    let found = parser.finish(&setup.tools);
                    let called =
                        parser.calls() > 0 || found.iter().any(|e| matches!(e, ToolEvent::Call(_)));
                    let reason = match reason {
                        FinishKind::Stop if called => FinishKind::ToolCalls,
                        other => other,
                    };
                    let mut out = tool_events(parser, found, None);
                    out.push(GenEvent::Finished { reason, usage });
                    return futures::future::ready(Some(futures::stream::iter(out)));
                }
                other => return futures::future::ready(Some(futures::stream::iter(vec![other]))),
            };
            let out = tool_events(parser, found, tail);
            futures::future::ready(Some(futures::stream::iter(out)))
        })
        .flatten()
        .boxed()
}

/// The parser's findings as events; `logprobs` ride on the first text (or alone).
fn tool_events(
    parser: &ToolParser,
    found: Vec<ToolEvent>,
    mut logprobs: Option<Vec<super::engine::TokenLogprobs>>,
) -> Vec<GenEvent> {
    let calls_before = parser.calls()
        - found
            .iter()
            .filter(|e| matches!(e, ToolEvent::Call(_)))
            .count();
    let mut next_call = calls_before;
    let mut out = Vec::with_capacity(found.len() + 1);
    for event in found {
        match event {
            ToolEvent::Content(text) => out.push(GenEvent::Text {
                text,
                logprobs: logprobs.take().unwrap_or_default(),
            }),
            ToolEvent::Call(call) => {
                out.push(GenEvent::ToolCall {
                    index: next_call,
                    id: format!("call_{:016x}", rand::random::<u64>()),
                    call,
                });
                next_call += 1;
            }
        }
    }
    if let Some(logprobs) = logprobs {
        out.push(GenEvent::Text {
            text: String::new(),
            logprobs,
        });
    }
    out
}

/// Token counts over every choice: a prompt's tokens count once, not once per sample.
#[derive(Default)]
struct UsageSum {
    usage: Usage,
}

impl UsageSum {
    fn add(&mut self, index: usize, n: usize, usage: Usage) {
        if index % n.max(1) == 0 {
            self.usage.prompt_tokens = self.usage.prompt_tokens.saturating_add(usage.prompt_tokens);
            self.usage.cached_tokens = self.usage.cached_tokens.saturating_add(usage.cached_tokens);
        }
        self.usage.completion_tokens = self
            .usage
            .completion_tokens
            .saturating_add(usage.completion_tokens);
    }
}

/// A generation cut off at its deadline: the engine stream is dropped (which cancels the
/// request engine-side) and one `DeadlineExceeded` failure is its last event.
struct Bounded {
    generation: Option<Generation>,
    deadline: Option<Deadline>,
    /// An event already read (the first), given out again before the rest.
    replay: Option<GenEvent>,
}

impl Bounded {
    async fn next(&mut self) -> Option<GenEvent> {
        if let Some(event) = self.replay.take() {
            return Some(event);
        }
        let generation = self.generation.as_mut()?;
        let Some(deadline) = self.deadline else {
            return generation.next().await;
        };
        match tokio::time::timeout_at(deadline.at, generation.next()).await {
            Ok(event) => event,
            Err(_) => {
                self.generation = None;
                Some(GenEvent::Failed(deadline.exceeded()))
            }
        }
    }
}

type Merged = futures::stream::SelectAll<BoxStream<'static, (usize, GenEvent)>>;

async fn aggregate(
    mut merged: Merged,
    total: usize,
    n: usize,
    meta: &ResponseMeta,
) -> Result<Response, ApiError> {
    let mut body = Aggregate::new(total);
    let mut usage = UsageSum::default();
    while let Some((index, event)) = merged.next().await {
        match event {
            GenEvent::Text { text, logprobs } => body.push_text(index, &text, logprobs),
            GenEvent::ToolCall { id, call, .. } => body.push_tool_call(index, id, call),
            GenEvent::Finished { reason, usage: u } => {
                body.finish(index, reason);
                usage.add(index, n, u);
            }
            GenEvent::Failed(err) => {
                return Err(ApiError::from_engine(err, meta.endpoint.prompt_param()))
            }
        }
    }
    let json = body
        .into_json(meta, usage.usage)
        .map_err(|err| ApiError::server(StatusCode::INTERNAL_SERVER_ERROR, err.to_string()))?;
    Ok(Json(json).into_response())
}

/// State of one SSE body. Dropping it (client gone) drops the generations and with them
/// the engine streams, which cancels the requests engine-side.
struct SseBody {
    merged: Merged,
    writer: SseWriter,
    usage: UsageSum,
    n: usize,
    _in_flight: InFlight,
}

fn sse_response(merged: Merged, n: usize, writer: SseWriter, in_flight: InFlight) -> Response {
    let state = SseBody {
        merged,
        writer,
        usage: UsageSum::default(),
        n,
        _in_flight: in_flight,
    };
    let chunks = futures::stream::unfold(Some(state), |state| async move {
        let mut body = state?;
        loop {
            let Some((index, event)) = body.merged.next().await else {
                // Every choice finished: the usage chunk, the terminator, and drop the state.
                let mut tail = body.writer.usage(body.usage.usage);
                tail.push_str(SseWriter::done());
                tracing::debug!("event stream complete");
                return Some((Ok::<_, Infallible>(Bytes::from(tail)), None));
            };
            if let GenEvent::Finished { usage, .. } = &event {
                body.usage.add(index, body.n, *usage);
            }
            let failed = matches!(event, GenEvent::Failed(_));
            let mut text = body.writer.render(index, event);
            if failed {
                // One failed choice ends the response: the error event, then the terminator.
                text.push_str(SseWriter::done());
                return Some((Ok(Bytes::from(text)), None));
            }
            if !text.is_empty() {
                return Some((Ok(Bytes::from(text)), Some(body)));
            }
        }
    });
    let mut response = Response::new(Body::from_stream(chunks));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// Counts a generation request as in flight, and holds its admission slot, until dropped
/// (the end of its response body).
struct InFlight {
    metrics: HttpMetrics,
    started: Instant,
    _admitted: Admitted,
}

impl InFlight {
    fn start(metrics: HttpMetrics, started: Instant, admitted: Admitted) -> Self {
        metrics.request_started();
        InFlight {
            metrics,
            started,
            _admitted: admitted,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.metrics.request_ended(self.started.elapsed());
    }
}

fn model_card(engine: &dyn ChatEngine) -> ModelCard {
    ModelCard {
        id: engine.model_id().to_string(),
        object: "model".to_string(),
        created: unix_now(),
        owned_by: "turbine".to_string(),
        max_model_len: u64::try_from(engine.context_length()).unwrap_or(u64::MAX),
    }
}

async fn list_models(State(state): State<AppState>) -> Json<ModelList> {
    Json(ModelList {
        object: "list".to_string(),
        data: vec![model_card(state.engine.as_ref())],
    })
}

async fn get_model(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    if id == state.engine.model_id() {
        Json(model_card(state.engine.as_ref())).into_response()
    } else {
        ApiError::model_not_found(&id).into_response()
    }
}

/// Liveness: the process answers HTTP. Says nothing about workers (see [`ready`]).
async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

/// Readiness: 200 when a generation could be served now, 503 (with the reason) when not.
async fn ready(State(state): State<AppState>) -> Response {
    match state.readiness.check().await {
        Ok(()) => Json(serde_json::json!({"status": "ready"})).into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "not ready", "reason": why})),
        )
            .into_response(),
    }
}

async fn scrape_metrics(State(state): State<AppState>) -> Response {
    match state.metrics.encode() {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => ApiError::server(
            StatusCode::INTERNAL_SERVER_ERROR,
            "could not encode metrics",
        )
        .into_response(),
    }
}

async fn unknown_route(uri: Uri) -> ApiError {
    ApiError::route_not_found(uri.path())
}

async fn method_not_allowed(uri: Uri) -> ApiError {
    ApiError::invalid(None, format!("method not allowed for {}", uri.path()))
        .with_status(StatusCode::METHOD_NOT_ALLOWED)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
