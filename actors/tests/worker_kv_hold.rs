//! A prefill worker whose backend offers its KV pool for device copies (what a GPU worker's
//! CUDA backend does: `Backend::kv_ipc_pool`) keeps a request's blocks after exporting them,
//! until the decode worker's pull unpins the descriptor; then they go back to the pool. The
//! decode worker here is a CPU one: it cannot map device memory, so it pulls the layer
//! chunks (the host path), says why in its import report, and decodes like aggregated
//! serving. A descriptor nobody pulls lets its blocks go when it expires. A decode worker
//! whose backend can map the pool (a stand-in copying from the prefill side's shared CPU
//! pool) takes the device path: no chunks pulled, an empty confirming pull that frees the
//! hold, the same tokens.
//!
//! Real components: CPU executors with the default model (SmolLM2-135M-Instruct Q4_1; without
//! it the test prints SKIP), the worker loops, in-memory transfer planes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use turbine_actors::disagg::wire::ImportOutcome;
use turbine_actors::executor::Executor;
use turbine_actors::ids::{RequestId, TokenId, WorkerId};
use turbine_actors::protocol::{PreprocessedRequest, SamplingParams, StopConditions};
use turbine_actors::worker::{EngineTime, WorkerHandle};
use turbine_kernels::backend::{Backend, BackendError, KvLayout, Logits, SeqStep, Splice};
use turbine_kernels::cpu::{CpuBackend, CpuBackendOptions};
use turbine_kernels::kv_ipc::{HostReason, IpcPull, KvIpcPool, ProcessPlace};
use turbine_kernels::loader::LoadedModel;
use turbine_kernels::model::ModelConfig;
use turbine_kernels::sampling::{SampleRow, SampledToken, SamplingError};
use turbine_runtime::transfer::{TransferConfig, TransferHub, TransferPlane};
use turbine_runtime::{MetricsRegistry, SharedClock, TokioClock};

use crate::worker_support::{self as support, tokens};

const BLOCK: u32 = 16;
const MAX_TOKENS: u32 = 6;

/// A CPU backend standing in for a GPU one on either side of a device copy: shared, so a
/// decode-side stand-in can "map" the prefill side's pool as CUDA IPC maps another
/// process's. `offers`: it offers its pool (`Backend::kv_ipc_pool`, as another process's,
/// so the consumer's decision never takes it for its own); `peer`: it copies from that pool
/// (`Backend::pull_blocks_ipc`) instead of refusing as a CPU backend does.
struct StandIn {
    cpu: Arc<Mutex<CpuBackend>>,
    config: ModelConfig,
    offers: bool,
    peer: Option<Arc<Mutex<CpuBackend>>>,
}

