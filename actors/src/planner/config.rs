//! The cluster file's `planner:` section: latency targets, the engine profile, the load
//! predictor, the replica limits and the anti-flapping cooldown. docs/CONFIG.md documents
//! every field; unknown fields are rejected so a typo names itself.

use crate::kubernetes::WorkloadKind;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlannerConfig {
    /// The engine profile (YAML, as `turbine profile` writes it) the SLA math reads.
    pub profile: String,
    /// How often the planner observes the last interval and decides (milliseconds).
    pub adjustment_interval_ms: u64,
    /// How often, between two adjustment intervals, the planner looks at the requests
    /// arrived so far and those waiting on the workers, and grows a pool at once when they
    /// need more workers than it has (milliseconds; 0: only at adjustment intervals).
    pub reaction_interval_ms: u64,
    /// Time-to-first-token target (milliseconds).
    pub ttft_ms: f64,
    /// Inter-token-latency target (milliseconds).
    pub itl_ms: f64,
    /// Forecasts request count, input length and output length of the next interval.
    pub predictor: PredictorConfig,
    /// Fewest workers per pool (the aggregated pool, or each of prefill and decode).
    pub min_replicas: usize,
    /// Most workers per pool.
    pub max_replicas: usize,
    /// Devices (GPUs, or CPU sockets) one worker occupies.
    pub devices_per_worker: usize,
    /// Most devices all pools together may occupy; `None`: only `max_replicas` limits.
    pub max_devices: Option<usize>,
    /// After a pool changes size it does not shrink for this long, and it only shrinks to
    /// the largest size asked for during the last `cooldown_ms` (milliseconds). Growing is
    /// never delayed: a missed latency target costs more than an idle worker.
    pub cooldown_ms: u64,
    /// Scale the math by observed/expected TTFT and ITL (the profile's error on this load).
    pub correction: bool,
    /// How a decision is carried out (local processes, a Kubernetes workload, the simulator).
    pub connector: ConnectorConfig,
}

impl Default for PlannerConfig {
    fn default() -> Self {
        PlannerConfig {
            profile: String::new(),
            adjustment_interval_ms: 30_000,
            reaction_interval_ms: 1_000,
            ttft_ms: 1_000.0,
            itl_ms: 100.0,
            predictor: PredictorConfig::default(),
            min_replicas: 1,
            max_replicas: 8,
            devices_per_worker: 1,
            max_devices: None,
            cooldown_ms: 120_000,
            correction: true,
            connector: ConnectorConfig::default(),
        }
    }
}

/// Where the planner's decisions go.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ConnectorConfig {
    /// `turbine worker` processes on this machine, started with the same cluster file; each
    /// joins through discovery. Scale-down stops routing to a worker, waits until it
    /// reports itself idle, then sends SIGTERM and waits for it to exit.
    Local {
        /// Aggregated clusters: the worker group (0-based index into `workers:`) the extra
        /// processes run (default: the first).
        #[serde(default)]
        group: Option<usize>,
        /// Disaggregated clusters: the prefill pool's and the decode pool's groups (default:
        /// the first group of each role).
        #[serde(default)]
        prefill_group: Option<usize>,
        #[serde(default)]
        decode_group: Option<usize>,
        /// How long a worker leaving may take to finish its requests before SIGTERM, and
        /// then to exit before it is killed (milliseconds, each).
        #[serde(default = "default_drain_ms")]
        drain_timeout_ms: u64,
    },
    /// Sets the replicas of the pools' workloads through their `scale` subresource
    /// (`crate::kubernetes`); with `dry_run` the JSON merge patch is printed, not sent.
    Kubernetes {
        #[serde(default = "default_namespace")]
        namespace: String,
        /// The workloads' kind: `deployments` or `statefulsets`.
        #[serde(default = "default_workload_kind")]
        workload_kind: WorkloadKind,
        /// The aggregated pool's workload (aggregated clusters).
        #[serde(default)]
        aggregated: Option<String>,
        /// The prefill and decode pools' workloads (disaggregated clusters).
        #[serde(default)]
        prefill: Option<String>,
        #[serde(default)]
        decode: Option<String>,
        /// Print each patch instead of sending it (the default: a file copied to another
        /// cluster scales nothing until this is set to false on purpose).
        #[serde(default = "default_true")]
        dry_run: bool,
        /// The API server to send to, e.g. `http://127.0.0.1:8001` for `kubectl proxy`;
        /// unset: the kubeconfig (`KUBECONFIG`, `~/.kube/config`) or, in a pod, the
        /// service account.
        #[serde(default)]
        api_server: Option<String>,
    },
}

