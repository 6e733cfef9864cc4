//! Shared helpers for the worker tests: request builders, a deterministic fake model and a
//! driver loop that plays the role of the worker actor.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::Duration;
use turbine_actors::ids::{RequestId, TokenId};
use turbine_actors::kv::hash::BlockSize;
use turbine_actors::protocol::{
    FinishReason, PreprocessedRequest, SamplingParams, StopConditions, TokenOutput,
};
use turbine_actors::worker::{
    BlockManager, BlockManagerConfig, SampledToken, Scheduler, SchedulerConfig, StepPlan,
    TokenStream,
};
use turbine_kernels::backend::KvLayout;
use turbine_kernels::kv_ipc::{IpcPoolShape, KvIpcPool, ProcessPlace, IPC_HANDLE_BYTES};
use turbine_kernels::loader::{default_model_path, load_model, LoadedModel};

pub fn bs(n: u32) -> BlockSize {
    BlockSize::new(n).unwrap()
}

pub fn at(step: u64) -> Duration {
    Duration::from_millis(step)
}

pub fn request(id: u64, prompt: Vec<TokenId>, max_tokens: u32) -> PreprocessedRequest {
    PreprocessedRequest {
        id: RequestId(id),
        token_ids: prompt,
        sampling: SamplingParams::greedy(),
        stop: StopConditions {
            max_tokens,
            stop_token_ids: vec![],
            ignore_eos: false,
        },
        logprobs: None,
        salt: 0,
        generated_before: 0,
        images: Vec::new(),
        embeds: None,
    }
}

/// `len` distinct-ish tokens starting from `seed` (1000 + ...), never colliding with the
/// fake model's outputs (< 1000) so prompts are recognisable.
pub fn prompt(seed: u32, len: usize) -> Vec<TokenId> {
    (0..len as u32).map(|i| 1000 + seed * 10_000 + i).collect()
}

pub fn scheduler(
    num_blocks: u32,
    block_size: u32,
    budget: usize,
    max_num_seqs: usize,
    max_model_len: usize,
) -> Scheduler {
    let blocks = BlockManager::new(BlockManagerConfig {
        num_blocks,
        block_size: bs(block_size),
        enable_prefix_caching: true,
    });
    Scheduler::new(
        SchedulerConfig {
            max_num_batched_tokens: budget,
            max_num_seqs,
            max_model_len,
            enable_chunked_prefill: true,
            contended_prefill_chunk: usize::MAX,
        },
        blocks,
    )
    .unwrap()
}

/// The default model (SmolLM2-135M-Instruct Q4_1), or `None` with a SKIP line when it is
/// not downloaded (the real-model tests then pass vacuously).
pub fn default_model() -> Option<LoadedModel> {
    let path = default_model_path();
    if !path.exists() {
        println!("SKIP: no model at {}", path.display());
        return None;
    }
    Some(load_model(&path).expect("the default model loads"))
}

/// Every token of a worker's `stream` until it finishes (bounded: a test never hangs).
pub async fn tokens(mut stream: TokenStream) -> Vec<TokenId> {
    use futures::StreamExt;
    let mut out = Vec::new();
    loop {
        let item = tokio::time::timeout(Duration::from_secs(120), stream.next())
            .await
            .expect("a token within two minutes");
        let Some(item) = item else { break };
        out.extend(item.token_ids);
        if item.finish.is_some() {
            break;
        }
    }
    out
}

/// A device-copy offer for a pool of `layout` as a GPU backend would make it, from `place`
/// on device `device_uuid` (for tests whose backends are CPU stand-ins).
pub fn stand_in_offer(layout: &KvLayout, place: ProcessPlace, device_uuid: [u8; 16]) -> KvIpcPool {
    KvIpcPool {
        place,
        device_uuid,
        handle: vec![0; IPC_HANDLE_BYTES],
        bytes: 1 << 30,
        base: 0,
        shape: IpcPoolShape::of(layout),
        k: vec![0; layout.n_layers],
        v: vec![0; layout.n_layers],
    }
}

