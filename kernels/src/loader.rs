//! Model loading: a GGUF file, or an HF directory (config.json + *.safetensors +
//! tokenizer.json), becomes a [`LoadedModel`]: configuration, weights mapped by role, the
//! tokenizer, and the chat template. Every weight's shape is checked against the
//! configuration, so a backend can trust what it gets.

use crate::chat::{ChatMessage, ChatTemplate, ChatTemplateError};
use crate::gguf::{GgufError, GgufFile, MetaValue};
use crate::model::{LayerWeights, ModelConfig, ModelWeights, RopeStyle};
use crate::safetensors::{SafetensorsError, SafetensorsFile};
use crate::tensor::WeightTensor;
use crate::tokenizer::{Tokenizer, TokenizerError};
use crate::vision::{
    process, ImageEncoder, ProcessorConfig, RgbImage, VisionConfig, VisionError, VisionTower,
};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// File name of turbine's default model.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Where `scripts/fetch-model.sh` puts the default model: `$TURBINE_MODEL_DIR/<file>`, else
/// `$XDG_CACHE_HOME/turbine/models/<file>`, else `~/.cache/turbine/models/<file>`.
pub fn default_model_path() -> PathBuf {
    let dir = if let Some(d) = std::env::var_os("TURBINE_MODEL_DIR").filter(|d| !d.is_empty()) {
        PathBuf::from(d)
    } else {
        let cache = std::env::var_os("XDG_CACHE_HOME")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .unwrap_or_else(|| PathBuf::from(".cache"));
        cache.join("turbine").join("models")
    };
    dir.join(DEFAULT_MODEL_FILE)
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("model path {0} does not exist")]
    NotFound(PathBuf),
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Safetensors(#[from] SafetensorsError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("model configuration: {0}")]
    Config(String),
    #[error("unsupported architecture {0:?} (supported: llama, qwen2, mistral)")]
    UnsupportedArch(String),
    #[error("weight {name:?} is missing")]
    MissingTensor { name: String },
    #[error("weight {name:?} has shape {found:?}, the configuration implies {expected:?}")]
    Shape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
}

/// Everything needed to serve a model.
#[derive(Debug)]
pub struct LoadedModel {
    /// A human-readable name (GGUF `general.name`, else the file or directory name).
    pub name: String,
    /// The file or directory it was loaded from.
    pub path: PathBuf,
    pub config: ModelConfig,
    pub weights: ModelWeights,
    pub tokenizer: Tokenizer,
    /// The model's Jinja chat template, when it ships one.
    pub chat_template: Option<String>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    /// Ids that end generation (EOS and end-of-turn tokens), sorted.
    pub stop_ids: Vec<u32>,
    /// The vision tower and image processor of a multimodal checkpoint (Idefics3 / SmolVLM).
    pub vision: Option<VisionModel>,
}

/// What a multimodal model adds to its text model.
#[derive(Clone)]
pub struct VisionModel {
    /// The tower, on the CPU as loaded ([`VisionModel::on_cuda`] moves a copy to a GPU).
    pub tower: ImageEncoder,
    pub processor: ProcessorConfig,
    /// The placeholder token the embeddings replace, `image_seq_len` of them per tile.
    pub image_token_id: u32,
}

/// One image as the text model takes it: the prompt text that stands for it and the
/// embeddings of its `<image>` tokens, in order.
#[derive(Clone, Debug, PartialEq)]
pub struct EncodedImage {
    pub prompt_text: String,
    /// `<image>` tokens in `prompt_text`.
    pub tokens: usize,
    /// `[tokens, text hidden size]`, row-major.
    pub embeds: Vec<f32>,
}

impl VisionModel {
    /// Processor then tower, the image's tiles in one call: what an encoder computes for one
    /// image.
    pub fn encode(&self, image: &RgbImage) -> Result<EncodedImage, VisionError> {
        let processed = process(image, &self.processor);
        let embeds = self.tower.encode_tiles(&processed.tiles)?;
        Ok(EncodedImage {
            prompt_text: processed.prompt_text(self.processor.image_seq_len),
            tokens: processed.tiles.len() * self.processor.image_seq_len,
            embeds,
        })
    }
}

