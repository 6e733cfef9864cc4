//! turbine-actors: the components of the serving graph.
//!
//! Each component is a thin actor around pure logic. The pure logic (block hashing, the KV
//! index, routing policy, scheduling, KV block allocation) takes `now` and inputs and returns
//! decisions, so the simulator and the real actors run the same code.

pub mod cluster_config;
pub mod disagg;
pub mod encoder;
pub mod engine_profile;
pub mod epp;
pub mod executor;
pub mod fault;
pub mod frontend;
pub mod ids;
pub mod kubernetes;
pub mod kv;
pub mod node;
pub mod planner;
pub mod preprocessor;
pub mod protocol;
pub mod router;
pub mod stages;
pub mod worker;
