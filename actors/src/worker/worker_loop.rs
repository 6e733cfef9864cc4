//! The worker actor's engine loop: the pure [`Scheduler`] driven against an [`Executor`].
//!
//! One task per worker owns the scheduler. Requests and cancellations arrive as commands;
//! between steps the loop takes every queued command, plans a step, hands it to the executor
//! thread and, while the step runs, keeps queueing commands. Outputs go to one channel per
//! request; when a client's channel is gone the request is aborted and its KV blocks freed.

use crate::executor::{ExecSeq, Executor, SampleSpec};
use crate::ids::{RequestId, WorkerId};
use crate::kv::{KvEvent, KvEventBatch};
use crate::protocol::{FinishReason, PreprocessedRequest, TokenOutput};
use crate::worker::{AdmitError, Scheduler, SchedulerStats};
use futures::Stream;
use std::collections::BTreeMap;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use turbine_runtime::{SharedClock, TokioClock};

/// Where a worker's KV events go (the event plane, or straight into a local indexer).
pub type KvEventSink = Box<dyn Fn(KvEventBatch) + Send + Sync>;

/// Why a request could not be started on a worker.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Admit(#[from] AdmitError),
    #[error("worker {0} has stopped")]
    Stopped(WorkerId),
    #[error(transparent)]
    Images(#[from] crate::encoder::EncodeError),
}

pub(super) enum Command {
    Generate {
        req: Box<PreprocessedRequest>,
        out: mpsc::UnboundedSender<TokenOutput>,
        admitted: oneshot::Sender<Result<(), AdmitError>>,
        /// The span the request arrived in (its phases' parent).
        span: tracing::Span,
    },
    Abort(RequestId),
    Inspect(Box<dyn FnOnce(&Scheduler) + Send>),
    /// Disaggregated serving (see [`crate::worker::remote`]).
    Remote(super::remote::RemoteCommand),
    /// The image embeddings of a request the scheduler parked for them (or why none).
    Embedded {
        id: RequestId,
        serial: u64,
        result: Result<std::sync::Arc<crate::encoder::PromptEmbeds>, crate::encoder::EncodeError>,
    },
    /// Take no new requests (each is released at once); let the open ones run.
    Drain,
    /// Release every request (they end with `FinishReason::Migrate`) and every later one.
    Release,
}

/// The end of a request its worker gave up: the frontend continues it elsewhere.
fn released() -> TokenOutput {
    TokenOutput {
        token_ids: Vec::new(),
        logprobs: None,
        finish: Some(FinishReason::Migrate),
        cached_tokens: None,
        prompt_logprobs: None,
    }
}

/// Where a worker loop reads time: its clock (virtual in the simulator) and the wall-clock
/// instant its start corresponds to, for the `ts` of published KV event batches.
#[derive(Clone)]
pub struct EngineTime {
    pub clock: SharedClock,
    /// Seconds since the Unix epoch at the loop's start (0 in the simulator, which never
    /// reads the wall clock).
    pub wall_epoch_s: f64,
}

impl EngineTime {
    /// The tokio clock, with the wall clock read now.
    pub fn real() -> EngineTime {
        EngineTime {
            clock: TokioClock::shared(),
            wall_epoch_s: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        }
    }
}

/// A handle to a running worker. Cheap to clone.
#[derive(Clone)]
pub struct WorkerHandle {
    id: WorkerId,
    /// A request's image embeddings, made before admission where its prompt is computed
    /// here (see [`super::images`]).
    images: super::images::ImageEmbedder,
    cmds: mpsc::UnboundedSender<Command>,
    stats: watch::Receiver<SchedulerStats>,
    engine_task: AbortHandle,
}

impl WorkerHandle {
    /// Starts the engine loop for `scheduler` on the current tokio runtime.
    pub fn spawn(
        id: WorkerId,
        scheduler: Scheduler,
        executor: Executor,
        kv_events: KvEventSink,
    ) -> WorkerHandle {
        Self::spawn_on(id, scheduler, executor, kv_events, EngineTime::real())
    }

    /// Like [`WorkerHandle::spawn`], reading time from `time` (the simulator's clock).
    pub fn spawn_on(
        id: WorkerId,
        scheduler: Scheduler,
        executor: Executor,
        kv_events: KvEventSink,
        time: EngineTime,
    ) -> WorkerHandle {
        Self::spawn_with_plane(id, scheduler, executor, kv_events, time, None)
    }

