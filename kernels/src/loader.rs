//! Model loading: a GGUF file or an HF directory becomes a [`LoadedModel`].

use std::path::PathBuf;

/// File name of turbine's default model.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Where `scripts/fetch-model.sh` puts the default model: `$TURBINE_MODEL_DIR/<file>`, else
/// `$XDG_CACHE_HOME/turbine/models/<file>`, else `~/.cache/turbine/models/<file>`.
pub fn default_model_path() -> PathBuf {
    let dir = if let Some(d) = std::env::var_os("TURBINE_MODEL_DIR").filter(|d| !d.is_empty()) {
        PathBuf::from(d)
    } else {
        let cache = std::env::var_os("XDG_CACHE_HOME")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .unwrap_or_else(|| PathBuf::from(".cache"));
        cache.join("turbine").join("models")
    };
    dir.join(DEFAULT_MODEL_FILE)
}
