//! Scheduler behaviour: batching under the budget, chunked prefill, prefix reuse, preemption
//! with recompute, aborts, stop conditions and the step protocol.

use crate::worker_support as support;

use std::collections::BTreeMap;
use support::*;
use turbine_actors::ids::RequestId;
use turbine_actors::kv::events::KvEvent;
use turbine_actors::kv::hash::{hash_blocks, BlockHash};
use turbine_actors::protocol::{FinishReason, TokenLogprob};
use turbine_actors::worker::{
    AdmitError, BlockManager, BlockManagerConfig, ConfigError, PromptLogprobsChunk, SampledToken,
    Scheduler, SchedulerConfig, StepError, StepId, StepPlan,
};

fn r(id: u64) -> RequestId {
    RequestId(id)
}

#[test]
fn a_long_prompt_is_prefilled_in_chunks_then_decoded() {
    let mut s = scheduler(64, 4, 8, 8, 256);
    let p = prompt(1, 20);
    s.add_request(request(1, p.clone(), 3), at(0)).unwrap();
    let mut streams = BTreeMap::new();
    let shapes: Vec<_> = (0..5)
        .map(|t| {
            let plan = step(&mut s, &mut streams, at(t));
            assert_eq!(plan.seqs.len(), 1);
            let e = &plan.seqs[0];
            (e.start_pos, e.tokens.len(), e.want_logits)
        })
        .collect();
    assert_eq!(
        shapes,
        vec![
            (0, 8, false),
            (8, 8, false),
            (16, 4, true),
            (20, 1, true),
            (21, 1, true)
        ]
    );
    assert!(s.is_idle());
    let out = &streams[&r(1)];
    assert_eq!(out.tokens, reference_generation(&p, 3));
    assert_eq!(out.finish, Some(FinishReason::Length));
    assert_eq!(out.cached_tokens, Some(0));
}

#[test]
fn decodes_go_first_and_prefill_chunks_fill_the_budget() {
    let mut s = scheduler(64, 4, 8, 8, 256);
    let mut streams = BTreeMap::new();
    s.add_request(request(1, prompt(1, 4), 10), at(0)).unwrap();
    step(&mut s, &mut streams, at(0));
    s.add_request(request(2, prompt(2, 30), 10), at(1)).unwrap();
    s.add_request(request(3, prompt(3, 5), 10), at(1)).unwrap();
    let plan = step(&mut s, &mut streams, at(1));
    let shape: Vec<_> = plan
        .seqs
        .iter()
        .map(|e| (e.request, e.start_pos, e.tokens.len()))
        .collect();
    assert_eq!(shape, vec![(r(1), 4, 1), (r(2), 0, 7)]);
    assert_eq!(plan.num_tokens(), 8);
    assert_eq!(s.num_waiting(), 1, "request 3 waits: no budget left");
    // Next step: the decode first, then request 2's next chunk; still no room for 3.
    let plan = step(&mut s, &mut streams, at(2));
    let shape: Vec<_> = plan
        .seqs
        .iter()
        .map(|e| (e.request, e.start_pos, e.tokens.len()))
        .collect();
    assert_eq!(shape, vec![(r(1), 5, 1), (r(2), 7, 7)]);
    assert!(plan.seqs[0].is_decode() && !plan.seqs[1].want_logits);
    run_until_idle(&mut s, &mut streams, 200);
    for (id, len) in [(1, 4), (2, 30), (3, 5)] {
        assert_eq!(
            streams[&r(id)].tokens,
            reference_generation(&prompt(id as u32, len), 10)
        );
    }
}

/// A scheduler of `scheduler(64, 4, 16, 8, 256)`'s shape with `contended_prefill_chunk`.
fn with_prefill_cap(cap: usize) -> Scheduler {
    Scheduler::new(
        SchedulerConfig {
            max_num_batched_tokens: 16,
            max_num_seqs: 8,
            max_model_len: 256,
            enable_chunked_prefill: true,
            contended_prefill_chunk: cap,
        },
        BlockManager::new(BlockManagerConfig {
            num_blocks: 64,
            block_size: support::bs(4),
            enable_prefix_caching: true,
        }),
    )
    .unwrap()
}

