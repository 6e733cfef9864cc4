//! A test service shared by the integration tests.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use turbine_runtime::{Handler, HandlerError, Node, NodeConfig, RequestCtx, Service, StreamSink};

pub struct Probe;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Req {
    Echo(String),
    Panic,
    Fatal,
    Hang,
    Incr,
    Count(u64),
    Endless,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Resp {
    Text(String),
    Num(u64),
}

impl Service for Probe {
    type Req = Req;
    type Resp = Resp;
}

/// State that survives restarts, so tests can observe the handler from outside.
#[derive(Clone)]
pub struct Shared {
    pub casts: Arc<AtomicU64>,
    pub incarnations: Arc<AtomicU64>,
    pub cancelled: mpsc::UnboundedSender<u64>,
}

pub struct ProbeHandler {
    shared: Shared,
}

impl ProbeHandler {
    pub fn new(shared: Shared) -> Self {
        shared.incarnations.fetch_add(1, Ordering::SeqCst);
        Self { shared }
    }
}

#[async_trait]
impl Handler<Probe> for ProbeHandler {
    async fn call(&mut self, req: Req, _ctx: &RequestCtx) -> Result<Resp, HandlerError> {
        match req {
            Req::Echo(s) => Ok(Resp::Text(s)),
            Req::Panic => panic!("boom on purpose"),
            Req::Fatal => Err(HandlerError::fatal("state corrupted")),
            Req::Hang => std::future::pending().await,
            Req::Incr => {
                let n = self.shared.casts.fetch_add(1, Ordering::SeqCst) + 1;
                Ok(Resp::Num(n))
            }
            Req::Count(_) | Req::Endless => Err(HandlerError::new("stream only")),
        }
    }

    async fn stream(
        &mut self,
        req: Req,
        sink: StreamSink<Resp>,
        _ctx: &RequestCtx,
    ) -> Result<(), HandlerError> {
        match req {
            Req::Count(n) => {
                tokio::spawn(async move {
                    for i in 0..n {
                        if sink.send(Resp::Num(i)).await.is_err() {
                            return;
                        }
                    }
                });
                Ok(())
            }
            Req::Endless => {
                let cancelled = self.shared.cancelled.clone();
                tokio::spawn(async move {
                    let mut sent = 0u64;
                    while sink.send(Resp::Num(sent)).await.is_ok() {
                        sent += 1;
                    }
                    sink.cancelled().await;
                    let _ = cancelled.send(sent);
                });
                Ok(())
            }
            _ => Err(HandlerError::new("not a stream request")),
        }
    }
}

pub fn shared() -> (Shared, mpsc::UnboundedReceiver<u64>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (
        Shared {
            casts: Arc::new(AtomicU64::new(0)),
            incarnations: Arc::new(AtomicU64::new(0)),
            cancelled: tx,
        },
        rx,
    )
}

pub fn config(name: &str) -> NodeConfig {
    NodeConfig {
        name: name.to_string(),
        call_timeout_ms: 2_000,
        max_frame_bytes: 64 * 1024,
        ..NodeConfig::default()
    }
}

/// A serving node with `probe` registered, and a client node.
pub async fn pair() -> (Node, Node, Shared, mpsc::UnboundedReceiver<u64>) {
    let server = Node::start(config("server")).await.unwrap();
    let client = Node::start(config("client")).await.unwrap();
    let (shared, cancelled) = shared();
    let s = shared.clone();
    server
        .serve::<Probe, _, _>("probe", move || ProbeHandler::new(s.clone()))
        .await
        .unwrap();
    (server, client, shared, cancelled)
}
