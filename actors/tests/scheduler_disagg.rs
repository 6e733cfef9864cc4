//! The scheduler's disaggregation modes: a prefill-only request held after its first token
//! with its blocks, and a decode-side admission whose prompt KV is imported, decoding on
//! from the first token; with fallbacks (failed import, no room) and aborts that free all.
//! A decode-side request with images comes without their embeddings: it needs them only
//! when it recomputes its prompt, and is parked until they come.

use crate::worker_support as support;

use std::collections::BTreeMap;
use std::sync::Arc;
use support::*;
use turbine_actors::encoder::PromptEmbeds;
use turbine_actors::ids::RequestId;
use turbine_actors::kv::events::KvEvent;
use turbine_actors::kv::hash::hash_blocks;
use turbine_actors::protocol::{FinishReason, ImageHash, PreprocessedRequest, PromptImage};
use turbine_actors::worker::scheduler::EmbedsWanted;
use turbine_actors::worker::{AdmitError, Prefilled, Scheduler};

fn r(id: u64) -> RequestId {
    RequestId(id)
}

/// The decode worker's stream for `id` as its shell starts it: the prefill side's first
/// token (with `cached_tokens`) goes out first; the scheduler's outputs follow.
fn stream_after_first(id: RequestId, first: u32) -> BTreeMap<RequestId, Stream> {
    let mut streams = BTreeMap::new();
    streams.insert(
        id,
        Stream {
            tokens: vec![first],
            finish: None,
            cached_tokens: Some(0),
            items: 1,
        },
    );
    streams
}

/// Steps a prefill worker until its prefill-only requests are all held.
fn prefill(s: &mut Scheduler, streams: &mut BTreeMap<RequestId, Stream>) -> Vec<Prefilled> {
    let mut done = Vec::new();
    for t in 0..100 {
        if s.num_running() == 0 && s.num_waiting() == 0 {
            break;
        }
        step(s, streams, at(t));
        done.extend(s.take_prefilled());
    }
    done
}

#[test]
fn a_prefill_only_request_is_held_after_its_first_token_with_its_blocks() {
    let mut s = scheduler(64, 4, 8, 8, 256);
    let p = prompt(1, 20);
    s.add_prefill_only(request(1, p.clone(), 10), at(0))
        .unwrap();
    let mut streams = BTreeMap::new();
    let done = prefill(&mut s, &mut streams);
    assert_eq!(done.len(), 1);
    let held = &done[0];
    let first = reference_generation(&p, 1)[0];
    assert_eq!(
        (held.request, held.first_token, held.prompt_len),
        (r(1), first, 20)
    );
    assert_eq!(held.blocks.len(), 5);
    // The first token went out on the stream at once; the stream is not finished here.
    assert_eq!(streams[&r(1)].tokens, vec![first]);
    assert_eq!(streams[&r(1)].finish, None);
    // Held: never scheduled again, blocks kept, not idle.
    assert!(s.schedule(at(50)).unwrap().is_empty());
    assert_eq!((s.num_held(), s.block_manager().num_used_blocks()), (1, 5));
    assert!(!s.is_idle());
    assert!(s.release_held(r(1)));
    assert!(!s.release_held(r(1)));
    s.check_invariants().unwrap();
    assert!(s.is_idle());
    // Its full blocks stay cached for the next prompt sharing the prefix.
    assert_eq!(s.block_manager().stats().evictable, 5);
}

#[test]
fn a_prefill_whose_first_token_ends_the_request_is_not_held() {
    let mut s = scheduler(64, 4, 8, 8, 256);
    s.add_prefill_only(request(1, prompt(1, 6), 1), at(0))
        .unwrap();
    let mut streams = BTreeMap::new();
    assert!(prefill(&mut s, &mut streams).is_empty());
    assert!(streams[&r(1)].finish.is_some());
    assert!(s.is_idle());
}

