//! OpenTelemetry trace export over OTLP/gRPC: the config section, its environment
//! overrides, and the exporter pipeline behind the `tracing-opentelemetry` layer.
//!
//! Off unless an endpoint is given (the file's `otlp_endpoint`, or the standard
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT`). Spans are batched on
//! the SDK's own thread and sent through a tonic channel whose connection runs on the
//! process's tokio runtime, so [`TracingSettings::pipeline`] must be called inside it. The
//! sampler is parent-based: a request whose caller (an incoming `traceparent`, or the
//! frontend across the request plane) decided is sampled as decided; a root is sampled with
//! probability `sampling_ratio`.

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use serde::{Deserialize, Serialize};

/// How long one export may take before it is abandoned (the batch is dropped, serving goes on).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// `observability.tracing` in the cluster file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingConfig {
    /// The OTLP/gRPC collector, e.g. `http://otel-collector:4317`; absent: no export.
    pub otlp_endpoint: Option<String>,
    /// Share of new traces kept, 0.0..=1.0 (requests that arrive with a sampled
    /// `traceparent` are always kept).
    pub sampling_ratio: f64,
    /// `service.name` of this cluster's spans.
    pub service_name: String,
}

impl Default for TracingConfig {
    fn default() -> Self {
        TracingConfig {
            otlp_endpoint: None,
            sampling_ratio: 1.0,
            service_name: "turbine".to_string(),
        }
    }
}

/// A bad tracing setting, named by where it came from.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TracingError {
    #[error("{source_name}: the sampling ratio must be a number from 0.0 to 1.0, got {value:?}")]
    SamplingRatio { source_name: String, value: String },
    #[error("{source_name}: the OTLP endpoint must be an http:// URL, got {value:?}")]
    Endpoint { source_name: String, value: String },
    #[error("starting the OTLP exporter: {0}")]
    Exporter(String),
}

/// What export runs with, once the file and the environment are combined.
#[derive(Debug, Clone, PartialEq)]
pub struct TracingSettings {
    pub endpoint: String,
    pub sampling_ratio: f64,
    pub service_name: String,
}

/// Environment variables that override the file (the OpenTelemetry SDK's standard names).
pub const ENV_TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
pub const ENV_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
pub const ENV_SAMPLER_ARG: &str = "OTEL_TRACES_SAMPLER_ARG";
pub const ENV_SERVICE_NAME: &str = "OTEL_SERVICE_NAME";
pub const ENV_SDK_DISABLED: &str = "OTEL_SDK_DISABLED";

impl TracingConfig {
    /// The settings export runs with: the file's, each overridden by its environment
    /// variable when set and non-empty (`env` looks one up); `None` when no endpoint is
    /// given anywhere, or `OTEL_SDK_DISABLED=true`.
    pub fn resolve(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<TracingSettings>, TracingError> {
        let env = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        if env(ENV_SDK_DISABLED).is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        let from_env = env(ENV_TRACES_ENDPOINT)
            .map(|v| (ENV_TRACES_ENDPOINT.to_string(), v))
            .or_else(|| env(ENV_ENDPOINT).map(|v| (ENV_ENDPOINT.to_string(), v)));
        let from_file = self
            .otlp_endpoint
            .clone()
            .filter(|v| !v.trim().is_empty())
            .map(|v| ("observability.tracing.otlp_endpoint".to_string(), v));
        let Some((endpoint_source, endpoint)) = from_env.or(from_file) else {
            return Ok(None);
        };
        let endpoint = endpoint.trim().to_string();
        if !endpoint.starts_with("http://") || endpoint.len() <= "http://".len() {
            // TLS is not built in (no TLS stack for a collector normally beside the process).
            return Err(TracingError::Endpoint {
                source_name: endpoint_source,
                value: endpoint,
            });
        }
        let (ratio_source, ratio) = match env(ENV_SAMPLER_ARG) {
            Some(v) => {
                let parsed = v.trim().parse::<f64>().ok();
                (ENV_SAMPLER_ARG.to_string(), parsed.ok_or(v))
            }
            None => (
                "observability.tracing.sampling_ratio".to_string(),
                Ok(self.sampling_ratio),
            ),
        };
        let sampling_ratio = match ratio {
            Ok(r) if (0.0..=1.0).contains(&r) => r,
            Ok(r) => {
                return Err(TracingError::SamplingRatio {
                    source_name: ratio_source,
                    value: r.to_string(),
                })
            }
            Err(v) => {
                return Err(TracingError::SamplingRatio {
                    source_name: ratio_source,
                    value: v,
                })
            }
        };
        let service_name = env(ENV_SERVICE_NAME).unwrap_or_else(|| self.service_name.clone());
        Ok(Some(TracingSettings {
            endpoint,
            sampling_ratio,
            service_name,
        }))
    }
}

impl TracingSettings {
    /// The exporter pipeline: a tracer provider batching spans to the endpoint, its
    /// resource naming the service, this process (`process.pid`) and its `role` (e.g.
    /// `frontend`, `decode`). Must run inside a tokio runtime (the gRPC channel's connection
    /// task is spawned on it); nothing connects until the first batch is sent.
    pub fn pipeline(&self, role: &str) -> Result<SdkTracerProvider, TracingError> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(self.endpoint.clone())
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| TracingError::Exporter(e.to_string()))?;
        let resource = Resource::builder()
            .with_service_name(self.service_name.clone())
            .with_attributes([
                KeyValue::new("process.pid", i64::from(std::process::id())),
                KeyValue::new("turbine.role", role.to_string()),
            ])
            .build();
        let sampler =
            Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(self.sampling_ratio)));
        Ok(SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(sampler)
            .with_resource(resource)
            .build())
    }
}