fn default_drain_ms() -> u64 {
    30_000
}

fn default_namespace() -> String {
    "default".to_string()
}

fn default_workload_kind() -> WorkloadKind {
    WorkloadKind::Deployments
}

fn default_true() -> bool {
    true
}

impl Default for ConnectorConfig {
    fn default() -> Self {
        ConnectorConfig::Local {
            group: None,
            prefill_group: None,
            decode_group: None,
            drain_timeout_ms: default_drain_ms(),
        }
    }
}

/// Which load predictor, with its parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum PredictorConfig {
    /// Kalman filter with a local linear trend (state: level and trend per interval).
    Kalman {
        /// Variance the level and the trend each drift by per interval.
        #[serde(default = "default_process_noise")]
        process_noise: f64,
        /// Variance of one interval's observation around the true level.
        #[serde(default = "default_measurement_noise")]
        measurement_noise: f64,
        /// Filter ln(1 + x) instead of x: multiplicative noise, never a negative forecast.
        #[serde(default)]
        log1p: bool,
    },
    /// The last observed value. (`{}`: a unit variant would let unknown fields through.)
    Constant {},
    /// The mean of the last `window` intervals.
    MovingAverage {
        #[serde(default = "default_window")]
        window: usize,
    },
}

fn default_process_noise() -> f64 {
    1.0
}

fn default_measurement_noise() -> f64 {
    4.0
}

fn default_window() -> usize {
    5
}

impl Default for PredictorConfig {
    fn default() -> Self {
        PredictorConfig::Kalman {
            process_noise: default_process_noise(),
            measurement_noise: default_measurement_noise(),
            log1p: false,
        }
    }
}

/// A `planner:` section the planner cannot run with.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlannerConfigError {
    #[error("planner.profile: a profile file is required (write one with `turbine profile`)")]
    NoProfile,
    #[error("planner.profile: {0}")]
    Profile(String),
    #[error("planner.adjustment_interval_ms must be at least 1")]
    ZeroInterval,
    #[error("planner.{0} must be a finite number > 0")]
    BadTarget(&'static str),
    #[error("planner.predictor: {0}")]
    BadPredictor(String),
    #[error("planner.min_replicas must be at least 1 and at most max_replicas")]
    BadReplicaRange,
    #[error("planner.devices_per_worker must be at least 1")]
    ZeroDevices,
    #[error(
        "planner: the worker groups must be all aggregated, or prefill and decode \
         (found another mix)"
    )]
    UnplannableWorkers,
    #[error("planner.connector: {0}")]
    BadConnector(String),
    #[error(
        "planner.max_devices ({budget}) cannot hold min_replicas in every pool \
         ({needed} devices)"
    )]
    BudgetBelowMinimum { budget: usize, needed: usize },
}

