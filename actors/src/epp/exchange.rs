//! One `Process` stream's conversation with the proxy, as a state machine: a message in,
//! at most one answer out. It knows the ext_proc protocol and the Endpoint Picker Protocol
//! of the Gateway API Inference Extension (GAIE); what to pick is asked of a [`Pick`].
//!
//! The proxy (Envoy, with the request body `BUFFERED`) sends the request headers, then the
//! body. The picker answers the headers with `CONTINUE` and decides on the whole body: the
//! body answer sets `x-gateway-destination-endpoint` and turbine's routing hints, strips
//! hint headers a client sent itself, clears the route cache, and puts the endpoint in the
//! `envoy.lb` dynamic metadata. A request without a body is decided on its headers. A
//! subset of endpoints (`envoy.lb.subset_hint` / `x-gateway-destination-endpoint-subset`
//! in the metadata context) restricts the choice; an empty subset, or no eligible endpoint,
//! is a 503 `ImmediateResponse`. A body that is not a valid request is answered with the
//! frontend's OpenAI-style error, as an `ImmediateResponse`: the client sees the same error
//! it would have got from the frontend, and the stream (and the server) carries on.

use super::proto::{
    processing_request::Request, processing_response::Response, BodyResponse, CommonResponse,
    HeaderMutation, HeaderValue, HeaderValueOption, HeadersResponse, HttpStatus, ImmediateResponse,
    Kind, Metadata, ProcessingRequest, ProcessingResponse, Struct, TrailersResponse, Value,
    OVERWRITE_IF_EXISTS_OR_ADD,
};
use crate::frontend::ApiError;
use crate::router::hints::{RoutingHints, HINT_HEADERS};
use axum::http::StatusCode;

/// The header (and `envoy.lb` metadata key) naming the picked endpoint.
pub const DESTINATION_ENDPOINT: &str = "x-gateway-destination-endpoint";
/// The metadata namespace of the proxy's subset hint.
pub const SUBSET_NAMESPACE: &str = "envoy.lb.subset_hint";
/// The key of the subset hint in that namespace.
pub const SUBSET_KEY: &str = "x-gateway-destination-endpoint-subset";
/// The dynamic-metadata namespace the picked endpoint is published in.
pub const LB_NAMESPACE: &str = "envoy.lb";
/// The largest request body the picker buffers; a longer one is refused with 413.
pub const MAX_BODY_BYTES: usize = 32 << 20;

/// What a picker decided for one request.
#[derive(Clone, Debug, PartialEq)]
pub struct Picked {
    /// `ip:port` the proxy sends the request to.
    pub endpoint: String,
    pub hints: RoutingHints,
}

/// The request as the picker sees it.
pub struct PickInput<'a> {
    /// The `:path` pseudo-header (query string included, if any).
    pub path: &'a str,
    /// The whole body; `None` for a request without one.
    pub body: Option<&'a [u8]>,
    /// The proxy's subset of endpoints, if it sent one.
    pub subset: Option<&'a [String]>,
}

