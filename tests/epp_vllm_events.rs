//! vLLM KV events from the cluster file, end to end: `turbine epp -f FILE` whose
//! `external_workers` are two vLLM engines, each with its KV-event publisher
//! (`kv_events: {source: vllm, endpoint, topic}`). The publishers are ZeroMQ PUB sockets in
//! this test sending what vLLM sends: `[topic, 8-byte big-endian sequence, msgspec
//! KVEventBatch]` (array form: `[ts, [BlockStored...], data_parallel_rank]`). The picker's
//! decision (the endpoint it answers, played as Envoy's ext_proc exchange) must follow the
//! blocks each engine says it stored, and a gap in one engine's sequence must clear what the
//! router knew of it.
//!
//! Needs the default model's tokenizer (`scripts/setup-test-deps.sh`).

mod common;

use common::{cluster_file, free_port, spawn_turbine};
use std::time::{Duration, Instant};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use turbine_actors::epp::proto::{
    processing_request::Request, processing_response::Response, HeaderMap, HeaderValue, HttpBody,
    HttpHeaders, ProcessingRequest, ProcessingResponse, PROCESS_PATH,
};
use zeromq::{Socket, SocketSend};

const ENDPOINTS: [&str; 2] = ["127.0.0.2:8000", "127.0.0.3:8000"];
const TOPIC: &str = "kv-events";
const BLOCK: usize = 16;

/// A MessagePack value in msgspec's array layout.
enum V {
    Nil,
    UInt(u64),
    F(f64),
    S(&'static str),
    A(Vec<V>),
}

fn enc(v: &V, out: &mut Vec<u8>) {
    use rmp::encode::*;
    match v {
        V::Nil => write_nil(out).unwrap(),
        V::UInt(u) => {
            write_uint(out, *u).unwrap();
        }
        V::F(f) => write_f64(out, *f).unwrap(),
        V::S(s) => write_str(out, s).unwrap(),
        V::A(items) => {
            write_array_len(out, items.len() as u32).unwrap();
            for i in items {
                enc(i, out);
            }
        }
    }
}

/// vLLM's `BlockStored(block_hashes, parent_block_hash, token_ids, block_size, lora_id,
/// medium)` for `tokens` (whole blocks), with vLLM's own hashes `first..`.
fn stored(first: u64, parent: Option<u64>, tokens: &[u32]) -> V {
    let n = (tokens.len() / BLOCK) as u64;
    V::A(vec![
        V::S("BlockStored"),
        V::A((first..first + n).map(V::UInt).collect()),
        parent.map_or(V::Nil, V::UInt),
        V::A(tokens.iter().map(|t| V::UInt(u64::from(*t))).collect()),
        V::UInt(BLOCK as u64),
        V::Nil,
        V::S("GPU"),
    ])
}

/// One KVEventBatch message: `[topic, seq, payload]`.
fn message(seq: u64, events: Vec<V>) -> zeromq::ZmqMessage {
    let mut payload = Vec::new();
    enc(
        &V::A(vec![V::F(1.0), V::A(events), V::UInt(0)]),
        &mut payload,
    );
    let frames = vec![
        bytes::Bytes::from_static(TOPIC.as_bytes()),
        bytes::Bytes::from(seq.to_be_bytes().to_vec()),
        bytes::Bytes::from(payload),
    ];
    zeromq::ZmqMessage::try_from(frames).unwrap()
}

fn header(k: &str, v: &str) -> HeaderValue {
    HeaderValue {
        key: k.into(),
        value: String::new(),
        raw_value: v.as_bytes().to_vec(),
    }
}

/// Plays Envoy's exchange for a completion of `tokens` and returns the endpoint the picker
/// answered (None when it answered with an immediate response instead).
async fn pick(addr: &str, tokens: &[u32]) -> Option<String> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .ok()?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.ok()?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let codec = tonic_prost::ProstCodec::<ProcessingRequest, ProcessingResponse>::default();
    tx.send(ProcessingRequest {
        request: Some(Request::RequestHeaders(HttpHeaders {
            headers: Some(HeaderMap {
                headers: vec![
                    header(":method", "POST"),
                    header(":path", "/v1/completions"),
                    header("content-type", "application/json"),
                ],
            }),
            end_of_stream: false,
        })),
        metadata_context: None,
        observability_mode: false,
    })
    .await
    .unwrap();
    let mut answers = grpc
        .streaming(
            tonic::Request::new(ReceiverStream::new(rx)),
            PathAndQuery::from_static(PROCESS_PATH),
            codec,
        )
        .await
        .expect("Process")
        .into_inner();
    answers
        .message()
        .await
        .expect("answer")
        .expect("headers answered");
    let body = serde_json::json!({"prompt": tokens, "max_tokens": 1}).to_string();
    tx.send(ProcessingRequest {
        request: Some(Request::RequestBody(HttpBody {
            body: body.into_bytes(),
            end_of_stream: true,
        })),
        metadata_context: None,
        observability_mode: false,
    })
    .await
    .unwrap();
    let answer = answers
        .message()
        .await
        .expect("answer")
        .expect("body answered");
    drop(tx);
    match answer.response {
        Some(Response::RequestBody(b)) => b
            .response?
            .header_mutation?
            .set_headers
            .into_iter()
            .filter_map(|o| o.header)
            .find(|h| h.key == "x-gateway-destination-endpoint")
            .map(|h| h.text()),
        _ => None,
    }
}