impl PlannerConfig {
    /// Checks the section for a cluster with `pools` pools (1 aggregated, 2 disaggregated).
    pub fn validate(&self, pools: usize) -> Result<(), PlannerConfigError> {
        if self.profile.trim().is_empty() {
            return Err(PlannerConfigError::NoProfile);
        }
        if self.adjustment_interval_ms == 0 {
            return Err(PlannerConfigError::ZeroInterval);
        }
        for (name, v) in [("ttft_ms", self.ttft_ms), ("itl_ms", self.itl_ms)] {
            if !(v.is_finite() && v > 0.0) {
                return Err(PlannerConfigError::BadTarget(name));
            }
        }
        self.predictor.validate()?;
        self.connector.validate(pools)?;
        if self.min_replicas == 0 || self.min_replicas > self.max_replicas {
            return Err(PlannerConfigError::BadReplicaRange);
        }
        if self.devices_per_worker == 0 {
            return Err(PlannerConfigError::ZeroDevices);
        }
        if let Some(budget) = self.max_devices {
            let needed = self
                .min_replicas
                .saturating_mul(pools)
                .saturating_mul(self.devices_per_worker);
            if budget < needed {
                return Err(PlannerConfigError::BudgetBelowMinimum { budget, needed });
            }
        }
        Ok(())
    }
}

impl ConnectorConfig {
    fn validate(&self, pools: usize) -> Result<(), PlannerConfigError> {
        let bad = |m: &str| Err(PlannerConfigError::BadConnector(m.to_string()));
        match self {
            ConnectorConfig::Local {
                group,
                prefill_group,
                decode_group,
                ..
            } => match (pools, group, prefill_group.or(*decode_group)) {
                (1, _, Some(_)) => bad("local: an aggregated cluster names its pool's `group` (no prefill_group/decode_group)"),
                (2, Some(_), _) => bad("local: a disaggregated cluster names `prefill_group` and `decode_group` (not `group`)"),
                _ => Ok(()),
            },
            ConnectorConfig::Kubernetes {
                aggregated,
                prefill,
                decode,
                namespace,
                ..
            } => {
                if namespace.trim().is_empty() {
                    return bad("kubernetes.namespace must not be empty");
                }
                match (pools, aggregated, prefill, decode) {
                    (1, Some(_), None, None) | (2, None, Some(_), Some(_)) => Ok(()),
                    (1, ..) => bad("kubernetes: an aggregated cluster names its workload in `aggregated` (and no prefill/decode)"),
                    _ => bad("kubernetes: a disaggregated cluster names `prefill` and `decode` workloads (and no aggregated)"),
                }
            }
        }
    }
}