/// Decides where a request goes.
pub trait Pick: Send + Sync {
    fn pick(&self, input: &PickInput<'_>) -> Result<Picked, ApiError>;
}

/// One stream's state.
#[derive(Debug, Default)]
pub struct Exchange {
    path: String,
    subset: Option<Vec<String>>,
    body: Vec<u8>,
    /// Answered for the request phase (routed or refused): later request messages are
    /// answered `CONTINUE` without a second decision.
    decided: bool,
}

/// Which answer a decision travels in.
#[derive(Clone, Copy)]
enum Phase {
    Headers,
    Body,
}

impl Exchange {
    /// Handles one message; `None` when the proxy expects no answer (observability mode).
    /// A message with nothing in it is a protocol error that ends the stream.
    pub fn on_message(
        &mut self,
        msg: ProcessingRequest,
        picker: &dyn Pick,
    ) -> Result<Option<ProcessingResponse>, tonic::Status> {
        let observing = msg.observability_mode;
        if let Some(meta) = &msg.metadata_context {
            if self.subset.is_none() {
                match subset_of(meta) {
                    Ok(s) => self.subset = s,
                    Err(e) => {
                        self.decided = true;
                        return Ok((!observing).then(|| immediate(&e)));
                    }
                }
            }
        }
        let Some(request) = msg.request else {
            return Err(tonic::Status::invalid_argument(
                "a ProcessingRequest must carry headers, a body or trailers",
            ));
        };
        let answer = match request {
            Request::RequestHeaders(h) => {
                if let Some(map) = &h.headers {
                    if let Some(p) = map.headers.iter().find(|v| v.key == ":path") {
                        self.path = p.text();
                    }
                }
                if h.end_of_stream && !self.decided {
                    self.decide(picker, None, Phase::Headers)
                } else {
                    Response::RequestHeaders(HeadersResponse::default()).into()
                }
            }
            Request::RequestBody(b) => {
                if self.decided {
                    Response::RequestBody(BodyResponse::default()).into()
                } else if self.body.len() + b.body.len() > MAX_BODY_BYTES {
                    self.decided = true;
                    immediate(
                        &ApiError::invalid(
                            None,
                            format!("the request body exceeds {MAX_BODY_BYTES} bytes"),
                        )
                        .with_status(StatusCode::PAYLOAD_TOO_LARGE),
                    )
                } else {
                    self.body.extend_from_slice(&b.body);
                    if b.end_of_stream {
                        let body = std::mem::take(&mut self.body);
                        self.decide(picker, Some(&body), Phase::Body)
                    } else {
                        Response::RequestBody(BodyResponse::default()).into()
                    }
                }
            }
            Request::RequestTrailers(_) => {
                Response::RequestTrailers(TrailersResponse::default()).into()
            }
            Request::ResponseHeaders(_) => {
                Response::ResponseHeaders(HeadersResponse::default()).into()
            }
            Request::ResponseBody(_) => Response::ResponseBody(BodyResponse::default()).into(),
            Request::ResponseTrailers(_) => {
                Response::ResponseTrailers(TrailersResponse::default()).into()
            }
        };
        Ok((!observing).then_some(answer))
    }

