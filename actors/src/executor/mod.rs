//! The executor: owns a compute backend (weights + paged KV pool) on its own OS thread and
//! runs one step at a time: forward pass and sampling in one `Backend::forward_sample` call
//! (the CUDA backend draws on the device and returns only tokens and requested logprobs; the
//! CPU backend samples on the host). `TURBINE_HOST_SAMPLING=1` forces host sampling (to
//! compare); `TURBINE_STEP_PROFILE=N` prints the thread's per-step timeline every N steps.
//! `TURBINE_FAULT_STALL_FILE=PATH` is a fault hook for tests: while PATH exists, the thread
//! holds each step before running it, as a stuck engine would (see `crate::fault`).
//!
//! Compute never runs on a tokio worker thread: a forward pass takes milliseconds to seconds
//! and would stall every other task on that thread. The async side talks to the thread over
//! a channel and awaits a oneshot reply, so a worker actor can keep accepting requests and
//! cancellations while a step runs.

pub mod device;

use crate::ids::RequestId;
use crate::protocol::{SamplingParams, TokenLogprob};
use crate::worker::{PromptLogprobsChunk, SampledToken, ScheduledSeq};
use bytes::Bytes;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use turbine_kernels::backend::Logits as KLogits;
use turbine_kernels::backend::{Backend, BackendError, SeqStep, Splice};
use turbine_kernels::sampling as ksampling;
use turbine_runtime::SharedClock;

/// What the sampler needs for one sequence of a step.
#[derive(Clone, Debug)]
pub struct SampleSpec {
    pub params: SamplingParams,
    /// The request's seed; the token at `sample_index` is drawn from a stream seeded by
    /// (seed, sample_index), so a recomputed sequence draws the same tokens again.
    pub seed: u64,
    pub sample_index: u32,
    /// Prompt + generated tokens; only filled when a repetition penalty is active.
    pub history: Vec<u32>,
    /// Added to the logits before the draw: `logit_bias`, presence and frequency
    /// penalties, stop tokens banned before `min_tokens` (see `worker::bias`).
    pub bias: Vec<(u32, f32)>,
    /// A constrained request: the grammar's allowed-token bitmask, filled while the
    /// forward pass runs (see `worker::constrained`).
    pub allowed: Option<MaskSlot>,
    /// Top alternatives to report with the token's logprob, if logprobs were asked for.
    pub logprobs: Option<u32>,
}

/// A token mask that is computed while the step's forward pass runs: the worker fills it
/// from a blocking thread, the executor waits for it only when it samples.
#[derive(Clone, Default)]
pub struct MaskSlot(Arc<(Mutex<Option<MaskResult>>, Condvar)>);

/// A grammar's allowed-token bitmask, or why it could not be computed.
pub type MaskResult = Result<Vec<u32>, String>;

impl std::fmt::Debug for MaskSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MaskSlot(..)")
    }
}

impl MaskSlot {
    /// Hands the mask (or why there is none) to the waiting executor.
    pub fn fill(&self, mask: MaskResult) {
        let (lock, ready) = &*self.0;
        let mut slot = lock.lock().unwrap_or_else(|e| e.into_inner());
        *slot = Some(mask);
        ready.notify_all();
    }

