//! Checks the official-client end-to-end driver (tests/e2e/openai_e2e.py) itself: it must
//! pass against the stand-in server (tests/e2e/fake_server.py) and catch each fault the
//! stand-in can inject (tests/e2e/selftest.py). The driver's run against `turbine up` is a
//! separate test.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The Python with `openai` installed: $TURBINE_TEST_PYTHON (set by scripts/test.sh), else
/// the venv scripts/setup-test-deps.sh creates. `None` when neither exists.
fn test_python() -> Option<PathBuf> {
    if let Some(explicit) = std::env::var_os("TURBINE_TEST_PYTHON") {
        return Some(PathBuf::from(explicit));
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache")))?;
    let venv_python = cache.join("turbine/test-venv/bin/python");
    venv_python.exists().then_some(venv_python)
}

#[test]
fn openai_driver_passes_a_good_server_and_catches_broken_ones() {
    let Some(python) = test_python() else {
        eprintln!("skipped: no test venv; run scripts/setup-test-deps.sh (or scripts/test.sh)");
        return;
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/selftest.py");
    let output = Command::new(&python)
        .arg(&script)
        .output()
        .unwrap_or_else(|e| panic!("running {} {}: {e}", python.display(), script.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "driver self-test failed:\n{text}");
    assert!(text.contains(" 0 failed"), "{text}");
}
