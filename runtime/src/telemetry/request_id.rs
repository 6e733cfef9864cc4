//! Which outside request a span works for, so a request id can travel with the request.
//!
//! A span that has a `request_id` field (the frontend's `request` span, a callee's `serve`
//! span) names its request; every span opened inside it inherits the id. The
//! [`RequestIdLayer`] keeps that id in each span's extensions, so [`of_span`] can read it
//! back when a call leaves the process ([`super::TraceContext::current`]), however deep
//! inside the request the call is made. Log lines get the id from the span field itself
//! (the formatter prints the spans a line happened in).

use std::fmt;
use std::sync::Arc;

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::Subscriber;
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

/// The span field that names a request.
pub const REQUEST_ID_FIELD: &str = "request_id";

/// The request a span works for.
#[derive(Clone)]
struct RequestId(Arc<str>);

/// Records each span's request id (its own `request_id` field, else its parent's).
#[derive(Debug, Default, Clone, Copy)]
pub struct RequestIdLayer;

struct FindRequestId(Option<String>);

impl Visit for FindRequestId {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == REQUEST_ID_FIELD {
            self.0 = Some(value.to_string());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == REQUEST_ID_FIELD {
            // `%id` arrives as Display wrapped in Debug: this prints it without quotes.
            self.0 = Some(format!("{value:?}"));
        }
    }
}

impl<S> Layer<S> for RequestIdLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut own = FindRequestId(None);
        attrs.record(&mut own);
        let found = match own.0 {
            Some(v) => Some(RequestId(Arc::from(v))),
            None => span
                .parent()
                .and_then(|p| p.extensions().get::<RequestId>().cloned()),
        };
        if let Some(found) = found {
            span.extensions_mut().insert(found);
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let mut own = FindRequestId(None);
        values.record(&mut own);
        if let (Some(v), Some(span)) = (own.0, ctx.span(id)) {
            span.extensions_mut().replace(RequestId(Arc::from(v)));
        }
    }
}

/// The request id `span` works for, when the installed subscriber has a
/// [`RequestIdLayer`] over a `tracing_subscriber` registry.
pub fn of_span(span: &tracing::Span) -> Option<String> {
    span.with_subscriber(|(id, dispatch)| {
        let registry = dispatch.downcast_ref::<tracing_subscriber::Registry>()?;
        let span = registry.span(id)?;
        let ext = span.extensions();
        ext.get::<RequestId>().map(|r| r.0.to_string())
    })
    .flatten()
}

/// The request id of the current span (see [`of_span`]).
pub fn current() -> Option<String> {
    of_span(&tracing::Span::current())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn children_inherit_the_request_id_of_their_request() {
        let subscriber = tracing_subscriber::registry().with(RequestIdLayer);
        tracing::subscriber::with_default(subscriber, || {
            assert_eq!(current(), None);
            let request = tracing::info_span!("request", request_id = %"abc-1");
            let _in = request.enter();
            assert_eq!(current().as_deref(), Some("abc-1"));
            let child = tracing::info_span!("route");
            assert_eq!(of_span(&child).as_deref(), Some("abc-1"));
            let other = tracing::info_span!(parent: None, "background");
            assert_eq!(of_span(&other), None);
            let late =
                tracing::info_span!(parent: None, "serve", request_id = tracing::field::Empty);
            late.record("request_id", "xyz");
            assert_eq!(of_span(&late).as_deref(), Some("xyz"));
        });
    }
}
