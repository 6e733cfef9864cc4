//! The endpoint picker's decision: the OpenAI request parsed as the frontend parses it
//! (`frontend::validate`), its prompt made as the frontend makes it (`pipeline::prompt_of`:
//! template, tools, images), hashed into KV blocks salted by its images' content as the
//! workers hash them, and scored by the same router core the
//! frontend asks ([`RouterCore::pick`], fed by the workers' KV events and load reports
//! through membership). The chosen worker's gateway endpoint is the destination; turbine's
//! routing hints name the worker, the prefill worker and the mode.

use super::exchange::{Pick, PickInput, Picked};
use crate::frontend::images::ImageLimits;
use crate::frontend::pipeline::prompt_of;
use crate::frontend::validate::{chat_request, completion_request};
use crate::frontend::ApiError;
use crate::frontend::Prompt;
use crate::ids::RequestId;
use crate::kv::BlockHash;
use crate::preprocessor::codec::ModelCodec;
use crate::protocol::image_salts;
use crate::router::endpoints::WorkerEndpoints;
use crate::router::hints::{HintMode, RoutingHints};
use crate::router::policy::{RouteError, RouteRequest};
use crate::router::service::RouterCore;
use axum::http::StatusCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// What [`Picker`] needs: the router's state and the model's text side.
pub struct Picker {
    core: Arc<RouterCore>,
    endpoints: Arc<WorkerEndpoints>,
    codec: Arc<ModelCodec>,
    model_id: String,
    next_id: AtomicU64,
}

impl Picker {
    pub fn new(
        core: Arc<RouterCore>,
        endpoints: Arc<WorkerEndpoints>,
        codec: Arc<ModelCodec>,
        model_id: String,
    ) -> Picker {
        Picker {
            core,
            endpoints,
            codec,
            model_id,
            next_id: AtomicU64::new(1),
        }
    }

    /// The prompt's block hashes and token count, for the OpenAI endpoints turbine serves:
    /// the frontend's prompt (`pipeline::prompt_of`: template, tools, images) hashed with
    /// its images' content salting the blocks from each image on, as the dispatcher and the
    /// workers hash it. A request without a body (or for another path), or with an image
    /// named by URL (the picker fetches nothing: its content is unknown here), is placed by
    /// load alone.
    fn hashes(&self, path: &str, body: Option<&[u8]>) -> Result<(Vec<BlockHash>, usize), ApiError> {
        let none = Ok((Vec::new(), 0));
        let Some(body) = body else {
            return none;
        };
        let path = path.split('?').next().unwrap_or(path);
        let (req, param) = match path {
            "/v1/chat/completions" => (
                chat_request(body, &self.model_id, &ImageLimits::default())?,
                "messages",
            ),
            "/v1/completions" => (completion_request(body, &self.model_id)?, "prompt"),
            _ => return none,
        };
        if let Prompt::Chat(messages) = &req.request.prompt {
            if messages.iter().any(|m| m.remote_images().next().is_some()) {
                return none;
            }
        }
        let (tokens, images) =
            prompt_of(&self.codec, &req.request).map_err(|e| ApiError::from_engine(e, param))?;
        let hashes = image_salts(&images).hash_blocks(&tokens, self.core.block_size(), 0);
        Ok((hashes, tokens.len()))
    }
}

impl Pick for Picker {
    fn pick(&self, input: &PickInput<'_>) -> Result<Picked, ApiError> {
        let (hashes, token_count) = self.hashes(input.path, input.body)?;
        let request = RouteRequest {
            id: RequestId(self.next_id.fetch_add(1, Ordering::Relaxed)),
            hashes,
            token_count,
            avoid: Vec::new(),
            overrides: Default::default(),
        };
        let eligible = |w| match self.endpoints.endpoint(w) {
            Some(ep) => input.subset.is_none_or(|s| s.contains(&ep)),
            None => false,
        };
        let route = self.core.pick(&request, &eligible).map_err(|e| match e {
            RouteError::NoWorkers => ApiError::server(
                StatusCode::SERVICE_UNAVAILABLE,
                match input.subset {
                    Some(s) => format!("no eligible endpoint among the {} offered", s.len()),
                    None => "no endpoint is eligible: no worker has joined".to_string(),
                },
            )
            .with_code("no_eligible_endpoint"),
            RouteError::AllBusy { .. } => ApiError::server(
                StatusCode::SERVICE_UNAVAILABLE,
                "every eligible endpoint is busy (router.busy_threshold)",
            )
            .with_code("all_endpoints_busy"),
        })?;
        let endpoint = self
            .endpoints
            .endpoint(route.decode.worker)
            .ok_or_else(|| {
                ApiError::server(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the chosen worker has just left",
                )
            })?;
        let prefill = route
            .prefill
            .worker
            .filter(|_| route.prefill.decision.is_remote())
            .map(|d| d.worker);
        Ok(Picked {
            endpoint,
            hints: RoutingHints {
                worker: Some(route.decode.worker),
                prefill_worker: prefill,
                mode: Some(if prefill.is_some() {
                    HintMode::Disaggregated
                } else {
                    HintMode::Aggregated
                }),
                ..RoutingHints::default()
            },
        })
    }
}
