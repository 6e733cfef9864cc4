//! The worker loop's side of disaggregated serving: a prefill worker's prefill-only requests
//! (first token streamed, then the KV exported on the transfer plane and the blocks freed),
//! and a decode worker's admissions whose KV is pulled from a prefill worker.
//!
//! The scheduler's pure side is `scheduler/remote_kv.rs`; this module only moves bytes and
//! answers. A pull runs on a task of its own, so the loop keeps stepping other requests
//! while KV crosses; its result comes back as a command.

use super::worker_loop::{Command, EngineLoop, TokenStream, WorkerError, WorkerHandle};
use crate::disagg::kv_transfer::{self, KvExport};
use crate::disagg::wire::{FallbackReason, ImportOutcome, TransferPath};
use crate::ids::{RequestId, TokenId};
use crate::protocol::{PreprocessedRequest, TokenOutput};
use crate::worker::AdmitError;
use std::collections::{BTreeMap, BTreeSet};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;
use turbine_kernels::kv_ipc::KvIpcPool;
use turbine_runtime::transfer::TransferPlane;

/// The answer a prefill worker gives after the first token: the KV's descriptor, or why
/// there is none.
pub type ExportReply = Result<KvExport, String>;

pub(super) enum RemoteCommand {
    Prefill {
        req: Box<PreprocessedRequest>,
        out: mpsc::UnboundedSender<TokenOutput>,
        export: oneshot::Sender<ExportReply>,
        admitted: oneshot::Sender<Result<(), AdmitError>>,
        /// The span the request arrived in (see `worker::phases`).
        span: tracing::Span,
    },
    Decode {
        req: Box<PreprocessedRequest>,
        first_token: TokenId,
        kv: Option<KvExport>,
        out: mpsc::UnboundedSender<TokenOutput>,
        outcome: oneshot::Sender<ImportOutcome>,
        admitted: oneshot::Sender<Result<(), AdmitError>>,
        span: tracing::Span,
    },
    Imported {
        id: RequestId,
        result: Result<ImportOutcome, FallbackReason>,
        outcome: oneshot::Sender<ImportOutcome>,
    },
    /// The transfer plane let go of a held request's export (pulled, discarded or
    /// expired): its blocks, kept for a device copy, are free to go.
    ReleaseHeld(RequestId),
}

/// Sends [`RemoteCommand::ReleaseHeld`] when dropped: kept by an export's buffer on the
/// transfer plane (`kv_transfer::export_blocks`'s `hold`).
struct ReleaseOnDrop {
    id: RequestId,
    loopback: mpsc::WeakUnboundedSender<Command>,
}

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        if let Some(tx) = self.loopback.upgrade() {
            let _ = tx.send(Command::Remote(RemoteCommand::ReleaseHeld(self.id)));
        }
    }
}

/// What the loop keeps for remote requests.
pub(super) struct RemoteState {
    plane: Option<TransferPlane>,
    /// Prefill-only requests waiting for their export, by id.
    exports: BTreeMap<RequestId, oneshot::Sender<ExportReply>>,
    /// Where import tasks report back (weak: the loop still ends when every handle is gone).
    loopback: mpsc::WeakUnboundedSender<Command>,
    /// Importing requests whose caller went away: aborted once their import is over.
    cancelled: BTreeSet<RequestId>,
    /// The executor's offer of its pool for device copies (asked once; `None` inside:
    /// it has none, and exports are copies the blocks need not outlive).
    ipc_offer: Option<Option<KvIpcPool>>,
}

impl RemoteState {
    pub(super) fn new(
        plane: Option<TransferPlane>,
        loopback: mpsc::WeakUnboundedSender<Command>,
    ) -> Self {
        RemoteState {
            plane,
            exports: BTreeMap::new(),
            loopback,
            cancelled: BTreeSet::new(),
            ipc_offer: None,
        }
    }

    /// `id` was cancelled: when it is importing, remember to abort it after the import
    /// (returns true); otherwise the caller aborts it now.
    pub(super) fn abort_after_import(
        &mut self,
        scheduler: &crate::worker::Scheduler,
        id: RequestId,
    ) -> bool {
        let importing = scheduler.is_importing(id);
        if importing {
            self.cancelled.insert(id);
        }
        importing
    }

    /// `id` ended (finished on its first token, or aborted): no export will follow.
    pub(super) fn finished(&mut self, id: RequestId) {
        self.exports.remove(&id);
    }
}

impl WorkerHandle {
    /// Runs `req`'s prompt only (a prefill worker): the stream carries the first token;
    /// the receiver then gets the KV's descriptor (dropped if the first token ended it).
    pub async fn prefill(
        &self,
        req: PreprocessedRequest,
    ) -> Result<(TokenStream, oneshot::Receiver<ExportReply>), WorkerError> {
        let req = self.with_embeds(req).await?;
        let id = req.id;
        let (out, rx) = mpsc::unbounded_channel();
        let (export, export_rx) = oneshot::channel();
        let (admitted, admitted_rx) = oneshot::channel();
        self.send(Command::Remote(RemoteCommand::Prefill {
            req: Box::new(req),
            out,
            export,
            admitted,
            span: tracing::Span::current(),
        }))?;
        admitted_rx
            .await
            .map_err(|_| WorkerError::Stopped(self.id()))??;
        Ok((self.token_stream(id, rx), export_rx))
    }

