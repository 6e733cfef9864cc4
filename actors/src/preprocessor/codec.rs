//! Text in, token ids out (and back): the model's tokenizer and chat template.
//!
//! The preprocessor turns an OpenAI-shaped prompt into the token ids a worker runs, and the
//! worker's token ids back into text for the client, incrementally, without ever cutting a
//! multi-byte character in half.

use super::tool_prompt;
use crate::protocol::{
    EngineError, Grammar, Prompt, PromptImage, TokenLogprob, TokenLogprobs, TopLogprob,
};
use std::sync::Arc;
use turbine_kernels::chat::{ChatMessage, ChatTemplate};
use turbine_kernels::grammar::Grammars;
use turbine_kernels::tokenizer::{IncrementalDecoder, Tokenizer};
use turbine_kernels::vision::{layout, ProcessorConfig};

/// The model's text side, shared by every request.
pub struct ModelCodec {
    /// The grammar engine over this vocabulary, built on first use (constrained requests).
    grammars: std::sync::OnceLock<Result<Arc<Grammars>, String>>,
    tokenizer: Arc<Tokenizer>,
    template: Option<ChatTemplate>,
    bos: String,
    eos: String,
    stop_ids: Vec<u32>,
    /// A multimodal model's side of the prompt text (none: images are refused).
    vision: Option<VisionText>,
}

