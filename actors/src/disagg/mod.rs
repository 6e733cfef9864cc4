//! Prefill/decode disaggregation: the pieces a prefill worker and a decode worker add to an
//! aggregated one.
//!
//! * [`policy`]: pure; remote or local prefill for one request (Dynamo's conditional rule).
//! * [`config`]: the cluster file's `disaggregation:` section.
//! * [`kv_transfer`]: a request's KV blocks out of one executor, over the runtime's transfer
//!   plane layer by layer, and into another executor's blocks.
//!
//! The scheduler's side (a prefill-only request that keeps its blocks; a decode admission
//! whose KV arrives from elsewhere) lives in `worker::scheduler`.

pub mod config;
pub mod flow;
pub mod kv_transfer;
pub mod metrics;
pub mod policy;
pub mod route;
pub mod wire;

pub use config::{DisaggPolicyKind, DisaggregationConfig, TransferSection};
pub use kv_transfer::{KvChunkLayout, KvTransferError};
pub use policy::{decide, Blocks, LocalReason, PrefillDecision, PrefillInputs, PrefillPoolLoad};