    /// Like [`WorkerHandle::spawn_on`], with the transfer plane a prefill worker exports KV
    /// on and a decode worker pulls KV with (`None`: an aggregated worker).
    pub fn spawn_with_plane(
        id: WorkerId,
        scheduler: Scheduler,
        executor: Executor,
        kv_events: KvEventSink,
        time: EngineTime,
        plane: Option<turbine_runtime::transfer::TransferPlane>,
    ) -> WorkerHandle {
        let (cmds, rx) = mpsc::unbounded_channel();
        let (stats_tx, stats) = watch::channel(scheduler.stats());
        let constrained = super::constrained::Constrained::new(executor.grammars().cloned());
        let images =
            super::images::ImageEmbedder::new(id, executor.vision().cloned(), plane.clone());
        let engine = EngineLoop {
            id,
            scheduler,
            constrained,
            executor,
            kv_events,
            sinks: BTreeMap::new(),
            stats: stats_tx,
            started: time.clock.now(),
            time,
            event_seq: 0,
            releasing: false,
            remote: super::remote::RemoteState::new(plane, cmds.downgrade()),
            images: images.clone(),
            loopback: cmds.downgrade(),
            phases: super::phases::RequestPhases::default(),
        };
        let engine_task = tokio::spawn(engine.run(rx)).abort_handle();
        WorkerHandle {
            id,
            images,
            cmds,
            stats,
            engine_task,
        }
    }

    /// Stops the engine loop at once, as if its process died: the step in flight is lost,
    /// open streams end with an error and nothing more is published. (Failure injection in
    /// the simulator and tests; a real worker stops by shutting its process down.)
    pub fn stop_now(&self) {
        self.engine_task.abort();
    }

    /// Gives up every open request and every one admitted from now on: each ends with
    /// `FinishReason::Migrate` and its blocks are freed, so the frontend continues it on
    /// another worker. The last step of a drain (see `node::process::drain`).
    pub fn release_all(&self) {
        let _ = self.cmds.send(Command::Release);
    }

    /// Stops admissions: a new request is released at once (the frontend sends it
    /// elsewhere), the open ones keep running, and the load reports say `draining` so the
    /// router stops routing here. The first step of a drain.
    pub fn stop_admissions(&self) {
        let _ = self.cmds.send(Command::Drain);
    }

    /// Requests the worker holds (running or waiting) as of the last step.
    pub fn num_requests(&self) -> usize {
        let s = self.stats.borrow();
        s.num_running + s.num_waiting
    }