#[test]
fn vllm_kv_events_named_in_the_cluster_file_steer_the_picker() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    // The two engines' publishers (vLLM binds, the router connects).
    let mut publishers: Vec<(zeromq::PubSocket, String)> = rt.block_on(async {
        let mut v = Vec::new();
        for _ in 0..2 {
            let mut s = zeromq::PubSocket::new();
            let ep = s.bind("tcp://127.0.0.1:0").await.unwrap().to_string();
            v.push((s, ep));
        }
        v
    });
    let grpc = free_port();
    let external: String = publishers
        .iter()
        .enumerate()
        .map(|(i, (_, ep))| {
            format!(
                "  - {{id: {}, gateway_endpoint: \"{}\", kv_events: {{source: vllm, endpoint: \"{ep}\", topic: {TOPIC}}}}}\n",
                i + 1,
                ENDPOINTS[i]
            )
        })
        .collect();
    let file = cluster_file(
        "epp-vllm",
        &format!(
            "router: {{policy: kv, overlap_weight: 1.0, temperature: 0.0}}\n\
             workers:\n  - {{replicas: 1, block_size: {BLOCK}, kv_blocks: 256}}\n\
             discovery: {{backend: static, workers: []}}\n\
             external_workers:\n{external}"
        ),
    );
    let listen = format!("127.0.0.1:{grpc}");
    let _epp = spawn_turbine(
        &[
            "epp",
            "-f",
            file.to_str().unwrap(),
            "--bind",
            "127.0.0.1:0",
            "--listen",
            &listen,
            "--no-fetch",
        ],
        "turbine epp serving",
    );
    // An 8-block prompt of token ids (no tokenizer in between: the same ids are hashed).
    let prompt: Vec<u32> = (0..8 * BLOCK as u32).map(|i| 1_000 + i * 7).collect();
    let unrelated: Vec<u32> = (0..4 * BLOCK as u32).map(|i| 20_000 + i).collect();

    // Publishes `events` as batch `seq` of engine `e` until the picker answers `want` for the
    // prompt (the first messages go nowhere until the subscription reaches the publisher;
    // a repeated batch 0 is a restart to the feed: cleared and applied again, the same state).
    let mut until = |e: usize, seq: u64, events: &dyn Fn() -> Vec<V>, want: &str, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let sent = rt.block_on(publishers[e].0.send(message(seq, events())));
            sent.expect("publish");
            std::thread::sleep(Duration::from_millis(100));
            let got = rt.block_on(pick(&listen, &prompt));
            if got.as_deref() == Some(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: the picker answered {got:?}"
            );
        }
    };

    // 1. Engine 2 stores the prompt's first 4 blocks: the prompt goes to engine 2 (with no
    //    KV anywhere, ties go to the lower id, engine 1).
    until(
        1,
        0,
        &|| vec![stored(500, None, &prompt[..4 * BLOCK])],
        ENDPOINTS[1],
        "engine 2's stored blocks",
    );
    // 2. Engine 1 stores 6 of them: more overlap, engine 1.
    until(
        0,
        0,
        &|| vec![stored(900, None, &prompt[..6 * BLOCK])],
        ENDPOINTS[0],
        "engine 1's stored blocks",
    );
    // 3. Engine 1's next batch comes with a gap in its sequence (batches 1..4 lost): what the
    //    router knew of engine 1 is cleared, so engine 2's 4 blocks win again.
    until(
        0,
        5,
        &|| vec![stored(990, None, &unrelated)],
        ENDPOINTS[1],
        "a sequence gap on engine 1",
    );
    if let Some(dir) = file.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
}