#[test]
fn decode_side_admission_decodes_from_the_first_token_like_aggregated() {
    let p = prompt(3, 20);
    let mut pf = scheduler(64, 4, 8, 8, 256);
    pf.add_prefill_only(request(1, p.clone(), 6), at(0))
        .unwrap();
    let mut streams = BTreeMap::new();
    let held = prefill(&mut pf, &mut streams).remove(0);

    let mut dec = scheduler(64, 4, 8, 8, 256);
    let adm = dec
        .add_with_remote_kv(request(1, p.clone(), 6), held.first_token, at(0))
        .unwrap();
    assert_eq!((adm.blocks.len(), adm.cached_blocks), (5, 0));
    assert_eq!(adm.import_into().len(), held.blocks.len());
    dec.check_invariants().unwrap();
    // Nothing runs until the KV is in; nothing is announced either.
    assert!(dec.schedule(at(0)).unwrap().is_empty());
    assert!(dec.drain_kv_events().is_empty());
    assert!(dec.kv_imported(r(1)));
    // Its KV events announce the imported prompt blocks.
    let stored: Vec<_> = dec
        .drain_kv_events()
        .into_iter()
        .flat_map(|e| match e {
            KvEvent::BlockStored { block_hashes, .. } => block_hashes,
            _ => Vec::new(),
        })
        .collect();
    assert_eq!(stored, hash_blocks(&p, bs(4), 0));
    let mut out = stream_after_first(r(1), held.first_token);
    let first_plan = step(&mut dec, &mut out, at(1));
    assert!(first_plan.seqs[0].is_decode(), "decodes right away");
    run_until_idle(&mut dec, &mut out, 100);
    // Prefill's first token + the decode worker's tokens = aggregated generation, once each.
    assert_eq!(out[&r(1)].tokens, reference_generation(&p, 6));
    assert_eq!(out[&r(1)].tokens[0], streams[&r(1)].tokens[0]);
    pf.release_held(r(1));
    assert_eq!(dec.block_manager().num_used_blocks(), 0);
}

#[test]
fn a_decode_worker_imports_only_what_it_does_not_cache() {
    let shared = prompt(4, 12);
    let mut dec = scheduler(64, 4, 8, 8, 256);
    dec.add_request(request(9, shared.clone(), 1), at(0))
        .unwrap();
    run_to_completion(&mut dec, 50);
    let mut p = shared.clone();
    p.extend(prompt(5, 8));
    let first = reference_generation(&p, 1)[0];
    let adm = dec
        .add_with_remote_kv(request(1, p.clone(), 4), first, at(0))
        .unwrap();
    assert_eq!((adm.blocks.len(), adm.cached_blocks), (5, 3));
    assert_eq!(adm.import_into(), &adm.blocks[3..]);
    assert!(dec.kv_imported(r(1)));
    let mut out = stream_after_first(r(1), first);
    run_until_idle(&mut dec, &mut out, 50);
    assert_eq!(out[&r(1)].tokens, reference_generation(&p, 4));
}

#[test]
fn a_failed_import_recomputes_locally_without_repeating_the_first_token() {
    let p = prompt(6, 18);
    let first = reference_generation(&p, 1)[0];
    let mut dec = scheduler(64, 4, 8, 8, 256);
    dec.add_with_remote_kv(request(1, p.clone(), 5), first, at(0))
        .unwrap();
    assert!(dec.kv_import_failed(r(1)));
    assert!(!dec.kv_imported(r(1)));
    assert_eq!(dec.block_manager().num_used_blocks(), 0);
    dec.check_invariants().unwrap();
    let mut out = stream_after_first(r(1), first);
    run_until_idle(&mut dec, &mut out, 50);
    assert_eq!(out[&r(1)].tokens, reference_generation(&p, 5));
}