    /// Decodes `req` whose first token `first_token` was sampled on a prefill worker, with
    /// the prompt's KV pulled from `kv` (`None`, or any failure: recomputed here). The
    /// receiver says which happened, before the stream's first token.
    pub async fn decode_remote(
        &self,
        req: PreprocessedRequest,
        first_token: TokenId,
        kv: Option<KvExport>,
    ) -> Result<(TokenStream, oneshot::Receiver<ImportOutcome>), WorkerError> {
        // No embeddings: the prompt's KV comes from the prefill worker. Should the prompt be
        // recomputed here after all (no KV, a failed import, a preemption), the scheduler
        // parks the request and the loop makes them then (`scheduler/embeds.rs`).
        let id = req.id;
        let (out, rx) = mpsc::unbounded_channel();
        let (outcome, outcome_rx) = oneshot::channel();
        let (admitted, admitted_rx) = oneshot::channel();
        self.send(Command::Remote(RemoteCommand::Decode {
            req: Box::new(req),
            first_token,
            kv,
            out,
            outcome,
            admitted,
            span: tracing::Span::current(),
        }))?;
        admitted_rx
            .await
            .map_err(|_| WorkerError::Stopped(self.id()))??;
        Ok((self.token_stream(id, rx), outcome_rx))
    }
}

impl EngineLoop {
    pub(super) fn handle_remote(&mut self, cmd: RemoteCommand) {
        match cmd {
            RemoteCommand::Prefill {
                req,
                out,
                export,
                admitted,
                span,
            } => {
                let id = req.id;
                if let Err(e) = self.constrained.admit(&req) {
                    let _ = admitted.send(Err(AdmitError::Grammar(e)));
                    return;
                }
                let result = self.scheduler.add_prefill_only(*req, self.now());
                if result.is_ok() {
                    self.sinks.insert(id, out);
                    self.remote.exports.insert(id, export);
                    self.phases.queued(id, span);
                }
                let _ = admitted.send(result);
            }
            RemoteCommand::Decode {
                req,
                first_token,
                kv,
                out,
                outcome,
                admitted,
                span,
            } => self.admit_decode(*req, first_token, kv, out, outcome, admitted, span),
            RemoteCommand::ReleaseHeld(id) => {
                self.scheduler.release_held(id);
            }
            RemoteCommand::Imported {
                id,
                result,
                outcome,
            } => {
                if self.remote.cancelled.remove(&id) {
                    // Its caller went away during the import: the blocks are free to go now.
                    self.scheduler.abort(id);
                    self.phases.ended(id);
                    return;
                }
                self.phases.pulled(id);
                let report = match result {
                    Ok(done) => {
                        self.scheduler.kv_imported(id);
                        done
                    }
                    Err(reason) => {
                        let worker = self.id;
                        self.phases.span(id).in_scope(|| tracing::info!(%worker, request = %id, "KV import failed ({}); prefilling locally", reason.label()));
                        self.scheduler.kv_import_failed(id);
                        ImportOutcome::Fallback {
                            reason: reason.label().to_string(),
                        }
                    }
                };
                let _ = outcome.send(report);
            }
        }
    }

