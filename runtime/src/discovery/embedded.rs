//! Embedded discovery: a registry service on one node, leases renewed by heartbeats.
//!
//! The registry is an ordinary [`Service`] ([`Registry`]) so it is reached through an
//! [`Addr`] like anything else: locally in the process that hosts it, over the request
//! plane from everywhere else. Its state lives in the pure [`RegistryTable`] (takes `now`,
//! returns decisions). A ticker casts `Expire` every `tick` on the node's clock.
//!
//! If the registry actor restarts it starts empty: heartbeats get `Unknown` and
//! re-register, and watch streams end so watchers re-watch.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{Discovery, DiscoveryError, DiscoveryEvent, Instance, Lease, WatchStream};
use crate::clock::SharedClock;
use crate::{Addr, Handler, HandlerError, Node, NodeError, RequestCtx, Service, StreamSink};

/// The registry's protocol.
pub struct Registry;

impl Service for Registry {
    type Req = RegistryReq;
    type Resp = RegistryResp;
}

/// Requests to the registry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum RegistryReq {
    /// Add or replace an instance with a lease.
    Register {
        /// The instance.
        instance: Instance,
        /// Lease length in milliseconds.
        lease_ms: u64,
    },
    /// Heartbeat: extend the lease.
    Renew {
        /// Component.
        component: String,
        /// Instance id.
        id: String,
    },
    /// Remove an instance now.
    Deregister {
        /// Component.
        component: String,
        /// Instance id.
        id: String,
    },
    /// Current instances of a component.
    List {
        /// Component.
        component: String,
    },
    /// Stream: snapshot then changes of a component.
    Watch {
        /// Component.
        component: String,
    },
    /// Remove expired instances (sent by the ticker).
    Expire,
}

/// Registry answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum RegistryResp {
    /// Done.
    Ok,
    /// No such instance (its lease expired, or the registry restarted): register again.
    Unknown,
    /// Answer to `List`.
    Instances(Vec<Instance>),
    /// A watch stream item.
    Event(DiscoveryEvent),
}

type Key = (String, String);

/// The registry's pure state: instances and their lease deadlines.
#[derive(Debug, Default)]
pub struct RegistryTable {
    entries: BTreeMap<Key, (Instance, Duration, Instant)>,
}

impl RegistryTable {
    /// Adds or replaces `instance`, expiring `lease` after `now`. Returns the event to
    /// announce (none when an identical instance just re-registered).
    pub fn register(
        &mut self,
        instance: Instance,
        lease: Duration,
        now: Instant,
    ) -> Option<DiscoveryEvent> {
        let key = (instance.component.clone(), instance.id.clone());
        let previous = self
            .entries
            .insert(key, (instance.clone(), lease, now + lease));
        match previous {
            Some((old, _, _)) if old == instance => None,
            _ => Some(DiscoveryEvent::Added(instance)),
        }
    }

    /// Extends a lease; false if the instance is unknown.
    pub fn renew(&mut self, component: &str, id: &str, now: Instant) -> bool {
        match self
            .entries
            .get_mut(&(component.to_string(), id.to_string()))
        {
            Some((_, lease, deadline)) => {
                *deadline = now + *lease;
                true
            }
            None => false,
        }
    }

    /// Removes an instance.
    pub fn deregister(&mut self, component: &str, id: &str) -> Option<DiscoveryEvent> {
        self.entries
            .remove(&(component.to_string(), id.to_string()))
            .map(|(i, _, _)| DiscoveryEvent::Removed(i))
    }

    /// Removes every instance whose deadline is at or before `now`, in key order.
    pub fn expire(&mut self, now: Instant) -> Vec<DiscoveryEvent> {
        let expired: Vec<Key> = self
            .entries
            .iter()
            .filter(|(_, (_, _, deadline))| *deadline <= now)
            .map(|(k, _)| k.clone())
            .collect();
        expired
            .into_iter()
            .filter_map(|k| self.entries.remove(&k))
            .map(|(i, _, _)| DiscoveryEvent::Removed(i))
            .collect()
    }

