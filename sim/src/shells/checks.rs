//! What the run watches and checks: membership changes, idleness, the settled-state
//! invariants, and the per-worker figures of the report.

use super::clock::ScaledClock;
use super::fleet::World;
use super::{lock, record, Log};
use crate::run::WorkerRecord;
use crate::worker::check_settled;
use futures::StreamExt;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use turbine_actors::ids::WorkerId;
use turbine_actors::kv::indexer::FlashIndexer;
use turbine_actors::kv::BlockHash;
use turbine_actors::worker::announce::WORKER_COMPONENT;
use turbine_actors::worker::WorkerHandle;
use turbine_runtime::discovery::{Discovery, DiscoveryEvent};

/// Logs workers joining and leaving the registry (a second watcher beside the frontend's),
/// counting departures.
pub(super) async fn log_membership(
    discovery: Arc<dyn Discovery>,
    clock: ScaledClock,
    log: Log,
    departures: Arc<Mutex<u64>>,
) {
    let Ok(mut watch) = discovery.watch(WORKER_COMPONENT).await else {
        return;
    };
    while let Some(event) = watch.next().await {
        let (kind, inst) = match &event {
            DiscoveryEvent::Added(i) => ("join", i),
            DiscoveryEvent::Removed(i) => {
                *lock(&departures) += 1;
                ("leave", i)
            }
        };
        let id = inst.id.parse().unwrap_or(u64::MAX);
        record(&log, clock.sim_now(), kind, id, 0, 0);
    }
}

/// Every live worker reported itself idle after its last step (read from its load watch, not
/// by asking: a command would make it publish again).
pub(super) fn workers_idle(world: &World) -> bool {
    world.live_workers().iter().all(|(_, handle, _)| {
        let s = handle.stats();
        s.num_running + s.num_waiting == 0
    })
}

/// The settled-state invariants: every live worker passes its block manager's checks, holds
/// no blocks for requests and still caches what it announced; the index lists only live
/// workers, and for each only blocks it announced and still holds.
pub(super) async fn check_workers(world: &Arc<World>, index: &FlashIndexer) -> Vec<String> {
    let mut problems = Vec::new();
    let live = world.live_workers();
    let live_ids: BTreeSet<WorkerId> = live.iter().map(|(id, _, _)| *id).collect();
    for w in index.workers() {
        let n = index.worker_block_count(w);
        if n > 0 && !live_ids.contains(&w) {
            problems.push(format!(
                "index holds {n} blocks of {w}, which is not a live worker"
            ));
        }
    }
    for (id, handle, held) in live {
        let announced: BTreeSet<BlockHash> = lock(&held).clone();
        let check = handle
            .inspect(move |s| {
                let mut p = Vec::new();
                if let Err(e) = check_settled(id, s, &announced) {
                    p.push(e.0);
                }
                if !s.is_idle() {
                    p.push(format!("{id} still has requests after the run"));
                }
                (p, announced)
            })
            .await;
        let Ok((p, announced)) = check else {
            problems.push(format!("{id} stopped answering"));
            continue;
        };
        problems.extend(p);
        let indexed = index.worker_block_count(id);
        let indexed_and_held = announced
            .iter()
            .filter(|h| index.holders(**h).contains(&id))
            .count();
        if indexed != indexed_and_held {
            problems.push(format!(
                "index holds {} blocks of {id} that it does not hold",
                indexed - indexed_and_held.min(indexed)
            ));
        }
    }
    problems
}

pub(super) async fn worker_records(world: &Arc<World>) -> Vec<WorkerRecord> {
    // Figures of the crashed incarnations, plus the live one's handle and engine counters
    // (taken under the lock; the live block stats are asked for after it is released).
    let snapshot: Vec<(WorkerRecord, Option<WorkerHandle>)> = lock(&world.slots)
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let live = s
                .running
                .as_ref()
                .map(|r| *lock(&r.counters))
                .unwrap_or_default();
            let record = WorkerRecord {
                slot: i as u32 + 1,
                final_id: s.last_id,
                busy_s: (s.retired_busy + live.busy).as_secs_f64(),
                steps: s.retired_steps + live.steps,
                crashes: s.crashes,
                prefix_query_tokens: s.retired_kv.prefix_query_tokens,
                prefix_hit_tokens: s.retired_kv.prefix_hit_tokens,
            };
            (record, s.running.as_ref().map(|r| r.handle.clone()))
        })
        .collect();
    let mut out = Vec::new();
    for (mut record, handle) in snapshot {
        if let Some(h) = handle {
            let kv = h
                .inspect(|s| s.block_manager().stats())
                .await
                .unwrap_or_default();
            record.prefix_query_tokens += kv.prefix_query_tokens;
            record.prefix_hit_tokens += kv.prefix_hit_tokens;
        }
        out.push(record);
    }
    out
}
