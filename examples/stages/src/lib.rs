//! Two custom stages written on turbine's stage API (`turbine_actors::stages`), registered
//! in the `turbine` binary, so `turbine up -f examples/stages.yaml` runs them:
//!
//! * [`key_guard`]: on the input. Only listed API keys get through; each key has its own
//!   rate limit (a token bucket) and its own cap on `max_tokens` (a rewrite).
//! * [`redact`]: on the output. Words from a list, and runs of digits, are replaced in the
//!   text the client receives, even when a word arrives split over several tokens.
//!
//! Each is a pure core (unit-tested here) behind a thin `Stage` impl. docs/STAGES.md walks
//! through them.

pub mod key_guard;
pub mod redact;

use turbine_actors::stages::StageRegistry;

/// Registers both stages under their names (`key_guard`, `redact`).
pub fn register(registry: &mut StageRegistry) {
    registry.register(key_guard::NAME, key_guard::build);
    registry.register(redact::NAME, redact::build);
}
