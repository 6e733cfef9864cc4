//! A worker's image embeddings with real components: the tiny Idefics3 fixture
//! (tests/fixtures/tiny-idefics3) on CPU executors with its vision tower, the prompt laid out
//! by the real codec, KV moved over an in-memory transfer plane.
//!
//! - P/D: the prefill worker encodes the image (no encoder here) and the decode worker that
//!   imports the prompt's KV encodes nothing (its `images_encoded` stays 0); the tokens are
//!   transformers' greedy tokens (serving.json);
//! - a decode worker given no KV recomputes the prompt: it makes the embeddings then, once,
//!   and the tokens are the same.

use std::path::PathBuf;
use std::sync::Arc;
use turbine_actors::disagg::wire::ImportOutcome;
use turbine_actors::executor::Executor;
use turbine_actors::ids::{RequestId, TokenId, WorkerId};
use turbine_actors::protocol::{
    ChatImage, ChatMessage, MessagePart, PreprocessedRequest, SamplingParams, StopConditions,
};
use turbine_actors::worker::{EngineTime, WorkerHandle};
use turbine_kernels::cpu::{CpuBackend, CpuBackendOptions};
use turbine_kernels::loader::{load_model, LoadedModel};
use turbine_kernels::vision::{decode, DecodeLimits};
use turbine_runtime::transfer::{TransferConfig, TransferHub, TransferPlane};
use turbine_runtime::{MetricsRegistry, TokioClock};

use crate::worker_support::{self as support, tokens};

const BLOCK: u32 = 16;

fn fixture() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/tiny-idefics3"
    ))
}

fn worker(m: &LoadedModel, id: u64, plane: Option<TransferPlane>) -> WorkerHandle {
    let backend = CpuBackend::new(
        m.config.clone(),
        &m.weights,
        CpuBackendOptions {
            num_blocks: 64,
            block_size: BLOCK as usize,
            threads: 1,
        },
    )
    .expect("backend");
    let vision = Arc::new(m.vision.clone().expect("the fixture has a vision tower"));
    let executor = Executor::spawn(&format!("exec-{id}"), Box::new(backend))
        .expect("thread")
        .with_vision(vision);
    WorkerHandle::spawn_with_plane(
        WorkerId(id),
        support::scheduler(64, BLOCK, 256, 4, 2048),
        executor,
        Box::new(|_| {}),
        EngineTime::real(),
        plane,
    )
}

/// Image a with its question, laid out by the codec, and transformers' greedy tokens.
fn image_request(id: u64) -> (PreprocessedRequest, Vec<TokenId>) {
    let dir = fixture();
    let serving: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("serving.json")).unwrap()).unwrap();
    let a = &serving["images"]["a"];
    let bytes = std::fs::read(dir.join(a["image"].as_str().unwrap())).unwrap();
    let image = ChatImage::new(decode(&bytes, &DecodeLimits::default()).unwrap(), bytes);
    let question = a["question"].as_str().unwrap().to_string();
    let message = ChatMessage {
        role: "user".into(),
        content: question.clone(),
        parts: vec![MessagePart::Image(image), MessagePart::Text(question)],
        ..ChatMessage::default()
    };
    let (codec, _) = turbine_actors::node::codec_of(load_model(&dir).unwrap()).unwrap();
    let (token_ids, images) = codec.chat_prompt(&[message], &[]).unwrap();
    let reference: Vec<TokenId> = a["greedy_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as TokenId)
        .collect();
    let req = PreprocessedRequest {
        id: RequestId(id),
        token_ids,
        sampling: SamplingParams::greedy(),
        stop: StopConditions {
            max_tokens: reference.len() as u32,
            stop_token_ids: vec![],
            ignore_eos: true,
        },
        logprobs: None,
        salt: 0,
        generated_before: 0,
        images,
        embeds: None,
    };
    (req, reference)
}

/// The worker's image count as of its last step.
fn images_encoded(w: &WorkerHandle) -> u64 {
    w.stats().images_encoded
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decode_worker_encodes_images_only_when_it_must_recompute_the_prompt() {
    let m = load_model(&fixture()).expect("the Idefics3 fixture loads");
    let (reg, clock, hub) = (
        MetricsRegistry::new(),
        TokioClock::shared(),
        TransferHub::new(),
    );
    let plane = |name: &str| {
        TransferPlane::in_memory(name, TransferConfig::default(), clock.clone(), &reg, &hub)
    };
    let prefill = worker(&m, 1, Some(plane("prefill")));
    let decode = worker(&m, 2, Some(plane("decode")));

    // P/D: prefill encodes and computes the prompt; decode imports the KV.
    let (req, reference) = image_request(1);
    let (first, export) = prefill
        .prefill(req.clone())
        .await
        .expect("prefill admitted");
    let first = tokens(first).await;
    assert_eq!(first.len(), 1);
    let kv = export
        .await
        .expect("an export")
        .expect("the KV's descriptor");
    let (rest, outcome) = decode
        .decode_remote(req, first[0], Some(kv))
        .await
        .expect("decode admitted");
    let outcome = outcome.await.expect("an import outcome");
    assert!(
        matches!(outcome, ImportOutcome::Imported { .. }),
        "{outcome:?}"
    );
    let mut got = first.clone();
    got.extend(tokens(rest).await);
    assert_eq!(got, reference, "P/D with an image equals transformers");
    assert_eq!(images_encoded(&prefill), 1, "the prefill worker encoded it");
    assert_eq!(
        images_encoded(&decode),
        0,
        "the decode worker needed no embeddings"
    );

    // No KV for the decode worker (the prefill worker's descriptor never came): it
    // recomputes the prompt, encoding the image for that, once.
    let (req, _) = image_request(2);
    let (rest, outcome) = decode
        .decode_remote(req, first[0], None)
        .await
        .expect("decode admitted");
    let outcome = outcome.await.expect("an import outcome");
    assert!(
        matches!(&outcome, ImportOutcome::Fallback { reason } if reason == "no_descriptor"),
        "{outcome:?}"
    );
    let mut got = first;
    got.extend(tokens(rest).await);
    assert_eq!(
        got, reference,
        "a local recompute with the image equals transformers"
    );
    assert_eq!(
        images_encoded(&decode),
        1,
        "encoded once, for the recompute"
    );
}
