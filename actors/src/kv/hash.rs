//! Block hashing: the one definition of "the same KV block" across the cluster.
//!
//! A block is `block_size` consecutive tokens. Its *sequence hash* is
//! `xxh3_64(parent_sequence_hash_le ‖ token_ids as little-endian u32 ‖ salt_le)`, so two
//! blocks are equal only when their whole prefix is equal. The first block's parent is
//! [`BlockHash::ROOT`]. Partial (trailing) blocks are never hashed: they can still change.
//!
//! The salt separates content that shares token ids but not KV values (a LoRA adapter, or
//! multimodal embeddings behind placeholder tokens). Salt 0 means "base model, text only".

use crate::ids::TokenId;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::hash::Hasher;
use xxhash_rust::xxh3::{xxh3_64, Xxh3};

/// Sequence hash of a full block and everything before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BlockHash(pub u64);

impl BlockHash {
    /// The parent of a sequence's first block.
    pub const ROOT: BlockHash = BlockHash(0);
}

impl fmt::Display for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Hash of one block's tokens alone (no parent). Useful to compare content independent of
/// position, e.g. when ingesting another engine's events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LocalBlockHash(pub u64);

/// Number of tokens per KV block. Never zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct BlockSize(u32);

impl BlockSize {
    /// turbine's default, as in vLLM.
    pub const DEFAULT: BlockSize = BlockSize(16);

    pub fn new(tokens: u32) -> Option<BlockSize> {
        (tokens > 0).then_some(BlockSize(tokens))
    }

    pub fn get(self) -> u32 {
        self.0
    }

    pub fn as_usize(self) -> usize {
        self.0 as usize
    }

    /// Full blocks in `tokens` tokens.
    pub fn full_blocks(self, tokens: usize) -> usize {
        tokens / self.as_usize()
    }

    /// Blocks needed to hold `tokens` tokens (the last one possibly partial).
    pub fn blocks_for(self, tokens: usize) -> usize {
        tokens.div_ceil(self.as_usize())
    }
}

impl Default for BlockSize {
    fn default() -> Self {
        BlockSize::DEFAULT
    }
}

impl TryFrom<u32> for BlockSize {
    type Error = String;
    fn try_from(v: u32) -> Result<Self, Self::Error> {
        BlockSize::new(v).ok_or_else(|| "block_size must be at least 1".to_string())
    }
}

impl From<BlockSize> for u32 {
    fn from(b: BlockSize) -> u32 {
        b.0
    }
}

/// Tokens of a block hashed from one stack buffer; longer blocks are hashed in pieces of
/// this many tokens (one streaming update per piece).
const STACK_TOKENS: usize = 64;

/// Sequence hash of one block given its parent's.
///
/// The bytes are exactly `parent_le ‖ tokens as little-endian u32 ‖ salt_le`. They are laid
/// out in one stack buffer and hashed with a single one-shot call: feeding xxh3's streaming
/// state 4 bytes at a time cost several times more than the hashing itself.
pub fn hash_block(parent: BlockHash, tokens: &[TokenId], salt: u64) -> BlockHash {
    let mut buf = [0u8; 8 + 4 * STACK_TOKENS + 8];
    if tokens.len() <= STACK_TOKENS {
        let end = 8 + 4 * tokens.len();
        buf[..8].copy_from_slice(&parent.0.to_le_bytes());
        put_tokens(&mut buf[8..end], tokens);
        buf[end..end + 8].copy_from_slice(&salt.to_le_bytes());
        return BlockHash(xxh3_64(&buf[..end + 8]));
    }
    let mut h = Xxh3::new();
    h.update(&parent.0.to_le_bytes());
    for piece in tokens.chunks(STACK_TOKENS) {
        let n = 4 * piece.len();
        put_tokens(&mut buf[..n], piece);
        h.update(&buf[..n]);
    }
    h.update(&salt.to_le_bytes());
    BlockHash(h.digest())
}

/// Writes `tokens` as little-endian u32s into `out` (exactly `4 * tokens.len()` bytes).
#[inline]
fn put_tokens(out: &mut [u8], tokens: &[TokenId]) {
    for (dst, t) in out.chunks_exact_mut(4).zip(tokens) {
        dst.copy_from_slice(&t.to_le_bytes());
    }
}

/// Hash of one block's tokens with no parent.
pub fn local_block_hash(tokens: &[TokenId]) -> LocalBlockHash {
    let mut buf = [0u8; 4 * STACK_TOKENS];
    if tokens.len() <= STACK_TOKENS {
        let n = 4 * tokens.len();
        put_tokens(&mut buf[..n], tokens);
        return LocalBlockHash(xxh3_64(&buf[..n]));
    }
    let mut h = Xxh3::new();
    for piece in tokens.chunks(STACK_TOKENS) {
        let n = 4 * piece.len();
        put_tokens(&mut buf[..n], piece);
        h.update(&buf[..n]);
    }
    LocalBlockHash(h.digest())
}

