//! Disaggregated serving in one process (`LocalCluster`: real CPU executors, a prefill and
//! a decode worker, KV over in-memory transfer planes), driven through the dispatcher:
//! a remote prefill equals aggregated greedy and its KV crosses; an expired descriptor and
//! a bad one are typed fallbacks (counted by reason) that still produce the same tokens;
//! afterwards no worker holds a KV block.
//!
//! Uses the default model (SmolLM2-135M-Instruct Q4_1); without it the test prints SKIP.

use std::time::Duration;

use futures::StreamExt;
use turbine_actors::cluster_config::{ClusterConfig, WorkerGroup, WorkerRole};
use turbine_actors::disagg::kv_transfer::{KvChunkLayout, KvExport};
use turbine_actors::disagg::wire::ImportOutcome;
use turbine_actors::ids::{RequestId, TokenId};
use turbine_actors::node::local::LocalCluster;
use turbine_actors::protocol::{PreprocessedRequest, SamplingParams, StopConditions};
use turbine_actors::router::dispatch::DispatchRequest;
use turbine_runtime::transfer::{BufferId, ByteRange, Descriptor, Layout};

use crate::worker_support::{self as support};

const MAX_TOKENS: u32 = 5;

fn group(role: WorkerRole) -> WorkerGroup {
    WorkerGroup {
        role,
        replicas: 1,
        kv_blocks: 96,
        threads: 1,
        ..WorkerGroup::default()
    }
}

fn cluster_cfg(roles: &[WorkerRole], expiry_ms: u64) -> ClusterConfig {
    let mut cfg = ClusterConfig {
        workers: roles.iter().map(|r| group(*r)).collect(),
        ..ClusterConfig::default()
    };
    cfg.disaggregation.remote_prefill_min_tokens = 64;
    cfg.disaggregation.transfer.descriptor_expiry_ms = expiry_ms;
    cfg
}

/// A prompt of 7 full blocks and a partial one.
fn prompt() -> Vec<TokenId> {
    (0..120).map(|i| 300 + (i * 37) % 4000).collect()
}

fn stop() -> StopConditions {
    StopConditions {
        max_tokens: MAX_TOKENS,
        stop_token_ids: vec![],
        ignore_eos: true,
    }
}

async fn generate(cluster: &LocalCluster, token_ids: Vec<TokenId>) -> Vec<TokenId> {
    let mut run = cluster
        .pipeline
        .dispatcher()
        .dispatch(DispatchRequest {
            token_ids,
            sampling: SamplingParams::greedy(),
            stop: stop(),
            logprobs: None,
            generated_before: 0,
            images: Vec::new(),
        })
        .await
        .expect("dispatched");
    let mut out = Vec::new();
    while let Some(item) = run.next_output().await {
        let item = item.expect("a token");
        out.extend(item.token_ids);
        if item.finish.is_some() {
            break;
        }
    }
    out
}