impl StandIn {
    fn cpu(&self) -> std::sync::MutexGuard<'_, CpuBackend> {
        self.cpu.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Backend for StandIn {
    fn config(&self) -> &ModelConfig {
        &self.config
    }
    fn kv_layout(&self) -> KvLayout {
        self.cpu().kv_layout()
    }
    fn forward(&mut self, batch: &[SeqStep<'_>]) -> Result<Logits, BackendError> {
        self.cpu().forward(batch)
    }
    fn forward_spliced(
        &mut self,
        batch: &[SeqStep<'_>],
        splices: &[Splice<'_>],
    ) -> Result<Logits, BackendError> {
        self.cpu().forward_spliced(batch, splices)
    }
    fn forward_every(
        &mut self,
        batch: &[SeqStep<'_>],
        every: &[bool],
    ) -> Result<Logits, BackendError> {
        self.cpu().forward_every(batch, every)
    }
    fn forward_sample(
        &mut self,
        batch: &[SeqStep<'_>],
        rows: &[SampleRow<'_>],
    ) -> Result<Vec<Result<SampledToken, SamplingError>>, BackendError> {
        self.cpu().forward_sample(batch, rows)
    }
    fn copy_blocks(&mut self, src_dst: &[(u32, u32)]) -> Result<(), BackendError> {
        self.cpu().copy_blocks(src_dst)
    }
    fn export_blocks(&self, ids: &[u32]) -> Result<Vec<u8>, BackendError> {
        self.cpu().export_blocks(ids)
    }
    fn import_blocks(&mut self, ids: &[u32], data: &[u8]) -> Result<(), BackendError> {
        self.cpu().import_blocks(ids, data)
    }
    fn export_layer_chunks(&self, ids: &[u32]) -> Result<Vec<Bytes>, BackendError> {
        self.cpu().export_layer_chunks(ids)
    }
    fn import_layer_chunks(&mut self, ids: &[u32], chunks: &[Bytes]) -> Result<(), BackendError> {
        self.cpu().import_layer_chunks(ids, chunks)
    }
    fn kv_ipc_pool(&self) -> Option<KvIpcPool> {
        if !self.offers {
            return None;
        }
        let mut place = ProcessPlace::here();
        place.pid = place.pid.wrapping_add(1);
        Some(support::stand_in_offer(
            &self.cpu().kv_layout(),
            place,
            [9; 16],
        ))
    }
    fn pull_blocks_ipc(
        &mut self,
        _offer: &KvIpcPool,
        src: &[u32],
        dst: &[u32],
    ) -> Result<IpcPull, BackendError> {
        let Some(peer) = &self.peer else {
            return Ok(IpcPull::Host(HostReason::NotDevice));
        };
        // The "device copy": straight from the owner's pool, which holds the blocks.
        let bytes = peer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .export_blocks(src)?;
        self.cpu().import_blocks(dst, &bytes)?;
        Ok(IpcPull::Copied(Duration::from_micros(1)))
    }
}

/// What stands behind a test worker's executor.
enum Side {
    /// A plain CPU backend.
    Cpu,
    /// Offers its pool for device copies; the shared pool is returned for a `Maps` peer.
    Offers,
    /// Copies device to device from this pool.
    Maps(Arc<Mutex<CpuBackend>>),
}

fn worker(m: &LoadedModel, id: u64, side: Side, plane: Option<TransferPlane>) -> WorkerHandle {
    worker_with_pool(m, id, side, plane).0
}

/// A worker, and its shared pool when it offers one.
fn worker_with_pool(
    m: &LoadedModel,
    id: u64,
    side: Side,
    plane: Option<TransferPlane>,
) -> (WorkerHandle, Option<Arc<Mutex<CpuBackend>>>) {
    let cpu = CpuBackend::new(
        m.config.clone(),
        &m.weights,
        CpuBackendOptions {
            num_blocks: 64,
            block_size: BLOCK as usize,
            threads: 1,
        },
    )
    .expect("backend");
    let stand_in = |cpu: CpuBackend, offers: bool, peer| {
        let cpu = Arc::new(Mutex::new(cpu));
        let b = StandIn {
            cpu: cpu.clone(),
            config: m.config.clone(),
            offers,
            peer,
        };
        (Box::new(b) as Box<dyn Backend>, Some(cpu))
    };
    let (backend, pool): (Box<dyn Backend>, _) = match side {
        Side::Cpu => (Box::new(cpu), None),
        Side::Offers => stand_in(cpu, true, None),
        Side::Maps(peer) => {
            let (b, _) = stand_in(cpu, false, Some(peer));
            (b, None)
        }
    };
    let executor = Executor::spawn(&format!("exec-{id}"), backend).expect("thread");
    let handle = WorkerHandle::spawn_with_plane(
        WorkerId(id),
        support::scheduler(64, BLOCK, 256, 4, 2048),
        executor,
        Box::new(|_| {}),
        EngineTime::real(),
        plane,
    );
    (handle, pool)
}

fn request(id: u64) -> PreprocessedRequest {
    PreprocessedRequest {
        id: RequestId(id),
        token_ids: (0..53).map(|i| 300 + (i * 37) % 4000).collect(),
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

/// In-memory transfer planes on one hub, their pins expiring after `expiry_ms`.
struct Planes {
    reg: MetricsRegistry,
    clock: SharedClock,
    hub: TransferHub,
    cfg: TransferConfig,
}

impl Planes {
    fn new(expiry_ms: u64) -> Planes {
        Planes {
            reg: MetricsRegistry::new(),
            clock: TokioClock::shared(),
            hub: TransferHub::new(),
            cfg: TransferConfig {
                expiry_ms,
                ..TransferConfig::default()
            },
        }
    }

    fn plane(&self, name: &str) -> TransferPlane {
        TransferPlane::in_memory(
            name,
            self.cfg.clone(),
            self.clock.clone(),
            &self.reg,
            &self.hub,
        )
    }
}

/// What P/D must equal: an aggregated worker's greedy tokens for the test request.
async fn aggregated_reference(m: &LoadedModel) -> Vec<TokenId> {
    let agg = worker(m, 0, Side::Cpu, None);
    let reference = tokens(agg.generate(request(100)).await.expect("admitted")).await;
    assert_eq!(reference.len(), MAX_TOKENS as usize);
    reference
}

/// (blocks in use, requests held) on `w`.
async fn held(w: &WorkerHandle) -> (usize, usize) {
    w.inspect(|s| (s.stats().kv.used, s.num_held()))
        .await
        .expect("worker alive")
}

/// Waits (bounded) until `w` holds nothing: the release is a message to its loop.
async fn until_released(w: &WorkerHandle) -> (usize, usize) {
    for _ in 0..500 {
        let now = held(w).await;
        if now == (0, 0) {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    held(w).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offering_prefill_worker_holds_the_blocks_until_the_decode_worker_has_them() {
    let Some(m) = support::default_model() else {
        return;
    };
    let planes = Planes::new(500);
    let reference = aggregated_reference(&m).await;

    let prefill = worker(&m, 1, Side::Offers, Some(planes.plane("prefill")));
    let decode = worker(&m, 2, Side::Cpu, Some(planes.plane("decode")));
    let (first, export) = prefill.prefill(request(1)).await.expect("admitted");
    let first = tokens(first).await;
    let kv = export.await.expect("an export").expect("a descriptor");
    let offered = kv.ipc.as_ref().expect("a device copy offered");
    assert_eq!(offered.blocks.len(), 4, "53 tokens: 4 blocks");
    let (used, holding) = held(&prefill).await;
    assert_eq!(holding, 1, "held after the export, for a device copy");
    assert!(used >= 4, "{used} blocks in use");

    let (rest, outcome) = decode
        .decode_remote(request(1), first[0], Some(kv))
        .await
        .expect("admitted");
    match outcome.await.expect("an import report") {
        ImportOutcome::Imported { path, blocks, .. } => {
            let path = path.expect("a device path was offered");
            assert!(!path.device_copy);
            assert_eq!(path.host_reason.as_deref(), Some("not_device"));
            assert_eq!(blocks, 4);
        }
        other => panic!("no import: {other:?}"),
    }
    let mut got = first;
    got.extend(tokens(rest).await);
    assert_eq!(got, reference, "P/D after an offer equals aggregated");
    assert_eq!(
        until_released(&prefill).await,
        (0, 0),
        "pulled: the held blocks went back"
    );

    // Exported, never pulled: the pin expires (500 ms) and the blocks go with it.
    let (first, export) = prefill.prefill(request(2)).await.expect("admitted");
    tokens(first).await;
    let kv = export.await.expect("an export").expect("a descriptor");
    assert_eq!(held(&prefill).await.1, 1);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        until_released(&prefill).await,
        (0, 0),
        "expired: the held blocks went back"
    );
    drop(kv);
}

/// The decode side of a device copy: a decode worker whose backend can map the prefill
/// worker's pool copies the blocks device to device (no layer chunk pulled), reports it,
/// confirms with an empty pull that frees the prefill side's held blocks, and decodes
/// exactly as aggregated serving does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decode_worker_that_can_map_the_pool_copies_device_to_device_and_frees_the_hold() {
    let Some(m) = support::default_model() else {
        return;
    };
    let planes = Planes::new(5_000);
    let reference = aggregated_reference(&m).await;

    let (prefill, pool) = worker_with_pool(&m, 1, Side::Offers, Some(planes.plane("prefill")));
    let pool = pool.expect("an offering worker shares its pool");
    let decode = worker(&m, 2, Side::Maps(pool), Some(planes.plane("decode")));
    let (first, export) = prefill.prefill(request(1)).await.expect("admitted");
    let first = tokens(first).await;
    let kv = export.await.expect("an export").expect("a descriptor");
    assert!(kv.ipc.is_some(), "a device copy offered");
    assert_eq!(held(&prefill).await.1, 1, "held for the device copy");

    let (rest, outcome) = decode
        .decode_remote(request(1), first[0], Some(kv))
        .await
        .expect("admitted");
    match outcome.await.expect("an import report") {
        ImportOutcome::Imported { path, blocks, .. } => {
            let path = path.expect("a device path was offered");
            assert!(path.device_copy, "copied device to device");
            assert_eq!(path.host_reason, None);
            assert_eq!(blocks, 4);
        }
        other => panic!("no import: {other:?}"),
    }
    let mut got = first;
    got.extend(tokens(rest).await);
    assert_eq!(got, reference, "P/D by device copy equals aggregated");
    assert_eq!(
        until_released(&prefill).await,
        (0, 0),
        "the confirming pull freed the held blocks long before the 5 s expiry"
    );
}
