//! Stages by name: what the cluster file's `stages:` entries refer to.
//!
//! The binary that runs the frontend (and any `turbine worker --role stage`) fills one
//! registry with the stages it was built with; a name in the file that the registry does
//! not know is a start-up error naming it and listing those it has.

use super::api::Stage;
use crate::cluster_config::StageSpec;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Builds a stage from its `config:` block (`serde_yaml::Value::Null` when absent). An
/// `Err` is a configuration mistake, reported at start-up with the stage's place in the file.
pub type StageFactory =
    Arc<dyn Fn(&serde_yaml::Value) -> Result<Box<dyn Stage>, String> + Send + Sync>;

/// The stages a binary can run, by name.
#[derive(Clone, Default)]
pub struct StageRegistry {
    factories: BTreeMap<String, StageFactory>,
}

impl StageRegistry {
    /// An empty registry.
    pub fn new() -> StageRegistry {
        StageRegistry::default()
    }

    /// Registers `factory` under `name` (a later registration of the same name replaces
    /// the earlier one).
    pub fn register<F>(&mut self, name: &str, factory: F) -> &mut Self
    where
        F: Fn(&serde_yaml::Value) -> Result<Box<dyn Stage>, String> + Send + Sync + 'static,
    {
        self.factories.insert(name.to_string(), Arc::new(factory));
        self
    }

    /// The registered names, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.factories.keys().map(String::as_str).collect()
    }

    /// The factory of the stage `spec` names, or an error naming it (with its index in
    /// the file's `stages:` list).
    pub fn factory(&self, index: usize, spec: &StageSpec) -> Result<StageFactory, String> {
        self.factories.get(&spec.name).cloned().ok_or_else(|| {
            let known = self.names();
            let known = if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            };
            format!(
                "stages[{index}]: unknown stage `{}` (this turbine has: {known})",
                spec.name
            )
        })
    }

    /// Builds the stage `spec` names once, to check its config at start-up.
    pub fn build(&self, index: usize, spec: &StageSpec) -> Result<Box<dyn Stage>, String> {
        let factory = self.factory(index, spec)?;
        factory(&spec.config).map_err(|e| format!("stages[{index}] (`{}`).config: {e}", spec.name))
    }
}

impl std::fmt::Debug for StageRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.factories.keys()).finish()
    }
}
