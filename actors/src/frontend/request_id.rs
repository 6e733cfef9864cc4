//! Request ids: every HTTP request gets one (the client's `x-request-id` when it sent a
//! usable one, else a fresh one), carried in the request's headers to the handlers and
//! stages, in a `request` tracing span around the handler (so each log line the request
//! causes names it), and back to the client in the response's `x-request-id`.

use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
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

/// The middleware: sets the id on the request, runs the handler in its span, and answers
/// with it.
pub async fn layer(mut request: Request, next: Next) -> Response {
    let id = incoming(request.headers()).unwrap_or_else(fresh);
    // Printable ASCII only, so this cannot fail; a fresh id is used if it somehow did.
    let value = HeaderValue::from_str(&id).unwrap_or_else(|_| HeaderValue::from_static("invalid"));
    request
        .headers_mut()
        .insert(REQUEST_ID_HEADER, value.clone());
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        method = %request.method(),
        path = %request.uri().path(),
    );
    let mut response = next.run(request).instrument(span).await;
    response.headers_mut().insert(REQUEST_ID_HEADER, value);
    response
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
