//! Every integration test of this crate, as modules of one test binary: one link instead
//! of one per file, and tests of different files run side by side. Run one file's tests
//! with a filter: `cargo test -p turbine-runtime --test integration FILE::`. A file in tests/ that is
//! not listed here would never run; `every_test_file_is_a_module` below fails then.

mod common;

mod discovery;
mod event_plane;
mod fuzz_frames;
mod garbage_frames;
mod kubernetes_discovery;
mod link;
mod request_plane;
mod supervision;
mod transfer;

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
