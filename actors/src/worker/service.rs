//! The worker as a supervised, location-transparent service on the request plane.
//!
//! The frontend's pipeline reaches every worker through an `Addr<WorkerService>`: a local
//! worker directly, a worker in another process (`turbine worker`) over ZeroMQ. Generation
//! is a stream of [`TokenOutput`]s; dropping the caller's stream sends Cancel down the wire,
//! which drops the worker-side [`TokenStream`] and so aborts the request and frees its KV.

use super::worker_loop::WorkerHandle;
use crate::disagg::kv_transfer::KvExport;
use crate::disagg::wire::ImportOutcome;
use crate::ids::TokenId;
use crate::protocol::{PreprocessedRequest, TokenOutput};
use crate::worker::SchedulerStats;
use async_trait::async_trait;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tracing::Instrument;
use turbine_runtime::{Handler, HandlerError, RequestCtx, Service, StreamSink};

/// Service name a worker registers under on its node.
pub fn worker_service_name(worker: crate::ids::WorkerId) -> String {
    format!("worker/{}", worker.0)
}

/// The worker's protocol.
pub struct WorkerService;

impl Service for WorkerService {
    type Req = WorkerRequest;
    type Resp = WorkerReply;
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum WorkerRequest {
    /// Stream: run a request; one `Token` item per step, the last with a finish reason.
    Generate(Box<PreprocessedRequest>),
    /// Call: queue depths and KV usage now.
    Stats,
    /// Stream (a prefill worker): run the prompt only; one `Token` item with the first
    /// token, then (unless that token ended the request) one `Kv` item with the descriptor
    /// of the prompt's KV, pinned on this worker's transfer plane.
    Prefill(Box<PreprocessedRequest>),
    /// Stream (a decode worker): decode a request whose first token was sampled on a
    /// prefill worker, pulling its KV from `kv` (`None`: recompute it here). One `Import`
    /// item first, then `Token` items from the second token on.
    DecodeRemote {
        req: Box<PreprocessedRequest>,
        first_token: TokenId,
        kv: Option<KvExport>,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum WorkerReply {
    Token(TokenOutput),
    Stats(SchedulerStats),
    /// A prefill worker's KV descriptor, or why it has none.
    Kv(Result<KvExport, String>),
    /// What a decode worker did with the remote KV.
    Import(ImportOutcome),
}

/// Serves [`WorkerService`] for one worker engine loop.
pub struct WorkerActor {
    handle: WorkerHandle,
}

impl WorkerActor {
    pub fn new(handle: WorkerHandle) -> Self {
        WorkerActor { handle }
    }
}

#[async_trait]
impl Handler<WorkerService> for WorkerActor {
    async fn call(
        &mut self,
        req: WorkerRequest,
        _ctx: &RequestCtx,
    ) -> Result<WorkerReply, HandlerError> {
        match req {
            WorkerRequest::Stats => Ok(WorkerReply::Stats(self.handle.stats())),
            _ => Err(HandlerError::new(
                "generation is a stream request: open it with stream()",
            )),
        }
    }

    async fn stream(
        &mut self,
        req: WorkerRequest,
        sink: StreamSink<WorkerReply>,
        _ctx: &RequestCtx,
    ) -> Result<(), HandlerError> {
        let (mut tokens, first) = match req {
            WorkerRequest::Generate(req) => (
                self.handle
                    .generate(*req)
                    .await
                    .map_err(HandlerError::new)?,
                None,
            ),
            WorkerRequest::Prefill(req) => {
                let (tokens, export) =
                    self.handle.prefill(*req).await.map_err(HandlerError::new)?;
                tokio::spawn(forward_prefill(tokens, export, sink).in_current_span());
                return Ok(());
            }
            WorkerRequest::DecodeRemote {
                req,
                first_token,
                kv,
            } => {
                let (tokens, outcome) = self
                    .handle
                    .decode_remote(*req, first_token, kv)
                    .await
                    .map_err(HandlerError::new)?;
                (tokens, Some(outcome))
            }
            WorkerRequest::Stats => return Err(HandlerError::new("Stats is a call")),
        };
        // Forward on a task of its own so this actor keeps admitting other requests (in the
        // request's span: its log lines are the request's).
        let forward = async move {
            if let Some(outcome) = first {
                // The import's outcome comes first; the loop decodes only after it.
                let report = tokio::select! {
                    biased;
                    o = outcome => o,
                    _ = sink.cancelled() => return,
                };
                if let Ok(report) = report {
                    if sink.send(WorkerReply::Import(report)).await.is_err() {
                        return;
                    }
                }
            }
            loop {
                tokio::select! {
                    biased;
                    item = tokens.next() => match item {
                        Some(out) => {
                            if sink.send(WorkerReply::Token(out)).await.is_err() {
                                break; // the caller went away: dropping `tokens` aborts
                            }
                        }
                        None => break,
                    },
                    _ = sink.cancelled() => break,
                }
            }
        };
        tokio::spawn(forward.in_current_span());
        Ok(())
    }
}

/// A prefill's stream: the first token, then the descriptor (both as soon as they exist).
/// Dropping `tokens` at the end aborts nothing: the request is already released.
async fn forward_prefill(
    mut tokens: crate::worker::TokenStream,
    export: tokio::sync::oneshot::Receiver<crate::worker::remote::ExportReply>,
    sink: StreamSink<WorkerReply>,
) {
    let first = tokio::select! {
        biased;
        t = tokens.next() => t,
        _ = sink.cancelled() => return,
    };
    let Some(first) = first else { return };
    let ends = first.finish.is_some();
    if sink.send(WorkerReply::Token(first)).await.is_err() || ends {
        return;
    }
    let answer = tokio::select! {
        biased;
        a = export => a,
        _ = sink.cancelled() => return,
    };
    if let Ok(answer) = answer {
        let _ = sink.send(WorkerReply::Kv(answer)).await;
    }
}