    /// Blocks until the mask is there (the executor thread, never a tokio thread).
    pub fn wait(&self) -> MaskResult {
        let (lock, ready) = &*self.0;
        let mut slot = lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(mask) = slot.as_ref() {
                return mask.clone();
            }
            slot = ready.wait(slot).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// One sequence of a step, ready for the backend.
#[derive(Clone, Debug)]
pub struct ExecSeq {
    pub seq: ScheduledSeq,
    /// `Some` exactly when `seq.want_logits`.
    pub sample: Option<SampleSpec>,
    /// The request's image embeddings (its prompt has images): the positions of this step
    /// that are placeholders take them instead of their token's embedding.
    pub embeds: Option<Arc<crate::encoder::PromptEmbeds>>,
}

/// Why a step failed. The worker fails the step's requests with this message and goes on.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ExecError {
    #[error("backend: {0}")]
    Backend(#[from] turbine_kernels::backend::BackendError),
    #[error("sampling request {request}: {reason}")]
    Sampling { request: RequestId, reason: String },
    #[error("the executor thread has stopped")]
    Stopped,
    #[error("a simulated executor holds no KV data to export or import")]
    NoKvData,
}

/// Builds a backend on the executor's own thread (see [`Executor::spawn_with`]).
pub type BackendBuilder = Box<dyn FnOnce() -> Result<Box<dyn Backend>, BackendError> + Send>;

/// Why [`Executor::spawn_with`] could not start an executor.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("could not start the executor thread: {0}")]
    Thread(std::io::Error),
    #[error("{0}")]
    Backend(#[from] BackendError),
    #[error("the executor thread panicked while building its backend")]
    Panicked,
}

struct Job {
    batch: Vec<ExecSeq>,
    reply: oneshot::Sender<Result<StepOutput, ExecError>>,
}

/// What one step gives back: a sample per sequence that wants logits (in batch order) and
/// the prompt logprobs of the sequences whose entry asked (`ScheduledSeq::prompt_logprobs`:
/// every position's logits computed by `Backend::forward_every`).
#[derive(Clone, Debug, Default)]
pub struct StepOutput {
    pub sampled: Vec<SampledToken>,
    pub prompt_logprobs: Vec<PromptLogprobsChunk>,
}

/// Work on the backend other than a step (KV block export/import for disaggregation), run
/// on the executor's thread between steps.
type BackendTask = Box<dyn FnOnce(&mut dyn Backend) + Send>;

/// What the executor thread receives.
enum Work {
    Step(Job),
    OnBackend(BackendTask),
}

impl From<Job> for Work {
    fn from(job: Job) -> Self {
        Work::Step(job)
    }
}

/// A stand-in for a backend on virtual time, for the simulator: it *prices* a step (a cost
/// model) and makes up its samples instead of computing them. The executor sleeps the priced
/// duration on its clock, so the worker loop around it runs exactly as with a real backend.
pub trait SimulatedEngine: Send + Sync + 'static {
    /// The forward-pass duration of `batch` and its sampled tokens (one per sequence that
    /// wants logits, in batch order).
    fn step(&self, batch: &[ExecSeq]) -> (Duration, Result<Vec<SampledToken>, ExecError>);
}

#[derive(Clone)]
enum Runner {
    /// A real backend on its own OS thread.
    Thread(std_mpsc::Sender<Work>),
    /// A simulated engine: the step's duration passes on `clock` (virtual time in the
    /// simulator), on the caller's task.
    Simulated {
        engine: Arc<dyn SimulatedEngine>,
        clock: SharedClock,
        /// The KV pool's shape, when the simulation moves KV between workers: exports are
        /// that many zero bytes (their size is what a transfer costs), imports are dropped.
        kv: Option<turbine_kernels::backend::KvLayout>,
    },
}

/// Handle to an executor thread (or a simulated engine). Cloning shares the thread; the
/// thread ends when the last handle is dropped.
#[derive(Clone)]
pub struct Executor {
    runner: Runner,
    /// The model's vocabulary for constrained decoding (none: constrained requests are
    /// refused, e.g. by a simulated engine).
    grammars: Option<Arc<turbine_kernels::grammar::Grammars>>,
    /// The model's vision tower (none: requests with images are refused).
    vision: Option<Arc<turbine_kernels::loader::VisionModel>>,
}

impl Executor {
    /// This executor with its model's vision tower (a multimodal model).
    pub fn with_vision(mut self, vision: Arc<turbine_kernels::loader::VisionModel>) -> Self {
        self.vision = Some(vision);
        self
    }

    /// The model's vision tower, if it has one.
    pub fn vision(&self) -> Option<&Arc<turbine_kernels::loader::VisionModel>> {
        self.vision.as_ref()
    }

    /// This executor with the grammar engine of its model's vocabulary.
    pub fn with_grammars(mut self, grammars: Arc<turbine_kernels::grammar::Grammars>) -> Self {
        self.grammars = Some(grammars);
        self
    }

    /// The grammar engine of the model's vocabulary, if constrained decoding is served.
    pub fn grammars(&self) -> Option<&Arc<turbine_kernels::grammar::Grammars>> {
        self.grammars.as_ref()
    }

