//! `key_guard`: only the API keys listed in its config get through, each within its own
//! rate limit, and with `max_tokens` capped per key.
//!
//! ```yaml
//! stages:
//!   - name: key_guard
//!     config:
//!       keys:
//!         sk-alice: {requests_per_minute: 60, max_tokens: 256}
//!         sk-bob: {requests_per_minute: 5}
//! ```
//!
//! A missing or unknown key is a 401 (`invalid_api_key`), a key over its rate a 429 with
//! `Retry-After`; a request asking for more than the key's `max_tokens` (or for no limit)
//! is rewritten to the cap.

use async_trait::async_trait;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use turbine_actors::stages::{parse_config, Stage, StageError, StageRequest};

/// The registered name.
pub const NAME: &str = "key_guard";

/// The stage's `config:` block.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyGuardConfig {
    /// The keys let through, each with its limits.
    pub keys: BTreeMap<String, KeyLimits>,
}

/// One key's limits.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyLimits {
    /// Sustained requests a minute (bursts up to this many at once); absent: no limit.
    pub requests_per_minute: Option<u32>,
    /// The most tokens a request of this key may generate; absent: no cap.
    pub max_tokens: Option<u32>,
}

/// What the guard decided about one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Let it through, with `max_tokens` set to this (the request's own, or the key's cap).
    Admit { max_tokens: Option<u32> },
    /// No key, or one not listed.
    UnknownKey,
    /// Over the key's rate; retry after this long.
    Limited { retry_after: Duration },
}

/// The pure core: a token bucket per key. Takes `now`; never reads a clock.
pub struct Guard {
    keys: BTreeMap<String, (KeyLimits, Bucket)>,
}

struct Bucket {
    tokens: f64,
    last: Option<Instant>,
}

impl Guard {
    pub fn new(config: KeyGuardConfig) -> Result<Guard, String> {
        for (key, limits) in &config.keys {
            if limits.requests_per_minute == Some(0) {
                return Err(format!(
                    "keys.{key}.requests_per_minute: must be at least 1 (leave the key out to refuse it)"
                ));
            }
        }
        let keys = config
            .keys
            .into_iter()
            .map(|(k, limits)| {
                let tokens = f64::from(limits.requests_per_minute.unwrap_or(0));
                (k, (limits, Bucket { tokens, last: None }))
            })
            .collect();
        Ok(Guard { keys })
    }

    /// Decides about a request of `key` asking for `max_tokens`, at `now`.
    pub fn decide(&mut self, now: Instant, key: Option<&str>, max_tokens: Option<u32>) -> Decision {
        let Some((limits, bucket)) = key.and_then(|k| self.keys.get_mut(k)) else {
            return Decision::UnknownKey;
        };
        if let Some(rpm) = limits.requests_per_minute {
            let rate = f64::from(rpm) / 60.0; // requests a second
            let capacity = f64::from(rpm);
            if let Some(last) = bucket.last {
                let elapsed = now.saturating_duration_since(last).as_secs_f64();
                bucket.tokens = (bucket.tokens + elapsed * rate).min(capacity);
            }
            bucket.last = Some(now);
            if bucket.tokens < 1.0 {
                let wait = (1.0 - bucket.tokens) / rate;
                return Decision::Limited {
                    retry_after: Duration::from_secs_f64(wait),
                };
            }
            bucket.tokens -= 1.0;
        }
        let max_tokens = match (max_tokens, limits.max_tokens) {
            (Some(asked), Some(cap)) => Some(asked.min(cap)),
            (None, cap) => cap,
            (asked, None) => asked,
        };
        Decision::Admit { max_tokens }
    }
}

/// The stage: the guard, asked with the time of each request.
pub struct KeyGuard {
    guard: Guard,
}

/// The factory `turbine` registers.
pub fn build(config: &serde_yaml::Value) -> Result<Box<dyn Stage>, String> {
    let config: KeyGuardConfig = parse_config(config)?;
    Ok(Box::new(KeyGuard {
        guard: Guard::new(config)?,
    }))
}

#[async_trait]
impl Stage for KeyGuard {
    async fn on_request(&mut self, request: &mut StageRequest) -> Result<(), StageError> {
        let key = request.meta.api_key.as_deref();
        match self.guard.decide(Instant::now(), key, request.max_tokens) {
            Decision::Admit { max_tokens } => {
                request.max_tokens = max_tokens;
                Ok(())
            }
            Decision::UnknownKey => Err(StageError::invalid_api_key(match key {
                None => "this server needs an API key (Authorization: Bearer KEY)".to_string(),
                Some(_) => "the API key is not known to this server".to_string(),
            })),
            Decision::Limited { retry_after } => Err(StageError::rate_limited(
                "this API key is over its request rate; retry later",
                retry_after.as_secs_f64().ceil() as u32,
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(yaml: &str) -> Guard {
        let config: KeyGuardConfig = parse_config(&serde_yaml::from_str(yaml).unwrap()).unwrap();
        Guard::new(config).unwrap()
    }

    #[test]
    fn unknown_and_missing_keys_are_refused() {
        let mut g = guard("keys: {a: {}}");
        let now = Instant::now();
        assert_eq!(g.decide(now, None, None), Decision::UnknownKey);
        assert_eq!(g.decide(now, Some("b"), None), Decision::UnknownKey);
        assert_eq!(
            g.decide(now, Some("a"), Some(7)),
            Decision::Admit {
                max_tokens: Some(7)
            }
        );
    }

    #[test]
    fn max_tokens_is_capped_per_key() {
        let mut g = guard("keys: {a: {max_tokens: 3}}");
        let now = Instant::now();
        assert_eq!(
            g.decide(now, Some("a"), Some(10)),
            Decision::Admit {
                max_tokens: Some(3)
            }
        );
        assert_eq!(
            g.decide(now, Some("a"), None),
            Decision::Admit {
                max_tokens: Some(3)
            }
        );
        assert_eq!(
            g.decide(now, Some("a"), Some(2)),
            Decision::Admit {
                max_tokens: Some(2)
            }
        );
    }

    #[test]
    fn the_rate_limit_refills_over_time() {
        let mut g = guard("keys: {a: {requests_per_minute: 2}}");
        let t0 = Instant::now();
        assert!(matches!(
            g.decide(t0, Some("a"), None),
            Decision::Admit { .. }
        ));
        assert!(matches!(
            g.decide(t0, Some("a"), None),
            Decision::Admit { .. }
        ));
        match g.decide(t0, Some("a"), None) {
            Decision::Limited { retry_after } => assert_eq!(retry_after, Duration::from_secs(30)),
            other => panic!("expected a refusal, got {other:?}"),
        }
        // One request a 30 s comes back.
        let t1 = t0 + Duration::from_secs(30);
        assert!(matches!(
            g.decide(t1, Some("a"), None),
            Decision::Admit { .. }
        ));
        assert!(matches!(
            g.decide(t1, Some("a"), None),
            Decision::Limited { .. }
        ));
    }

    #[test]
    fn bad_configs_name_the_field() {
        let v: serde_yaml::Value =
            serde_yaml::from_str("keys: {a: {requests_per_minit: 2}}").unwrap();
        let e = parse_config::<KeyGuardConfig>(&v).unwrap_err();
        assert!(
            e.contains("keys.a") && e.contains("requests_per_minit"),
            "{e}"
        );
        let v: serde_yaml::Value =
            serde_yaml::from_str("keys: {a: {requests_per_minute: 0}}").unwrap();
        let e = build(&v).err().unwrap();
        assert!(e.contains("keys.a.requests_per_minute"), "{e}");
    }
}
