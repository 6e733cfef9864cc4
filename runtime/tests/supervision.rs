//! Restart budget and escalation of the reusable supervisor.

use crate::common;

use std::time::Duration;

use common::{Probe, Req, Resp};
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::sync::mpsc;
use turbine_runtime::supervisor::{spawn_supervisor, ChildFactory};
use turbine_runtime::{CallError, Node, RestartPolicy, SupervisorEvent, TokioClock};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_exceeding_its_restart_budget_stays_down_with_a_typed_error() {
    let node = Node::start(common::config("solo")).await.unwrap();
    let (shared, _c) = common::shared();
    let policy = RestartPolicy {
        max_restarts: 1,
        window: Duration::from_secs(60),
    };
    let mut handle = node
        .serve_with_policy::<Probe, _, _>("probe", policy, move || {
            common::ProbeHandler::new(shared.clone())
        })
        .await
        .unwrap();
    let addr = handle.addr.clone();
    assert!(addr.call(Req::Panic).await.is_err());
    assert_eq!(
        addr.call(Req::Echo("1".into())).await.unwrap(),
        Resp::Text("1".into())
    );
    assert!(addr.call(Req::Panic).await.is_err());

    let mut seen = Vec::new();
    loop {
        let event = handle.events.recv().await.unwrap();
        let done = matches!(event, SupervisorEvent::Escalated { .. });
        seen.push(event);
        if done {
            break;
        }
    }
    assert!(matches!(seen[0], SupervisorEvent::ChildFailed { .. }));
    assert!(matches!(
        seen[1],
        SupervisorEvent::ChildRestarted { restarts: 1, .. }
    ));
    assert!(
        matches!(&seen[3], SupervisorEvent::Escalated { reason, .. } if reason.contains("boom on purpose")),
        "{seen:?}"
    );
    let err = addr.call(Req::Echo("2".into())).await.unwrap_err();
    assert!(matches!(err, CallError::ActorFailed(_)), "{err:?}");
}

/// A child that fails on every message.
struct Fragile;
impl Actor for Fragile {
    type Msg = ();
    type State = ();
    type Arguments = ();
    async fn pre_start(&self, _: ActorRef<()>, _: ()) -> Result<(), ActorProcessingErr> {
        Ok(())
    }
    async fn handle(&self, _: ActorRef<()>, _: (), _: &mut ()) -> Result<(), ActorProcessingErr> {
        Err("fragile child broke".into())
    }
}

struct FragileFactory(mpsc::UnboundedSender<ActorRef<()>>);
impl ChildFactory for FragileFactory {
    type Child = Fragile;
    fn make(&self) -> (Fragile, ()) {
        (Fragile, ())
    }
    fn started(&self, child: &ActorRef<()>) {
        let _ = self.0.send(child.clone());
    }
}

/// A parent that reports the failures of its children.
struct Parent(mpsc::UnboundedSender<String>);
impl Actor for Parent {
    type Msg = ();
    type State = ();
    type Arguments = ();
    async fn pre_start(&self, _: ActorRef<()>, _: ()) -> Result<(), ActorProcessingErr> {
        Ok(())
    }
    async fn handle_supervisor_evt(
        &self,
        _: ActorRef<()>,
        event: SupervisionEvent,
        _: &mut (),
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorFailed(_, reason) = event {
            let _ = self.0.send(reason.to_string());
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erroring_ractor_child_is_restarted_then_escalates_to_parent() {
    let (to_test, mut parent_saw) = mpsc::unbounded_channel();
    let (parent, _join) = Actor::spawn(None, Parent(to_test), ()).await.unwrap();
    let (children_tx, mut children) = mpsc::unbounded_channel();
    let policy = RestartPolicy {
        max_restarts: 2,
        window: Duration::from_secs(60),
    };
    let sup = spawn_supervisor(
        "fragile",
        FragileFactory(children_tx),
        policy,
        TokioClock::shared(),
        Some(parent.get_cell()),
    )
    .await
    .unwrap();
    let mut events = sup.subscribe();
    // Initial child + 2 restarts; the third failure escalates.
    for _ in 0..3 {
        let child = children.recv().await.unwrap();
        child.cast(()).unwrap();
    }
    let escalation = parent_saw.recv().await.unwrap();
    assert!(escalation.contains("fragile child broke"), "{escalation}");
    let mut restarts = 0;
    while let Ok(event) = events.try_recv() {
        if let SupervisorEvent::ChildRestarted { .. } = event {
            restarts += 1;
        }
    }
    assert_eq!(restarts, 2);
}
