//! Disaggregated serving on one GPU: a prefill backend runs the prompt, its KV blocks move to
//! a decode backend (device to device with no host round trip, or through page-locked host
//! memory layer by layer on the copy streams), and the decode backend's greedy tokens equal
//! one backend doing both; also between two processes, by the pool's CUDA IPC handle. The
//! moved bytes are compared exactly. Skips, with the reason
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

/// The env var that makes [`ipc_child`] the decode side of
/// [`kv_blocks_move_between_processes_by_ipc_handle`] (a JSON job; unset, it does nothing).
const IPC_CHILD_JOB: &str = "TURBINE_TEST_KV_IPC_JOB";

/// Two processes on one GPU, as a prefill and a decode worker are: this process prefills
/// into a pool and offers its IPC handle; a child process (this test binary again, running
/// [`ipc_child`]) maps the pool, copies the blocks device to device, and sends back the bytes
/// it then holds and its greedy decode, which equal the prefill's bytes and aggregated
/// serving. In this process the driver refuses the handle (a process cannot open its own),
/// and a second backend copies from the offer's own addresses instead.
#[test]
fn kv_blocks_move_between_processes_by_ipc_handle() {
    use turbine_kernels::kv_ipc::IpcPull;
    use turbine_kernels::kv_ipc::{HostReason, KvPath};
    if !usable() {
        return;
    }
    let prompt: Vec<u32> = (0..70u32).map(|i| (i * 29 + 3) % 1000).collect();
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
    let offer = p.kv_ipc_pool().unwrap();
    assert!(offer.well_formed(), "{offer:?}");
    assert_eq!(offer.handle, p.kv_ipc_pool().unwrap().handle, "one handle");

    // This process: told it is another process, the driver refuses to map our own handle
    // (nothing is copied); as it is, the offer's own addresses serve a device copy.
    let mut d = backend(Some(3));
    let d_table: Vec<u32> = [40, 2, 33, 8, 21, 60].into_iter().take(total).collect();
    let mut pretend = offer.clone();
    pretend.place.pid = pretend.place.pid.wrapping_add(1);
    assert_eq!(d.kv_path(Some(&pretend)).unwrap(), KvPath::DeviceIpc);
    match d
        .pull_blocks_ipc(&pretend, src, &d_table[..blocks])
        .unwrap()
    {
        IpcPull::Host(HostReason::OpenFailed(why)) => println!("own handle refused: {why}"),
        other => panic!("our own handle was mapped: {other:?}"),
    }
    assert_eq!(d.ipc_peers_open(), 0);
    assert_ne!(d.export_blocks(&d_table[..blocks]).unwrap(), exported);
    assert_eq!(d.kv_path(Some(&offer)).unwrap(), KvPath::DeviceLocal);
    assert!(matches!(
        d.pull_blocks_ipc(&offer, src, &d_table[..blocks]).unwrap(),
        IpcPull::Copied(_)
    ));
    assert_eq!(d.export_blocks(&d_table[..blocks]).unwrap(), exported);
    assert_eq!(decode(&mut d, first, prompt.len(), &d_table), reference);
    drop(d);

    // Another process.
    let dir = std::env::temp_dir().join(format!("turbine-kv-ipc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("blocks.bin");
    let job = serde_json::json!({
        "offer": offer,
        "src": src,
        "dst": d_table,
        "blocks": blocks,
        "prompt_len": prompt.len(),
        "first": first,
        "out": out,
    });
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "cuda_kv_transfer::ipc_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(IPC_CHILD_JOB, job.to_string())
        .output()
        .expect("the child process runs");
    let log = String::from_utf8_lossy(&child.stdout);
    println!("child: {log}{}", String::from_utf8_lossy(&child.stderr));
    assert!(
        child.status.success(),
        "the child failed: {:?}",
        child.status
    );
    assert!(log.contains("ipc child: copied"), "the child ran its job");
    let got = std::fs::read(&out).unwrap();
    assert_eq!(
        got, exported,
        "the device copy across processes moved every byte"
    );
    let tokens: Vec<u32> =
        serde_json::from_slice(&std::fs::read(dir.join("tokens.json")).unwrap()).unwrap();
    assert_eq!(
        tokens, reference,
        "greedy after the IPC copy equals aggregated"
    );
    let _ = std::fs::remove_dir_all(&dir);
    drop(p);
}

/// The decode side of [`kv_blocks_move_between_processes_by_ipc_handle`], run by it in a
/// child process; does nothing unless [`IPC_CHILD_JOB`] is set.
#[test]
fn ipc_child() {
    use turbine_kernels::kv_ipc::{IpcPull, KvIpcPool};
    let Ok(job) = std::env::var(IPC_CHILD_JOB) else {
        return;
    };
    let job: serde_json::Value = serde_json::from_str(&job).unwrap();
    let offer: KvIpcPool = serde_json::from_value(job["offer"].clone()).unwrap();
    let ids = |k: &str| -> Vec<u32> { serde_json::from_value(job[k].clone()).unwrap() };
    let (src, table) = (ids("src"), ids("dst"));
    let blocks = job["blocks"].as_u64().unwrap() as usize;
    let prompt_len = job["prompt_len"].as_u64().unwrap() as usize;
    let first = job["first"].as_u64().unwrap() as u32;
    let out = std::path::PathBuf::from(job["out"].as_str().unwrap());
    let dst = &table[..blocks];

    let mut d = backend(Some(3));
    let took = match d.pull_blocks_ipc(&offer, &src, dst).unwrap() {
        IpcPull::Copied(t) => t,
        IpcPull::Host(why) => panic!("no device copy from the parent: {why}"),
    };
    // Again through the cached mapping; bad ids are refused before anything is copied.
    assert!(matches!(
        d.pull_blocks_ipc(&offer, &src, dst).unwrap(),
        IpcPull::Copied(_)
    ));
    assert_eq!(d.ipc_peers_open(), 1, "one mapping per peer pool");
    assert!(d
        .pull_blocks_ipc(&offer, &[offer.shape.num_blocks], &[0])
        .is_err());
    std::fs::write(&out, d.export_blocks(dst).unwrap()).unwrap();
    let tokens = decode(&mut d, first, prompt_len, &table);
    std::fs::write(
        out.with_file_name("tokens.json"),
        serde_json::to_vec(&tokens).unwrap(),
    )
    .unwrap();
    assert_eq!(d.forget_ipc_peer(&offer.place), 1);
    assert_eq!(d.ipc_peers_open(), 0);
    println!("ipc child: copied {blocks} blocks in {took:?}");
}
