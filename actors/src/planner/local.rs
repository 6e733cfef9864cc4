//! The local connector: each pool (aggregated; or prefill and decode) grows by `turbine
//! worker` processes on this machine, of the pool's worker group, started with the same
//! cluster file and the frontend's registry, each joining through discovery like any other
//! worker (a prefill or decode child with its own transfer plane). The workers `turbine up`
//! runs in its own process are each pool's floor: the connector only starts and stops its
//! own children.
//!
//! What it does is printed on stdout, one `turbine planner: ...` line per step, next to
//! `turbine up`'s own lines.
//!
//! Scale-down drains before it stops: the worker is taken out of routing (when the router
//! is in this process), the connector waits, up to `drain_timeout`, for the worker's own
//! load report (its event plane) to say it has nothing running or waiting, then sends it
//! SIGTERM and waits, up to `drain_timeout` again, for it to exit; only then is it killed.
//! So no request is cut off even by a worker whose SIGTERM handling stops at once; one
//! that drains on SIGTERM (finishing what it has) fits the same sequence.

use super::connector::{Connector, ConnectorError};
use super::core::Replicas;
use crate::ids::WorkerId;
use crate::router::service::RouterCore;
use crate::worker::announce::{metrics_topic, LOAD_REPORT_EVERY};
use crate::worker::SchedulerStats;
use async_trait::async_trait;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use turbine_runtime::events::{Delivery, EventSubscriber};
use turbine_runtime::RuntimeMetrics;

/// How the connector starts a worker.
#[derive(Clone, Debug)]
pub struct LocalSpec {
    /// The `turbine` binary (normally this process's own executable).
    pub binary: PathBuf,
    /// The cluster file `turbine up` was started with.
    pub cluster_file: PathBuf,
    /// The worker group the children run.
    pub group: usize,
    /// The frontend's request-plane endpoint, where the registry is served.
    pub registry: String,
    /// Workers in the frontend's own process: the pool never goes below them.
    pub floor: usize,
    pub drain_timeout: Duration,
}

/// What a child printed once it was serving and registered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Joined {
    pub id: WorkerId,
    pub events: String,
}

/// Reads `turbine worker w12 serving on tcp://.. (events tcp://..), registered with ..`.
pub fn parse_serving_line(line: &str) -> Option<Joined> {
    let rest = line.strip_prefix("turbine worker w")?;
    let (id, rest) = rest.split_once(' ')?;
    let id = id.parse().ok()?;
    let (_, events) = rest.split_once("(events ")?;
    let (events, _) = events.split_once(')')?;
    Some(Joined {
        id: WorkerId(id),
        events: events.to_string(),
    })
}

struct ChildWorker {
    child: Child,
    joined: watch::Receiver<Option<Joined>>,
}

/// One pool's processes.
struct Pool {
    spec: LocalSpec,
    children: Vec<ChildWorker>,
}

/// Starts and stops `turbine worker` processes, per pool.
pub struct LocalProcesses {
    /// The cluster's shape (its variant).
    shape: Replicas,
    /// In [`Replicas::pools`] order.
    pools: Vec<Pool>,
    /// The router in this process, if any: leaving workers are taken out of it first.
    router: Option<Arc<RouterCore>>,
    metrics: RuntimeMetrics,
    drains: Vec<tokio::task::JoinHandle<()>>,
}

impl LocalProcesses {
    /// `specs`: one per pool of `shape`, in [`Replicas::pools`] order.
    pub fn new(
        shape: Replicas,
        specs: Vec<LocalSpec>,
        router: Option<Arc<RouterCore>>,
        metrics: RuntimeMetrics,
    ) -> Result<LocalProcesses, ConnectorError> {
        if specs.len() != shape.pools().len() {
            return Err(ConnectorError::Shape(format!(
                "{} worker group(s) for {} pool(s)",
                specs.len(),
                shape.pools().len()
            )));
        }
        Ok(LocalProcesses {
            shape,
            pools: specs
                .into_iter()
                .map(|spec| Pool {
                    spec,
                    children: Vec::new(),
                })
                .collect(),
            router,
            metrics,
            drains: Vec::new(),
        })
    }

    fn spawn_child(s: &LocalSpec) -> Result<ChildWorker, ConnectorError> {
        let mut child = Command::new(&s.binary)
            .arg("worker")
            .arg("-f")
            .arg(&s.cluster_file)
            .args(["--group", &s.group.to_string()])
            .args(["--registry", &s.registry])
            .args(["--bind", "127.0.0.1:0", "--events-bind", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| ConnectorError::Start(format!("{}: {e}", s.binary.display())))?;
        let (tx, joined) = watch::channel(None);
        let group = s.group;
        if let Some(out) = child.stdout.take() {
            tokio::spawn(async move {
                let mut lines = BufReader::new(out).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Some(j) = parse_serving_line(&line) {
                        println!(
                            "turbine planner: worker process {} of group {group} serving",
                            j.id
                        );
                        let _ = tx.send(Some(j));
                    }
                }
            });
        }
        println!(
            "turbine planner: started a worker process of group {group} (pid {})",
            child.id().unwrap_or(0)
        );
        Ok(ChildWorker { child, joined })
    }

