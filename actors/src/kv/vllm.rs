//! Ingest vLLM's own KV event stream.
//!
//! vLLM's publisher (`vllm/distributed/kv_events.py`) sends ZeroMQ multipart messages
//! `[topic, seq, payload]`: `seq` is an 8-byte big-endian counter per publisher, and `payload`
//! is a msgspec-encoded `KVEventBatch`. The shape of that payload changed across vLLM
//! versions, so this decoder accepts both:
//! - array form (older vLLM, `array_like=True`): batch `[ts, events, data_parallel_rank?]`,
//!   events `[tag, field, ...]` in declaration order, trailing defaulted fields omitted;
//! - map form (newer vLLM): batch `{ts, events, data_parallel_rank}`, events
//!   `{"type": tag, field: value, ...}` with defaulted fields omitted.
//!
//! Field order (declaration order) for the array form:
//! `BlockStored[tag, block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium,
//! lora_name, extra_keys, group_idx, kv_cache_spec_kind, kv_cache_spec_sliding_window]`,
//! `BlockRemoved[tag, block_hashes, medium, group_idx]`, `AllBlocksCleared[tag]`.
//! Fields after `block_size` (resp. `block_hashes`) may be missing in older versions.
//!
//! vLLM block hashes are integers in some versions and byte strings (a digest) in others.
//! Integers are taken as their 64-bit pattern (negative Python hashes wrap); byte strings are
//! folded to 64 bits with xxh3-64 over the bytes, so the same vLLM block always maps to the
//! same [`BlockHash`].
//!
//! # Hash domains (a limitation to know about)
//! vLLM's hashes are vLLM's, not turbine's: they are computed with vLLM's own hash function,
//! root seed and extra keys (multimodal hashes, cache salt, LoRA name). A router cannot
//! recompute them from a request's tokens. Two ways to route to vLLM workers:
//! 1. Index what vLLM sends ([`VllmEventBatch::into_kv_batch`]): the index is keyed by vLLM's
//!    hashes; only a router that can produce the same hashes (not turbine's router) can query
//!    it.
//! 2. Re-hash into turbine's domain ([`VllmHashTranslator`]): `BlockStored` carries the token
//!    ids, so turbine's sequence hash of each block is computed from the translated parent
//!    and the block's tokens (salt from `lora_id`). The indexer then holds turbine hashes and
//!    the normal router works unchanged. It needs the parent chain: a block whose parent was
//!    never seen (events lost, or stored before we subscribed) cannot be translated and is
//!    counted as unresolved; a resync (clear + full re-store) fixes it. Extra keys
//!    (multimodal content, cache salt) are not reproduced, so such blocks would match
//!    text-only requests with equal token ids: callers must not enable translation for
//!    multimodal vLLM deployments. The vLLM block size must equal the router's.
//!
//! turbine's own workers publish turbine hashes directly and need none of this.

use super::events::{KvEvent, KvEventBatch};
use super::hash::{hash_block, BlockHash, BlockSize};
use crate::ids::{TokenId, WorkerId};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use std::collections::HashMap;
use std::fmt;

/// Why a vLLM frame could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum VllmDecodeError {
    #[error("not valid MessagePack: {0}")]
    MsgPack(String),
    #[error("sequence frame must be 8 bytes, got {0}")]
    BadSeqFrame(usize),
    #[error("unexpected shape at {at}: {what}")]
    Shape { at: &'static str, what: String },
    #[error("unknown event tag {0:?}")]
    UnknownTag(String),
    #[error("block_size {0} is not a positive 32-bit integer")]
    BadBlockSize(i128),
}

fn shape(at: &'static str, what: impl Into<String>) -> VllmDecodeError {
    VllmDecodeError::Shape {
        at,
        what: what.into(),
    }
}

