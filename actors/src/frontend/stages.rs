//! The HTTP side of custom stages: a validated request as the [`StageRequest`] stages see,
//! their rewrite applied back, and their refusals as OpenAI errors.

use super::error::ApiError;
use super::validate::Validated;
use crate::protocol::Prompt;
use crate::stages::{RequestMeta, StageError, StageRequest};
use axum::http::{header, HeaderMap, StatusCode};

/// The bearer token of the `Authorization` header.
pub fn api_key(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty())
        .then(|| token.trim().to_string())
}

/// What the stages see of `req`.
pub fn stage_request(req: &Validated, meta: RequestMeta) -> StageRequest {
    StageRequest {
        meta,
        prompts: req.prompts.clone(),
        max_tokens: req.request.max_tokens,
        stop: req.request.stop.clone(),
    }
}

/// Applies the stages' rewrite to `req`. A rewrite that cannot be served (prompts added or
/// removed, an image message's text changed) is the cluster's fault: a 500 saying so.
pub fn apply(req: &mut Validated, staged: StageRequest) -> Result<(), ApiError> {
    let broken = |why: String| {
        ApiError::server(StatusCode::INTERNAL_SERVER_ERROR, why).with_code("stage_failed")
    };
    if staged.prompts.len() != req.prompts.len() {
        return Err(broken(format!(
            "the stages turned {} prompt(s) into {}; a stage may rewrite prompts but not add or remove them",
            req.prompts.len(),
            staged.prompts.len()
        )));
    }
    let mut prompts = staged.prompts;
    for (new, old) in prompts.iter_mut().zip(&req.prompts) {
        // Image parts do not cross to a stage; put them back where the text is unchanged.
        if let (Prompt::Chat(new), Prompt::Chat(old)) = (new, old) {
            for (i, old_msg) in old.iter().enumerate().filter(|(_, m)| !m.parts.is_empty()) {
                match new.get_mut(i) {
                    Some(m) if m.content == old_msg.content && m.role == old_msg.role => {
                        m.parts = old_msg.parts.clone();
                    }
                    _ => {
                        return Err(broken(format!(
                            "a stage rewrote message {i}, which holds images; stages cannot rewrite image messages"
                        )))
                    }
                }
            }
        }
    }
    if staged.stop.len() > 4 {
        return Err(broken(format!(
            "the stages set {} stop strings; at most 4 are allowed",
            staged.stop.len()
        )));
    }
    req.request.prompt = prompts[0].clone();
    req.prompts = prompts;
    req.request.max_tokens = staged.max_tokens;
    req.request.stop = staged.stop;
    Ok(())
}

/// A stage's refusal as the client's error; the OpenAI `type` follows from the status.
pub fn api_error(e: StageError) -> ApiError {
    let status = StatusCode::from_u16(e.status)
        .ok()
        .filter(|s| s.is_client_error() || s.is_server_error())
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let kind = match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        s if s >= 500 => "server_error",
        _ => "invalid_request_error",
    };
    ApiError {
        status,
        message: e.message,
        kind,
        param: e.param,
        code: e.code,
        retry_after: e.retry_after_secs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn bearer_keys_only() {
        let mut h = HeaderMap::new();
        assert_eq!(api_key(&h), None);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer sk-1"),
        );
        assert_eq!(api_key(&h).as_deref(), Some("sk-1"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(api_key(&h), None);
    }

    #[test]
    fn refusals_keep_their_status_and_get_openai_types() {
        let e = api_error(StageError::invalid_api_key("no"));
        assert_eq!((e.status.as_u16(), e.kind), (401, "authentication_error"));
        assert_eq!(e.code.as_deref(), Some("invalid_api_key"));
        let e = api_error(StageError::rate_limited("slow down", 3));
        assert_eq!((e.status.as_u16(), e.retry_after), (429, Some(3)));
        let e = api_error(StageError::new(200, "not an error status"));
        assert_eq!(e.status.as_u16(), 500);
    }
}
