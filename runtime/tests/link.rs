//! `Addr::via` over a modelled link on an in-memory node, on paused (virtual) time: what the
//! simulator builds its network from.

use crate::common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{config, shared, Probe, ProbeHandler, Req, Resp};
use futures::StreamExt;
use turbine_runtime::{CallError, Direction, Link, MetricsRegistry, Node, TokioClock, Transit};

/// A link with a fixed one-way latency that can be cut (the far node "crashes").
#[derive(Debug)]
struct FixedLink {
    one_way: Duration,
    down: AtomicBool,
}

impl Link for FixedLink {
    fn transit(&self, _dir: Direction) -> Transit {
        let (one_way, down) = (self.one_way, self.down.load(Ordering::SeqCst));
        Box::pin(async move {
            if down {
                return Err(CallError::PeerGone("sim://server".into()));
            }
            tokio::time::sleep(one_way).await;
            Ok(())
        })
    }
}

async fn in_memory_probe() -> (Node, Arc<FixedLink>) {
    let node = Node::in_memory(
        config("server"),
        TokioClock::shared(),
        MetricsRegistry::new(),
    );
    let (state, _cancelled) = shared();
    node.serve::<Probe, _, _>("probe", move || ProbeHandler::new(state.clone()))
        .await
        .unwrap();
    let link = Arc::new(FixedLink {
        one_way: Duration::from_millis(5),
        down: AtomicBool::new(false),
    });
    (node, link)
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_call_via_a_link_takes_one_round_trip_of_virtual_time() {
    let (node, link) = in_memory_probe().await;
    let addr = node.local::<Probe>("probe").unwrap().via(link.clone());
    assert!(!addr.is_local());
    let t0 = tokio::time::Instant::now();
    let resp = addr.call(Req::Echo("hi".into())).await.unwrap();
    assert_eq!(resp, Resp::Text("hi".into()));
    assert_eq!(t0.elapsed(), Duration::from_millis(10));
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn stream_items_cross_the_link_in_order() {
    let (node, link) = in_memory_probe().await;
    let addr = node.local::<Probe>("probe").unwrap().via(link.clone());
    let items: Vec<_> = addr
        .stream(Req::Count(50))
        .await
        .unwrap()
        .map(|r| r.unwrap())
        .collect()
        .await;
    assert_eq!(items, (0..50).map(Resp::Num).collect::<Vec<_>>());
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_cut_link_fails_calls_and_open_streams_with_peer_gone() {
    let (node, link) = in_memory_probe().await;
    let addr = node.local::<Probe>("probe").unwrap().via(link.clone());
    let mut stream = addr.stream(Req::Endless).await.unwrap();
    assert_eq!(stream.next().await.unwrap().unwrap(), Resp::Num(0));
    link.down.store(true, Ordering::SeqCst);
    // Items already past the link may still arrive; then the stream fails, then ends.
    let mut saw_gone = false;
    while let Some(item) = stream.next().await {
        if let Err(e) = item {
            assert!(matches!(e, CallError::PeerGone(_)), "{e:?}");
            saw_gone = true;
        }
    }
    assert!(saw_gone);
    let err = addr.call(Req::Echo("x".into())).await.unwrap_err();
    assert!(matches!(err, CallError::PeerGone(_)), "{err:?}");
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn an_in_memory_node_refuses_to_connect_elsewhere() {
    let (node, _link) = in_memory_probe().await;
    assert!(node.endpoint().starts_with("inproc://"));
    let err = node
        .connect::<Probe>("tcp://127.0.0.1:1", "probe")
        .await
        .unwrap_err();
    assert!(matches!(err, CallError::Transport(_)), "{err:?}");
    // Its own endpoint still resolves locally.
    let own = node.endpoint().to_string();
    assert!(node
        .connect::<Probe>(&own, "probe")
        .await
        .unwrap()
        .is_local());
}
