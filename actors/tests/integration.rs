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

/// Each `tests/*.rs` file is declared above (with autotests off, cargo would not build it).
#[test]
fn every_test_file_is_a_module() {
    let here = concat!(env!("CARGO_MANIFEST_DIR"), "/tests");
    let listed = include_str!("integration.rs");
    let mut missing = Vec::new();
    for entry in std::fs::read_dir(here).expect("reading tests/") {
        let path = entry.expect("a tests/ entry").path();
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        if path.extension().is_some_and(|e| e == "rs")
            && stem != "integration"
            && !listed.contains(&format!("mod {stem};"))
        {
            missing.push(stem.to_string());
        }
    }
    assert!(
        missing.is_empty(),
        "tests/*.rs files not declared in tests/integration.rs: {missing:?}"
    );
}