    /// Moves `backend` onto a new OS thread named `name`.
    pub fn spawn(name: &str, backend: Box<dyn Backend>) -> std::io::Result<Executor> {
        let (jobs, rx) = std_mpsc::channel::<Work>();
        thread::Builder::new()
            .name(name.to_string())
            .spawn(move || run_thread(backend, rx))?;
        Ok(Executor {
            runner: Runner::Thread(jobs),
            grammars: None,
            vision: None,
        })
    }

    /// Starts a new OS thread named `name` and builds the backend ON that thread with
    /// `build`, so a backend whose device context belongs to the thread that made it (CUDA)
    /// is created, used and dropped there. Blocks until the backend is built; its error is
    /// returned here and the thread ends.
    pub fn spawn_with(name: &str, build: BackendBuilder) -> Result<Executor, SpawnError> {
        let (ready_tx, ready_rx) = std_mpsc::sync_channel::<Result<(), BackendError>>(1);
        let (jobs, rx) = std_mpsc::channel::<Work>();
        thread::Builder::new()
            .name(name.to_string())
            .spawn(move || match build() {
                Ok(backend) => {
                    if ready_tx.send(Ok(())).is_ok() {
                        run_thread(backend, rx);
                    }
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })
            .map_err(SpawnError::Thread)?;
        ready_rx.recv().map_err(|_| SpawnError::Panicked)??;
        Ok(Executor {
            runner: Runner::Thread(jobs),
            grammars: None,
            vision: None,
        })
    }

    /// An executor whose steps are priced by `engine` and last that long on `clock`.
    pub fn simulated(engine: Arc<dyn SimulatedEngine>, clock: SharedClock) -> Executor {
        Executor {
            runner: Runner::Simulated {
                engine,
                clock,
                kv: None,
            },
            grammars: None,
            vision: None,
        }
    }

    /// A simulated executor whose KV pool has the shape `kv`, so a simulated prefill worker
    /// can export (placeholder bytes of the real size) and a decode worker import.
    pub fn simulated_with_kv(
        engine: Arc<dyn SimulatedEngine>,
        clock: SharedClock,
        kv: turbine_kernels::backend::KvLayout,
    ) -> Executor {
        Executor {
            runner: Runner::Simulated {
                engine,
                clock,
                kv: Some(kv),
            },
            grammars: None,
            vision: None,
        }
    }

    /// The simulated KV shape, if this is a simulated executor that has one.
    fn simulated_kv(&self) -> Option<&turbine_kernels::backend::KvLayout> {
        match &self.runner {
            Runner::Simulated { kv, .. } => kv.as_ref(),
            Runner::Thread(_) => None,
        }
    }

    /// Runs one step: the forward pass over every sequence, then a sample for each one
    /// that wants logits, in batch order (and prompt logprobs where asked).
    pub async fn step(&self, batch: Vec<ExecSeq>) -> Result<StepOutput, ExecError> {
        match &self.runner {
            Runner::Thread(jobs) => {
                let (reply, rx) = oneshot::channel();
                jobs.send(Job { batch, reply }.into())
                    .map_err(|_| ExecError::Stopped)?;
                rx.await.map_err(|_| ExecError::Stopped)?
            }
            Runner::Simulated { engine, clock, .. } => {
                let (duration, sampled) = engine.step(&batch);
                clock.sleep(duration).await;
                // A simulated engine computes no logits, so it serves no prompt logprobs.
                sampled.map(|sampled| StepOutput {
                    sampled,
                    prompt_logprobs: Vec::new(),
                })
            }
        }
    }

    /// Runs `f` on the backend, on the executor's thread, after the step in flight (if any).
    /// A simulated executor has no backend: [`ExecError::NoKvData`].
    pub async fn on_backend<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn Backend) -> R + Send + 'static,
    ) -> Result<R, ExecError> {
        let Runner::Thread(jobs) = &self.runner else {
            return Err(ExecError::NoKvData);
        };
        let (reply, rx) = oneshot::channel();
        let task: BackendTask = Box::new(move |backend| {
            let _ = reply.send(f(backend));
        });
        jobs.send(Work::OnBackend(task))
            .map_err(|_| ExecError::Stopped)?;
        rx.await.map_err(|_| ExecError::Stopped)
    }

