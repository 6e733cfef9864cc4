//! The trace context a request carries across processes: the W3C `traceparent` /
//! `tracestate` of the caller's span and the id of the outside request it serves.
//!
//! A caller's [`crate::Addr`] captures it from the current `tracing` span
//! ([`TraceContext::current`]) into the request's [`crate::wire::Envelope`]; the callee's
//! node opens a `serve` span from it ([`serve_span`]) and runs the handler inside. So one
//! request is one trace across every process it touches (when OpenTelemetry export is on,
//! see [`super::otlp`]), and every log line it causes, in any process, names its request id
//! (see [`super::request_id`]). Both halves work without an exporter: the request id travels
//! anyway, and the `traceparent` is empty when this process traces nothing.

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use serde::{Deserialize, Serialize};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// What travels in an envelope so the callee's spans and logs belong to the caller's
/// request. Every field has a default, so a peer that sends less (or an older one that sends
/// no context at all) is understood.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceContext {
    /// W3C `traceparent` of the caller's span (`00-<trace id>-<span id>-<flags>`); empty when
    /// the caller exports no traces.
    #[serde(default)]
    pub traceparent: String,
    /// W3C `tracestate` that came with it (vendor entries), possibly empty.
    #[serde(default)]
    pub tracestate: String,
    /// The id of the outside request (an HTTP request's `x-request-id`) this exchange serves.
    #[serde(default)]
    pub request_id: Option<String>,
}

impl TraceContext {
    /// The context of the current `tracing` span, or `None` when it belongs to no traced
    /// span and no request (background work: load reports, heartbeats).
    pub fn current() -> Option<TraceContext> {
        let span = tracing::Span::current();
        if span.is_none() {
            return None;
        }
        let request_id = super::request_id::of_span(&span);
        let cx = span.context();
        let sc = cx.span().span_context().clone();
        let (traceparent, tracestate) = if sc.is_valid() {
            (format_traceparent(&sc), sc.trace_state().header())
        } else {
            (String::new(), String::new())
        };
        if traceparent.is_empty() && request_id.is_none() {
            return None;
        }
        Some(TraceContext {
            traceparent,
            tracestate,
            request_id,
        })
    }

    /// The caller's span as an OpenTelemetry parent, when `traceparent` is a valid one.
    pub fn parent(&self) -> Option<opentelemetry::Context> {
        let sc = parse_traceparent(&self.traceparent, &self.tracestate)?;
        Some(opentelemetry::Context::new().with_remote_span_context(sc))
    }
}

/// Makes `span`'s OpenTelemetry parent the remote span of `traceparent` (a W3C header value)
/// and `tracestate`. Returns false, leaving `span` a root (or a child of its `tracing`
/// parent), when the header is absent or malformed, or when no exporter is installed.
/// Call it right after creating `span`, before it is entered.
pub fn set_remote_parent(span: &tracing::Span, traceparent: &str, tracestate: &str) -> bool {
    match parse_traceparent(traceparent, tracestate) {
        Some(sc) => span
            .set_parent(opentelemetry::Context::new().with_remote_span_context(sc))
            .is_ok(),
        None => false,
    }
}

/// The span a callee serves one request from a remote caller in: named after the service,
/// a child of the caller's span (across the wire), carrying the caller's request id.
pub(crate) fn serve_span(service: &str, from: &str, ctx: &TraceContext) -> tracing::Span {
    let span = tracing::info_span!(
        "serve",
        otel.name = %service,
        otel.kind = "server",
        service = %service,
        from = %from,
        request_id = ctx.request_id.as_deref(),
    );
    if let Some(parent) = ctx.parent() {
        // Fails only when no exporter is installed: then there is no trace to join.
        let _ = span.set_parent(parent);
    }
    span
}

/// The span a local handler serves a request of the current span in (`Span::none()`
/// outside any span: background work makes no traces).
pub(crate) fn local_serve_span(service: &str) -> tracing::Span {
    if tracing::Span::current().is_none() {
        return tracing::Span::none();
    }
    tracing::info_span!("serve", otel.name = %service, service = %service, from = "local")
}

/// `00-<trace id>-<span id>-<flags>` of `sc`.
pub fn format_traceparent(sc: &SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    )
}

/// A W3C `traceparent` (and its `tracestate`) as a remote span context; `None` when it is
/// malformed, of version `ff`, or names the all-zero trace or span id. A later version's
/// extra fields are ignored, as the W3C spec asks.
pub fn parse_traceparent(traceparent: &str, tracestate: &str) -> Option<SpanContext> {
    let mut parts = traceparent.trim().split('-');
    let version = parts.next()?;
    let (trace_id, span_id, flags) = (parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !hex(version, 2) || version == "ff" || (version == "00" && parts.next().is_some()) {
        return None;
    }
    if !hex(trace_id, 32) || !hex(span_id, 16) || !hex(flags, 2) {
        return None;
    }
    // Upper-case hex is invalid per the spec.
    if [trace_id, span_id, flags, version]
        .iter()
        .any(|s| s.bytes().any(|b| b.is_ascii_uppercase()))
    {
        return None;
    }
    let trace_id = TraceId::from_hex(trace_id).ok()?;
    let span_id = SpanId::from_hex(span_id).ok()?;
    if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let state = tracestate.parse::<TraceState>().unwrap_or_default();
    Some(SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags & TraceFlags::SAMPLED.to_u8()),
        true,
        state,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_traceparent_round_trips() {
        let sc = parse_traceparent(PARENT, "vendor=x").unwrap();
        assert!(sc.is_remote() && sc.is_sampled());
        assert_eq!(
            sc.trace_id(),
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap()
        );
        assert_eq!(sc.trace_state().header(), "vendor=x");
        assert_eq!(format_traceparent(&sc), PARENT);
        let unsampled = parse_traceparent(&PARENT.replace("-01", "-00"), "").unwrap();
        assert!(!unsampled.is_sampled());
    }

    #[test]
    fn malformed_traceparents_are_refused() {
        for bad in [
            "",
            "00",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad, "").is_none(), "{bad:?}");
        }
        // A later version may append fields.
        assert!(parse_traceparent(&format!("01{}-later", &PARENT[2..]), "").is_some());
    }

    #[test]
    fn outside_any_span_there_is_no_context() {
        assert_eq!(TraceContext::current(), None);
        assert!(TraceContext::default().parent().is_none());
    }
}
