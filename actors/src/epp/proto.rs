//! The subset of Envoy's external-processing protocol (`envoy.service.ext_proc.v3`) the
//! endpoint picker speaks, as prost messages written by hand (no `protoc` at build time).
//!
//! WHY by hand: only a dozen messages are needed, and a build-time proto compiler would add
//! a tool (or a large build dependency) to every build. The field numbers and types are
//! those of the published protos (`envoy/service/ext_proc/v3/external_processor.proto`,
//! `envoy/config/core/v3/base.proto`, `envoy/type/v3/http_status.proto`,
//! `google/protobuf/struct.proto`); fields the picker never reads are left out, and prost
//! skips them on decode, as protobuf requires. A unit test below pins the wire bytes of a
//! few messages so a renumbered field cannot slip in.
//!
//! [`ExternalProcessorServer`] is the tonic service (`Process`, a bidirectional stream)
//! around any [`ExternalProcessor`]; [`PROCESS_PATH`] is its gRPC path, which a client
//! (Envoy, or the tests' tonic client) calls.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use futures::stream::BoxStream;
use tonic::codegen::{http, BoxFuture, Context, Poll, Service, StdError};
use tonic::server::NamedService;

// ---------------------------------------------------------------------------------------
// google.protobuf
// ---------------------------------------------------------------------------------------

/// `google.protobuf.Struct`: a JSON object.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Struct {
    #[prost(map = "string, message", tag = "1")]
    pub fields: HashMap<String, Value>,
}

/// `google.protobuf.Value`: a JSON value.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Value {
    #[prost(oneof = "Kind", tags = "1, 2, 3, 4, 5, 6")]
    pub kind: Option<Kind>,
}

/// `google.protobuf.Value.kind`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Kind {
    /// `NullValue` (an enum whose one value is 0).
    #[prost(int32, tag = "1")]
    NullValue(i32),
    #[prost(double, tag = "2")]
    NumberValue(f64),
    #[prost(string, tag = "3")]
    StringValue(String),
    #[prost(bool, tag = "4")]
    BoolValue(bool),
    #[prost(message, tag = "5")]
    StructValue(Struct),
    #[prost(message, tag = "6")]
    ListValue(ListValue),
}

/// `google.protobuf.ListValue`: a JSON array.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ListValue {
    #[prost(message, repeated, tag = "1")]
    pub values: Vec<Value>,
}

impl Value {
    pub fn string(s: impl Into<String>) -> Value {
        Value {
            kind: Some(Kind::StringValue(s.into())),
        }
    }

    pub fn list(values: Vec<Value>) -> Value {
        Value {
            kind: Some(Kind::ListValue(ListValue { values })),
        }
    }

    pub fn object(s: Struct) -> Value {
        Value {
            kind: Some(Kind::StructValue(s)),
        }
    }
}

// ---------------------------------------------------------------------------------------
// envoy.config.core.v3 / envoy.type.v3
// ---------------------------------------------------------------------------------------

/// `envoy.config.core.v3.HeaderValue`. Envoy sends values in `raw_value`; `value` is the
/// older text field.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HeaderValue {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
    #[prost(bytes = "vec", tag = "3")]
    pub raw_value: Vec<u8>,
}

impl HeaderValue {
    /// The value, from `raw_value` when set (as Envoy sends it), else `value`.
    pub fn text(&self) -> String {
        if self.raw_value.is_empty() {
            self.value.clone()
        } else {
            String::from_utf8_lossy(&self.raw_value).into_owned()
        }
    }
}

/// `envoy.config.core.v3.HeaderMap`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HeaderMap {
    #[prost(message, repeated, tag = "1")]
    pub headers: Vec<HeaderValue>,
}

/// `envoy.config.core.v3.HeaderValueOption` (without the deprecated `append`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct HeaderValueOption {
    #[prost(message, optional, tag = "1")]
    pub header: Option<HeaderValue>,
    /// `HeaderAppendAction`.
    #[prost(int32, tag = "3")]
    pub append_action: i32,
    #[prost(bool, tag = "4")]
    pub keep_empty_value: bool,
}

/// `HeaderValueOption.HeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD`.
pub const OVERWRITE_IF_EXISTS_OR_ADD: i32 = 2;

/// `envoy.config.core.v3.Metadata` (its untyped part).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Metadata {
    #[prost(map = "string, message", tag = "1")]
    pub filter_metadata: HashMap<String, Struct>,
}

/// `envoy.type.v3.HttpStatus` (`code` is the `StatusCode` enum: the HTTP status number).
#[derive(Clone, PartialEq, prost::Message)]
pub struct HttpStatus {
    #[prost(int32, tag = "1")]
    pub code: i32,
}

// ---------------------------------------------------------------------------------------
// envoy.service.ext_proc.v3: what the proxy sends
// ---------------------------------------------------------------------------------------

/// `ProcessingRequest`: one message of the proxy's side of the stream.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ProcessingRequest {
    #[prost(oneof = "processing_request::Request", tags = "2, 3, 4, 5, 6, 7")]
    pub request: Option<processing_request::Request>,
    /// Dynamic metadata; the GAIE subset hint arrives here.
    #[prost(message, optional, tag = "8")]
    pub metadata_context: Option<Metadata>,
    /// True when the proxy ignores answers (the picker then answers nothing).
    #[prost(bool, tag = "10")]
    pub observability_mode: bool,
}

