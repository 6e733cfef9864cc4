//! KV blocks between two real CPU executors: prefill-only on A, blocks exported layer by
//! layer over the transfer plane (same process, and across sockets), imported into B's
//! blocks, decode on B. The greedy tokens must equal running everything on A.
//!
//! Uses the default model (SmolLM2-135M-Instruct Q4_1); without it the test prints SKIP.

use std::time::Duration;

use turbine_actors::disagg::kv_transfer::{self, KvTransferError};
use turbine_actors::executor::{ExecSeq, Executor, SampleSpec};
use turbine_actors::ids::{RequestId, TokenId};
use turbine_actors::protocol::{PreprocessedRequest, SamplingParams, StopConditions};
use turbine_actors::worker::Scheduler;
use turbine_kernels::cpu::{CpuBackend, CpuBackendOptions};
use turbine_kernels::loader::LoadedModel;
use turbine_runtime::transfer::{TransferConfig, TransferHub, TransferPlane};
use turbine_runtime::{MetricsRegistry, TokioClock};

use crate::worker_support::{self as support};

const BLOCK: u32 = 16;
const MAX_TOKENS: u32 = 12;

fn executor(m: &LoadedModel, name: &str) -> Executor {
    let backend = CpuBackend::new(
        m.config.clone(),
        &m.weights,
        CpuBackendOptions {
            num_blocks: 64,
            block_size: BLOCK as usize,
            threads: 1,
        },
    )
    .expect("backend");
    Executor::spawn(name, Box::new(backend)).expect("thread")
}

fn scheduler() -> Scheduler {
    support::scheduler(64, BLOCK, 256, 4, 2048)
}

fn request(prompt: &[TokenId]) -> PreprocessedRequest {
    PreprocessedRequest {
        id: RequestId(1),
        token_ids: prompt.to_vec(),
        sampling: SamplingParams::greedy(),
        stop: StopConditions {
            max_tokens: MAX_TOKENS,
            stop_token_ids: vec![],
            ignore_eos: true,
        },
        logprobs: None,
        salt: 0,
        generated_before: 0,
        images: Vec::new(),
        embeds: None,
    }
}

/// A prompt of 3 blocks and a bit (so the last block is partial).
fn prompt() -> Vec<TokenId> {
    (0..53).map(|i| 300 + (i * 37) % 4000).collect()
}

/// Runs steps on `exec` until nothing runs or waits; returns the tokens streamed.
async fn drive(s: &mut Scheduler, exec: &Executor) -> Vec<TokenId> {
    let mut out = Vec::new();
    for t in 0..200u64 {
        let now = Duration::from_millis(t);
        let plan = s.schedule(now).unwrap();
        if plan.is_empty() {
            break;
        }
        let batch = plan
            .seqs
            .iter()
            .map(|seq| ExecSeq {
                seq: seq.clone(),
                sample: seq.want_logits.then(|| SampleSpec {
                    params: SamplingParams::greedy(),
                    seed: 0,
                    sample_index: seq.sample_index,
                    history: Vec::new(),
                    bias: Vec::new(),
                    allowed: None,
                    logprobs: None,
                }),
                embeds: None,
            })
            .collect();
        let sampled = exec.step(batch).await.expect("step").sampled;
        for (_, o) in s.on_step_done(&plan, &sampled, now).unwrap() {
            out.extend(o.token_ids);
        }
        s.check_invariants().unwrap();
    }
    out
}

