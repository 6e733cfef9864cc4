//! The request path behind the HTTP frontend: preprocess (template + tokenize), route
//! (KV-aware), run on a worker, and stream text back (incremental detokenization).
//!
//! This is the [`ChatEngine`] the frontend calls: text in and out around the
//! [`Dispatcher`], which routes token ids to workers reached through location-transparent
//! `Addr<WorkerService>`s (local, or in another process), after asking the router (an
//! `Addr<RouterService>`, likewise) which one.

use crate::frontend::{
    ChatEngine, Delta, DeltaStream, EngineError, GenerateRequest, Prompt, Usage,
};
use crate::preprocessor::codec::ModelCodec;
use crate::protocol::{FinishReason, PromptImage, StopConditions, TokenLogprob, TokenOutput};
use crate::router::dispatch::{DispatchRequest, Dispatcher};
use crate::router::migrating::MigratingStream;
use async_trait::async_trait;
use futures::StreamExt;
use std::sync::Arc;
use turbine_kernels::tokenizer::IncrementalDecoder;

/// The token ids a request is generated from and the prompt's images (placeholders,
/// content hashes): chat messages through the template with the request's tools, other
/// prompts as they are. The one place this is decided, so what the endpoint picker hashes
/// (`epp::picker`) is what the frontend routes and the worker caches.
pub fn prompt_of(
    codec: &ModelCodec,
    req: &GenerateRequest,
) -> Result<(Vec<u32>, Vec<PromptImage>), EngineError> {
    match (&req.prompt, &req.tools) {
        // `tool_choice: "none"` leaves the tools out of the prompt too (vLLM does the same).
        (Prompt::Chat(messages), Some(tools)) if tools.parses() => {
            codec.chat_prompt(messages, &tools.template_tools())
        }
        (Prompt::Chat(messages), _) => codec.chat_prompt(messages, &[]),
        (prompt, _) => Ok((codec.prompt_ids(prompt)?, Vec::new())),
    }
}

/// Everything a request needs on its way through the graph, shared by all requests.
pub struct Pipeline {
    model_id: String,
    context_length: usize,
    codec: Arc<ModelCodec>,
    dispatcher: Arc<Dispatcher>,
    /// Encoder workers (E/P/D): a request's images are encoded there before dispatch.
    encoders: Option<Arc<crate::encoder::client::EncoderPool>>,
}

impl Pipeline {
    /// A pipeline routing through `dispatcher` (workers join and leave through it).
    pub fn new(
        model_id: String,
        context_length: usize,
        codec: Arc<ModelCodec>,
        dispatcher: Arc<Dispatcher>,
    ) -> Pipeline {
        Pipeline {
            model_id,
            context_length,
            codec,
            dispatcher,
            encoders: None,
        }
    }

    /// This pipeline sending images to `encoders` (else the worker encodes them).
    pub fn with_encoders(mut self, encoders: Arc<crate::encoder::client::EncoderPool>) -> Self {
        self.encoders = Some(encoders);
        self
    }

    /// Where a frontend's request ids start. They only need to be unique per process
    /// lifetime; starting from the clock keeps a restarted frontend from reusing ids still
    /// known to workers.
    pub fn first_request_id() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1)
            << 8
    }

    /// The routing shell behind this pipeline.
    pub fn dispatcher(&self) -> &Arc<Dispatcher> {
        &self.dispatcher
    }
}

#[async_trait]
impl ChatEngine for Pipeline {
    fn model_id(&self) -> &str {
        &self.model_id
    }

    fn context_length(&self) -> usize {
        self.context_length
    }

    fn tokenize(&self, prompt: &Prompt, add_special: bool) -> Result<Vec<u32>, EngineError> {
        self.codec.tokenize(prompt, add_special)
    }

    fn detokenize(&self, ids: &[u32]) -> Result<String, EngineError> {
        self.codec.detokenize(ids)
    }

