//! A stage as a runtime service: the messages the frontend sends a stage's actor, and the
//! handler that turns them into calls on the user's [`Stage`] and its [`StreamFilter`]s.
//!
//! One actor per stage (served as `stage.NAME` on a node: the frontend's, or a stage
//! process's), supervised: a panic in the user's code restarts it from its factory. Open
//! filters live in the actor, keyed by the frontend's flow id and the choice, so a stage
//! author never keys anything by request.

use super::api::{Stage, StageError, StageRequest, StreamFilter};
use super::registry::StageFactory;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use turbine_runtime::{Handler, HandlerError, RequestCtx, Service};

/// The protocol of a stage's actor.
pub struct StageService;

impl Service for StageService {
    type Req = StageCall;
    type Resp = StageReply;
}

/// The service name a stage called `name` is served under.
pub fn stage_service_name(name: &str) -> String {
    format!("stage.{name}")
}

/// The discovery component stage processes register under (metadata `stage`: its name).
pub const STAGE_COMPONENT: &str = "stage";
/// The metadata key of a stage process's registration holding the stage's name.
pub const META_STAGE: &str = "stage";

/// A message to a stage's actor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum StageCall {
    /// A new request: run `on_request`; if accepted, open a filter for each of its
    /// `streams` output streams (choices) under `flow`.
    Request {
        request: StageRequest,
        flow: u64,
        streams: u32,
    },
    /// A piece of output of stream `stream` of `flow`; `last` ends it.
    Output {
        flow: u64,
        stream: u32,
        text: String,
        last: bool,
    },
    /// Stream `stream` of `flow` ended early (the client left, or it failed).
    Close { flow: u64, stream: u32 },
}

/// A stage actor's answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum StageReply {
    /// Go on with this (possibly rewritten) request; `filters`: whether this stage wants
    /// its outputs.
    Continue {
        request: StageRequest,
        filters: bool,
    },
    /// Refused: send this to the client.
    Reject(StageError),
    /// The output piece to pass on.
    Text(String),
    /// Acknowledges a `Close`.
    Closed,
}

/// At most this many streams stay open in one stage's actor; beyond it the oldest are
/// dropped (a frontend that died cannot leak a stage's memory).
const MAX_OPEN_STREAMS: usize = 65_536;

/// The server side: the user's stage and the filters of the streams it opened.
pub struct StageHandler {
    name: String,
    stage: Result<Box<dyn Stage>, String>,
    filters: BTreeMap<(u64, u32), Box<dyn StreamFilter>>,
}

impl StageHandler {
    /// A handler around a fresh stage from `factory` (a factory that fails, which a start-up
    /// check has ruled out once, makes a handler that refuses every request with a 500).
    pub fn new(name: &str, factory: &StageFactory, config: &serde_yaml::Value) -> StageHandler {
        StageHandler {
            name: name.to_string(),
            stage: factory(config),
            filters: BTreeMap::new(),
        }
    }
}

#[async_trait]
impl Handler<StageService> for StageHandler {
    async fn call(
        &mut self,
        req: StageCall,
        _ctx: &RequestCtx,
    ) -> Result<StageReply, HandlerError> {
        match req {
            StageCall::Request {
                mut request,
                flow,
                streams,
            } => {
                let stage = match &mut self.stage {
                    Ok(stage) => stage,
                    Err(why) => {
                        return Ok(StageReply::Reject(StageError::new(
                            500,
                            format!("stage `{}` could not be built: {why}", self.name),
                        )))
                    }
                };
                if let Err(e) = stage.on_request(&mut request).await {
                    return Ok(StageReply::Reject(e));
                }
                let mut filters = false;
                for stream in 0..streams {
                    if let Some(f) = stage.on_stream(&request) {
                        filters = true;
                        self.filters.insert((flow, stream), f);
                    }
                }
                while self.filters.len() > MAX_OPEN_STREAMS {
                    self.filters.pop_first();
                }
                Ok(StageReply::Continue { request, filters })
            }
            StageCall::Output {
                flow,
                stream,
                text,
                last,
            } => {
                let Some(filter) = self.filters.get_mut(&(flow, stream)) else {
                    return Err(HandlerError::new(format!(
                        "stage `{}` has no open stream {flow}/{stream} (restarted?)",
                        self.name
                    )));
                };
                let mut out = filter.on_text(&text);
                if last {
                    out.push_str(&filter.on_end());
                    self.filters.remove(&(flow, stream));
                }
                Ok(StageReply::Text(out))
            }
            StageCall::Close { flow, stream } => {
                self.filters.remove(&(flow, stream));
                Ok(StageReply::Closed)
            }
        }
    }
}