    /// Runs `f` on the scheduler between two steps and returns its result (invariant checks
    /// and inspection in tests and the simulator).
    pub async fn inspect<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Scheduler) -> R + Send + 'static,
    ) -> Result<R, WorkerError> {
        let (tx, rx) = oneshot::channel();
        let job: Box<dyn FnOnce(&Scheduler) + Send> = Box::new(move |s| {
            let _ = tx.send(f(s));
        });
        self.cmds
            .send(Command::Inspect(job))
            .map_err(|_| WorkerError::Stopped(self.id))?;
        rx.await.map_err(|_| WorkerError::Stopped(self.id))
    }

    pub fn id(&self) -> WorkerId {
        self.id
    }

    pub(super) fn send(&self, cmd: Command) -> Result<(), WorkerError> {
        self.cmds
            .send(cmd)
            .map_err(|_| WorkerError::Stopped(self.id))
    }

    pub(super) fn token_stream(
        &self,
        id: RequestId,
        rx: mpsc::UnboundedReceiver<TokenOutput>,
    ) -> TokenStream {
        TokenStream {
            id,
            rx,
            cmds: self.cmds.clone(),
            finished: false,
        }
    }

    /// Queue depths and KV usage as of the last step.
    pub fn stats(&self) -> SchedulerStats {
        self.stats.borrow().clone()
    }

    /// A receiver that changes after every step (for load reporting).
    pub fn watch_stats(&self) -> watch::Receiver<SchedulerStats> {
        self.stats.clone()
    }

    /// `req` with the embeddings of its images (see [`super::images`]); a request without
    /// images, or with its embeddings already, is returned as it is.
    pub(super) async fn with_embeds(
        &self,
        mut req: PreprocessedRequest,
    ) -> Result<PreprocessedRequest, WorkerError> {
        if req.images.is_empty() || req.embeds.is_some() {
            return Ok(req);
        }
        let placed = self
            .images
            .embeds(req.token_ids.clone(), req.images.clone())
            .await?;
        req.embeds = Some(std::sync::Arc::new(placed));
        Ok(req)
    }

    /// Admits `req` and returns its token stream. Dropping the stream before it finishes
    /// cancels the request.
    pub async fn generate(&self, req: PreprocessedRequest) -> Result<TokenStream, WorkerError> {
        let req = self.with_embeds(req).await?;
        let id = req.id;
        let (out, rx) = mpsc::unbounded_channel();
        let (admitted, admitted_rx) = oneshot::channel();
        self.cmds
            .send(Command::Generate {
                req: Box::new(req),
                out,
                admitted,
                span: tracing::Span::current(),
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
                // The worker dropped the request without a finish (it stopped): another
                // worker may continue it.
                self.finished = true;
                Poll::Ready(Some(released()))
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

pub(super) struct EngineLoop {
    pub(super) id: WorkerId,
    pub(super) scheduler: Scheduler,
    /// Grammar state of constrained requests (`response_format`, forced tool calls).
    pub(super) constrained: super::constrained::Constrained,
    pub(super) executor: Executor,
    kv_events: KvEventSink,
    pub(super) sinks: BTreeMap<RequestId, mpsc::UnboundedSender<TokenOutput>>,
    stats: watch::Sender<SchedulerStats>,
    started: Instant,
    pub(super) time: EngineTime,
    event_seq: u64,
    /// Draining: new requests are released at once (see [`WorkerHandle::stop_admissions`]).
    releasing: bool,
    pub(super) remote: super::remote::RemoteState,
    /// Makes the embeddings of requests the scheduler parks for them.
    images: super::images::ImageEmbedder,
    /// Where those tasks report back (weak: the loop still ends when every handle is gone).
    loopback: mpsc::WeakUnboundedSender<Command>,
    /// The trace spans of the requests it holds.
    pub(super) phases: super::phases::RequestPhases,
}

impl EngineLoop {
    pub(super) fn now(&self) -> Duration {
        self.time
            .clock
            .now()
            .saturating_duration_since(self.started)
    }

    async fn run(mut self, mut cmds: mpsc::UnboundedReceiver<Command>) {
        loop {
            while let Ok(cmd) = cmds.try_recv() {
                self.handle(cmd);
            }
            self.make_wanted_embeds();
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
            for seq in &plan.seqs {
                self.phases.stepped(seq.request, seq.is_decode());
            }
            let batch = self.exec_batch(&plan.seqs);
            let outputs = match self.executor.step(batch).await {
                Ok(out) => self.scheduler.on_step_done_with(
                    &plan,
                    &out.sampled,
                    &out.prompt_logprobs,
                    self.now(),
                ),
                Err(e) => {
                    tracing::warn!(worker = %self.id, "step failed: {e}");
                    self.scheduler.on_step_failed(&plan, &e.to_string())
                }
            };
            match outputs {
                Ok(mut outputs) => {
                    self.advance_grammars(&mut outputs);
                    self.deliver(outputs);
                    self.export_prefilled().await;
                }
                Err(e) => {
                    tracing::error!(worker = %self.id, "step bookkeeping failed: {e}");
                    break;
                }
            }
            self.publish();
        }
        // Shutting down: every open request is released (another worker may continue it)
        // rather than left hanging.
        for (_, sink) in std::mem::take(&mut self.sinks) {
            let _ = sink.send(released());
        }
        self.phases.clear();
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Generate {
                req, out, admitted, ..
            } if self.releasing => {
                // Draining: accept, then hand it straight back for another worker.
                let _ = admitted.send(Ok(()));
                let _ = out.send(released());
                drop(req);
            }
            Command::Generate {
                req,
                out,
                admitted,
                span,
            } => {
                let id = req.id;
                if let Err(e) = self.constrained.admit(&req) {
                    let _ = admitted.send(Err(AdmitError::Grammar(e)));
                    return;
                }
                let prompt_tokens = req.token_ids.len();
                match self.scheduler.add_request(*req, self.now()) {
                    Ok(()) => {
                        self.sinks.insert(id, out);
                        self.phases.queued(id, span);
                        let worker = self.id;
                        self.phases
                            .span(id)
                            .in_scope(|| tracing::debug!(%worker, prompt_tokens, "admitted"));
                        let _ = admitted.send(Ok(()));
                    }
                    Err(e) => {
                        self.constrained.remove(id);
                        let _ = admitted.send(Err(e));
                    }
                }
            }
            Command::Abort(id) => {
                self.sinks.remove(&id);
                self.phases.ended(id);
                self.constrained.remove(id);
                self.remote.finished(id);
                // An import still writes into this request's blocks: free them when it
                // is done, not now (they could be handed to another request meanwhile).
                if !self.remote.abort_after_import(&self.scheduler, id) {
                    self.scheduler.abort(id);
                }
            }
            Command::Inspect(f) => f(&self.scheduler),
            Command::Drain => {
                self.releasing = true;
                self.publish();
            }
            Command::Release => {
                self.releasing = true;
                for (id, sink) in std::mem::take(&mut self.sinks) {
                    self.scheduler.abort(id);
                    self.constrained.remove(id);
                    self.phases.ended(id);
                    let _ = sink.send(released());
                }
            }
            Command::Remote(cmd) => self.handle_remote(cmd),
            Command::Embedded { id, serial, result } => match result {
                Ok(embeds) => {
                    self.scheduler.embeds_ready(id, serial, embeds);
                }
                Err(e) => {
                    if let Some(out) = self.scheduler.embeds_failed(id, serial, &e.to_string()) {
                        self.deliver(vec![(id, out)]);
                    }
                }
            },
        }
    }

    /// Starts making the embeddings of every request the scheduler parked for them since
    /// the last call, each on a task of its own; each reports back as `Command::Embedded`.
    fn make_wanted_embeds(&mut self) {
        for wanted in self.scheduler.take_embeds_wanted() {
            let images = self.images.clone();
            let loopback = self.loopback.clone();
            tokio::spawn(async move {
                let result = images
                    .embeds(wanted.prompt, wanted.images)
                    .await
                    .map(std::sync::Arc::new);
                if let Some(tx) = loopback.upgrade() {
                    let _ = tx.send(Command::Embedded {
                        id: wanted.request,
                        serial: wanted.serial,
                        result,
                    });
                }
            });
        }
    }

    fn exec_batch(&self, seqs: &[crate::worker::ScheduledSeq]) -> Vec<ExecSeq> {
        seqs.iter()
            .map(|seq| {
                let sample = seq.want_logits.then(|| {
                    self.scheduler.sampling_context(seq.request).map(|ctx| {
                        let penalised = ctx.params.repetition_penalty != 1.0;
                        let constrained = self.constrained.is_constrained(seq.request);
                        // `min_tokens` under a grammar: the stop tokens leave its mask.
                        let hold = match crate::worker::bias::min_tokens_pending(&ctx) {
                            true => ctx.stop_token_ids.to_vec(),
                            false => Vec::new(),
                        };
                        SampleSpec {
                            params: ctx.params.clone(),
                            seed: ctx.params.seed.unwrap_or(seq.request.0),
                            sample_index: seq.sample_index,
                            history: if penalised {
                                ctx.tokens.to_vec()
                            } else {
                                Vec::new()
                            },
                            bias: crate::worker::bias::step_bias(&ctx, constrained),
                            // Filled on a blocking thread while the forward pass runs.
                            allowed: self.constrained.next_mask(seq.request, hold),
                            logprobs: ctx.logprobs,
                        }
                    })
                });
                ExecSeq {
                    seq: seq.clone(),
                    sample: sample.flatten(),
                    embeds: self.scheduler.prompt_embeds(seq.request).cloned(),
                }
            })
            .collect()
    }

    /// Advances each constrained request's grammar by its new token; a token the grammar
    /// rejects (it cannot, under its mask, unless the request migrated from a worker without
    /// one) ends the request with an error.
    fn advance_grammars(&mut self, outputs: &mut [(RequestId, TokenOutput)]) {
        for (id, out) in outputs.iter_mut() {
            if !self.constrained.is_constrained(*id) {
                continue;
            }
            for &t in &out.token_ids {
                if let Err(e) = self.constrained.advance(*id, t) {
                    if out.finish.is_none() {
                        self.scheduler.abort(*id);
                    }
                    out.finish = Some(FinishReason::Error(format!("grammar: {e}")));
                    break;
                }
            }
            if out.finish.is_some() {
                self.constrained.remove(*id);
            }
        }
    }

    fn deliver(&mut self, outputs: Vec<(RequestId, TokenOutput)>) {
        for (id, out) in outputs {
            let finish = out.finish.as_ref().map(FinishReason::label);
            let delivered = self.sinks.get(&id).is_some_and(|s| s.send(out).is_ok());
            if let Some(reason) = finish {
                let worker = self.id;
                self.phases
                    .span(id)
                    .in_scope(|| tracing::debug!(%worker, reason, "finished"));
                self.sinks.remove(&id);
                self.remote.finished(id);
                self.constrained.remove(id);
                self.phases.ended(id);
            } else if !delivered {
                // The client went away: free its blocks now.
                self.sinks.remove(&id);
                self.scheduler.abort(id);
                self.constrained.remove(id);
                self.phases.ended(id);
            }
        }
    }

    fn publish(&mut self) {
        let events: Vec<KvEvent> = self.scheduler.drain_kv_events();
        if !events.is_empty() {
            let ts = self.time.wall_epoch_s + self.now().as_secs_f64();
            (self.kv_events)(KvEventBatch {
                worker: self.id,
                seq: self.event_seq,
                ts,
                events,
            });
            self.event_seq += 1;
        }
        let mut stats = self.scheduler.stats();
        stats.kv_batches = self.event_seq;
        stats.draining = self.releasing;
        stats.images_encoded = self.images.images_encoded();
        self.stats.send_replace(stats);
    }
}
