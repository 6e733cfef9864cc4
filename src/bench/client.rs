//! A minimal OpenAI-compatible HTTP/1 client on hyper: lists models and streams one
//! completion, timing every chunk as its bytes arrive.

use super::sse::{parse_stream_item, SseDecoder};
use super::trace::{RequestOutcome, RequestTrace};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{ACCEPT, CONTENT_TYPE};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use std::time::Instant;

/// Error bodies are read up to this size only.
const MAX_ERROR_BODY: usize = 64 << 10;
/// /v1/models answers are read up to this size only.
const MAX_MODELS_BODY: usize = 4 << 20;

/// Failures outside a streamed request.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid server URL `{url}`: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("GET {uri} failed: {reason}")]
    Request { uri: String, reason: String },
    #[error("GET {uri}: HTTP {status}: {message}")]
    Status {
        uri: String,
        status: u16,
        message: String,
    },
    #[error("GET {uri}: no model listed (answer: {body})")]
    NoModel { uri: String, body: String },
}

/// The server's base URL plus a pooled HTTP/1 client.
#[derive(Clone)]
pub struct OpenAiClient {
    client: Client<HttpConnector, Full<Bytes>>,
    /// `scheme://authority[/prefix]` without a trailing `/` or `/v1`.
    base: String,
}

impl OpenAiClient {
    /// Accepts `http://host:port`, optionally with a path prefix and/or a trailing `/v1`.
    /// Plain HTTP only: the bench talks to servers on the loopback or a given local address.
    pub fn new(url: &str, max_idle_per_host: usize) -> Result<Self, ClientError> {
        let bad = |reason: &str| ClientError::BadUrl {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let uri: Uri = url
            .parse()
            .map_err(|e: hyper::http::uri::InvalidUri| bad(&e.to_string()))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(other) => {
                return Err(bad(&format!("scheme `{other}` is not supported, use http")))
            }
            None => return Err(bad("missing `http://`")),
        }
        if uri.authority().is_none() {
            return Err(bad("missing host"));
        }
        let trimmed = url.trim_end_matches('/');
        let base = trimmed.strip_suffix("/v1").unwrap_or(trimmed).to_string();
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(max_idle_per_host)
            .build(connector);
        Ok(OpenAiClient { client, base })
    }

    /// The absolute URI of an API path such as `/v1/models`.
    pub fn uri(&self, path: &str) -> Result<Uri, ClientError> {
        let full = format!("{}{path}", self.base);
        full.parse()
            .map_err(|e: hyper::http::uri::InvalidUri| ClientError::BadUrl {
                url: full.clone(),
                reason: e.to_string(),
            })
    }

    /// The id of the first model GET /v1/models lists.
    pub async fn first_model(&self) -> Result<String, ClientError> {
        let uri = self.uri("/v1/models")?;
        let request_error = |reason: String| ClientError::Request {
            uri: uri.to_string(),
            reason,
        };
        let request = Request::builder()
            .method(Method::GET)
            .uri(uri.clone())
            .body(Full::new(Bytes::new()))
            .map_err(|e| request_error(e.to_string()))?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| request_error(error_chain(&e)))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_MODELS_BODY)
            .collect()
            .await
            .map_err(|e| request_error(e.to_string()))?
            .to_bytes();
        if status != StatusCode::OK {
            return Err(ClientError::Status {
                uri: uri.to_string(),
                status: status.as_u16(),
                message: error_message(&body),
            });
        }
        let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        value
            .get("data")
            .and_then(Value::as_array)
            .and_then(|models| models.first())
            .and_then(|model| model.get("id"))
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| ClientError::NoModel {
                uri: uri.to_string(),
                body: String::from_utf8_lossy(&body).chars().take(200).collect(),
            })
    }

    /// POSTs a streaming request to `path` and measures it; never fails, failures are
    /// recorded in the outcome. Gives up at `deadline`.
    pub async fn stream(
        &self,
        path: &str,
        body: Bytes,
        deadline: tokio::time::Instant,
    ) -> RequestOutcome {
        let sent = Instant::now();
        let failed = |error: String| RequestOutcome::failed(sent, Instant::now(), error);
        let uri = match self.uri(path) {
            Ok(uri) => uri,
            Err(e) => return failed(e.to_string()),
        };
        let request = match Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "text/event-stream")
            .body(Full::new(body))
        {
            Ok(request) => request,
            Err(e) => return failed(e.to_string()),
        };
        let response = match tokio::time::timeout_at(deadline, self.client.request(request)).await {
            Err(_) => return failed("timed out waiting for response headers".to_string()),
            Ok(Err(e)) => return failed(format!("connection failed: {}", error_chain(&e))),
            Ok(Ok(response)) => response,
        };
        let status = response.status();
        if status != StatusCode::OK {
            let body = Limited::new(response.into_body(), MAX_ERROR_BODY);
            let text = match tokio::time::timeout_at(deadline, body.collect()).await {
                Ok(Ok(collected)) => error_message(&collected.to_bytes()),
                _ => String::new(),
            };
            return failed(format!("HTTP {}: {text}", status.as_u16()));
        }
        let mut body = response.into_body();
        let mut decoder = SseDecoder::new();
        let mut trace = RequestTrace::new(sent);
        loop {
            let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
                Err(_) => {
                    trace.fail("timed out mid-stream".to_string());
                    break;
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    trace.fail(format!("stream broke: {}", error_chain(&e)));
                    break;
                }
                Ok(Some(Ok(frame))) => frame,
            };
            let at = Instant::now();
            let Some(data) = frame.data_ref() else {
                continue;
            };
            match decoder.push(data) {
                Ok(events) => {
                    for event in events {
                        match parse_stream_item(&event) {
                            Ok(item) => trace.on_item(at, item),
                            Err(e) => trace.fail(e.to_string()),
                        }
                    }
                }
                Err(e) => {
                    trace.fail(e.to_string());
                    break;
                }
            }
        }
        trace.finish(Instant::now())
    }
}

/// OpenAI's `error.message` if the body has one, else the body's start.
fn error_message(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| {
            v.get("error")
                .and_then(|e| e.get("message"))
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(200).collect())
}

/// An error and its sources on one line (hyper's top-level messages are terse).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_url_forms() {
        for (url, expected) in [
            ("http://127.0.0.1:8000", "http://127.0.0.1:8000/v1/models"),
            ("http://127.0.0.1:8000/", "http://127.0.0.1:8000/v1/models"),
            (
                "http://127.0.0.1:8000/v1",
                "http://127.0.0.1:8000/v1/models",
            ),
            (
                "http://localhost:9/api/v1/",
                "http://localhost:9/api/v1/models",
            ),
        ] {
            let client = OpenAiClient::new(url, 1).unwrap();
            assert_eq!(client.uri("/v1/models").unwrap().to_string(), expected);
        }
        for url in [
            "https://127.0.0.1:8000",
            "127.0.0.1:8000",
            "http://",
            "not a url",
        ] {
            assert!(OpenAiClient::new(url, 1).is_err(), "{url} accepted");
        }
    }

    #[test]
    fn error_messages_prefer_openai_shape() {
        assert_eq!(
            error_message(br#"{"error":{"message":"bad temperature","type":"x"}}"#),
            "bad temperature"
        );
        assert_eq!(error_message(b"plain failure"), "plain failure");
    }
}