impl VisionModel {
    /// The same model with its tower on GPU `device` (see [`ImageEncoder::on_cuda`]).
    #[cfg(feature = "cuda")]
    pub fn on_cuda(&self, device: usize) -> Result<VisionModel, VisionError> {
        Ok(VisionModel {
            tower: self.tower.on_cuda(device)?,
            ..self.clone()
        })
    }
}

impl std::fmt::Debug for VisionModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VisionModel")
            .field("config", self.tower.config())
            .field("device", &self.tower.device())
            .field("processor", &self.processor)
            .field("image_token_id", &self.image_token_id)
            .finish()
    }
}

impl LoadedModel {
    /// The BOS token's text ("" when the model has none), for chat templates.
    pub fn bos_token(&self) -> String {
        self.bos_id
            .and_then(|id| self.tokenizer.token_text(id))
            .unwrap_or_default()
    }

    /// The EOS token's text ("" when the model has none), for chat templates.
    pub fn eos_token(&self) -> String {
        self.eos_id
            .and_then(|id| self.tokenizer.token_text(id))
            .unwrap_or_default()
    }

    /// Renders `messages` with the model's template and a generation prompt. `None` when the
    /// model has no template.
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
    ) -> Option<Result<String, ChatTemplateError>> {
        let src = self.chat_template.as_deref()?;
        Some(
            ChatTemplate::new(src)
                .and_then(|t| t.render(messages, true, &self.bos_token(), &self.eos_token())),
        )
    }
}

/// Loads a GGUF file, or an HF directory (config.json + *.safetensors + tokenizer.json).
pub fn load_model(path: &Path) -> Result<LoadedModel, LoadError> {
    if path.is_dir() {
        load_hf_dir(path)
    } else if path.is_file() {
        load_gguf(path)
    } else {
        Err(LoadError::NotFound(path.to_path_buf()))
    }
}

/// Which naming convention a file uses for the weights.
#[derive(Clone, Copy)]
enum Names {
    Gguf,
    Hf,
}

#[derive(Clone, Copy)]
enum Role {
    Embed,
    OutputNorm,
    Output,
    AttnNorm,
    Q,
    K,
    V,
    O,
    QBias,
    KBias,
    VBias,
    FfnNorm,
    Gate,
    Up,
    Down,
}

impl Names {
    fn name(self, role: Role, layer: usize) -> String {
        let (g, h) = match role {
            Role::Embed => return self.global("token_embd.weight", "model.embed_tokens.weight"),
            Role::OutputNorm => return self.global("output_norm.weight", "model.norm.weight"),
            Role::Output => return self.global("output.weight", "lm_head.weight"),
            Role::AttnNorm => ("attn_norm.weight", "input_layernorm.weight"),
            Role::Q => ("attn_q.weight", "self_attn.q_proj.weight"),
            Role::K => ("attn_k.weight", "self_attn.k_proj.weight"),
            Role::V => ("attn_v.weight", "self_attn.v_proj.weight"),
            Role::O => ("attn_output.weight", "self_attn.o_proj.weight"),
            Role::QBias => ("attn_q.bias", "self_attn.q_proj.bias"),
            Role::KBias => ("attn_k.bias", "self_attn.k_proj.bias"),
            Role::VBias => ("attn_v.bias", "self_attn.v_proj.bias"),
            Role::FfnNorm => ("ffn_norm.weight", "post_attention_layernorm.weight"),
            Role::Gate => ("ffn_gate.weight", "mlp.gate_proj.weight"),
            Role::Up => ("ffn_up.weight", "mlp.up_proj.weight"),
            Role::Down => ("ffn_down.weight", "mlp.down_proj.weight"),
        };
        match self {
            Names::Gguf => format!("blk.{layer}.{g}"),
            Names::Hf => format!("model.layers.{layer}.{h}"),
        }
    }

    fn global(self, g: &str, h: &str) -> String {
        match self {
            Names::Gguf => g.to_string(),
            Names::Hf => h.to_string(),
        }
    }
}

