//! A disaggregated request's first token reaches the client as soon as the prefill worker
//! sampled it, not after the KV export: the dispatcher hands the token out while the
//! prefill worker still holds its descriptor back, and asks the decode worker only once the
//! descriptor is in. Through the real dispatcher and router (in-memory nodes, paused time);
//! the two workers are scripted services, so the test controls when the descriptor leaves.

use async_trait::async_trait;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use turbine_actors::cluster_config::WorkerRole;
use turbine_actors::disagg::flow::DisaggSettings;
use turbine_actors::disagg::kv_transfer::{KvChunkLayout, KvExport};
use turbine_actors::disagg::metrics::DisaggMetrics;
use turbine_actors::disagg::wire::ImportOutcome;
use turbine_actors::disagg::{DisaggPolicyKind, DisaggregationConfig};
use turbine_actors::frontend::Metrics;
use turbine_actors::ids::WorkerId;
use turbine_actors::kv::indexer::FlashIndexer;
use turbine_actors::kv::BlockSize;
use turbine_actors::protocol::{FinishReason, SamplingParams, StopConditions, TokenOutput};
use turbine_actors::router::dispatch::{DispatchRequest, Dispatcher};
use turbine_actors::router::service::RouterCore;
use turbine_actors::router::{KvRouter, RouterConfig, RouterReplicaId};
use turbine_actors::worker::service::{WorkerReply, WorkerRequest, WorkerService};
use turbine_runtime::transfer::{BufferId, Descriptor, Layout};
use turbine_runtime::{
    Handler, HandlerError, MetricsRegistry, Node, NodeConfig, RequestCtx, StreamSink, TokioClock,
};

const FIRST: u32 = 11;
const SECOND: u32 = 12;

fn token(id: u32, finish: Option<FinishReason>) -> WorkerReply {
    WorkerReply::Token(TokenOutput {
        token_ids: vec![id],
        logprobs: None,
        finish,
        cached_tokens: Some(0),
        prompt_logprobs: None,
    })
}

fn export() -> KvExport {
    let layout = KvChunkLayout {
        block_size: 16,
        n_layers: 1,
        n_kv_heads: 1,
        head_dim: 1,
        dtype_bytes: 1,
        blocks: 0,
    };
    KvExport {
        descriptor: Descriptor {
            owner: "mem://prefill".into(),
            buffer: BufferId {
                incarnation: 0,
                seq: 1,
            },
            layout: Layout { chunks: vec![0] },
            ranges: vec![],
            expires_after_ms: 10_000,
        },
        layout,
        ipc: None,
    }
}

/// A prefill worker: the first token at once, the descriptor once `release` is notified.
struct ScriptedPrefill {
    release: Arc<Notify>,
}

#[async_trait]
impl Handler<WorkerService> for ScriptedPrefill {
    async fn call(
        &mut self,
        _: WorkerRequest,
        _: &RequestCtx,
    ) -> Result<WorkerReply, HandlerError> {
        Err(HandlerError::new("stream only"))
    }

    async fn stream(
        &mut self,
        req: WorkerRequest,
        sink: StreamSink<WorkerReply>,
        _: &RequestCtx,
    ) -> Result<(), HandlerError> {
        let WorkerRequest::Prefill(_) = req else {
            return Err(HandlerError::new("a prefill worker only prefills"));
        };
        let release = self.release.clone();
        tokio::spawn(async move {
            if sink.send(token(FIRST, None)).await.is_err() {
                return;
            }
            release.notified().await;
            let _ = sink.send(WorkerReply::Kv(Ok(export()))).await;
        });
        Ok(())
    }
}

/// A decode worker: records what it was asked, reports an import, decodes one token.
struct ScriptedDecode {
    asked: Arc<AtomicUsize>,
    seen: Arc<Mutex<Option<(u32, bool)>>>,
}

#[async_trait]
impl Handler<WorkerService> for ScriptedDecode {
    async fn call(
        &mut self,
        _: WorkerRequest,
        _: &RequestCtx,
    ) -> Result<WorkerReply, HandlerError> {
        Err(HandlerError::new("stream only"))
    }

