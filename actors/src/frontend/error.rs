//! Errors in OpenAI's JSON shape: `{"error": {"message", "type", "param", "code"}}`.
//!
//! WHY one type: every failure (bad JSON, bad field, engine refusal, body too large) must
//! reach the client with the same shape so OpenAI SDKs can surface the message.

use super::admission::RETRY_AFTER_SECS;
use super::engine::EngineError;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

/// An error response: status plus OpenAI's error body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`, e.g. `invalid_request_error`.
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<String>,
    /// Seconds for the `Retry-After` header of a refusal the client should retry (429, 503).
    pub retry_after: Option<u32>,
}

/// The JSON body of an error.
#[derive(Clone, Debug, Serialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// The inner object of [`ErrorBody`].
#[derive(Clone, Debug, Serialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

impl ApiError {
    /// 400 `invalid_request_error`, naming the offending field when known.
    pub fn invalid(param: Option<&str>, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
            retry_after: None,
        }
    }

    /// A 400 about one field.
    pub fn field(param: &str, message: impl Into<String>) -> Self {
        ApiError::invalid(Some(param), message)
    }

    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    pub fn with_code(mut self, code: &str) -> Self {
        self.code = Some(code.to_string());
        self
    }

    /// 404 `model_not_found`.
    pub fn model_not_found(model: &str) -> Self {
        ApiError::field("model", format!("The model `{model}` does not exist."))
            .with_status(StatusCode::NOT_FOUND)
            .with_code("model_not_found")
    }

    /// 404 for a path that no route serves.
    pub fn route_not_found(path: &str) -> Self {
        ApiError::invalid(None, format!("Unknown request URL: {path}"))
            .with_status(StatusCode::NOT_FOUND)
            .with_code("unknown_url")
    }

    /// A server-side failure (5xx) with OpenAI's `server_error` type.
    pub fn server(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// 429: the frontend is at capacity; retry after [`RETRY_AFTER_SECS`].
    pub fn rate_limited(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: message.into(),
            kind: "rate_limit_error",
            param: None,
            code: Some("rate_limit_exceeded".to_string()),
            retry_after: Some(RETRY_AFTER_SECS),
        }
    }

    /// Maps an engine error; `prompt_param` names the field holding the prompt
    /// (`messages` or `prompt`) for context-length errors.
    pub fn from_engine(err: EngineError, prompt_param: &str) -> Self {
        let message = err.to_string();
        match err {
            EngineError::InvalidRequest(_) => ApiError::invalid(None, message),
            EngineError::ContextLengthExceeded { .. } => {
                ApiError::field(prompt_param, message).with_code("context_length_exceeded")
            }
            EngineError::Overloaded(_) => {
                let mut err = ApiError::server(StatusCode::SERVICE_UNAVAILABLE, message)
                    .with_code("overloaded");
                err.retry_after = Some(RETRY_AFTER_SECS);
                err
            }
            EngineError::DeadlineExceeded { .. } => {
                ApiError::server(StatusCode::GATEWAY_TIMEOUT, message).with_code("request_timeout")
            }
            EngineError::Internal(_) => {
                ApiError::server(StatusCode::INTERNAL_SERVER_ERROR, message)
            }
        }
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                message: self.message.clone(),
                kind: self.kind.to_string(),
                param: self.param.clone(),
                code: self.code.clone(),
            },
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}