/// The `tracing` layer that turns spans into OpenTelemetry spans of `provider`'s tracer.
pub(crate) fn layer<S>(
    provider: &SdkTracerProvider,
) -> tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_opentelemetry::layer().with_tracer(provider.tracer("turbine"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn off_by_default_and_on_with_an_endpoint() {
        let file = TracingConfig::default();
        assert_eq!(file.resolve(env(&[])), Ok(None));
        let on = TracingConfig {
            otlp_endpoint: Some("http://collector:4317".into()),
            ..TracingConfig::default()
        };
        let s = on.resolve(env(&[])).unwrap().unwrap();
        assert_eq!(s.endpoint, "http://collector:4317");
        assert_eq!(s.sampling_ratio, 1.0);
        assert_eq!(s.service_name, "turbine");
        assert_eq!(on.resolve(env(&[(ENV_SDK_DISABLED, "TRUE")])), Ok(None));
    }

    #[test]
    fn the_environment_overrides_the_file() {
        let file = TracingConfig {
            otlp_endpoint: Some("http://file:4317".into()),
            sampling_ratio: 0.5,
            service_name: "from-file".into(),
        };
        let s = file
            .resolve(env(&[
                (ENV_ENDPOINT, "http://generic:4317"),
                (ENV_TRACES_ENDPOINT, "http://traces:4317"),
                (ENV_SAMPLER_ARG, "0.25"),
                (ENV_SERVICE_NAME, "from-env"),
            ]))
            .unwrap()
            .unwrap();
        assert_eq!(
            s,
            TracingSettings {
                endpoint: "http://traces:4317".into(),
                sampling_ratio: 0.25,
                service_name: "from-env".into(),
            }
        );
        let generic = TracingConfig::default()
            .resolve(env(&[
                (ENV_ENDPOINT, "http://generic:4317"),
                (ENV_SAMPLER_ARG, ""),
            ]))
            .unwrap()
            .unwrap();
        assert_eq!(generic.endpoint, "http://generic:4317");
        assert_eq!(generic.sampling_ratio, 1.0);
    }

    #[test]
    fn bad_settings_name_their_source() {
        let on = TracingConfig {
            otlp_endpoint: Some("http://c:4317".into()),
            sampling_ratio: 1.5,
            ..TracingConfig::default()
        };
        let err = on.resolve(env(&[])).unwrap_err().to_string();
        assert!(
            err.contains("observability.tracing.sampling_ratio"),
            "{err}"
        );
        let err = on
            .resolve(env(&[(ENV_SAMPLER_ARG, "half")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("OTEL_TRACES_SAMPLER_ARG") && err.contains("half"),
            "{err}"
        );
        let err = TracingConfig::default()
            .resolve(env(&[(ENV_ENDPOINT, "collector:4317")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("OTEL_EXPORTER_OTLP_ENDPOINT"), "{err}");
    }
}
