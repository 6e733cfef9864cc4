//! KV transfer between two CUDA backends on one device (disaggregated serving: a prefill
//! backend's blocks into a decode backend's pool), against the ceilings measured in the same
//! run on the same device: a device-to-device memcpy of the same bytes, and host<->device
//! memcpys through page-locked memory.
//!
//! `cargo build --release -p turbine-kernels --features cuda --example cuda_kv_bench`, then
//! `cuda_kv_bench [--model synthetic:llama-3-8b] [--blocks 256] [--reps 20]`
//!
//! Paths timed: `pull_blocks_device` (pool to pool, one kernel, no host), `start_export`
//! (pool to pinned host memory, layer by layer on the copy stream), `import_pinned` (pinned
//! host to pool), `import_layer` (each layer copied from pageable memory first, as chunks
//! arriving from a socket are), and an export overlapped with decode steps on the compute
//! stream; and the `Backend` trait's paths: block-major `export_blocks`/`import_blocks`, and
//! the layer chunks a GPU worker's executor hands the transfer plane
//! (`export_layer_chunks`, `import_layer_chunks` from page-locked slices and from pageable
//! copies). Block ids are a shuffled permutation of the pool on both sides (not contiguous).
//! Device events (median of `--reps` after 3 warm-ups), and host wall clock for whole calls.
//!
//! Between two **processes** (a prefill and a decode worker on one GPU): the bench starts
//! itself again as a child (`--ipc-child FILE`, a backend of its own), which maps the first
//! backend's pool by its CUDA IPC handle and times `pull_blocks_ipc` (device to device, no
//! host), the first pull (which maps the pool) apart; its figures print beside the pinned
//! host path's, measured in the same run.

use std::time::{Duration, Instant};
use turbine_kernels::backend::{Backend, SeqStep};
use turbine_kernels::cuda::device::elapsed_ms;
use turbine_kernels::cuda::{
    device_count, synthetic_config, CudaBackend, CudaBackendOptions, Gpu, PinnedBytes,
};
use turbine_kernels::kv_ipc::{IpcPull, KvIpcPool};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median of `reps` runs of `f` (after 3 warm-ups), `f` returning milliseconds.
fn med(reps: usize, mut f: impl FnMut() -> f64) -> f64 {
    for _ in 0..3 {
        f();
    }
    median((0..reps).map(|_| f()).collect())
}

