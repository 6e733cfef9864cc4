//! Static discovery: the instances listed in the config file.

use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use serde::Deserialize;

use super::{Discovery, DiscoveryError, DiscoveryEvent, Instance, Lease, WatchStream};

/// A fixed membership list (`instances:` in the config).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StaticDiscovery {
    /// Every instance of every component.
    pub instances: Vec<Instance>,
}

impl StaticDiscovery {
    /// A backend over `instances`.
    pub fn new(instances: Vec<Instance>) -> Self {
        Self { instances }
    }

    fn of(&self, component: &str) -> Vec<Instance> {
        let mut found: Vec<Instance> = self
            .instances
            .iter()
            .filter(|i| i.component == component)
            .cloned()
            .collect();
        found.sort();
        found
    }
}

#[async_trait]
impl Discovery for StaticDiscovery {
    /// The list is fixed: registering changes nothing.
    async fn register(
        &self,
        instance: Instance,
        _lease: Duration,
    ) -> Result<Lease, DiscoveryError> {
        tracing::debug!(component = %instance.component, id = %instance.id, "static discovery ignores registration");
        Ok(Lease::noop())
    }

    async fn list(&self, component: &str) -> Result<Vec<Instance>, DiscoveryError> {
        Ok(self.of(component))
    }

    /// The configured instances, then nothing ever again.
    async fn watch(&self, component: &str) -> Result<WatchStream, DiscoveryError> {
        let snapshot = self.of(component).into_iter().map(DiscoveryEvent::Added);
        Ok(futures::stream::iter(snapshot)
            .chain(futures::stream::pending())
            .boxed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn static_list_from_yaml() {
        let yaml = "instances:\n  - {component: worker, id: b, endpoint: 'tcp://h:2'}\n  - {component: worker, id: a, endpoint: 'tcp://h:1'}\n  - {component: router, id: r, endpoint: 'tcp://h:3'}\n";
        let d: StaticDiscovery = crate::config::from_yaml_str(yaml).unwrap();
        let ids: Vec<String> = d
            .list("worker")
            .await
            .unwrap()
            .into_iter()
            .map(|i| i.id)
            .collect();
        assert_eq!(ids, ["a", "b"]);
        let mut w = d.watch("router").await.unwrap();
        assert!(matches!(w.next().await, Some(DiscoveryEvent::Added(i)) if i.id == "r"));
        assert!(futures::poll!(w.next()).is_pending());
    }
}