/// P/D from A to B over `owner` -> `consumer`; `reference` is the aggregated run on A.
async fn prefill_there_decode_here(
    m: &LoadedModel,
    (a, b): (&Executor, &Executor),
    reference: &[TokenId],
    owner: &TransferPlane,
    consumer: &TransferPlane,
) {
    let p = prompt();
    let mut pf = scheduler();
    pf.add_prefill_only(request(&p), Duration::ZERO).unwrap();
    let first = drive(&mut pf, a).await;
    let held = pf.take_prefilled().remove(0);
    assert_eq!(first, vec![held.first_token]);
    assert_eq!(held.blocks.len(), 4);
    let export = kv_transfer::export_blocks(a, owner, &held.blocks, None)
        .await
        .expect("export");
    // The plane holds a copy: A's blocks can go back to its pool at once.
    assert!(pf.release_held(RequestId(1)));
    let bytes = export.layout.total_bytes();
    assert_eq!(bytes, 4 * export.layout.block_bytes());
    assert_eq!(export.descriptor.layout.chunks.len(), m.config.n_layers);

    let mut dec = scheduler();
    let adm = dec
        .add_with_remote_kv(request(&p), held.first_token, Duration::ZERO)
        .unwrap();
    assert_eq!(adm.cached_blocks, 0);
    let moved = kv_transfer::import_blocks(b, consumer, &export, 0, adm.import_into())
        .await
        .expect("import");
    assert!(!moved.device_copy, "CPU executors offer no device path");
    assert_eq!(moved.bytes as usize, bytes);
    assert!(dec.kv_imported(RequestId(1)));
    let mut tokens = first;
    tokens.extend(drive(&mut dec, b).await);
    assert_eq!(tokens, reference, "P/D greedy must equal aggregated");
    assert_eq!(owner.pinned(), (0, 0), "pulled: unpinned");

    // A second pull of the same export is refused with a typed error (decode falls back).
    let again = kv_transfer::import_blocks(b, consumer, &export, 0, adm.import_into()).await;
    assert!(
        matches!(again, Err(KvTransferError::Transfer(_))),
        "{again:?}"
    );

    // The same prompt again: B caches its 3 full blocks, so only the partial last block
    // crosses (a quarter of the bytes), and the tokens are still the same.
    let mut second = request(&p);
    second.id = RequestId(2);
    pf.add_prefill_only(second.clone(), Duration::ZERO).unwrap();
    let first = drive(&mut pf, a).await;
    let held = pf.take_prefilled().remove(0);
    let export = kv_transfer::export_blocks(a, owner, &held.blocks, None)
        .await
        .expect("export");
    pf.release_held(RequestId(2));
    let adm = dec
        .add_with_remote_kv(second, held.first_token, Duration::ZERO)
        .unwrap();
    assert_eq!((adm.cached_blocks, adm.import_into().len()), (3, 1));
    let skip = adm.cached_blocks;
    let moved = kv_transfer::import_blocks(b, consumer, &export, skip, adm.import_into())
        .await
        .expect("import of the uncached tail");
    assert_eq!(moved.bytes as usize, export.layout.block_bytes());
    assert!(dec.kv_imported(RequestId(2)));
    let mut tokens = first;
    tokens.extend(drive(&mut dec, b).await);
    assert_eq!(
        tokens, reference,
        "a partly cached P/D run equals aggregated too"
    );
    assert_eq!(owner.pinned(), (0, 0));
}

