//! The frontend's side of a disaggregated request: one router call picks the decode worker
//! and decides where the prefill runs ([`super::route`]); a remote prefill runs on the
//! chosen prefill worker, whose first token goes to the client **as soon as it arrives**
//! (the returned [`Dispatched`] hands it out first); the rest of the flow (waiting for the
//! KV descriptor, asking the decode worker to pull that KV and decode from the second
//! token on) runs on a task of its own while the client already has its first token.
//! Every failure on the way ends in a local prefill on the decode worker, counted by
//! reason: the client sees only latency.
//!
//! | what failed | where it is noticed | what happens |
//! | --- | --- | --- |
//! | prefill worker unreachable, refused, died before its first token | here | plain request on the decode worker |
//! | no first token within `remote_prefill_timeout_ms` | here | the prefill is dropped (cancelled there), plain request on the decode worker |
//! | died after the first token, before the descriptor (or no descriptor within the same timeout) | here | decode worker recomputes the prompt, keeps the first token |
//! | descriptor bad, expired, owner gone mid-pull | decode worker's import | it recomputes the prompt, keeps the first token |
//! | decode worker has no slot or blocks for the import now | decode worker | it unpins the descriptor and queues a recompute |
//! | decode worker unreachable after the first token | the stream's next read | the migration shell continues the request elsewhere |

use std::time::Duration;

use futures::StreamExt;
use tracing::Instrument;

use super::kv_transfer::KvExport;
use super::metrics::DisaggMetrics;
use super::route::DisaggRoute;
use super::wire::{FallbackReason, ImportOutcome};
use crate::ids::{RequestId, WorkerId};
use crate::protocol::{PreprocessedRequest, TokenOutput};
use crate::router::dispatch::{DispatchError, Dispatched, Dispatcher, RouteGuard};
use crate::router::policy::{RouteError, RouteRequest};
use crate::router::service::{RouterReply, RouterRequest, RouterService};
use crate::worker::service::{WorkerReply, WorkerRequest, WorkerService};
use turbine_runtime::clock::timeout;
use turbine_runtime::{Addr, CallError, ReplyStream};

/// What the dispatcher needs to run the flow.
#[derive(Clone, Debug)]
pub struct DisaggSettings {
    pub metrics: DisaggMetrics,
    /// `disaggregation.remote_prefill_timeout_ms`.
    pub prefill_timeout: Duration,
}

/// Counts a decode worker's import report.
pub fn count_import(metrics: &DisaggMetrics, outcome: &ImportOutcome) {
    match outcome {
        ImportOutcome::Imported {
            blocks,
            bytes,
            seconds,
            path,
        } => {
            metrics.transferred(*blocks, *bytes, *seconds);
            let (device, reason) = path
                .as_ref()
                .map_or((false, None), |p| (p.device_copy, p.host_reason.as_deref()));
            metrics.transfer_path(device, reason);
        }
        ImportOutcome::Fallback { reason } => metrics.fallback(reason),
    }
}

/// Tells the router the remote prefill of a request is over (its prefill-pool queue count
/// goes down), however it ends: descriptor in, failure, or the client gone.
struct PrefillDoneGuard {
    router: Addr<RouterService>,
    id: RequestId,
}

impl Drop for PrefillDoneGuard {
    fn drop(&mut self) {
        self.router.cast(RouterRequest::PrefillDone(self.id));
    }
}

/// Routes `pre` (hashed as `route`) and opens its stream, prefilling remotely when the
/// router's plan says so. With a remote prefill this returns once the prefill worker's
/// first token is in (the stream's first item), before its KV descriptor.
pub async fn dispatch(
    dispatcher: &Dispatcher,
    settings: &DisaggSettings,
    router: Addr<RouterService>,
    route: RouteRequest,
    pre: PreprocessedRequest,
) -> Result<Dispatched, DispatchError> {
    let span = tracing::info_span!("route", request = %pre.id, disaggregated = true);
    let asked = router
        .call(RouterRequest::RouteDisagg(route))
        .instrument(span)
        .await;
    let plan: DisaggRoute = match asked {
        Ok(RouterReply::RoutedDisagg(Ok(plan))) => plan,
        Ok(RouterReply::RoutedDisagg(Err(RouteError::NoWorkers))) => {
            return Err(DispatchError::NoWorker("no worker is available".into()))
        }
        // Disaggregated requests are not held (see docs/CONFIG.md, `busy_threshold`).
        Ok(RouterReply::RoutedDisagg(Err(RouteError::AllBusy { .. }))) => {
            return Err(DispatchError::NoWorker(
                "every decode worker is busy".into(),
            ))
        }
        Ok(_) => {
            return Err(DispatchError::Internal(
                "the router answered a route request with something else".into(),
            ))
        }
        Err(e) => return Err(DispatchError::Router(e.to_string())),
    };
    run_plan(dispatcher, settings, router, plan, pre).await
}