    #[allow(clippy::too_many_arguments)] // one command's fields, taken apart once
    fn admit_decode(
        &mut self,
        req: PreprocessedRequest,
        first_token: TokenId,
        kv: Option<KvExport>,
        out: mpsc::UnboundedSender<TokenOutput>,
        outcome: oneshot::Sender<ImportOutcome>,
        admitted: oneshot::Sender<Result<(), AdmitError>>,
        span: tracing::Span,
    ) {
        let id = req.id;
        let now = self.now();
        // The prefill worker drew the first token under the grammar; continue from it.
        let constrained = self
            .constrained
            .admit(&req)
            .and_then(|()| self.constrained.advance(id, first_token));
        if let Err(e) = constrained {
            self.constrained.remove(id);
            let _ = admitted.send(Err(AdmitError::Grammar(e)));
            return;
        }
        let (kv, plane) = match (kv, self.remote.plane.clone()) {
            (Some(kv), Some(plane)) => (kv, plane),
            (kv, _) => {
                // Nothing to pull (the prefill worker went away before its descriptor, or
                // this worker has no plane): recompute the prompt, keep the first token.
                let reason = if kv.is_some() {
                    FallbackReason::BadDescriptor
                } else {
                    FallbackReason::NoDescriptor
                };
                return self.recompute(req, first_token, reason, out, outcome, admitted, span);
            }
        };
        match self
            .scheduler
            .add_with_remote_kv(req.clone(), first_token, now)
        {
            Ok(adm) => {
                self.sinks.insert(id, out);
                let transfer = self.phases.pulling(id, span);
                let _ = admitted.send(Ok(()));
                let exec = self.executor.clone();
                let loopback = self.remote.loopback.clone();
                let skip = adm.cached_blocks;
                let into = adm.import_into().to_vec();
                // Timed on the loop's clock (the simulator's virtual one in the simulator).
                let clock = self.time.clock.clone();
                let pull = async move {
                    let started = clock.now();
                    let result = kv_transfer::import_blocks(&exec, &plane, &kv, skip, &into)
                        .await
                        .map(|done| ImportOutcome::Imported {
                            blocks: into.len() as u32,
                            bytes: done.bytes,
                            seconds: clock.now().saturating_duration_since(started).as_secs_f64(),
                            path: TransferPath::of(
                                done.device_copy,
                                done.host_reason.map(str::to_string),
                            ),
                        })
                        .map_err(|e| FallbackReason::of_import(&e));
                    if let Some(tx) = loopback.upgrade() {
                        let _ = tx.send(Command::Remote(RemoteCommand::Imported {
                            id,
                            result,
                            outcome,
                        }));
                    }
                };
                tokio::spawn(pull.instrument(transfer));
            }
            Err(AdmitError::OutOfBlocks | AdmitError::Busy) => {
                // Not at once: tell the owner to unpin, and recompute when there is room.
                tokio::spawn(async move {
                    let _ = plane.discard(&kv.descriptor).await;
                });
                self.recompute(
                    req,
                    first_token,
                    FallbackReason::DecodeBusy,
                    out,
                    outcome,
                    admitted,
                    span,
                )
            }
            Err(e) => {
                tokio::spawn(async move {
                    let _ = plane.discard(&kv.descriptor).await;
                });
                let _ = admitted.send(Err(e));
            }
        }
    }

    #[allow(clippy::too_many_arguments)] // `admit_decode`'s, passed on
    fn recompute(
        &mut self,
        req: PreprocessedRequest,
        first_token: TokenId,
        reason: FallbackReason,
        out: mpsc::UnboundedSender<TokenOutput>,
        outcome: oneshot::Sender<ImportOutcome>,
        admitted: oneshot::Sender<Result<(), AdmitError>>,
        span: tracing::Span,
    ) {
        let id = req.id;
        let result = self
            .scheduler
            .add_with_first_token(req, first_token, self.now());
        if result.is_ok() {
            self.sinks.insert(id, out);
            self.phases.queued(id, span);
            let _ = outcome.send(ImportOutcome::Fallback {
                reason: reason.label().to_string(),
            });
        }
        let _ = admitted.send(result);
    }

    /// The executor's pool offer for device copies, asked once.
    async fn ipc_offer(&mut self) -> Option<KvIpcPool> {
        if self.remote.ipc_offer.is_none() {
            self.remote.ipc_offer = Some(self.executor.kv_ipc_pool().await);
        }
        self.remote.ipc_offer.clone().flatten()
    }

    /// After a step: every prefill-only request that has its first token is exported on the
    /// plane and its caller answered. The export is a copy, so the blocks go back to the
    /// pool at once; unless the executor's pool can be mapped by another process: then the
    /// export also offers the blocks for a device copy, and they stay held until the plane
    /// unpins the buffer (pulled, discarded or expired; [`RemoteCommand::ReleaseHeld`]).
    pub(super) async fn export_prefilled(&mut self) {
        for done in self.scheduler.take_prefilled() {
            let id = done.request;
            let Some(reply) = self.remote.exports.remove(&id) else {
                // Its caller went away: nothing to export.
                self.scheduler.release_held(id);
                self.phases.ended(id);
                continue;
            };
            let hold = match self.remote.plane.is_some() {
                true => self.ipc_offer().await.map(|pool| {
                    let guard = ReleaseOnDrop {
                        id,
                        loopback: self.remote.loopback.clone(),
                    };
                    (pool, Box::new(guard) as kv_transfer::HoldGuard)
                }),
                false => None,
            };
            let answer = match &self.remote.plane {
                Some(plane) => {
                    kv_transfer::export_blocks(&self.executor, plane, &done.blocks, hold)
                        .instrument(self.phases.exporting(id))
                        .await
                        .map_err(|e| e.to_string())
                }
                None => Err("this worker has no transfer plane".to_string()),
            };
            if !answer.as_ref().is_ok_and(|kv| kv.ipc.is_some()) {
                self.scheduler.release_held(id);
            }
            self.sinks.remove(&id);
            self.phases.ended(id);
            if let Err(Ok(unsent)) = reply.send(answer) {
                // Its caller went away meanwhile: nobody will pull it (held blocks go too).
                if let Some(plane) = &self.remote.plane {
                    plane.release(&unsent.descriptor);
                }
            }
        }
    }
}
