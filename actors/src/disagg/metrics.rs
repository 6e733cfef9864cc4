//! Disaggregation metrics on the frontend's `/metrics`: where prefills ran, why remote ones
//! fell back, how much KV crossed and how long it took, how deep the prefill pool's queue
//! was at the last decision. The frontend counts them from the router's plans and the
//! decode workers' import reports, so they are right with workers in other processes too.

use super::wire::FallbackReason;
use crate::frontend::Metrics;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabel {
    pub decision: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

/// The counters; clone freely (they share their values).
#[derive(Clone, Default, Debug)]
pub struct DisaggMetrics {
    decisions: Family<DecisionLabel, Counter>,
    fallbacks: Family<ReasonLabel, Counter>,
    transfer_bytes: Counter,
    transfer_blocks: Counter,
    transfer_seconds: Counter<f64, AtomicU64>,
    transfers: Counter,
    /// Transfers by path: `device_ipc`, or `host`.
    paths: Family<PathLabel, Counter>,
    /// Transfers offered a device path that went through host memory, by reason.
    host_paths: Family<ReasonLabel, Counter>,
    prefill_queue: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PathLabel {
    pub path: String,
}

impl DisaggMetrics {
    /// Creates the metrics and registers them in `metrics`' registry.
    pub fn register(metrics: &Metrics) -> DisaggMetrics {
        let m = DisaggMetrics::default();
        metrics.register(
            "turbine_disagg_prefill_decisions",
            "Where prefills were decided to run: remote, or local_<reason>",
            m.decisions.clone(),
        );
        metrics.register(
            "turbine_disagg_prefill_fallbacks",
            "Remote prefills abandoned for a local one, by reason",
            m.fallbacks.clone(),
        );
        metrics.register(
            "turbine_disagg_transfer_bytes",
            "KV bytes pulled from prefill workers by decode workers",
            m.transfer_bytes.clone(),
        );
        metrics.register(
            "turbine_disagg_transfer_blocks",
            "KV blocks pulled from prefill workers by decode workers",
            m.transfer_blocks.clone(),
        );
        metrics.register(
            "turbine_disagg_transfer_seconds",
            "Time decode workers spent pulling and importing KV",
            m.transfer_seconds.clone(),
        );
        metrics.register(
            "turbine_disagg_transfers",
            "KV transfers completed",
            m.transfers.clone(),
        );
        metrics.register(
            "turbine_disagg_transfer_paths",
            "KV transfers completed, by path: device_ipc (device to device between processes) or host",
            m.paths.clone(),
        );
        metrics.register(
            "turbine_disagg_transfer_host_reasons",
            "KV transfers offered a device copy that went through host memory, by reason",
            m.host_paths.clone(),
        );
        metrics.register(
            "turbine_disagg_prefill_queue",
            "Requests in flight on the prefill pool at the last routing decision",
            m.prefill_queue.clone(),
        );
        m
    }

    pub fn decision(&self, label: &str) {
        self.decisions
            .get_or_create(&DecisionLabel {
                decision: label.to_string(),
            })
            .inc();
    }

    pub fn fallback(&self, reason: &str) {
        self.fallbacks
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn transferred(&self, blocks: u32, bytes: u64, seconds: f64) {
        self.transfers.inc();
        self.transfer_blocks.inc_by(u64::from(blocks));
        self.transfer_bytes.inc_by(bytes);
        self.transfer_seconds.inc_by(seconds);
    }

    /// Counts a completed transfer's path (`host_reason`: why an offered device copy was
    /// not taken).
    pub fn transfer_path(&self, device_copy: bool, host_reason: Option<&str>) {
        let path = if device_copy { "device_ipc" } else { "host" };
        self.paths
            .get_or_create(&PathLabel {
                path: path.to_string(),
            })
            .inc();
        if let Some(reason) = host_reason {
            self.host_paths
                .get_or_create(&ReasonLabel {
                    reason: reason.to_string(),
                })
                .inc();
        }
    }

    /// Transfers that took `path` (`device_ipc` or `host`) so far.
    pub fn transfer_paths(&self, path: &str) -> u64 {
        self.paths
            .get_or_create(&PathLabel {
                path: path.to_string(),
            })
            .get()
    }

    pub fn prefill_queue(&self, queued: u32) {
        self.prefill_queue.set(i64::from(queued));
    }

    /// Fallbacks counted for `reason` so far (tests, the simulator's report).
    pub fn fallbacks(&self, reason: &str) -> u64 {
        self.fallbacks
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .get()
    }

    /// Decisions counted for `label` so far.
    pub fn decisions(&self, label: &str) -> u64 {
        self.decisions
            .get_or_create(&DecisionLabel {
                decision: label.to_string(),
            })
            .get()
    }

    /// (transfers, blocks, bytes) so far.
    pub fn transfers(&self) -> (u64, u64, u64) {
        (
            self.transfers.get(),
            self.transfer_blocks.get(),
            self.transfer_bytes.get(),
        )
    }

    /// The counts so far in one record (the simulator's report).
    pub fn summary(&self) -> DisaggSummary {
        let (transfers, blocks, bytes) = self.transfers();
        let local = [
            "local_disabled",
            "local_no_prefill_worker",
            "local_short",
            "local_busy",
        ];
        DisaggSummary {
            remote: self.decisions("remote"),
            local: local.iter().map(|l| self.decisions(l)).sum(),
            fallbacks: FallbackReason::ALL
                .iter()
                .map(|r| self.fallbacks(r.label()))
                .sum(),
            fallback_reasons: FallbackReason::ALL
                .iter()
                .map(|r| (r.label(), self.fallbacks(r.label())))
                .filter(|(_, n)| *n > 0)
                .collect(),
            transfers,
            blocks,
            bytes,
            seconds: self.transfer_seconds.get(),
        }
    }
}

/// What [`DisaggMetrics`] counted, in one record.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct DisaggSummary {
    /// Prefills decided remote, and decided local (any reason).
    pub remote: u64,
    pub local: u64,
    /// Remote prefills that fell back to a local one, in all and by reason (those seen).
    pub fallbacks: u64,
    pub fallback_reasons: Vec<(&'static str, u64)>,
    /// KV transfers completed, the blocks and bytes they carried, the seconds they took.
    pub transfers: u64,
    pub blocks: u64,
    pub bytes: u64,
    pub seconds: f64,
}
