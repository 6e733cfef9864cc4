//! Telemetry: logs, traces and Prometheus metrics.
//!
//! * [`init`]: the process's `tracing` subscriber (text or JSON log lines, OTLP export).
//! * [`context`]: the trace context and request id a request carries across processes in
//!   its envelopes; [`request_id`]: how a span knows its request.
//! * [`otlp`]: the `observability.tracing` section and the OpenTelemetry exporter.
//! * Here: [`MetricsRegistry`], a cloneable handle around one `prometheus_client` registry
//!   that components register their own metrics into, and [`RuntimeMetrics`], the runtime's
//!   own counters (frames in/out, dropped frames by reason, calls, call errors).

pub mod context;
pub mod init;
pub mod otlp;
pub mod request_id;

pub use context::{set_remote_parent, TraceContext};
pub use init::{init, notice, LogSettings, Telemetry, TelemetryError};
pub use otlp::{TracingConfig, TracingError, TracingSettings};

use std::sync::{Arc, Mutex};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// Installs a global `tracing` subscriber filtered by `RUST_LOG` (or `default_filter` when
/// unset). Returns false if a subscriber was already installed (harmless, e.g. in tests).
pub fn init_tracing(default_filter: &str) -> bool {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .try_init()
        .is_ok()
}

/// A shared Prometheus registry that components register metrics into.
#[derive(Clone, Default)]
pub struct MetricsRegistry {
    inner: Arc<Mutex<Registry>>,
}

impl std::fmt::Debug for MetricsRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MetricsRegistry")
    }
}

impl MetricsRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `f` with the registry locked, e.g. `reg.with(|r| r.register("x", "help", c.clone()))`.
    pub fn with<R>(&self, f: impl FnOnce(&mut Registry) -> R) -> R {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    /// The registry in Prometheus text exposition format.
    pub fn encode_text(&self) -> String {
        let mut out = String::new();
        self.with(|r| {
            // Writing into a String cannot fail.
            let _ = prometheus_client::encoding::text::encode(&mut out, r);
        });
        out
    }
}

/// Why an inbound frame was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, EncodeLabelValue)]
pub enum DropReason {
    /// Larger than the configured maximum frame size.
    Oversized,
    /// Empty or missing its version byte.
    Truncated,
    /// Version byte this build does not speak.
    UnknownVersion,
    /// Not a decodable envelope (bad MessagePack, wrong multipart shape).
    Malformed,
    /// A valid envelope that makes no sense here (e.g. a reply for no pending call).
    Unexpected,
}

impl DropReason {
    /// Every reason, in a stable order.
    pub const ALL: [DropReason; 5] = [
        DropReason::Oversized,
        DropReason::Truncated,
        DropReason::UnknownVersion,
        DropReason::Malformed,
        DropReason::Unexpected,
    ];
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabel {
    reason: DropReason,
}

/// The runtime's own counters. Cloning shares the counters.
#[derive(Clone, Debug, Default)]
pub struct RuntimeMetrics {
    frames_in: Counter,
    frames_out: Counter,
    dropped: Family<ReasonLabel, Counter>,
    calls: Counter,
    call_errors: Counter,
}

impl RuntimeMetrics {
    /// Fresh counters, registered into `registry` under the `turbine_runtime` prefix.
    pub fn new(registry: &MetricsRegistry) -> Self {
        let m = Self::default();
        registry.with(|r| {
            let r = r.sub_registry_with_prefix("turbine_runtime");
            r.register(
                "frames_in",
                "Frames received on the request plane",
                m.frames_in.clone(),
            );
            r.register(
                "frames_out",
                "Frames sent on the request plane",
                m.frames_out.clone(),
            );
            r.register(
                "dropped_frames",
                "Inbound frames dropped, by reason",
                m.dropped.clone(),
            );
            r.register(
                "calls",
                "Calls, casts and streams started by this node",
                m.calls.clone(),
            );
            r.register(
                "call_errors",
                "Calls that ended in an error",
                m.call_errors.clone(),
            );
        });
        m
    }

    pub(crate) fn frame_in(&self) {
        self.frames_in.inc();
    }
    pub(crate) fn frame_out(&self) {
        self.frames_out.inc();
    }
    pub(crate) fn drop_frame(&self, reason: DropReason) {
        self.dropped.get_or_create(&ReasonLabel { reason }).inc();
    }
    pub(crate) fn call_started(&self) {
        self.calls.inc();
    }
    pub(crate) fn call_failed(&self) {
        self.call_errors.inc();
    }

    /// Frames received.
    pub fn frames_in(&self) -> u64 {
        self.frames_in.get()
    }
    /// Frames sent.
    pub fn frames_out(&self) -> u64 {
        self.frames_out.get()
    }
    /// Frames dropped for `reason`.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped.get_or_create(&ReasonLabel { reason }).get()
    }
    /// Frames dropped for any reason.
    pub fn dropped_total(&self) -> u64 {
        DropReason::ALL.iter().map(|r| self.dropped(*r)).sum()
    }
    /// Calls, casts and streams started.
    pub fn calls(&self) -> u64 {
        self.calls.get()
    }
    /// Calls that ended in an error.
    pub fn call_errors(&self) -> u64 {
        self.call_errors.get()
    }
}

/// Resident memory of a process in kB (`pid` `None`: this one), from /proc; `None` where
/// /proc is absent or unreadable. For soak tests and benchmarks that check memory stays
/// bounded.
pub fn resident_memory_kb(pid: Option<u32>) -> Option<u64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/status"),
        None => "/proc/self/status".to_string(),
    };
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .find_map(|line| {
            line.strip_prefix("VmRSS:")?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()
        })
}
