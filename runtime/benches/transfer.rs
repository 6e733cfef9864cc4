//! Transfer-plane throughput: GB/s of pulls of 1, 4 and 16 MiB buffers cut into 32 chunks
//! ("layers"), over loopback TCP between two planes in separate hubs (the cross-process
//! path) and within one hub (the same-process path), plus a plain `memcpy` of the same bytes
//! as the anchor, and raw loopback TCP (tokio, chunk-sized writes) as the socket path's floor;
//! the socket path also with a 32-piece credit window. Each figure is the median of 7 runs of enough pulls to move 256 MiB.
//!
//! Run: `cargo bench -p turbine-runtime --bench transfer`

use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt;
use turbine_runtime::transfer::{TransferConfig, TransferHub, TransferPlane};
use turbine_runtime::{MetricsRegistry, TokioClock};

const LAYERS: usize = 32;
const MOVED: usize = 256 << 20;
const RUNS: usize = 7;

fn buffer(size: usize) -> Vec<Bytes> {
    let per = size / LAYERS;
    (0..LAYERS)
        .map(|i| Bytes::from(vec![i as u8; per]))
        .collect()
}

async fn gbps(owner: &TransferPlane, consumer: &TransferPlane, size: usize) -> f64 {
    let data = buffer(size);
    let pulls = (MOVED / size).max(1);
    let start = Instant::now();
    let mut moved = 0usize;
    for _ in 0..pulls {
        let desc = owner.register(data.clone());
        let mut pull = consumer.pull(&desc);
        while let Some(piece) = pull.next().await {
            // Touch the bytes the way an importer would: one copy out.
            let piece = piece.expect("pull");
            let mut sink = vec![0u8; piece.bytes.len()];
            sink.copy_from_slice(&piece.bytes);
            moved += std::hint::black_box(sink).len();
        }
    }
    moved as f64 / start.elapsed().as_secs_f64() / 1e9
}

fn memcpy_gbps(size: usize) -> f64 {
    let data = buffer(size);
    let pulls = (MOVED / size).max(1);
    let start = Instant::now();
    let mut moved = 0usize;
    for _ in 0..pulls {
        for chunk in &data {
            let mut sink = vec![0u8; chunk.len()];
            sink.copy_from_slice(chunk);
            moved += std::hint::black_box(sink).len();
        }
    }
    moved as f64 / start.elapsed().as_secs_f64() / 1e9
}

/// The floor under the socket path: raw loopback TCP (tokio), `size`-byte writes, the reader
/// copying every read out like the pull does.
async fn raw_tcp_gbps(size: usize) -> f64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let data = vec![7u8; size / LAYERS];
    let total = (MOVED / size).max(1) * size;
    let writer = tokio::spawn(async move {
        let mut out = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut sent = 0;
        while sent < total {
            out.write_all(&data).await.expect("write");
            sent += data.len();
        }
    });
    let (mut inp, _) = listener.accept().await.expect("accept");
    let start = Instant::now();
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0;
    while got < total {
        let n = inp.read(&mut buf).await.expect("read");
        if n == 0 {
            break;
        }
        let mut sink = vec![0u8; n];
        sink.copy_from_slice(&buf[..n]);
        got += std::hint::black_box(sink).len();
    }
    let _ = writer.await;
    got as f64 / start.elapsed().as_secs_f64() / 1e9
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let cfg = TransferConfig::default();
        let reg = MetricsRegistry::new();
        let clock = TokioClock::shared();
        let (hub_a, hub_b) = (TransferHub::new(), TransferHub::new());
        let owner = TransferPlane::start(cfg.clone(), clock.clone(), &reg, &hub_a)
            .await
            .expect("bind");
        let remote = TransferPlane::start(cfg.clone(), clock.clone(), &reg, &hub_b)
            .await
            .expect("bind");
        let local = TransferPlane::in_memory("local", cfg.clone(), clock.clone(), &reg, &hub_a);
        // The same socket path with a deeper credit window (32 pieces in flight).
        let deep = TransferConfig { window: 32, ..cfg };
        let remote_deep = TransferPlane::start(deep, clock, &reg, &TransferHub::new())
            .await
            .expect("bind");
        println!(
            "size_mib  memcpy_gbps  same_process_gbps  raw_tcp_gbps  loopback_tcp_gbps  tcp_window32_gbps  tcp/raw_tcp"
        );
        for size_mib in [1usize, 4, 16] {
            let size = size_mib << 20;
            let mut m = Vec::new();
            let mut l = Vec::new();
            let mut r = Vec::new();
            let mut d = Vec::new();
            let mut t = Vec::new();
            for _ in 0..RUNS {
                m.push(memcpy_gbps(size));
                t.push(raw_tcp_gbps(size).await);
                l.push(gbps(&owner, &local, size).await);
                r.push(gbps(&owner, &remote, size).await);
                d.push(gbps(&owner, &remote_deep, size).await);
            }
            let (m, l, t) = (median(m), median(l), median(t));
            let (r, d) = (median(r), median(d));
            println!(
                "{size_mib:>8}  {m:>11.2}  {l:>17.2}  {t:>12.2}  {r:>17.2}  {d:>17.2}  {:>11.2}",
                r / t
            );
        }
    });
}
