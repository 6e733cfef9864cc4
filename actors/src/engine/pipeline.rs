//! The request path behind the HTTP frontend: preprocess (template + tokenize), route
//! (KV-aware), run on a worker, and stream text back (incremental detokenization).
//!
//! This is the [`ChatEngine`] the frontend calls. Workers are reached through
//! [`WorkerHandle`]s; KV events flow from each worker straight into the router's
//! [`FlashIndexer`], and each worker's load is mirrored into the router after every step.

use super::worker::{TokenStream, WorkerError, WorkerHandle};
use crate::frontend::{ChatEngine, Delta, DeltaStream, EngineError, GenerateRequest, Usage};
use crate::ids::{RequestId, WorkerId};
use crate::kv::indexer::FlashIndexer;
use crate::kv::{hash_blocks, BlockSize};
use crate::preprocessor::codec::ModelCodec;
use crate::protocol::{FinishReason, PreprocessedRequest, StopConditions, TokenOutput};
use crate::router::{KvRouter, RouteError, RouteRequest};
use crate::worker::AdmitError;
use async_trait::async_trait;
use futures::StreamExt;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use turbine_kernels::tokenizer::IncrementalDecoder;

/// Everything a request needs on its way through the graph, shared by all requests.
pub struct Pipeline {
    model_id: String,
    context_length: usize,
    block_size: BlockSize,
    codec: Arc<ModelCodec>,
    router: Arc<Mutex<KvRouter>>,
    workers: BTreeMap<WorkerId, WorkerHandle>,
    next_request: AtomicU64,
    started: Instant,
}

impl Pipeline {
    /// Wires `workers` to `router`: their stats feed its load view. KV events must already
    /// flow into `index` (the worker's event sink).
    pub fn new(
        model_id: String,
        context_length: usize,
        block_size: BlockSize,
        codec: Arc<ModelCodec>,
        router: KvRouter,
        workers: Vec<WorkerHandle>,
    ) -> Pipeline {
        let router = Arc::new(Mutex::new(router));
        let mut by_id = BTreeMap::new();
        for w in workers {
            lock(&router).add_worker(w.id());
            spawn_load_mirror(w.clone(), router.clone());
            by_id.insert(w.id(), w);
        }
        Pipeline {
            model_id,
            context_length,
            block_size,
            codec,
            router,
            workers: by_id,
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

    pub fn workers(&self) -> impl Iterator<Item = &WorkerHandle> {
        self.workers.values()
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

fn spawn_load_mirror(worker: WorkerHandle, router: Arc<Mutex<KvRouter>>) {
    let mut stats = worker.watch_stats();
    tokio::spawn(async move {
        while stats.changed().await.is_ok() {
            let s = stats.borrow_and_update().clone();
            let active = (s.num_running + s.num_waiting) as u32;
            lock(&router).update_load(worker.id(), s.kv.used as u64, active);
        }
    });
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
        let Some(worker) = self.workers.get(&decision.worker) else {
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
        let tokens = worker.generate(pre).await.map_err(|e| match e {
            WorkerError::Admit(AdmitError::PromptTooLong {
                prompt_len,
                max_model_len,
            }) => EngineError::ContextLengthExceeded {
                prompt_tokens: prompt_len,
                context_length: max_model_len,
            },
            WorkerError::Admit(other) => EngineError::InvalidRequest(other.to_string()),
            WorkerError::Stopped(w) => EngineError::Internal(format!("worker {w} has stopped")),
        })?;
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
    fn delta(&mut self, out: TokenOutput) -> Result<Delta, EngineError> {
        let first = self.completion_tokens == 0;
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

fn detokenize(tokens: TokenStream, state: Detokenize) -> DeltaStream {
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
