//! A small reusable one-child supervisor on ractor.
//!
//! The supervisor starts a child from a [`ChildFactory`]; when the child fails (panics, or
//! its handler returns `Err`), it is restarted unless it already failed `max_restarts`
//! times within `window`, in which case the supervisor itself fails, escalating the
//! failure (with the child's reason) to its own parent. Every failure, restart and
//! escalation is broadcast as a [`SupervisorEvent`] so owners learn why.

use std::collections::VecDeque;
use std::time::Duration;

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SpawnErr, SupervisionEvent};
use serde::Deserialize;
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::clock::SharedClock;

/// How many restarts are tolerated in a sliding window before escalating.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct RestartPolicy {
    /// Restarts allowed within `window`; one more failure escalates.
    pub max_restarts: u32,
    /// Sliding window over which restarts are counted.
    #[serde(with = "duration_ms", rename = "window_ms")]
    pub window: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            max_restarts: 5,
            window: Duration::from_secs(10),
        }
    }
}

pub(crate) mod duration_ms {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// What happened to a supervised child.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SupervisorEvent {
    /// The child failed; `reason` is its panic or error message.
    ChildFailed {
        /// Supervisor label.
        child: String,
        /// Panic or error message.
        reason: String,
    },
    /// The child was restarted (`restarts` within the current window, this one included).
    ChildRestarted {
        /// Supervisor label.
        child: String,
        /// Restarts in the window.
        restarts: u32,
    },
    /// Restart budget exhausted: the supervisor fails and escalates to its parent.
    Escalated {
        /// Supervisor label.
        child: String,
        /// The last failure's reason.
        reason: String,
    },
}

/// Builds (and rebuilds) the supervised child.
pub trait ChildFactory: Send + Sync + 'static {
    /// The child actor type.
    type Child: Actor;
    /// A fresh child and its start arguments.
    fn make(&self) -> (Self::Child, <Self::Child as Actor>::Arguments);
    /// Called with every (re)started child, e.g. to publish its reference.
    fn started(&self, _child: &ActorRef<<Self::Child as Actor>::Msg>) {}
    /// Called when the child failed and is not running (before any restart).
    fn stopped(&self, _reason: &str) {}
    /// Called when the restart budget is exhausted and the child stays down.
    fn gave_up(&self, _reason: &str) {}
}

/// Messages to a supervisor (it has none of its own beyond supervision events).
#[derive(Debug)]
pub enum SupervisorMsg {}

struct SupervisorActor<F: ChildFactory> {
    _f: std::marker::PhantomData<F>,
}

/// Start arguments / state of a supervisor.
struct SupervisorState<F: ChildFactory> {
    label: String,
    factory: F,
    policy: RestartPolicy,
    clock: SharedClock,
    events: broadcast::Sender<SupervisorEvent>,
    restarts: VecDeque<Instant>,
}

impl<F: ChildFactory> SupervisorState<F> {
    async fn start_child(&self, myself: ActorCell) -> Result<(), SpawnErr> {
        let (child, args) = self.factory.make();
        let (child_ref, _join) = Actor::spawn_linked(None, child, args, myself).await?;
        self.factory.started(&child_ref);
        Ok(())
    }
}

impl<F: ChildFactory> Actor for SupervisorActor<F> {
    type Msg = SupervisorMsg;
    type State = SupervisorState<F>;
    type Arguments = SupervisorState<F>;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        state.start_child(myself.get_cell()).await?;
        Ok(state)
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorFailed(_, err) => {
                let reason = err.to_string();
                tracing::warn!(child = %state.label, %reason, "supervised child failed");
                state.factory.stopped(&reason);
                let _ = state.events.send(SupervisorEvent::ChildFailed {
                    child: state.label.clone(),
                    reason: reason.clone(),
                });
                let now = state.clock.now();
                while let Some(first) = state.restarts.front() {
                    if now.saturating_duration_since(*first) > state.policy.window {
                        state.restarts.pop_front();
                    } else {
                        break;
                    }
                }
                if state.restarts.len() >= state.policy.max_restarts as usize {
                    state.factory.gave_up(&reason);
                    let _ = state.events.send(SupervisorEvent::Escalated {
                        child: state.label.clone(),
                        reason: reason.clone(),
                    });
                    return Err(format!("child `{}` escalated: {reason}", state.label).into());
                }
                state.restarts.push_back(now);
                state.start_child(myself.get_cell()).await?;
                let _ = state.events.send(SupervisorEvent::ChildRestarted {
                    child: state.label.clone(),
                    restarts: state.restarts.len() as u32,
                });
            }
            SupervisionEvent::ActorTerminated(_, _, reason) => {
                // A deliberate stop is not a failure: the supervisor stops with its child.
                state
                    .factory
                    .gave_up(reason.as_deref().unwrap_or("stopped"));
                myself.stop(reason);
            }
            _ => {}
        }
        Ok(())
    }
}

/// A running supervisor.
pub struct SupervisorHandle {
    actor: ActorRef<SupervisorMsg>,
    events: broadcast::Sender<SupervisorEvent>,
}

impl SupervisorHandle {
    /// Subscribes to this supervisor's events (failures with reasons, restarts, escalation).
    pub fn subscribe(&self) -> broadcast::Receiver<SupervisorEvent> {
        self.events.subscribe()
    }

    /// The supervisor's actor cell, to link further actors under it.
    pub fn cell(&self) -> ActorCell {
        self.actor.get_cell()
    }

    /// Stops the supervisor and its child.
    pub fn stop(&self) {
        self.actor.stop(None);
    }
}

/// Starts a supervisor (linked under `parent` if given, so escalation reaches it) that
/// starts and restarts one child built by `factory`.
pub async fn spawn_supervisor<F: ChildFactory>(
    label: impl Into<String>,
    factory: F,
    policy: RestartPolicy,
    clock: SharedClock,
    parent: Option<ActorCell>,
) -> Result<SupervisorHandle, SpawnErr> {
    let (events, _) = broadcast::channel(64);
    let state = SupervisorState {
        label: label.into(),
        factory,
        policy,
        clock,
        events: events.clone(),
        restarts: VecDeque::new(),
    };
    let actor = SupervisorActor::<F> {
        _f: std::marker::PhantomData,
    };
    let (actor, _join) = match parent {
        Some(parent) => Actor::spawn_linked(None, actor, state, parent).await?,
        None => Actor::spawn(None, actor, state).await?,
    };
    Ok(SupervisorHandle { actor, events })
}