    async fn generate(&self, req: GenerateRequest) -> Result<DeltaStream, EngineError> {
        let preprocess = tracing::info_span!("preprocess", prompt_tokens = tracing::field::Empty);
        let (token_ids, mut images) = preprocess.in_scope(|| prompt_of(&self.codec, &req))?;
        preprocess.record("prompt_tokens", token_ids.len());
        drop(preprocess);
        let biased: Vec<u32> = req.sampling.logit_bias.iter().map(|&(id, _)| id).collect();
        self.codec.check_ids("logit_bias", &biased)?;
        self.codec
            .check_ids("stop_token_ids", &req.stop_token_ids)?;
        if let Some(grammar) = req.sampling.grammar.clone() {
            // Compiling is CPU work: off the async threads (the worker loops run there).
            let codec = self.codec.clone();
            tokio::task::spawn_blocking(move || codec.check_grammar(&grammar))
                .await
                .map_err(|e| EngineError::Internal(format!("checking the grammar: {e}")))??;
        }
        let prompt_len = token_ids.len();
        let token_ids_first = token_ids.first().copied();
        if prompt_len == 0 {
            return Err(EngineError::InvalidRequest("the prompt is empty".into()));
        }
        let max_tokens =
            StopConditions::max_tokens_within(prompt_len, self.context_length, req.max_tokens)?;
        if let Some(encoders) = &self.encoders {
            encoders.attach(&mut images).await;
        }
        // The stream survives its worker: a lost, stalled or draining worker's request
        // continues on another (router::migration).
        let dispatched = MigratingStream::open_hinted(
            self.dispatcher.clone(),
            DispatchRequest {
                token_ids,
                sampling: req.sampling.clone(),
                stop: StopConditions {
                    max_tokens,
                    stop_token_ids: stop_token_ids(
                        self.codec.stop_ids(),
                        &req.stop_token_ids,
                        req.ignore_eos,
                    ),
                    // Folded into the list above, so the client's own ids still stop.
                    ignore_eos: false,
                },
                logprobs: req.logprobs,
                generated_before: 0,
                images,
            },
            req.hints,
        )
        .await?;
        let state = Detokenize {
            first_prompt_token: req.sampling.prompt_logprobs.and(token_ids_first),
            codec: self.codec.clone(),
            decoder: self.codec.decoder(),
            prompt_tokens: prompt_len as u32,
            completion_tokens: 0,
            cached_tokens: 0,
        };
        Ok(detokenize(dispatched, state))
    }
}

/// The ids that end generation: the model's (unless `ignore_eos`) and the client's.
fn stop_token_ids(model: &[u32], client: &[u32], ignore_eos: bool) -> Vec<u32> {
    let mut ids = if ignore_eos {
        Vec::new()
    } else {
        model.to_vec()
    };
    for &id in client {
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    ids
}

struct Detokenize {
    /// The prompt's first token, when its logprobs were asked for: it heads the prompt
    /// logprobs with no logprob of its own.
    first_prompt_token: Option<u32>,
    codec: Arc<ModelCodec>,
    decoder: IncrementalDecoder,
    prompt_tokens: u32,
    completion_tokens: u32,
    cached_tokens: u32,
}

impl Detokenize {
    fn delta(&mut self, item: Result<TokenOutput, EngineError>) -> Result<Delta, EngineError> {
        let first = self.completion_tokens == 0;
        let out = item?;
        if let Some(c) = out.cached_tokens {
            self.cached_tokens = c;
        }
        self.completion_tokens += out.token_ids.len() as u32;
        let tok = self.codec.tokenizer();
        let mut text = String::new();
        for &id in &out.token_ids {
            let piece = self
                .decoder
                .push(tok, id)
                .map_err(|e| EngineError::Internal(format!("detokenizing: {e}")))?;
            text.push_str(&piece);
        }
        if out.finish.is_some() {
            let rest = self
                .decoder
                .finish(tok)
                .map_err(|e| EngineError::Internal(format!("detokenizing: {e}")))?;
            text.push_str(&rest);
        }
        if let Some(FinishReason::Error(msg)) = &out.finish {
            return Err(EngineError::Internal(msg.clone()));
        }
        let usage = (first || out.finish.is_some()).then_some(Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            cached_tokens: self.cached_tokens,
        });
        Ok(Delta {
            text,
            logprobs: out
                .logprobs
                .as_ref()
                .map(|lps| lps.iter().map(|lp| self.codec.logprobs(lp)).collect()),
            prompt_logprobs: out.prompt_logprobs.as_ref().map(|lps| {
                let first = self.first_prompt_token.map(|token_id| TokenLogprob {
                    token_id,
                    logprob: f32::NAN,
                    top: Vec::new(),
                });
                first
                    .iter()
                    .chain(lps)
                    .map(|lp| self.codec.logprobs(lp))
                    .collect()
            }),
            token_ids: out.token_ids,
            finish: out.finish,
            usage,
        })
    }
}

fn detokenize(tokens: MigratingStream, state: Detokenize) -> DeltaStream {
    futures::stream::unfold(
        (tokens, state, false),
        |(mut tokens, mut state, done)| async move {
            if done {
                return None;
            }
            let out = tokens.next_output().await?;
            let item = state.delta(out);
            let done = match &item {
                Ok(d) => d.finish.is_some(),
                Err(_) => true,
            };
            Some((item, (tokens, state, done)))
        },
    )
    .boxed()
}
