//! The request path behind the HTTP frontend: preprocess (template + tokenize), route
//! (KV-aware), run on a worker, and stream text back (incremental detokenization).
//!
//! This is the [`ChatEngine`] the frontend calls. Workers are reached through
//! location-transparent `Addr<WorkerService>`s (local, or in another process); KV events
//! flow from each worker into the router's [`FlashIndexer`], and each worker's load is fed
//! to the router with [`Pipeline::update_load`].

use super::service::{WorkerReply, WorkerRequest, WorkerService};
use crate::frontend::{ChatEngine, Delta, DeltaStream, EngineError, GenerateRequest, Usage};
use crate::ids::{RequestId, WorkerId};
use crate::kv::indexer::FlashIndexer;
use crate::kv::{hash_blocks, BlockSize};
use crate::preprocessor::codec::ModelCodec;
use crate::protocol::{FinishReason, PreprocessedRequest, StopConditions};
use crate::router::{KvRouter, RouteError, RouteRequest};
use crate::worker::SchedulerStats;
use async_trait::async_trait;
use futures::StreamExt;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use turbine_kernels::tokenizer::IncrementalDecoder;
use turbine_runtime::{Addr, CallError, ReplyStream};

/// Everything a request needs on its way through the graph, shared by all requests.
pub struct Pipeline {
    model_id: String,
    context_length: usize,
    block_size: BlockSize,
    codec: Arc<ModelCodec>,
    router: Arc<Mutex<KvRouter>>,
    workers: RwLock<BTreeMap<WorkerId, Addr<WorkerService>>>,
    next_request: AtomicU64,
    started: Instant,
}

impl Pipeline {
    /// A pipeline with no workers yet: add them with [`Pipeline::add_worker`].
    pub fn new(
        model_id: String,
        context_length: usize,
        block_size: BlockSize,
        codec: Arc<ModelCodec>,
        router: KvRouter,
    ) -> Pipeline {
        let router = Arc::new(Mutex::new(router));
        Pipeline {
            model_id,
            context_length,
            block_size,
            codec,
            router,
            workers: RwLock::new(BTreeMap::new()),
            // Request ids only need to be unique per process lifetime; start from the
            // clock so a restarted frontend does not reuse ids still known to workers.
            next_request: AtomicU64::new(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_micros() as u64)
                    .unwrap_or(1)
                    << 8,
            ),
            started: Instant::now(),
        }
    }

    /// Makes `worker` routable.
    pub fn add_worker(&self, id: WorkerId, worker: Addr<WorkerService>) {
        lock(&self.router).add_worker(id);
        self.workers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, worker);
    }

    /// Stops routing to `id` (it left, or its lease expired) and forgets its KV blocks.
    pub fn remove_worker(&self, id: WorkerId) {
        lock(&self.router).remove_worker(id);
        self.workers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }

    /// Feeds a worker's latest stats into the router's load view.
    pub fn update_load(&self, id: WorkerId, stats: &SchedulerStats) {
        let active = (stats.num_running + stats.num_waiting) as u32;
        lock(&self.router).update_load(id, stats.kv.used as u64, active);
    }

    pub fn worker_ids(&self) -> Vec<WorkerId> {
        self.workers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect()
    }

    pub fn router(&self) -> &Arc<Mutex<KvRouter>> {
        &self.router
    }

    fn now(&self) -> Duration {
        self.started.elapsed()
    }
}

/// Builds the KV event sink for a worker: events go into the shared index.
pub fn index_sink(index: Arc<FlashIndexer>) -> super::worker::KvEventSink {
    Box::new(move |batch| {
        index.apply(&batch);
    })
}

fn lock(router: &Mutex<KvRouter>) -> std::sync::MutexGuard<'_, KvRouter> {
    // A panic while holding the lock cannot leave the router half-updated in a way that
    // matters more than refusing all further requests would, so recover the guard.
    router.lock().unwrap_or_else(|e| e.into_inner())
}

#[async_trait]
impl ChatEngine for Pipeline {
    fn model_id(&self) -> &str {
        &self.model_id
    }

    fn context_length(&self) -> usize {
        self.context_length
    }