/// A decoded vLLM KV event. Hashes are vLLM's (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VllmKvEvent {
    BlockStored {
        block_hashes: Vec<BlockHash>,
        parent_block_hash: Option<BlockHash>,
        token_ids: Vec<TokenId>,
        block_size: BlockSize,
        lora_id: Option<u64>,
        /// Where the blocks live ("GPU", "CPU", ...); `None` in older versions.
        medium: Option<String>,
    },
    BlockRemoved {
        block_hashes: Vec<BlockHash>,
        medium: Option<String>,
    },
    AllBlocksCleared,
}

/// A decoded vLLM `KVEventBatch` plus the sequence number from its ZeroMQ frame.
#[derive(Clone, Debug, PartialEq)]
pub struct VllmEventBatch {
    pub seq: u64,
    pub ts: f64,
    pub data_parallel_rank: Option<i64>,
    pub events: Vec<VllmKvEvent>,
}

/// Parse vLLM's 8-byte big-endian sequence frame.
pub fn parse_vllm_seq(frame: &[u8]) -> Result<u64, VllmDecodeError> {
    let bytes: [u8; 8] = frame
        .try_into()
        .map_err(|_| VllmDecodeError::BadSeqFrame(frame.len()))?;
    Ok(u64::from_be_bytes(bytes))
}

/// Decode one vLLM payload (the third multipart frame). Never panics: any input that is not
/// a well-formed `KVEventBatch` in either layout is an error.
pub fn decode_vllm_batch(seq: u64, payload: &[u8]) -> Result<VllmEventBatch, VllmDecodeError> {
    let value: Mp =
        rmp_serde::from_slice(payload).map_err(|e| VllmDecodeError::MsgPack(e.to_string()))?;
    let (ts, events, dp_rank) = match value {
        Mp::Arr(mut items) => {
            if items.len() < 2 || items.len() > 3 {
                return Err(shape("batch", format!("{} elements", items.len())));
            }
            let dp = if items.len() == 3 { items.pop() } else { None };
            let events = items.pop();
            let ts = items.pop();
            (ts, events, dp)
        }
        Mp::Map(entries) => {
            let mut fields = Fields::new(entries);
            (
                fields.take("ts"),
                fields.take("events"),
                fields.take("data_parallel_rank"),
            )
        }
        other => return Err(shape("batch", other.kind())),
    };
    let ts = match ts {
        Some(Mp::F64(f)) => f,
        Some(Mp::Int(i)) => i as f64,
        other => return Err(shape("batch.ts", kind_of(&other))),
    };
    let Some(Mp::Arr(raw_events)) = events else {
        return Err(shape("batch.events", kind_of(&events)));
    };
    let data_parallel_rank = match dp_rank {
        None | Some(Mp::Nil) => None,
        Some(Mp::Int(i)) => Some(i64::try_from(i).map_err(|_| shape("batch.dp_rank", "range"))?),
        other => return Err(shape("batch.dp_rank", kind_of(&other))),
    };
    let events = raw_events
        .into_iter()
        .map(decode_event)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(VllmEventBatch {
        seq,
        ts,
        data_parallel_rank,
        events,
    })
}

