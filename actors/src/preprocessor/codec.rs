//! Text in, token ids out (and back): the model's tokenizer and chat template.
//!
//! The preprocessor turns an OpenAI-shaped prompt into the token ids a worker runs, and the
//! worker's token ids back into text for the client, incrementally, without ever cutting a
//! multi-byte character in half.

use crate::protocol::{EngineError, Prompt, TokenLogprob, TokenLogprobs, TopLogprob};
use std::sync::Arc;
use turbine_kernels::chat::{ChatMessage, ChatTemplate};
use turbine_kernels::tokenizer::{IncrementalDecoder, Tokenizer};

/// The model's text side, shared by every request.
pub struct ModelCodec {
    tokenizer: Arc<Tokenizer>,
    template: Option<ChatTemplate>,
    bos: String,
    eos: String,
    stop_ids: Vec<u32>,
}

impl ModelCodec {
    /// The model's tokenizer and chat template (`bos`/`eos` are the texts templates may
    /// use). A template that does not compile is an error now, not on the first request.
    pub fn new(
        tokenizer: Arc<Tokenizer>,
        chat_template: Option<&str>,
        bos: String,
        eos: String,
        stop_ids: Vec<u32>,
    ) -> Result<Self, String> {
        let template = chat_template
            .map(ChatTemplate::new)
            .transpose()
            .map_err(|e| format!("the model's chat template: {e}"))?;
        Ok(ModelCodec {
            tokenizer,
            template,
            bos,
            eos,
            stop_ids,
        })
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    /// Token ids that end generation (EOS and the model's other end-of-turn tokens).
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// The prompt's token ids: chat messages through the model's template, plain text as is.
    pub fn prompt_ids(&self, prompt: &Prompt) -> Result<Vec<u32>, EngineError> {
        match prompt {
            Prompt::Text(text) => self.encode(text, true),
            Prompt::Chat(messages) => {
                if messages.iter().any(|m| m.images().next().is_some()) {
                    // Checked before the template: the model must not silently answer a
                    // question about a picture it never saw. (Vision models load, with
                    // their tower, but the serving path does not splice embeddings yet.)
                    return Err(EngineError::InvalidRequest(
                        "this model is served for text only: requests with images are not \
                         accepted"
                            .into(),
                    ));
                }
                let Some(template) = &self.template else {
                    return Err(EngineError::InvalidRequest(
                        "this model has no chat template; use /v1/completions".into(),
                    ));
                };
                let messages: Vec<ChatMessage> = messages
                    .iter()
                    .map(|m| ChatMessage::new(m.role.clone(), m.content.clone()))
                    .collect();
                let text = template
                    .render(&messages, true, &self.bos, &self.eos)
                    .map_err(|e| EngineError::InvalidRequest(format!("chat template: {e}")))?;
                // The template writes BOS itself where the model wants one.
                self.encode(&text, false)
            }
        }
    }

    fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, EngineError> {
        self.tokenizer
            .encode(text, add_special)
            .map_err(|e| EngineError::InvalidRequest(format!("tokenizing the prompt: {e}")))
    }

    /// A fresh streaming decoder (special tokens such as EOS are not shown to clients).
    pub fn decoder(&self) -> IncrementalDecoder {
        IncrementalDecoder::new(true)
    }

    /// OpenAI-shaped logprobs for one sampled token.
    pub fn logprobs(&self, lp: &TokenLogprob) -> TokenLogprobs {
        let piece = |id: u32| {
            let bytes = self.tokenizer.token_to_piece(id).unwrap_or_default();
            (String::from_utf8_lossy(&bytes).into_owned(), bytes)
        };
        let (token, bytes) = piece(lp.token_id);
        TokenLogprobs {
            token,
            bytes,
            logprob: lp.logprob,
            top: lp
                .top
                .iter()
                .map(|&(id, logprob)| {
                    let (token, bytes) = piece(id);
                    TopLogprob {
                        token,
                        bytes,
                        logprob,
                    }
                })
                .collect(),
        }
    }
}
