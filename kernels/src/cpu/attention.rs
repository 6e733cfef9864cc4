//! Grouped-query attention over the paged KV pool.
//!
//! The batch's tokens come as runs: consecutive tokens of one sequence (a prefill chunk, or
//! one decode token). Work is split into tiles of one run's consecutive tokens against one
//! KV head, so every query head of the group and every token of the tile reads each cached
//! K/V row once per tile instead of once per (token, head). Within a tile, for each query
//! row: scores against every cached position up to its own (causal within the chunk, and
//! everything cached before it), softmax, then the weighted sum of V rows. The inner loops
//! are in [`super::attention_simd`] (AVX2+FMA when present, portable otherwise).
//!
//! Precision: K and V are stored rounded to f16 (see `kv_cache`), and like llama.cpp's
//! (non-flash) attention, which multiplies in f16 with f32 accumulation, the query and the
//! normalised attention weights are rounded to f16 before their dot products. That keeps
//! greedy decoding on real models token-for-token with llama.cpp where f32 attention would
//! drift on near-ties.

use super::attention_simd::Isa;
use crate::kv_cache::PagedKvPool;
use rayon::prelude::*;
use std::ops::Range;
use std::sync::OnceLock;

pub use super::attention_simd::round_f16;

/// Where one token of the flattened batch sits.
#[derive(Clone, Copy, Debug)]
pub struct TokenSlot<'a> {
    pub pos: usize,
    pub block_table: &'a [u32],
}

pub struct AttentionShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
}

/// Below this much work (query heads x positions attended) attention runs on the calling
/// thread: waking the pool would cost more than it saves. A decode token at a few hundred
/// positions is already worth splitting (its K/V streams from memory).
const PARALLEL_WORK: usize = 2 * 1024;
/// Most tokens in one tile; fewer for long contexts so a tile's scores (query rows x
/// positions) stay within L2.
const MAX_TILE_TOKENS: usize = 16;
const SCORE_FLOATS_PER_TILE: usize = 256 * 1024;

fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(Isa::detect)
}