#[test]
fn a_decode_admission_that_cannot_fit_now_is_refused_and_holds_nothing() {
    // 8 blocks of 4: a 20-token prompt needs 5.
    let mut dec = scheduler(8, 4, 8, 8, 256);
    dec.add_with_remote_kv(request(1, prompt(1, 20), 4), 7, at(0))
        .unwrap();
    let full = dec.add_with_remote_kv(request(2, prompt(2, 20), 4), 7, at(0));
    assert_eq!(full, Err(AdmitError::OutOfBlocks));
    let done = dec.add_with_remote_kv(request(3, prompt(3, 4), 1), 7, at(0));
    assert_eq!(done, Err(AdmitError::NothingToDecode));
    let dup = dec.add_with_remote_kv(request(1, prompt(1, 20), 4), 7, at(0));
    assert_eq!(dup, Err(AdmitError::Duplicate(r(1))));
    dec.check_invariants().unwrap();
    assert_eq!(dec.num_importing(), 1);
    assert_eq!(dec.num_waiting(), 0);

    let mut one = scheduler(64, 4, 8, 1, 256);
    one.add_with_remote_kv(request(1, prompt(1, 4), 4), 7, at(0))
        .unwrap();
    let busy = one.add_with_remote_kv(request(2, prompt(2, 4), 4), 7, at(0));
    assert_eq!(busy, Err(AdmitError::Busy));
    one.check_invariants().unwrap();
}

#[test]
fn a_refused_admission_can_queue_a_local_recompute_after_the_first_token() {
    let p = prompt(7, 20);
    let first = reference_generation(&p, 1)[0];
    let mut dec = scheduler(64, 4, 8, 8, 256);
    dec.add_with_first_token(request(1, p.clone(), 4), first, at(0))
        .unwrap();
    dec.check_invariants().unwrap();
    let mut out = stream_after_first(r(1), first);
    run_until_idle(&mut dec, &mut out, 50);
    assert_eq!(out[&r(1)].tokens, reference_generation(&p, 4));
    let done = dec.add_with_first_token(request(2, p.clone(), 1), first, at(0));
    assert_eq!(done, Err(AdmitError::NothingToDecode));
    assert!(dec.is_idle());
}

#[test]
fn aborting_held_or_importing_requests_frees_their_blocks() {
    let mut s = scheduler(64, 4, 8, 8, 256);
    s.add_prefill_only(request(1, prompt(1, 10), 5), at(0))
        .unwrap();
    prefill(&mut s, &mut BTreeMap::new());
    s.add_with_remote_kv(request(2, prompt(2, 10), 5), 7, at(0))
        .unwrap();
    assert_eq!((s.num_held(), s.num_importing()), (1, 1));
    assert!(s.abort(r(1)) && s.abort(r(2)));
    s.check_invariants().unwrap();
    assert!(s.is_idle());
    assert_eq!(s.block_manager().num_used_blocks(), 0);
}

/// Placeholder token of the image tests.
const IMAGE_TOKEN: u32 = 999_999;

/// `prompt(seed, len)` with an image of `tokens` placeholders from position 2 on.
fn image_request(
    id: u64,
    seed: u32,
    len: usize,
    tokens: u32,
    max_tokens: u32,
) -> PreprocessedRequest {
    let mut p = prompt(seed, len);
    for t in &mut p[2..2 + tokens as usize] {
        *t = IMAGE_TOKEN;
    }
    let mut req = request(id, p, max_tokens);
    req.images = vec![PromptImage {
        hash: ImageHash(7 + seed as u64),
        first_token: 2,
        tokens,
        encoded: Arc::new(Vec::new()),
        embeds: None,
        decoded: None,
    }];
    req
}

fn embeds_of(wanted: &EmbedsWanted) -> Arc<PromptEmbeds> {
    let rows = wanted
        .images
        .iter()
        .map(|i| vec![0.5; i.tokens as usize])
        .collect();
    Arc::new(PromptEmbeds::place(&wanted.prompt, IMAGE_TOKEN, &wanted.images, rows, 1).unwrap())
}

