//! Shared by the library crates' `tests/integration.rs` (each includes it by `#[path]`):
//! with `autotests = false`, a `tests/*.rs` file the suite does not declare is never built.

/// Fails naming every `*.rs` file in `dir` (other than the suite itself) that `suite`, the
/// suite's source, does not declare as `mod NAME;`.
pub fn check_every_test_file_is_declared(dir: &str, suite: &str) {
    let mut missing = Vec::new();
    for entry in std::fs::read_dir(dir).expect("reading tests/") {
        let path = entry.expect("a tests/ entry").path();
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        if path.extension().is_some_and(|e| e == "rs")
            && stem != "integration"
            && !suite.contains(&format!("mod {stem};"))
        {
            missing.push(stem.to_string());
        }
    }
    assert!(
        missing.is_empty(),
        "tests/*.rs files not declared in tests/integration.rs: {missing:?}"
    );
}
