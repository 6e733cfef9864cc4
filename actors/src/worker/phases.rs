//! The trace spans of the requests a worker loop holds: one span per phase of a request
//! (`kv_transfer` while its KV is pulled from a prefill worker, `queue` until its first
//! step, `prefill` while its prompt is computed, `decode` from its first decode step to its
//! end), each a child of the span the request arrived in (the worker's `serve` span, itself
//! a child of the frontend's `request` span, across processes through the envelope's trace
//! context). A phase's span is open exactly while the request is in it, so an exported trace
//! shows where a request's time went; the request's log lines in the loop are emitted inside
//! them and so name its request id.
//!
//! Bookkeeping only: the loop says what happened (admitted, stepped, imported, ended), this
//! module moves each request forward. Phases only move forward: a preempted request that
//! recomputes its prompt stays in `decode`. A request that arrived outside any span (the
//! simulator's clients, background work) gets no spans.

use crate::ids::RequestId;
use std::collections::BTreeMap;
use tracing::Span;

/// Where a request is, in the order requests go through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    KvTransfer,
    Queue,
    Prefill,
    Decode,
}

struct Open {
    /// The span the request arrived in (the parent of every phase).
    arrived: Span,
    phase: Phase,
    /// The current phase's span; dropping it closes the phase.
    span: Span,
}

fn phase_span(arrived: &Span, phase: Phase, id: RequestId) -> Span {
    match phase {
        Phase::KvTransfer => tracing::info_span!(parent: arrived, "kv_transfer", request = %id),
        Phase::Queue => tracing::info_span!(parent: arrived, "queue", request = %id),
        Phase::Prefill => tracing::info_span!(parent: arrived, "prefill", request = %id),
        Phase::Decode => tracing::info_span!(parent: arrived, "decode", request = %id),
    }
}

/// The phase spans of every request the loop holds.
#[derive(Default)]
pub(super) struct RequestPhases {
    open: BTreeMap<RequestId, Open>,
}

impl RequestPhases {
    fn enter(&mut self, id: RequestId, arrived: Span, phase: Phase) {
        if arrived.is_none() {
            return;
        }
        let span = phase_span(&arrived, phase, id);
        self.open.insert(
            id,
            Open {
                arrived,
                phase,
                span,
            },
        );
    }

    /// `id` was admitted into the queue; `arrived` is the span it came in.
    pub(super) fn queued(&mut self, id: RequestId, arrived: Span) {
        self.enter(id, arrived, Phase::Queue);
    }

    /// `id` was admitted and its KV is being pulled; the returned span is the transfer's
    /// (run the pull in it), `Span::none()` for a request without spans.
    pub(super) fn pulling(&mut self, id: RequestId, arrived: Span) -> Span {
        self.enter(id, arrived, Phase::KvTransfer);
        self.open
            .get(&id)
            .map_or_else(Span::none, |o| o.span.clone())
    }

    fn advance(&mut self, id: RequestId, to: Phase) {
        if let Some(open) = self.open.get_mut(&id) {
            if open.phase < to {
                open.phase = to;
                open.span = phase_span(&open.arrived, to, id);
            }
        }
    }

    /// `id`'s KV pull is over (imported, or it failed and the prompt is recomputed): it
    /// waits for its next step.
    pub(super) fn pulled(&mut self, id: RequestId) {
        self.advance(id, Phase::Queue);
    }

    /// `id` is in the step just planned: a decode step (`decode`), or a prompt chunk.
    pub(super) fn stepped(&mut self, id: RequestId, decode: bool) {
        self.advance(
            id,
            if decode {
                Phase::Decode
            } else {
                Phase::Prefill
            },
        );
    }

    /// The span of `id`'s current phase, for its log lines (`Span::none()` if it has none).
    /// Log inside it (`in_scope`), not with `parent:`: the JSON log format lists the spans
    /// a line was emitted in, not an explicit parent's.
    pub(super) fn span(&self, id: RequestId) -> Span {
        self.open
            .get(&id)
            .map_or_else(Span::none, |o| o.span.clone())
    }

    /// A span for exporting `id`'s KV after its prefill (a prefill worker), beside its
    /// phases; `Span::none()` for a request without spans.
    pub(super) fn exporting(&self, id: RequestId) -> Span {
        self.open.get(&id).map_or_else(
            Span::none,
            |o| tracing::info_span!(parent: &o.arrived, "kv_export", request = %id),
        )
    }

    /// `id` left the loop (finished, aborted, released): its last phase closes.
    pub(super) fn ended(&mut self, id: RequestId) {
        self.open.remove(&id);
    }

    /// Every request left the loop.
    pub(super) fn clear(&mut self) {
        self.open.clear();
    }

    #[cfg(test)]
    fn phase(&self, id: RequestId) -> Option<Phase> {
        self.open.get(&id).map(|o| o.phase)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::layer::{Context, SubscriberExt};
    use tracing_subscriber::Layer;

    /// A closed span's name and its parent's.
    type Named = (String, Option<String>);

    /// Records each span as it closes.
    #[derive(Clone, Default)]
    struct Closed(Arc<Mutex<Vec<Named>>>);

    impl<S> Layer<S> for Closed
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        fn on_close(&self, id: tracing::span::Id, ctx: Context<'_, S>) {
            if let Some(span) = ctx.span(&id) {
                let parent = span.parent().map(|p| p.name().to_string());
                self.0
                    .lock()
                    .unwrap()
                    .push((span.name().to_string(), parent));
            }
        }
    }

    #[test]
    fn a_request_goes_through_its_phases_once_each_in_order() {
        let closed = Closed::default();
        let subscriber = tracing_subscriber::registry().with(closed.clone());
        tracing::subscriber::with_default(subscriber, || {
            let mut phases = RequestPhases::default();
            let (a, b) = (RequestId(1), RequestId(2));
            phases.queued(a, tracing::info_span!("serve"));
            assert_eq!(phases.phase(a), Some(Phase::Queue));
            phases.stepped(a, false);
            phases.stepped(a, false); // a second prompt chunk stays in prefill
            phases.stepped(a, true);
            phases.stepped(a, false); // recomputing after preemption: still decode
            assert_eq!(phases.phase(a), Some(Phase::Decode));
            let transfer = phases.pulling(b, tracing::info_span!("serve"));
            assert!(!transfer.is_none());
            drop(transfer);
            phases.pulled(b);
            phases.stepped(b, true);
            phases.ended(a);
            phases.ended(b);
            // No span, no phases: nothing is recorded for it.
            phases.queued(RequestId(3), Span::none());
            assert_eq!(phases.phase(RequestId(3)), None);
        });
        let names: Vec<Named> = closed.0.lock().unwrap().clone();
        let serve = Some("serve".to_string());
        let expect = |n: &str| (n.to_string(), serve.clone());
        let phases: Vec<_> = names
            .iter()
            .filter(|(n, _)| n != "serve")
            .cloned()
            .collect();
        assert_eq!(
            phases,
            vec![
                expect("queue"),
                expect("prefill"),
                expect("kv_transfer"),
                expect("queue"),
                expect("decode"),
                expect("decode"),
            ]
        );
    }
}
