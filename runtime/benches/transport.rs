//! Request-plane transport benchmark over loopback TCP.
//!
//! Criterion groups: calls/s with 1 and 16 concurrent callers and 64 B / 4 KiB payloads
//! (remote, plus a local baseline), and streamed items/s. Then a latency report: median
//! and p99 round-trip time per call, measured call by call (printed, not a criterion stat).
//!
//! Run: `cargo bench -p turbine-runtime --bench transport`

use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use serde::{Deserialize, Serialize};
use turbine_runtime::{
    Addr, Handler, HandlerError, Node, NodeConfig, RequestCtx, Service, StreamSink,
};

struct Bench;

#[derive(Serialize, Deserialize)]
enum Req {
    Echo(Bytes),
    Count(u64),
}

impl Service for Bench {
    type Req = Req;
    type Resp = Bytes;
}

struct BenchHandler;

#[async_trait]
impl Handler<Bench> for BenchHandler {
    async fn call(&mut self, req: Req, _ctx: &RequestCtx) -> Result<Bytes, HandlerError> {
        match req {
            Req::Echo(b) => Ok(b),
            Req::Count(_) => Err(HandlerError::new("stream only")),
        }
    }

    async fn stream(
        &mut self,
        req: Req,
        sink: StreamSink<Bytes>,
        _ctx: &RequestCtx,
    ) -> Result<(), HandlerError> {
        if let Req::Count(n) = req {
            tokio::spawn(async move {
                let item = Bytes::from_static(&[7u8; 16]);
                for _ in 0..n {
                    if sink.send(item.clone()).await.is_err() {
                        return;
                    }
                }
            });
        }
        Ok(())
    }
}

struct Setup {
    rt: tokio::runtime::Runtime,
    remote: Addr<Bench>,
    local: Addr<Bench>,
    _nodes: (Node, Node),
}

fn setup() -> Setup {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let (remote, local, nodes) = rt.block_on(async {
        let server = Node::start(NodeConfig {
            name: "server".into(),
            ..NodeConfig::default()
        })
        .await
        .expect("server");
        let client = Node::start(NodeConfig {
            name: "client".into(),
            ..NodeConfig::default()
        })
        .await
        .expect("client");
        server
            .serve::<Bench, _, _>("bench", || BenchHandler)
            .await
            .expect("serve");
        let remote = client
            .connect::<Bench>(server.endpoint(), "bench")
            .await
            .expect("connect");
        let local = server.local::<Bench>("bench").expect("local");
        (remote, local, (server, client))
    });
    Setup {
        rt,
        remote,
        local,
        _nodes: nodes,
    }
}

/// Runs `total` calls split over `callers` concurrent tasks; returns elapsed time.
async fn run_calls(addr: &Addr<Bench>, callers: usize, total: u64, payload: &Bytes) -> Duration {
    let start = Instant::now();
    let per = total.div_ceil(callers as u64);
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let addr = addr.clone();
            let payload = payload.clone();
            tokio::spawn(async move {
                for _ in 0..per {
                    addr.call(Req::Echo(payload.clone())).await.expect("call");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("caller task");
    }
    start.elapsed()
}

fn calls(c: &mut Criterion) {
    let s = setup();
    let mut group = c.benchmark_group("calls");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Elements(1));
    for size in [64usize, 4096] {
        let payload = Bytes::from(vec![0xabu8; size]);
        for callers in [1usize, 16] {
            let id = BenchmarkId::new(format!("remote_{size}B"), format!("{callers}_callers"));
            group.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    s.rt.block_on(run_calls(&s.remote, callers, iters, &payload))
                })
            });
        }
    }
    let payload = Bytes::from(vec![0xabu8; 64]);
    group.bench_function(BenchmarkId::new("local_64B", "1_callers"), |b| {
        b.iter_custom(|iters| s.rt.block_on(run_calls(&s.local, 1, iters, &payload)))
    });
    group.finish();
}

fn streams(c: &mut Criterion) {
    use futures::StreamExt;
    let s = setup();
    const ITEMS: u64 = 20_000;
    let mut group = c.benchmark_group("stream");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    group.throughput(Throughput::Elements(ITEMS));
    group.bench_function("remote_16B_items", |b| {
        b.iter(|| {
            s.rt.block_on(async {
                let mut stream = s.remote.stream(Req::Count(ITEMS)).await.expect("stream");
                let mut n = 0u64;
                while let Some(item) = stream.next().await {
                    item.expect("item");
                    n += 1;
                }
                assert_eq!(n, ITEMS);
            })
        })
    });
    group.finish();
}

/// Median and p99 RTT, call by call.
fn latency_report() {
    let s = setup();
    println!("\nlatency report (remote calls over loopback TCP, per-call RTT):");
    for size in [64usize, 4096] {
        let payload = Bytes::from(vec![0xabu8; size]);
        for callers in [1usize, 16] {
            let mut samples: Vec<Duration> = s.rt.block_on(async {
                run_calls(&s.remote, callers, 2_000, &payload).await; // warm up
                let tasks: Vec<_> = (0..callers)
                    .map(|_| {
                        let addr = s.remote.clone();
                        let payload = payload.clone();
                        tokio::spawn(async move {
                            let mut v = Vec::with_capacity(20_000 / callers);
                            for _ in 0..(20_000 / callers) {
                                let t = Instant::now();
                                addr.call(Req::Echo(payload.clone())).await.expect("call");
                                v.push(t.elapsed());
                            }
                            v
                        })
                    })
                    .collect();
                let mut all = Vec::new();
                for t in tasks {
                    all.extend(t.await.expect("task"));
                }
                all
            });
            samples.sort();
            let median = samples[samples.len() / 2];
            let p99 = samples[samples.len() * 99 / 100];
            println!("  payload {size:>4} B, {callers:>2} callers: median {:>7.1} us, p99 {:>7.1} us ({} calls)",
                median.as_secs_f64() * 1e6, p99.as_secs_f64() * 1e6, samples.len());
        }
    }
}

criterion_group!(benches, calls, streams);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    latency_report();
}