/// Steps until idle; every step that feeds prompt positions of `id` must have its embeddings.
fn run_checking_embeds(
    s: &mut Scheduler,
    out: &mut BTreeMap<RequestId, Stream>,
    id: RequestId,
    prompt_len: usize,
) {
    for t in 0..100 {
        if s.is_idle() {
            return;
        }
        let plan = s.schedule(at(t)).unwrap();
        for seq in plan.seqs.iter().filter(|q| q.request == id) {
            assert!(
                seq.start_pos >= prompt_len || s.prompt_embeds(id).is_some(),
                "prompt positions {}.. computed without the image's embeddings",
                seq.start_pos
            );
        }
        let sampled = sample(s, &plan);
        let outputs = s.on_step_done(&plan, &sampled, at(t)).unwrap();
        record(out, outputs);
        s.check_invariants().unwrap();
    }
    panic!("did not finish");
}

#[test]
fn a_decode_admission_with_images_needs_no_embeddings_when_its_kv_is_imported() {
    let req = image_request(1, 8, 20, 5, 6);
    let p = req.token_ids.clone();
    let first = reference_generation(&p, 1)[0];
    let mut dec = scheduler(64, 4, 8, 8, 256);
    dec.add_with_remote_kv(req, first, at(0)).unwrap();
    assert!(dec.kv_imported(r(1)));
    let mut out = stream_after_first(r(1), first);
    run_checking_embeds(&mut dec, &mut out, r(1), p.len());
    assert!(dec.take_embeds_wanted().is_empty(), "nothing to encode");
    assert_eq!(out[&r(1)].tokens, reference_generation(&p, 6));
}

#[test]
fn a_decode_request_with_images_that_must_recompute_waits_for_its_embeddings() {
    // A failed import: parked (not runnable) until the embeddings come, then recomputed.
    let req = image_request(1, 9, 20, 5, 6);
    let p = req.token_ids.clone();
    let first = reference_generation(&p, 1)[0];
    let mut dec = scheduler(64, 4, 8, 8, 256);
    dec.add_with_remote_kv(req, first, at(0)).unwrap();
    assert!(dec.kv_import_failed(r(1)));
    dec.check_invariants().unwrap();
    assert_eq!((dec.num_parked_for_embeds(), dec.num_waiting()), (1, 0));
    assert!(
        dec.schedule(at(0)).unwrap().is_empty(),
        "nothing runs without them"
    );
    let wanted = dec.take_embeds_wanted();
    assert_eq!(wanted.len(), 1);
    assert_eq!(
        (wanted[0].request, wanted[0].prompt.clone()),
        (r(1), p.clone())
    );
    assert!(dec.take_embeds_wanted().is_empty(), "listed once");
    assert!(dec.embeds_ready(r(1), wanted[0].serial, embeds_of(&wanted[0])));
    assert!(!dec.embeds_ready(r(1), wanted[0].serial, embeds_of(&wanted[0])));
    let mut out = stream_after_first(r(1), first);
    run_checking_embeds(&mut dec, &mut out, r(1), p.len());
    assert_eq!(out[&r(1)].tokens, reference_generation(&p, 6));

    // An admission refused at once (a local recompute from the first token): the same.
    let req = image_request(2, 10, 20, 5, 4);
    let p = req.token_ids.clone();
    let first = reference_generation(&p, 1)[0];
    dec.add_with_first_token(req, first, at(0)).unwrap();
    let wanted = dec.take_embeds_wanted();
    assert_eq!(wanted.len(), 1);
    assert!(dec.embeds_ready(r(2), wanted[0].serial, embeds_of(&wanted[0])));
    let mut out = stream_after_first(r(2), first);
    run_checking_embeds(&mut dec, &mut out, r(2), p.len());
    assert_eq!(out[&r(2)].tokens, reference_generation(&p, 4));

    // Embeddings that cannot be made end the request with an error; an abort while parked
    // frees everything and the late embeddings are dropped.
    let req = image_request(3, 11, 20, 5, 4);
    let first = reference_generation(&req.token_ids, 1)[0];
    dec.add_with_first_token(req, first, at(0)).unwrap();
    let wanted = dec.take_embeds_wanted().remove(0);
    let failed = dec
        .embeds_failed(r(3), wanted.serial, "no vision tower")
        .unwrap();
    assert!(
        matches!(failed.finish, Some(FinishReason::Error(ref why)) if why.contains("no vision tower"))
    );
    assert!(dec.embeds_failed(r(3), wanted.serial, "again").is_none());
    let req = image_request(4, 12, 20, 5, 4);
    let first = reference_generation(&req.token_ids, 1)[0];
    dec.add_with_first_token(req, first, at(0)).unwrap();
    let wanted = dec.take_embeds_wanted().remove(0);
    assert!(dec.abort(r(4)));
    assert!(!dec.embeds_ready(r(4), wanted.serial, embeds_of(&wanted)));
    dec.check_invariants().unwrap();
    assert!(dec.is_idle());
    assert_eq!(dec.block_manager().num_used_blocks(), 0);
}

