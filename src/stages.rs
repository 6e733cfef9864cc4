//! The stages this `turbine` binary can run, by the names the cluster file's `stages:`
//! uses. To add your own: write it against `turbine_actors::stages::Stage` (see
//! docs/STAGES.md and `examples/stages/`) and register it here.

use turbine_actors::stages::StageRegistry;

/// Every stage built into this binary: `key_guard` and `redact` (examples/stages/).
pub fn registry() -> StageRegistry {
    let mut registry = StageRegistry::new();
    turbine_example_stages::register(&mut registry);
    registry
}
