//! The transfer plane end to end: real sockets between two planes (two hubs, like two
//! processes), the same-process path, expiry on the clock, an owner that goes away mid-pull,
//! bad descriptors, and a modelled link on virtual time (the simulator's path).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use turbine_runtime::transfer::{
    BufferId, ByteRange, Descriptor, TransferConfig, TransferError, TransferHub, TransferPlane,
};
use turbine_runtime::{
    CallError, Direction, Link, ManualClock, MetricsRegistry, SharedClock, TokioClock, Transit,
};

/// Four "layers" of distinct bytes.
fn layers(n: usize, size: usize) -> Vec<Bytes> {
    (0..n)
        .map(|i| Bytes::from((0..size).map(|j| (i * 31 + j) as u8).collect::<Vec<u8>>()))
        .collect()
}

fn cfg() -> TransferConfig {
    TransferConfig {
        pull_timeout_ms: 2_000,
        max_piece_bytes: 64 << 10,
        window: 2,
        ..TransferConfig::default()
    }
}

async fn networked(clock: SharedClock, cfg: TransferConfig) -> TransferPlane {
    // Each plane in its own hub: the pull must take the socket path.
    TransferPlane::start(cfg, clock, &MetricsRegistry::new(), &TransferHub::new())
        .await
        .expect("bind")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_cross_real_sockets_in_order_and_the_owner_unpins() {
    let owner = networked(TokioClock::shared(), cfg()).await;
    let consumer = networked(TokioClock::shared(), cfg()).await;
    let data = layers(4, 200_000);
    let desc = owner.register(data.clone());
    assert!(desc.owner.starts_with("tcp://"));
    assert_eq!(owner.pinned(), (1, 800_000));

    let mut pull = consumer.pull(&desc);
    for (i, layer) in data.iter().enumerate() {
        let (index, bytes) = pull.next_chunk().await.expect("chunk").expect("ok");
        assert_eq!(index as usize, i);
        assert_eq!(&bytes, layer);
    }
    assert!(pull.next_chunk().await.is_none());
    // Released once the last piece went out.
    for _ in 0..100 {
        if owner.pinned() == (0, 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(owner.pinned(), (0, 0));
    // A second pull of the same descriptor: it was consumed.
    let again = consumer.pull(&desc).into_bytes().await;
    assert_eq!(again, Err(TransferError::UnknownBuffer(desc.buffer)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_narrowed_descriptor_pulls_only_its_ranges() {
    let owner = networked(TokioClock::shared(), cfg()).await;
    let consumer = networked(TokioClock::shared(), cfg()).await;
    let data = layers(2, 100);
    let whole: Vec<u8> = data.iter().flat_map(|b| b.to_vec()).collect();
    let ranges = vec![
        ByteRange { start: 10, len: 5 },
        ByteRange {
            start: 120,
            len: 30,
        },
    ];
    let desc = owner.register(data).with_ranges(ranges);
    let got = consumer.pull(&desc).into_bytes().await.expect("pull");
    let want: Vec<u8> = [&whole[10..15], &whole[120..150]].concat();
    assert_eq!(&got[..], &want[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_will_not_pull_can_unpin_at_once() {
    let owner = networked(TokioClock::shared(), cfg()).await;
    let consumer = networked(TokioClock::shared(), cfg()).await;
    let desc = owner.register(layers(2, 1000));
    consumer.discard(&desc).await.expect("discard");
    for _ in 0..100 {
        if owner.pinned() == (0, 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(owner.pinned(), (0, 0));
}

#[tokio::test(flavor = "current_thread")]
async fn same_process_pulls_slice_the_pinned_buffer_without_a_socket() {
    let hub = TransferHub::new();
    let reg = MetricsRegistry::new();
    let clock = TokioClock::shared();
    let owner = TransferPlane::start(cfg(), clock.clone(), &reg, &hub)
        .await
        .expect("bind");
    let consumer = TransferPlane::in_memory("consumer", cfg(), clock, &reg, &hub);
    let data = layers(3, 1000);
    let desc = owner.register(data.clone());
    let mut pull = consumer.pull(&desc);
    let mut n = 0;
    while let Some(piece) = pull.next().await {
        let piece = piece.expect("piece");
        // The very bytes the owner pinned: a slice, not a copy.
        assert_eq!(piece.bytes.as_ptr(), data[piece.chunk as usize].as_ptr());
        n += 1;
    }
    assert_eq!(n, 3);
    assert_eq!(owner.pinned(), (0, 0));
    assert!(reg
        .encode_text()
        .contains("turbine_transfer_bytes_in_total 3000"));
}

#[tokio::test(flavor = "current_thread")]
async fn an_unpulled_buffer_expires_on_the_plane_clock() {
    let clock = ManualClock::new();
    let hub = TransferHub::new();
    let reg = MetricsRegistry::new();
    let owner = TransferPlane::in_memory("owner", cfg(), clock.shared(), &reg, &hub);
    let consumer = TransferPlane::in_memory("consumer", cfg(), clock.shared(), &reg, &hub);
    let desc = owner.register_for(layers(2, 10), Duration::from_secs(3));
    clock.advance(Duration::from_secs(2));
    tokio::task::yield_now().await;
    assert_eq!(owner.pinned(), (1, 20));
    clock.advance(Duration::from_secs(1));
    // The reaper runs on the clock: the pin goes with nobody asking.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(owner.pinned(), (0, 0));
    let late = consumer.pull(&desc).into_bytes().await;
    assert_eq!(late, Err(TransferError::Expired(desc.buffer)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_that_dies_mid_pull_gives_a_typed_error_not_a_hang() {
    let mut c = cfg();
    c.pull_timeout_ms = 1_000;
    let owner = networked(TokioClock::shared(), c.clone()).await;
    let consumer = networked(TokioClock::shared(), c).await;
    // 64 pieces; credit keeps the owner at most a window ahead, so most are unsent.
    let desc = owner.register(layers(4, 1 << 20));
    let mut pull = consumer.pull(&desc);
    pull.next().await.expect("first piece").expect("ok");
    owner.shutdown();
    drop(owner);
    let (_, outcome) = tokio::time::timeout(Duration::from_secs(10), drain(&mut pull))
        .await
        .expect("the pull must end within its timeouts");
    assert!(
        matches!(
            outcome,
            Some(TransferError::OwnerGone(_) | TransferError::Timeout(_))
        ),
        "{outcome:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_walks_away_leaves_the_buffer_to_expiry() {
    let mut c = cfg();
    c.pull_timeout_ms = 300;
    c.expiry_ms = 1_000;
    let owner = networked(TokioClock::shared(), c.clone()).await;
    let consumer = networked(TokioClock::shared(), c).await;
    let desc = owner.register(layers(4, 1 << 20));
    let mut pull = consumer.pull(&desc);
    pull.next().await.expect("first piece").expect("ok");
    drop(pull);
    drop(consumer);
    // Still pinned for a retry, then freed by expiry: nothing leaks.
    assert_eq!(owner.pinned().0, 1);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(owner.pinned(), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_descriptors_are_refused_with_typed_errors() {
    let owner = networked(TokioClock::shared(), cfg()).await;
    let consumer = networked(TokioClock::shared(), cfg()).await;
    let desc = owner.register(layers(1, 100));

    let forged = Descriptor {
        buffer: BufferId {
            incarnation: desc.buffer.incarnation,
            seq: 999,
        },
        ..desc.clone()
    };
    let r = consumer.pull(&forged).into_bytes().await;
    assert_eq!(r, Err(TransferError::UnknownBuffer(forged.buffer)));

    let outside = desc.clone().with_ranges(vec![ByteRange {
        start: 50,
        len: 100,
    }]);
    let r = consumer.pull(&outside).into_bytes().await;
    assert!(matches!(r, Err(TransferError::BadRange { .. })), "{r:?}");

    // The descriptor promises more than the owner holds (a tampered layout).
    let mut lying = desc.clone();
    lying.layout.chunks = vec![200];
    lying.ranges = vec![ByteRange { start: 0, len: 200 }];
    let r = consumer.pull(&lying).into_bytes().await;
    assert!(
        matches!(
            r,
            Err(TransferError::BadRange { .. } | TransferError::SizeMismatch { .. })
        ),
        "{r:?}"
    );

    // Nobody listens there.
    let dead = Descriptor {
        owner: "tcp://127.0.0.1:9".into(),
        ..desc.clone()
    };
    let r = tokio::time::timeout(Duration::from_secs(10), consumer.pull(&dead).into_bytes())
        .await
        .expect("bounded");
    assert!(
        matches!(
            r,
            Err(TransferError::OwnerGone(_) | TransferError::Timeout(_))
        ),
        "{r:?}"
    );
    // The real one is still intact after all that.
    let ok = consumer.pull(&desc).into_bytes().await.expect("pull");
    assert_eq!(ok.len(), 100);
}

/// Latency plus bytes / bandwidth, cut on demand: the simulator's kind of link.
#[derive(Debug)]
struct Wire {
    latency: Duration,
    bytes_per_sec: u64,
    down: AtomicBool,
}

impl Link for Wire {
    fn transit(&self, dir: Direction) -> Transit {
        self.transit_bytes(dir, 0)
    }

    fn transit_bytes(&self, _dir: Direction, bytes: u64) -> Transit {
        let cost = self.latency + Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec as f64);
        let down = self.down.load(Ordering::SeqCst);
        Box::pin(async move {
            if down {
                return Err(CallError::PeerGone("sim".into()));
            }
            tokio::time::sleep(cost).await;
            Ok(())
        })
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn in_memory_pulls_cross_a_modelled_link_on_virtual_time() {
    let hub = TransferHub::new();
    let reg = MetricsRegistry::new();
    let clock = TokioClock::shared();
    let owner = TransferPlane::in_memory("prefill", cfg(), clock.clone(), &reg, &hub);
    let consumer = TransferPlane::in_memory("decode", cfg(), clock, &reg, &hub);
    let wire = Arc::new(Wire {
        latency: Duration::from_millis(1),
        bytes_per_sec: 1_000_000,
        down: AtomicBool::new(false),
    });
    consumer.set_link(owner.endpoint(), wire.clone());
    let desc = owner.register(layers(2, 500_000));
    let t0 = tokio::time::Instant::now();
    let got = consumer.pull(&desc).into_bytes().await.expect("pull");
    assert_eq!(got.len(), 1_000_000);
    // Request + 2 pieces of latency, 1 MB at 1 MB/s.
    assert_eq!(t0.elapsed(), Duration::from_millis(1003));

    // The owner "crashes" mid-pull: pieces already across arrive, then OwnerGone.
    let desc = owner.register(layers(8, 1000));
    let mut pull = consumer.pull(&desc);
    pull.next().await.expect("piece").expect("ok");
    wire.down.store(true, Ordering::SeqCst);
    let (pieces, end) = drain(&mut pull).await;
    assert!(pieces < 7, "{pieces} more pieces crossed a cut link");
    assert!(matches!(end, Some(TransferError::OwnerGone(_))), "{end:?}");
}

/// Takes pieces until the stream ends: how many came, and the error it ended with.
async fn drain(pull: &mut turbine_runtime::transfer::PullStream) -> (usize, Option<TransferError>) {
    let mut n = 0;
    while let Some(item) = pull.next().await {
        match item {
            Ok(_) => n += 1,
            Err(e) => return (n, Some(e)),
        }
    }
    (n, None)
}
