//! The OpenAI-compatible HTTP server (axum).
//!
//! Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models,
//! GET /v1/models/{id}, GET /health (the process is up), GET /ready (a worker is there to
//! serve), GET /metrics. Every error is OpenAI-shaped JSON; the server never panics on
//! input, so it keeps serving after any bad request. Generations pass [`Admission`] first:
//! bounded concurrency, a bounded queue, 429 beyond it, and an optional per-request deadline.

use super::admission::{Admission, Admitted, Deadline};
use super::engine::{ChatEngine, GenerateRequest};
use super::error::ApiError;
use super::generation::{GenEvent, Generation};
use super::metrics::{HttpMetrics, Metrics};
use super::openai::{ModelCard, ModelList};
use super::render::{Aggregate, Endpoint, ResponseMeta, SseWriter};
use super::validate;
use crate::router::hints::RoutingHints;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            max_body_bytes: 4 * 1024 * 1024,
            max_concurrent_requests: 256,
            max_queued_requests: 1024,
            request_timeout: None,
            readiness: Readiness::always(),
        }
    }
}

/// Whether the engine can serve now (`Err(why)` if not): e.g. whether any worker has joined.
/// GET /ready answers 200 or 503 from it; GET /health only says the process is alive.
#[derive(Clone)]
pub struct Readiness(Arc<dyn Fn() -> Result<(), String> + Send + Sync>);

impl Readiness {
    /// Ready whenever the process is up (an engine that needs nothing else).
    pub fn always() -> Readiness {
        Readiness(Arc::new(|| Ok(())))
    }

    pub fn from_fn(check: impl Fn() -> Result<(), String> + Send + Sync + 'static) -> Readiness {
        Readiness(Arc::new(check))
    }

    pub fn check(&self) -> Result<(), String> {
        (self.0)()
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
    };
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(scrape_metrics))
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(cfg.max_body_bytes))
        .layer(middleware::from_fn_with_state(metrics, count_requests))
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
    metrics
        .http()
        .record_request(&endpoint, response.status().as_u16());
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
        let mut req = validate::chat_request(&body, state.engine.model_id())?;
        req.hints = routing_hints(&headers)?;
        generate(&state, req, Endpoint::Chat, started, deadline).await
    };
    result.await.unwrap_or_else(error_response)
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
        req.hints = routing_hints(&headers)?;
        generate(&state, req, Endpoint::Completion, started, deadline).await
    };
    result.await.unwrap_or_else(error_response)
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

/// Admits the request, starts the engine, waits for its first event (so early failures get
/// a proper status), then answers with SSE or one JSON body, all within `deadline`.
async fn generate(
    state: &AppState,
    req: GenerateRequest,
    endpoint: Endpoint,
    started: Instant,
    deadline: Option<Deadline>,
) -> Result<Response, ApiError> {
    let admitted = state.admission.admit(deadline).await?;
    let in_flight = InFlight::start(state.metrics.http().clone(), started, admitted);
    let meta = ResponseMeta::new(
        endpoint,
        &state.ids.next(),
        unix_now(),
        req.model.clone(),
        req.logprobs.is_some(),
    );
    let stop = req.stop.clone();
    let stream = req.stream;
    let include_usage = req.include_usage;
    let to_api = |err| ApiError::from_engine(err, endpoint.prompt_param());
    let deltas = match deadline {
        Some(d) => tokio::time::timeout_at(d.at, state.engine.generate(req))
            .await
            .map_err(|_| to_api(d.exceeded()))?,
        None => state.engine.generate(req).await,
    }
    .map_err(to_api)?;
    let mut generation = Bounded {
        generation: Some(Generation::new(
            deltas,
            &stop,
            started,
            state.metrics.http().clone(),
        )),
        deadline,
    };
    let first = generation.next().await;
    if let Some(GenEvent::Failed(err)) = first {
        return Err(ApiError::from_engine(err, endpoint.prompt_param()));
    }
    if stream {
        Ok(sse_response(
            generation,
            first,
            SseWriter::new(meta, include_usage),
            in_flight,
        ))
    } else {
        aggregate(generation, first, &meta).await
    }
}

/// A generation cut off at its deadline: the engine stream is dropped (which cancels the
/// request engine-side) and one `DeadlineExceeded` failure is its last event.
struct Bounded {
    generation: Option<Generation>,
    deadline: Option<Deadline>,
}

impl Bounded {
    async fn next(&mut self) -> Option<GenEvent> {
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

async fn aggregate(
    mut generation: Bounded,
    first: Option<GenEvent>,
    meta: &ResponseMeta,
) -> Result<Response, ApiError> {
    let mut body = Aggregate::default();
    let mut next = first;
    loop {
        match next {
            Some(GenEvent::Text { text, logprobs }) => body.push_text(&text, logprobs),
            Some(GenEvent::Finished { reason, usage }) => {
                let json = body.into_json(meta, reason, usage).map_err(|err| {
                    ApiError::server(StatusCode::INTERNAL_SERVER_ERROR, err.to_string())
                })?;
                return Ok(Json(json).into_response());
            }
            Some(GenEvent::Failed(err)) => {
                return Err(ApiError::from_engine(err, meta.endpoint.prompt_param()))
            }
            None => {
                return Err(ApiError::server(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the generation ended without a result",
                ))
            }
        }
        next = generation.next().await;
    }
}

/// State of one SSE body. Dropping it (client gone) drops the generation and with it the
/// engine stream, which cancels the request engine-side.
struct SseBody {
    generation: Bounded,
    first: Option<GenEvent>,
    writer: SseWriter,
    _in_flight: InFlight,
}

fn sse_response(
    generation: Bounded,
    first: Option<GenEvent>,
    writer: SseWriter,
    in_flight: InFlight,
) -> Response {
    let state = SseBody {
        generation,
        first,
        writer,
        _in_flight: in_flight,
    };
    let chunks = futures::stream::unfold(Some(state), |state| async move {
        let mut body = state?;
        loop {
            let event = match body.first.take() {
                Some(event) => Some(event),
                None => body.generation.next().await,
            };
            let Some(event) = event else {
                // Finished: send the terminator and drop the state.
                return Some((
                    Ok::<_, Infallible>(Bytes::from_static(SseWriter::done().as_bytes())),
                    None,
                ));
            };
            let text = body.writer.render(event);
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
    match state.readiness.check() {
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