#[test]
fn a_preempted_decode_request_with_images_is_parked_until_its_embeddings_come() {
    // 6 blocks of 4: two imported 12-token prompts (3 blocks each) fill the pool; the first
    // decode step needs a fourth block for one of them, so the newest is preempted.
    let mut dec = scheduler(6, 4, 8, 8, 256);
    let mut out = BTreeMap::new();
    let mut prompts = Vec::new();
    for id in 1..=2 {
        let req = image_request(id, 20 + id as u32, 12, 4, 6);
        let first = reference_generation(&req.token_ids, 1)[0];
        prompts.push(req.token_ids.clone());
        dec.add_with_remote_kv(req, first, at(0)).unwrap();
        assert!(dec.kv_imported(r(id)));
        out.extend(stream_after_first(r(id), first));
    }
    let mut served = false;
    for t in 0..200 {
        if dec.is_idle() {
            break;
        }
        for wanted in dec.take_embeds_wanted() {
            assert!(dec.embeds_ready(wanted.request, wanted.serial, embeds_of(&wanted)));
            served = true;
        }
        let plan = dec.schedule(at(t)).unwrap();
        for seq in &plan.seqs {
            assert!(
                seq.start_pos >= 12 || dec.prompt_embeds(seq.request).is_some(),
                "a recompute without embeddings"
            );
        }
        let sampled = sample(&dec, &plan);
        let outputs = dec.on_step_done(&plan, &sampled, at(t)).unwrap();
        record(&mut out, outputs);
        dec.check_invariants().unwrap();
    }
    assert!(dec.is_idle());
    assert!(
        dec.num_preemptions() > 0 && served,
        "the test preempts and re-encodes"
    );
    for (i, p) in prompts.iter().enumerate() {
        assert_eq!(out[&r(i as u64 + 1)].tokens, reference_generation(p, 6));
    }
}

mod random {
    use super::*;
    use proptest::prelude::*;

