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

// ------------------------------------------------------------------------------------------
// The driver against turbine's own HTTP frontend, with a deterministic echo engine in place
// of the model: checks that the frontend speaks what the official client expects.

mod against_turbine_frontend {
    use super::*;
    use async_trait::async_trait;
    use futures::StreamExt;
    use std::sync::Arc;
    use std::time::Duration;
    use turbine_actors::frontend::{
        router, serve, ChatEngine, Delta, DeltaStream, EngineError, GenerateRequest, HttpConfig,
        Metrics, Prompt, Usage,
    };
    use turbine_actors::protocol::FinishReason;

    /// Answers with the prompt's words in order, one token each; stops after as many tokens
    /// as the prompt has words (or cycles on with `ignore_eos`) or at `max_tokens`.
    struct EchoEngine;

    #[async_trait]
    impl ChatEngine for EchoEngine {
        fn model_id(&self) -> &str {
            "echo"
        }

        fn context_length(&self) -> usize {
            4096
        }

        async fn generate(&self, req: GenerateRequest) -> Result<DeltaStream, EngineError> {
            let text = match &req.prompt {
                Prompt::Text(text) => text.clone(),
                Prompt::Chat(messages) => messages
                    .iter()
                    .map(|m| m.content.as_str())
                    .collect::<Vec<_>>()
                    .join("\n"),
                Prompt::Tokens(ids) => ids.iter().map(|id| format!("t{id} ")).collect(),
            };
            let words: Vec<String> = text.split_whitespace().map(str::to_string).collect();
            let words = if words.is_empty() {
                vec!["empty".to_string()]
            } else {
                words
            };
            let prompt_tokens = words.len() as u32;
            let max = req.max_tokens.unwrap_or(16);
            let count = if req.ignore_eos {
                max
            } else {
                prompt_tokens.min(max)
            };
            let finish = if count == max {
                FinishReason::Length
            } else {
                FinishReason::Stop
            };
            let deltas: Vec<Result<Delta, EngineError>> = (0..count)
                .map(|i| {
                    let word = &words[i as usize % words.len()];
                    let last = i + 1 == count;
                    Ok(Delta {
                        text: if i == 0 {
                            word.clone()
                        } else {
                            format!(" {word}")
                        },
                        token_ids: vec![i],
                        finish: last.then(|| finish.clone()),
                        usage: (i == 0 || last).then_some(Usage {
                            prompt_tokens,
                            completion_tokens: i + 1,
                            cached_tokens: 0,
                        }),
                        ..Delta::default()
                    })
                })
                .collect();
            let paced = futures::stream::iter(deltas).then(|delta| async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                delta
            });
            Ok(paced.boxed())
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn openai_driver_passes_against_turbines_frontend() {
        let Some(python) = test_python() else {
            eprintln!("skipped: no test venv; run scripts/setup-test-deps.sh (or scripts/test.sh)");
            return;
        };
        let app = router(Arc::new(EchoEngine), Metrics::new(), HttpConfig::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, app, std::future::pending()));

        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/openai_e2e.py");
        let output = tokio::task::spawn_blocking(move || {
            Command::new(&python)
                .arg(&script)
                .arg(format!("http://{addr}"))
                .args(["--concurrency", "16", "--timeout", "60"])
                .output()
        })
        .await
        .unwrap()
        .expect("running the e2e driver");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(output.status.success(), "e2e driver failed:\n{text}");
        assert!(text.contains("e2e: 9 passed, 0 failed"), "{text}");
    }
}
