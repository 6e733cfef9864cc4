//! Load predictors: forecast one per-interval series (request count, mean input length or
//! mean output length) one adjustment interval ahead.
//!
//! A predictor sees one value per interval and answers what it expects next. Values that
//! cannot be a load (NaN, ±∞, negative) are dropped before they reach the state, so one bad
//! sample cannot poison every later forecast; forecasts are finite and never negative.

use super::config::PredictorConfig;
use super::kalman::LocalLinearTrend;
use std::collections::VecDeque;

/// One series' forecaster.
pub trait Predictor: Send {
    /// Adds the value observed over the interval that just ended.
    fn observe(&mut self, value: f64);
    /// The forecast for the next interval; `None` before the first usable observation.
    fn predict(&self) -> Option<f64>;
}

/// Whether `v` can be a load sample (finite, not negative).
pub fn usable(v: f64) -> bool {
    v.is_finite() && v >= 0.0
}

/// A forecast made safe to act on: finite and not negative.
pub fn sanitize(v: f64) -> f64 {
    if v.is_nan() {
        0.0
    } else {
        v.clamp(0.0, f64::MAX)
    }
}

/// Builds the predictor a config names.
pub fn build(cfg: &PredictorConfig) -> Box<dyn Predictor> {
    match *cfg {
        PredictorConfig::Kalman {
            process_noise,
            measurement_noise,
            log1p,
        } => Box::new(LocalLinearTrend::new(
            process_noise,
            measurement_noise,
            log1p,
        )),
        PredictorConfig::Constant {} => Box::new(Constant::default()),
        PredictorConfig::MovingAverage { window } => Box::new(MovingAverage::new(window)),
    }
}

/// Tomorrow is like today: the last observed value.
#[derive(Clone, Debug, Default)]
pub struct Constant {
    last: Option<f64>,
}

impl Predictor for Constant {
    fn observe(&mut self, value: f64) {
        if usable(value) {
            self.last = Some(value);
        }
    }

    fn predict(&self) -> Option<f64> {
        self.last
    }
}

/// The mean of the last `window` values.
#[derive(Clone, Debug)]
pub struct MovingAverage {
    window: usize,
    values: VecDeque<f64>,
}

impl MovingAverage {
    /// A window of 0 is treated as 1 (config validation rejects it before).
    pub fn new(window: usize) -> MovingAverage {
        let window = window.max(1);
        MovingAverage {
            window,
            values: VecDeque::with_capacity(window),
        }
    }
}

impl Predictor for MovingAverage {
    fn observe(&mut self, value: f64) {
        if !usable(value) {
            return;
        }
        if self.values.len() == self.window {
            self.values.pop_front();
        }
        self.values.push_back(value);
    }

    fn predict(&self) -> Option<f64> {
        if self.values.is_empty() {
            return None;
        }
        // Mean of values that are each <= f64::MAX: divide first so the sum cannot overflow.
        let n = self.values.len() as f64;
        Some(sanitize(self.values.iter().map(|v| v / n).sum()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_repeats_the_last_usable_value() {
        let mut p = Constant::default();
        assert_eq!(p.predict(), None);
        p.observe(3.0);
        p.observe(f64::NAN);
        p.observe(-1.0);
        assert_eq!(p.predict(), Some(3.0));
    }

    #[test]
    fn moving_average_averages_the_window() {
        let mut p = MovingAverage::new(3);
        for v in [100.0, 1.0, 2.0, 3.0] {
            p.observe(v);
        }
        assert_eq!(p.predict(), Some(2.0));
        let mut huge = MovingAverage::new(2);
        huge.observe(f64::MAX);
        huge.observe(f64::MAX);
        assert_eq!(huge.predict(), Some(f64::MAX));
    }

    #[test]
    fn build_follows_the_config() {
        let mut p = build(&PredictorConfig::MovingAverage { window: 2 });
        p.observe(1.0);
        p.observe(3.0);
        assert_eq!(p.predict(), Some(2.0));
        let mut c = build(&PredictorConfig::Constant {});
        c.observe(7.0);
        assert_eq!(c.predict(), Some(7.0));
    }
}