fn decode_event(value: Mp) -> Result<VllmKvEvent, VllmDecodeError> {
    // Normalise both layouts to (tag, named fields).
    let (tag, mut fields) = match value {
        Mp::Arr(items) => {
            let mut it = items.into_iter();
            let tag = match it.next() {
                Some(Mp::Str(s)) => s,
                other => return Err(shape("event.tag", kind_of(&other))),
            };
            let names: &[&'static str] = match tag.as_str() {
                "BlockStored" => &[
                    "block_hashes",
                    "parent_block_hash",
                    "token_ids",
                    "block_size",
                    "lora_id",
                    "medium",
                ],
                "BlockRemoved" => &["block_hashes", "medium"],
                "AllBlocksCleared" => &[],
                _ => return Err(VllmDecodeError::UnknownTag(tag)),
            };
            // Later fields (lora_name, extra_keys, group_idx, ...) are ignored.
            let entries = names
                .iter()
                .zip(it)
                .map(|(n, v)| (Mp::Str((*n).to_string()), v))
                .collect();
            (tag, Fields::new(entries))
        }
        Mp::Map(entries) => {
            let mut fields = Fields::new(entries);
            match fields.take("type") {
                Some(Mp::Str(tag)) => (tag, fields),
                other => return Err(shape("event.type", kind_of(&other))),
            }
        }
        other => return Err(shape("event", other.kind())),
    };
    match tag.as_str() {
        "BlockStored" => {
            let block_hashes = hash_list(fields.take("block_hashes"), "block_hashes")?;
            let parent_block_hash = match fields.take("parent_block_hash") {
                None | Some(Mp::Nil) => None,
                Some(v) => Some(to_hash(v, "parent_block_hash")?),
            };
            let token_ids = match fields.take("token_ids") {
                Some(Mp::Arr(items)) => items
                    .into_iter()
                    .map(|t| match t {
                        Mp::Int(i) => {
                            TokenId::try_from(i).map_err(|_| shape("token_ids", "out of range"))
                        }
                        other => Err(shape("token_ids", other.kind())),
                    })
                    .collect::<Result<Vec<_>, _>>()?,
                other => return Err(shape("token_ids", kind_of(&other))),
            };
            let block_size = match fields.take("block_size") {
                Some(Mp::Int(i)) => u32::try_from(i)
                    .ok()
                    .and_then(BlockSize::new)
                    .ok_or(VllmDecodeError::BadBlockSize(i))?,
                other => return Err(shape("block_size", kind_of(&other))),
            };
            let lora_id = match fields.take("lora_id") {
                None | Some(Mp::Nil) => None,
                Some(Mp::Int(i)) => {
                    Some(u64::try_from(i).map_err(|_| shape("lora_id", "negative"))?)
                }
                Some(other) => return Err(shape("lora_id", other.kind())),
            };
            Ok(VllmKvEvent::BlockStored {
                block_hashes,
                parent_block_hash,
                token_ids,
                block_size,
                lora_id,
                medium: opt_string(fields.take("medium"), "medium")?,
            })
        }
        "BlockRemoved" => Ok(VllmKvEvent::BlockRemoved {
            block_hashes: hash_list(fields.take("block_hashes"), "block_hashes")?,
            medium: opt_string(fields.take("medium"), "medium")?,
        }),
        "AllBlocksCleared" => Ok(VllmKvEvent::AllBlocksCleared),
        _ => Err(VllmDecodeError::UnknownTag(tag)),
    }
}

/// A vLLM block hash as a turbine [`BlockHash`]: integers keep their 64-bit pattern, byte
/// strings are folded with xxh3-64.
pub fn vllm_hash_from_bytes(bytes: &[u8]) -> BlockHash {
    BlockHash(xxhash_rust::xxh3::xxh3_64(bytes))
}

fn to_hash(v: Mp, at: &'static str) -> Result<BlockHash, VllmDecodeError> {
    match v {
        // msgpack integers fit i64 or u64; negative Python hashes keep their bit pattern.
        Mp::Int(i) => Ok(BlockHash(i as u64)),
        Mp::Bin(b) => Ok(vllm_hash_from_bytes(&b)),
        other => Err(shape(at, other.kind())),
    }
}

fn hash_list(v: Option<Mp>, at: &'static str) -> Result<Vec<BlockHash>, VllmDecodeError> {
    match v {
        Some(Mp::Arr(items)) => items.into_iter().map(|h| to_hash(h, at)).collect(),
        other => Err(shape(at, kind_of(&other))),
    }
}

fn opt_string(v: Option<Mp>, at: &'static str) -> Result<Option<String>, VllmDecodeError> {
    match v {
        None | Some(Mp::Nil) => Ok(None),
        Some(Mp::Str(s)) => Ok(Some(s)),
        Some(other) => Err(shape(at, other.kind())),
    }
}