    /// Copies the named KV blocks out of the pool, one chunk per layer (see
    /// `Backend::export_layer_chunks`): what the transfer plane serves.
    pub async fn export_layer_chunks(&self, ids: Vec<u32>) -> Result<Vec<Bytes>, ExecError> {
        if let Some(kv) = self.simulated_kv() {
            let chunk = turbine_kernels::kv_chunks::chunk_bytes(kv, ids.len());
            return Ok(vec![Bytes::from(vec![0; chunk]); kv.n_layers]);
        }
        Ok(self
            .on_backend(move |b| b.export_layer_chunks(&ids))
            .await??)
    }

    /// Writes exported layer chunks into the named blocks (see
    /// `Backend::import_layer_chunks`).
    pub async fn import_layer_chunks(
        &self,
        ids: Vec<u32>,
        chunks: Vec<Bytes>,
    ) -> Result<(), ExecError> {
        if self.simulated_kv().is_some() {
            return Ok(());
        }
        Ok(self
            .on_backend(move |b| b.import_layer_chunks(&ids, &chunks))
            .await??)
    }

    /// The backend's offer of its KV pool to other processes on this host (see
    /// `Backend::kv_ipc_pool`); `None` for a backend that cannot share device memory and
    /// for a simulated executor.
    pub async fn kv_ipc_pool(&self) -> Option<turbine_kernels::kv_ipc::KvIpcPool> {
        if self.simulated_kv().is_some() {
            return None;
        }
        self.on_backend(|b| b.kv_ipc_pool()).await.ok().flatten()
    }

    /// Copies blocks `src` of another process's pool into `dst`, device to device (see
    /// `Backend::pull_blocks_ipc`), or says why not.
    pub async fn pull_blocks_ipc(
        &self,
        offer: turbine_kernels::kv_ipc::KvIpcPool,
        src: Vec<u32>,
        dst: Vec<u32>,
    ) -> Result<turbine_kernels::kv_ipc::IpcPull, ExecError> {
        if self.simulated_kv().is_some() {
            return Ok(turbine_kernels::kv_ipc::IpcPull::Host(
                turbine_kernels::kv_ipc::HostReason::NotDevice,
            ));
        }
        Ok(self
            .on_backend(move |b| b.pull_blocks_ipc(&offer, &src, &dst))
            .await??)
    }

    /// The shape of the backend's KV pool.
    pub async fn kv_layout(&self) -> Result<turbine_kernels::backend::KvLayout, ExecError> {
        if let Some(kv) = self.simulated_kv() {
            return Ok(*kv);
        }
        self.on_backend(|b| b.kv_layout()).await
    }
}

fn run_thread(mut backend: Box<dyn Backend>, jobs: std_mpsc::Receiver<Work>) {
    let mut profile = StepProfile::from_env();
    let stall = crate::fault::StallHook::from_env();
    let host_sampling = std::env::var_os("TURBINE_HOST_SAMPLING").is_some_and(|v| v == "1");
    let mut idle_since = Instant::now();
    while let Ok(work) = jobs.recv() {
        let job = match work {
            Work::Step(job) => job,
            Work::OnBackend(task) => {
                task(backend.as_mut());
                continue;
            }
        };
        if let Some(hook) = &stall {
            hook.hold();
        }
        let started = Instant::now();
        let result = run_step(backend.as_mut(), &job.batch, host_sampling);
        if let Some(p) = profile.as_mut() {
            p.record(&job.batch, started - idle_since, started.elapsed());
        }
        // The caller may have gone away (worker shutting down): nothing to do then.
        let _ = job.reply.send(result);
        idle_since = Instant::now();
    }
}

/// Per-step host timeline, printed to stderr every `TURBINE_STEP_PROFILE` steps (a
/// benchmarking aid; off unless set): mean time the executor thread waited for the step
/// (the worker loop's bookkeeping between two steps) and mean time inside the backend
/// (forward pass, sampling and copies), per batch-size bucket.
struct StepProfile {
    every: u64,
    steps: u64,
    /// (bucket upper bound, steps, rows, wait, busy)
    buckets: Vec<(usize, u64, u64, Duration, Duration)>,
}

