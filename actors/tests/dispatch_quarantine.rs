//! A worker whose connection is lost is left out of routing for a while (not until its
//! discovery lease expires), then routed to again: the dispatcher reports it, the router
//! (served as `RouterService` on the same node) quarantines it. On paused time, with the
//! workers behind in-memory nodes and the lost one behind a link that refuses everything.
//! Readiness (GET /ready) follows the same view: a worker out of routing is not ready to serve.

use async_trait::async_trait;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use turbine_actors::frontend::EngineError;
use turbine_actors::ids::WorkerId;
use turbine_actors::kv::indexer::FlashIndexer;
use turbine_actors::kv::BlockSize;
use turbine_actors::protocol::{FinishReason, SamplingParams, StopConditions, TokenOutput};
use turbine_actors::router::dispatch::{DispatchRequest, Dispatcher};
use turbine_actors::router::service::RouterCore;
use turbine_actors::router::UNREACHABLE_QUARANTINE;
use turbine_actors::router::{KvRouter, RouterConfig, RouterReplicaId};
use turbine_actors::worker::service::{WorkerReply, WorkerRequest, WorkerService};
use turbine_actors::worker::SchedulerStats;
use turbine_runtime::{
    CallError, Direction, Handler, HandlerError, Link, MetricsRegistry, Node, NodeConfig,
    RequestCtx, StreamSink, TokioClock, Transit,
};

/// Answers every request with one token and a finish.
struct OneToken;

#[async_trait]
impl Handler<WorkerService> for OneToken {
    async fn call(
        &mut self,
        _req: WorkerRequest,
        _ctx: &RequestCtx,
    ) -> Result<WorkerReply, HandlerError> {
        Err(HandlerError::new("stream only"))
    }

    async fn stream(
        &mut self,
        _req: WorkerRequest,
        sink: StreamSink<WorkerReply>,
        _ctx: &RequestCtx,
    ) -> Result<(), HandlerError> {
        tokio::spawn(async move {
            let _ = sink
                .send(WorkerReply::Token(TokenOutput {
                    token_ids: vec![7],
                    logprobs: None,
                    finish: Some(FinishReason::Length),
                    cached_tokens: Some(0),
                    prompt_logprobs: None,
                }))
                .await;
        });
        Ok(())
    }
}

/// A link to a process that is gone (while `down`).
#[derive(Debug)]
struct CutLink {
    down: AtomicBool,
}

impl Link for CutLink {
    fn transit(&self, _dir: Direction) -> Transit {
        let down = self.down.load(Ordering::SeqCst);
        Box::pin(async move {
            if down {
                Err(CallError::PeerGone("tcp://gone".into()))
            } else {
                Ok(())
            }
        })
    }
}

fn request() -> DispatchRequest {
    DispatchRequest {
        token_ids: (0..40).collect(),
        sampling: SamplingParams::greedy(),
        stop: StopConditions {
            max_tokens: 1,
            stop_token_ids: vec![],
            ignore_eos: true,
        },
        logprobs: None,
        generated_before: 0,
        images: Vec::new(),
    }
}

/// Two workers on one in-memory node, worker 1 behind `link`; the router served on the
/// same node; the dispatcher asking it. Workers are not added yet.
struct Cluster {
    link: Arc<CutLink>,
    core: Arc<RouterCore>,
    dispatcher: Dispatcher,
    node: Node,
}

async fn cluster() -> Cluster {
    cluster_with(RouterConfig::default()).await
}

async fn cluster_with(config: RouterConfig) -> Cluster {
    let node = Node::in_memory(
        NodeConfig {
            name: "test".into(),
            ..NodeConfig::default()
        },
        TokioClock::shared(),
        MetricsRegistry::new(),
    );
    for name in ["worker/1", "worker/2"] {
        node.serve::<WorkerService, _, _>(name, || OneToken)
            .await
            .unwrap();
    }
    let link = Arc::new(CutLink {
        down: AtomicBool::new(true),
    });
    let index = Arc::new(FlashIndexer::default());
    let router = KvRouter::new(RouterReplicaId(0), config, Some(index.clone())).unwrap();
    let core = RouterCore::new(router, index, TokioClock::shared());
    let router_addr = core.serve(&node, "router").await.unwrap();
    let dispatcher = Dispatcher::new(BlockSize::DEFAULT, Some(router_addr), 1);
    Cluster {
        link,
        core,
        dispatcher,
        node,
    }
}