pub mod processing_request {
    /// `ProcessingRequest.request`.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Request {
        #[prost(message, tag = "2")]
        RequestHeaders(super::HttpHeaders),
        #[prost(message, tag = "3")]
        ResponseHeaders(super::HttpHeaders),
        #[prost(message, tag = "4")]
        RequestBody(super::HttpBody),
        #[prost(message, tag = "5")]
        ResponseBody(super::HttpBody),
        #[prost(message, tag = "6")]
        RequestTrailers(super::HttpTrailers),
        #[prost(message, tag = "7")]
        ResponseTrailers(super::HttpTrailers),
    }
}

/// `HttpHeaders`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HttpHeaders {
    #[prost(message, optional, tag = "1")]
    pub headers: Option<HeaderMap>,
    #[prost(bool, tag = "3")]
    pub end_of_stream: bool,
}

/// `HttpBody`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HttpBody {
    #[prost(bytes = "vec", tag = "1")]
    pub body: Vec<u8>,
    #[prost(bool, tag = "2")]
    pub end_of_stream: bool,
}

/// `HttpTrailers`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HttpTrailers {
    #[prost(message, optional, tag = "1")]
    pub trailers: Option<HeaderMap>,
}

// ---------------------------------------------------------------------------------------
// envoy.service.ext_proc.v3: what the picker answers
// ---------------------------------------------------------------------------------------

/// `ProcessingResponse`: one answer, to the message of the same kind.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ProcessingResponse {
    #[prost(oneof = "processing_response::Response", tags = "1, 2, 3, 4, 5, 6, 7")]
    pub response: Option<processing_response::Response>,
    /// Emitted as dynamic metadata; the picked endpoint goes under `envoy.lb`.
    #[prost(message, optional, tag = "8")]
    pub dynamic_metadata: Option<Struct>,
}

pub mod processing_response {
    /// `ProcessingResponse.response`.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Response {
        #[prost(message, tag = "1")]
        RequestHeaders(super::HeadersResponse),
        #[prost(message, tag = "2")]
        ResponseHeaders(super::HeadersResponse),
        #[prost(message, tag = "3")]
        RequestBody(super::BodyResponse),
        #[prost(message, tag = "4")]
        ResponseBody(super::BodyResponse),
        #[prost(message, tag = "5")]
        RequestTrailers(super::TrailersResponse),
        #[prost(message, tag = "6")]
        ResponseTrailers(super::TrailersResponse),
        #[prost(message, tag = "7")]
        ImmediateResponse(super::ImmediateResponse),
    }
}

/// `HeadersResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HeadersResponse {
    #[prost(message, optional, tag = "1")]
    pub response: Option<CommonResponse>,
}

/// `BodyResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct BodyResponse {
    #[prost(message, optional, tag = "1")]
    pub response: Option<CommonResponse>,
}

/// `TrailersResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TrailersResponse {
    #[prost(message, optional, tag = "1")]
    pub header_mutation: Option<HeaderMutation>,
}

/// `CommonResponse` (without the body and trailer mutations the picker never makes).
#[derive(Clone, PartialEq, prost::Message)]
pub struct CommonResponse {
    /// `ResponseStatus`: 0 `CONTINUE`.
    #[prost(int32, tag = "1")]
    pub status: i32,
    #[prost(message, optional, tag = "2")]
    pub header_mutation: Option<HeaderMutation>,
    #[prost(bool, tag = "5")]
    pub clear_route_cache: bool,
}

/// `HeaderMutation`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HeaderMutation {
    #[prost(message, repeated, tag = "1")]
    pub set_headers: Vec<HeaderValueOption>,
    #[prost(string, repeated, tag = "2")]
    pub remove_headers: Vec<String>,
}

/// `ImmediateResponse`: answer the client now, without an upstream.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ImmediateResponse {
    #[prost(message, optional, tag = "1")]
    pub status: Option<HttpStatus>,
    #[prost(message, optional, tag = "2")]
    pub headers: Option<HeaderMutation>,
    #[prost(bytes = "vec", tag = "3")]
    pub body: Vec<u8>,
    #[prost(string, tag = "5")]
    pub details: String,
}

// ---------------------------------------------------------------------------------------
// The gRPC service
// ---------------------------------------------------------------------------------------

/// The gRPC service name.
pub const SERVICE_NAME: &str = "envoy.service.ext_proc.v3.ExternalProcessor";
/// The gRPC path of `Process`.
pub const PROCESS_PATH: &str = "/envoy.service.ext_proc.v3.ExternalProcessor/Process";

/// The answers of one `Process` stream.
pub type ResponseStream = BoxStream<'static, Result<ProcessingResponse, tonic::Status>>;

/// What serves `Process`: one call per stream (one HTTP request through the proxy).
pub trait ExternalProcessor: Send + Sync + 'static {
    fn process(&self, requests: tonic::Streaming<ProcessingRequest>) -> ResponseStream;
}