    async fn generate(&self, req: GenerateRequest) -> Result<DeltaStream, EngineError> {
        let token_ids = self.codec.prompt_ids(&req.prompt)?;
        let prompt_len = token_ids.len();
        if prompt_len == 0 {
            return Err(EngineError::InvalidRequest("the prompt is empty".into()));
        }
        if prompt_len >= self.context_length {
            return Err(EngineError::ContextLengthExceeded {
                prompt_tokens: prompt_len,
                context_length: self.context_length,
            });
        }
        let room = (self.context_length - prompt_len) as u32;
        let max_tokens = req.max_tokens.map_or(room, |m| m.min(room));
        let id = RequestId(self.next_request.fetch_add(1, Ordering::Relaxed));
        let mut sampling = req.sampling.clone();
        if sampling.seed.is_none() && sampling.temperature > 0.0 {
            // No seed asked for: still reproducible within this request across preemption.
            sampling.seed = Some(id.0.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        }
        let route = RouteRequest {
            id,
            hashes: hash_blocks(&token_ids, self.block_size, 0),
            token_count: prompt_len,
        };
        let decision = lock(&self.router)
            .route(self.now(), &route)
            .map_err(|RouteError::NoWorkers| {
                EngineError::Overloaded("no worker is available".into())
            })?
            .decision;
        let finish_guard = RouteGuard {
            router: self.router.clone(),
            id,
        };
        let worker = self
            .workers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&decision.worker)
            .cloned();
        let Some(worker) = worker else {
            return Err(EngineError::Internal(format!(
                "router chose unknown worker {}",
                decision.worker
            )));
        };
        let pre = PreprocessedRequest {
            id,
            token_ids,
            sampling,
            stop: StopConditions {
                max_tokens,
                stop_token_ids: self.codec.stop_ids().to_vec(),
                ignore_eos: req.ignore_eos,
            },
            logprobs: req.logprobs,
            salt: 0,
        };
        let tokens = worker
            .stream(WorkerRequest::Generate(Box::new(pre)))
            .await
            .map_err(|e| EngineError::Overloaded(format!("worker {}: {e}", decision.worker)))?;
        let state = Detokenize {
            codec: self.codec.clone(),
            decoder: self.codec.decoder(),
            prompt_tokens: prompt_len as u32,
            completion_tokens: 0,
            cached_tokens: 0,
            _guard: finish_guard,
        };
        Ok(detokenize(tokens, state))
    }
}

/// Tells the router a request is over however its stream ends (finished, failed, dropped).
struct RouteGuard {
    router: Arc<Mutex<KvRouter>>,
    id: RequestId,
}

impl Drop for RouteGuard {
    fn drop(&mut self) {
        lock(&self.router).on_request_finished(self.id);
    }
}

struct Detokenize {
    codec: Arc<ModelCodec>,
    decoder: IncrementalDecoder,
    prompt_tokens: u32,
    completion_tokens: u32,
    cached_tokens: u32,
    _guard: RouteGuard,
}

impl Detokenize {
    fn delta(&mut self, item: Result<WorkerReply, CallError>) -> Result<Delta, EngineError> {
        let first = self.completion_tokens == 0;
        let out = match item {
            Ok(WorkerReply::Token(out)) => out,
            Ok(WorkerReply::Stats(_)) => {
                return Err(EngineError::Internal(
                    "worker sent stats on a stream".into(),
                ))
            }
            // Refused at admission: the request itself is at fault (too long for the
            // worker's pool, empty, ...).
            Err(CallError::Handler(msg)) if first => return Err(EngineError::InvalidRequest(msg)),
            // The worker went away (crash, network) before it produced anything: nothing was
            // generated, so the client may simply retry (503); discovery drops the worker.
            Err(e @ (CallError::PeerGone(_) | CallError::Timeout(_) | CallError::Transport(_)))
                if first =>
            {
                return Err(EngineError::Overloaded(format!("worker unavailable: {e}")))
            }
            Err(e) => return Err(EngineError::Internal(format!("worker: {e}"))),
        };
        if let Some(c) = out.cached_tokens {
            self.cached_tokens = c;
        }
        self.completion_tokens += out.token_ids.len() as u32;
        let tok = self.codec.tokenizer();
        let mut text = String::new();
        for &id in &out.token_ids {
            let piece = self
                .decoder
                .push(tok, id)
                .map_err(|e| EngineError::Internal(format!("detokenizing: {e}")))?;
            text.push_str(&piece);
        }
        if out.finish.is_some() {
            let rest = self
                .decoder
                .finish(tok)
                .map_err(|e| EngineError::Internal(format!("detokenizing: {e}")))?;
            text.push_str(&rest);
        }
        if let Some(FinishReason::Error(msg)) = &out.finish {
            return Err(EngineError::Internal(msg.clone()));
        }
        let usage = (first || out.finish.is_some()).then_some(Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            cached_tokens: self.cached_tokens,
        });
        Ok(Delta {
            text,
            logprobs: out
                .logprobs
                .as_ref()
                .map(|lps| lps.iter().map(|lp| self.codec.logprobs(lp)).collect()),
            token_ids: out.token_ids,
            finish: out.finish,
            usage,
        })
    }
}

fn detokenize(tokens: ReplyStream<WorkerReply>, state: Detokenize) -> DeltaStream {
    futures::stream::unfold(
        (tokens, state, false),
        |(mut tokens, mut state, done)| async move {
            if done {
                return None;
            }
            let out = tokens.next().await?;
            let item = state.delta(out);
            let done = match &item {
                Ok(d) => d.finish.is_some(),
                Err(_) => true,
            };
            Some((item, (tokens, state, done)))
        },
    )
    .boxed()
}