/// Collects the weights through `fetch` (name -> tensor, `None` when absent), checking every
/// shape against `cfg`.
fn assemble_weights(
    cfg: &ModelConfig,
    names: Names,
    tie: bool,
    fetch: &dyn Fn(&str) -> Result<Option<WeightTensor>, LoadError>,
) -> Result<ModelWeights, LoadError> {
    let h = cfg.hidden_size;
    let q_dim = cfg.n_heads * cfg.head_dim;
    let kv_dim = cfg.n_kv_heads * cfg.head_dim;
    let ffn = cfg.intermediate_size;
    let get =
        |role: Role, layer: usize, shape: &[usize]| -> Result<Option<WeightTensor>, LoadError> {
            let name = names.name(role, layer);
            let Some(t) = fetch(&name)? else {
                return Ok(None);
            };
            if t.shape != shape {
                return Err(LoadError::Shape {
                    name,
                    expected: shape.to_vec(),
                    found: t.shape,
                });
            }
            Ok(Some(t))
        };
    let need = |role: Role, layer: usize, shape: &[usize]| -> Result<WeightTensor, LoadError> {
        get(role, layer, shape)?.ok_or_else(|| LoadError::MissingTensor {
            name: names.name(role, layer),
        })
    };
    let mut layers = Vec::with_capacity(cfg.n_layers);
    for l in 0..cfg.n_layers {
        layers.push(LayerWeights {
            attn_norm: need(Role::AttnNorm, l, &[h])?,
            wq: need(Role::Q, l, &[q_dim, h])?,
            wk: need(Role::K, l, &[kv_dim, h])?,
            wv: need(Role::V, l, &[kv_dim, h])?,
            wo: need(Role::O, l, &[h, q_dim])?,
            bq: get(Role::QBias, l, &[q_dim])?,
            bk: get(Role::KBias, l, &[kv_dim])?,
            bv: get(Role::VBias, l, &[kv_dim])?,
            ffn_norm: need(Role::FfnNorm, l, &[h])?,
            w_gate: need(Role::Gate, l, &[ffn, h])?,
            w_up: need(Role::Up, l, &[ffn, h])?,
            w_down: need(Role::Down, l, &[h, ffn])?,
        });
    }
    let output = if tie {
        None
    } else {
        get(Role::Output, 0, &[cfg.vocab_size, h])?
    };
    Ok(ModelWeights {
        token_embd: need(Role::Embed, 0, &[cfg.vocab_size, h])?,
        layers,
        output_norm: need(Role::OutputNorm, 0, &[h])?,
        output,
    })
}

fn rope_style_for(arch: &str) -> Result<RopeStyle, LoadError> {
    match arch {
        // llama.cpp's converter permutes Llama's q/k rows for adjacent-pair rotation.
        "llama" | "mistral" => Ok(RopeStyle::Interleaved),
        "qwen2" => Ok(RopeStyle::Neox),
        other => Err(LoadError::UnsupportedArch(other.to_string())),
    }
}

fn check_config(cfg: &ModelConfig) -> Result<(), LoadError> {
    let positive = [
        ("vocab_size", cfg.vocab_size),
        ("hidden_size", cfg.hidden_size),
        ("n_layers", cfg.n_layers),
        ("n_heads", cfg.n_heads),
        ("n_kv_heads", cfg.n_kv_heads),
        ("head_dim", cfg.head_dim),
        ("intermediate_size", cfg.intermediate_size),
    ];
    for (name, v) in positive {
        if v == 0 {
            return Err(LoadError::Config(format!("{name} is 0")));
        }
    }
    if cfg.n_heads % cfg.n_kv_heads != 0 {
        return Err(LoadError::Config(format!(
            "{} attention heads are not a multiple of {} KV heads",
            cfg.n_heads, cfg.n_kv_heads
        )));
    }
    if cfg.head_dim % 2 != 0 {
        return Err(LoadError::Config(format!(
            "head_dim {} is odd",
            cfg.head_dim
        )));
    }
    if !(cfg.rms_norm_eps.is_finite() && cfg.rms_norm_eps > 0.0 && cfg.rope_theta > 0.0) {
        return Err(LoadError::Config(format!(
            "rms_norm_eps {} / rope_theta {} out of range",
            cfg.rms_norm_eps, cfg.rope_theta
        )));
    }
    Ok(())
}