    fn decide(
        &mut self,
        picker: &dyn Pick,
        body: Option<&[u8]>,
        phase: Phase,
    ) -> ProcessingResponse {
        self.decided = true;
        let input = PickInput {
            path: &self.path,
            body,
            subset: self.subset.as_deref(),
        };
        match picker.pick(&input) {
            Ok(picked) => routed(phase, &picked),
            Err(e) => immediate(&e),
        }
    }
}

impl From<Response> for ProcessingResponse {
    fn from(r: Response) -> ProcessingResponse {
        ProcessingResponse {
            response: Some(r),
            dynamic_metadata: None,
        }
    }
}

/// The proxy's subset hint: `None` when absent; an error when it is not a list of strings.
fn subset_of(meta: &Metadata) -> Result<Option<Vec<String>>, ApiError> {
    let Some(value) = meta
        .filter_metadata
        .get(SUBSET_NAMESPACE)
        .and_then(|ns| ns.fields.get(SUBSET_KEY))
    else {
        return Ok(None);
    };
    let bad = || {
        ApiError::server(
            StatusCode::BAD_GATEWAY,
            format!("the proxy's {SUBSET_KEY} must be a list of ip:port strings"),
        )
    };
    let Some(Kind::ListValue(list)) = &value.kind else {
        return Err(bad());
    };
    list.values
        .iter()
        .map(|v| match &v.kind {
            Some(Kind::StringValue(s)) => Ok(s.clone()),
            _ => Err(bad()),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn header(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_string(),
            value: String::new(),
            raw_value: value.as_bytes().to_vec(),
        }),
        append_action: OVERWRITE_IF_EXISTS_OR_ADD,
        keep_empty_value: false,
    }
}

/// The answer that sends the request to `picked`.
fn routed(phase: Phase, picked: &Picked) -> ProcessingResponse {
    let hints = picked.hints.headers();
    let mut set_headers = vec![header(DESTINATION_ENDPOINT, &picked.endpoint)];
    set_headers.extend(hints.iter().map(|(k, v)| header(k, v)));
    // A hint the picker does not set must not come through from the client either.
    let remove_headers = HINT_HEADERS
        .iter()
        .filter(|h| !hints.iter().any(|(k, _)| k == *h))
        .map(|h| h.to_string())
        .collect();
    let common = CommonResponse {
        status: 0,
        header_mutation: Some(HeaderMutation {
            set_headers,
            remove_headers,
        }),
        clear_route_cache: true,
    };
    let response = match phase {
        Phase::Headers => Response::RequestHeaders(HeadersResponse {
            response: Some(common),
        }),
        Phase::Body => Response::RequestBody(BodyResponse {
            response: Some(common),
        }),
    };
    let lb = Struct {
        fields: [(
            DESTINATION_ENDPOINT.to_string(),
            Value::string(&picked.endpoint),
        )]
        .into(),
    };
    ProcessingResponse {
        response: Some(response),
        dynamic_metadata: Some(Struct {
            fields: [(LB_NAMESPACE.to_string(), Value::object(lb))].into(),
        }),
    }
}

/// The answer that replies to the client at once with `err` (OpenAI's error JSON).
pub fn immediate(err: &ApiError) -> ProcessingResponse {
    let body = serde_json::to_vec(&err.body()).unwrap_or_default();
    let mut set_headers = vec![header("content-type", "application/json")];
    if let Some(secs) = err.retry_after {
        set_headers.push(header("retry-after", &secs.to_string()));
    }
    Response::ImmediateResponse(ImmediateResponse {
        status: Some(HttpStatus {
            code: i32::from(err.status.as_u16()),
        }),
        headers: Some(HeaderMutation {
            set_headers,
            remove_headers: Vec::new(),
        }),
        body,
        details: format!("turbine_epp: {}", err.message),
    })
    .into()
}

#[cfg(test)]
mod tests {
    use super::super::proto::{HeaderMap, HttpBody, HttpHeaders, ListValue};
    use super::*;
    use crate::ids::WorkerId;
    use std::sync::Mutex;

    /// What a picker was asked: path, body, subset.
    type Asked = (String, Option<Vec<u8>>, Option<Vec<String>>);

    /// Picks `a:1` unless the subset excludes it; records what it was asked.
    #[derive(Default)]
    struct Fixed {
        seen: Mutex<Vec<Asked>>,
    }

    impl Pick for Fixed {
        fn pick(&self, input: &PickInput<'_>) -> Result<Picked, ApiError> {
            self.seen.lock().unwrap().push((
                input.path.to_string(),
                input.body.map(<[u8]>::to_vec),
                input.subset.map(<[String]>::to_vec),
            ));
            if input.subset.is_some_and(|s| !s.iter().any(|e| e == "a:1")) {
                return Err(ApiError::server(StatusCode::SERVICE_UNAVAILABLE, "none"));
            }
            Ok(Picked {
                endpoint: "a:1".into(),
                hints: RoutingHints {
                    worker: Some(WorkerId(4)),
                    ..RoutingHints::default()
                },
            })
        }
    }

    fn headers(path: &str, end: bool, subset: Option<Vec<&str>>) -> ProcessingRequest {
        let metadata_context = subset.map(|s| Metadata {
            filter_metadata: [(
                SUBSET_NAMESPACE.to_string(),
                Struct {
                    fields: [(
                        SUBSET_KEY.to_string(),
                        Value {
                            kind: Some(Kind::ListValue(ListValue {
                                values: s.into_iter().map(Value::string).collect(),
                            })),
                        },
                    )]
                    .into(),
                },
            )]
            .into(),
        });
        ProcessingRequest {
            request: Some(Request::RequestHeaders(HttpHeaders {
                headers: Some(HeaderMap {
                    headers: vec![HeaderValue {
                        key: ":path".into(),
                        value: String::new(),
                        raw_value: path.as_bytes().to_vec(),
                    }],
                }),
                end_of_stream: end,
            })),
            metadata_context,
            observability_mode: false,
        }
    }