/// What the prompt text of an image needs: the processor's tiling and the placeholder.
#[derive(Clone, Debug)]
pub struct VisionText {
    pub processor: ProcessorConfig,
    pub image_token_id: u32,
    /// The placeholder's text, which the chat template writes once per image and the
    /// processor's text replaces (`<image>`).
    pub image_token: String,
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
            grammars: std::sync::OnceLock::new(),
            tokenizer,
            template,
            bos,
            eos,
            stop_ids,
            vision: None,
        })
    }

    /// This codec for a multimodal model: images in chat messages become their processor
    /// text (`image_token_id`'s placeholders, `processor`'s tiles).
    pub fn with_vision(
        mut self,
        processor: ProcessorConfig,
        image_token_id: u32,
    ) -> Result<Self, String> {
        let image_token = self.tokenizer.token_text(image_token_id).ok_or_else(|| {
            format!("the image token id {image_token_id} is not in the vocabulary")
        })?;
        self.vision = Some(VisionText {
            processor,
            image_token_id,
            image_token,
        });
        Ok(self)
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    /// Token ids that end generation (EOS and the model's other end-of-turn tokens).
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// The prompt's token ids: chat messages through the model's template, plain text as is
    /// (with BOS where the model wants one), token ids checked against the vocabulary.
    pub fn prompt_ids(&self, prompt: &Prompt) -> Result<Vec<u32>, EngineError> {
        self.tokenize(prompt, true)
    }

    /// As [`ModelCodec::prompt_ids`]; `add_special` says whether plain text gets BOS.
    pub fn tokenize(&self, prompt: &Prompt, add_special: bool) -> Result<Vec<u32>, EngineError> {
        match prompt {
            Prompt::Tokens(ids) => {
                self.check_ids("prompt", ids)?;
                Ok(ids.clone())
            }
            Prompt::Text(text) => self.encode(text, add_special),
            Prompt::Chat(messages) => self.chat_ids(messages, &[]),
        }
    }

    /// A conversation's token ids through the chat template, with `tools` (OpenAI-shaped)
    /// rendered by the template if it can, else by the fallback of `tool_prompt`.
    pub fn chat_ids(
        &self,
        messages: &[crate::protocol::ChatMessage],
        tools: &[serde_json::Value],
    ) -> Result<Vec<u32>, EngineError> {
        self.chat_prompt(messages, tools).map(|(ids, _)| ids)
    }

    /// [`ModelCodec::chat_ids`] and the prompt's images: each image's placeholder written
    /// by the template is replaced by the processor's text for it (its tile grid), and the
    /// image is located in the token ids (first placeholder, count), as transformers'
    /// Idefics3 processor does.
    pub fn chat_prompt(
        &self,
        messages: &[crate::protocol::ChatMessage],
        tools: &[serde_json::Value],
    ) -> Result<(Vec<u32>, Vec<PromptImage>), EngineError> {
        if let Some(r) = messages.iter().flat_map(|m| m.remote_images()).next() {
            // The frontend fetches them for chat completions before this; elsewhere
            // (/tokenize) nothing is fetched.
            return Err(EngineError::InvalidRequest(format!(
                "the image at {} is a URL: image URLs are fetched for /v1/chat/completions \
                 only; send it as a data: URI here",
                r.param
            )));
        }
        let images: Vec<&crate::protocol::ChatImage> =
            messages.iter().flat_map(|m| m.images()).collect();
        let vision = match (&self.vision, images.is_empty()) {
            (_, true) => None,
            (Some(v), false) => Some(v),
            // Checked before the template: the model must not silently answer a question
            // about a picture it never saw.
            (None, false) => {
                return Err(EngineError::InvalidRequest(
                    "this model is served for text only: requests with images are not accepted"
                        .into(),
                ))
            }
        };
        let Some(template) = &self.template else {
            return Err(EngineError::InvalidRequest(
                "this model has no chat template; use /v1/completions".into(),
            ));
        };
        let text = if template.renders_tools() {
            let shown: Vec<ChatMessage> = tool_prompt::native(messages);
            let tools = (!tools.is_empty()).then_some(tools);
            template.render_with_tools(&shown, tools, true, &self.bos, &self.eos)
        } else {
            template.render(
                &tool_prompt::fallback(messages, tools),
                true,
                &self.bos,
                &self.eos,
            )
        }
        .map_err(|e| EngineError::InvalidRequest(format!("chat template: {e}")))?;
        let Some(vision) = vision else {
            // The template writes BOS itself where the model wants one.
            return Ok((self.encode(&text, false)?, Vec::new()));
        };
        let pieces: Vec<&str> = text.split(vision.image_token.as_str()).collect();
        if pieces.len() != images.len() + 1 {
            return Err(EngineError::InvalidRequest(format!(
                "the prompt has {} `{}` markers for {} images (the text of a message may not \
                 contain `{}`)",
                pieces.len() - 1,
                vision.image_token,
                images.len(),
                vision.image_token
            )));
        }
        let layouts: Vec<_> = images
            .iter()
            .map(|i| layout(i.image.width, i.image.height, &vision.processor))
            .collect();
        let mut expanded = String::with_capacity(text.len());
        for (i, piece) in pieces.iter().enumerate() {
            expanded.push_str(piece);
            if let Some(l) = layouts.get(i) {
                expanded.push_str(&l.prompt_text(vision.processor.image_seq_len));
            }
        }
        let ids = self.encode(&expanded, false)?;
        let places: Vec<usize> = ids
            .iter()
            .enumerate()
            .filter(|(_, t)| **t == vision.image_token_id)
            .map(|(i, _)| i)
            .collect();
        let per_image: Vec<usize> = layouts
            .iter()
            .map(|l| l.tiles() * vision.processor.image_seq_len)
            .collect();
        if places.len() != per_image.iter().sum::<usize>() {
            return Err(EngineError::InvalidRequest(format!(
                "the prompt has {} image tokens where its {} images need {}",
                places.len(),
                images.len(),
                per_image.iter().sum::<usize>()
            )));
        }
        let mut seen = 0;
        let out = images
            .iter()
            .zip(&per_image)
            .map(|(img, &n)| {
                let first = places[seen];
                seen += n;
                PromptImage {
                    hash: img.hash,
                    first_token: first as u32,
                    tokens: n as u32,
                    encoded: img.encoded.clone(),
                    decoded: Some(img.image.clone()),
                    embeds: None,
                }
            })
            .collect();
        Ok((ids, out))
    }

    /// This codec with an already built grammar engine (shared with the process's workers).
    pub fn with_grammars(self, grammars: Arc<Grammars>) -> Self {
        let _ = self.grammars.set(Ok(grammars));
        self
    }

    /// The grammar engine over this model's vocabulary (built once, on first use, unless
    /// given by [`ModelCodec::with_grammars`]).
    pub fn grammars(&self) -> Result<Arc<Grammars>, EngineError> {
        self.grammars
            .get_or_init(|| {
                Grammars::new(&self.tokenizer, &self.stop_ids)
                    .map(Arc::new)
                    .map_err(|e| e.to_string())
            })
            .clone()
            .map_err(EngineError::Internal)
    }

    /// Compiles `grammar` once, so that one that cannot be enforced is a 400 now rather
    /// than a failure on the worker.
    pub fn check_grammar(&self, grammar: &Grammar) -> Result<(), EngineError> {
        let refuse = |e: String| {
            EngineError::InvalidRequest(format!(
                "the output constraint (`response_format`, or the forced tool call's \
                 `parameters`) cannot be enforced: {e}"
            ))
        };
        let source = grammar.source().map_err(refuse)?;
        self.grammars()?
            .constrain(&source)
            .map(drop)
            .map_err(|e| refuse(e.to_string()))
    }

    /// Refuses ids outside the vocabulary, naming `field`.
    pub fn check_ids(&self, field: &str, ids: &[u32]) -> Result<(), EngineError> {
        let vocab = self.tokenizer.vocab_size();
        match ids.iter().find(|&&id| id as usize >= vocab) {
            Some(id) => Err(EngineError::InvalidRequest(format!(
                "`{field}` holds token id {id}, but the vocabulary has {vocab} tokens (ids 0 to {})",
                vocab.saturating_sub(1)
            ))),
            None => Ok(()),
        }
    }

    /// The text of `ids`, special tokens included (as /detokenize and `echo` show them).
    pub fn detokenize(&self, ids: &[u32]) -> Result<String, EngineError> {
        self.check_ids("tokens", ids)?;
        self.tokenizer
            .decode(ids, false)
            .map_err(|e| EngineError::InvalidRequest(format!("detokenizing: {e}")))
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