    /// What the driver of a P/D worker may do next.
    #[derive(Clone, Debug)]
    enum Op {
        PrefillOnly {
            len: usize,
            max_tokens: u32,
        },
        RemoteKv {
            len: usize,
            max_tokens: u32,
        },
        Plain {
            len: usize,
            max_tokens: u32,
        },
        Step,
        /// Finish the oldest import: succeeded or failed.
        ImportDone(bool),
        /// Release the oldest held request (exported).
        Release,
        /// Abort the request with this index among those added.
        Abort(usize),
        /// Answer the parked requests' embeddings (made, or failed).
        Embeds(bool),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1usize..40, 1u32..6).prop_map(|(len, max_tokens)| Op::PrefillOnly { len, max_tokens }),
            (1usize..40, 1u32..6).prop_map(|(len, max_tokens)| Op::RemoteKv { len, max_tokens }),
            (1usize..40, 1u32..6).prop_map(|(len, max_tokens)| Op::Plain { len, max_tokens }),
            Just(Op::Step),
            Just(Op::Step),
            any::<bool>().prop_map(Op::ImportDone),
            Just(Op::Release),
            (0usize..16).prop_map(Op::Abort),
            any::<bool>().prop_map(Op::Embeds),
        ]
    }

    fn answer_embeds(
        s: &mut Scheduler,
        streams: &mut BTreeMap<RequestId, Stream>,
        wanted: Vec<EmbedsWanted>,
        ok: bool,
    ) {
        for w in wanted {
            if ok {
                s.embeds_ready(w.request, w.serial, embeds_of(&w));
            } else if let Some(out) = s.embeds_failed(w.request, w.serial, "failed") {
                record(streams, vec![(w.request, out)]);
            }
        }
    }

    proptest! {
        /// Any interleaving keeps the invariants, and once every held request is released
        /// and every import settled, the pool drains to zero blocks in use.
        #[test]
        fn any_interleaving_keeps_invariants_and_leaks_no_blocks(
            ops in proptest::collection::vec(op(), 1..60),
            num_blocks in 8u32..40,
        ) {
            let mut s = scheduler(num_blocks, 4, 16, 4, 64);
            let mut streams = BTreeMap::new();
            let mut added: Vec<RequestId> = Vec::new();
            let mut importing: Vec<RequestId> = Vec::new();
            let mut held: Vec<RequestId> = Vec::new();
            for (i, op) in ops.into_iter().enumerate() {
                let id = r(i as u64);
                match op {
                    Op::PrefillOnly { len, max_tokens } => {
                        if s.add_prefill_only(request(i as u64, prompt(i as u32, len), max_tokens), at(0)).is_ok() {
                            added.push(id);
                        }
                    }
                    Op::RemoteKv { len, max_tokens } => {
                        // From 8 tokens on, an image: recomputes park it for embeddings.
                        let req = if len >= 8 {
                            image_request(i as u64, i as u32, len, 4, max_tokens)
                        } else {
                            request(i as u64, prompt(i as u32, len), max_tokens)
                        };
                        let first = reference_generation(&req.token_ids, 1)[0];
                        if s.add_with_remote_kv(req, first, at(0)).is_ok() {
                            added.push(id);
                            importing.push(id);
                            streams.insert(id, Stream { tokens: vec![first], finish: None, cached_tokens: Some(0), items: 1 });
                        }
                    }
                    Op::Plain { len, max_tokens } => {
                        if s.add_request(request(i as u64, prompt(i as u32, len), max_tokens), at(0)).is_ok() {
                            added.push(id);
                        }
                    }
                    Op::Step => {
                        step(&mut s, &mut streams, at(i as u64));
                        held.extend(s.take_prefilled().into_iter().map(|p| p.request));
                    }
                    Op::ImportDone(ok) => {
                        if !importing.is_empty() {
                            let id = importing.remove(0);
                            if ok { s.kv_imported(id); } else { s.kv_import_failed(id); }
                        }
                    }
                    Op::Release => {
                        if !held.is_empty() {
                            s.release_held(held.remove(0));
                        }
                    }
                    Op::Abort(k) => {
                        if let Some(&id) = added.get(k) {
                            s.abort(id);
                            importing.retain(|r| *r != id);
                            held.retain(|r| *r != id);
                        }
                    }
                    Op::Embeds(ok) => {
                        let wanted = s.take_embeds_wanted();
                        answer_embeds(&mut s, &mut streams, wanted, ok);
                    }
                }
                s.check_invariants().map_err(|e| TestCaseError::fail(e.to_string()))?;
            }
            for id in importing.drain(..) {
                s.kv_imported(id);
            }
            for t in 0..400u64 {
                for id in held.drain(..) {
                    s.release_held(id);
                }
                let wanted = s.take_embeds_wanted();
                answer_embeds(&mut s, &mut streams, wanted, true);
                if s.is_idle() {
                    break;
                }
                step(&mut s, &mut streams, at(1000 + t));
                held.extend(s.take_prefilled().into_iter().map(|p| p.request));
            }
            prop_assert!(s.is_idle());
            prop_assert_eq!(s.block_manager().num_used_blocks(), 0);
        }
    }
}
