//! Every integration test of this crate, as modules of one test binary: one link instead
//! of one per file, and tests of different files run side by side. Run one file's tests
//! with a filter: `cargo test -p turbine-kernels --test integration FILE::`. A file in tests/ that is
//! not listed here would never run; `every_test_file_is_a_module` below fails then.

#[cfg(feature = "cuda")]
mod cuda_kernels;
#[cfg(feature = "cuda")]
mod cuda_kv_transfer;
#[cfg(feature = "cuda")]
mod cuda_vision;
mod forward_reference;
mod gguf_corrupt;
mod grammar;
mod greedy_matches_llamacpp;
mod loader_gguf;
mod loader_gguf_synthetic;
mod loader_hf;
mod support;
mod tokenizer_gguf;
mod tokenizer_matches_llamacpp;
mod tokenizer_spm;
mod vision_idefics3;

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
