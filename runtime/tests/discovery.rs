//! Embedded discovery across two nodes, on a manual clock.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use turbine_runtime::discovery::embedded::Registry;
use turbine_runtime::discovery::{
    Discovery, DiscoveryEvent, EmbeddedDiscovery, EmbeddedRegistry, Instance,
};
use turbine_runtime::{ManualClock, MetricsRegistry, Node, NodeConfig};

fn instance(id: &str) -> Instance {
    Instance {
        component: "worker".into(),
        id: id.into(),
        endpoint: format!("tcp://127.0.0.1:1/{id}"),
        metadata: BTreeMap::new(),
    }
}

/// Advances the manual clock in small steps, letting the runtime's tasks react between
/// steps (heartbeats, ticks and their messages run on real tasks).
async fn advance(clock: &ManualClock, total: Duration, step: Duration) {
    let mut moved = Duration::ZERO;
    while moved < total {
        clock.advance(step);
        moved += step;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_expiry_removes_instance_from_watcher_within_two_lease_periods() {
    let clock = ManualClock::new();
    let start = |name: &str| {
        let config = NodeConfig {
            name: name.to_string(),
            ..NodeConfig::default()
        };
        Node::start_with(config, clock.shared(), MetricsRegistry::new())
    };
    let host = start("host").await.unwrap();
    let member = start("member").await.unwrap();
    let lease = Duration::from_secs(1);
    let _registry = EmbeddedRegistry::serve(&host, "registry", lease / 4)
        .await
        .unwrap();
    let remote = member
        .connect::<Registry>(host.endpoint(), "registry")
        .await
        .unwrap();
    let discovery = EmbeddedDiscovery::new(remote, clock.shared());

    let mut watch = discovery.watch("worker").await.unwrap();
    let kept = discovery.register(instance("kept"), lease).await.unwrap();
    let crashed = discovery
        .register(instance("crashed"), lease)
        .await
        .unwrap();
    let mut added = vec![watch.next().await.unwrap(), watch.next().await.unwrap()];
    added.sort_by_key(|e| format!("{e:?}"));
    assert_eq!(
        added,
        vec![
            DiscoveryEvent::Added(instance("crashed")),
            DiscoveryEvent::Added(instance("kept")),
        ]
    );

    // "crashed" stops heartbeating; "kept" goes on. Two lease periods of virtual time.
    drop(crashed);
    advance(&clock, 2 * lease, Duration::from_millis(50)).await;
    let removed = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("removal announced by the time two lease periods passed")
        .unwrap();
    assert_eq!(removed, DiscoveryEvent::Removed(instance("crashed")));
    assert_eq!(
        discovery.list("worker").await.unwrap(),
        vec![instance("kept")]
    );

    // Revoking removes at once.
    kept.revoke().await;
    assert_eq!(
        watch.next().await.unwrap(),
        DiscoveryEvent::Removed(instance("kept"))
    );
    assert!(discovery.list("worker").await.unwrap().is_empty());
}