fn planes_cfg() -> TransferConfig {
    TransferConfig {
        max_piece_bytes: 256 << 10,
        ..TransferConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefill_on_a_decode_on_b_matches_aggregated_in_process_and_across_sockets() {
    let Some(m) = support::default_model() else {
        return;
    };
    let (a, b) = (executor(&m, "exec-a"), executor(&m, "exec-b"));
    let mut agg = scheduler();
    agg.add_request(request(&prompt()), Duration::ZERO).unwrap();
    let reference = drive(&mut agg, &a).await;
    assert_eq!(reference.len(), MAX_TOKENS as usize);

    let reg = MetricsRegistry::new();
    let clock = TokioClock::shared();
    // Same process: one hub, direct slices of the pinned buffer.
    let hub = TransferHub::new();
    let owner = TransferPlane::in_memory("prefill", planes_cfg(), clock.clone(), &reg, &hub);
    let consumer = TransferPlane::in_memory("decode", planes_cfg(), clock.clone(), &reg, &hub);
    prefill_there_decode_here(&m, (&a, &b), &reference, &owner, &consumer).await;

    // Across processes: two hubs, ZeroMQ frames over loopback.
    let owner = TransferPlane::start(planes_cfg(), clock.clone(), &reg, &TransferHub::new())
        .await
        .unwrap();
    let consumer = TransferPlane::start(planes_cfg(), clock, &reg, &TransferHub::new())
        .await
        .unwrap();
    prefill_there_decode_here(&m, (&a, &b), &reference, &owner, &consumer).await;
}

/// Set when dropped: stands for the prefill worker's "free the held blocks" message.
struct Dropped(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for Dropped {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Waits (bounded) until `flag` is set: the owner unpins a pulled buffer just after the
/// consumer has its last piece.
async fn until_set(flag: &std::sync::atomic::AtomicBool) -> bool {
    for _ in 0..500 {
        if flag.load(std::sync::atomic::Ordering::SeqCst) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// An export that offers a device path (what a GPU prefill worker sends: its pool's IPC
/// offer, the blocks held until the plane unpins the buffer): the guard lives exactly as
/// long as the pin, through a pull and through a discard; a CPU decode executor cannot map
/// device memory, so it takes the host path, says why, and decodes like aggregated serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offered_device_path_holds_the_blocks_until_unpinned_and_cpu_takes_the_host_path() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use turbine_kernels::kv_ipc::ProcessPlace;
    let Some(m) = support::default_model() else {
        return;
    };
    let (a, b) = (executor(&m, "exec-a"), executor(&m, "exec-b"));
    let mut agg = scheduler();
    agg.add_request(request(&prompt()), Duration::ZERO).unwrap();
    let reference = drive(&mut agg, &a).await;

    let reg = MetricsRegistry::new();
    let clock = TokioClock::shared();
    let hub = TransferHub::new();
    let owner = TransferPlane::in_memory("prefill", planes_cfg(), clock.clone(), &reg, &hub);
    let consumer = TransferPlane::in_memory("decode", planes_cfg(), clock, &reg, &hub);
    let layout = a.kv_layout().await.unwrap();
    let offer = support::stand_in_offer(&layout, ProcessPlace::here(), [0; 16]);

    let mut pf = scheduler();
    pf.add_prefill_only(request(&prompt()), Duration::ZERO)
        .unwrap();
    let first = drive(&mut pf, &a).await;
    let held = pf.take_prefilled().remove(0);
    let freed = Arc::new(AtomicBool::new(false));
    let guard = Box::new(Dropped(freed.clone()));
    let export = kv_transfer::export_blocks(&a, &owner, &held.blocks, Some((offer.clone(), guard)))
        .await
        .expect("export");
    let ids: Vec<u32> = held.blocks.iter().map(|b| b.0).collect();
    assert_eq!(export.ipc.as_ref().map(|i| &i.blocks), Some(&ids));
    assert!(!freed.load(Ordering::SeqCst), "held while pinned");

    let mut dec = scheduler();
    let adm = dec
        .add_with_remote_kv(request(&prompt()), held.first_token, Duration::ZERO)
        .unwrap();
    let moved = kv_transfer::import_blocks(&b, &consumer, &export, 0, adm.import_into())
        .await
        .expect("import");
    assert!(!moved.device_copy);
    assert_eq!(moved.host_reason, Some("not_device"));
    assert_eq!(moved.bytes as usize, export.layout.total_bytes());
    assert!(
        until_set(&freed).await,
        "pulled: the held blocks are let go"
    );
    assert!(pf.release_held(RequestId(1)));
    assert!(dec.kv_imported(RequestId(1)));
    let mut tokens = first;
    tokens.extend(drive(&mut dec, &b).await);
    assert_eq!(
        tokens, reference,
        "the host path after an offer equals aggregated"
    );

    // Discarded (the decode worker had no room): let go too.
    let freed = Arc::new(AtomicBool::new(false));
    let guard = Box::new(Dropped(freed.clone()));
    let export = kv_transfer::export_blocks(&a, &owner, &held.blocks, Some((offer, guard)))
        .await
        .expect("export");
    assert!(!freed.load(Ordering::SeqCst));
    consumer.discard(&export.descriptor).await.unwrap();
    assert!(
        until_set(&freed).await,
        "discarded: the held blocks are let go"
    );
    assert_eq!(owner.pinned(), (0, 0));
}
