//! vLLM KV event decoding, against payloads built by hand from vLLM's published schema
//! (`vllm/distributed/kv_events.py`: msgspec structs, tagged union events).

use proptest::prelude::*;
use turbine_actors::ids::WorkerId;
use turbine_actors::kv::hash::{hash_blocks, BlockHash, BlockSize};
use turbine_actors::kv::indexer::FlashIndexer;
use turbine_actors::kv::vllm::{
    decode_vllm_batch, parse_vllm_seq, vllm_hash_from_bytes, VllmDecodeError, VllmHashTranslator,
    VllmKvEvent,
};
use turbine_actors::kv::KvEvent;

/// Minimal hand-rolled MessagePack writer over `rmp::encode`, mirroring msgspec's output.
enum V {
    Nil,
    Int(i64),
    UInt(u64),
    F(f64),
    S(&'static str),
    B(Vec<u8>),
    A(Vec<V>),
    M(Vec<(&'static str, V)>),
}

fn enc(v: &V, out: &mut Vec<u8>) {
    use rmp::encode::*;
    match v {
        V::Nil => write_nil(out).unwrap(),
        V::Int(i) => {
            write_sint(out, *i).unwrap();
        }
        V::UInt(u) => {
            write_uint(out, *u).unwrap();
        }
        V::F(f) => write_f64(out, *f).unwrap(),
        V::S(s) => write_str(out, s).unwrap(),
        V::B(b) => write_bin(out, b).unwrap(),
        V::A(items) => {
            write_array_len(out, items.len() as u32).unwrap();
            for i in items {
                enc(i, out);
            }
        }
        V::M(entries) => {
            write_map_len(out, entries.len() as u32).unwrap();
            for (k, v) in entries {
                write_str(out, k).unwrap();
                enc(v, out);
            }
        }
    }
}

fn bytes(v: &V) -> Vec<u8> {
    let mut out = Vec::new();
    enc(v, &mut out);
    out
}

fn ints(xs: &[u64]) -> V {
    V::A(xs.iter().map(|x| V::UInt(*x)).collect())
}

fn fixture_hex() -> Vec<u8> {
    let text = include_str!("fixtures/vllm_batch_array_like.hex").trim();
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}

/// The same batch as the hex fixture, built field by field in array_like layout.
fn array_like_batch() -> V {
    V::A(vec![
        V::F(1.5),
        V::A(vec![
            V::A(vec![
                V::S("BlockStored"),
                ints(&[1, 2]),
                V::Nil,
                ints(&[5, 6, 7, 8]),
                V::UInt(2),
                V::Nil,
                V::S("GPU"),
            ]),
            V::A(vec![V::S("BlockRemoved"), ints(&[1]), V::S("GPU")]),
            V::A(vec![V::S("AllBlocksCleared")]),
        ]),
        V::UInt(0),
    ])
}

#[test]
fn hex_fixture_matches_hand_built_layout_and_decodes() {
    let payload = fixture_hex();
    assert_eq!(payload, bytes(&array_like_batch()));
    let batch = decode_vllm_batch(7, &payload).unwrap();
    assert_eq!(batch.seq, 7);
    assert_eq!(batch.ts, 1.5);
    assert_eq!(batch.data_parallel_rank, Some(0));
    assert_eq!(
        batch.events,
        vec![
            VllmKvEvent::BlockStored {
                block_hashes: vec![BlockHash(1), BlockHash(2)],
                parent_block_hash: None,
                token_ids: vec![5, 6, 7, 8],
                block_size: BlockSize::new(2).unwrap(),
                lora_id: None,
                medium: Some("GPU".into()),
            },
            VllmKvEvent::BlockRemoved {
                block_hashes: vec![BlockHash(1)],
                medium: Some("GPU".into()),
            },
            VllmKvEvent::AllBlocksCleared,
        ]
    );
}

#[test]
fn older_array_layout_without_medium_or_dp_rank() {
    let v = V::A(vec![
        V::F(2.0),
        V::A(vec![V::A(vec![
            V::S("BlockStored"),
            V::A(vec![V::Int(-5)]),
            V::Int(-9),
            ints(&[1, 2]),
            V::UInt(2),
            V::UInt(3),
        ])]),
    ]);
    let b = decode_vllm_batch(0, &bytes(&v)).unwrap();
    assert_eq!(b.data_parallel_rank, None);
    match &b.events[0] {
        VllmKvEvent::BlockStored {
            block_hashes,
            parent_block_hash,
            lora_id,
            medium,
            ..
        } => {
            // Negative Python hashes keep their 64-bit pattern.
            assert_eq!(block_hashes, &vec![BlockHash(-5i64 as u64)]);
            assert_eq!(*parent_block_hash, Some(BlockHash(-9i64 as u64)));
            assert_eq!(*lora_id, Some(3));
            assert_eq!(*medium, None);
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn newer_map_layout_with_bytes_hashes_and_extra_fields() {
    let h1 = vec![0xAA; 32];
    let h2 = vec![0xBB; 32];
    let v = V::M(vec![
        ("ts", V::F(3.25)),
        (
            "events",
            V::A(vec![
                V::M(vec![
                    ("type", V::S("BlockStored")),
                    (
                        "block_hashes",
                        V::A(vec![V::B(h1.clone()), V::B(h2.clone())]),
                    ),
                    ("parent_block_hash", V::Nil),
                    ("token_ids", ints(&[1, 2, 3, 4])),
                    ("block_size", V::UInt(2)),
                    ("lora_id", V::Nil),
                    ("medium", V::S("GPU")),
                    ("lora_name", V::Nil),
                    ("group_idx", V::UInt(0)),
                ]),
                V::M(vec![
                    ("type", V::S("BlockRemoved")),
                    ("block_hashes", V::A(vec![V::B(h2.clone())])),
                    ("medium", V::Nil),
                ]),
            ]),
        ),
        ("data_parallel_rank", V::UInt(1)),
    ]);
    let b = decode_vllm_batch(3, &bytes(&v)).unwrap();
    assert_eq!(b.data_parallel_rank, Some(1));
    let stored = match &b.events[0] {
        VllmKvEvent::BlockStored { block_hashes, .. } => block_hashes.clone(),
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(
        stored,
        vec![vllm_hash_from_bytes(&h1), vllm_hash_from_bytes(&h2)]
    );
    assert_ne!(stored[0], stored[1]);
    assert_eq!(
        b.events[1],
        VllmKvEvent::BlockRemoved {
            block_hashes: vec![vllm_hash_from_bytes(&h2)],
            medium: None
        }
    );
}

#[test]
fn malformed_payloads_are_typed_errors() {
    let unknown = V::A(vec![V::F(0.0), V::A(vec![V::A(vec![V::S("Nope")])])]);
    assert_eq!(
        decode_vllm_batch(0, &bytes(&unknown)),
        Err(VllmDecodeError::UnknownTag("Nope".into()))
    );
    let zero_bs = V::A(vec![
        V::F(0.0),
        V::A(vec![V::A(vec![
            V::S("BlockStored"),
            ints(&[1]),
            V::Nil,
            ints(&[]),
            V::UInt(0),
        ])]),
    ]);
    assert_eq!(
        decode_vllm_batch(0, &bytes(&zero_bs)),
        Err(VllmDecodeError::BadBlockSize(0))
    );
    assert!(matches!(
        decode_vllm_batch(0, &bytes(&V::S("hi"))),
        Err(VllmDecodeError::Shape { .. })
    ));
    assert!(matches!(
        decode_vllm_batch(0, &[0xc1]),
        Err(VllmDecodeError::MsgPack(_))
    ));
    let payload = fixture_hex();
    for cut in 0..payload.len() {
        assert!(decode_vllm_batch(0, &payload[..cut]).is_err());
    }
}

#[test]
fn seq_frame_is_big_endian_and_exactly_eight_bytes() {
    assert_eq!(parse_vllm_seq(&[0, 0, 0, 0, 0, 0, 1, 2]), Ok(258));
    assert_eq!(
        parse_vllm_seq(&[1, 2]),
        Err(VllmDecodeError::BadSeqFrame(2))
    );
}

#[test]
fn raw_batch_indexes_vllm_hashes() {
    let ix = FlashIndexer::default();
    let batch = decode_vllm_batch(0, &fixture_hex()).unwrap();
    let kv = batch.into_kv_batch(WorkerId(4));
    assert_eq!(kv.worker, WorkerId(4));
    assert!(matches!(kv.events[0], KvEvent::BlockStored { .. }));
    ix.apply(&kv);
    // Stored [1,2], removed [1], then cleared: nothing left.
    assert_eq!(ix.block_count(), 0);
}

#[test]
fn translator_rehashes_into_turbine_domain_so_router_hashes_match() {
    let bs = BlockSize::new(2).unwrap();
    let tokens: Vec<u32> = vec![10, 11, 12, 13, 14, 15];
    // vLLM stores the first two blocks, then the third with a vLLM-hash parent.
    let first = V::A(vec![
        V::F(0.0),
        V::A(vec![V::A(vec![
            V::S("BlockStored"),
            V::A(vec![V::B(vec![1; 32]), V::B(vec![2; 32])]),
            V::Nil,
            ints(&[10, 11, 12, 13]),
            V::UInt(2),
            V::Nil,
        ])]),
    ]);
    let second = V::A(vec![
        V::F(0.0),
        V::A(vec![
            V::A(vec![
                V::S("BlockStored"),
                V::A(vec![V::B(vec![3; 32])]),
                V::B(vec![2; 32]),
                ints(&[14, 15]),
                V::UInt(2),
                V::Nil,
            ]),
            // Unknown parent: cannot be translated.
            V::A(vec![
                V::S("BlockStored"),
                V::A(vec![V::B(vec![9; 32])]),
                V::B(vec![8; 32]),
                ints(&[1, 1]),
                V::UInt(2),
                V::Nil,
            ]),
        ]),
    ]);
    let mut tr = VllmHashTranslator::new();
    let ix = FlashIndexer::default();
    let w = WorkerId(1);
    ix.apply(&tr.translate(w, decode_vllm_batch(0, &bytes(&first)).unwrap()));
    ix.apply(&tr.translate(w, decode_vllm_batch(1, &bytes(&second)).unwrap()));
    assert_eq!(tr.unresolved_blocks(), 1);
    let ours = hash_blocks(&tokens, bs, 0);
    let m = ix.find_matches(&ours);
    assert_eq!(m.get(w), 3);
}

proptest! {
    #[test]
    fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode_vllm_batch(0, &data);
    }

    #[test]
    fn mutated_fixture_never_panics(pos in 0usize..64, byte in any::<u8>()) {
        let mut data = fixture_hex();
        let i = pos % data.len();
        data[i] = byte;
        let _ = decode_vllm_batch(0, &data);
    }
}

/// One vLLM `BlockStored` event in the array layout: blocks of `BLOCK` tokens.
fn stored(hashes: &[u64], parent: Option<u64>, tokens: &[u32]) -> V {
    V::A(vec![
        V::S("BlockStored"),
        ints(hashes),
        parent.map_or(V::Nil, V::UInt),
        V::A(tokens.iter().map(|t| V::UInt(u64::from(*t))).collect()),
        V::UInt(16),
        V::Nil,
        V::S("GPU"),
    ])
}

fn batch_of(events: Vec<V>) -> Vec<u8> {
    bytes(&V::A(vec![V::F(1.0), V::A(events), V::UInt(0)]))
}

async fn publish(socket: &mut zeromq::PubSocket, seq: u64, payload: Vec<u8>) {
    use zeromq::SocketSend;
    let frames = vec![
        bytes::Bytes::from_static(b"kv-events"),
        bytes::Bytes::from(seq.to_be_bytes().to_vec()),
        bytes::Bytes::from(payload),
    ];
    socket
        .send(zeromq::ZmqMessage::try_from(frames).unwrap())
        .await
        .unwrap();
}

/// Waits (up to 10 s) until `done` holds for the feed's counters.
async fn until(
    feed: &std::sync::Mutex<turbine_actors::kv::vllm_feed::VllmFeed>,
    done: impl Fn(&turbine_actors::kv::vllm_feed::VllmFeedStats) -> bool,
) {
    for _ in 0..1000 {
        if done(&feed.lock().unwrap().stats()) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("feed stuck at {:?}", feed.lock().unwrap().stats());
}

#[tokio::test]
async fn vllm_batches_over_a_zmq_pub_socket_feed_the_indexer_and_a_sequence_gap_clears_the_worker()
{
    use zeromq::Socket;
    let mut publisher = zeromq::PubSocket::new();
    let endpoint = publisher
        .bind("tcp://127.0.0.1:0")
        .await
        .unwrap()
        .to_string();
    let ix = std::sync::Arc::new(FlashIndexer::default());
    let worker = WorkerId(4);
    let (task, feed) =
        turbine_actors::kv::vllm_feed::follow_vllm_publisher(&endpoint, "", worker, ix.clone())
            .await
            .unwrap();
    // PUB drops what it sends before the subscription arrives: knock with a message that is
    // no batch (counted malformed, no sequence number used) until the feed hears one.
    let mut knocks = 0;
    while feed.lock().unwrap().stats().malformed == 0 {
        use zeromq::SocketSend;
        let hello = zeromq::ZmqMessage::from(bytes::Bytes::from_static(b"hello"));
        publisher.send(hello).await.unwrap();
        knocks += 1;
        assert!(knocks < 1000, "the subscriber never connected");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }

    // A 4-block prompt stored in two batches (vLLM's hashes are its own: 101..104).
    let tokens: Vec<u32> = (0..64).map(|i| 7_000 + i).collect();
    let ours = hash_blocks(&tokens, BlockSize::DEFAULT, 0);
    publish(
        &mut publisher,
        0,
        batch_of(vec![stored(&[101, 102], None, &tokens[..32])]),
    )
    .await;
    publish(
        &mut publisher,
        1,
        batch_of(vec![stored(&[103, 104], Some(102), &tokens[32..])]),
    )
    .await;
    until(&feed, |s| s.batches == 2).await;
    // Indexed under turbine's hashes of the same tokens: the router's query finds all 4.
    assert_eq!(ix.find_matches(&ours).get(worker), 4);

    // vLLM evicts the tail block; the overlap shrinks to 3.
    publish(
        &mut publisher,
        2,
        bytes(&V::A(vec![
            V::F(2.0),
            V::A(vec![V::A(vec![
                V::S("BlockRemoved"),
                ints(&[104]),
                V::S("GPU"),
            ])]),
        ])),
    )
    .await;
    until(&feed, |s| s.batches == 3).await;
    assert_eq!(ix.find_matches(&ours).get(worker), 3);

    // Batch 3 is lost; batch 4 extends the prompt from block 103. The gap clears the worker
    // (its view is no longer exact) and the extension cannot be translated (its parent's
    // translation went with the clear).
    publish(
        &mut publisher,
        4,
        batch_of(vec![stored(&[104], Some(103), &tokens[48..])]),
    )
    .await;
    until(&feed, |s| s.batches == 4).await;
    let s = feed.lock().unwrap().stats();
    assert_eq!((s.gaps, s.unresolved_blocks), (1, 1));
    assert_eq!(ix.find_matches(&ours).get(worker), 0);
    assert_eq!(ix.worker_block_count(worker), 0);

    // The worker stores the prompt again from its first block: indexed at once.
    publish(
        &mut publisher,
        5,
        batch_of(vec![stored(&[101, 102, 103, 104], None, &tokens)]),
    )
    .await;
    until(&feed, |s| s.batches == 5).await;
    assert_eq!(ix.find_matches(&ours).get(worker), 4);

    // A payload that is no KVEventBatch is counted and skipped; the feed goes on.
    let before = feed.lock().unwrap().stats().malformed;
    publish(&mut publisher, 6, vec![0xc1]).await;
    publish(
        &mut publisher,
        6,
        batch_of(vec![V::A(vec![V::S("AllBlocksCleared")])]),
    )
    .await;
    until(&feed, |s| s.batches == 6).await;
    let s = feed.lock().unwrap().stats();
    assert_eq!((s.malformed, s.gaps), (before + 1, 1));
    assert_eq!(ix.find_matches(&ours).get(worker), 0);
    task.abort();
}