/// `out[t][h] = softmax(q[t][h] . K[0..=pos_t] / sqrt(d)) V[0..=pos_t]` for every token `t`
/// and query head `h` (KV head `h / group`). `q` and `out` are `[tokens][n_heads][head_dim]`.
/// The new tokens' K/V must already be in the pool.
pub fn attention(
    pool: &PagedKvPool,
    layer: usize,
    shape: &AttentionShape,
    tokens: &[TokenSlot<'_>],
    q: &[f32],
    out: &mut [f32],
) {
    attention_with(isa(), pool, layer, shape, tokens, q, out)
}

/// [`attention`] with a chosen implementation of the inner loops (tests compare them).
pub fn attention_with(
    isa: Isa,
    pool: &PagedKvPool,
    layer: usize,
    shape: &AttentionShape,
    tokens: &[TokenSlot<'_>],
    q: &[f32],
    out: &mut [f32],
) {
    let group = (shape.n_heads / shape.n_kv_heads.max(1)).max(1);
    let work: usize = tokens.iter().map(|t| t.pos + 1).sum::<usize>() * shape.n_heads;
    let parallel = work >= PARALLEL_WORK;
    let threads = if parallel {
        rayon::current_num_threads()
    } else {
        1
    };
    let tiles = tiles(tokens, shape.n_heads, shape.n_kv_heads, threads);
    let run = |tile: &Tile| tile_attention(isa, pool, layer, shape, group, tokens, q, tile);
    let results: Vec<Vec<f32>> = if parallel {
        tiles.par_iter().map(run).collect()
    } else {
        tiles.iter().map(run).collect()
    };
    let hd = shape.head_dim;
    for (tile, rows) in tiles.iter().zip(&results) {
        let heads = tile.heads(group);
        for (ti, t) in tile.tokens.clone().enumerate() {
            let src = ti * heads.len() * hd..(ti + 1) * heads.len() * hd;
            let dst = (t * shape.n_heads + heads.start) * hd;
            if let (Some(d), Some(s)) = (out.get_mut(dst..dst + src.len()), rows.get(src)) {
                d.copy_from_slice(s);
            }
        }
    }
}

/// Consecutive tokens of one run, against a range of KV heads (all of them unless one
/// long decode token is split across threads).
#[derive(Debug)]
struct Tile {
    tokens: Range<usize>,
    kv_heads: Range<usize>,
}

impl Tile {
    /// The query heads this tile computes.
    fn heads(&self, group: usize) -> Range<usize> {
        self.kv_heads.start * group..self.kv_heads.end * group
    }
}

/// Splits the batch into runs (same block table, consecutive positions) and the runs into
/// tiles of consecutive tokens. A run that makes a single tile (a decode token) is split by
/// KV heads instead, across `threads`.
fn tiles(tokens: &[TokenSlot<'_>], n_heads: usize, n_kv_heads: usize, threads: usize) -> Vec<Tile> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < tokens.len() {
        let mut end = start + 1;
        while end < tokens.len()
            && std::ptr::eq(tokens[end].block_table, tokens[start].block_table)
            && tokens[end].pos == tokens[end - 1].pos + 1
        {
            end += 1;
        }
        let len = tokens[end - 1].pos + 1;
        let per_tile = (SCORE_FLOATS_PER_TILE / (n_heads * len)).clamp(1, MAX_TILE_TOKENS);
        if end - start <= per_tile && threads > 1 && n_kv_heads > 1 {
            let parts = threads.min(n_kv_heads);
            for p in 0..parts {
                out.push(Tile {
                    tokens: start..end,
                    kv_heads: p * n_kv_heads / parts..(p + 1) * n_kv_heads / parts,
                });
            }
        } else {
            for t0 in (start..end).step_by(per_tile) {
                out.push(Tile {
                    tokens: t0..(t0 + per_tile).min(end),
                    kv_heads: 0..n_kv_heads,
                });
            }
        }
        start = end;
    }
    out
}

/// Blocks ahead of the one being read whose K (or V) is prefetched: the pool is far larger
/// than the caches at long contexts, and a block's rows are read once per step.
const PREFETCH_AHEAD: usize = 2;

/// Asks the CPU to start loading block `b`'s K or V (a hint; no effect off x86-64).
#[inline]
fn prefetch_block(blocks: &[(&[u16], &[u16])], b: usize, values: bool) {
    #[cfg(target_arch = "x86_64")]
    if let Some(&(k, v)) = blocks.get(b) {
        let data = if values { v } else { k };
        for line in data.chunks(32) {
            // SAFETY: prefetching is a hint that never faults; the pointer is in bounds.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    line.as_ptr() as *const i8
                )
            };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (blocks, b, values);
}

/// One tile's output rows, `[token][query head of the tile][head_dim]`.
///
/// Cached rows are visited block by block, every KV head of the tile within a block, so the
/// pool is read in address order (a block's K for one layer is contiguous) and each row is
/// read once for all the query rows that attend to it. Query rows are processed in pairs
/// that share a KV head (two heads of a group, or one head at two tokens).
#[allow(clippy::too_many_arguments)]
fn tile_attention(
    isa: Isa,
    pool: &PagedKvPool,
    layer: usize,
    shape: &AttentionShape,
    group: usize,
    tokens: &[TokenSlot<'_>],
    q: &[f32],
    tile: &Tile,
) -> Vec<f32> {
    let hd = shape.head_dim;
    let toks = &tokens[tile.tokens.clone()];
    let heads = tile.heads(group);
    let n_rows = toks.len() * heads.len();
    let mut acc = vec![0.0f32; n_rows * hd];
    let Some(last) = toks.last() else {
        return acc;
    };
    let bs = shape.block_size;
    let row = shape.n_kv_heads * hd;
    let blocks: Vec<(&[u16], &[u16])> = last
        .block_table
        .iter()
        .take((last.pos + 1).div_ceil(bs))
        .map(|&b| pool.block(layer, b))
        .collect();
    let len = (last.pos + 1).min(blocks.len() * bs);
    if len == 0 {
        return acc;
    }
    // Cached row `j` of KV head `g`, K or V.
    let at = |kv: bool, g: usize, j: usize| -> &[u16] {
        let (kb, vb) = blocks[j / bs];
        let o = (j % bs) * row + g * hd;
        if kv { vb } else { kb }.get(o..o + hd).unwrap_or(&[])
    };

    // Query rows (token-major, then head), rounded to f16; how far each one sees.
    let mut qrows = vec![0.0f32; n_rows * hd];
    let mut visible = Vec::with_capacity(n_rows);
    for (ti, (t, tok)) in tile.tokens.clone().zip(toks).enumerate() {
        for (hi, h) in heads.clone().enumerate() {
            let src = (t * shape.n_heads + h) * hd;
            let m = ti * heads.len() + hi;
            if let Some(s) = q.get(src..src + hd) {
                for (d, &x) in qrows[m * hd..(m + 1) * hd].iter_mut().zip(s) {
                    *d = round_f16(x);
                }
            }
            visible.push((tok.pos + 1).min(len));
        }
    }
    // Rows grouped by KV head, then paired: (kv head, first row, second row if any).
    let mut units: Vec<(usize, usize, Option<usize>)> = Vec::new();
    for g in tile.kv_heads.clone() {
        let (per_token, first) = (heads.len(), (g - tile.kv_heads.start) * group);
        let rows: Vec<usize> = (0..toks.len())
            .flat_map(|ti| (0..group).map(move |gi| ti * per_token + first + gi))
            .collect();
        for p in rows.chunks(2) {
            units.push((g, p[0], p.get(1).copied()));
        }
    }
    let qrow = |m: usize| &qrows[m * hd..(m + 1) * hd];
    let reach = |a: usize, b: Option<usize>| b.map_or(visible[a], |b| visible[a].max(visible[b]));

    // Scores, block by block.
    let mut scores = vec![0.0f32; n_rows * len];
    for b0 in (0..len).step_by(bs) {
        let b1 = (b0 + bs).min(len);
        prefetch_block(&blocks, b0 / bs + PREFETCH_AHEAD, false);
        for &(g, m0, m1) in &units {
            let upto = reach(m0, m1).min(b1);
            let mut j = b0;
            while j < upto {
                let k = |i: usize| at(false, g, (j + i).min(len - 1));
                let ks = [k(0), k(1), k(2), k(3)];
                let n = (upto - j).min(4);
                match m1 {
                    Some(m1) => {
                        let s = isa.dots_4keys([qrow(m0), qrow(m1)], ks);
                        scores[m0 * len + j..m0 * len + j + n].copy_from_slice(&s[0][..n]);
                        scores[m1 * len + j..m1 * len + j + n].copy_from_slice(&s[1][..n]);
                    }
                    None => {
                        let s = isa.dots_4keys([qrow(m0)], ks);
                        scores[m0 * len + j..m0 * len + j + n].copy_from_slice(&s[0][..n]);
                    }
                }
                j += 4;
            }
        }
    }
    let scale = 1.0 / (hd as f32).sqrt();
    for (s, &v) in scores.chunks_exact_mut(len).zip(&visible) {
        isa.softmax_f16(&mut s[..v], scale);
        s[v..].fill(0.0);
    }

    // Weighted sums of the value rows, block by block, positions in order for every row.
    let mut vrows: Vec<&[u16]> = Vec::with_capacity(bs);
    for b0 in (0..len).step_by(bs) {
        let b1 = (b0 + bs).min(len);
        prefetch_block(&blocks, b0 / bs + PREFETCH_AHEAD, true);
        for &(g, m0, m1) in &units {
            let upto = reach(m0, m1).min(b1);
            if upto <= b0 {
                continue;
            }
            vrows.clear();
            vrows.extend((b0..upto).map(|j| at(true, g, j)));
            let w = |m: usize| &scores[m * len + b0..m * len + upto];
            match m1 {
                Some(m1) => {
                    // Pairs are in row order (m0 < m1), so one split separates them.
                    let (head, tail) = acc.split_at_mut(m1 * hd);
                    let (a0, a1) = (&mut head[m0 * hd..(m0 + 1) * hd], &mut tail[..hd]);
                    isa.weighted_sum([w(m0), w(m1)], &vrows, [a0, a1]);
                }
                None => {
                    isa.weighted_sum([w(m0)], &vrows, [&mut acc[m0 * hd..(m0 + 1) * hd]]);
                }
            }
        }
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{KvDType, KvLayout};

    /// The definition, one (token, query head) at a time, in plain f32/f64 arithmetic.
    fn reference(
        pool: &PagedKvPool,
        shape: &AttentionShape,
        tokens: &[TokenSlot<'_>],
        q: &[f32],
    ) -> Vec<f32> {
        let (hd, bs) = (shape.head_dim, shape.block_size);
        let group = shape.n_heads / shape.n_kv_heads;
        let mut out = vec![0.0f32; q.len()];
        for (t, tok) in tokens.iter().enumerate() {
            for h in 0..shape.n_heads {
                let qh: Vec<f32> = q[(t * shape.n_heads + h) * hd..][..hd]
                    .iter()
                    .map(|&x| round_f16(x))
                    .collect();
                let off = (h / group) * hd;
                let kv = |p: usize| {
                    let (k, v) = pool.kv_at(0, tok.block_table[p / bs], p % bs);
                    (k[off..off + hd].to_vec(), v[off..off + hd].to_vec())
                };
                let s: Vec<f64> = (0..=tok.pos)
                    .map(|p| {
                        let k = kv(p).0;
                        qh.iter().zip(&k).map(|(a, b)| (a * b) as f64).sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                let o = &mut out[(t * shape.n_heads + h) * hd..][..hd];
                for (p, w) in e.iter().enumerate() {
                    let w = round_f16((w / sum) as f32);
                    for (a, &b) in o.iter_mut().zip(&kv(p).1) {
                        *a += w * b;
                    }
                }
            }
        }
        out
    }

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// Random K/V in a pool, two sequences with interleaved blocks; the batch is a prefill
    /// chunk of the first (starting mid-sequence) and one decode token of the second.
    fn case(n_heads: usize, n_kv_heads: usize, hd: usize, bs: usize, chunk: Range<usize>) {
        let (ctx_a, ctx_b) = (chunk.end, 37);
        let blocks = |n: usize| n.div_ceil(bs);
        let layout = KvLayout {
            block_size: bs,
            num_blocks: 2 * blocks(ctx_a.max(ctx_b)),
            n_layers: 1,
            n_kv_heads,
            head_dim: hd,
            dtype: KvDType::F32,
        };
        let mut pool = PagedKvPool::new(layout);
        let table_a: Vec<u32> = (0..blocks(ctx_a) as u32).map(|b| 2 * b + 1).collect();
        let table_b: Vec<u32> = (0..blocks(ctx_b) as u32).map(|b| 2 * b).collect();
        let mut seed = (n_heads * 1000 + hd * 10 + bs) as u64;
        for (table, ctx) in [(&table_a, ctx_a), (&table_b, ctx_b)] {
            for p in 0..ctx {
                let k: Vec<f32> = (0..n_kv_heads * hd)
                    .map(|_| round_f16(lcg(&mut seed) * 2.0))
                    .collect();
                let v: Vec<f32> = (0..n_kv_heads * hd)
                    .map(|_| round_f16(lcg(&mut seed)))
                    .collect();
                pool.write(0, table[p / bs], p % bs, &k, &v);
            }
        }
        let mut tokens: Vec<TokenSlot<'_>> = chunk
            .clone()
            .map(|pos| TokenSlot {
                pos,
                block_table: &table_a,
            })
            .collect();
        tokens.push(TokenSlot {
            pos: ctx_b - 1,
            block_table: &table_b,
        });
        let q: Vec<f32> = (0..tokens.len() * n_heads * hd)
            .map(|_| lcg(&mut seed) * 3.0)
            .collect();
        let shape = AttentionShape {
            n_heads,
            n_kv_heads,
            head_dim: hd,
            block_size: bs,
        };
        let want = reference(&pool, &shape, &tokens, &q);
        let mut outputs = Vec::new();
        for isa in [Isa::Portable, Isa::detect()] {
            let mut got = vec![f32::NAN; q.len()];
            attention_with(isa, &pool, 0, &shape, &tokens, &q, &mut got);
            outputs.push(got.clone());
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                // One f16 step of a weight (2^-11 relative) on a few positions at most.
                assert!(
                    (a - b).abs() < 2e-3,
                    "{isa:?} heads {n_heads}/{n_kv_heads} hd {hd} bs {bs}: [{i}] {a} vs {b}"
                );
            }
        }
        assert_eq!(
            outputs[0], outputs[1],
            "the two implementations are bit-identical"
        );
    }

    #[test]
    fn tiled_attention_equals_the_definition() {
        case(9, 3, 64, 16, 20..61); // SmolLM2's shape: 41 prefill tokens after 20 cached
        case(8, 2, 128, 16, 0..33); // Llama's head size, a prompt from the start
        case(4, 4, 16, 5, 3..4); // no grouping, blocks not a multiple of 4, one token
        case(6, 2, 12, 16, 0..19); // head_dim not a multiple of 8: portable everywhere
        case(9, 3, 64, 16, 2000..2001); // one long decode token, split by KV heads in parallel
        case(9, 3, 64, 16, 1990..2010); // a chunk at a long context: several tiles
    }

    #[test]
    fn tiles_cover_every_token_and_head_once() {
        let table = [0u32; 1];
        let tokens: Vec<TokenSlot<'_>> = (16_000..16_100)
            .map(|pos| TokenSlot {
                pos,
                block_table: &table,
            })
            .collect();
        let t = tiles(&tokens, 9, 3, 2);
        assert!(t
            .iter()
            .all(|t| t.tokens.len() < MAX_TILE_TOKENS && t.kv_heads == (0..3)));
        assert_eq!(t.iter().map(|t| t.tokens.len()).sum::<usize>(), 100);
        // One decode token on two threads: split by KV heads, every head once.
        let t = tiles(&tokens[..1], 9, 3, 2);
        assert_eq!(
            t.iter().map(|t| t.kv_heads.clone()).collect::<Vec<_>>(),
            [0..1, 1..3]
        );
    }
}