#[test]
fn a_short_request_starts_beside_a_long_prefill_when_prefill_chunks_are_capped() {
    // A 60-token prompt alone takes the whole budget (16); a 6-token request arrives after
    // its first chunk. With the cap (8 under contention) the short one is scheduled whole in
    // the very next step, beside an 8-token chunk of the long one; without it (strict FIFO)
    // it waits until the long prompt's last chunk. Outputs are the same either way.
    let shape = |plan: &StepPlan| -> Vec<(RequestId, usize, usize)> {
        plan.seqs
            .iter()
            .map(|e| (e.request, e.start_pos, e.tokens.len()))
            .collect()
    };
    let mut first_token_step = Vec::new();
    for cap in [8, usize::MAX] {
        let mut s = with_prefill_cap(cap);
        let mut streams = BTreeMap::new();
        s.add_request(request(1, prompt(1, 60), 4), at(0)).unwrap();
        let plan = step(&mut s, &mut streams, at(0));
        assert_eq!(shape(&plan), vec![(r(1), 0, 16)], "alone: the whole budget");
        s.add_request(request(2, prompt(2, 6), 4), at(1)).unwrap();
        let mut t = 1;
        while streams.get(&r(2)).is_none_or(|st| st.tokens.is_empty()) {
            let plan = step(&mut s, &mut streams, at(t));
            if cap == 8 && t == 1 {
                assert_eq!(shape(&plan), vec![(r(1), 16, 8), (r(2), 0, 6)]);
            }
            t += 1;
            assert!(t < 20, "request 2 never started");
        }
        first_token_step.push(t - 1);
        run_until_idle(&mut s, &mut streams, 200);
        for (id, len) in [(1, 60), (2, 6)] {
            assert_eq!(
                streams[&r(id)].tokens,
                reference_generation(&prompt(id as u32, len), 4)
            );
        }
    }
    // Capped: request 2's first token comes out of the step after it arrived. Strict: the
    // long prompt's remaining 44 tokens go first (16, 16, then 12 with request 2's first 4
    // beside them), and its last 2 tokens in step 4.
    assert_eq!(first_token_step, vec![1, 4]);
}

#[test]
fn max_num_seqs_caps_the_running_set() {
    let mut s = scheduler(64, 4, 64, 2, 256);
    for id in 1..=3 {
        s.add_request(request(id, prompt(id as u32, 5), 4), at(0))
            .unwrap();
    }
    let mut streams = BTreeMap::new();
    let plan = step(&mut s, &mut streams, at(0));
    assert_eq!(plan.seqs.len(), 2);
    assert_eq!((s.num_running(), s.num_waiting()), (2, 1));
    run_until_idle(&mut s, &mut streams, 100);
    assert_eq!(
        streams[&r(3)].tokens,
        reference_generation(&prompt(3, 5), 4)
    );
}

#[test]
fn a_second_request_reuses_the_cached_prefix() {
    let mut s = scheduler(64, 4, 64, 8, 256);
    let a = prompt(1, 20);
    s.add_request(request(1, a.clone(), 2), at(0)).unwrap();
    let first = run_to_completion(&mut s, 10);
    assert_eq!(first[&r(1)].cached_tokens, Some(0));

    let mut b = a[..16].to_vec();
    b.extend(prompt(2, 5));
    s.add_request(request(2, b.clone(), 2), at(10)).unwrap();
    let mut streams = BTreeMap::new();
    let plan = step(&mut s, &mut streams, at(10));
    assert_eq!(plan.seqs[0].start_pos, 16);
    assert_eq!(plan.seqs[0].tokens, b[16..].to_vec());
    assert_eq!(streams[&r(2)].cached_tokens, Some(16));
    run_until_idle(&mut s, &mut streams, 10);
    assert_eq!(streams[&r(2)].tokens, reference_generation(&b, 2));
    let kv = s.stats().kv;
    assert_eq!((kv.prefix_query_tokens, kv.prefix_hit_tokens), (41, 16));
    assert!((kv.prefix_hit_rate() - 16.0 / 41.0).abs() < 1e-12);
}

#[test]
fn a_concurrent_request_shares_a_running_requests_blocks() {
    let mut s = scheduler(64, 4, 64, 8, 256);
    let a = prompt(1, 12);
    s.add_request(request(1, a.clone(), 10), at(0)).unwrap();
    let mut streams = BTreeMap::new();
    step(&mut s, &mut streams, at(0));
    s.add_request(request(2, a.clone(), 10), at(1)).unwrap();
    let plan = step(&mut s, &mut streams, at(1));
    let e2 = plan.seqs.iter().find(|e| e.request == r(2)).unwrap();
    let e1 = plan.seqs.iter().find(|e| e.request == r(1)).unwrap();
    assert_eq!(e2.start_pos, 8, "identical prompt: all but the last block");
    assert_eq!(e2.block_table[..2], e1.block_table[..2]);
    assert_eq!(streams[&r(2)].cached_tokens, Some(8));
    run_until_idle(&mut s, &mut streams, 100);
    assert_eq!(streams[&r(1)].tokens, streams[&r(2)].tokens);
}

