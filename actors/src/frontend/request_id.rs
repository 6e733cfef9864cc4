//! Request ids and the request's span: every HTTP request gets an id (the client's
//! `x-request-id` when it sent a usable one, else a fresh one), carried in the request's
//! headers to the handlers and stages, and back to the client in the response's
//! `x-request-id`. The middleware opens a `request` tracing span with it, a child of the
//! client's W3C `traceparent` when one came (else the root of a new trace), and keeps it
//! open, and entered, until the response body is done: the handler, the SSE stream and
//! everything they reach (over the request plane too, see `turbine_runtime::TraceContext`)
//! run in it, so each log line the request causes names its id and each span it opens
//! belongs to its trace.

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use http_body::{Frame, SizeHint};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;
use tracing::Instrument;

/// The header, both ways.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Longest client-supplied id honoured; a longer or non-printable one is replaced.
const MAX_ID_LEN: usize = 128;

/// The client's id, when it is 1..=128 printable ASCII characters without spaces.
fn incoming(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(REQUEST_ID_HEADER)?.to_str().ok()?;
    let ok = !value.is_empty()
        && value.len() <= MAX_ID_LEN
        && value.bytes().all(|b| b.is_ascii_graphic());
    ok.then(|| value.to_string())
}

/// A fresh id: 128 random bits in hex.
fn fresh() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// The request id of a request that went through [`layer`].
pub fn of(headers: &HeaderMap) -> String {
    headers
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .map_or_else(String::new, str::to_string)
}

/// The W3C trace context headers.
const TRACEPARENT_HEADER: &str = "traceparent";
const TRACESTATE_HEADER: &str = "tracestate";

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// The middleware: sets the id on the request, runs the handler and then the response
/// body in the request's span, and answers with the id.
pub async fn layer(mut request: Request, next: Next) -> Response {
    let id = incoming(request.headers()).unwrap_or_else(fresh);
    // Printable ASCII only, so this cannot fail; a fresh id is used if it somehow did.
    let value = HeaderValue::from_str(&id).unwrap_or_else(|_| HeaderValue::from_static("invalid"));
    request
        .headers_mut()
        .insert(REQUEST_ID_HEADER, value.clone());
    let span = tracing::info_span!(
        "request",
        otel.name = %format!("{} {}", request.method(), request.uri().path()),
        otel.kind = "server",
        request_id = %id,
        method = %request.method(),
        path = %request.uri().path(),
        status = tracing::field::Empty,
    );
    // A malformed or absent `traceparent` starts a new trace (the W3C rule).
    turbine_runtime::telemetry::set_remote_parent(
        &span,
        header(request.headers(), TRACEPARENT_HEADER),
        header(request.headers(), TRACESTATE_HEADER),
    );
    let started = Instant::now();
    let response = next.run(request).instrument(span.clone()).await;
    let status = response.status().as_u16();
    span.record("status", status);
    let (mut parts, body) = response.into_parts();
    parts.headers.insert(REQUEST_ID_HEADER, value);
    let body = InRequestSpan {
        body: Some(body),
        span,
        started,
        status,
    };
    Response::from_parts(parts, Body::new(body))
}

/// A response body polled (and dropped) inside its request's span, which ends with it.
struct InRequestSpan {
    /// `None` once dropped (inside the span, so what its drop cancels logs as the request's).
    body: Option<Body>,
    span: tracing::Span,
    started: Instant,
    status: u16,
}

impl HttpBody for InRequestSpan {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        let _in = this.span.enter();
        match this.body.as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(HttpBody::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.body
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), HttpBody::size_hint)
    }
}

impl Drop for InRequestSpan {
    fn drop(&mut self) {
        let _in = self.span.enter();
        drop(self.body.take());
        tracing::debug!(
            status = self.status,
            elapsed_ms = self.started.elapsed().as_millis() as u64,
            "request finished"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn honours_a_usable_client_id_and_replaces_a_bad_one() {
        let mut h = HeaderMap::new();
        assert_eq!(incoming(&h), None);
        h.insert(REQUEST_ID_HEADER, HeaderValue::from_static("abc-123"));
        assert_eq!(incoming(&h).as_deref(), Some("abc-123"));
        h.insert(REQUEST_ID_HEADER, HeaderValue::from_static("has space"));
        assert_eq!(incoming(&h), None);
        let long = "x".repeat(MAX_ID_LEN + 1);
        h.insert(REQUEST_ID_HEADER, HeaderValue::from_str(&long).unwrap());
        assert_eq!(incoming(&h), None);
        assert_eq!(fresh().len(), 32);
        assert_ne!(fresh(), fresh());
    }
}
