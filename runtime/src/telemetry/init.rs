//! The process's one `tracing` subscriber: log lines (text or JSON) on stderr, request ids
//! kept per span ([`super::request_id`]), and, when export is on, OpenTelemetry spans
//! ([`super::otlp`]).
//!
//! Logs are filtered by the user's filter (`--log`), except that turbine's own spans at
//! `info` and above (the `request` span, `serve`, the worker's phases) are always kept for
//! the log layer: a `warn` line inside a request then still names the request. Spans cost a
//! few allocations per request; nothing is printed for them unless a line is. The exporter
//! sees turbine's spans and events at `info` and above whatever `--log` says, so tracing
//! does not need verbose logs.

use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::level_filters::LevelFilter;
use tracing::{Level, Metadata};
use tracing_subscriber::filter::{filter_fn, FilterExt};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use super::otlp::{TracingError, TracingSettings};
use super::request_id::RequestIdLayer;

/// How log lines are written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    /// An env-filter directive list, e.g. `warn` or `turbine_actors=debug`.
    pub filter: String,
    /// One JSON object a line (with the spans each line happened in) instead of text.
    pub json: bool,
}

/// The installed telemetry. Dropping it flushes the spans not yet exported (bounded by the
/// exporter's timeout); keep it alive for the process's life, and drop it while the tokio
/// runtime still runs.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported over OTLP.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            // Nothing to do about a collector that cannot take the last batch at exit.
            let _ = provider.shutdown();
        }
    }
}

/// Why telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error(transparent)]
    Tracing(#[from] TracingError),
    #[error("a tracing subscriber is already installed")]
    AlreadyInstalled,
}

/// The target of [`notice`] lines in JSON logs (always written, whatever the filter).
const NOTICE_TARGET: &str = "turbine::notice";

/// Whether [`init`] set up JSON log lines.
static JSON_LOGS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// A message for the operator outside the log filter (start-up, shutdown): a plain stderr
/// line, or with JSON logs a JSON log line like every other (so a log pipeline reading
/// stderr sees nothing but JSON).
pub fn notice(message: impl std::fmt::Display) {
    if JSON_LOGS.get().copied().unwrap_or(false) {
        tracing::info!(target: NOTICE_TARGET, "{message}");
    } else {
        eprintln!("{message}");
    }
}

/// Whether `meta` comes from one of turbine's crates (`turbine`, `turbine_runtime`, ...).
fn is_turbine(meta: &Metadata<'_>) -> bool {
    let target = meta.target();
    target == "turbine" || target.starts_with("turbine_") || target.starts_with("turbine::")
}

/// Installs the global subscriber: logs per `logs`, and OTLP export when `tracing` is given
/// (`role` names this process in the spans' resource). Export needs a tokio runtime: call
/// this inside one (`Runtime::enter`).
pub fn init(
    logs: &LogSettings,
    tracing: Option<&TracingSettings>,
    role: &str,
) -> Result<Telemetry, TelemetryError> {
    let provider = tracing.map(|t| t.pipeline(role)).transpose()?;
    let request_spans = filter_fn(|meta: &Metadata<'_>| {
        meta.is_span() && *meta.level() <= Level::INFO && is_turbine(meta)
    })
    .with_max_level_hint(LevelFilter::INFO);
    let notices = filter_fn(|meta: &Metadata<'_>| meta.target() == NOTICE_TARGET)
        .with_max_level_hint(LevelFilter::INFO);
    let log_filter = EnvFilter::new(&logs.filter).or(request_spans).or(notices);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if logs.json {
        fmt.json()
            .with_current_span(false)
            .with_filter(log_filter)
            .boxed()
    } else {
        fmt.with_filter(log_filter).boxed()
    };
    let mut layers: Vec<Box<dyn Layer<Registry> + Send + Sync>> = vec![RequestIdLayer.boxed(), fmt];
    if let Some(provider) = &provider {
        let traced =
            filter_fn(|meta: &Metadata<'_>| *meta.level() <= Level::INFO && is_turbine(meta))
                .with_max_level_hint(LevelFilter::INFO);
        layers.push(super::otlp::layer(provider).with_filter(traced).boxed());
    }
    tracing_subscriber::registry()
        .with(layers)
        .try_init()
        .map_err(|_| TelemetryError::AlreadyInstalled)?;
    let _ = JSON_LOGS.set(logs.json);
    Ok(Telemetry { provider })
}
