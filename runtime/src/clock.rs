//! Time source for every timer in the runtime.
//!
//! Nothing in this crate calls `tokio::time` directly: timeouts, lease expiry, heartbeats and
//! restart windows all go through a [`Clock`], so the simulator can run the same code on
//! [`ManualClock`] (time moves only when told) or on [`TokioClock`] under
//! `tokio::time::pause()` (time jumps to the next timer when every task is idle).

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

/// A boxed sleep future, returned by [`Clock::sleep`].
pub type Sleep = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// A source of "now" and of sleeps. Cheap to share as `Arc<dyn Clock>`.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// The current instant on this clock.
    fn now(&self) -> Instant;
    /// A future that completes once `duration` has elapsed on this clock.
    fn sleep(&self, duration: Duration) -> Sleep;
}

/// A shared clock handle.
pub type SharedClock = Arc<dyn Clock>;

/// Real time through `tokio::time` (also simulated time when the tokio runtime is paused).
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioClock;

impl TokioClock {
    /// A shared handle to the tokio clock.
    pub fn shared() -> SharedClock {
        Arc::new(TokioClock)
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn sleep(&self, duration: Duration) -> Sleep {
        Box::pin(tokio::time::sleep(duration))
    }
}

/// A clock that moves only when [`ManualClock::advance`] is called: fully deterministic tests.
#[derive(Clone)]
pub struct ManualClock {
    inner: Arc<Mutex<ManualInner>>,
}

struct ManualInner {
    origin: Instant,
    elapsed: Duration,
    next_id: u64,
    /// Sleepers keyed by (deadline, registration order) so wake order is deterministic.
    sleepers: BTreeMap<(Duration, u64), oneshot::Sender<()>>,
}

impl fmt::Debug for ManualClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ManualClock")
            .field("elapsed", &self.elapsed())
            .finish()
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl ManualClock {
    /// A clock standing at its origin (elapsed zero).
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Mutex::new(ManualInner {
                origin: Instant::now(),
                elapsed: Duration::ZERO,
                next_id: 0,
                sleepers: BTreeMap::new(),
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ManualInner> {
        // A poisoned lock only means another thread panicked mid-update of plain data.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Time elapsed since the clock's origin.
    pub fn elapsed(&self) -> Duration {
        self.lock().elapsed
    }

    /// Moves time forward and wakes every sleeper whose deadline has been reached.
    pub fn advance(&self, by: Duration) {
        let due = {
            let mut inner = self.lock();
            inner.elapsed += by;
            let first_not_due = (inner.elapsed + Duration::from_nanos(1), 0);
            let later = inner.sleepers.split_off(&first_not_due);
            std::mem::replace(&mut inner.sleepers, later)
        };
        for (_, waker) in due {
            let _ = waker.send(());
        }
    }

    /// A shared handle to this clock.
    pub fn shared(&self) -> SharedClock {
        Arc::new(self.clone())
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        let inner = self.lock();
        inner.origin + inner.elapsed
    }

    fn sleep(&self, duration: Duration) -> Sleep {
        let (tx, rx) = oneshot::channel();
        {
            let mut inner = self.lock();
            if duration.is_zero() {
                drop(inner);
                return Box::pin(async {});
            }
            let deadline = inner.elapsed + duration;
            let id = inner.next_id;
            inner.next_id += 1;
            inner.sleepers.insert((deadline, id), tx);
        }
        Box::pin(async move {
            // If the clock is dropped the sleeper never wakes, like time that never moves.
            if rx.await.is_err() {
                std::future::pending::<()>().await;
            }
        })
    }
}

/// Error of [`timeout`]: the deadline passed first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("deadline elapsed")]
pub struct Elapsed;

/// Runs `fut` until it completes or `duration` elapses on `clock`.
pub async fn timeout<F: Future>(
    clock: &dyn Clock,
    duration: Duration,
    fut: F,
) -> Result<F::Output, Elapsed> {
    let sleep = clock.sleep(duration);
    tokio::select! {
        biased;
        out = fut => Ok(out),
        _ = sleep => Err(Elapsed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn manual_clock_wakes_sleepers_only_when_advanced_past_deadline() {
        let clock = ManualClock::new();
        let mut sleep = clock.sleep(Duration::from_secs(2));
        clock.advance(Duration::from_secs(1));
        assert!(futures::poll!(&mut sleep).is_pending());
        clock.advance(Duration::from_secs(1));
        assert!(futures::poll!(&mut sleep).is_ready());
        assert_eq!(clock.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test]
    async fn timeout_on_manual_clock_fires_after_advance() {
        let clock = ManualClock::new();
        let c2 = clock.clone();
        let task = tokio::spawn(async move {
            timeout(&c2, Duration::from_secs(5), std::future::pending::<()>()).await
        });
        tokio::task::yield_now().await;
        clock.advance(Duration::from_secs(5));
        assert_eq!(task.await.unwrap(), Err(Elapsed));
    }
}
