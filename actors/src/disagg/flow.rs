//! The frontend's side of a disaggregated request: one router call picks the decode worker
//! and decides where the prefill runs ([`super::route`]); a remote prefill runs on the
//! chosen prefill worker (first token + KV descriptor back), and the decode worker is then
//! asked to pull that KV and decode from the second token on. Every failure on the way ends
//! in a local prefill on the decode worker, counted by reason: the client sees only latency.
//!
//! | what failed | where it is noticed | what happens |
//! | --- | --- | --- |
//! | prefill worker unreachable, refused, died before its first token | here | plain request on the decode worker |
//! | no answer within `remote_prefill_timeout_ms` | here | the prefill is dropped (cancelled there), plain request on the decode worker |
//! | died after the first token, before the descriptor | here | decode worker recomputes the prompt, keeps the first token |
//! | descriptor bad, expired, owner gone mid-pull | decode worker's import | it recomputes the prompt, keeps the first token |
//! | decode worker has no slot or blocks for the import now | decode worker | it unpins the descriptor and queues a recompute |

use std::time::Duration;

use futures::StreamExt;

use super::kv_transfer::KvExport;
use super::metrics::DisaggMetrics;
use super::route::DisaggRoute;
use super::wire::{FallbackReason, ImportOutcome};
use crate::ids::WorkerId;
use crate::protocol::{PreprocessedRequest, TokenOutput};
use crate::router::dispatch::{DispatchError, Dispatched, Dispatcher, RouteGuard};
use crate::router::policy::{RouteError, RouteRequest};
use crate::router::service::{RouterReply, RouterRequest, RouterService};
use crate::worker::service::{WorkerReply, WorkerRequest};
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
        } => metrics.transferred(*blocks, *bytes, *seconds),
        ImportOutcome::Fallback { reason } => metrics.fallback(reason),
    }
}

/// Routes `pre` (hashed as `route`) and opens its stream, prefilling remotely when the
/// router's plan says so.
pub async fn dispatch(
    dispatcher: &Dispatcher,
    settings: &DisaggSettings,
    router: Addr<RouterService>,
    route: RouteRequest,
    pre: PreprocessedRequest,
) -> Result<Dispatched, DispatchError> {
    let plan: DisaggRoute = match router.call(RouterRequest::RouteDisagg(route)).await {
        Ok(RouterReply::RoutedDisagg(Ok(plan))) => plan,
        Ok(RouterReply::RoutedDisagg(Err(RouteError::NoWorkers))) => {
            return Err(DispatchError::NoWorker("no worker is available".into()))
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
    let prefilled = match plan.prefill.worker.map(|d| d.worker) {
        None => None,
        Some(prefill) => {
            let remote = tokio::time::timeout(
                settings.prefill_timeout,
                remote_prefill(dispatcher, &router, prefill, pre.clone()),
            )
            .await
            .unwrap_or(Err(FallbackReason::PrefillTimeout));
            router.cast(RouterRequest::PrefillDone(id));
            match remote {
                Ok(p) => Some((prefill, p)),
                Err(reason) => {
                    metrics.fallback(reason.label());
                    tracing::info!(request = %id, worker = %prefill, "remote prefill failed ({}); prefilling on {decode}", reason.label());
                    None
                }
            }
        }
    };
    let Some((prefill, prefilled)) = prefilled else {
        // Local prefill: decided so, or the remote one failed before its first token.
        let request = WorkerRequest::Generate(Box::new(pre));
        return dispatcher.open(guard, id, decode, request, None).await;
    };
    match prefilled {
        Prefilled::Finished { first, stream } => {
            // The first token ended the request: nothing to decode.
            Ok(dispatcher.dispatched(guard, id, prefill, stream, Some(first)))
        }
        Prefilled::First { first, kv } => {
            let Some(&first_token) = first.token_ids.first() else {
                return Err(DispatchError::Internal(
                    "the prefill worker sent no first token".into(),
                ));
            };
            if kv.is_none() {
                metrics.fallback(FallbackReason::NoDescriptor.label());
            }
            let request = WorkerRequest::DecodeRemote {
                req: Box::new(pre),
                first_token,
                kv,
            };
            dispatcher
                .open(guard, id, decode, request, Some(first))
                .await
        }
    }
}

/// What a prefill worker answered.
enum Prefilled {
    /// The first token, and the KV descriptor (`None`: the worker went away or could not
    /// export; the decode worker recomputes).
    First {
        first: TokenOutput,
        kv: Option<KvExport>,
    },
    /// The first token ended the request.
    Finished {
        first: TokenOutput,
        stream: ReplyStream<WorkerReply>,
    },
}

/// Runs `pre`'s prompt on prefill worker `worker`. An error before the first token is a
/// fallback to a full local prefill.
async fn remote_prefill(
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
    let first = match stream.next().await {
        Some(Ok(WorkerReply::Token(first))) if first.finish.is_none() => first,
        Some(Ok(WorkerReply::Token(first)))
            if matches!(first.finish, Some(crate::protocol::FinishReason::Error(_))) =>
        {
            return Err(FallbackReason::PrefillFailed)
        }
        Some(Ok(WorkerReply::Token(first))) => return Ok(Prefilled::Finished { first, stream }),
        Some(Err(e)) => return Err(gone(&e)),
        _ => return Err(FallbackReason::PrefillFailed),
    };
    let kv = match stream.next().await {
        Some(Ok(WorkerReply::Kv(Ok(kv)))) => Some(kv),
        Some(Ok(WorkerReply::Kv(Err(e)))) => {
            tracing::warn!(%worker, "prefill worker could not export KV: {e}");
            None
        }
        Some(Err(e)) => {
            gone(&e);
            None
        }
        _ => None,
    };
    Ok(Prefilled::First { first, kv })
}
