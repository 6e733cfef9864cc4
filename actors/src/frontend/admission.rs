//! Overload control at the door: how many generations run at once, how many wait, and how
//! long any of them may take.
//!
//! WHY at the frontend: every admitted request holds memory all the way down (its body, its
//! token ids, a worker's KV blocks), so an unbounded queue turns a traffic burst into
//! unbounded memory and unbounded latency. Beyond `max_concurrent_requests` running and
//! `max_queued_requests` waiting, a request is refused at once with 429 and `Retry-After`,
//! which clients (the official `openai` SDK among them) back off and retry on. A request that
//! was admitted always gets its full answer (or a deadline error it asked for).

use super::engine::EngineError;
use super::error::ApiError;
use axum::http::HeaderMap;
use prometheus_client::metrics::gauge::Gauge;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// The header a client sets to bound one request: whole milliseconds from arrival to the
/// last byte of the answer.
pub const TIMEOUT_HEADER: &str = "x-request-timeout-ms";

/// Seconds a refused client is told to wait (`Retry-After`). One second is about the time a
/// CPU worker needs to finish a short generation and free a slot.
pub const RETRY_AFTER_SECS: u32 = 1;

/// The admission limits of one frontend.
pub struct Admission {
    /// `None`: no limit on concurrent generations.
    running: Option<Arc<Semaphore>>,
    max_running: usize,
    max_queued: usize,
    queued: AtomicUsize,
    /// `queued` as a metric (requests waiting now, refused ones not counted).
    waiting: Gauge,
}

/// A slot held for one generation until the end of its response body.
pub struct Admitted {
    _permit: Option<OwnedSemaphorePermit>,
}

impl Admission {
    /// `max_running == 0` admits everything (no queue either). `waiting` shows the queue.
    pub fn new(max_running: usize, max_queued: usize, waiting: Gauge) -> Admission {
        Admission {
            running: (max_running > 0).then(|| Arc::new(Semaphore::new(max_running))),
            max_running,
            max_queued,
            queued: AtomicUsize::new(0),
            waiting,
        }
    }

    /// Takes a slot now, or waits for one in the bounded queue until `deadline`. Refuses
    /// with 429 when the queue is full and with the deadline error when it passes first.
    pub async fn admit(&self, deadline: Option<Deadline>) -> Result<Admitted, ApiError> {
        let Some(running) = &self.running else {
            return Ok(Admitted { _permit: None });
        };
        if let Ok(permit) = running.clone().try_acquire_owned() {
            return Ok(Admitted {
                _permit: Some(permit),
            });
        }
        // Count ourselves in the queue first, so two racing requests cannot both take the
        // last queue place.
        let position = self.queued.fetch_add(1, Ordering::AcqRel);
        let _leave = LeaveQueue(&self.queued);
        if position >= self.max_queued {
            return Err(self.full());
        }
        self.waiting.inc();
        let _counted = Waiting(&self.waiting);
        let acquire = running.clone().acquire_owned();
        let permit = match deadline {
            Some(d) => tokio::time::timeout_at(d.at, acquire)
                .await
                .map_err(|_| ApiError::from_engine(d.exceeded(), ""))?,
            None => acquire.await,
        };
        // The semaphore is never closed, so acquiring cannot fail; treat it as overload anyway.
        let permit = permit.map_err(|_| self.full())?;
        Ok(Admitted {
            _permit: Some(permit),
        })
    }

    /// Requests waiting for a slot now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire).min(self.max_queued)
    }

    fn full(&self) -> ApiError {
        ApiError::rate_limited(format!(
            "the server is at capacity ({} requests running, {} queued); retry later",
            self.max_running, self.max_queued
        ))
    }
}

struct Waiting<'a>(&'a Gauge);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

struct LeaveQueue<'a>(&'a AtomicUsize);