fn metric(cluster: &LocalCluster, line_start: &str) -> f64 {
    let text = cluster.metrics.encode().expect("metrics");
    text.lines()
        .filter(|l| l.starts_with(line_start))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Every worker's KV blocks are back in the pool (cached ones may stay, unreferenced).
async fn assert_no_blocks_held(cluster: &LocalCluster) {
    tokio::time::sleep(Duration::from_millis(50)).await;
    for w in &cluster.workers {
        let (used, held, importing) = w
            .inspect(|s| (s.stats().kv.used, s.num_held(), s.num_importing()))
            .await
            .expect("worker alive");
        assert_eq!((used, held, importing), (0, 0, 0), "worker {}", w.id());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_prefill_equals_aggregated_and_bad_or_expired_descriptors_fall_back() {
    let Some(m) = support::default_model() else {
        return;
    };
    let shape = m.config.clone();
    let reference = {
        let agg = LocalCluster::start(&cluster_cfg(&[WorkerRole::Aggregated], 10_000), m)
            .await
            .expect("aggregated cluster");
        generate(&agg, prompt()).await
    };
    assert_eq!(reference.len(), MAX_TOKENS as usize);

    // Descriptors expire at once: the decode worker's pull gets `Expired` and it prefills
    // itself, keeping the first token the prefill worker streamed.
    let roles = [WorkerRole::Prefill, WorkerRole::Decode];
    let expiring = LocalCluster::start(
        &cluster_cfg(&roles, 0),
        support::default_model().expect("model"),
    )
    .await
    .expect("disaggregated cluster");
    assert_eq!(generate(&expiring, prompt()).await, reference);
    assert_eq!(
        metric(
            &expiring,
            "turbine_disagg_prefill_fallbacks_total{reason=\"expired\"}"
        ),
        1.0
    );
    assert_eq!(metric(&expiring, "turbine_disagg_transfers_total"), 0.0);
    assert_no_blocks_held(&expiring).await;
    drop(expiring);

    let cluster = LocalCluster::start(
        &cluster_cfg(&roles, 10_000),
        support::default_model().expect("model"),
    )
    .await
    .expect("disaggregated cluster");
    // A remote prefill: the KV of all 8 blocks crosses, and the tokens are the same.
    assert_eq!(generate(&cluster, prompt()).await, reference);
    assert_eq!(
        metric(
            &cluster,
            "turbine_disagg_prefill_decisions_total{decision=\"remote\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(&cluster, "turbine_disagg_transfer_blocks_total"),
        8.0
    );
    assert_eq!(
        metric(&cluster, "turbine_disagg_prefill_fallbacks_total"),
        0.0
    );
    assert_no_blocks_held(&cluster).await;

    // A descriptor naming a buffer its owner never issued, handed straight to the decode
    // worker (a fresh prompt, so nothing of it is cached there): a typed fallback, and the
    // decode worker's own prefill gives the same tokens as aggregated serving.
    let decode = &cluster.workers[1];
    let mut other = prompt();
    other.reverse();
    let reference_other = {
        let agg = LocalCluster::start(
            &cluster_cfg(&[WorkerRole::Aggregated], 10_000),
            support::default_model().expect("model"),
        )
        .await
        .expect("aggregated cluster");
        generate(&agg, other.clone()).await
    };
    let layout = KvChunkLayout {
        block_size: 16,
        n_layers: shape.n_layers as u32,
        n_kv_heads: shape.n_kv_heads as u32,
        head_dim: shape.head_dim as u32,
        dtype_bytes: 4,
        blocks: 8,
    };
    let bogus = KvExport {
        descriptor: Descriptor {
            owner: "mem://worker-0".to_string(),
            buffer: BufferId {
                incarnation: 0,
                seq: 999_999,
            },
            layout: Layout {
                chunks: vec![layout.chunk_bytes() as u64; shape.n_layers],
            },
            ranges: vec![ByteRange {
                start: 0,
                len: layout.total_bytes() as u64,
            }],
            expires_after_ms: 10_000,
        },
        layout,
        ipc: None,
    };
    let req = PreprocessedRequest {
        id: RequestId(9_000),
        token_ids: other,
        sampling: SamplingParams::greedy(),
        stop: stop(),
        logprobs: None,
        salt: 0,
        generated_before: 0,
        images: Vec::new(),
        embeds: None,
    };
    let (tokens, outcome) = decode
        .decode_remote(req, reference_other[0], Some(bogus))
        .await
        .expect("admitted");
    assert_eq!(
        outcome.await.expect("an outcome"),
        ImportOutcome::Fallback {
            reason: "unknown_buffer".to_string()
        }
    );
    let rest: Vec<TokenId> = tokens
        .flat_map(|o| futures::stream::iter(o.token_ids))
        .collect()
        .await;
    assert_eq!(
        rest,
        reference_other[1..],
        "recomputed locally, second token on"
    );
    assert_no_blocks_held(&cluster).await;
}
