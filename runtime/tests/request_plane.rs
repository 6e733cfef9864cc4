//! Request plane across two nodes on loopback TCP.

use crate::common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{pair, Probe, Req, Resp};
use futures::StreamExt;
use turbine_runtime::{CallError, Node, SupervisorEvent};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_and_cast_across_nodes() {
    let (server, client, shared, _c) = pair().await;
    let addr = client
        .connect::<Probe>(server.endpoint(), "probe")
        .await
        .unwrap();
    assert!(!addr.is_local());
    let resp = addr.call(Req::Echo("hello".into())).await.unwrap();
    assert_eq!(resp, Resp::Text("hello".into()));

    for _ in 0..5 {
        addr.cast(Req::Incr);
    }
    // A call after the casts is ordered behind them on the same link and actor.
    let after = addr.call(Req::Incr).await.unwrap();
    assert_eq!(after, Resp::Num(6));
    assert_eq!(shared.casts.load(Ordering::SeqCst), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_and_remote_addresses_share_one_api() {
    let (server, _client, _shared, _c) = pair().await;
    let local = server.local::<Probe>("probe").unwrap();
    assert!(local.is_local());
    let via_endpoint = server
        .connect::<Probe>(server.endpoint(), "probe")
        .await
        .unwrap();
    assert!(via_endpoint.is_local());
    assert_eq!(
        local.call(Req::Echo("x".into())).await.unwrap(),
        Resp::Text("x".into())
    );
    let items: Vec<_> = local.stream(Req::Count(100)).await.unwrap().collect().await;
    assert_eq!(items.len(), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_of_ten_thousand_arrives_complete_and_in_order() {
    let (server, client, _shared, _c) = pair().await;
    let addr = client
        .connect::<Probe>(server.endpoint(), "probe")
        .await
        .unwrap();
    let mut stream = addr.stream(Req::Count(10_000)).await.unwrap();
    let mut expected = 0u64;
    while let Some(item) = stream.next().await {
        assert_eq!(item.unwrap(), Resp::Num(expected));
        expected += 1;
    }
    assert_eq!(expected, 10_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_remote_stream_cancels_the_producer() {
    let (server, client, _shared, mut cancelled) = pair().await;
    let addr = client
        .connect::<Probe>(server.endpoint(), "probe")
        .await
        .unwrap();
    let mut stream = addr.stream(Req::Endless).await.unwrap();
    for i in 0..10u64 {
        assert_eq!(stream.next().await.unwrap().unwrap(), Resp::Num(i));
    }
    drop(stream);
    let sent = cancelled.recv().await.expect("producer saw cancellation");
    // Back-pressure: the producer cannot run ahead of the credit window plus local buffers.
    let window = client.config().stream_window as u64;
    assert!(sent <= 10 + 3 * window, "producer ran away: {sent} items");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_local_stream_cancels_the_producer() {
    let (server, _client, _shared, mut cancelled) = pair().await;
    let addr = server.local::<Probe>("probe").unwrap();
    let mut stream = addr.stream(Req::Endless).await.unwrap();
    assert_eq!(stream.next().await.unwrap().unwrap(), Resp::Num(0));
    drop(stream);
    assert!(cancelled.recv().await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panicking_child_is_restarted_and_supervisor_told_why() {
    let server = Node::start(common::config("server")).await.unwrap();
    let client = Node::start(common::config("client")).await.unwrap();
    let (shared, _c) = common::shared();
    let s = shared.clone();
    let mut handle = server
        .serve::<Probe, _, _>("probe", move || common::ProbeHandler::new(s.clone()))
        .await
        .unwrap();
    let addr = client
        .connect::<Probe>(server.endpoint(), "probe")
        .await
        .unwrap();

    let err = addr.call(Req::Panic).await.unwrap_err();
    // Remote callers see the panic message in a handler-level error.
    assert!(err.to_string().contains("boom on purpose"), "{err:?}");
    match handle.events.recv().await.unwrap() {
        SupervisorEvent::ChildFailed { reason, .. } => {
            assert!(reason.contains("boom on purpose"), "{reason}")
        }
        other => panic!("unexpected {other:?}"),
    }
    let ok = addr.call(Req::Echo("again".into())).await.unwrap();
    assert_eq!(ok, Resp::Text("again".into()));
    assert_eq!(shared.incarnations.load(Ordering::SeqCst), 2);

    // An erroring (fatal) handler is restarted too.
    let err = addr.call(Req::Fatal).await.unwrap_err();
    assert_eq!(err, CallError::Handler("state corrupted".into()));
    let ok = addr.call(Req::Echo("third".into())).await.unwrap();
    assert_eq!(ok, Resp::Text("third".into()));
    assert_eq!(shared.incarnations.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_actor_gets_a_typed_error() {
    let (server, client, _shared, _c) = pair().await;
    let addr = client
        .connect::<Probe>(server.endpoint(), "nobody")
        .await
        .unwrap();
    let err = addr.call(Req::Echo("x".into())).await.unwrap_err();
    assert_eq!(err, CallError::UnknownActor("nobody".into()));
    let mut stream = addr.stream(Req::Count(3)).await.unwrap();
    assert_eq!(
        stream.next().await.unwrap().unwrap_err(),
        CallError::UnknownActor("nobody".into())
    );
    assert!(matches!(
        server.local::<Probe>("nobody"),
        Err(CallError::UnknownActor(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_peer_fails_pending_call_with_typed_error() {
    let (server, client, _shared, _c) = pair().await;
    let addr = client
        .connect::<Probe>(server.endpoint(), "probe")
        .await
        .unwrap()
        .with_timeout(Duration::from_secs(3));
    addr.call(Req::Echo("warm".into())).await.unwrap();
    let pending = tokio::spawn(async move { addr.call(Req::Hang).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    server.shutdown();
    drop(server);
    let err = pending.await.unwrap().unwrap_err();
    assert!(
        matches!(err, CallError::PeerGone(_) | CallError::Timeout(_)),
        "{err:?}"
    );
}

/// A stream opened after the peer's disconnect was noticed is refused at once with
/// `PeerGone`: streams have no overall timeout (a generation may wait in a queue for long),
/// so a request queued on a DEALER whose peer is gone would otherwise wait forever.
#[tokio::test]
async fn stream_to_a_peer_that_already_died_is_refused_not_left_hanging() {
    let (server, client, _shared, _c) = pair().await;
    let addr = client
        .connect::<Probe>(server.endpoint(), "probe")
        .await
        .unwrap()
        .with_timeout(Duration::from_secs(60));
    addr.call(Req::Echo("warm".into())).await.unwrap();
    // A call in flight when the peer dies is failed by the disconnect.
    let pending = {
        let addr = addr.clone();
        tokio::spawn(async move { addr.call(Req::Hang).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    server.shutdown();
    drop(server);
    let err = tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .expect("the disconnect fails the pending call")
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, CallError::PeerGone(_)), "{err:?}");

    // Now the link knows the peer is gone: a new stream is refused instead of queued.
    let outcome = tokio::time::timeout(Duration::from_secs(5), async {
        use futures::StreamExt;
        match addr.stream(Req::Count(3)).await {
            Err(e) => Err(e),
            Ok(mut s) => match s.next().await {
                Some(Err(e)) => Err(e),
                other => Ok(other.is_some()),
            },
        }
    })
    .await
    .expect("a stream to a dead peer must not hang");
    assert!(
        matches!(outcome, Err(CallError::PeerGone(_))),
        "{outcome:?}"
    );
}
