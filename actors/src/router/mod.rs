//! Routing: pick the worker for a request from KV overlap and decode load.
//!
//! Pure logic only: every call takes `now` and returns a decision; randomness comes from a
//! seeded generator. The router actor shell feeds it worker loads and KV events and
//! publishes the [`RouterEvent`]s it returns, so several router replicas keep the same view.

pub mod config;
pub mod events;
pub mod kv_router;
pub mod policy;

pub use config::{PolicyKind, RouterConfig, RouterConfigError, RouterIndexMode};
pub use events::{RouterEvent, RouterEventKind, RouterReplicaId};
pub use kv_router::{IndexSource, KvRouter, Routed, RouterMetrics};
pub use policy::{
    KvPolicy, Policy, RandomPolicy, RoundRobinPolicy, RouteDecision, RouteError, RouteRequest,
    RoutingPolicy, WorkerLoad,
};