impl StepProfile {
    fn from_env() -> Option<StepProfile> {
        let every = std::env::var("TURBINE_STEP_PROFILE")
            .ok()?
            .parse::<u64>()
            .ok()?;
        (every > 0).then(|| StepProfile {
            every,
            steps: 0,
            buckets: [1, 8, 32, 64, 128, 256, usize::MAX]
                .iter()
                .map(|&b| (b, 0, 0, Duration::ZERO, Duration::ZERO))
                .collect(),
        })
    }

    fn record(&mut self, batch: &[ExecSeq], wait: Duration, busy: Duration) {
        let tokens: usize = batch.iter().map(|e| e.seq.tokens.len()).sum();
        if let Some(b) = self.buckets.iter_mut().find(|b| tokens <= b.0) {
            b.1 += 1;
            b.2 += batch.len() as u64;
            b.3 += wait;
            b.4 += busy;
        }
        self.steps += 1;
        if self.steps % self.every == 0 {
            for (bound, steps, rows, wait, busy) in &mut self.buckets {
                if *steps > 0 {
                    let n = *steps as f64;
                    eprintln!(
                        "step-profile tokens<={bound}: {steps} steps, {:.1} seqs/step, wait {:.3} ms, backend {:.3} ms",
                        *rows as f64 / n,
                        wait.as_secs_f64() * 1e3 / n,
                        busy.as_secs_f64() * 1e3 / n
                    );
                }
                (*steps, *rows, *wait, *busy) = (0, 0, Duration::ZERO, Duration::ZERO);
            }
        }
    }
}

fn run_step(
    backend: &mut dyn Backend,
    batch: &[ExecSeq],
    host_sampling: bool,
) -> Result<StepOutput, ExecError> {
    let steps: Vec<SeqStep<'_>> = batch
        .iter()
        .map(|e| SeqStep {
            tokens: &e.seq.tokens,
            start_pos: e.seq.start_pos,
            block_table: &e.seq.block_table,
            want_logits: e.seq.want_logits,
        })
        .collect();
    let splices: Vec<Splice<'_>> = batch
        .iter()
        .enumerate()
        .filter_map(|(i, e)| e.embeds.as_ref().map(|emb| (i, e, emb)))
        .flat_map(|(i, e, emb)| {
            emb.splices(e.seq.start_pos, e.seq.tokens.len())
                .into_iter()
                .map(move |s| Splice {
                    step: i,
                    offset: s.offset,
                    rows: s.rows,
                    embeds: s.embeds,
                })
        })
        .collect();
    let wanted: Vec<&ExecSeq> = batch.iter().filter(|e| e.seq.want_logits).collect();
    let constrained = wanted
        .iter()
        .any(|e| e.sample.as_ref().is_some_and(|s| s.allowed.is_some()));
    let mut rows = Vec::with_capacity(wanted.len());
    for e in &wanted {
        let Some(spec) = &e.sample else {
            return Err(ExecError::Sampling {
                request: e.seq.request,
                reason: "no sampling parameters".into(),
            });
        };
        rows.push(sample_row(spec));
    }
    let every: Vec<bool> = batch
        .iter()
        .map(|e| e.seq.prompt_logprobs.is_some())
        .collect();
    let mut prompt_logprobs = Vec::new();
    let drawn = if every.contains(&true) {
        if let Some(s) = splices.first() {
            // Every position's logits come from `forward_every`, which takes no splices.
            return Err(ExecError::Sampling {
                request: batch[s.step].seq.request,
                reason: "prompt logprobs (echo with logprobs) are not supported with images".into(),
            });
        }
        // Prompt logprobs: every position's logits, read here; each sampling row is the
        // last of its step's rows, sampled on the host.
        let all = backend.forward_every(&steps, &every)?;
        let (logits, prompts) = split_every(&all, batch).map_err(|reason| ExecError::Sampling {
            request: batch[0].seq.request,
            reason,
        })?;
        prompt_logprobs = prompts;
        let masks = wait_masks(&wanted)?;
        for (row, mask) in rows.iter_mut().zip(&masks) {
            row.allowed = mask.as_deref();
        }
        ksampling::sample_rows_on_host(&logits, &rows)
    } else if host_sampling || constrained || !splices.is_empty() {
        let logits = backend.forward_spliced(&steps, &splices)?;
        if logits.rows() < rows.len() {
            return Err(ExecError::Sampling {
                request: wanted[logits.rows()].seq.request,
                reason: "backend returned too few logits rows".into(),
            });
        }
        let masks = wait_masks(&wanted)?;
        for (row, mask) in rows.iter_mut().zip(&masks) {
            row.allowed = mask.as_deref();
        }
        ksampling::sample_rows_on_host(&logits, &rows)
    } else {
        backend.forward_sample(&steps, &rows)?
    };
    let mut out = Vec::with_capacity(wanted.len());
    for (i, e) in wanted.iter().enumerate() {
        let request = e.seq.request;
        let sampled = drawn
            .get(i)
            .ok_or_else(|| ExecError::Sampling {
                request,
                reason: "backend returned too few samples".into(),
            })?
            .as_ref()
            .map_err(|err| ExecError::Sampling {
                request,
                reason: err.to_string(),
            })?;
        let asked = e.sample.as_ref().and_then(|s| s.logprobs);
        out.push(SampledToken {
            request,
            token: sampled.token,
            logprob: asked.map(|_| TokenLogprob {
                token_id: sampled.token,
                logprob: sampled.logprob.unwrap_or(f32::NEG_INFINITY),
                top: sampled.top_logprobs.clone(),
            }),
        });
    }
    Ok(StepOutput {
        sampled: out,
        prompt_logprobs,
    })
}

