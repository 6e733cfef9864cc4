//! Every integration test of this crate, as modules of one test binary: one link instead
//! of one per file, and tests of different files run side by side. Run one file's tests
//! with a filter: `cargo test -p turbine-actors --test integration FILE::`. A file in tests/ that is
//! not listed here would never run; `every_test_file_is_a_module` below fails then.

mod worker_support;

mod block_manager_cache;
mod disagg_first_token;
mod disagg_flow;
mod dispatch_quarantine;
mod frontend_http;
mod frontend_stop;
mod fuzz_http;
mod kv_approx;
mod kv_indexer;
mod kv_transfer;
mod kv_vllm;
mod planner_kubernetes;
mod router_policy;
mod router_replicas;
mod scheduler_behaviour;
mod scheduler_disagg;
mod scheduler_proptest;
mod worker_images;
mod worker_kv_hold;

#[path = "../../tests/layout/declared.rs"]
mod layout;

/// Each `tests/*.rs` file is declared above (with autotests off, cargo would not build it).
#[test]
fn every_test_file_is_a_module() {
    layout::check_every_test_file_is_declared(
        concat!(env!("CARGO_MANIFEST_DIR"), "/tests"),
        include_str!("integration.rs"),
    );
}
