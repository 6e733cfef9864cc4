//! The cluster file's `disaggregation:` section (docs/CONFIG.md, "disaggregation").

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use turbine_runtime::transfer::TransferConfig;

/// When a prefill goes to the prefill pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DisaggPolicyKind {
    /// Decode workers always prefill locally.
    Never,
    /// Remote when the uncached prompt is long and the prefill pool is not queueing
    /// (see [`super::policy::decide`]).
    Conditional,
    /// Remote whenever a prefill worker is alive.
    Always,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DisaggregationConfig {
    pub policy: DisaggPolicyKind,
    /// Uncached prompt tokens (not on the chosen decode worker) from which a prefill goes
    /// remote.
    pub remote_prefill_min_tokens: u32,
    /// A prefill goes remote only while fewer requests than this wait in the prefill pool.
    pub max_prefill_queue: u32,
    /// A remote prefill that has not answered with a descriptor within this time is
    /// abandoned and the decode worker prefills locally (ms).
    pub remote_prefill_timeout_ms: u64,
    pub transfer: TransferSection,
}

impl Default for DisaggregationConfig {
    fn default() -> Self {
        DisaggregationConfig {
            policy: DisaggPolicyKind::Conditional,
            remote_prefill_min_tokens: 512,
            max_prefill_queue: 8,
            remote_prefill_timeout_ms: 30_000,
            transfer: TransferSection::default(),
        }
    }
}

/// Transfer-plane settings of the workers (see `turbine_runtime::transfer::TransferConfig`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransferSection {
    /// Where each worker process's transfer ROUTER binds (port 0 = any free port).
    pub bind: SocketAddr,
    /// How long a prefill worker keeps exported KV pinned for a decode worker that has not
    /// pulled it (ms); then the blocks are freed.
    pub descriptor_expiry_ms: u64,
    /// Longest wait for one step of a pull: connecting, the next piece, the next credit (ms).
    pub pull_timeout_ms: u64,
    /// Largest piece sent in one frame; a layer larger than this goes in several (bytes).
    pub max_piece_bytes: usize,
    /// Pieces in flight ahead of the importing decode worker.
    pub window: usize,
    /// The most bytes per second a worker process's transfer plane sends, over all pulls
    /// (0: no cap). Workers in one process move KV in memory, uncapped.
    pub max_bytes_per_s: u64,
}

impl Default for TransferSection {
    fn default() -> Self {
        let d = TransferConfig::default();
        TransferSection {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            descriptor_expiry_ms: d.expiry_ms,
            pull_timeout_ms: d.pull_timeout_ms,
            max_piece_bytes: d.max_piece_bytes,
            window: d.window,
            max_bytes_per_s: d.max_bytes_per_s,
        }
    }
}

impl TransferSection {
    /// The runtime's transfer-plane settings for these.
    pub fn to_runtime(&self) -> TransferConfig {
        let d = TransferConfig::default();
        TransferConfig {
            bind: format!("tcp://{}", self.bind),
            expiry_ms: self.descriptor_expiry_ms,
            pull_timeout_ms: self.pull_timeout_ms,
            max_piece_bytes: self.max_piece_bytes.max(1),
            max_frame_bytes: d.max_frame_bytes.max(self.max_piece_bytes),
            window: self.window.max(1),
            max_bytes_per_s: self.max_bytes_per_s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_dynamo_and_the_runtime() {
        let c: DisaggregationConfig = serde_yaml::from_str("{}").unwrap();
        assert_eq!(c, DisaggregationConfig::default());
        assert_eq!(c.remote_prefill_min_tokens, 512);
        let t = c.transfer.to_runtime();
        assert_eq!(t.expiry_ms, TransferConfig::default().expiry_ms);
        assert!(t.bind.starts_with("tcp://127.0.0.1:"));
    }

    #[test]
    fn fields_parse_and_typos_are_refused() {
        let c: DisaggregationConfig = serde_yaml::from_str(
            "policy: always\nremote_prefill_min_tokens: 64\ntransfer: {descriptor_expiry_ms: 500, window: 4}",
        )
        .unwrap();
        assert_eq!(c.policy, DisaggPolicyKind::Always);
        assert_eq!(c.transfer.to_runtime().expiry_ms, 500);
        let err = serde_yaml::from_str::<DisaggregationConfig>("threshold: 3").unwrap_err();
        assert!(err.to_string().contains("threshold"), "{err}");
    }
}