    fn body(bytes: &[u8], end: bool) -> ProcessingRequest {
        ProcessingRequest {
            request: Some(Request::RequestBody(HttpBody {
                body: bytes.to_vec(),
                end_of_stream: end,
            })),
            metadata_context: None,
            observability_mode: false,
        }
    }

    fn set_headers(r: &ProcessingResponse) -> Vec<(String, String)> {
        let common = match &r.response {
            Some(Response::RequestBody(b)) => b.response.clone(),
            Some(Response::RequestHeaders(h)) => h.response.clone(),
            other => panic!("not a routing answer: {other:?}"),
        };
        common
            .and_then(|c| c.header_mutation)
            .map(|m| m.set_headers)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|o| o.header)
            .map(|h| (h.key.clone(), h.text()))
            .collect()
    }

    #[test]
    fn headers_continue_then_the_whole_body_is_decided_once() {
        let p = Fixed::default();
        let mut x = Exchange::default();
        let h = x
            .on_message(headers("/v1/completions", false, None), &p)
            .unwrap();
        assert_eq!(
            h,
            Some(Response::RequestHeaders(HeadersResponse::default()).into())
        );
        let c1 = x.on_message(body(b"{\"pro", false), &p).unwrap();
        assert_eq!(
            c1,
            Some(Response::RequestBody(BodyResponse::default()).into())
        );
        let last = x.on_message(body(b"mpt\":1}", true), &p).unwrap().unwrap();
        assert_eq!(
            set_headers(&last),
            [
                (DESTINATION_ENDPOINT.to_string(), "a:1".to_string()),
                ("x-turbine-worker".to_string(), "4".to_string())
            ]
        );
        let lb = &last.dynamic_metadata.as_ref().unwrap().fields[LB_NAMESPACE];
        let Some(Kind::StructValue(lb)) = &lb.kind else {
            panic!("envoy.lb is a struct")
        };
        assert_eq!(lb.fields[DESTINATION_ENDPOINT], Value::string("a:1"));
        let seen = p.seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].0, "/v1/completions");
        assert_eq!(seen[0].1.as_deref(), Some(&b"{\"prompt\":1}"[..]));
    }

    #[test]
    fn a_subset_restricts_and_an_empty_one_is_a_503() {
        let p = Fixed::default();
        let mut x = Exchange::default();
        x.on_message(headers("/v1/completions", false, Some(vec!["b:2"])), &p)
            .unwrap();
        let r = x.on_message(body(b"{}", true), &p).unwrap().unwrap();
        let Some(Response::ImmediateResponse(i)) = &r.response else {
            panic!("{r:?}")
        };
        assert_eq!(i.status.as_ref().unwrap().code, 503);
        assert_eq!(
            p.seen.lock().unwrap()[0].2.as_deref(),
            Some(&["b:2".to_string()][..])
        );

        let mut y = Exchange::default();
        let r = y
            .on_message(headers("/v1/models", true, Some(vec!["a:1"])), &p)
            .unwrap()
            .unwrap();
        assert_eq!(
            set_headers(&r)[0].1,
            "a:1",
            "a body-less request is decided on its headers"
        );
    }

    #[test]
    fn an_empty_message_ends_the_stream_and_observability_mode_is_not_answered() {
        let p = Fixed::default();
        let mut x = Exchange::default();
        assert!(x.on_message(ProcessingRequest::default(), &p).is_err());
        let mut m = headers("/v1/completions", false, None);
        m.observability_mode = true;
        assert_eq!(x.on_message(m, &p).unwrap(), None);
    }
}