#[test]
fn stored_events_chain_the_computed_blocks() {
    let mut s = scheduler(64, 4, 64, 8, 256);
    let p = prompt(1, 18);
    s.add_request(request(1, p.clone(), 5), at(0)).unwrap();
    let streams = run_to_completion(&mut s, 20);
    let mut full = p.clone();
    full.extend(&streams[&r(1)].tokens);
    // The last sampled token is never fed: 22 tokens computed, 5 full blocks.
    let expected = hash_blocks(&full[..22], bs(4), 0);
    let events = s.drain_kv_events();
    let mut chain: Vec<BlockHash> = Vec::new();
    let mut fed: Vec<u32> = Vec::new();
    for e in &events {
        match e {
            KvEvent::BlockStored {
                block_hashes,
                parent_block_hash,
                token_ids,
                block_size,
                ..
            } => {
                assert_eq!(*parent_block_hash, chain.last().copied());
                assert_eq!(block_size.get(), 4);
                assert_eq!(token_ids.len(), 4 * block_hashes.len());
                chain.extend(block_hashes);
                fed.extend(token_ids);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(chain, expected);
    assert_eq!(fed, full[..20].to_vec());
    assert!(s.drain_kv_events().is_empty());
}

#[test]
fn preemption_recomputes_without_changing_or_repeating_any_token() {
    // 8 blocks of 4: each request alone needs 6 blocks at most, both together 12.
    let make = || {
        let mut s = scheduler(8, 4, 64, 8, 256);
        for id in 1..=2 {
            s.add_request(request(id, prompt(id as u32, 10), 12), at(0))
                .unwrap();
        }
        s
    };
    let mut s = make();
    let streams = run_to_completion(&mut s, 200);
    assert!(s.num_preemptions() >= 1, "the pool is too small for both");
    for id in 1..=2 {
        let st = &streams[&r(id)];
        assert_eq!(st.tokens, reference_generation(&prompt(id as u32, 10), 12));
        assert_eq!(st.items, 12, "one output per token, none repeated");
        assert_eq!(st.finish, Some(FinishReason::Length));
    }
    assert_eq!(s.block_manager().num_used_blocks(), 0);
    // The same workload is replayed identically.
    let mut again = make();
    assert_eq!(run_to_completion(&mut again, 200), streams);
    assert_eq!(again.num_preemptions(), s.num_preemptions());
}

#[test]
fn the_newest_running_request_is_the_one_preempted() {
    let mut s = scheduler(8, 4, 64, 8, 256);
    let mut streams = BTreeMap::new();
    s.add_request(request(1, prompt(1, 15), 16), at(0)).unwrap();
    s.add_request(request(2, prompt(2, 15), 16), at(0)).unwrap();
    let mut preempted = Vec::new();
    for t in 0..40 {
        let plan = step(&mut s, &mut streams, at(t));
        preempted.extend(plan.preempted.iter().copied());
        if !preempted.is_empty() {
            break;
        }
    }
    assert_eq!(preempted, vec![r(2)]);
    assert_eq!(s.waiting().collect::<Vec<_>>(), vec![r(2)]);
    assert_eq!(s.running(), &[r(1)]);
}

#[test]
fn abort_frees_blocks_at_once() {
    let mut s = scheduler(64, 4, 64, 8, 256);
    let mut streams = BTreeMap::new();
    s.add_request(request(1, prompt(1, 10), 50), at(0)).unwrap();
    s.add_request(request(2, prompt(2, 10), 50), at(0)).unwrap();
    step(&mut s, &mut streams, at(0));
    assert_eq!(s.block_manager().num_used_blocks(), 6);
    assert!(s.abort(r(1)));
    assert!(!s.abort(r(1)));
    assert_eq!(s.block_manager().num_used_blocks(), 3);
    s.check_invariants().unwrap();

    // Abort while its step is in flight: the result is dropped.
    let plan = s.schedule(at(1)).unwrap();
    assert!(s.abort(r(2)));
    assert_eq!(s.block_manager().num_used_blocks(), 0);
    let sampled = sample_from_plan(&plan);
    assert!(s.on_step_done(&plan, &sampled, at(1)).unwrap().is_empty());
    s.check_invariants().unwrap();
    assert!(s.is_idle());

    // Abort a waiting request.
    s.add_request(request(3, prompt(3, 10), 50), at(2)).unwrap();
    assert!(s.abort(r(3)));
    assert!(s.is_idle());
}

/// Samples from the plan alone (for requests already gone from the scheduler).
fn sample_from_plan(plan: &StepPlan) -> Vec<SampledToken> {
    plan.seqs
        .iter()
        .filter(|e| e.want_logits)
        .map(|e| SampledToken::new(e.request, 1))
        .collect()
}

#[test]
fn finished_requests_hold_no_blocks() {
    let mut s = scheduler(32, 4, 16, 4, 256);
    for id in 1..=6 {
        s.add_request(
            request(id, prompt(id as u32 % 2, 9 + id as usize), 7),
            at(0),
        )
        .unwrap();
    }
    let streams = run_to_completion(&mut s, 500);
    assert_eq!(streams.len(), 6);
    let kv = s.stats().kv;
    assert_eq!(kv.used, 0);
    assert_eq!(kv.free, 32);
    assert!(kv.evictable > 0, "full blocks stay cached after finishing");
}

#[test]
fn stop_tokens_end_generation_unless_ignore_eos() {
    let p = prompt(1, 6);
    let reference = reference_generation(&p, 10);
    let stop = reference[3];
    let first = reference.iter().position(|t| *t == stop).unwrap();

    let mut s = scheduler(64, 4, 64, 8, 256);
    let mut req = request(1, p.clone(), 10);
    req.stop.stop_token_ids = vec![stop];
    s.add_request(req.clone(), at(0)).unwrap();
    let out = run_to_completion(&mut s, 50);
    assert_eq!(
        out[&r(1)].tokens,
        reference[..=first].to_vec(),
        "stop token included"
    );
    assert_eq!(out[&r(1)].finish, Some(FinishReason::Stop));

    req.stop.ignore_eos = true;
    s.add_request(req, at(0)).unwrap();
    let out = run_to_completion(&mut s, 50);
    assert_eq!(out[&r(1)].tokens, reference);
    assert_eq!(out[&r(1)].finish, Some(FinishReason::Length));
}

#[test]
fn the_context_length_ends_generation() {
    let mut s = scheduler(64, 4, 64, 8, 24);
    let p = prompt(1, 20);
    s.add_request(request(1, p.clone(), 100), at(0)).unwrap();
    let out = run_to_completion(&mut s, 50);
    assert_eq!(out[&r(1)].tokens, reference_generation(&p, 4));
    assert_eq!(out[&r(1)].finish, Some(FinishReason::Length));
}

#[test]
fn impossible_requests_are_refused_at_admission() {
    let mut s = scheduler(4, 4, 64, 8, 32);
    assert_eq!(
        s.add_request(request(1, vec![], 5), at(0)),
        Err(AdmitError::EmptyPrompt)
    );
    assert_eq!(
        s.add_request(request(1, prompt(1, 5), 0), at(0)),
        Err(AdmitError::ZeroMaxTokens)
    );
    assert_eq!(
        s.add_request(request(1, prompt(1, 32), 5), at(0)),
        Err(AdmitError::PromptTooLong {
            prompt_len: 32,
            max_model_len: 32
        })
    );
    // 10 + 10 tokens: 19 fed -> 5 blocks > 4.
    assert_eq!(
        s.add_request(request(1, prompt(1, 10), 10), at(0)),
        Err(AdmitError::ExceedsKvCapacity { needed: 5, pool: 4 })
    );
    // 10 + 7: 16 fed -> exactly the pool.
    s.add_request(request(1, prompt(1, 10), 7), at(0)).unwrap();
    assert_eq!(
        s.add_request(request(1, prompt(1, 3), 1), at(0)),
        Err(AdmitError::Duplicate(r(1)))
    );
    assert_eq!(s.num_waiting(), 1);
    let out = run_to_completion(&mut s, 50);
    assert_eq!(out[&r(1)].tokens.len(), 7);
}

#[test]
fn bad_configurations_are_refused() {
    let pool = || BlockManager::new(BlockManagerConfig::default());
    let cfg = SchedulerConfig::default();
    let err = |c: SchedulerConfig| Scheduler::new(c, pool()).unwrap_err();
    assert_eq!(
        err(SchedulerConfig {
            max_num_batched_tokens: 0,
            ..cfg.clone()
        }),
        ConfigError::ZeroTokenBudget
    );
    assert_eq!(
        err(SchedulerConfig {
            max_num_seqs: 0,
            ..cfg.clone()
        }),
        ConfigError::ZeroMaxSeqs
    );
    assert_eq!(
        err(SchedulerConfig {
            enable_chunked_prefill: false,
            ..cfg.clone()
        }),
        ConfigError::BudgetBelowContext {
            budget: 2048,
            max_model_len: 4096
        }
    );
    let empty = BlockManager::new(BlockManagerConfig {
        num_blocks: 0,
        ..BlockManagerConfig::default()
    });
    assert_eq!(
        Scheduler::new(cfg.clone(), empty).unwrap_err(),
        ConfigError::EmptyPool
    );
    // Serde defaults fill the blanks.
    let parsed: SchedulerConfig = serde_json::from_str(r#"{"max_num_seqs": 4}"#).unwrap();
    assert_eq!(parsed.max_num_seqs, 4);
    assert_eq!(parsed.max_num_batched_tokens, cfg.max_num_batched_tokens);
    let parsed: BlockManagerConfig = serde_json::from_str(r#"{"block_size": 32}"#).unwrap();
    assert_eq!(parsed.block_size.get(), 32);
    assert!(parsed.enable_prefix_caching);
}

#[test]
fn without_chunked_prefill_prompts_are_scheduled_whole() {
    let blocks = BlockManager::new(BlockManagerConfig {
        num_blocks: 64,
        block_size: bs(4),
        enable_prefix_caching: true,
    });
    let mut s = Scheduler::new(
        SchedulerConfig {
            max_num_batched_tokens: 32,
            max_num_seqs: 8,
            max_model_len: 32,
            enable_chunked_prefill: false,
            contended_prefill_chunk: usize::MAX,
        },
        blocks,
    )
    .unwrap();
    s.add_request(request(1, prompt(1, 20), 3), at(0)).unwrap();
    s.add_request(request(2, prompt(2, 20), 3), at(0)).unwrap();
    let mut streams = BTreeMap::new();
    let plan = step(&mut s, &mut streams, at(0));
    assert_eq!(plan.seqs.len(), 1);
    assert_eq!(plan.seqs[0].tokens.len(), 20);
    let plan = step(&mut s, &mut streams, at(1));
    let sizes: Vec<_> = plan.seqs.iter().map(|e| e.tokens.len()).collect();
    assert_eq!(sizes, vec![1, 20]);
}

#[test]
fn the_step_protocol_is_enforced() {
    let mut s = scheduler(64, 4, 64, 8, 256);
    let idle = s.schedule(at(0)).unwrap();
    assert!(idle.is_empty() && !s.has_step_in_flight());
    assert!(s.on_step_done(&idle, &[], at(0)).unwrap().is_empty());

    s.add_request(request(1, prompt(1, 5), 3), at(0)).unwrap();
    let plan = s.schedule(at(0)).unwrap();
    assert_eq!(s.schedule(at(0)), Err(StepError::StepInFlight(plan.step)));
    let forged = StepPlan {
        step: StepId(plan.step.0 + 7),
        ..plan.clone()
    };
    assert_eq!(
        s.on_step_done(&forged, &[], at(0)),
        Err(StepError::UnknownStep {
            expected: Some(plan.step),
            got: forged.step
        })
    );
    assert!(!s.is_idle());
    let sampled = sample(&s, &plan);
    assert_eq!(s.on_step_done(&plan, &sampled, at(0)).unwrap().len(), 1);
    assert!(matches!(
        s.on_step_done(&plan, &sampled, at(0)),
        Err(StepError::UnknownStep { expected: None, .. })
    ));
}

#[test]
fn a_missing_sample_or_a_failed_step_ends_requests_with_an_error() {
    let mut s = scheduler(64, 4, 64, 8, 256);
    s.add_request(request(1, prompt(1, 5), 3), at(0)).unwrap();
    s.add_request(request(2, prompt(2, 5), 3), at(0)).unwrap();
    let plan = s.schedule(at(0)).unwrap();
    let only_first = vec![SampledToken::new(r(1), 3)];
    let out = s.on_step_done(&plan, &only_first, at(0)).unwrap();
    assert_eq!(out.len(), 2);
    assert_eq!(out[0].1.token_ids, vec![3]);
    assert!(matches!(out[1].1.finish, Some(FinishReason::Error(_))));
    assert_eq!(out[1].1.cached_tokens, Some(0));
    s.check_invariants().unwrap();

    let plan = s.schedule(at(1)).unwrap();
    let out = s.on_step_failed(&plan, "device lost").unwrap();
    assert_eq!(
        out,
        vec![(
            r(1),
            turbine_actors::protocol::TokenOutput {
                token_ids: vec![],
                logprobs: None,
                finish: Some(FinishReason::Error("device lost".into())),
                cached_tokens: None,
                prompt_logprobs: None,
            }
        )]
    );
    assert!(s.is_idle());
    assert_eq!(s.block_manager().num_used_blocks(), 0);
}

#[test]
fn logprobs_pass_through_when_asked_for() {
    let mut s = scheduler(64, 4, 64, 8, 256);
    let mut with = request(1, prompt(1, 5), 1);
    with.logprobs = Some(2);
    s.add_request(with, at(0)).unwrap();
    s.add_request(request(2, prompt(2, 5), 1), at(0)).unwrap();
    let ctx = s.sampling_context(r(1)).unwrap();
    assert_eq!(
        (ctx.logprobs, ctx.prompt_len, ctx.tokens.len()),
        (Some(2), 5, 5)
    );
    assert_eq!(ctx.params.temperature, 0.0);
    let plan = s.schedule(at(0)).unwrap();
    let lp = TokenLogprob {
        token_id: 9,
        logprob: -0.5,
        top: vec![(9, -0.5), (4, -1.5)],
    };
    let sampled: Vec<_> = [r(1), r(2)]
        .into_iter()
        .map(|id| SampledToken {
            request: id,
            token: 9,
            logprob: Some(lp.clone()),
        })
        .collect();
    let out = s.on_step_done(&plan, &sampled, at(0)).unwrap();
    assert_eq!(out[0].1.logprobs, Some(vec![lp]));
    assert_eq!(out[1].1.logprobs, None, "not asked for");
}

#[test]
fn sample_index_counts_generated_tokens_across_preemption() {
    let mut s = scheduler(8, 4, 64, 8, 256);
    for id in 1..=2 {
        s.add_request(request(id, prompt(id as u32, 10), 12), at(0))
            .unwrap();
    }
    let mut streams: BTreeMap<RequestId, Stream> = BTreeMap::new();
    let mut t = 0;
    while !s.is_idle() {
        let plan = s.schedule(at(t)).unwrap();
        for e in plan.seqs.iter().filter(|e| e.want_logits) {
            let so_far = streams.get(&e.request).map_or(0, |st| st.tokens.len());
            assert_eq!(e.sample_index as usize, so_far);
        }
        let sampled = sample(&s, &plan);
        record(
            &mut streams,
            s.on_step_done(&plan, &sampled, at(t)).unwrap(),
        );
        t += 1;
    }
    assert!(s.num_preemptions() > 0);
}

#[test]
fn a_request_re_added_while_its_aborted_step_runs_starts_afresh() {
    let mut s = scheduler(64, 4, 64, 8, 256);
    let p = prompt(1, 6);
    s.add_request(request(1, p.clone(), 3), at(0)).unwrap();
    let plan = s.schedule(at(0)).unwrap();
    assert!(s.abort(r(1)));
    s.add_request(request(1, p.clone(), 3), at(0)).unwrap();
    let sampled = sample_from_plan(&plan);
    assert!(
        s.on_step_done(&plan, &sampled, at(0)).unwrap().is_empty(),
        "the old incarnation's result is dropped"
    );
    s.check_invariants().unwrap();
    let out = run_to_completion(&mut s, 20);
    assert_eq!(out[&r(1)].tokens, reference_generation(&p, 3));
}

#[test]
fn drained_events_become_numbered_batches() {
    use turbine_actors::ids::WorkerId;
    use turbine_actors::worker::KvEventSequencer;
    let mut s = scheduler(64, 4, 64, 8, 256);
    let mut seq = KvEventSequencer::new(WorkerId(7));
    assert!(
        seq.batch(s.drain_kv_events(), 1.0).is_none(),
        "nothing to publish"
    );
    s.add_request(request(1, prompt(1, 9), 1), at(0)).unwrap();
    run_to_completion(&mut s, 5);
    let batch = seq.batch(s.drain_kv_events(), 2.0).unwrap();
    assert_eq!((batch.worker, batch.seq, batch.ts), (WorkerId(7), 0, 2.0));
    assert_eq!(batch.events.len(), 1);
    s.add_request(request(2, prompt(2, 9), 1), at(0)).unwrap();
    run_to_completion(&mut s, 5);
    assert_eq!(seq.batch(s.drain_kv_events(), 3.0).unwrap().seq, 1);
    assert_eq!(seq.next_seq(), 2);
}

#[test]
fn plan_summaries_split_decode_and_prefill_work() {
    let mut s = scheduler(64, 4, 16, 8, 256);
    let mut streams = BTreeMap::new();
    s.add_request(request(1, prompt(1, 6), 5), at(0)).unwrap();
    step(&mut s, &mut streams, at(0));
    s.add_request(request(2, prompt(2, 40), 5), at(1)).unwrap();
    let plan = step(&mut s, &mut streams, at(1));
    assert_eq!(plan.num_decodes(), 1);
    assert_eq!(plan.num_prefill_tokens(), 15);
    assert_eq!(plan.num_tokens(), 16);
    assert_eq!(plan.num_samples(), 1);
    assert_eq!(plan.seqs[0].context_len(), 7);
    assert_eq!(plan.seqs[1].context_len(), 15);
}

#[test]
fn samples_may_come_in_any_order() {
    let run = |reverse: bool| {
        let mut s = scheduler(64, 4, 64, 8, 256);
        for id in 1..=4 {
            s.add_request(request(id, prompt(id as u32, 5 + id as usize), 6), at(0))
                .unwrap();
        }
        let mut streams = BTreeMap::new();
        let mut t = 0;
        while !s.is_idle() {
            let plan = s.schedule(at(t)).unwrap();
            let mut sampled = sample(&s, &plan);
            if reverse {
                sampled.reverse();
            }
            record(
                &mut streams,
                s.on_step_done(&plan, &sampled, at(t)).unwrap(),
            );
            t += 1;
        }
        streams
    };
    let in_order = run(false);
    assert_eq!(run(true), in_order);
    for id in 1..=4u64 {
        assert_eq!(
            in_order[&r(id)].tokens,
            reference_generation(&prompt(id as u32, 5 + id as usize), 6)
        );
    }
}

#[test]
fn load_counts_the_blocks_a_queue_will_need() {
    // One sequence slot: the second and third requests wait.
    let mut s = scheduler(64, 4, 64, 1, 256);
    let mut streams = BTreeMap::new();
    s.add_request(request(1, prompt(1, 10), 50), at(0)).unwrap();
    s.add_request(request(2, prompt(2, 9), 5), at(0)).unwrap();
    s.add_request(request(3, prompt(3, 4), 5), at(0)).unwrap();
    step(&mut s, &mut streams, at(0));
    let stats = s.stats();
    assert_eq!(stats.num_waiting, 2);
    // Block size 4: 9 tokens need 3 blocks, 4 tokens need 1.
    assert_eq!(stats.waiting_blocks, 4);
    assert_eq!(stats.load_blocks(), stats.kv.used as u64 + 4);
    assert!(stats.kv.used > 0);
}

#[test]
fn prompt_logprobs_are_computed_in_chunks_past_the_cache_and_gathered() {
    // 16-token steps, 4-token blocks.
    let mut s = scheduler(64, 4, 16, 8, 256);
    let mut streams = BTreeMap::new();
    let p = prompt(1, 40);
    // The prompt's blocks are cached by a first request.
    s.add_request(request(1, p.clone(), 1), at(0)).unwrap();
    run_until_idle(&mut s, &mut streams, 50);
    let mut every = request(3, p.clone(), 2);
    every.sampling.prompt_logprobs = Some(1);
    s.add_request(every, at(1)).unwrap();
    // Chunks of 16, 16 and 8 from position 0 (the cache is not used): each asks for its
    // positions' logprobs, naming the prompt token after it; only the last samples.
    let mut first = None;
    for (k, (start, len, next)) in [(0, 16, Some(p[16])), (16, 16, Some(p[32])), (32, 8, None)]
        .into_iter()
        .enumerate()
    {
        let plan = s.schedule(at(2 + k as u64)).unwrap();
        let e = plan.seqs.iter().find(|e| e.request == r(3)).unwrap();
        assert_eq!((e.start_pos, e.tokens.len()), (start, len), "chunk {k}");
        assert_eq!(e.want_logits, next.is_none(), "chunk {k}");
        let ask = e.prompt_logprobs.expect("every chunk asks");
        assert_eq!((ask.top, ask.next), (1, next), "chunk {k}");
        // The executor's answer: one logprob per predicted token, marked by position.
        let chunk = PromptLogprobsChunk {
            request: r(3),
            logprobs: (start + 1..start + len + usize::from(next.is_some()))
                .map(|pos| TokenLogprob {
                    token_id: p[pos],
                    logprob: -(pos as f32),
                    top: Vec::new(),
                })
                .collect(),
        };
        let sampled = sample(&s, &plan);
        let out = s
            .on_step_done_with(&plan, &sampled, &[chunk], at(2 + k as u64))
            .unwrap();
        first = out.into_iter().find(|(id, _)| *id == r(3)).map(|(_, o)| o);
        assert_eq!(
            first.is_some(),
            next.is_none(),
            "output only after the last chunk"
        );
    }
    let first = first.unwrap();
    let lps = first
        .prompt_logprobs
        .expect("prompt logprobs on the first output");
    assert_eq!(lps.len(), 39);
    for (i, lp) in lps.iter().enumerate() {
        assert_eq!((lp.token_id, lp.logprob), (p[i + 1], -((i + 1) as f32)));
    }
    assert_eq!(
        first.cached_tokens,
        Some(0),
        "computed, not read from the cache"
    );
    // The decode step asks for nothing and its output carries none.
    let plan = s.schedule(at(10)).unwrap();
    assert!(plan.seqs.iter().all(|e| e.prompt_logprobs.is_none()));
    let sampled = sample(&s, &plan);
    let out = s.on_step_done(&plan, &sampled, at(10)).unwrap();
    assert!(out.iter().all(|(_, o)| o.prompt_logprobs.is_none()));
    s.check_invariants().unwrap();
    // A request that did not ask gets no prompt logprobs and uses the cache.
    s.add_request(request(4, p.clone(), 1), at(11)).unwrap();
    let plan = s.schedule(at(11)).unwrap();
    let e = plan.seqs.iter().find(|e| e.request == r(4)).unwrap();
    assert!(e.start_pos > 0 && e.prompt_logprobs.is_none());
}

/// The executor's answer to every entry of `plan` that asks for prompt logprobs: each
/// predicted prompt token with logprob `-position`, so order and gaps show.
fn prompt_chunks(plan: &StepPlan, p: &[u32]) -> Vec<PromptLogprobsChunk> {
    plan.seqs
        .iter()
        .filter_map(|e| {
            let ask = e.prompt_logprobs?;
            let end = e.start_pos + e.tokens.len() + usize::from(ask.next.is_some());
            Some(PromptLogprobsChunk {
                request: e.request,
                logprobs: (e.start_pos + 1..end)
                    .map(|pos| TokenLogprob {
                        token_id: p[pos],
                        logprob: -(pos as f32),
                        top: Vec::new(),
                    })
                    .collect(),
            })
        })
        .collect()
}

#[test]
fn a_preempted_prompt_starts_its_logprobs_over() {
    // 8 blocks of 4 tokens, 4-token steps: a decode and a long prompt outgrow the pool.
    let mut s = scheduler(8, 4, 4, 8, 256);
    s.add_request(request(1, prompt(1, 4), 24), at(0)).unwrap();
    let p = prompt(2, 24);
    let mut every = request(2, p.clone(), 1);
    every.sampling.prompt_logprobs = Some(0);
    s.add_request(every, at(0)).unwrap();
    let mut first = None;
    for t in 0..200 {
        let plan = s.schedule(at(t)).unwrap();
        if plan.is_empty() {
            break;
        }
        let chunks = prompt_chunks(&plan, &p);
        let sampled = sample(&s, &plan);
        for (id, out) in s
            .on_step_done_with(&plan, &sampled, &chunks, at(t))
            .unwrap()
        {
            if id == r(2) && first.is_none() {
                first = Some(out);
            }
        }
        s.check_invariants().unwrap();
    }
    assert!(s.num_preemptions() > 0, "the prompt was never preempted");
    let lps = first
        .expect("the prompt-logprobs request finished")
        .prompt_logprobs
        .expect("with its prompt logprobs");
    let got: Vec<(u32, f32)> = lps.iter().map(|l| (l.token_id, l.logprob)).collect();
    let want: Vec<(u32, f32)> = (1..24).map(|pos| (p[pos], -(pos as f32))).collect();
    assert_eq!(got, want, "each prompt position once, in order");
}