impl Cluster {
    fn join_both(&self) {
        let w1 = self
            .node
            .local::<WorkerService>("worker/1")
            .unwrap()
            .via(self.link.clone());
        for id in [WorkerId(1), WorkerId(2)] {
            self.core.add_worker(id);
        }
        self.dispatcher.add_worker(WorkerId(1), w1);
        self.dispatcher
            .add_worker(WorkerId(2), self.node.local("worker/2").unwrap());
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_lost_worker_is_skipped_for_the_quarantine_then_tried_again() {
    let c = cluster().await;
    c.join_both();
    let (link, dispatcher) = (&c.link, &c.dispatcher);

    // Equal loads: the lower id wins, and its connection is gone: a retryable refusal.
    let err = dispatcher.dispatch(request()).await.err().unwrap();
    assert!(matches!(err, EngineError::Overloaded(_)), "{err:?}");

    // From now on the lost worker is skipped, though discovery still lists it.
    for _ in 0..3 {
        let mut d = dispatcher.dispatch(request()).await.unwrap();
        assert_eq!(d.worker, WorkerId(2));
        let out = d.next_output().await.unwrap().unwrap();
        assert_eq!(out.token_ids, vec![7]);
    }
    assert_eq!(dispatcher.worker_ids(), vec![WorkerId(1), WorkerId(2)]);

    // The process comes back; once the quarantine is over it is routed to again.
    link.down.store(false, Ordering::SeqCst);
    tokio::time::advance(UNREACHABLE_QUARANTINE).await;
    let mut d = dispatcher.dispatch(request()).await.unwrap();
    assert_eq!(d.worker, WorkerId(1));
    assert!(d.next_output().await.unwrap().is_ok());
}

/// GET /ready's answer (`Dispatcher::readiness`): ready only while the router would route
/// to some worker. Workers that joined but are quarantined (unreachable), stalled or
/// draining do not count.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn readiness_counts_quarantined_and_stalled_workers_as_not_ready() {
    let c = cluster().await;
    let not_ready = |r: Result<(), String>| r.err().unwrap_or_default();
    assert_eq!(
        not_ready(c.dispatcher.readiness().await),
        "no worker has joined yet"
    );
    c.join_both();
    assert_eq!(c.dispatcher.readiness().await, Ok(()));

    // Worker 2's engine is stuck: it heartbeats with the same step count for 8 s, and a
    // stream on it is silent past the bound: stalled. Worker 1 is still routable.
    let stuck = SchedulerStats {
        num_running: 1,
        num_steps: 5,
        ..SchedulerStats::default()
    };
    c.core.update_load(WorkerId(2), &stuck);
    tokio::time::advance(Duration::from_secs(8)).await;
    c.core.update_load(WorkerId(2), &stuck);
    assert!(c
        .core
        .check_stalled(WorkerId(2), Duration::from_secs(8), true));
    assert_eq!(c.dispatcher.readiness().await, Ok(()));

    // Worker 1's connection is lost (a dispatch finds it): quarantined. Nothing is
    // routable.
    assert!(c.dispatcher.dispatch(request()).await.is_err());
    let why = not_ready(c.dispatcher.readiness().await);
    assert!(
        why.contains("none of the 2 worker(s) can take requests now"),
        "{why}"
    );
    assert!(c.dispatcher.dispatch(request()).await.is_err());

    // Worker 1's quarantine ends (it is back): ready again, served by it.
    c.link.down.store(false, Ordering::SeqCst);
    tokio::time::advance(UNREACHABLE_QUARANTINE).await;
    assert_eq!(c.dispatcher.readiness().await, Ok(()));

    // Both out once more: worker 1 unreachable, worker 2 still stalled (a heartbeat with no
    // progress does not bring it back); its report with one step more does.
    c.core.unreachable(WorkerId(1));
    c.core.update_load(WorkerId(2), &stuck);
    assert!(c.dispatcher.readiness().await.is_err());
    c.core.update_load(
        WorkerId(2),
        &SchedulerStats {
            num_steps: 6,
            ..stuck
        },
    );
    assert_eq!(c.dispatcher.readiness().await, Ok(()));
    let mut d = c.dispatcher.dispatch(request()).await.unwrap();
    assert_eq!(d.worker, WorkerId(2));
    assert!(d.next_output().await.unwrap().is_ok());
}

/// `router.busy_threshold`: while every worker has that many requests, a new one is held
/// at the dispatcher (not piled onto a worker) until one finishes, or refused (retryable)
/// once `queue_timeout_ms` is over.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn requests_wait_while_every_worker_is_busy_and_take_the_first_freed_slot() {
    let c = cluster_with(RouterConfig {
        busy_threshold: Some(1),
        queue_timeout_ms: 2_000,
        ..RouterConfig::default()
    })
    .await;
    c.link.down.store(false, Ordering::SeqCst);
    c.join_both();
    let first = c.dispatcher.dispatch(request()).await.unwrap();
    let second = c.dispatcher.dispatch(request()).await.unwrap();
    assert_eq!((first.worker, second.worker), (WorkerId(1), WorkerId(2)));

    // Both busy: the third is held, not sent to either.
    let third = c.dispatcher.dispatch(request());
    tokio::pin!(third);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut third)
            .await
            .is_err(),
        "a request was routed to a busy worker"
    );
    assert!(c.core.metrics().all_busy > 10, "{:?}", c.core.metrics());
    // Worker 2's request ends: the held one takes its slot.
    drop(second);
    let mut third = third.await.unwrap();
    assert_eq!(third.worker, WorkerId(2));
    assert_eq!(
        third.next_output().await.unwrap().unwrap().token_ids,
        vec![7]
    );

    // Nothing ends for longer than the hold time: a retryable refusal naming the setting.
    let start = tokio::time::Instant::now();
    let err = c.dispatcher.dispatch(request()).await.err().unwrap();
    assert!(start.elapsed() >= Duration::from_millis(2_000));
    match err {
        EngineError::Overloaded(m) => assert!(m.contains("queue_timeout_ms"), "{m}"),
        other => panic!("{other:?}"),
    }
    drop(first);
    drop(third);
}
