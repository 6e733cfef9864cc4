//! Where a gateway sends each worker's requests: the `ip:port` the endpoint picker answers
//! with (`x-gateway-destination-endpoint`). A worker names its own in its registration
//! ([`META_GATEWAY_ENDPOINT`]: a frontend in its pod); a worker that names none is reached
//! through the picker's default (the frontend Service), and then only the routing hint
//! headers say which worker to use. Membership ([`super::membership`]) keeps the table in
//! step with discovery.

use crate::ids::WorkerId;
use std::collections::BTreeMap;
use std::sync::RwLock;

/// Discovery metadata key: the `ip:port` a gateway sends this worker's requests to.
pub const META_GATEWAY_ENDPOINT: &str = "gateway_endpoint";

/// The gateway endpoint of every joined worker.
#[derive(Debug, Default)]
pub struct WorkerEndpoints {
    default: Option<String>,
    own: RwLock<BTreeMap<WorkerId, Option<String>>>,
}

impl WorkerEndpoints {
    /// A table whose workers without an endpoint of their own are reached at `default`.
    pub fn new(default: Option<String>) -> WorkerEndpoints {
        WorkerEndpoints {
            default,
            own: RwLock::new(BTreeMap::new()),
        }
    }

    pub fn insert(&self, worker: WorkerId, own: Option<String>) {
        self.own
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(worker, own);
    }

    pub fn remove(&self, worker: WorkerId) {
        self.own
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&worker);
    }

    /// Where `worker`'s requests go; `None` for an unknown worker, or one with no endpoint
    /// of its own when there is no default.
    pub fn endpoint(&self, worker: WorkerId) -> Option<String> {
        let own = self.own.read().unwrap_or_else(|e| e.into_inner());
        own.get(&worker)?.clone().or_else(|| self.default.clone())
    }

    /// The joined workers, in id order.
    pub fn workers(&self) -> Vec<WorkerId> {
        self.own
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_endpoint_first_then_the_default() {
        let t = WorkerEndpoints::new(Some("fe:8000".into()));
        t.insert(WorkerId(1), Some("a:8000".into()));
        t.insert(WorkerId(2), None);
        assert_eq!(t.endpoint(WorkerId(1)).as_deref(), Some("a:8000"));
        assert_eq!(t.endpoint(WorkerId(2)).as_deref(), Some("fe:8000"));
        assert_eq!(t.endpoint(WorkerId(3)), None);
        t.remove(WorkerId(1));
        assert_eq!(t.workers(), [WorkerId(2)]);
        let none = WorkerEndpoints::new(None);
        none.insert(WorkerId(2), None);
        assert_eq!(none.endpoint(WorkerId(2)), None);
    }
}
