//! Event plane over loopback TCP: topic filtering, sequence numbers, gap notices.

use std::time::Duration;

use turbine_runtime::events::{Delivery, Event, EventPublisher, EventSubscriber};
use turbine_runtime::{MetricsRegistry, RuntimeMetrics};

async fn next_event(sub: &mut EventSubscriber) -> Event {
    loop {
        if let Delivery::Event(e) = sub.recv().await.unwrap() {
            return e;
        }
    }
}

/// PUB/SUB drops messages until the subscription reaches the publisher ("slow joiner"):
/// publish warm-up events until one arrives.
async fn warm_up(publisher: &EventPublisher, sub: &mut EventSubscriber) {
    loop {
        publisher.publish("warmup", &0u32).await.unwrap();
        if let Ok(Ok(Delivery::Event(e))) =
            tokio::time::timeout(Duration::from_millis(20), sub.recv()).await
        {
            if e.topic == "warmup" {
                return;
            }
        }
    }
}

/// Fails the test, instead of hanging the suite, if a step never completes.
const PATIENCE: Duration = Duration::from_secs(30);

/// Runs one step of a test, failing it with the step's name if it takes past [`PATIENCE`].
async fn step<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(PATIENCE, fut).await {
        Ok(out) => out,
        Err(_) => panic!("{what}: nothing after {PATIENCE:?}"),
    }
}

/// Runs `test` on a two-thread runtime that is shut down with a deadline instead of joined:
/// `zeromq` 0.7's PUB backend can leave a runtime thread parked for good in a synchronous
/// map lock (`PubSocketBackend::message_received` -> `scc` `get_sync`, seen with gdb in
/// about one run of this test in a thousand), and joining that thread would hang the
/// test binary after the test is over. A step that waits on such a thread fails by name.
fn on_runtime(test: impl std::future::Future<Output = ()>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rt.block_on(test)));
    rt.shutdown_timeout(Duration::from_secs(5));
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

#[test]
fn topics_sequence_numbers_and_restart_gap() {
    on_runtime(topics_sequence_numbers_and_restart_gap_steps());
}

async fn topics_sequence_numbers_and_restart_gap_steps() {
    let metrics = RuntimeMetrics::new(&MetricsRegistry::new());
    let mut sub = EventSubscriber::new(1 << 20, metrics);
    sub.subscribe("kv.").await.unwrap();
    sub.subscribe("warmup").await.unwrap();

    let first = step(
        "binding the first publisher",
        EventPublisher::bind("tcp://127.0.0.1:0", "w1"),
    )
    .await
    .unwrap();
    step(
        "connecting to the first publisher",
        sub.connect(first.endpoint()),
    )
    .await
    .unwrap();
    step("warming up the first publisher", warm_up(&first, &mut sub)).await;
    for i in 1..=5u64 {
        first.publish("metrics.w1", &i).await.unwrap(); // not subscribed: filtered out
        assert_eq!(first.publish("kv.w1", &i).await.unwrap(), i);
    }
    let mut seen = Vec::new();
    step("receiving the first publisher's five events", async {
        while seen.len() < 5 {
            match sub.recv().await.unwrap() {
                Delivery::Event(e) if e.topic == "warmup" => {}
                Delivery::Event(e) => {
                    assert_eq!(e.topic, "kv.w1");
                    assert_eq!(e.publisher, "w1");
                    seen.push((e.seq, e.decode::<u64>().unwrap()));
                }
                Delivery::Gap(g) => {
                    assert_eq!(g.topic, "warmup", "no gap expected on kv: {g:?}")
                }
            }
        }
    })
    .await;
    assert_eq!(seen, (1..=5).map(|i| (i, i)).collect::<Vec<_>>());

    // The publisher restarts (same id, numbering from 1): the subscriber is told.
    drop(first);
    let second = step(
        "binding the second publisher",
        EventPublisher::bind("tcp://127.0.0.1:0", "w1"),
    )
    .await
    .unwrap();
    step(
        "connecting to the second publisher",
        sub.connect(second.endpoint()),
    )
    .await
    .unwrap();
    step(
        "warming up the second publisher",
        warm_up(&second, &mut sub),
    )
    .await;
    second.publish("kv.w1", &99u64).await.unwrap();
    let gap = step("the restart's gap notice", async {
        loop {
            match sub.recv().await.unwrap() {
                Delivery::Gap(g) if g.topic == "kv.w1" => break g,
                _ => {}
            }
        }
    })
    .await;
    assert_eq!(
        (gap.publisher.as_str(), gap.expected, gap.got),
        ("w1", 6, 1)
    );
    let e = step("the event after the gap", next_event(&mut sub)).await;
    assert_eq!((e.seq, e.decode::<u64>().unwrap()), (1, 99));
}

/// Each event is published alone and awaited before the next, so the publisher goes quiet
/// after every one: the pattern in which `zeromq`'s PUB fan-out could strand the last
/// message until a later send (see `turbine_runtime::events`, "The flush nudge").
#[test]
fn a_publisher_that_goes_quiet_still_delivers_its_last_event() {
    on_runtime(a_publisher_that_goes_quiet_still_delivers_its_last_event_steps());
}

async fn a_publisher_that_goes_quiet_still_delivers_its_last_event_steps() {
    let metrics = RuntimeMetrics::new(&MetricsRegistry::new());
    let mut sub = EventSubscriber::new(1 << 20, metrics);
    // The catch-all prefix also matches the flush nudge, which must never surface.
    sub.subscribe("").await.unwrap();
    let publisher = EventPublisher::bind("tcp://127.0.0.1:0", "w1")
        .await
        .unwrap();
    sub.connect(publisher.endpoint()).await.unwrap();
    warm_up(&publisher, &mut sub).await;
    for i in 1..=2_000u64 {
        let seq = publisher.publish("kv.w1", &i).await.unwrap();
        let delivery = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match sub.recv().await.unwrap() {
                    Delivery::Event(e) if e.topic == "warmup" => {}
                    other => return other,
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("event {i} was published but never delivered"));
        match delivery {
            Delivery::Event(e) => {
                assert_eq!(e.topic, "kv.w1");
                assert_eq!((e.seq, e.decode::<u64>().unwrap()), (seq, i));
            }
            Delivery::Gap(g) => panic!("no gap expected: {g:?}"),
        }
    }
}