/// A deterministic "model": the next token is a hash of the whole sequence so far (prompt and
/// generated), so any divergence in what the scheduler feeds shows up in the output.
pub fn fake_next_token(history: &[TokenId]) -> TokenId {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for t in history {
        h ^= u64::from(*t);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % 997) as TokenId
}

/// Samples every `want_logits` entry of `plan` with the fake model, checking along the way
/// that the plan is self-consistent (block table covers the positions, tokens are the
/// sequence's own).
pub fn sample(sched: &Scheduler, plan: &StepPlan) -> Vec<SampledToken> {
    let block_size = sched.block_manager().block_size().as_usize();
    let mut out = Vec::new();
    for s in &plan.seqs {
        let history = sched.token_history(s.request).unwrap();
        let end = s.start_pos + s.tokens.len();
        assert!(end <= history.len());
        assert_eq!(
            &history[s.start_pos..end],
            s.tokens.as_slice(),
            "fed tokens"
        );
        assert_eq!(
            s.block_table.len(),
            end.div_ceil(block_size),
            "the table covers exactly the positions"
        );
        assert_eq!(s.want_logits, end == history.len());
        if s.want_logits {
            out.push(SampledToken::new(s.request, fake_next_token(history)));
        }
    }
    out
}

/// What one request produced, as seen on its output stream.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stream {
    pub tokens: Vec<TokenId>,
    pub finish: Option<FinishReason>,
    pub cached_tokens: Option<u32>,
    pub items: usize,
}

/// Applies one step's outputs to the streams, asserting that nothing arrives after a finish
/// and that `cached_tokens` comes exactly on the first item.
pub fn record(streams: &mut BTreeMap<RequestId, Stream>, outputs: Vec<(RequestId, TokenOutput)>) {
    for (id, out) in outputs {
        let s = streams.entry(id).or_default();
        assert!(s.finish.is_none(), "{id} got output after finishing");
        assert_eq!(
            out.cached_tokens.is_some(),
            s.items == 0,
            "{id} cached_tokens placement"
        );
        if s.items == 0 {
            s.cached_tokens = out.cached_tokens;
        }
        s.items += 1;
        s.tokens.extend(out.token_ids);
        s.finish = out.finish;
    }
}

/// One full step: schedule, "forward", sample, complete. Returns the plan.
pub fn step(
    sched: &mut Scheduler,
    streams: &mut BTreeMap<RequestId, Stream>,
    now: Duration,
) -> StepPlan {
    let plan = sched.schedule(now).unwrap();
    let sampled = sample(sched, &plan);
    let outputs = sched.on_step_done(&plan, &sampled, now).unwrap();
    record(streams, outputs);
    sched.check_invariants().unwrap();
    plan
}

/// Steps until idle (at most `max_steps` more), adding to `streams`.
pub fn run_until_idle(
    sched: &mut Scheduler,
    streams: &mut BTreeMap<RequestId, Stream>,
    max_steps: u64,
) {
    let mut t = 0;
    while !sched.is_idle() {
        assert!(t < max_steps, "did not finish in {max_steps} steps");
        step(sched, streams, at(t));
        t += 1;
    }
}

/// Steps until idle (bounded), returning the streams of everything that produced output.
pub fn run_to_completion(sched: &mut Scheduler, max_steps: u64) -> BTreeMap<RequestId, Stream> {
    let mut streams = BTreeMap::new();
    run_until_idle(sched, &mut streams, max_steps);
    streams
}

/// The tokens the fake model generates for `prompt` with no scheduling at all.
pub fn reference_generation(prompt: &[TokenId], max_tokens: usize) -> Vec<TokenId> {
    let mut seq = prompt.to_vec();
    let mut out = Vec::new();
    while out.len() < max_tokens {
        let t = fake_next_token(&seq);
        seq.push(t);
        out.push(t);
    }
    out
}
