//! Routing: pick the worker for a request from KV overlap and decode load.
//!
//! Pure logic only: every call takes `now` and returns a decision; randomness comes from a
//! seeded generator. The router actor shell feeds it worker loads and KV events and
//! publishes the [`RouterEvent`]s it returns, so several router replicas keep the same view.
//!
//! Hash domains: requests are hashed with turbine's [`crate::kv::hash::hash_blocks`]. That
//! matches turbine workers' KV events directly. vLLM workers publish vLLM's own block hashes,
//! which the router cannot recompute from tokens: feed their events through
//! [`crate::kv::vllm::VllmHashTranslator`] (re-hashes each stored block into turbine's domain
//! from its token ids and its parent chain) before the indexer; blocks whose parent chain is
//! unknown are skipped until a resync. See `kv::vllm` for the limits (block size must match,
//! multimodal/cache-salt extra keys are not reproduced).

pub mod config;
pub mod dispatch;
pub mod endpoints;
pub mod events;
pub mod hints;
pub mod kv_router;
pub mod membership;
pub mod migrating;
pub mod migration;
pub mod policy;
pub mod prometheus;
pub mod replica_sync;
pub mod service;

pub use config::{PolicyKind, RouterConfig, RouterConfigError, RouterIndexMode};
pub use events::{RouterEvent, RouterEventKind, RouterReplicaId};
pub use kv_router::{
    IndexSource, KvRouter, Routed, RouterMetrics, WorkerRouteCounts, UNREACHABLE_QUARANTINE,
};
pub use migration::MigrationConfig;
pub use policy::{
    KvPolicy, OverrideError, Policy, RandomPolicy, RoundRobinPolicy, RouteDecision, RouteError,
    RouteOverrides, RouteRequest, RoutingPolicy, WorkerLoad,
};
