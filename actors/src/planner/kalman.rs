//! A Kalman filter with a local linear trend: the load's state is a level and a trend (the
//! level's change per interval); each interval the level moves by the trend, both drift by
//! process noise, and the observation is the level plus measurement noise.
//!
//! ```text
//! x = [level, trend]     x' = F x,  F = [[1, 1], [0, 1]]     P' = F P Fᵀ + q I
//! z = level + noise(r)   K = P' Hᵀ / (H P' Hᵀ + r),  H = [1, 0]
//!                        x = x' + K (z − level'),   P = (I − K H) P'
//! forecast of the next interval = level + trend
//! ```
//!
//! Why a trend: a constant-level filter lags a ramp forever; with a trend state the
//! steady-state error on a linear ramp is zero, which is what lets the planner add workers
//! *before* a rising load misses its targets. Only the ratio `q / r` shapes the steady-state
//! gain (large: follow the data; small: smooth it), so one setting serves series of
//! different scales (request counts and token lengths). The first observation starts the
//! level with a diffuse (huge) covariance, so the first few samples set level and trend
//! instead of the prior.
//!
//! With `log1p` the filter runs on ln(1 + x): noise becomes relative and the forecast
//! expm1(·) is never negative. Values that are not finite or are negative are dropped; if
//! the state ever stops being finite (an absurd outlier) the filter restarts from the next
//! value, so forecasts stay finite.

use super::predictor::{sanitize, usable, Predictor};

/// Prior variance multiplier at the first observation ("don't know yet").
const DIFFUSE: f64 = 1e6;

#[derive(Clone, Debug)]
pub struct LocalLinearTrend {
    q: f64,
    r: f64,
    log1p: bool,
    state: Option<State>,
}

#[derive(Clone, Copy, Debug)]
struct State {
    level: f64,
    trend: f64,
    /// Covariance [[p00, p01], [p01, p11]] (kept symmetric).
    p00: f64,
    p01: f64,
    p11: f64,
}

impl State {
    /// Level `z`, no trend, and a prior so wide that the next samples decide.
    fn diffuse(z: f64, r: f64) -> State {
        State {
            level: z,
            trend: 0.0,
            p00: DIFFUSE * r,
            p01: 0.0,
            p11: DIFFUSE * r,
        }
    }

    fn is_finite(&self) -> bool {
        [self.level, self.trend, self.p00, self.p01, self.p11]
            .iter()
            .all(|v| v.is_finite())
    }
}

impl LocalLinearTrend {
    /// `process_noise` q and `measurement_noise` r are variances (in the filtered space:
    /// ln(1 + x) when `log1p`). Non-positive or non-finite values are replaced by 1.0
    /// (config validation rejects them before they get here).
    pub fn new(process_noise: f64, measurement_noise: f64, log1p: bool) -> LocalLinearTrend {
        let positive = |v: f64| if v.is_finite() && v > 0.0 { v } else { 1.0 };
        LocalLinearTrend {
            q: positive(process_noise),
            r: positive(measurement_noise),
            log1p,
            state: None,
        }
    }

    fn filtered(&self, v: f64) -> f64 {
        if self.log1p {
            v.ln_1p()
        } else {
            v
        }
    }

    fn unfiltered(&self, v: f64) -> f64 {
        if self.log1p {
            // exp overflows past ~709.8: cap there; sanitize turns ∞ into f64::MAX anyway.
            v.min(709.0).exp_m1()
        } else {
            v
        }
    }

    /// The filtered (level, trend), in the filtered space; for tests and diagnostics.
    pub fn level_and_trend(&self) -> Option<(f64, f64)> {
        self.state.map(|s| (s.level, s.trend))
    }
}

impl Predictor for LocalLinearTrend {
    fn observe(&mut self, value: f64) {
        if !usable(value) {
            return;
        }
        let z = self.filtered(value);
        let (q, r) = (self.q, self.r);
        let Some(s) = self.state else {
            self.state = Some(State::diffuse(z, r));
            return;
        };
        // Predict one interval ahead.
        let level = s.level + s.trend;
        let trend = s.trend;
        let p00 = s.p00 + 2.0 * s.p01 + s.p11 + q;
        let p01 = s.p01 + s.p11;
        let p11 = s.p11 + q;
        // Update with the observation.
        let innovation = z - level;
        let var = p00 + r;
        let (k0, k1) = (p00 / var, p01 / var);
        let next = State {
            level: level + k0 * innovation,
            trend: trend + k1 * innovation,
            p00: (1.0 - k0) * p00,
            p01: (1.0 - k0) * p01,
            p11: p11 - k1 * p01,
        };
        // An absurd outlier that overflowed the state: start again from this value.
        self.state = Some(if next.is_finite() {
            next
        } else {
            State::diffuse(z, r)
        });
    }

