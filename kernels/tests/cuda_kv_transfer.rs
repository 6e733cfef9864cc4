//! Disaggregated serving on one GPU: a prefill backend runs the prompt, its KV blocks move to
//! a decode backend (device to device with no host round trip, or through page-locked host
//! memory layer by layer on the copy streams), and the decode backend's greedy tokens equal
//! one backend doing both. The moved bytes are compared exactly. Skips, with the reason
//! printed, when no CUDA device is usable.

use turbine_kernels::backend::{Backend, SeqStep};
use turbine_kernels::cuda::{synthetic_config, CudaBackend, CudaBackendOptions, PinnedBytes};

const BS: usize = 16;
const STEPS: usize = 12;

use crate::support::cuda_device_present as usable;

fn backend(seed_kv: Option<u64>) -> CudaBackend {
    let config = synthetic_config("tiny").unwrap();
    let mut b = CudaBackend::synthetic(
        config,
        7,
        CudaBackendOptions {
            device: 0,
            num_blocks: 64,
            block_size: BS,
        },
    )
    .expect("a backend");
    if let Some(seed) = seed_kv {
        // Garbage where the KV will land: a block the transfer missed changes the tokens.
        b.randomize_kv(seed).unwrap();
    }
    b
}

fn prefill(b: &mut CudaBackend, prompt: &[u32], table: &[u32]) -> u32 {
    b.forward_greedy(&[SeqStep {
        tokens: prompt,
        start_pos: 0,
        block_table: table,
        want_logits: true,
    }])
    .unwrap()[0]
}

/// Greedy decode from `first` (sampled after `prompt_len` positions), `STEPS` tokens.
fn decode(b: &mut CudaBackend, first: u32, prompt_len: usize, table: &[u32]) -> Vec<u32> {
    let mut out = vec![first];
    for i in 0..STEPS {
        let tok = out[i];
        let next = b
            .forward_greedy(&[SeqStep {
                tokens: std::slice::from_ref(&tok),
                start_pos: prompt_len + i,
                block_table: table,
                want_logits: true,
            }])
            .unwrap()[0];
        out.push(next);
    }
    out
}

#[test]
fn two_backends_on_one_device_move_kv_and_decode_like_one() {
    if !usable() {
        return;
    }
    let prompt: Vec<u32> = (0..70u32).map(|i| (i * 37 + 11) % 1000).collect();
    let blocks = prompt.len().div_ceil(BS); // 5: the last one partial
    let total = (prompt.len() + STEPS + 1).div_ceil(BS);

    // Aggregated: one backend prefills and decodes.
    let mut agg = backend(None);
    let agg_table: Vec<u32> = (0..total as u32).collect();
    let first = prefill(&mut agg, &prompt, &agg_table);
    let reference = decode(&mut agg, first, prompt.len(), &agg_table);

    // Disaggregated: the prefill backend's blocks are scattered, the decode backend's too.
    let mut p = backend(None);
    let p_table: Vec<u32> = [9, 3, 17, 5, 30, 41].into_iter().take(total).collect();
    assert_eq!(
        prefill(&mut p, &prompt, &p_table),
        first,
        "same first token"
    );
    let src = &p_table[..blocks];
    let exported = p.export_blocks(src).unwrap();

    // 1. Device to device, pool to pool.
    let mut d = backend(Some(3));
    let d_table: Vec<u32> = [40, 2, 33, 8, 21, 60].into_iter().take(total).collect();
    let took = d
        .pull_blocks_device(&p.kv_pool(), src, &d_table[..blocks])
        .unwrap();
    assert_eq!(
        d.export_blocks(&d_table[..blocks]).unwrap(),
        exported,
        "the device copy moved every byte"
    );
    let got = decode(&mut d, first, prompt.len(), &d_table);
    println!("device copy: {blocks} blocks in {took:?}; greedy {got:?}");
    assert_eq!(got, reference, "device copy: greedy equals aggregated");

    // 2. Through page-locked host memory, layer by layer on both copy streams.
    let mut h = backend(Some(5));
    let h_table: Vec<u32> = [1, 50, 12, 27, 44, 7].into_iter().take(total).collect();
    let host = PinnedBytes::new(p.gpu(), p.export_bytes(blocks)).unwrap();
    let job = p.start_export(src, host).unwrap();
    let mut import = h.start_import(&h_table[..blocks]).unwrap();
    for l in 0..job.layers() {
        // Each layer goes on as soon as its own copy is done.
        let chunk = job.layer(l).unwrap().to_vec();
        h.import_layer(&mut import, l, &chunk).unwrap();
    }
    let (host, out_t) = job.finish().unwrap();
    let in_t = h.finish_import(import).unwrap();
    assert_eq!(
        h.export_blocks(&h_table[..blocks]).unwrap(),
        exported,
        "the host path moved every byte"
    );
    let got = decode(&mut h, first, prompt.len(), &h_table);
    println!("pinned host: export {out_t:?}, import {in_t:?}; greedy {got:?}");
    assert_eq!(got, reference, "pinned host path: greedy equals aggregated");

    // 3. The same chunks imported straight from the pinned buffer, into a fresh backend.
    let mut q = backend(Some(9));
    let mut import = q.start_import(&d_table[..blocks]).unwrap();
    q.import_pinned(&mut import, &host).unwrap();
    q.finish_import(import).unwrap();
    assert_eq!(decode(&mut q, first, prompt.len(), &d_table), reference);

    // Refusals: a block out of range, a pool of another shape.
    assert!(d.pull_blocks_device(&p.kv_pool(), &[64], &[0]).is_err());
    let mut other = p.kv_pool();
    other.layout.n_layers += 1;
    assert!(d.pull_blocks_device(&other, &[0], &[0]).is_err());
}

