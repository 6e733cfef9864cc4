//! A ROUTER flooded with garbage keeps serving and counts every dropped frame.

use crate::common;

use bytes::Bytes;
use common::{pair, Probe, Req, Resp};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use turbine_runtime::wire::{encode_frame, Envelope, Kind, WIRE_VERSION};
use turbine_runtime::DropReason;
use zeromq::{DealerSocket, Socket, SocketSend, ZmqMessage};

/// One garbage frame of a seeded shape: random bytes, empty-ish, wrong version, truncated
/// valid envelope, oversized, or random bytes behind a valid version byte.
fn garbage(rng: &mut ChaCha8Rng, max_frame: usize) -> ZmqMessage {
    let valid = encode_frame(&Envelope {
        to: "probe".into(),
        from: "fuzzer".into(),
        corr_id: rng.gen(),
        kind: Kind::Call,
        payload: Bytes::from_static(&[0x91, 0xa1, 0x78]),
        trace: None,
    });
    let frame: Vec<u8> = match rng.gen_range(0..6) {
        0 => (0..rng.gen_range(1..200)).map(|_| rng.gen()).collect(),
        1 => vec![WIRE_VERSION],
        2 => {
            let mut f = valid.to_vec();
            f[0] = rng.gen_range(2..=255);
            f
        }
        3 => valid[..rng.gen_range(1..valid.len())].to_vec(),
        4 => vec![WIRE_VERSION; max_frame + 1 + rng.gen_range(0..100)],
        _ => {
            let mut f = vec![WIRE_VERSION];
            f.extend((0..rng.gen_range(1..100)).map(|_| rng.gen::<u8>()));
            f
        }
    };
    if rng.gen_range(0..10) == 0 {
        // A multipart message is not our framing either.
        ZmqMessage::try_from(vec![Bytes::from(frame), Bytes::from_static(b"extra")]).unwrap()
    } else {
        ZmqMessage::from(frame)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_garbage_frames_leave_the_router_serving() {
    const N: u64 = 10_000;
    let (server, client, _shared, _c) = pair().await;
    let max_frame = server.config().max_frame_bytes;
    let mut raw = DealerSocket::new();
    raw.connect(server.endpoint()).await.unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for _ in 0..N {
        raw.send(garbage(&mut rng, max_frame)).await.unwrap();
    }

    // Well-formed calls keep being answered while the garbage is processed; stop once the
    // server has read every garbage frame plus every call frame.
    let addr = client
        .connect::<Probe>(server.endpoint(), "probe")
        .await
        .unwrap();
    let mut calls = 0u64;
    loop {
        calls += 1;
        assert_eq!(
            addr.call(Req::Echo("alive".into())).await.unwrap(),
            Resp::Text("alive".into())
        );
        if server.metrics().frames_in() >= N + calls {
            break;
        }
        tokio::task::yield_now().await;
    }
    let m = server.metrics();
    assert_eq!(
        m.dropped_total(),
        N,
        "every garbage frame counted as dropped"
    );
    assert!(m.dropped(DropReason::Oversized) > 0);
    assert!(m.dropped(DropReason::UnknownVersion) > 0);
    assert!(m.dropped(DropReason::Malformed) > 0);
    assert_eq!(
        addr.call(Req::Echo("still here".into())).await.unwrap(),
        Resp::Text("still here".into())
    );
    let text = server.registry().encode_text();
    assert!(text.contains("turbine_runtime_dropped_frames"), "{text}");
}