/// The grammar masks of the sampled rows, in order. They were computed while the forward
/// pass ran; this waits for the last of them.
fn wait_masks(wanted: &[&ExecSeq]) -> Result<Vec<Option<Vec<u32>>>, ExecError> {
    let mut masks = Vec::with_capacity(wanted.len());
    for e in wanted {
        let mask = match e.sample.as_ref().and_then(|s| s.allowed.as_ref()) {
            Some(slot) => Some(slot.wait().map_err(|reason| ExecError::Sampling {
                request: e.seq.request,
                reason: format!("grammar: {reason}"),
            })?),
            None => None,
        };
        masks.push(mask);
    }
    Ok(masks)
}

/// The sampling rows of a step and the prompt logprobs of its entries that asked.
type EveryRows = (KLogits, Vec<PromptLogprobsChunk>);

/// Splits `Backend::forward_every`'s rows into the sampling rows (one per step that wants
/// logits: for an entry with `prompt_logprobs`, the last of its rows) and, per such entry,
/// the logprobs of the prompt tokens its rows predict: row `j` of an entry predicts its
/// token `j + 1`, and its last row the prompt token after the chunk
/// (`PromptLogprobsAsk::next`) unless that row is sampled.
fn split_every(all: &KLogits, batch: &[ExecSeq]) -> Result<EveryRows, String> {
    let mut sampling = Vec::new();
    let mut prompts = Vec::new();
    let mut r = 0;
    let row = |r: usize| {
        all.row(r)
            .ok_or_else(|| "the backend returned too few logits rows".to_string())
    };
    for e in batch {
        if let Some(ask) = e.seq.prompt_logprobs {
            let tokens = &e.seq.tokens;
            let predicted = tokens.iter().skip(1).copied().chain(ask.next);
            let mut lps = Vec::with_capacity(tokens.len());
            for (j, next) in predicted.enumerate() {
                let (logprob, top) = ksampling::token_logprob(row(r + j)?, next, ask.top as usize);
                lps.push(TokenLogprob {
                    token_id: next,
                    logprob,
                    top,
                });
            }
            r += tokens.len();
            if e.seq.want_logits {
                sampling.extend_from_slice(row(r - 1)?);
            }
            prompts.push(PromptLogprobsChunk {
                request: e.seq.request,
                logprobs: lps,
            });
        } else if e.seq.want_logits {
            sampling.extend_from_slice(row(r)?);
            r += 1;
        }
    }
    Ok((
        KLogits {
            vocab: all.vocab,
            data: sampling,
        },
        prompts,
    ))
}