/// What a GPU worker's executor calls: `export_layer_chunks` (slices of a page-locked buffer
/// from the backend's pool) and `import_layer_chunks`, straight from those slices (DMA, as a
/// pull in one process hands them over) and from ordinary memory (as a pull over a socket
/// delivers them). Both move every byte, and the decode equals aggregated serving.
#[test]
fn layer_chunks_from_pinned_and_pageable_memory_move_every_byte() {
    if !usable() {
        return;
    }
    let prompt: Vec<u32> = (0..70u32).map(|i| (i * 53 + 5) % 1000).collect();
    let blocks = prompt.len().div_ceil(BS);
    let total = (prompt.len() + STEPS + 1).div_ceil(BS);
    let mut agg = backend(None);
    let agg_table: Vec<u32> = (0..total as u32).collect();
    let first = prefill(&mut agg, &prompt, &agg_table);
    let reference = decode(&mut agg, first, prompt.len(), &agg_table);

    let mut p = backend(None);
    let p_table: Vec<u32> = [9, 3, 17, 5, 30, 41].into_iter().take(total).collect();
    assert_eq!(prefill(&mut p, &prompt, &p_table), first);
    let src = &p_table[..blocks];
    let exported = p.export_blocks(src).unwrap();
    let chunks = p.export_layer_chunks(src).unwrap();
    let layout = p.kv_layout();
    assert_eq!(chunks.len(), layout.n_layers);
    assert!(
        chunks.iter().all(|c| p.gpu().is_page_locked(c)),
        "exported chunks live in page-locked memory"
    );
    assert_eq!(
        turbine_kernels::kv_chunks::to_block_major(&layout, blocks, &chunks).unwrap(),
        exported,
        "the chunks hold the blocks' bytes, layer by layer"
    );

    // Straight from the page-locked slices.
    let mut d = backend(Some(11));
    let d_table: Vec<u32> = [40, 2, 33, 8, 21, 60].into_iter().take(total).collect();
    d.import_layer_chunks(&d_table[..blocks], &chunks).unwrap();
    assert_eq!(d.export_blocks(&d_table[..blocks]).unwrap(), exported);
    assert_eq!(decode(&mut d, first, prompt.len(), &d_table), reference);

    // From ordinary memory (copies of the chunks, as a socket delivers them).
    let pageable: Vec<bytes::Bytes> = chunks
        .iter()
        .map(|c| bytes::Bytes::from(c.to_vec()))
        .collect();
    assert!(!p.gpu().is_page_locked(&pageable[0]));
    let mut e = backend(Some(13));
    e.import_layer_chunks(&d_table[..blocks], &pageable)
        .unwrap();
    assert_eq!(e.export_blocks(&d_table[..blocks]).unwrap(), exported);
    assert_eq!(decode(&mut e, first, prompt.len(), &d_table), reference);

    // The exporter outlives nothing: chunks dropped after their backend free their buffer.
    drop(p);
    drop(chunks);
    // Wrong sizes are refused, not written.
    let short = vec![bytes::Bytes::from(vec![0u8; 3]); layout.n_layers];
    assert!(e.import_layer_chunks(&d_table[..blocks], &short).is_err());
}
