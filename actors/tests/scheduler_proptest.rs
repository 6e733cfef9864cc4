//! Random workloads against small pools: invariants hold after every step, every accepted
//! request ends exactly once, outputs match an unscheduled reference, and nothing leaks.

use crate::worker_support as support;

use proptest::prelude::*;
use std::collections::BTreeMap;
use support::*;
use turbine_actors::ids::{RequestId, TokenId};
use turbine_actors::kv::events::KvEvent;
use turbine_actors::protocol::FinishReason;
use turbine_actors::worker::{
    AdmitError, BlockManager, BlockManagerConfig, Scheduler, SchedulerConfig, StepPlan,
};

#[derive(Clone, Debug)]
struct Arrival {
    step: u64,
    family: u32,
    shared: usize,
    len: usize,
    max_tokens: u32,
    /// Abort this many steps after arrival (None: never).
    abort_after: Option<u64>,
    /// Abort between schedule and completion of that step instead of before scheduling.
    abort_in_flight: bool,
}

#[derive(Clone, Debug)]
struct Setup {
    num_blocks: u32,
    block_size: u32,
    budget: usize,
    max_num_seqs: usize,
    max_model_len: usize,
    chunked: bool,
    prefix_caching: bool,
    stop_tokens: Vec<TokenId>,
    /// `contended_prefill_chunk` (usize::MAX: no cap).
    prefill_cap: usize,
}

fn setup() -> impl Strategy<Value = Setup> {
    (
        3u32..48,
        1u32..9,
        1usize..48,
        1usize..7,
        4usize..100,
        any::<bool>(),
        any::<bool>(),
        prop::collection::vec(0u32..997, 0..12),
        prop::option::of(1usize..24),
    )
        .prop_map(
            |(
                num_blocks,
                block_size,
                budget,
                max_num_seqs,
                max_model_len,
                chunked,
                pc,
                stop,
                cap,
            )| {
                Setup {
                    num_blocks,
                    block_size,
                    budget: if chunked {
                        budget
                    } else {
                        budget.max(max_model_len)
                    },
                    max_num_seqs,
                    max_model_len,
                    chunked,
                    prefix_caching: pc,
                    stop_tokens: stop,
                    prefill_cap: cap.unwrap_or(usize::MAX),
                }
            },
        )
}

fn arrivals() -> impl Strategy<Value = Vec<Arrival>> {
    prop::collection::vec(
        (
            0u64..12,
            0u32..3,
            0usize..40,
            1usize..40,
            0u32..20,
            prop::option::weighted(0.2, 0u64..20),
            any::<bool>(),
        )
            .prop_map(
                |(step, family, shared, len, max_tokens, abort_after, in_flight)| Arrival {
                    step,
                    family,
                    shared: shared.min(len),
                    len,
                    max_tokens,
                    abort_after,
                    abort_in_flight: in_flight,
                },
            ),
        1..14,
    )
}

fn build(setup: &Setup) -> Scheduler {
    Scheduler::new(
        SchedulerConfig {
            max_num_batched_tokens: setup.budget,
            max_num_seqs: setup.max_num_seqs,
            max_model_len: setup.max_model_len,
            enable_chunked_prefill: setup.chunked,
            contended_prefill_chunk: setup.prefill_cap,
        },
        BlockManager::new(BlockManagerConfig {
            num_blocks: setup.num_blocks,
            block_size: bs(setup.block_size),
            enable_prefix_caching: setup.prefix_caching,
        }),
    )
    .unwrap()
}

/// Prompts of one family share their first `shared` tokens, so prefixes hit the cache.
fn prompt_of(id: u64, a: &Arrival) -> Vec<TokenId> {
    let mut p: Vec<TokenId> = (0..a.shared as u32)
        .map(|i| 1000 + a.family * 1000 + i)
        .collect();
    p.extend((0..(a.len - a.shared) as u32).map(|i| 100_000 + id as u32 * 1000 + i));
    p
}

