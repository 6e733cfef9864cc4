//! The endpoint picker's decision: the OpenAI request parsed as the frontend parses it
//! (`frontend::validate`), tokenized with the served model's template and tokenizer
//! (`preprocessor::codec`), hashed into KV blocks, and scored by the same router core the
//! frontend asks ([`RouterCore::pick`], fed by the workers' KV events and load reports
//! through membership). The chosen worker's gateway endpoint is the destination; turbine's
//! routing hints name the worker, the prefill worker and the mode.

use super::exchange::{Pick, PickInput, Picked};
use crate::frontend::images::ImageLimits;
use crate::frontend::validate::{chat_request, completion_request};
use crate::frontend::ApiError;
use crate::ids::RequestId;
use crate::kv::hash_blocks;
use crate::preprocessor::codec::ModelCodec;
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

    /// The prompt's token ids, for the OpenAI endpoints turbine serves; a request without a
    /// body (or for another path) has none and is placed by load alone.
    fn tokens(&self, path: &str, body: Option<&[u8]>) -> Result<Vec<u32>, ApiError> {
        let Some(body) = body else {
            return Ok(Vec::new());
        };
        let path = path.split('?').next().unwrap_or(path);
        let (req, param) = match path {
            "/v1/chat/completions" => (
                chat_request(body, &self.model_id, &ImageLimits::default())?,
                "messages",
            ),
            "/v1/completions" => (completion_request(body, &self.model_id)?, "prompt"),
            _ => return Ok(Vec::new()),
        };
        self.codec
            .prompt_ids(&req.request.prompt)
            .map_err(|e| ApiError::from_engine(e, param))
    }
}

impl Pick for Picker {
    fn pick(&self, input: &PickInput<'_>) -> Result<Picked, ApiError> {
        let tokens = self.tokens(input.path, input.body)?;
        let request = RouteRequest {
            id: RequestId(self.next_id.fetch_add(1, Ordering::Relaxed)),
            hashes: hash_blocks(&tokens, self.core.block_size(), 0),
            token_count: tokens.len(),
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
