//! Every integration test of this crate, as modules of one test binary: one link instead
//! of one per file, and tests of different files run side by side. Run one file's tests
//! with a filter: `cargo test -p turbine-sim --test integration FILE::`. A file in tests/ that is
//! not listed here would never run; `every_test_file_is_a_module` below fails then.

mod common;

mod campaign;
mod planner;
mod scenarios;
mod shells;

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
