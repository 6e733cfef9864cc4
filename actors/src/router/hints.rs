//! Routing hints in HTTP headers: a gateway that already decided (turbine's endpoint picker,
//! `turbine epp`) tells the frontend which worker to use, which prefill worker, and whether
//! to serve the request aggregated or disaggregated. The picker writes them
//! ([`RoutingHints::headers`]); the frontend reads them ([`RoutingHints::from_headers`]) and
//! follows them when it can, falling back to its own routing when a hint names a worker it
//! does not know (counted, never an error).

use super::policy::RouteOverrides;
use crate::frontend::Metrics;
use crate::ids::WorkerId;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

/// The worker to run the request on (its registered id, e.g. `1234` or `w1234`).
pub const HINT_WORKER: &str = "x-turbine-worker";
/// The worker to prefill on (disaggregated serving).
pub const HINT_PREFILL_WORKER: &str = "x-turbine-prefill-worker";
/// `aggregated` or `disaggregated`.
pub const HINT_MODE: &str = "x-turbine-mode";
/// Every hint header, so a picker can strip what a client sent before it sets its own.
pub const HINT_HEADERS: [&str; 3] = [HINT_WORKER, HINT_PREFILL_WORKER, HINT_MODE];
/// This request's overlap weight (replaces `router.overlap_weight`; a number >= 0).
pub const OVERRIDE_OVERLAP_WEIGHT: &str = "x-turbine-overlap-weight";
/// This request's router temperature (replaces `router.temperature`; a number >= 0).
pub const OVERRIDE_TEMPERATURE: &str = "x-turbine-router-temperature";

/// How a gateway decided a request should be served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HintMode {
    /// One worker prefills and decodes.
    Aggregated,
    /// A prefill worker computes the KV, the (decode) worker pulls it and decodes.
    Disaggregated,
}

impl HintMode {
    pub fn as_str(self) -> &'static str {
        match self {
            HintMode::Aggregated => "aggregated",
            HintMode::Disaggregated => "disaggregated",
        }
    }
}

/// The hints of one request. Absent headers are `None`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RoutingHints {
    pub worker: Option<WorkerId>,
    pub prefill_worker: Option<WorkerId>,
    pub mode: Option<HintMode>,
    /// The client's own overlap weight and temperature for this request: they apply
    /// wherever this frontend routes it (no worker hint, or a hint it falls back from),
    /// and not to a request a gateway already placed.
    pub overrides: RouteOverrides,
}

/// A hint header that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("header {header}: {message}")]
pub struct HintError {
    pub header: &'static str,
    pub message: String,
}

fn worker_id(header: &'static str, v: &str) -> Result<WorkerId, HintError> {
    let digits = v.trim().strip_prefix('w').unwrap_or(v.trim());
    digits.parse().map(WorkerId).map_err(|_| HintError {
        header,
        message: format!("`{v}` is not a worker id"),
    })
}

fn non_negative(header: &'static str, v: &str) -> Result<f64, HintError> {
    match v.trim().parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
        _ => Err(HintError {
            header,
            message: format!("`{v}` is not a finite number >= 0"),
        }),
    }
}

impl RoutingHints {
    /// Whether no placement hint (worker, prefill worker, mode) is set; `overrides` are
    /// not placement.
    pub fn is_empty(&self) -> bool {
        self.worker.is_none() && self.prefill_worker.is_none() && self.mode.is_none()
    }

    /// Reads the hints through `get` (a header lookup by lower-case name). A malformed
    /// value is an error: the client (or gateway) sent something it did not mean.
    pub fn from_headers<'a>(
        get: impl Fn(&str) -> Option<&'a str>,
    ) -> Result<RoutingHints, HintError> {
        let worker = get(HINT_WORKER)
            .map(|v| worker_id(HINT_WORKER, v))
            .transpose()?;
        let prefill_worker = get(HINT_PREFILL_WORKER)
            .map(|v| worker_id(HINT_PREFILL_WORKER, v))
            .transpose()?;
        let mode = match get(HINT_MODE).map(str::trim) {
            None => None,
            Some("aggregated") => Some(HintMode::Aggregated),
            Some("disaggregated") => Some(HintMode::Disaggregated),
            Some(other) => {
                return Err(HintError {
                    header: HINT_MODE,
                    message: format!("`{other}`: expected aggregated or disaggregated"),
                })
            }
        };
        let overrides = RouteOverrides {
            overlap_weight: get(OVERRIDE_OVERLAP_WEIGHT)
                .map(|v| non_negative(OVERRIDE_OVERLAP_WEIGHT, v))
                .transpose()?,
            temperature: get(OVERRIDE_TEMPERATURE)
                .map(|v| non_negative(OVERRIDE_TEMPERATURE, v))
                .transpose()?,
        };
        Ok(RoutingHints {
            worker,
            prefill_worker,
            mode,
            overrides,
        })
    }

    /// The headers that carry these hints (name, value).
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if let Some(w) = self.worker {
            out.push((HINT_WORKER, w.0.to_string()));
        }
        if let Some(w) = self.prefill_worker {
            out.push((HINT_PREFILL_WORKER, w.0.to_string()));
        }
        if let Some(m) = self.mode {
            out.push((HINT_MODE, m.as_str().to_string()));
        }
        if let Some(w) = self.overrides.overlap_weight {
            out.push((OVERRIDE_OVERLAP_WEIGHT, w.to_string()));
        }
        if let Some(t) = self.overrides.temperature {
            out.push((OVERRIDE_TEMPERATURE, t.to_string()));
        }
        out
    }
}