/// The tonic service around an [`ExternalProcessor`].
pub struct ExternalProcessorServer<P> {
    inner: Arc<P>,
}

impl<P> Clone for ExternalProcessorServer<P> {
    fn clone(&self) -> Self {
        ExternalProcessorServer {
            inner: self.inner.clone(),
        }
    }
}

impl<P: ExternalProcessor> ExternalProcessorServer<P> {
    pub fn new(inner: Arc<P>) -> Self {
        ExternalProcessorServer { inner }
    }
}

impl<P> NamedService for ExternalProcessorServer<P> {
    const NAME: &'static str = SERVICE_NAME;
}

/// `Process` as tonic's streaming-call shape.
struct ProcessCall<P>(Arc<P>);

impl<P: ExternalProcessor> tonic::server::StreamingService<ProcessingRequest> for ProcessCall<P> {
    type Response = ProcessingResponse;
    type ResponseStream = ResponseStream;
    type Future = BoxFuture<tonic::Response<ResponseStream>, tonic::Status>;

    fn call(
        &mut self,
        request: tonic::Request<tonic::Streaming<ProcessingRequest>>,
    ) -> Self::Future {
        let answers = self.0.process(request.into_inner());
        Box::pin(async move { Ok(tonic::Response::new(answers)) })
    }
}

impl<P, B> Service<http::Request<B>> for ExternalProcessorServer<P>
where
    P: ExternalProcessor,
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != PROCESS_PATH {
            // gRPC's answer to an unknown method: status 12 (UNIMPLEMENTED) in the headers.
            return Box::pin(async move {
                Ok(tonic::Status::unimplemented("only Process is served").into_http())
            });
        }
        let call = ProcessCall(self.inner.clone());
        Box::pin(async move {
            let codec = tonic_prost::ProstCodec::<ProcessingResponse, ProcessingRequest>::default();
            let mut grpc = tonic::server::Grpc::new(codec);
            Ok(grpc.streaming(call, req).await)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// The wire bytes of the fields the picker depends on, written out from the protos'
    /// field numbers (tag = field << 3 | wire type), so a wrong number fails here.
    #[test]
    fn field_numbers_match_the_published_protos() {
        let req = ProcessingRequest {
            request: Some(processing_request::Request::RequestBody(HttpBody {
                body: b"x".to_vec(),
                end_of_stream: true,
            })),
            metadata_context: None,
            observability_mode: false,
        };
        // request_body = 4 (0x22), HttpBody{body = 1 (0x0a) "x", end_of_stream = 2 (0x10) 1}
        assert_eq!(req.encode_to_vec(), [0x22, 5, 0x0a, 1, b'x', 0x10, 1]);

        let h = ProcessingRequest {
            request: Some(processing_request::Request::RequestHeaders(HttpHeaders {
                headers: Some(HeaderMap {
                    headers: vec![HeaderValue {
                        key: "a".into(),
                        value: String::new(),
                        raw_value: b"b".to_vec(),
                    }],
                }),
                end_of_stream: false,
            })),
            metadata_context: None,
            observability_mode: false,
        };
        // request_headers = 2 (0x12), HttpHeaders{headers = 1 (0x0a), HeaderMap{headers = 1
        // (0x0a), HeaderValue{key = 1 (0x0a) "a", raw_value = 3 (0x1a) "b"}}}
        assert_eq!(
            h.encode_to_vec(),
            [0x12, 10, 0x0a, 8, 0x0a, 6, 0x0a, 1, b'a', 0x1a, 1, b'b']
        );

        let resp = ProcessingResponse {
            response: Some(processing_response::Response::ImmediateResponse(
                ImmediateResponse {
                    status: Some(HttpStatus { code: 503 }),
                    headers: None,
                    body: Vec::new(),
                    details: String::new(),
                },
            )),
            dynamic_metadata: None,
        };
        // immediate_response = 7 (0x3a), ImmediateResponse{status = 1 (0x0a),
        // HttpStatus{code = 1 (0x08) 503 as varint 0xf7 0x03}}
        assert_eq!(resp.encode_to_vec(), [0x3a, 5, 0x0a, 3, 0x08, 0xf7, 0x03]);

        let meta = ProcessingResponse {
            response: Some(processing_response::Response::RequestBody(BodyResponse {
                response: Some(CommonResponse {
                    status: 0,
                    header_mutation: None,
                    clear_route_cache: true,
                }),
            })),
            dynamic_metadata: None,
        };
        // request_body = 3 (0x1a), BodyResponse{response = 1 (0x0a), CommonResponse{
        // clear_route_cache = 5 (0x28) 1}}
        assert_eq!(meta.encode_to_vec(), [0x1a, 4, 0x0a, 2, 0x28, 1]);

        let v = Value::list(vec![Value::string("h")]);
        // list_value = 6 (0x32), ListValue{values = 1 (0x0a), Value{string_value = 3 (0x1a)}}
        assert_eq!(v.encode_to_vec(), [0x32, 5, 0x0a, 3, 0x1a, 1, b'h']);
    }
}
