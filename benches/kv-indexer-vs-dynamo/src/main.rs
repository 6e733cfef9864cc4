//! turbine's FlashIndexer against Dynamo's own indexers (`dynamo-kv-router` 1.6.1), in one
//! process, on one seeded Mooncake-style workload (see `workload.rs`).
//!
//! Figures per indexer: find_matches p50/p99 on 1,024-block queries (per-call timings),
//! ingestion with 1 writer and with 2 threads (block events/s, wall time until every event is
//! applied), and the index's memory (live heap bytes after building it with 1 writer, from a
//! counting global allocator, plus turbine's map tables that are mappings of their own; the
//! workload's own events are allocated outside the window). Each indexer's build reads a copy
//! of the events made just before its timer starts.
//! Indexers are run in turn within each round, rounds repeated, medians reported, so a noisy
//! neighbour hits all of them alike. Every round cross-checks that each Dynamo indexer reports
//! exactly turbine's per-worker overlaps on every query; any difference fails the run.
//!
//! `cargo run --release --manifest-path benches/kv-indexer-vs-dynamo/Cargo.toml -- [rounds]`

mod workload;

use dynamo_kv_router::indexer::{RadixTree, SyncIndexer, ThreadPoolIndexer};
use dynamo_kv_router::nested_map::PositionalIndexer;
use dynamo_kv_router::protocols::{
    ExternalSequenceBlockHash, KvCacheEvent, KvCacheEventData, KvCacheRemoveData, KvCacheStoreData,
    KvCacheStoredBlockData, LocalBlockHash, OverlapScores as DynScores, RouterEvent,
};
use dynamo_kv_router::ConcurrentRadixTreeCompressed;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};
use turbine_actors::ids::WorkerId;
use turbine_actors::kv::hash::{BlockHash, BlockSize};
use turbine_actors::kv::indexer::FlashIndexer;
use turbine_actors::kv::{KvEvent, KvEventBatch};
use workload::{EvKind, Params, Workload};

/// Live heap bytes, for the memory figure.
struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        System.alloc_zeroed(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        System.realloc(p, l, new)
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// CPU seconds used by the whole process so far (every thread). Ingest rates per CPU-second
/// do not depend on how much of the machine the run got, which on a shared VM the wall-clock
/// rates do.
fn process_cpu() -> f64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut t) };
    if rc != 0 {
        return f64::NAN;
    }
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

const BLOCK_SIZE: u32 = 16;
const POSITIONAL_JUMP: usize = 32;

type Scores = Vec<(u64, u32)>;

fn turbine_batches(w: &Workload) -> Vec<KvEventBatch> {
    w.events
        .iter()
        .map(|e| KvEventBatch {
            worker: WorkerId(e.worker),
            seq: e.seq,
            ts: 0.0,
            events: vec![match &e.kind {
                EvKind::Stored { parent, blocks, .. } => KvEvent::BlockStored {
                    block_hashes: blocks.iter().map(|b| BlockHash(b.0)).collect(),
                    parent_block_hash: parent.map(BlockHash),
                    token_ids: Vec::new(),
                    block_size: BlockSize::DEFAULT,
                    lora_id: None,
                },
                EvKind::Removed { hashes } => KvEvent::BlockRemoved {
                    block_hashes: hashes.iter().map(|h| BlockHash(*h)).collect(),
                },
            }],
        })
        .collect()
}

fn dynamo_events(w: &Workload) -> Vec<RouterEvent> {
    w.events
        .iter()
        .map(|e| {
            let data = match &e.kind {
                EvKind::Stored {
                    parent,
                    start,
                    blocks,
                } => KvCacheEventData::Stored(KvCacheStoreData {
                    parent_hash: parent.map(ExternalSequenceBlockHash),
                    start_position: Some(*start),
                    blocks: blocks
                        .iter()
                        .map(|&(s, l)| KvCacheStoredBlockData {
                            block_hash: ExternalSequenceBlockHash(s),
                            tokens_hash: LocalBlockHash(l),
                            mm_extra_info: None,
                        })
                        .collect(),
                }),
                EvKind::Removed { hashes } => KvCacheEventData::Removed(KvCacheRemoveData {
                    block_hashes: hashes
                        .iter()
                        .map(|h| ExternalSequenceBlockHash(*h))
                        .collect(),
                }),
            };
            RouterEvent::new(
                e.worker,
                KvCacheEvent {
                    event_id: e.seq,
                    data,
                    dp_rank: 0,
                },
            )
        })
        .collect()
}