    /// Instances of `component`, sorted by id.
    pub fn list(&self, component: &str) -> Vec<Instance> {
        self.entries
            .range((component.to_string(), String::new())..)
            .take_while(|((c, _), _)| c == component)
            .map(|(_, (i, _, _))| i.clone())
            .collect()
    }
}

/// The registry actor's handler.
struct RegistryHandler {
    table: RegistryTable,
    clock: SharedClock,
    /// Watchers get changes through unbounded queues so a slow watcher never blocks the
    /// registry; each queue is drained into its (bounded) stream by its own task.
    watchers: Vec<(String, mpsc::UnboundedSender<DiscoveryEvent>)>,
}

impl RegistryHandler {
    fn announce(&mut self, event: DiscoveryEvent) {
        let component = match &event {
            DiscoveryEvent::Added(i) | DiscoveryEvent::Removed(i) => i.component.clone(),
        };
        self.watchers
            .retain(|(c, tx)| c != &component || tx.send(event.clone()).is_ok());
    }
}

#[async_trait]
impl Handler<Registry> for RegistryHandler {
    async fn call(
        &mut self,
        req: RegistryReq,
        _ctx: &RequestCtx,
    ) -> Result<RegistryResp, HandlerError> {
        let now = self.clock.now();
        Ok(match req {
            RegistryReq::Register { instance, lease_ms } => {
                if let Some(e) = self
                    .table
                    .register(instance, Duration::from_millis(lease_ms), now)
                {
                    self.announce(e);
                }
                RegistryResp::Ok
            }
            RegistryReq::Renew { component, id } => {
                if self.table.renew(&component, &id, now) {
                    RegistryResp::Ok
                } else {
                    RegistryResp::Unknown
                }
            }
            RegistryReq::Deregister { component, id } => {
                match self.table.deregister(&component, &id) {
                    Some(e) => {
                        self.announce(e);
                        RegistryResp::Ok
                    }
                    None => RegistryResp::Unknown,
                }
            }
            RegistryReq::List { component } => RegistryResp::Instances(self.table.list(&component)),
            RegistryReq::Expire => {
                for e in self.table.expire(now) {
                    self.announce(e);
                }
                RegistryResp::Ok
            }
            RegistryReq::Watch { .. } => {
                return Err(HandlerError::new("watch is a stream request"))
            }
        })
    }

    async fn stream(
        &mut self,
        req: RegistryReq,
        sink: StreamSink<RegistryResp>,
        _ctx: &RequestCtx,
    ) -> Result<(), HandlerError> {
        let RegistryReq::Watch { component } = req else {
            return Err(HandlerError::new("only watch streams"));
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        for instance in self.table.list(&component) {
            let _ = tx.send(DiscoveryEvent::Added(instance));
        }
        self.watchers.push((component, tx));
        tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                if sink.send(RegistryResp::Event(event)).await.is_err() {
                    return;
                }
            }
        });
        Ok(())
    }
}

/// A registry served on a node, with its expiry ticker (stops when this is dropped).
pub struct EmbeddedRegistry {
    addr: Addr<Registry>,
    _ticker: DropGuard,
}

impl EmbeddedRegistry {
    /// Serves the registry as service `name` on `node`, checking leases every `tick`.
    pub async fn serve(node: &Node, name: &str, tick: Duration) -> Result<Self, NodeError> {
        let clock = node.clock().clone();
        let make_clock = clock.clone();
        let handle = node
            .serve::<Registry, _, _>(name, move || RegistryHandler {
                table: RegistryTable::default(),
                clock: make_clock.clone(),
                watchers: Vec::new(),
            })
            .await?;
        let addr = handle.addr;
        let stop = CancellationToken::new();
        let ticker_addr = addr.clone();
        let ticker_stop = stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    biased;
                    _ = ticker_stop.cancelled() => return,
                    _ = clock.sleep(tick) => ticker_addr.cast(RegistryReq::Expire),
                }
            }
        });
        Ok(Self {
            addr,
            _ticker: stop.drop_guard(),
        })
    }

    /// A local address of the registry.
    pub fn addr(&self) -> &Addr<Registry> {
        &self.addr
    }
}