impl PredictorConfig {
    fn validate(&self) -> Result<(), PlannerConfigError> {
        match *self {
            PredictorConfig::Kalman {
                process_noise,
                measurement_noise,
                ..
            } => {
                let ok = |v: f64| v.is_finite() && v > 0.0;
                if !ok(process_noise) || !ok(measurement_noise) {
                    return Err(PlannerConfigError::BadPredictor(
                        "process_noise and measurement_noise must be finite numbers > 0".into(),
                    ));
                }
            }
            PredictorConfig::Constant {} => {}
            PredictorConfig::MovingAverage { window } => {
                if window == 0 {
                    return Err(PlannerConfigError::BadPredictor(
                        "window must be at least 1".into(),
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minimal_section_takes_the_defaults() {
        let c: PlannerConfig = serde_yaml::from_str("profile: p.yaml").unwrap();
        assert_eq!(c.predictor, PredictorConfig::default());
        assert!(c.validate(2).is_ok());
    }

    #[test]
    fn every_predictor_kind_parses() {
        let k: PredictorConfig =
            serde_yaml::from_str("{kind: kalman, process_noise: 2, log1p: true}").unwrap();
        assert_eq!(
            k,
            PredictorConfig::Kalman {
                process_noise: 2.0,
                measurement_noise: 4.0,
                log1p: true
            }
        );
        let c: PredictorConfig = serde_yaml::from_str("kind: constant").unwrap();
        assert_eq!(c, PredictorConfig::Constant {});
        let m: PredictorConfig = serde_yaml::from_str("{kind: moving_average, window: 3}").unwrap();
        assert_eq!(m, PredictorConfig::MovingAverage { window: 3 });
    }

    #[test]
    fn unknown_fields_are_rejected_with_their_name() {
        let e = serde_yaml::from_str::<PlannerConfig>("profile: p\nttft: 5").unwrap_err();
        assert!(e.to_string().contains("ttft"), "{e}");
        let e = serde_yaml::from_str::<PlannerConfig>("predictor: {kind: constant, window: 2}")
            .unwrap_err();
        assert!(e.to_string().contains("window"), "{e}");
    }

    #[test]
    fn impossible_sections_are_rejected() {
        let base = PlannerConfig {
            profile: "p.yaml".into(),
            ..PlannerConfig::default()
        };
        let cases = [
            (
                PlannerConfig {
                    profile: " ".into(),
                    ..base.clone()
                },
                "profile",
            ),
            (
                PlannerConfig {
                    ttft_ms: 0.0,
                    ..base.clone()
                },
                "ttft_ms",
            ),
            (
                PlannerConfig {
                    itl_ms: f64::NAN,
                    ..base.clone()
                },
                "itl_ms",
            ),
            (
                PlannerConfig {
                    min_replicas: 3,
                    max_replicas: 2,
                    ..base.clone()
                },
                "min_replicas",
            ),
            (
                PlannerConfig {
                    max_devices: Some(1),
                    ..base.clone()
                },
                "max_devices",
            ),
            (
                PlannerConfig {
                    predictor: PredictorConfig::MovingAverage { window: 0 },
                    ..base.clone()
                },
                "window",
            ),
        ];
        for (cfg, field) in cases {
            let e = cfg.validate(2).unwrap_err().to_string();
            assert!(e.contains(field), "{field}: {e}");
        }
        assert!(PlannerConfig {
            max_devices: Some(1),
            ..base
        }
        .validate(1)
        .is_ok());
    }

    #[test]
    fn connectors_parse_and_kubernetes_must_name_its_pools() {
        let c: PlannerConfig = serde_yaml::from_str("profile: p").unwrap();
        assert_eq!(c.connector, ConnectorConfig::default());
        let k = |yaml: &str, pools| {
            let c: PlannerConfig = serde_yaml::from_str(yaml).unwrap();
            c.validate(pools)
        };
        assert!(k(
            "{profile: p, connector: {kind: kubernetes, aggregated: serve}}",
            1
        )
        .is_ok());
        assert!(k(
            "{profile: p, connector: {kind: kubernetes, prefill: pf, decode: dc}}",
            2
        )
        .is_ok());
        let e = k(
            "{profile: p, connector: {kind: kubernetes, prefill: pf, decode: dc}}",
            1,
        );
        assert!(e.unwrap_err().to_string().contains("aggregated"));
        assert!(k(
            "{profile: p, connector: {kind: kubernetes, aggregated: a, dry_run: false, \
             workload_kind: statefulsets, api_server: 'http://127.0.0.1:8001'}}",
            1,
        )
        .is_ok());
        let e = serde_yaml::from_str::<PlannerConfig>(
            "{profile: p, connector: {kind: kubernetes, aggregated: a, workload_kind: pods}}",
        )
        .unwrap_err();
        assert!(e.to_string().contains("statefulsets"), "{e}");
        let e = serde_yaml::from_str::<PlannerConfig>(
            "{profile: p, connector: {kind: local, grup: 1}}",
        )
        .unwrap_err();
        assert!(e.to_string().contains("grup"), "{e}");
        // The local connector names one group per pool, by the cluster's shape.
        assert!(k("{profile: p, connector: {kind: local, group: 1}}", 1).is_ok());
        assert!(k(
            "{profile: p, connector: {kind: local, prefill_group: 0, decode_group: 1}}",
            2
        )
        .is_ok());
        let e = k("{profile: p, connector: {kind: local, group: 1}}", 2);
        assert!(e.unwrap_err().to_string().contains("prefill_group"));
        let e = k("{profile: p, connector: {kind: local, decode_group: 1}}", 1);
        assert!(e.unwrap_err().to_string().contains("aggregated"));
    }
}