fn load_gguf(path: &Path) -> Result<LoadedModel, LoadError> {
    let g = GgufFile::open(path)?;
    let arch = g.get_str("general.architecture")?.to_string();
    let rope_style = rope_style_for(&arch)?;
    let key = |k: &str| format!("{arch}.{k}");
    let usize_key = |k: &str| -> Result<usize, LoadError> {
        let v = g.get_u64(&key(k))?;
        usize::try_from(v).map_err(|_| LoadError::Config(format!("{} = {v} too large", key(k))))
    };
    let opt_usize = |k: &str| -> Option<usize> {
        g.get(&key(k))
            .and_then(MetaValue::as_u64)
            .and_then(|v| usize::try_from(v).ok())
    };
    let opt_f32 = |k: &str, default: f32| -> f32 {
        g.get(&key(k))
            .and_then(MetaValue::as_f64)
            .map_or(default, |v| v as f32)
    };
    let tokenizer = Tokenizer::from_gguf(&g)?;
    let hidden = usize_key("embedding_length")?;
    let n_heads = usize_key("attention.head_count")?;
    if n_heads == 0 {
        return Err(LoadError::Config(format!(
            "{} is 0",
            key("attention.head_count")
        )));
    }
    let vocab_size = tokenizer.vocab_size();
    if let Some(v) = opt_usize("vocab_size") {
        if v != vocab_size {
            return Err(LoadError::Config(format!(
                "{} = {v} but the tokenizer has {vocab_size} tokens",
                key("vocab_size")
            )));
        }
    }
    let config = ModelConfig {
        arch: arch.clone(),
        vocab_size,
        hidden_size: hidden,
        n_layers: usize_key("block_count")?,
        n_heads,
        n_kv_heads: opt_usize("attention.head_count_kv").unwrap_or(n_heads),
        head_dim: opt_usize("attention.key_length").unwrap_or(hidden / n_heads),
        intermediate_size: usize_key("feed_forward_length")?,
        rope_theta: opt_f32("rope.freq_base", 10_000.0),
        rope_style,
        rms_norm_eps: opt_f32("attention.layer_norm_rms_epsilon", 1e-5),
        max_position: opt_usize("context_length").unwrap_or(2048),
        tie_embeddings: !g.has_tensor("output.weight"),
    };
    check_config(&config)?;
    let fetch = |name: &str| -> Result<Option<WeightTensor>, LoadError> {
        if g.has_tensor(name) {
            Ok(Some(g.tensor(name)?))
        } else {
            Ok(None)
        }
    };
    let weights = assemble_weights(&config, Names::Gguf, config.tie_embeddings, &fetch)?;
    let name = g
        .get("general.name")
        .and_then(MetaValue::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| file_label(path));
    Ok(LoadedModel {
        name,
        path: path.to_path_buf(),
        chat_template: g
            .get("tokenizer.chat_template")
            .and_then(MetaValue::as_str)
            .map(str::to_string),
        bos_id: tokenizer.bos_id(),
        eos_id: tokenizer.eos_id(),
        stop_ids: tokenizer.stop_ids().to_vec(),
        config,
        weights,
        tokenizer,
        vision: None,
    })
}

fn file_label(path: &Path) -> String {
    path.file_stem()
        .or_else(|| path.file_name())
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

fn read_json(path: &Path) -> Result<Value, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text)
        .map_err(|e| LoadError::Config(format!("{} is not valid JSON: {e}", path.display())))
}

/// `path` if it exists, parsed; `None` when absent.
fn read_json_opt(path: &Path) -> Result<Option<Value>, LoadError> {
    if path.exists() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

/// An id or a list of ids (HF writes `eos_token_id` either way).
fn ids_of(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .into_iter()
            .collect(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok()))
            .collect(),
        _ => Vec::new(),
    }
}

/// A token string from tokenizer_config.json (`"<s>"` or `{"content": "<s>", ...}`).
fn token_str(v: Option<&Value>) -> Option<&str> {
    match v? {
        Value::String(s) => Some(s),
        Value::Object(o) => o.get("content").and_then(Value::as_str),
        _ => None,
    }
}