/// Everything observable from one run, for the determinism check.
#[derive(Debug, PartialEq)]
struct RunLog {
    plans: Vec<StepPlan>,
    streams: BTreeMap<RequestId, Stream>,
    events: Vec<KvEvent>,
}

fn run(setup: &Setup, arrivals: &[Arrival]) -> Result<RunLog, TestCaseError> {
    let mut sched = build(setup);
    let mut streams: BTreeMap<RequestId, Stream> = BTreeMap::new();
    let mut accepted: BTreeMap<RequestId, (Vec<TokenId>, u32)> = BTreeMap::new();
    let mut aborted: BTreeMap<RequestId, u64> = BTreeMap::new();
    let mut plans = Vec::new();
    let mut events = Vec::new();
    let last_arrival = arrivals.iter().map(|a| a.step).max().unwrap_or(0);
    let bsz = bs(setup.block_size);
    let mut t = 0u64;
    loop {
        for (i, a) in arrivals.iter().enumerate().filter(|(_, a)| a.step == t) {
            let id = RequestId(i as u64);
            let p = prompt_of(i as u64, a);
            let mut req = request(i as u64, p.clone(), a.max_tokens);
            req.stop.stop_token_ids = setup.stop_tokens.clone();
            let max_total = (p.len() + a.max_tokens as usize).min(setup.max_model_len);
            let admissible = a.max_tokens > 0
                && p.len() < setup.max_model_len
                && bsz.blocks_for(max_total - 1) <= setup.num_blocks as usize;
            match sched.add_request(req, at(t)) {
                Ok(()) => {
                    prop_assert!(admissible, "accepted an impossible request {a:?}");
                    accepted.insert(id, (p, a.max_tokens));
                }
                Err(e) => {
                    prop_assert!(!admissible, "refused {a:?}: {e}");
                    prop_assert!(!matches!(e, AdmitError::Duplicate(_)));
                }
            }
        }
        let due = |in_flight: bool| -> Vec<RequestId> {
            arrivals
                .iter()
                .enumerate()
                .filter(|(_, a)| {
                    a.abort_in_flight == in_flight && a.abort_after.is_some_and(|d| a.step + d == t)
                })
                .map(|(i, _)| RequestId(i as u64))
                .collect()
        };
        for id in due(false) {
            if sched.abort(id) {
                aborted.insert(id, t);
            }
        }
        sched
            .check_invariants()
            .map_err(|e| TestCaseError::fail(e.to_string()))?;

        let plan = sched.schedule(at(t)).unwrap();
        prop_assert!(plan.num_tokens() <= setup.budget);
        prop_assert!(plan.seqs.len() <= setup.max_num_seqs);
        let mut seen: Vec<RequestId> = plan.seqs.iter().map(|e| e.request).collect();
        seen.sort();
        seen.dedup();
        prop_assert_eq!(seen.len(), plan.seqs.len(), "a request twice in one step");
        let sampled = sample(&sched, &plan);
        for id in due(true) {
            if sched.abort(id) {
                aborted.insert(id, t);
            }
        }
        let outputs = sched.on_step_done(&plan, &sampled, at(t)).unwrap();
        for (id, _) in &outputs {
            prop_assert!(!aborted.contains_key(id), "output after abort");
        }
        record(&mut streams, outputs);
        sched
            .check_invariants()
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        events.extend(sched.drain_kv_events());
        plans.push(plan);

        t += 1;
        if t > last_arrival + 25 && sched.is_idle() {
            break;
        }
        prop_assert!(t < 20_000, "no progress: {:?}", sched.stats());
    }

    // Every accepted request ended exactly once: a finish on its stream, or an abort.
    for (id, (p, max_tokens)) in &accepted {
        let stream = streams.get(id);
        let finished = stream.and_then(|s| s.finish.clone());
        match (aborted.contains_key(id), finished) {
            (true, None) => {}
            (false, Some(reason)) => {
                let s = stream.unwrap();
                prop_assert_eq!(&s.tokens, &reference_generation(p, s.tokens.len()));
                let last = *s.tokens.last().unwrap();
                let expected = if setup.stop_tokens.contains(&last) {
                    FinishReason::Stop
                } else {
                    prop_assert!(
                        s.tokens.len() == *max_tokens as usize
                            || p.len() + s.tokens.len() == setup.max_model_len
                    );
                    FinishReason::Length
                };
                prop_assert_eq!(reason, expected);
                // No earlier stop token was skipped.
                for tok in &s.tokens[..s.tokens.len() - 1] {
                    prop_assert!(!setup.stop_tokens.contains(tok));
                }
            }
            (a, f) => prop_assert!(false, "{id}: aborted {a}, finish {f:?}"),
        }
    }
    prop_assert!(sched.is_idle());
    // Replaying the events gives exactly the cache's contents: what an indexer would see.
    let mut view = std::collections::BTreeSet::new();
    for e in &events {
        match e {
            KvEvent::BlockStored {
                block_hashes,
                token_ids,
                ..
            } => {
                prop_assert_eq!(
                    token_ids.len(),
                    block_hashes.len() * setup.block_size as usize
                );
                for h in block_hashes {
                    prop_assert!(view.insert(*h), "stored twice without removal");
                }
            }
            KvEvent::BlockRemoved { block_hashes } => {
                for h in block_hashes {
                    prop_assert!(view.remove(h), "removed a block never stored");
                }
            }
            KvEvent::AllBlocksCleared => view.clear(),
        }
    }
    prop_assert_eq!(view.len(), sched.stats().kv.cached);
    for h in &view {
        prop_assert!(sched.block_manager().is_cached(*h));
    }
    let kv = sched.stats().kv;
    prop_assert_eq!(kv.used, 0);
    prop_assert_eq!(kv.free, setup.num_blocks as usize);
    Ok(RunLog {
        plans,
        streams,
        events,
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_workloads_keep_invariants_and_finish_everything(
        setup in setup(),
        arrivals in arrivals(),
    ) {
        run(&setup, &arrivals)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Same inputs, same plans, outputs and KV events.
    #[test]
    fn runs_are_deterministic(setup in setup(), arrivals in arrivals()) {
        let a = run(&setup, &arrivals)?;
        let b = run(&setup, &arrivals)?;
        prop_assert_eq!(a, b);
    }
}

/// Pools barely larger than one request, with everything arriving at once: preemption and
/// eviction on nearly every case.
fn contended() -> impl Strategy<Value = (Setup, Vec<Arrival>)> {
    (4u32..16, 2u32..5, 4usize..40, 2usize..8, any::<bool>()).prop_flat_map(
        |(num_blocks, block_size, budget, max_num_seqs, chunked)| {
            let capacity = (num_blocks * block_size) as usize;
            let setup = Setup {
                num_blocks,
                block_size,
                budget: if chunked {
                    budget
                } else {
                    budget.max(capacity + 1)
                },
                max_num_seqs,
                max_model_len: capacity + 1,
                chunked,
                prefix_caching: true,
                stop_tokens: vec![],
                prefill_cap: usize::MAX,
            };
            let arrival = (
                0u64..4,
                0u32..2,
                1usize..=capacity / 2,
                0usize..=capacity / 2,
            )
                .prop_flat_map(move |(step, family, len, shared)| {
                    let room = (capacity + 1 - len) as u32;
                    (1u32..=room).prop_map(move |max_tokens| Arrival {
                        step,
                        family,
                        shared: shared.min(len),
                        len,
                        max_tokens,
                        abort_after: None,
                        abort_in_flight: false,
                    })
                });
            (Just(setup), prop::collection::vec(arrival, 2..8))
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn contended_pools_preempt_and_still_finish_everything((setup, arrivals) in contended()) {
        run(&setup, &arrivals)?;
    }
}
