//! The worker's side of membership: what it registers under in discovery, the event-plane
//! topics it publishes its KV events and load on, and the load reporter. The router's side
//! (watching, subscribing, gap handling) is [`crate::router::membership`].

use crate::ids::WorkerId;
use crate::worker::SchedulerStats;
use std::time::Duration;
use tokio::sync::watch;
use turbine_runtime::SharedClock;

/// The discovery component every worker registers under.
pub const WORKER_COMPONENT: &str = "worker";
/// Name the frontend serves its embedded registry under.
pub const REGISTRY_SERVICE: &str = "registry";
/// Instance metadata keys.
pub const META_EVENTS: &str = "events";
pub const META_WORKER_ID: &str = "worker_id";

pub fn kv_topic(worker: WorkerId) -> String {
    format!("kv.{}", worker.0)
}

pub fn metrics_topic(worker: WorkerId) -> String {
    format!("metrics.{}", worker.0)
}

/// How often a worker reports its load even when nothing changed: the report doubles as a
/// heartbeat of its KV event count (see [`crate::router::membership::TrailingLoss`]).
pub const LOAD_REPORT_EVERY: Duration = Duration::from_secs(1);

/// What the router reads from a load report (see `Dispatcher::update_load` and
/// [`crate::router::membership::TrailingLoss`]); a report is due when this changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RoutingView {
    running: usize,
    waiting: usize,
    load_blocks: u64,
    kv_batches: u64,
}

impl RoutingView {
    fn of(s: &SchedulerStats) -> Self {
        RoutingView {
            running: s.num_running,
            waiting: s.num_waiting,
            load_blocks: s.load_blocks(),
            kv_batches: s.kv_batches,
        }
    }
}

/// Publishes a worker's load (`publish`) when what the router reads from it changes, and at
/// least every `every` on `clock` (a heartbeat for [`crate::router::membership::TrailingLoss`]), until the worker loop
/// is gone. Steps that change only counters (most decode steps: no block boundary crossed,
/// nobody admitted or finished) send nothing.
pub async fn report_load(
    mut stats: watch::Receiver<SchedulerStats>,
    every: Duration,
    clock: SharedClock,
    mut publish: impl FnMut(&SchedulerStats),
) {
    let mut last: Option<RoutingView> = None;
    let mut due = clock.now() + every;
    loop {
        let wait = due.saturating_duration_since(clock.now());
        let heartbeat = tokio::select! {
            biased;
            changed = stats.changed() => {
                if changed.is_err() {
                    return;
                }
                false
            }
            _ = clock.sleep(wait) => true,
        };
        let s = stats.borrow_and_update().clone();
        let view = RoutingView::of(&s);
        if heartbeat || last != Some(view) {
            publish(&s);
            last = Some(view);
            due = clock.now() + every;
        }
    }
}

/// Discovery metadata key: the worker's role (`aggregated`, `prefill`, `decode`; absent:
/// aggregated).
pub const META_ROLE: &str = "role";

/// The role a worker registered with.
pub fn role_of(inst: &turbine_runtime::discovery::Instance) -> crate::cluster_config::WorkerRole {
    use crate::cluster_config::WorkerRole;
    match inst.metadata.get(META_ROLE).map(String::as_str) {
        Some("prefill") => WorkerRole::Prefill,
        Some("decode") => WorkerRole::Decode,
        Some("encoder") => WorkerRole::Encoder,
        _ => WorkerRole::Aggregated,
    }
}

/// The metadata value for `role`.
pub fn role_name(role: crate::cluster_config::WorkerRole) -> &'static str {
    use crate::cluster_config::WorkerRole;
    match role {
        WorkerRole::Aggregated => "aggregated",
        WorkerRole::Prefill => "prefill",
        WorkerRole::Decode => "decode",
        WorkerRole::Encoder => "encoder",
    }
}