/// tokenizer_config.json's `chat_template`: a string, or a list of named templates (the one
/// named "default" is taken).
fn chat_template_of(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .or_else(|| list.first())
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(str::to_string),
        _ => None,
    }
}

/// Idefics3 (SmolVLM) checkpoints nest the Llama text model: its config under
/// `text_config`, its weights under `model.text_model.` (the head stays `lm_head.weight`).
const IDEFICS3: &str = "idefics3";

fn load_hf_dir(dir: &Path) -> Result<LoadedModel, LoadError> {
    let outer = read_json(&dir.join("config.json"))?;
    let multimodal = outer.get("model_type").and_then(Value::as_str) == Some(IDEFICS3);
    let cfg_json = if multimodal {
        outer
            .get("text_config")
            .cloned()
            .ok_or_else(|| LoadError::Config("idefics3 config.json has no text_config".into()))?
    } else {
        outer.clone()
    };
    let tok_cfg = read_json_opt(&dir.join("tokenizer_config.json"))?;
    let gen_cfg = read_json_opt(&dir.join("generation_config.json"))?;

    let arch = cfg_json
        .get("model_type")
        .and_then(Value::as_str)
        .ok_or_else(|| LoadError::Config("config.json has no model_type".into()))?
        .to_string();
    // HF checkpoints hold unpermuted q/k weights: rotate_half (Neox) pairing for every arch.
    rope_style_for(&arch)?;
    let num = |k: &str| {
        cfg_json
            .get(k)
            .and_then(Value::as_u64)
            .and_then(|v| usize::try_from(v).ok())
    };
    let need =
        |k: &str| num(k).ok_or_else(|| LoadError::Config(format!("config.json: {k} missing")));
    let float = |k: &str, d: f64| cfg_json.get(k).and_then(Value::as_f64).unwrap_or(d) as f32;
    let hidden = need("hidden_size")?;
    let n_heads = need("num_attention_heads")?;
    if n_heads == 0 {
        return Err(LoadError::Config(
            "config.json: num_attention_heads is 0".into(),
        ));
    }
    let tie = cfg_json
        .get("tie_word_embeddings")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let config = ModelConfig {
        arch: arch.clone(),
        vocab_size: need("vocab_size")?,
        hidden_size: hidden,
        n_layers: need("num_hidden_layers")?,
        n_heads,
        n_kv_heads: num("num_key_value_heads").unwrap_or(n_heads),
        head_dim: num("head_dim").unwrap_or(hidden / n_heads),
        intermediate_size: need("intermediate_size")?,
        // transformers 5 writes it inside `rope_parameters`.
        rope_theta: cfg_json
            .get("rope_parameters")
            .and_then(|r| r.get("rope_theta"))
            .and_then(Value::as_f64)
            .map_or_else(|| float("rope_theta", 10_000.0), |t| t as f32),
        rope_style: RopeStyle::Neox,
        rms_norm_eps: float("rms_norm_eps", 1e-6),
        max_position: num("max_position_embeddings").unwrap_or(2048),
        tie_embeddings: tie,
    };
    check_config(&config)?;

    // Every *.safetensors file in the directory (sharded checkpoints have several).
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| LoadError::Io {
            path: dir.to_path_buf(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(LoadError::Config(format!(
            "{} has no .safetensors files",
            dir.display()
        )));
    }
    let opened = files
        .iter()
        .map(|p| SafetensorsFile::open(p))
        .collect::<Result<Vec<_>, _>>()?;
    let mut index: BTreeMap<String, usize> = BTreeMap::new();
    for (i, f) in opened.iter().enumerate() {
        for n in f.names() {
            index.insert(n.to_string(), i);
        }
    }
    let lookup = |name: &str| {
        index
            .get(name)
            .and_then(|&i| opened.get(i))
            .and_then(|f| f.tensor(name))
    };
    let fetch = |name: &str| -> Result<Option<WeightTensor>, LoadError> {
        Ok(match name.strip_prefix("model.") {
            Some(rest) if multimodal => lookup(&format!("model.text_model.{rest}")),
            _ => lookup(name),
        })
    };
    let vision = if multimodal {
        Some(load_vision(dir, &outer, &lookup)?)
    } else {
        None
    };
    let weights = assemble_weights(&config, Names::Hf, tie, &fetch)?;
    let mut config = config;
    config.tie_embeddings = weights.output.is_none();

    // Special ids: config.json, then generation_config.json, then the token strings.
    let tok_path = dir.join("tokenizer.json");
    let tc = tok_cfg.as_ref();
    let mut bos = ids_of(cfg_json.get("bos_token_id")).first().copied();
    let mut eos = ids_of(gen_cfg.as_ref().and_then(|g| g.get("eos_token_id")));
    eos.extend(ids_of(cfg_json.get("eos_token_id")));
    let probe = Tokenizer::from_tokenizer_json(&tok_path, None, &[])?;
    if bos.is_none() {
        bos = token_str(tc.and_then(|t| t.get("bos_token"))).and_then(|s| probe.token_to_id(s));
    }
    if let Some(id) =
        token_str(tc.and_then(|t| t.get("eos_token"))).and_then(|s| probe.token_to_id(s))
    {
        if eos.is_empty() {
            eos.push(id);
        }
    }
    let mut seen = Vec::new();
    eos.retain(|id| {
        let new = !seen.contains(id);
        seen.push(*id);
        new
    });
    let tokenizer = Tokenizer::from_tokenizer_json(&tok_path, bos, &eos)?;
    if tokenizer.vocab_size() > config.vocab_size {
        return Err(LoadError::Config(format!(
            "tokenizer has {} tokens but the model's vocab_size is {}",
            tokenizer.vocab_size(),
            config.vocab_size
        )));
    }
    Ok(LoadedModel {
        name: file_label(dir),
        path: dir.to_path_buf(),
        // Processors (SmolVLM) keep the template beside the tokenizer's config.
        chat_template: chat_template_of(tc.and_then(|t| t.get("chat_template")))
            .or_else(|| std::fs::read_to_string(dir.join("chat_template.jinja")).ok())
            .or_else(|| {
                read_json_opt(&dir.join("chat_template.json"))
                    .ok()
                    .flatten()
                    .and_then(|v| chat_template_of(v.get("chat_template")))
            }),
        bos_id: tokenizer.bos_id(),
        eos_id: tokenizer.eos_id(),
        stop_ids: tokenizer.stop_ids().to_vec(),
        config,
        weights,
        tokenizer,
        vision,
    })
}

/// The vision side of an Idefics3 directory: tower + connector weights, the processor's
/// config (processor_config.json, else preprocessor_config.json) and the image token.
fn load_vision(
    dir: &Path,
    outer: &Value,
    lookup: &dyn Fn(&str) -> Option<WeightTensor>,
) -> Result<VisionModel, LoadError> {
    let cfg = VisionConfig::from_hf(outer).map_err(|e| LoadError::Config(e.to_string()))?;
    let proc_json = match read_json_opt(&dir.join("processor_config.json"))? {
        Some(v) => v,
        None => read_json(&dir.join("preprocessor_config.json"))?,
    };
    let processor = ProcessorConfig::from_hf(&proc_json, Some(cfg.tokens_per_tile()))
        .map_err(|e| LoadError::Config(format!("image processor: {e}")))?;
    if processor.image_seq_len != cfg.tokens_per_tile() || processor.tile as usize != cfg.image_size
    {
        return Err(LoadError::Config(format!(
            "the processor's tiles ({} px, {} tokens) disagree with the vision tower's ({} px, {} tokens)",
            processor.tile,
            processor.image_seq_len,
            cfg.image_size,
            cfg.tokens_per_tile()
        )));
    }
    let image_token_id = outer
        .get("image_token_id")
        .and_then(Value::as_u64)
        .ok_or_else(|| LoadError::Config("config.json: image_token_id missing".into()))?
        as u32;
    let tower = VisionTower::load(cfg, lookup).map_err(|e| LoadError::Config(e.to_string()))?;
    Ok(VisionModel {
        tower: ImageEncoder::from(tower),
        processor,
        image_token_id,
    })
}
