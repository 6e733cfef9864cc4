//! The worker actor's engine loop: the pure [`Scheduler`] driven against an [`Executor`].
//!
//! One task per worker owns the scheduler. Requests and cancellations arrive as commands;
//! between steps the loop takes every queued command, plans a step, hands it to the executor
//! thread and, while the step runs, keeps queueing commands. Outputs go to one channel per
//! request; when a client's channel is gone the request is aborted and its KV blocks freed.

use super::executor::{ExecSeq, Executor, SampleSpec};
use crate::ids::{RequestId, WorkerId};
use crate::kv::{KvEvent, KvEventBatch};
use crate::protocol::{FinishReason, PreprocessedRequest, TokenOutput};
use crate::worker::{AdmitError, Scheduler, SchedulerStats};
use futures::Stream;
use std::collections::BTreeMap;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot, watch};

/// Where a worker's KV events go (the event plane, or straight into a local indexer).
pub type KvEventSink = Box<dyn Fn(KvEventBatch) + Send + Sync>;

/// Why a request could not be started on a worker.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Admit(#[from] AdmitError),
    #[error("worker {0} has stopped")]
    Stopped(WorkerId),
}

enum Command {
    Generate {
        req: Box<PreprocessedRequest>,
        out: mpsc::UnboundedSender<TokenOutput>,
        admitted: oneshot::Sender<Result<(), AdmitError>>,
    },
    Abort(RequestId),
}

/// A handle to a running worker. Cheap to clone.
#[derive(Clone)]
pub struct WorkerHandle {
    id: WorkerId,
    cmds: mpsc::UnboundedSender<Command>,
    stats: watch::Receiver<SchedulerStats>,
}

impl WorkerHandle {
    /// Starts the engine loop for `scheduler` on the current tokio runtime.
    pub fn spawn(
        id: WorkerId,
        scheduler: Scheduler,
        executor: Executor,
        kv_events: KvEventSink,
    ) -> WorkerHandle {
        let (cmds, rx) = mpsc::unbounded_channel();
        let (stats_tx, stats) = watch::channel(scheduler.stats());
        let engine = EngineLoop {
            id,
            scheduler,
            executor,
            kv_events,
            sinks: BTreeMap::new(),
            stats: stats_tx,
            started: Instant::now(),
            event_seq: 0,
        };
        tokio::spawn(engine.run(rx));
        WorkerHandle { id, cmds, stats }
    }

    pub fn id(&self) -> WorkerId {
        self.id
    }

    /// Queue depths and KV usage as of the last step.
    pub fn stats(&self) -> SchedulerStats {
        self.stats.borrow().clone()
    }

    /// A receiver that changes after every step (for load reporting).
    pub fn watch_stats(&self) -> watch::Receiver<SchedulerStats> {
        self.stats.clone()
    }

    /// Admits `req` and returns its token stream. Dropping the stream before it finishes
    /// cancels the request.
    pub async fn generate(&self, req: PreprocessedRequest) -> Result<TokenStream, WorkerError> {
        let id = req.id;
        let (out, rx) = mpsc::unbounded_channel();
        let (admitted, admitted_rx) = oneshot::channel();
        self.cmds
            .send(Command::Generate {
                req: Box::new(req),
                out,
                admitted,
            })
            .map_err(|_| WorkerError::Stopped(self.id))?;
        admitted_rx
            .await
            .map_err(|_| WorkerError::Stopped(self.id))??;
        Ok(TokenStream {
            id,
            rx,
            cmds: self.cmds.clone(),
            finished: false,
        })
    }
}

/// The outputs of one request. Ends after the output that carries a finish reason.
pub struct TokenStream {
    id: RequestId,
    rx: mpsc::UnboundedReceiver<TokenOutput>,
    cmds: mpsc::UnboundedSender<Command>,
    finished: bool,
}