    /// Forgets children that exited on their own (a crash: the next decision replaces it).
    fn reap(&mut self) {
        for pool in &mut self.pools {
            pool.children.retain_mut(|c| match c.child.try_wait() {
                Ok(None) => true,
                Ok(Some(status)) => {
                    tracing::warn!(%status, "planner: a worker process exited by itself");
                    false
                }
                Err(_) => false,
            });
        }
        self.drains.retain(|d| !d.is_finished());
    }

    fn current(&self) -> Replicas {
        let sizes: Vec<usize> = self
            .pools
            .iter()
            .map(|p| p.spec.floor + p.children.len())
            .collect();
        self.shape.with_pools(&sizes)
    }

    /// Waits for every worker being stopped to be gone (tests, shutdown).
    pub async fn drained(&mut self) {
        for d in self.drains.drain(..) {
            let _ = d.await;
        }
    }

    /// Ids of the children that are serving.
    pub fn serving(&self) -> Vec<WorkerId> {
        self.pools
            .iter()
            .flat_map(|p| &p.children)
            .filter_map(|c| c.joined.borrow().as_ref().map(|j| j.id))
            .collect()
    }
}

#[async_trait]
impl Connector for LocalProcesses {
    async fn apply(&mut self, target: Replicas) -> Result<Replicas, ConnectorError> {
        let goal = target.pools();
        if goal.len() != self.pools.len() {
            return Err(ConnectorError::Shape(
                "the target has another number of pools".into(),
            ));
        }
        self.reap();
        for (pool, &workers) in self.pools.iter_mut().zip(&goal) {
            let want = workers.saturating_sub(pool.spec.floor);
            while pool.children.len() < want {
                let c = Self::spawn_child(&pool.spec)?;
                pool.children.push(c);
            }
            while pool.children.len() > want {
                // The newest first: it holds the least cached KV.
                let Some(c) = pool.children.pop() else { break };
                let (router, metrics, timeout) = (
                    self.router.clone(),
                    self.metrics.clone(),
                    pool.spec.drain_timeout,
                );
                self.drains
                    .push(tokio::spawn(drain_and_stop(c, router, metrics, timeout)));
            }
        }
        Ok(self.current())
    }
}

/// Takes a child out of routing, waits until it reports itself idle, then SIGTERM; kills
/// it if it has not exited within `timeout`.
async fn drain_and_stop(
    mut c: ChildWorker,
    router: Option<Arc<RouterCore>>,
    metrics: RuntimeMetrics,
    timeout: Duration,
) {
    let joined = c.joined.borrow().clone();
    let pid = c.child.id().unwrap_or(0);
    println!("turbine planner: stopping a worker process (pid {pid})");
    if let Some(j) = &joined {
        if let Some(router) = &router {
            router.remove_worker(j.id);
        }
        match tokio::time::timeout(timeout, wait_idle(j, metrics)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(worker = %j.id, "planner: drain: {e}"),
            Err(_) => tracing::warn!(worker = %j.id, "planner: drain timed out; stopping it"),
        }
    }
    if let Some(pid) = c.child.id().and_then(|p| i32::try_from(p).ok()) {
        // SAFETY: kill(2) on a child we own and have not reaped (`id()` is Some until then).
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    match tokio::time::timeout(timeout, c.child.wait()).await {
        Ok(Ok(status)) => {
            println!("turbine planner: worker process (pid {pid}) exited ({status})")
        }
        _ => {
            tracing::warn!("planner: worker process did not exit after SIGTERM; killing it");
            let _ = c.child.kill().await;
        }
    }
}

/// Returns once `j` reports nothing running or waiting, in a report sent at least one
/// reporting period after it left routing (so a request routed just before is counted).
async fn wait_idle(j: &Joined, metrics: RuntimeMetrics) -> Result<(), String> {
    let mut sub = EventSubscriber::new(16 << 20, metrics);
    sub.connect(&j.events).await.map_err(|e| e.to_string())?;
    sub.subscribe(&metrics_topic(j.id))
        .await
        .map_err(|e| e.to_string())?;
    let since = tokio::time::Instant::now() + LOAD_REPORT_EVERY;
    loop {
        let Delivery::Event(event) = sub.recv().await.map_err(|e| e.to_string())? else {
            continue;
        };
        let Ok(stats) = event.decode::<SchedulerStats>() else {
            continue;
        };
        if stats.num_running + stats.num_waiting == 0 && tokio::time::Instant::now() >= since {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_serving_line_names_the_worker_and_its_events() {
        let j = parse_serving_line(
            "turbine worker w42 serving on tcp://127.0.0.1:5000 (events tcp://127.0.0.1:5001), registered with tcp://127.0.0.1:7000",
        );
        assert_eq!(
            j,
            Some(Joined {
                id: WorkerId(42),
                events: "tcp://127.0.0.1:5001".into()
            })
        );
        assert_eq!(parse_serving_line("loading model"), None);
    }
}