impl VllmEventBatch {
    /// Option 1 of the module docs: a turbine batch keyed by vLLM's own hashes.
    pub fn into_kv_batch(self, worker: WorkerId) -> KvEventBatch {
        let events = self
            .events
            .into_iter()
            .map(|e| match e {
                VllmKvEvent::BlockStored {
                    block_hashes,
                    parent_block_hash,
                    token_ids,
                    block_size,
                    lora_id,
                    ..
                } => KvEvent::BlockStored {
                    block_hashes,
                    parent_block_hash,
                    token_ids,
                    block_size,
                    lora_id,
                },
                VllmKvEvent::BlockRemoved { block_hashes, .. } => {
                    KvEvent::BlockRemoved { block_hashes }
                }
                VllmKvEvent::AllBlocksCleared => KvEvent::AllBlocksCleared,
            })
            .collect();
        KvEventBatch {
            worker,
            seq: self.seq,
            ts: self.ts,
            events,
        }
    }
}

/// Option 2 of the module docs: rewrites one vLLM worker's events into turbine's hash
/// domain by re-hashing each stored block from its tokens and its (translated) parent.
/// One translator per vLLM worker; it remembers vLLM hash → turbine hash for every block
/// the worker still holds.
#[derive(Debug, Default)]
pub struct VllmHashTranslator {
    known: HashMap<BlockHash, BlockHash>,
    unresolved_blocks: u64,
}

impl VllmHashTranslator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Blocks dropped so far because their parent chain was unknown or their tokens did not
    /// fill whole blocks.
    pub fn unresolved_blocks(&self) -> u64 {
        self.unresolved_blocks
    }

    /// Blocks currently remembered.
    pub fn len(&self) -> usize {
        self.known.len()
    }

    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }

    /// Translate a batch into turbine hashes for `worker`. The salt of a stored block is its
    /// `lora_id` (0 for the base model), matching what the router passes for LoRA requests.
    pub fn translate(&mut self, worker: WorkerId, batch: VllmEventBatch) -> KvEventBatch {
        let mut events = Vec::with_capacity(batch.events.len());
        for event in batch.events {
            match event {
                VllmKvEvent::BlockStored {
                    block_hashes,
                    parent_block_hash,
                    token_ids,
                    block_size,
                    lora_id,
                    ..
                } => {
                    if let Some(ev) = self.translate_stored(
                        block_hashes,
                        parent_block_hash,
                        token_ids,
                        block_size,
                        lora_id,
                    ) {
                        events.push(ev);
                    }
                }
                VllmKvEvent::BlockRemoved { block_hashes, .. } => {
                    let ours: Vec<BlockHash> = block_hashes
                        .iter()
                        .filter_map(|h| self.known.remove(h))
                        .collect();
                    if !ours.is_empty() {
                        events.push(KvEvent::BlockRemoved { block_hashes: ours });
                    }
                }
                VllmKvEvent::AllBlocksCleared => {
                    self.known.clear();
                    events.push(KvEvent::AllBlocksCleared);
                }
            }
        }
        KvEventBatch {
            worker,
            seq: batch.seq,
            ts: batch.ts,
            events,
        }
    }

    fn translate_stored(
        &mut self,
        vllm_hashes: Vec<BlockHash>,
        vllm_parent: Option<BlockHash>,
        token_ids: Vec<TokenId>,
        block_size: BlockSize,
        lora_id: Option<u64>,
    ) -> Option<KvEvent> {
        let parent = match vllm_parent {
            None => Some(BlockHash::ROOT),
            Some(p) => self.known.get(&p).copied(),
        };
        let complete = token_ids.len() == vllm_hashes.len() * block_size.as_usize();
        let Some(parent) = parent.filter(|_| complete) else {
            self.unresolved_blocks += vllm_hashes.len() as u64;
            return None;
        };
        let salt = lora_id.unwrap_or(0);
        let mut prev = parent;
        let mut ours = Vec::with_capacity(vllm_hashes.len());
        for (vh, tokens) in vllm_hashes
            .iter()
            .zip(token_ids.chunks_exact(block_size.as_usize()))
        {
            prev = hash_block(prev, tokens, salt);
            self.known.insert(*vh, prev);
            ours.push(prev);
        }
        Some(KvEvent::BlockStored {
            block_hashes: ours,
            parent_block_hash: (parent != BlockHash::ROOT).then_some(parent),
            token_ids,
            block_size,
            lora_id,
        })
    }
}

