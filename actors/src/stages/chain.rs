//! The frontend's side of stages: the configured stages in order, each reached by an
//! `Addr<StageService>` (an actor in this process, or a stage process found through
//! discovery), asked about every request and, for those that filter, every output piece.
//!
//! A stage that fails (its actor panicked, its process is gone, it timed out) fails the
//! request with an error naming it; the next request reaches the restarted actor.

use super::api::{StageError, StageRequest};
use super::service::{StageCall, StageReply, StageService};
use crate::frontend::{DeltaStream, EngineError};
use futures::StreamExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use turbine_runtime::{Addr, CallError};

/// One configured stage, as the frontend reaches it.
pub struct StageLink {
    name: String,
    /// `None` while a remote stage's process has not joined (or has left).
    addr: RwLock<Option<Addr<StageService>>>,
}

impl StageLink {
    /// A stage reached at `addr` (`None`: a remote stage not joined yet).
    pub fn new(name: &str, addr: Option<Addr<StageService>>) -> StageLink {
        StageLink {
            name: name.to_string(),
            addr: RwLock::new(addr),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Points this stage at a (new) process, or at nothing.
    pub fn set(&self, addr: Option<Addr<StageService>>) {
        *self.addr.write().unwrap_or_else(|e| e.into_inner()) = addr;
    }

    /// Whether the stage can be reached now.
    pub fn is_joined(&self) -> bool {
        self.addr
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    fn addr(&self) -> Result<Addr<StageService>, StageError> {
        self.addr
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| {
                let mut e = StageError::new(
                    503,
                    format!(
                        "stage `{}` is not available: its process has not joined \
                         (start `turbine worker --role stage --stage {}`)",
                        self.name, self.name
                    ),
                )
                .with_code("stage_unavailable");
                e.retry_after_secs = Some(1);
                e
            })
    }
}

/// The stages every request passes, in the file's order.
pub struct StageChain {
    links: Vec<Arc<StageLink>>,
    next_flow: AtomicU64,
}

impl std::fmt::Debug for StageChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.links.iter().map(|l| l.name.as_str()))
            .finish()
    }
}

/// The stages that asked for one request's outputs, and the flow id their filters are
/// kept under.
#[derive(Clone)]
pub struct StageFlow {
    flow: u64,
    filters: Vec<(String, Addr<StageService>)>,
}

impl StageChain {
    /// A chain of `links` (empty: requests pass untouched, at no cost).
    pub fn new(links: Vec<Arc<StageLink>>) -> StageChain {
        // Flow ids only need to be unique among the streams open in one stage; starting from
        // the clock keeps two frontends (or a restarted one) sharing a stage process apart.
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        StageChain {
            links,
            next_flow: AtomicU64::new(start ^ (u64::from(std::process::id()) << 40)),
        }
    }

    /// No stages.
    pub fn empty() -> StageChain {
        StageChain::new(Vec::new())
    }

    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    pub fn links(&self) -> &[Arc<StageLink>] {
        &self.links
    }

    /// Passes `request` through every stage in order (each sees the previous one's
    /// rewrite); `streams` is the number of output streams (choices) it will have. A
    /// refusal, or a stage that fails, ends it with the error for the client.
    pub async fn admit(
        &self,
        mut request: StageRequest,
        streams: u32,
    ) -> Result<(StageRequest, StageFlow), StageError> {
        let flow = self.next_flow.fetch_add(1, Ordering::Relaxed);
        let mut filters = Vec::new();
        for link in &self.links {
            let addr = link.addr()?;
            let call = StageCall::Request {
                request,
                flow,
                streams,
            };
            match addr.call(call).await {
                Ok(StageReply::Continue {
                    request: next,
                    filters: wants,
                }) => {
                    request = next;
                    if wants {
                        filters.push((link.name.clone(), addr));
                    }
                }
                Ok(StageReply::Reject(e)) => {
                    tracing::debug!(stage = %link.name, status = e.status, "stage refused the request");
                    close_all(&filters, flow, streams);
                    return Err(e);
                }
                Ok(other) => {
                    close_all(&filters, flow, streams);
                    return Err(failed(&link.name, &format!("unexpected answer {other:?}")));
                }
                Err(e) => {
                    close_all(&filters, flow, streams);
                    tracing::warn!(stage = %link.name, "stage failed: {e}");
                    return Err(call_failed(&link.name, &e));
                }
            }
        }
        Ok((request, StageFlow { flow, filters }))
    }