/// The [`Discovery`] client of an embedded registry (local or remote `Addr`).
#[derive(Clone)]
pub struct EmbeddedDiscovery {
    registry: Addr<Registry>,
    clock: SharedClock,
}

impl EmbeddedDiscovery {
    /// A client of the registry at `registry`; heartbeats use `clock`.
    pub fn new(registry: Addr<Registry>, clock: SharedClock) -> Self {
        Self { registry, clock }
    }
}

fn unexpected(resp: RegistryResp) -> DiscoveryError {
    DiscoveryError::Protocol(format!("unexpected registry answer {resp:?}"))
}

#[async_trait]
impl Discovery for EmbeddedDiscovery {
    async fn register(&self, instance: Instance, lease: Duration) -> Result<Lease, DiscoveryError> {
        let lease_ms = lease.as_millis().min(u64::MAX as u128) as u64;
        let register = RegistryReq::Register {
            instance: instance.clone(),
            lease_ms,
        };
        match self.registry.call(register.clone()).await? {
            RegistryResp::Ok => {}
            other => return Err(unexpected(other)),
        }
        let stop = CancellationToken::new();
        let (registry, clock, hb_stop) = (self.registry.clone(), self.clock.clone(), stop.clone());
        let renew = RegistryReq::Renew {
            component: instance.component.clone(),
            id: instance.id.clone(),
        };
        tokio::spawn(async move {
            let period = lease / 3;
            loop {
                tokio::select! {
                    biased;
                    _ = hb_stop.cancelled() => return,
                    _ = clock.sleep(period) => {}
                }
                match registry.call(renew.clone()).await {
                    Ok(RegistryResp::Unknown) => {
                        let _ = registry.call(register.clone()).await;
                    }
                    Ok(_) => {}
                    Err(e) => tracing::debug!(error = %e, "lease renewal failed"),
                }
            }
        });
        let registry = self.registry.clone();
        let revoke = Box::pin(async move {
            let _ = registry
                .call(RegistryReq::Deregister {
                    component: instance.component,
                    id: instance.id,
                })
                .await;
        });
        Ok(Lease::new(stop, revoke))
    }

    async fn list(&self, component: &str) -> Result<Vec<Instance>, DiscoveryError> {
        match self
            .registry
            .call(RegistryReq::List {
                component: component.to_string(),
            })
            .await?
        {
            RegistryResp::Instances(list) => Ok(list),
            other => Err(unexpected(other)),
        }
    }

    async fn watch(&self, component: &str) -> Result<WatchStream, DiscoveryError> {
        let stream = self
            .registry
            .stream(RegistryReq::Watch {
                component: component.to_string(),
            })
            .await?;
        Ok(stream
            .take_while(|item| futures::future::ready(item.is_ok()))
            .filter_map(|item| {
                futures::future::ready(match item {
                    Ok(RegistryResp::Event(e)) => Some(e),
                    _ => None,
                })
            })
            .boxed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(id: &str) -> Instance {
        Instance {
            component: "worker".into(),
            id: id.into(),
            endpoint: format!("tcp://h/{id}"),
            metadata: BTreeMap::new(),
        }
    }

    #[test]
    fn renewal_postpones_expiry_and_silence_expires() {
        let t0 = Instant::now();
        let lease = Duration::from_secs(1);
        let mut table = RegistryTable::default();
        assert!(table.register(inst("a"), lease, t0).is_some());
        assert!(table.register(inst("b"), lease, t0).is_some());
        assert!(
            table.register(inst("b"), lease, t0).is_none(),
            "same instance: no event"
        );
        assert!(table.renew("worker", "a", t0 + Duration::from_millis(900)));
        let gone = table.expire(t0 + lease);
        assert_eq!(gone, vec![DiscoveryEvent::Removed(inst("b"))]);
        assert_eq!(table.list("worker"), vec![inst("a")]);
        assert!(!table.renew("worker", "b", t0 + lease));
        assert_eq!(table.expire(t0 + Duration::from_millis(1900)).len(), 1);
        assert!(table.list("worker").is_empty());
    }
}