/// The salts of a prompt with images: a block is salted by every image whose placeholder
/// tokens start inside it or before it (folded into one value, in prompt order), so the
/// same text with another image is another chain from the image's first block on, the same
/// image is the same chain, and the text before the first image stays shared with
/// text-only prompts. With no images every block has the base salt.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageSalts {
    /// (first placeholder position, salt folded over this image and the ones before).
    marks: Vec<(usize, u64)>,
}

impl ImageSalts {
    /// From each image's (first placeholder position, content hash), in prompt order.
    pub fn new(images: impl IntoIterator<Item = (usize, u64)>) -> ImageSalts {
        let mut folded = 0u64;
        let marks = images
            .into_iter()
            .map(|(pos, hash)| {
                let mut buf = [0u8; 16];
                buf[..8].copy_from_slice(&folded.to_le_bytes());
                buf[8..].copy_from_slice(&hash.to_le_bytes());
                folded = xxh3_64(&buf);
                (pos, folded)
            })
            .collect();
        ImageSalts { marks }
    }

    pub fn is_empty(&self) -> bool {
        self.marks.is_empty()
    }

    /// The salt of the block that ends before token `end`.
    pub fn salt_of_block(&self, base: u64, end: usize) -> u64 {
        match self.marks.iter().rev().find(|(pos, _)| *pos < end) {
            Some((_, folded)) => base ^ folded,
            None => base,
        }
    }

    /// [`hash_blocks`] with these salts.
    pub fn hash_blocks(
        &self,
        tokens: &[TokenId],
        block_size: BlockSize,
        base: u64,
    ) -> Vec<BlockHash> {
        if self.marks.is_empty() {
            return hash_blocks(tokens, block_size, base);
        }
        let bs = block_size.as_usize();
        let mut out = Vec::with_capacity(block_size.full_blocks(tokens.len()));
        let mut prev = BlockHash::ROOT;
        for (i, chunk) in tokens.chunks_exact(bs).enumerate() {
            prev = hash_block(prev, chunk, self.salt_of_block(base, (i + 1) * bs));
            out.push(prev);
        }
        out
    }
}

/// Sequence hashes of every *full* block of `tokens`, in order. The trailing partial block,
/// if any, is not hashed.
pub fn hash_blocks(tokens: &[TokenId], block_size: BlockSize, salt: u64) -> Vec<BlockHash> {
    extend_block_hashes(BlockHash::ROOT, tokens, block_size, salt)
}

/// Sequence hashes of the full blocks of `tokens`, continuing a chain whose last hash is
/// `parent`. Lets a worker hash new blocks as decode fills them without rehashing the prefix.
pub fn extend_block_hashes(
    parent: BlockHash,
    tokens: &[TokenId],
    block_size: BlockSize,
    salt: u64,
) -> Vec<BlockHash> {
    let mut out = Vec::with_capacity(block_size.full_blocks(tokens.len()));
    let mut prev = parent;
    for chunk in tokens.chunks_exact(block_size.as_usize()) {
        prev = hash_block(prev, chunk, salt);
        out.push(prev);
    }
    out
}

/// Hasher for keys that are already hashes (sequence hashes, worker ids): one multiply-mix
/// instead of SipHash, which would cost more than the map probe itself.
#[derive(Default, Clone, Copy)]
pub struct PreHashed(u64);

impl Hasher for PreHashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, v: u64) {
        let x = (self.0 ^ v).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.0 = x ^ (x >> 29);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_salts_split_chains_from_the_image_block_on() {
        let bs = BlockSize::new(4).unwrap();
        let tokens: Vec<u32> = (0..16).collect();
        let text = hash_blocks(&tokens, bs, 0);
        let a = ImageSalts::new([(5, 111)]).hash_blocks(&tokens, bs, 0);
        let a2 = ImageSalts::new([(5, 111)]).hash_blocks(&tokens, bs, 0);
        let b = ImageSalts::new([(5, 222)]).hash_blocks(&tokens, bs, 0);
        assert_eq!(a, a2);
        // Block 0 (tokens 0..4) is before the image: shared with text and the other image.
        assert_eq!(a[0], text[0]);
        assert_eq!(a[0], b[0]);
        for i in 1..4 {
            assert_ne!(a[i], text[i]);
            assert_ne!(a[i], b[i]);
        }
        assert!(ImageSalts::new([]).hash_blocks(&tokens, bs, 7) == hash_blocks(&tokens, bs, 7));
    }
    use proptest::prelude::*;

    #[test]
    fn partial_block_is_not_hashed() {
        let bs = BlockSize::new(4).unwrap();
        assert_eq!(hash_blocks(&[1, 2, 3], bs, 0).len(), 0);
        assert_eq!(hash_blocks(&[1, 2, 3, 4, 5], bs, 0).len(), 1);
    }