fn from_dynamo(s: &DynScores) -> Scores {
    let mut v: Scores = s
        .scores
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(w, n)| (w.worker_id, *n))
        .collect();
    v.sort_unstable();
    v
}

/// An index under test, built and ready for queries.
enum Built {
    Turbine(Box<FlashIndexer>),
    Crtc(ThreadPoolIndexer<ConcurrentRadixTreeCompressed>),
    Radix(RadixTree),
    Positional(ThreadPoolIndexer<PositionalIndexer>),
}

impl Built {
    /// One timed query; the query's input is prepared outside the timer.
    fn timed_query(
        &self,
        q: &workload::Query,
        seq: &[BlockHash],
        local: Vec<LocalBlockHash>,
    ) -> (Duration, Scores) {
        let _ = q;
        match self {
            Built::Turbine(ix) => {
                let t = Instant::now();
                let m = ix.find_matches(seq);
                let d = t.elapsed();
                (d, m.scores.iter().map(|(w, n)| (w.0, *n)).collect())
            }
            Built::Crtc(p) => {
                let t = Instant::now();
                let m = p.backend().find_matches(&local, false);
                let d = t.elapsed();
                (d, from_dynamo(&m))
            }
            Built::Radix(r) => {
                let t = Instant::now();
                let m = r.find_matches(local, false);
                let d = t.elapsed();
                (d, from_dynamo(&m))
            }
            Built::Positional(p) => {
                let t = Instant::now();
                let m = p.backend().find_matches(&local, false);
                let d = t.elapsed();
                (d, from_dynamo(&m))
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Turbine,
    Crtc,
    Radix,
    Positional,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Turbine => "turbine FlashIndexer",
            Kind::Crtc => "Dynamo ConcurrentRadixTreeCompressed (ThreadPoolIndexer)",
            Kind::Radix => "Dynamo RadixTree",
            Kind::Positional => "Dynamo PositionalIndexer (ThreadPoolIndexer, jump 32)",
        }
    }
}

fn flush<T: SyncIndexer>(p: &ThreadPoolIndexer<T>) {
    if let Err(e) = futures::executor::block_on(p.flush_and_wait()) {
        panic!("flush: {e}");
    }
}

/// Build `kind` with `threads` event threads; returns the index, the ingest wall time and the
/// process CPU seconds in the same window (the events' copy for Dynamo is made before both).
fn build_timed(
    kind: Kind,
    threads: usize,
    batches: &[KvEventBatch],
    dyn_events: &[RouterEvent],
) -> Option<(Built, Duration, f64)> {
    CPU_MARK.with(|m| m.set(f64::NAN));
    let r = build(kind, threads, batches, dyn_events)?;
    let cpu = process_cpu() - CPU_MARK.with(|m| m.get());
    Some((r.0, r.1, cpu))
}

thread_local! {
    /// Process CPU time when `build`'s timer started.
    static CPU_MARK: std::cell::Cell<f64> = const { std::cell::Cell::new(f64::NAN) };
}

fn start_timer() -> Instant {
    CPU_MARK.with(|m| m.set(process_cpu()));
    Instant::now()
}

/// Build `kind` with `threads` event threads; returns the index and the ingest wall time.
fn build(
    kind: Kind,
    threads: usize,
    batches: &[KvEventBatch],
    dyn_events: &[RouterEvent],
) -> Option<(Built, Duration)> {
    match kind {
        Kind::Turbine => {
            // A fresh copy of the input, as each Dynamo indexer gets (its `to_vec` below):
            // every indexer reads events written just before its timed build.
            let batches = batches.to_vec();
            let batches = batches.as_slice();
            let ix = FlashIndexer::default();
            let t = start_timer();
            if threads == 1 {
                for b in batches {
                    ix.apply(b);
                }
            } else {
                // Each thread owns the workers w % threads == i and applies their batches in order.
                std::thread::scope(|s| {
                    for i in 0..threads {
                        let ix = &ix;
                        s.spawn(move || {
                            for b in batches
                                .iter()
                                .filter(|b| b.worker.0 as usize % threads == i)
                            {
                                ix.apply(b);
                            }
                        });
                    }
                });
            }
            let d = t.elapsed();
            Some((Built::Turbine(Box::new(ix)), d))
        }
        Kind::Radix => {
            if threads != 1 {
                return None; // single-threaded by design
            }
            let events = dyn_events.to_vec();
            let mut r = RadixTree::new();
            let mut errors = 0usize;
            let t = start_timer();
            for e in events {
                errors += usize::from(r.apply_event(e).is_err());
            }
            let d = t.elapsed();
            if errors > 0 {
                println!("  note: RadixTree rejected {errors} events");
            }
            Some((Built::Radix(r), d))
        }
        Kind::Crtc => {
            let events = dyn_events.to_vec();
            let p =
                ThreadPoolIndexer::new(ConcurrentRadixTreeCompressed::new(), threads, BLOCK_SIZE);
            let t = start_timer();
            for e in events {
                if let Err(e) = p.enqueue_event(e) {
                    panic!("enqueue: {e}");
                }
            }
            flush(&p);
            Some((Built::Crtc(p), t.elapsed()))
        }
        Kind::Positional => {
            let events = dyn_events.to_vec();
            let p = ThreadPoolIndexer::new(
                PositionalIndexer::new(POSITIONAL_JUMP),
                threads,
                BLOCK_SIZE,
            );
            let t = start_timer();
            for e in events {
                if let Err(e) = p.enqueue_event(e) {
                    panic!("enqueue: {e}");
                }
            }
            flush(&p);
            Some((Built::Positional(p), t.elapsed()))
        }
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[derive(Default)]
struct Figures {
    p50_us: Vec<f64>,
    p99_us: Vec<f64>,
    ingest1: Vec<f64>,
    ingest2: Vec<f64>,
    cpu1: Vec<f64>,
    cpu2: Vec<f64>,
    mem_mb: Vec<f64>,
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let only: Option<String> = std::env::args().nth(2);
    let params = Params {
        seed: 7,
        workers: 100,
        groups: 1_000,
        requests: 4_000,
        capacity: 12_000,
        queries: 10_000,
        query_blocks: 1_024,
    };
    let t = Instant::now();
    let w = workload::generate(&params);
    println!(
        "workload (seed {}): {} workers, {} groups, {} requests, {} events, {} block events ({} stored, {} removed), {} distinct blocks ever, {} at the end; {} queries of {} blocks (generated in {:.1?})",
        params.seed,
        w.workers,
        params.groups,
        params.requests,
        w.events.len(),
        w.block_events,
        w.stored_blocks,
        w.removed_blocks,
        w.distinct_ever,
        w.distinct_at_end,
        w.queries.len(),
        params.query_blocks,
        t.elapsed()
    );
    let batches = turbine_batches(&w);
    let dyn_events = dynamo_events(&w);
    let kinds = [Kind::Turbine, Kind::Crtc, Kind::Radix, Kind::Positional];
    let kinds: Vec<Kind> = kinds
        .into_iter()
        .filter(|k| {
            only.as_deref()
                .is_none_or(|o| format!("{k:?}").eq_ignore_ascii_case(o) || *k == Kind::Turbine)
        })
        .collect();
    let mut figs: Vec<Figures> = kinds.iter().map(|_| Figures::default()).collect();
    let mut reference: Option<Vec<Scores>> = None;
    let mut mismatches = 0usize;
    for round in 0..rounds {
        println!("round {round}");
        for (ki, &kind) in kinds.iter().enumerate() {
            let base = live();
            let Some((ix, d1, c1)) = build_timed(kind, 1, &batches, &dyn_events) else {
                continue;
            };
            // Live heap bytes, plus (turbine) the map tables in mappings of their own, which
            // the counting allocator does not see.
            let own_mappings = match &ix {
                Built::Turbine(t) => t.mapped_bytes(),
                _ => 0,
            };
            let mem = (live() - base + own_mappings as isize) as f64 / 1e6;
            let rate1 = w.block_events as f64 / d1.as_secs_f64() / 1e6;
            let mut lat = Vec::with_capacity(w.queries.len());
            let mut results = Vec::with_capacity(w.queries.len());
            for q in &w.queries {
                // Both inputs are built fresh right before the call, for every indexer alike,
                // as a router has them just after hashing the prompt (turbine takes sequence
                // hashes, Dynamo's trees local hashes).
                let seq: Vec<BlockHash> = q.seq.iter().map(|h| BlockHash(*h)).collect();
                let local: Vec<LocalBlockHash> =
                    q.local.iter().map(|h| LocalBlockHash(*h)).collect();
                let (d, s) = ix.timed_query(q, &seq, local);
                lat.push(d);
                results.push(s);
            }
            lat.sort();
            let (p50, p99) = (pct(&lat, 0.5), pct(&lat, 0.99));
            match &reference {
                None if kind == Kind::Turbine => reference = Some(results.clone()),
                Some(want) => {
                    for (i, (got, want)) in results.iter().zip(want).enumerate() {
                        if got != want {
                            if mismatches < 3 {
                                println!(
                                    "  MISMATCH {kind:?} query {i}: got {got:?}\n    want {want:?}"
                                );
                            }
                            mismatches += 1;
                        }
                    }
                }
                None => {}
            }
            let matched: f64 = results
                .iter()
                .map(|s| s.iter().map(|x| x.1).max().unwrap_or(0) as f64)
                .sum::<f64>()
                / results.len() as f64;
            let holders: f64 =
                results.iter().map(|s| s.len() as f64).sum::<f64>() / results.len() as f64;
            drop(ix);
            let rate2 = build_timed(kind, 2, &batches, &dyn_events).map(|(ix, d2, c2)| {
                drop(ix);
                (
                    w.block_events as f64 / d2.as_secs_f64() / 1e6,
                    w.block_events as f64 / c2 / 1e6,
                )
            });
            let cpu1 = w.block_events as f64 / c1 / 1e6;
            println!(
                "  {:<58} find_matches p50 {:>6.2} us p99 {:>6.2} us | ingest 1 writer {:>5.2} M/s ({:>5.2} M/cpu-s), 2 threads {} | index {:>6.1} MB | mean longest match {:.0} blocks, {:.1} workers with overlap",
                kind.name(),
                p50.as_secs_f64() * 1e6,
                p99.as_secs_f64() * 1e6,
                rate1,
                cpu1,
                rate2.map_or("   -".to_string(), |(r, c)| format!("{r:>5.2} M/s ({c:>5.2} M/cpu-s)")),
                mem,
                matched,
                holders
            );
            let f = &mut figs[ki];
            f.p50_us.push(p50.as_secs_f64() * 1e6);
            f.p99_us.push(p99.as_secs_f64() * 1e6);
            f.ingest1.push(rate1);
            f.cpu1.push(cpu1);
            if let Some((r, c)) = rate2 {
                f.ingest2.push(r);
                f.cpu2.push(c);
            }
            f.mem_mb.push(mem);
        }
    }
    println!("\nMEDIANS over {rounds} rounds (block events/s in millions)");
    println!(
        "| indexer | find_matches p50 | p99 | ingest 1 writer | ingest 2 threads | index memory | ingest per CPU-second, 1 writer | 2 threads |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for (k, f) in kinds.iter().zip(figs) {
        let two = |v: Vec<f64>, unit: &str| {
            if v.is_empty() {
                "-".to_string()
            } else {
                format!("{:.2} {unit}", median(v))
            }
        };
        println!(
            "| {} | {:.2} us | {:.2} us | {:.2} M/s | {} | {:.0} MB | {:.2} M/cpu-s | {} |",
            k.name(),
            median(f.p50_us),
            median(f.p99_us),
            median(f.ingest1),
            two(f.ingest2, "M/s"),
            median(f.mem_mb),
            median(f.cpu1),
            two(f.cpu2, "M/cpu-s"),
        );
    }
    if mismatches > 0 {
        println!("CROSS-CHECK FAILED: {mismatches} query results differ");
        std::process::exit(1);
    }
    println!("cross-check: every Dynamo indexer reported turbine's per-worker overlaps on all {} queries, every round", w.queries.len());
}