/// What became of a request's hints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HintOutcome {
    /// Served where the hints said.
    Followed,
    /// The hinted worker is not one this frontend knows (never joined, or left).
    UnknownWorker,
    /// The hinted prefill worker is not one this frontend knows, or this cluster has no
    /// disaggregated serving.
    UnknownPrefillWorker,
    /// The hinted worker could not be reached (it died; its lease has not expired yet).
    Unreachable,
    /// `disaggregated` without a prefill worker, or a prefill worker without a worker.
    Incomplete,
}

impl HintOutcome {
    pub fn label(self) -> &'static str {
        match self {
            HintOutcome::Followed => "followed",
            HintOutcome::UnknownWorker => "fallback_unknown_worker",
            HintOutcome::UnknownPrefillWorker => "fallback_unknown_prefill_worker",
            HintOutcome::Unreachable => "fallback_unreachable",
            HintOutcome::Incomplete => "fallback_incomplete",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: String,
}

/// `turbine_routing_hints_total{outcome}` on the frontend's `/metrics`: hinted requests
/// served as hinted, or routed by the frontend itself and why. Clone freely.
#[derive(Clone, Debug, Default)]
pub struct HintMetrics {
    outcomes: Family<OutcomeLabel, Counter>,
}

impl HintMetrics {
    /// Creates the counter and registers it in `metrics`' registry.
    pub fn register(metrics: &Metrics) -> HintMetrics {
        let m = HintMetrics::default();
        metrics.register(
            "turbine_routing_hints",
            "Requests with routing hint headers: followed, or fallback_<reason> to the frontend's own routing",
            m.outcomes.clone(),
        );
        m
    }

    pub fn count(&self, outcome: HintOutcome) {
        self.outcomes
            .get_or_create(&OutcomeLabel {
                outcome: outcome.label().to_string(),
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_round_trip_through_headers_and_bad_values_are_named() {
        let h = RoutingHints {
            worker: Some(WorkerId(7)),
            prefill_worker: Some(WorkerId(9)),
            mode: Some(HintMode::Disaggregated),
            overrides: RouteOverrides {
                overlap_weight: Some(0.25),
                temperature: Some(1.5),
            },
        };
        let headers = h.headers();
        let get = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(RoutingHints::from_headers(get), Ok(h));
        assert_eq!(
            RoutingHints::from_headers(|n| (n == HINT_WORKER).then_some("w12")),
            Ok(RoutingHints {
                worker: Some(WorkerId(12)),
                ..RoutingHints::default()
            })
        );
        let err = RoutingHints::from_headers(|n| (n == HINT_MODE).then_some("both")).unwrap_err();
        assert_eq!(err.header, HINT_MODE);
        let only = RoutingHints::from_headers(|n| (n == OVERRIDE_TEMPERATURE).then_some(" 2 "));
        let only = only.unwrap();
        assert!(only.is_empty(), "an override alone is no placement hint");
        assert_eq!(only.overrides.temperature, Some(2.0));
        for bad in ["-1", "NaN", "inf", "warm", ""] {
            for header in [OVERRIDE_OVERLAP_WEIGHT, OVERRIDE_TEMPERATURE] {
                let err = RoutingHints::from_headers(|n| (n == header).then_some(bad)).unwrap_err();
                assert_eq!(err.header, header);
                assert!(err.message.contains(">= 0"), "{}", err.message);
            }
        }
        let err = RoutingHints::from_headers(|n| (n == HINT_WORKER).then_some("x1")).unwrap_err();
        assert_eq!(err.header, HINT_WORKER);
        assert!(RoutingHints::from_headers(|_| None).unwrap().is_empty());
    }
}