/// A MessagePack value, just enough to walk vLLM's payloads without trusting their shape.
#[derive(Debug)]
enum Mp {
    Nil,
    Bool,
    Int(i128),
    F64(f64),
    Str(String),
    Bin(Vec<u8>),
    Arr(Vec<Mp>),
    Map(Vec<(Mp, Mp)>),
}

impl Mp {
    fn kind(&self) -> &'static str {
        match self {
            Mp::Nil => "nil",
            Mp::Bool => "bool",
            Mp::Int(_) => "int",
            Mp::F64(_) => "float",
            Mp::Str(_) => "str",
            Mp::Bin(_) => "bin",
            Mp::Arr(_) => "array",
            Mp::Map(_) => "map",
        }
    }
}

fn kind_of(v: &Option<Mp>) -> &'static str {
    v.as_ref().map_or("missing", Mp::kind)
}

/// Named fields of a map-form struct; `take` removes so each field is read once.
struct Fields(Vec<(Mp, Mp)>);

impl Fields {
    fn new(entries: Vec<(Mp, Mp)>) -> Self {
        Fields(entries)
    }

    fn take(&mut self, name: &str) -> Option<Mp> {
        let pos = self
            .0
            .iter()
            .position(|(k, _)| matches!(k, Mp::Str(s) if s == name))?;
        Some(self.0.swap_remove(pos).1)
    }
}

impl<'de> Deserialize<'de> for Mp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Mp, D::Error> {
        d.deserialize_any(MpVisitor)
    }
}

struct MpVisitor;

impl<'de> Visitor<'de> for MpVisitor {
    type Value = Mp;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any MessagePack value")
    }
    fn visit_unit<E>(self) -> Result<Mp, E> {
        Ok(Mp::Nil)
    }
    fn visit_none<E>(self) -> Result<Mp, E> {
        Ok(Mp::Nil)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Mp, D::Error> {
        Mp::deserialize(d)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Mp, E> {
        Ok(Mp::Bool)
    }
    fn visit_i64<E>(self, v: i64) -> Result<Mp, E> {
        Ok(Mp::Int(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Mp, E> {
        Ok(Mp::Int(v.into()))
    }
    fn visit_f32<E>(self, v: f32) -> Result<Mp, E> {
        Ok(Mp::F64(v.into()))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Mp, E> {
        Ok(Mp::F64(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Mp, E> {
        Ok(Mp::Str(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Mp, E> {
        Ok(Mp::Str(v))
    }
    fn visit_bytes<E>(self, v: &[u8]) -> Result<Mp, E> {
        Ok(Mp::Bin(v.to_vec()))
    }
    fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Mp, E> {
        Ok(Mp::Bin(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Mp, A::Error> {
        // Cap the pre-allocation: the length prefix comes from the network.
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Mp::Arr(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Mp, A::Error> {
        let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0).min(64));
        while let Some((k, v)) = map.next_entry()? {
            entries.push((k, v));
        }
        Ok(Mp::Map(entries))
    }
    fn visit_enum<A: de::EnumAccess<'de>>(self, _: A) -> Result<Mp, A::Error> {
        Err(de::Error::custom("msgpack ext types are not expected"))
    }
}
