//! The worker as a supervised, location-transparent service on the request plane.
//!
//! The frontend's pipeline reaches every worker through an `Addr<WorkerService>`: a local
//! worker directly, a worker in another process (`turbine worker`) over ZeroMQ. Generation
//! is a stream of [`TokenOutput`]s; dropping the caller's stream sends Cancel down the wire,
//! which drops the worker-side [`TokenStream`] and so aborts the request and frees its KV.

use super::worker_loop::WorkerHandle;
use crate::protocol::{PreprocessedRequest, TokenOutput};
use crate::worker::SchedulerStats;
use async_trait::async_trait;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
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
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum WorkerReply {
    Token(TokenOutput),
    Stats(SchedulerStats),
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
            WorkerRequest::Generate(_) => Err(HandlerError::new(
                "Generate is a stream request: open it with stream()",
            )),
        }
    }

    async fn stream(
        &mut self,
        req: WorkerRequest,
        sink: StreamSink<WorkerReply>,
        _ctx: &RequestCtx,
    ) -> Result<(), HandlerError> {
        let WorkerRequest::Generate(req) = req else {
            return Err(HandlerError::new("only Generate streams"));
        };
        let mut tokens = self
            .handle
            .generate(*req)
            .await
            .map_err(HandlerError::new)?;
        // Forward on a task of its own so this actor keeps admitting other requests.
        tokio::spawn(async move {
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
        });
        Ok(())
    }
}