/// Seed of the stream that draws token number `index` of a request seeded with `seed`.
fn step_seed(seed: u64, index: u32) -> u64 {
    // splitmix64 of the pair: distinct, well-mixed streams per position.
    let mut z = seed ^ (u64::from(index).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The kernels' description of one row's draw.
fn sample_row(spec: &SampleSpec) -> ksampling::SampleRow<'_> {
    let p = &spec.params;
    ksampling::SampleRow {
        params: ksampling::SamplingParams {
            temperature: p.temperature,
            top_k: p.top_k as usize,
            top_p: p.top_p,
            min_p: p.min_p,
            repetition_penalty: p.repetition_penalty,
            seed: step_seed(spec.seed, spec.sample_index),
            top_logprobs: spec.logprobs.unwrap_or(0) as usize,
        },
        history: &spec.history,
        bias: &spec.bias,
        allowed: None,
        logprobs: spec.logprobs.is_some(),
    }
}

#[cfg(test)]
mod tests {
    use super::{split_every, step_seed, ExecSeq, KLogits};
    use crate::ids::RequestId;
    use crate::worker::{PromptLogprobsAsk, ScheduledSeq};
    use turbine_kernels::sampling::token_logprob;

    fn entry(
        id: u64,
        tokens: &[u32],
        want_logits: bool,
        ask: Option<PromptLogprobsAsk>,
    ) -> ExecSeq {
        ExecSeq {
            seq: ScheduledSeq {
                request: RequestId(id),
                tokens: tokens.to_vec(),
                start_pos: 0,
                block_table: vec![0],
                want_logits,
                sample_index: 0,
                prompt_logprobs: ask,
            },
            sample: None,
            embeds: None,
        }
    }

    #[test]
    fn every_rows_split_into_prompt_logprobs_and_sampling_rows() {
        let vocab = 4;
        // Row r favours token r % 4, so each row is told apart by its logprobs.
        let row = |r: usize| -> Vec<f32> {
            (0..vocab)
                .map(|t| if t == r % 4 { 2.0 } else { r as f32 * 0.1 })
                .collect()
        };
        // A middle chunk (3 rows, no sample), a decode (1 row), a last chunk (2 rows, sampled).
        let batch = [
            entry(
                1,
                &[5, 1, 2],
                false,
                Some(PromptLogprobsAsk {
                    top: 1,
                    next: Some(3),
                }),
            ),
            entry(2, &[0], true, None),
            entry(
                3,
                &[2, 0],
                true,
                Some(PromptLogprobsAsk { top: 0, next: None }),
            ),
        ];
        let all = KLogits {
            vocab,
            data: (0..6).flat_map(row).collect(),
        };
        let (sampling, prompts) = split_every(&all, &batch).unwrap();
        assert_eq!(
            sampling.data,
            [row(3), row(5)].concat(),
            "the decode's row, then the last chunk's last"
        );
        assert_eq!(prompts.len(), 2);
        let (a, b) = (&prompts[0], &prompts[1]);
        assert_eq!((a.request, b.request), (RequestId(1), RequestId(3)));
        // Chunk 1 predicts its tokens 1, 2 and then the next chunk's first, 3.
        let want: Vec<(u32, f32)> = [(1, 0), (2, 1), (3, 2)]
            .iter()
            .map(|&(t, r)| (t, token_logprob(&row(r), t, 1).0))
            .collect();
        let got: Vec<(u32, f32)> = a.logprobs.iter().map(|l| (l.token_id, l.logprob)).collect();
        assert_eq!(got, want);
        assert!(a.logprobs.iter().all(|l| l.top.len() == 1));
        // The last chunk predicts only its token 0 (its last row is sampled).
        assert_eq!(b.logprobs.len(), 1);
        assert_eq!(b.logprobs[0].token_id, 0);
        assert_eq!(b.logprobs[0].logprob, token_logprob(&row(4), 0, 0).0);
        assert!(b.logprobs[0].top.is_empty());
        // Too few rows is an error, not a panic.
        let short = KLogits {
            vocab,
            data: row(0),
        };
        assert!(split_every(&short, &batch).is_err());
    }

    #[test]
    fn step_seeds_differ_per_position_and_seed() {
        let a: Vec<u64> = (0..100).map(|i| step_seed(1, i)).collect();
        let mut s = a.clone();
        s.sort_unstable();
        s.dedup();
        assert_eq!(s.len(), a.len());
        assert_ne!(step_seed(1, 0), step_seed(2, 0));
    }
}