    async fn stream(
        &mut self,
        req: WorkerRequest,
        sink: StreamSink<WorkerReply>,
        _: &RequestCtx,
    ) -> Result<(), HandlerError> {
        let WorkerRequest::DecodeRemote {
            first_token, kv, ..
        } = req
        else {
            return Err(HandlerError::new("expected a remote decode"));
        };
        self.asked.fetch_add(1, Ordering::SeqCst);
        *self.seen.lock().unwrap() = Some((first_token, kv.is_some()));
        tokio::spawn(async move {
            let imported = ImportOutcome::Imported {
                blocks: 0,
                bytes: 0,
                seconds: 0.0,
                path: None,
            };
            if sink.send(WorkerReply::Import(imported)).await.is_ok() {
                let _ = sink.send(token(SECOND, Some(FinishReason::Length))).await;
            }
        });
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn the_first_token_reaches_the_client_before_the_kv_descriptor() {
    let node = Node::in_memory(
        NodeConfig {
            name: "test".into(),
            ..NodeConfig::default()
        },
        TokioClock::shared(),
        MetricsRegistry::new(),
    );
    let release = Arc::new(Notify::new());
    let asked = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(None));
    {
        let release = release.clone();
        node.serve::<WorkerService, _, _>("worker/1", move || ScriptedPrefill {
            release: release.clone(),
        })
        .await
        .unwrap();
        let (asked, seen) = (asked.clone(), seen.clone());
        node.serve::<WorkerService, _, _>("worker/2", move || ScriptedDecode {
            asked: asked.clone(),
            seen: seen.clone(),
        })
        .await
        .unwrap();
    }
    let index = Arc::new(FlashIndexer::default());
    let router = KvRouter::new(
        RouterReplicaId(0),
        RouterConfig::default(),
        Some(index.clone()),
    )
    .unwrap();
    let core = RouterCore::new(router, index, TokioClock::shared());
    core.set_disaggregation(DisaggregationConfig {
        policy: DisaggPolicyKind::Always,
        ..DisaggregationConfig::default()
    });
    core.add_worker_as(WorkerId(1), WorkerRole::Prefill);
    core.add_worker_as(WorkerId(2), WorkerRole::Decode);
    let router_addr = core.serve(&node, "router").await.unwrap();
    let dispatcher = Dispatcher::new(BlockSize::DEFAULT, Some(router_addr), 1);
    let metrics = DisaggMetrics::register(&Metrics::new());
    dispatcher.enable_disaggregation(DisaggSettings {
        metrics: metrics.clone(),
        prefill_timeout: Duration::from_secs(60),
    });
    dispatcher.add_worker(WorkerId(1), node.local("worker/1").unwrap());
    dispatcher.add_worker(WorkerId(2), node.local("worker/2").unwrap());

    let request = DispatchRequest {
        token_ids: (0..64).collect(),
        sampling: SamplingParams::greedy(),
        stop: StopConditions {
            max_tokens: 2,
            stop_token_ids: vec![],
            ignore_eos: true,
        },
        logprobs: None,
        generated_before: 0,
        images: Vec::new(),
    };
    // The descriptor is held back: the dispatch and the first token must not wait for it
    // (waiting would last until the 60 s remote-prefill timeout).
    let mut run = tokio::time::timeout(Duration::from_secs(1), dispatcher.dispatch(request))
        .await
        .expect("dispatched without waiting for the KV descriptor")
        .expect("dispatched");
    assert_eq!(run.worker, WorkerId(2), "the decode worker owns the stream");
    let first = tokio::time::timeout(Duration::from_secs(1), run.next_output())
        .await
        .expect("the first token without waiting for the KV descriptor")
        .expect("an output")
        .expect("a token");
    assert_eq!(first.token_ids, vec![FIRST]);
    assert_eq!(
        asked.load(Ordering::SeqCst),
        0,
        "the decode worker is asked only once the descriptor is in"
    );

    // The descriptor leaves the prefill worker: the decode worker gets it and decodes on.
    release.notify_one();
    let second = run
        .next_output()
        .await
        .expect("an output")
        .expect("a token");
    assert_eq!(second.token_ids, vec![SECOND]);
    assert_eq!(second.finish, Some(FinishReason::Length));
    assert_eq!(*seen.lock().unwrap(), Some((FIRST, true)));
    assert_eq!(metrics.transfers().0, 1, "the import report is counted");
    assert!(run.next_output().await.is_none());
}