    /// `deltas` of output stream `stream`, passed through the filters of `flow`'s stages in
    /// order. Dropping the result early closes their filters.
    pub fn filter(flow: &StageFlow, stream: u32, deltas: DeltaStream) -> DeltaStream {
        if flow.filters.is_empty() {
            return deltas;
        }
        let state = Filtering {
            open: vec![true; flow.filters.len()],
            flow: flow.clone(),
            stream,
        };
        futures::stream::unfold((deltas, state), |(mut deltas, mut state)| async move {
            if !state.open.iter().any(|o| *o) {
                return None;
            }
            let item = deltas.next().await?;
            let item = match item {
                Ok(mut delta) => {
                    let last = delta.finish.is_some();
                    match state.pass(std::mem::take(&mut delta.text), last).await {
                        Ok(text) => {
                            delta.text = text;
                            Ok(delta)
                        }
                        Err(e) => Err(e),
                    }
                }
                Err(e) => Err(e),
            };
            if item.is_err() {
                state.close();
            }
            Some((item, (deltas, state)))
        })
        .boxed()
    }
}

/// One stream's walk through its filters.
struct Filtering {
    flow: StageFlow,
    stream: u32,
    /// Per filter: whether its stream is still open in the stage.
    open: Vec<bool>,
}

impl Filtering {
    async fn pass(&mut self, mut text: String, last: bool) -> Result<String, EngineError> {
        for (i, (name, addr)) in self.flow.filters.iter().enumerate() {
            if text.is_empty() && !last {
                break;
            }
            let call = StageCall::Output {
                flow: self.flow.flow,
                stream: self.stream,
                text,
                last,
            };
            match addr.call(call).await {
                Ok(StageReply::Text(out)) => text = out,
                Ok(other) => {
                    return Err(EngineError::Internal(format!(
                        "stage `{name}` answered {other:?} to an output"
                    )))
                }
                Err(e) => {
                    self.open[i] = false;
                    tracing::warn!(stage = %name, "stage failed on the output: {e}");
                    return Err(EngineError::Internal(format!("stage `{name}` failed: {e}")));
                }
            }
            if last {
                self.open[i] = false;
            }
        }
        Ok(text)
    }

    fn close(&mut self) {
        for (i, (_, addr)) in self.flow.filters.iter().enumerate() {
            if std::mem::replace(&mut self.open[i], false) {
                addr.cast(StageCall::Close {
                    flow: self.flow.flow,
                    stream: self.stream,
                });
            }
        }
    }
}

impl Drop for Filtering {
    fn drop(&mut self) {
        self.close();
    }
}

fn close_all(filters: &[(String, Addr<StageService>)], flow: u64, streams: u32) {
    for (_, addr) in filters {
        for stream in 0..streams {
            addr.cast(StageCall::Close { flow, stream });
        }
    }
}

fn failed(stage: &str, why: &str) -> StageError {
    StageError::new(500, format!("stage `{stage}` failed: {why}")).with_code("stage_failed")
}

/// A stage that could not answer: a 500 naming it when it broke (panicked, errored), a 503
/// when it is unreachable, a 504 when it was too slow.
fn call_failed(stage: &str, e: &CallError) -> StageError {
    match e {
        CallError::Timeout(_) => {
            StageError::new(504, format!("stage `{stage}` did not answer: {e}"))
                .with_code("stage_timeout")
        }
        CallError::PeerGone(_) | CallError::Transport(_) | CallError::UnknownActor(_) => {
            let mut err = StageError::new(503, format!("stage `{stage}` is unavailable: {e}"))
                .with_code("stage_unavailable");
            err.retry_after_secs = Some(1);
            err
        }
        _ => failed(stage, &e.to_string()),
    }
}