/// Carries out `plan` for `pre`: the remote prefill (if planned), then the decode worker's
/// stream; every failure of the remote part ends in a counted local prefill. The plan is
/// the router's, or a gateway's routing hints ([`crate::router::hints`]).
pub(crate) async fn run_plan(
    dispatcher: &Dispatcher,
    settings: &DisaggSettings,
    router: Addr<RouterService>,
    plan: DisaggRoute,
    pre: PreprocessedRequest,
) -> Result<Dispatched, DispatchError> {
    let id = pre.id;
    let metrics = &settings.metrics;
    metrics.decision(plan.prefill.decision.label());
    metrics.prefill_queue(plan.prefill.pool.queued);
    dispatcher.count_route(&plan.decode);
    let guard = RouteGuard::new(router.clone(), id);
    let decode = plan.decode.worker;
    let remote = match plan.prefill.worker.map(|d| d.worker) {
        None => None,
        Some(prefill) => {
            let done = PrefillDoneGuard {
                router: router.clone(),
                id,
            };
            // On the dispatcher's clock: the simulator's virtual one in the simulator.
            let clock = dispatcher.clock().clone();
            let deadline = clock.now() + settings.prefill_timeout;
            let first = timeout(
                clock.as_ref(),
                settings.prefill_timeout,
                first_token(dispatcher, &router, prefill, pre.clone()),
            )
            .await
            .unwrap_or(Err(FallbackReason::PrefillTimeout));
            match first {
                Ok(p) => Some((prefill, p, done, deadline)),
                Err(reason) => {
                    metrics.fallback(reason.label());
                    tracing::info!(request = %id, worker = %prefill, "remote prefill failed ({}); prefilling on {decode}", reason.label());
                    None
                }
            }
        }
    };
    let Some((prefill, prefilled, done, deadline)) = remote else {
        // Local prefill: decided so, or the remote one failed before its first token.
        let request = WorkerRequest::Generate(Box::new(pre));
        return dispatcher.open(guard, id, decode, request, None).await;
    };
    match prefilled {
        Prefilled::Finished { first, stream } => {
            // The first token ended the request: nothing to decode.
            drop(done);
            Ok(dispatcher.dispatched(guard, id, prefill, stream, Some(first)))
        }
        Prefilled::First { first, stream } => {
            let Some(&first_token) = first.token_ids.first() else {
                return Err(DispatchError::Internal(
                    "the prefill worker sent no first token".into(),
                ));
            };
            let Some(addr) = dispatcher.worker_addr(decode) else {
                router.cast(RouterRequest::Unreachable(decode));
                return Err(DispatchError::Unreachable {
                    worker: decode,
                    reason: "it has just left".into(),
                });
            };
            // The client gets `first` now; the descriptor and the decode worker's stream
            // follow on a task of their own.
            let router = router.clone();
            let clock = dispatcher.clock().clone();
            let rest = async move {
                let left = deadline.saturating_duration_since(clock.now());
                // No descriptor (counted once, by the decode worker's report): it recomputes.
                let kv = timeout(clock.as_ref(), left, descriptor(&router, prefill, stream))
                    .await
                    .unwrap_or_else(|_| {
                        tracing::info!(request = %id, worker = %prefill, "no KV descriptor within the remote prefill timeout");
                        None
                    });
                drop(done);
                let request = WorkerRequest::DecodeRemote {
                    req: Box::new(pre),
                    first_token,
                    kv,
                };
                open_decode(addr, request).await
            };
            Ok(dispatcher.opening(guard, id, decode, first, rest))
        }
    }
}

/// Opens the decode worker's stream.
async fn open_decode(
    addr: Addr<WorkerService>,
    request: WorkerRequest,
) -> Result<ReplyStream<WorkerReply>, CallError> {
    addr.stream(request).await
}

/// What a prefill worker answered first.
enum Prefilled {
    /// The first token; its KV descriptor comes next on `stream`.
    First {
        first: TokenOutput,
        stream: ReplyStream<WorkerReply>,
    },
    /// The first token ended the request.
    Finished {
        first: TokenOutput,
        stream: ReplyStream<WorkerReply>,
    },
}

/// Runs `pre`'s prompt on prefill worker `worker` up to its first token. An error before
/// the first token is a fallback to a full local prefill.
async fn first_token(
    dispatcher: &Dispatcher,
    router: &Addr<RouterService>,
    worker: WorkerId,
    pre: PreprocessedRequest,
) -> Result<Prefilled, FallbackReason> {
    let Some(addr) = dispatcher.worker_addr(worker) else {
        return Err(FallbackReason::PrefillFailed);
    };
    let gone = |e: &CallError| {
        if matches!(e, CallError::PeerGone(_) | CallError::Transport(_)) {
            router.cast(RouterRequest::Unreachable(worker));
        }
        FallbackReason::PrefillFailed
    };
    let mut stream = addr
        .stream(WorkerRequest::Prefill(Box::new(pre)))
        .await
        .map_err(|e| gone(&e))?;
    match stream.next().await {
        Some(Ok(WorkerReply::Token(first))) if first.finish.is_none() => {
            Ok(Prefilled::First { first, stream })
        }
        Some(Ok(WorkerReply::Token(first)))
            if matches!(first.finish, Some(crate::protocol::FinishReason::Error(_))) =>
        {
            Err(FallbackReason::PrefillFailed)
        }
        Some(Ok(WorkerReply::Token(first))) => Ok(Prefilled::Finished { first, stream }),
        Some(Err(e)) => Err(gone(&e)),
        _ => Err(FallbackReason::PrefillFailed),
    }
}

/// The prefill worker's KV descriptor, the item after its first token (`None`: it went
/// away or could not export; the decode worker recomputes). Dropping `stream` after it
/// cancels nothing: the prefill request is over.
async fn descriptor(
    router: &Addr<RouterService>,
    worker: WorkerId,
    mut stream: ReplyStream<WorkerReply>,
) -> Option<KvExport> {
    match stream.next().await {
        Some(Ok(WorkerReply::Kv(Ok(kv)))) => Some(kv),
        Some(Ok(WorkerReply::Kv(Err(e)))) => {
            tracing::warn!(%worker, "prefill worker could not export KV: {e}");
            None
        }
        Some(Err(e)) => {
            if matches!(e, CallError::PeerGone(_) | CallError::Transport(_)) {
                router.cast(RouterRequest::Unreachable(worker));
            }
            tracing::info!(%worker, "prefill worker lost before its KV descriptor: {e}");
            None
        }
        _ => None,
    }
}