    /// Hashes computed from the byte layout in the module docs by an independent xxh3
    /// implementation (Python `xxhash.xxh3_64`), and equal to the hashes of the original
    /// token-at-a-time implementation: workers, indexer, router and the simulator's logs
    /// must keep seeing exactly these values.
    #[test]
    fn hashes_are_pinned() {
        let first: Vec<TokenId> = (0..16).collect();
        let second: Vec<TokenId> = (16..32).collect();
        let h1 = hash_block(BlockHash::ROOT, &first, 0);
        assert_eq!(h1, BlockHash(0x12c6_eb9d_86b1_0205));
        assert_eq!(hash_block(h1, &second, 0), BlockHash(0xc75c_ae55_195a_f245));
        assert_eq!(
            hash_blocks(&(0..32).collect::<Vec<_>>(), BlockSize::DEFAULT, 0),
            vec![h1, BlockHash(0xc75c_ae55_195a_f245)]
        );
        assert_eq!(
            hash_block(BlockHash::ROOT, &first, 7),
            BlockHash(0xc7bf_9e14_7463_0c41)
        );
        assert_eq!(
            hash_block(
                BlockHash(0x0123_4567_89ab_cdef),
                &[u32::MAX, 0, 123_456, 50_000],
                0
            ),
            BlockHash(0xbe10_b7dd_7767_cf5a)
        );
        assert_eq!(
            local_block_hash(&first),
            LocalBlockHash(0x79c2_079c_74a8_ee4d)
        );
        assert_eq!(local_block_hash(&[]), LocalBlockHash(0x2d06_8005_38d3_94c2));
    }

    /// Blocks longer than the stack buffer (hashed in pieces) equal hashing the whole byte
    /// layout at once.
    #[test]
    fn long_blocks_hash_the_same_bytes() {
        for n in [0usize, 1, 63, 64, 65, 200] {
            let tokens: Vec<TokenId> = (0..n as u32)
                .map(|t| t.wrapping_mul(2_654_435_761))
                .collect();
            let mut bytes = 42u64.to_le_bytes().to_vec();
            bytes.extend(tokens.iter().flat_map(|t| t.to_le_bytes()));
            bytes.extend(9u64.to_le_bytes());
            assert_eq!(
                hash_block(BlockHash(42), &tokens, 9),
                BlockHash(xxh3_64(&bytes))
            );
            let local: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
            assert_eq!(local_block_hash(&tokens), LocalBlockHash(xxh3_64(&local)));
        }
    }

    #[test]
    fn zero_block_size_is_rejected() {
        assert!(BlockSize::new(0).is_none());
        assert!(serde_json::from_str::<BlockSize>("0").is_err());
    }

    proptest! {
        /// A block's hash depends on its whole prefix: sequences that share a prefix share
        /// exactly the hashes of the blocks inside it.
        #[test]
        fn shared_prefix_shares_exactly_its_hashes(
            prefix in proptest::collection::vec(0u32..50_000, 0..100),
            a in proptest::collection::vec(0u32..50_000, 1..60),
            b in proptest::collection::vec(0u32..50_000, 1..60),
            bs in 1u32..20,
        ) {
            prop_assume!(a[0] != b[0]);
            let bs = BlockSize::new(bs).unwrap();
            let mut sa = prefix.clone(); sa.extend(&a);
            let mut sb = prefix.clone(); sb.extend(&b);
            let ha = hash_blocks(&sa, bs, 0);
            let hb = hash_blocks(&sb, bs, 0);
            let common = bs.full_blocks(prefix.len());
            prop_assert_eq!(&ha[..common], &hb[..common]);
            for (x, y) in ha.iter().zip(hb.iter()).skip(common) {
                prop_assert_ne!(x, y);
            }
        }

        /// Extending a chain block by block equals hashing the whole sequence at once.
        #[test]
        fn extend_matches_whole(tokens in proptest::collection::vec(any::<u32>(), 0..200), bs in 1u32..17, split in 0usize..20) {
            let bs = BlockSize::new(bs).unwrap();
            let whole = hash_blocks(&tokens, bs, 7);
            let cut = (split * bs.as_usize()).min(bs.full_blocks(tokens.len()) * bs.as_usize());
            let mut parts = hash_blocks(&tokens[..cut], bs, 7);
            let parent = parts.last().copied().unwrap_or(BlockHash::ROOT);
            parts.extend(extend_block_hashes(parent, &tokens[cut..], bs, 7));
            prop_assert_eq!(whole, parts);
        }

        /// A different salt (LoRA, multimodal content) never collides with the base hash.
        #[test]
        fn salt_separates(tokens in proptest::collection::vec(any::<u32>(), 16..64), salt in 1u64..) {
            let bs = BlockSize::DEFAULT;
            prop_assert_ne!(hash_blocks(&tokens, bs, 0), hash_blocks(&tokens, bs, salt));
        }
    }
}