impl Stream for TokenStream {
    type Item = TokenOutput;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<TokenOutput>> {
        if self.finished {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(out)) => {
                if out.finish.is_some() {
                    self.finished = true;
                }
                Poll::Ready(Some(out))
            }
            Poll::Ready(None) => {
                // The worker dropped the request without a finish (it stopped).
                self.finished = true;
                Poll::Ready(Some(TokenOutput {
                    token_ids: Vec::new(),
                    logprobs: None,
                    finish: Some(FinishReason::Error("the worker stopped".into())),
                    cached_tokens: None,
                }))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for TokenStream {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.cmds.send(Command::Abort(self.id));
        }
    }
}

struct EngineLoop {
    id: WorkerId,
    scheduler: Scheduler,
    executor: Executor,
    kv_events: KvEventSink,
    sinks: BTreeMap<RequestId, mpsc::UnboundedSender<TokenOutput>>,
    stats: watch::Sender<SchedulerStats>,
    started: Instant,
    event_seq: u64,
}

impl EngineLoop {
    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    async fn run(mut self, mut cmds: mpsc::UnboundedReceiver<Command>) {
        loop {
            while let Ok(cmd) = cmds.try_recv() {
                self.handle(cmd);
            }
            let plan = match self.scheduler.schedule(self.now()) {
                Ok(plan) => plan,
                Err(e) => {
                    tracing::error!(worker = %self.id, "scheduler refused to plan: {e}");
                    break;
                }
            };
            if plan.is_empty() {
                // Nothing runnable: sleep until a command arrives.
                self.publish();
                match cmds.recv().await {
                    Some(cmd) => self.handle(cmd),
                    None => break,
                }
                continue;
            }
            let batch = self.exec_batch(&plan.seqs);
            let outputs = match self.executor.step(batch).await {
                Ok(sampled) => self.scheduler.on_step_done(&plan, &sampled, self.now()),
                Err(e) => {
                    tracing::warn!(worker = %self.id, "step failed: {e}");
                    self.scheduler.on_step_failed(&plan, &e.to_string())
                }
            };
            match outputs {
                Ok(outputs) => self.deliver(outputs),
                Err(e) => {
                    tracing::error!(worker = %self.id, "step bookkeeping failed: {e}");
                    break;
                }
            }
            self.publish();
        }
        // Shutting down: every open request ends with an error rather than hanging.
        for (_, sink) in std::mem::take(&mut self.sinks) {
            let _ = sink.send(TokenOutput {
                token_ids: Vec::new(),
                logprobs: None,
                finish: Some(FinishReason::Error("the worker stopped".into())),
                cached_tokens: None,
            });
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Generate { req, out, admitted } => {
                let id = req.id;
                match self.scheduler.add_request(*req, self.now()) {
                    Ok(()) => {
                        self.sinks.insert(id, out);
                        let _ = admitted.send(Ok(()));
                    }
                    Err(e) => {
                        let _ = admitted.send(Err(e));
                    }
                }
            }
            Command::Abort(id) => {
                self.sinks.remove(&id);
                self.scheduler.abort(id);
            }
        }
    }

    fn exec_batch(&self, seqs: &[crate::worker::ScheduledSeq]) -> Vec<ExecSeq> {
        seqs.iter()
            .map(|seq| {
                let sample = seq.want_logits.then(|| {
                    self.scheduler.sampling_context(seq.request).map(|ctx| {
                        let penalised = ctx.params.repetition_penalty != 1.0;
                        SampleSpec {
                            params: ctx.params.clone(),
                            seed: ctx.params.seed.unwrap_or(seq.request.0),
                            sample_index: seq.sample_index,
                            history: if penalised {
                                ctx.tokens.to_vec()
                            } else {
                                Vec::new()
                            },
                            logprobs: ctx.logprobs,
                        }
                    })
                });
                ExecSeq {
                    seq: seq.clone(),
                    sample: sample.flatten(),
                }
            })
            .collect()
    }

    fn deliver(&mut self, outputs: Vec<(RequestId, TokenOutput)>) {
        for (id, out) in outputs {
            let done = out.finish.is_some();
            let delivered = self.sinks.get(&id).is_some_and(|s| s.send(out).is_ok());
            if done {
                self.sinks.remove(&id);
            } else if !delivered {
                // The client went away: free its blocks now.
                self.sinks.remove(&id);
                self.scheduler.abort(id);
            }
        }
    }

    fn publish(&mut self) {
        let events: Vec<KvEvent> = self.scheduler.drain_kv_events();
        if !events.is_empty() {
            let ts = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            (self.kv_events)(KvEventBatch {
                worker: self.id,
                seq: self.event_seq,
                ts,
                events,
            });
            self.event_seq += 1;
        }
        self.stats.send_replace(self.scheduler.stats());
    }
}