impl Drop for LeaveQueue<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// When a request must be answered by: its arrival plus the shorter of the configured
/// default and the client's `x-request-timeout-ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadline {
    pub at: Instant,
    pub timeout: Duration,
}

impl Deadline {
    /// The request's deadline, or `None` when neither the config nor the client set one.
    /// A header that is not a positive whole number of milliseconds is a 400 naming it.
    pub fn for_request(
        arrived: Instant,
        configured: Option<Duration>,
        headers: &HeaderMap,
    ) -> Result<Option<Deadline>, ApiError> {
        let asked = match headers.get(TIMEOUT_HEADER) {
            None => None,
            Some(value) => {
                let ms = value
                    .to_str()
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .filter(|&ms| ms > 0)
                    .ok_or_else(|| {
                        ApiError::invalid(
                            None,
                            format!(
                                "header {TIMEOUT_HEADER} must be a positive whole number of \
                                 milliseconds"
                            ),
                        )
                    })?;
                Some(Duration::from_millis(ms))
            }
        };
        let timeout = match (configured, asked) {
            (Some(c), Some(a)) => c.min(a),
            (c, a) => match c.or(a) {
                Some(t) => t,
                None => return Ok(None),
            },
        };
        Ok(Some(Deadline {
            at: arrived + timeout,
            timeout,
        }))
    }

    /// The error of a request that ran out of time.
    pub fn exceeded(&self) -> EngineError {
        EngineError::DeadlineExceeded {
            timeout_ms: u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    #[tokio::test]
    async fn full_queue_refuses_with_429_and_a_freed_slot_admits_the_waiter() {
        let admission = Arc::new(Admission::new(1, 1, Gauge::default()));
        let first = admission.admit(None).await.unwrap();
        let waiter = {
            let admission = admission.clone();
            tokio::spawn(async move { admission.admit(None).await.map(|_| ()) })
        };
        while admission.queued() == 0 {
            tokio::task::yield_now().await;
        }
        let refused = admission.admit(None).await.err().unwrap();
        assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(refused.retry_after, Some(RETRY_AFTER_SECS));
        drop(first);
        waiter.await.unwrap().unwrap();
        assert_eq!(admission.queued(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_queued_request_gives_up_at_its_deadline() {
        let admission = Admission::new(1, 4, Gauge::default());
        let _held = admission.admit(None).await.unwrap();
        let deadline = Deadline {
            at: Instant::now() + Duration::from_millis(50),
            timeout: Duration::from_millis(50),
        };
        let err = admission.admit(Some(deadline)).await.err().unwrap();
        assert_eq!(err.status, StatusCode::GATEWAY_TIMEOUT);
        assert!(err.message.contains("50 ms"), "{}", err.message);
        assert_eq!(admission.queued(), 0);
    }

    #[test]
    fn the_shorter_timeout_wins_and_a_bad_header_is_a_400() {
        let now = Instant::now();
        let mut headers = HeaderMap::new();
        assert_eq!(Deadline::for_request(now, None, &headers).unwrap(), None);
        let configured = Some(Duration::from_secs(10));
        headers.insert(TIMEOUT_HEADER, "250".parse().unwrap());
        let d = Deadline::for_request(now, configured, &headers)
            .unwrap()
            .unwrap();
        assert_eq!(d.timeout, Duration::from_millis(250));
        headers.insert(TIMEOUT_HEADER, "99999999".parse().unwrap());
        let d = Deadline::for_request(now, configured, &headers)
            .unwrap()
            .unwrap();
        assert_eq!(d.timeout, Duration::from_secs(10));
        for bad in ["0", "-5", "soon", "1.5"] {
            headers.insert(TIMEOUT_HEADER, bad.parse().unwrap());
            let err = Deadline::for_request(now, configured, &headers).unwrap_err();
            assert_eq!(err.status, StatusCode::BAD_REQUEST, "{bad}");
            assert!(err.message.contains(TIMEOUT_HEADER));
        }
    }
}