fn wall(f: impl FnOnce()) -> f64 {
    let s = Instant::now();
    f();
    s.elapsed().as_secs_f64() * 1e3
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A shuffled permutation of 0..n (xorshift Fisher-Yates; `seed` picks it).
fn shuffled(n: u32, seed: u64) -> Vec<u32> {
    let mut v: Vec<u32> = (0..n).collect();
    let mut x = seed | 1;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
    v
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// Events on the copy stream around `f`.
fn copy_ms(g: &Gpu, f: impl FnOnce()) -> f64 {
    let a = g.record_on(&g.copy).unwrap();
    f();
    let b = g.record_on(&g.copy).unwrap();
    f64::from(elapsed_ms(&a, &b).unwrap())
}

/// The child's side of the IPC measurement: a backend of its own in this process maps the
/// parent's pool (the offer in the job file) and pulls the job's blocks `reps` times.
/// Prints one `IPC first_wall_ms dev_ms wall_ms` line (medians after 3 warm-ups).
fn ipc_child(job: &str, config: turbine_kernels::model::ModelConfig, opts: CudaBackendOptions) {
    let job: serde_json::Value =
        serde_json::from_slice(&std::fs::read(job).expect("the job file")).expect("a job");
    let offer: KvIpcPool = serde_json::from_value(job["offer"].clone()).expect("an offer");
    let ids = |k: &str| -> Vec<u32> { serde_json::from_value(job[k].clone()).expect("ids") };
    let (src, dst) = (ids("src"), ids("dst"));
    let reps = job["reps"].as_u64().expect("reps") as usize;
    let mut b = CudaBackend::synthetic(config, 3, opts).unwrap();
    b.randomize_kv(13).unwrap();
    let pull = |b: &mut CudaBackend| match b.pull_blocks_ipc(&offer, &src, &dst).unwrap() {
        IpcPull::Copied(d) => ms(d),
        IpcPull::Host(why) => panic!("no device copy: {why}"),
    };
    let first = wall(|| {
        pull(&mut b);
    });
    let mut walls = Vec::new();
    let dev = med(reps, || {
        let mut d = 0.0;
        walls.push(wall(|| d = pull(&mut b)));
        d
    });
    println!("IPC {first:.3} {dev:.4} {:.4}", median(walls));
}

/// Runs the child side in another process against `a`'s pool; (first pull wall, device,
/// wall) in ms.
fn ipc_in_child(
    a: &CudaBackend,
    args: &[String],
    src: &[u32],
    dst: &[u32],
    reps: usize,
) -> (f64, f64, f64) {
    let job = serde_json::json!({
        "offer": a.kv_ipc_pool().unwrap(),
        "src": src,
        "dst": dst,
        "reps": reps,
    });
    let file = std::env::temp_dir().join(format!("cuda_kv_bench-{}.json", std::process::id()));
    std::fs::write(&file, job.to_string()).unwrap();
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(&args[1..]).arg("--ipc-child").arg(&file);
    let out = cmd.output().expect("the child runs");
    let _ = std::fs::remove_file(&file);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "IPC child failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("IPC "))
        .expect("the child's figures");
    let v: Vec<f64> = line.split(' ').map(|x| x.parse().unwrap()).collect();
    (v[0], v[1], v[2])
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let model = arg(&args, "--model").unwrap_or_else(|| "synthetic:llama-3-8b".into());
    let n: usize = arg(&args, "--blocks").map_or(256, |v| v.parse().expect("--blocks N"));
    let reps: usize = arg(&args, "--reps").map_or(20, |v| v.parse().expect("--reps N"));
    match device_count() {
        Ok(c) if c > 0 => {}
        r => {
            println!("SKIP: no CUDA device ({r:?})");
            return;
        }
    }
    let config = synthetic_config(&model).expect("unknown synthetic model");
    let opts = CudaBackendOptions {
        device: 0,
        num_blocks: 2048,
        block_size: 16,
    };
    if let Some(job) = arg(&args, "--ipc-child") {
        ipc_child(&job, config, opts);
        return;
    }
    let t = Instant::now();
    let mut a = CudaBackend::synthetic(config.clone(), 1, opts).unwrap();
    let mut b = CudaBackend::synthetic(config.clone(), 2, opts).unwrap();
    a.randomize_kv(11).unwrap();
    b.randomize_kv(12).unwrap();
    println!(
        "{} on {}: two backends ({} layers, {} KV heads x {}), pools of {} blocks, built in {:.1} s",
        model,
        a.gpu().name,
        config.n_layers,
        config.n_kv_heads,
        config.head_dim,
        opts.num_blocks,
        t.elapsed().as_secs_f64()
    );
    let bytes = a.export_bytes(n);
    let gb = bytes as f64 / 1e9;
    let perm_a = shuffled(opts.num_blocks as u32, 7);
    let perm_b = shuffled(opts.num_blocks as u32, 9);
    let (src, dst) = (&perm_a[..n], &perm_b[..n]);
    println!(
        "request: {n} blocks ({} tokens), {:.1} MB of KV",
        n * opts.block_size,
        bytes as f64 / 1e6
    );

    // Ceilings, same bytes, same device.
    let g = a.gpu();
    let (s1, s2) = (g.alloc(bytes).unwrap(), g.alloc(bytes).unwrap());
    g.init_uniform_bf16(s1.ptr(), bytes / 2, 3, 1.0, 0.0)
        .unwrap();
    g.sync().unwrap();
    let dtod = med(reps, || {
        let e0 = g.event().unwrap();
        g.dtod(s1.ptr(), s2.ptr(), bytes).unwrap();
        let e1 = g.event().unwrap();
        f64::from(elapsed_ms(&e0, &e1).unwrap())
    });
    let mut host = PinnedBytes::new(g, bytes).unwrap();
    let dtoh = med(reps, || {
        copy_ms(g, || {
            g.copy_dtoh_pinned(s1.ptr(), &mut host, 0, bytes).unwrap()
        })
    });
    let htod = med(reps, || {
        copy_ms(g, || g.copy_htod_pinned(&host, 0, s2.ptr(), bytes).unwrap())
    });
    drop((s1, s2));

    // Pool to pool, device copy.
    let pool_a = a.kv_pool();
    let mut d2d_wall = Vec::new();
    let d2d = med(reps, || {
        let mut dev = 0.0;
        d2d_wall.push(wall(|| {
            dev = ms(b.pull_blocks_device(&pool_a, src, dst).unwrap())
        }));
        dev
    });

    // Pool to pool between two processes, by the pool's IPC handle (the child's backend).
    let (ipc_first, ipc_dev, ipc_wall) = ipc_in_child(&a, &args, src, dst, reps);

    // Pool to pinned host, layer by layer.
    let mut host = Some(host);
    let mut exp_wall = Vec::new();
    let export = med(reps, || {
        let mut dev = 0.0;
        exp_wall.push(wall(|| {
            let job = a.start_export(src, host.take().unwrap()).unwrap();
            let (h, d) = job.finish().unwrap();
            dev = ms(d);
            host = Some(h);
        }));
        dev
    });
    let host = host.unwrap();

    // Pinned host to pool.
    let mut imp_wall = Vec::new();
    let import = med(reps, || {
        let mut dev = 0.0;
        imp_wall.push(wall(|| {
            let mut job = b.start_import(dst).unwrap();
            b.import_pinned(&mut job, &host).unwrap();
            dev = ms(b.finish_import(job).unwrap());
        }));
        dev
    });

    // Chunks from pageable memory (a socket's), layer by layer.
    let chunks: Vec<Vec<u8>> = host
        .as_slice()
        .chunks(bytes / config.n_layers)
        .map(<[u8]>::to_vec)
        .collect();
    let layered = med(reps.min(10), || {
        wall(|| {
            let mut job = b.start_import(dst).unwrap();
            for (l, c) in chunks.iter().enumerate() {
                b.import_layer(&mut job, l, c).unwrap();
            }
            b.finish_import(job).unwrap();
        })
    });

    // The `Backend` trait's block-major bytes (what a GPU worker's executor uses today).
    let mut data = Vec::new();
    let trait_export = med(reps.min(10), || {
        wall(|| data = a.export_blocks(src).unwrap())
    });
    let trait_import = med(reps.min(10), || {
        wall(|| b.import_blocks(dst, &data).unwrap())
    });
    drop(data);

    // The layer-chunk path the executor now uses: export into pooled page-locked slices,
    // import straight from them (one process) and from pageable copies (a socket's bytes).
    let mut pinned_chunks = Vec::new();
    let chunk_export = med(reps.min(10), || {
        pinned_chunks.clear();
        wall(|| pinned_chunks = a.export_layer_chunks(src).unwrap())
    });
    let chunk_import_locked = med(reps.min(10), || {
        wall(|| b.import_layer_chunks(dst, &pinned_chunks).unwrap())
    });
    let pageable: Vec<bytes::Bytes> = pinned_chunks
        .iter()
        .map(|c| bytes::Bytes::from(c.to_vec()))
        .collect();
    let chunk_import_pageable = med(reps.min(10), || {
        wall(|| b.import_layer_chunks(dst, &pageable).unwrap())
    });
    drop(pageable);
    drop(pinned_chunks);

    // Overlap: an export on the copy stream while decode steps run on the compute stream.
    let batch = 8usize;
    let ctx = 1024usize;
    let per_seq = ctx / opts.block_size;
    let rest = &perm_a[n..];
    let tables: Vec<Vec<u32>> = (0..batch)
        .map(|s| rest[s * per_seq..(s + 1) * per_seq].to_vec())
        .collect();
    let toks: Vec<u32> = (0..batch as u32).map(|i| 100 + i).collect();
    let steps = 8;
    let decode = |a: &mut CudaBackend| {
        for _ in 0..steps {
            let seqs: Vec<SeqStep> = (0..batch)
                .map(|s| SeqStep {
                    tokens: std::slice::from_ref(&toks[s]),
                    start_pos: ctx - 1,
                    block_table: &tables[s],
                    want_logits: true,
                })
                .collect();
            a.forward_greedy(&seqs).unwrap();
        }
    };
    let alone_decode = med(reps.min(10), || wall(|| decode(&mut a)));
    let mut host = Some(host);
    let alone_export = med(reps.min(10), || {
        wall(|| {
            let (h, _) = a
                .start_export(src, host.take().unwrap())
                .unwrap()
                .finish()
                .unwrap();
            host = Some(h);
        })
    });
    let both = med(reps.min(10), || {
        wall(|| {
            let job = a.start_export(src, host.take().unwrap()).unwrap();
            decode(&mut a);
            let (h, _) = job.finish().unwrap();
            host = Some(h);
        })
    });

    let gbs = |t: f64| gb / (t / 1e3);
    println!();
    println!("| path | device time | GB/s | ceiling | of ceiling | wall (median) |");
    println!("| --- | --- | --- | --- | --- | --- |");
    println!(
        "| device memcpy ({:.0} MB, ceiling) | {dtod:.3} ms | {:.0} | | | |",
        bytes as f64 / 1e6,
        gbs(dtod)
    );
    println!(
        "| pinned D->H memcpy (ceiling) | {dtoh:.3} ms | {:.1} | | | |",
        gbs(dtoh)
    );
    println!(
        "| pinned H->D memcpy (ceiling) | {htod:.3} ms | {:.1} | | | |",
        gbs(htod)
    );
    println!(
        "| KV pool -> pool, device copy | {d2d:.3} ms | {:.0} | {:.0} | {:.0}% | {:.3} ms |",
        gbs(d2d),
        gbs(dtod),
        100.0 * dtod / d2d,
        median(d2d_wall)
    );
    println!(
        "| KV pool -> pool of another process, IPC handle | {ipc_dev:.3} ms | {:.0} | {:.0} | {:.0}% | {ipc_wall:.3} ms (first, mapping the pool: {ipc_first:.1} ms) |",
        gbs(ipc_dev),
        gbs(dtod),
        100.0 * dtod / ipc_dev,
    );
    println!(
        "| KV export -> pinned host, per layer | {export:.3} ms | {:.1} | {:.1} | {:.0}% | {:.3} ms |",
        gbs(export),
        gbs(dtoh),
        100.0 * dtoh / export,
        median(exp_wall)
    );
    println!(
        "| KV import <- pinned host, per layer | {import:.3} ms | {:.1} | {:.1} | {:.0}% | {:.3} ms |",
        gbs(import),
        gbs(htod),
        100.0 * htod / import,
        median(imp_wall)
    );
    println!(
        "| KV import <- pageable chunks, per layer | | {:.1} (wall) | {:.1} | {:.0}% | {layered:.3} ms |",
        gbs(layered),
        gbs(htod),
        100.0 * htod / layered
    );
    println!(
        "| `Backend::export_blocks` (block-major Vec) | | {:.1} (wall) | {:.1} | {:.0}% | {trait_export:.3} ms |",
        gbs(trait_export),
        gbs(dtoh),
        100.0 * dtoh / trait_export
    );
    println!(
        "| `Backend::import_blocks` (block-major Vec) | | {:.1} (wall) | {:.1} | {:.0}% | {trait_import:.3} ms |",
        gbs(trait_import),
        gbs(htod),
        100.0 * htod / trait_import
    );
    println!(
        "| `Backend::export_layer_chunks` (pooled page-locked slices) | | {:.1} (wall) | {:.1} | {:.0}% | {chunk_export:.3} ms |",
        gbs(chunk_export),
        gbs(dtoh),
        100.0 * dtoh / chunk_export
    );
    println!(
        "| `Backend::import_layer_chunks` from those slices (DMA) | | {:.1} (wall) | {:.1} | {:.0}% | {chunk_import_locked:.3} ms |",
        gbs(chunk_import_locked),
        gbs(htod),
        100.0 * htod / chunk_import_locked
    );
    println!(
        "| `Backend::import_layer_chunks` from pageable copies | | {:.1} (wall) | {:.1} | {:.0}% | {chunk_import_pageable:.3} ms |",
        gbs(chunk_import_pageable),
        gbs(htod),
        100.0 * htod / chunk_import_pageable
    );
    let host_path = chunk_export + chunk_import_locked;
    println!(
        "| whole move, host path: `export_layer_chunks` + `import_layer_chunks` (wall) | | {:.1} | | | {host_path:.3} ms |",
        gbs(host_path)
    );
    println!(
        "| whole move, IPC: `pull_blocks_ipc` (wall, other process) | | {:.0} | | | {ipc_wall:.3} ms ({:.0}x faster) |",
        gbs(ipc_wall),
        host_path / ipc_wall
    );
    println!();
    println!(
        "overlap: {steps} decode steps (batch {batch}, ctx {ctx}) {alone_decode:.2} ms alone; export alone {alone_export:.2} ms; both at once {both:.2} ms (sum {:.2} ms, max {:.2} ms)",
        alone_decode + alone_export,
        alone_decode.max(alone_export)
    );
}
