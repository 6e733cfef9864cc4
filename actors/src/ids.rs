//! Identifiers shared by every component. Newtypes so a worker id can never be passed where a
//! request id is expected.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A token id in the model's vocabulary.
pub type TokenId = u32;

/// A worker instance (one prefill/decode/aggregated engine). Stable for the life of the
/// instance; a restarted worker gets a fresh id so stale KV state is never attributed to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct WorkerId(pub u64);

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "w{}", self.0)
    }
}

/// A request, unique within a cluster for its lifetime.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RequestId(pub u64);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "r{}", self.0)
    }
}