    fn predict(&self) -> Option<f64> {
        let s = self.state?;
        Some(sanitize(self.unfiltered(s.level + s.trend)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(p: &mut LocalLinearTrend, values: impl IntoIterator<Item = f64>) -> Vec<f64> {
        values
            .into_iter()
            .map(|v| {
                p.observe(v);
                p.predict().unwrap()
            })
            .collect()
    }

    #[test]
    fn tracks_a_linear_ramp_within_half_a_percent_after_ten_intervals() {
        // Load grows by 7 requests per interval from 50; the forecast after observing
        // interval t is for interval t + 1.
        let mut p = LocalLinearTrend::new(1.0, 4.0, false);
        let ramp = |t: usize| 50.0 + 7.0 * t as f64;
        let forecasts = run(&mut p, (0..40).map(ramp));
        for (t, f) in forecasts.iter().enumerate().skip(10) {
            let truth = ramp(t + 1);
            assert!((f - truth).abs() <= 0.005 * truth, "t={t}: {f} vs {truth}");
        }
        let (_, trend) = p.level_and_trend().unwrap();
        assert!((trend - 7.0).abs() < 0.01, "trend {trend}");
    }

    #[test]
    fn a_constant_predictor_lags_the_same_ramp() {
        // The reason for the trend state: "last value" is always one step behind.
        let mut c = super::super::predictor::Constant::default();
        c.observe(50.0 + 7.0 * 20.0);
        let lag = 50.0 + 7.0 * 21.0 - c.predict().unwrap();
        assert_eq!(lag, 7.0);
    }

    #[test]
    fn converges_within_two_percent_eight_intervals_after_a_step() {
        let mut p = LocalLinearTrend::new(1.0, 4.0, false);
        run(&mut p, std::iter::repeat_n(100.0, 20));
        let after = run(&mut p, std::iter::repeat_n(300.0, 30));
        for f in &after[8..] {
            assert!((f - 300.0).abs() <= 0.02 * 300.0, "{after:?}");
        }
        assert!((after[29] - 300.0).abs() < 0.01, "{after:?}");
    }

    #[test]
    fn log1p_tracks_an_exponential_ramp() {
        // A load that grows 10 % per interval is a linear ramp in log space.
        let mut p = LocalLinearTrend::new(0.01, 0.04, true);
        let grow = |t: usize| 10.0 * 1.1f64.powi(t as i32) - 1.0;
        let forecasts = run(&mut p, (0..40).map(grow));
        for (t, f) in forecasts.iter().enumerate().skip(15) {
            let truth = grow(t + 1);
            assert!((f - truth).abs() <= 0.01 * truth, "t={t}: {f} vs {truth}");
        }
    }

    #[test]
    fn zeros_give_a_zero_forecast_never_a_negative_one() {
        for log1p in [false, true] {
            let mut p = LocalLinearTrend::new(1.0, 4.0, log1p);
            // A falling ramp into zero would extrapolate below zero without the clamp.
            let f = run(&mut p, [30.0, 20.0, 10.0, 0.0, 0.0, 0.0]);
            assert!(f.iter().all(|v| v.is_finite() && *v >= 0.0), "{f:?}");
            let f = run(&mut p, std::iter::repeat_n(0.0, 50));
            assert!(f[49].abs() < 1e-6, "{f:?}");
        }
    }

    #[test]
    fn bad_values_are_dropped_and_absurd_outliers_stay_finite() {
        let mut p = LocalLinearTrend::new(1.0, 4.0, false);
        assert_eq!(p.predict(), None);
        run(&mut p, std::iter::repeat_n(10.0, 10));
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -5.0] {
            p.observe(bad);
        }
        assert!((p.predict().unwrap() - 10.0).abs() < 1e-6);
        // One interval of f64::MAX: every forecast stays finite (and not negative).
        let mut absurd = p.clone();
        absurd.observe(f64::MAX);
        let f = run(&mut absurd, std::iter::repeat_n(10.0, 50));
        assert!(f.iter().all(|v| v.is_finite() && *v >= 0.0), "{f:?}");
        // A realistic spike (100 × the level for one interval) moves the forecast by the
        // filter's gain and decays: back within 5 % of the level after 15 intervals.
        p.observe(1000.0);
        let f = run(&mut p, std::iter::repeat_n(10.0, 15));
        assert!(f.iter().all(|v| v.is_finite()), "{f:?}");
        assert!((f[14] - 10.0).abs() <= 0.5, "{f:?}");
    }

    proptest! {
        /// Whatever the series (zeros, huge values, garbage) and the noise settings, a
        /// forecast exists after the first usable value and is finite and non-negative.
        #[test]
        fn forecasts_are_always_finite_and_non_negative(
            values in prop::collection::vec(
                prop_oneof![
                    Just(0.0),
                    0.0..1e4f64,
                    1e4..1e300f64,
                    Just(f64::MAX),
                    Just(f64::NAN),
                    Just(-1.0),
                ],
                1..60,
            ),
            q in 1e-6..1e6f64,
            r in 1e-6..1e6f64,
            log1p in any::<bool>(),
        ) {
            let mut p = LocalLinearTrend::new(q, r, log1p);
            let mut seen_usable = false;
            for v in values {
                p.observe(v);
                seen_usable |= usable(v);
                match p.predict() {
                    Some(f) => prop_assert!(f.is_finite() && f >= 0.0, "{f}"),
                    None => prop_assert!(!seen_usable),
                }
            }
        }

        /// On any noiseless ramp the forecast error shrinks below 1 % of the value.
        #[test]
        fn any_ramp_is_tracked(start in 0.0..1e4f64, slope in -50.0..500.0f64) {
            let mut p = LocalLinearTrend::new(1.0, 4.0, false);
            let ramp = |t: usize| (start + slope * t as f64).max(0.0);
            // Stop before a falling ramp reaches zero (where it bends).
            let n = 60;
            prop_assume!(start + slope * (n as f64 + 1.0) > 0.0);
            let f = run(&mut p, (0..n).map(ramp));
            let truth = ramp(n);
            prop_assert!((f[n - 1] - truth).abs() <= 0.01 * truth.max(1.0), "{} vs {truth}", f[n - 1]);
        }
    }
}
