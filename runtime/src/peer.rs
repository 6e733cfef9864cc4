//! The caller's side of a connection to one remote node: a DEALER socket, the table of
//! pending calls and streams, and the tasks that pump frames in and out.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use zeromq::{DealerSocket, Socket, SocketEvent, SocketRecv, SocketSend, ZmqMessage};

use crate::service::CallError;
use crate::telemetry::{DropReason, RuntimeMetrics};
use crate::wire::{self, Envelope, Kind, WireError};

/// A request waiting for its answer.
pub(crate) enum Pending {
    Call(oneshot::Sender<Result<Bytes, CallError>>),
    Stream(mpsc::Sender<Result<Bytes, CallError>>),
}

/// One DEALER connection to a peer node.
pub(crate) struct PeerLink {
    pub(crate) endpoint: String,
    pub(crate) node_name: Arc<str>,
    data_tx: mpsc::Sender<Bytes>,
    ctl_tx: mpsc::UnboundedSender<Bytes>,
    pending: Mutex<HashMap<u64, Pending>>,
    /// False between a disconnect and the next successful reconnect. Read and written under
    /// the `pending` lock so a request is either refused or failed by [`PeerLink::fail_all`],
    /// never left waiting on a peer that is gone.
    connected: AtomicBool,
    next_corr: AtomicU64,
    pub(crate) max_frame: usize,
    pub(crate) metrics: RuntimeMetrics,
    stop: CancellationToken,
}

impl PeerLink {
    /// Connects a DEALER to `endpoint` and starts its reader, writer and monitor tasks.
    pub(crate) async fn connect(
        endpoint: &str,
        node_name: Arc<str>,
        max_frame: usize,
        queue: usize,
        metrics: RuntimeMetrics,
        stop: CancellationToken,
    ) -> Result<Arc<Self>, CallError> {
        let mut socket = DealerSocket::new();
        let monitor = socket.monitor();
        socket
            .connect(endpoint)
            .await
            .map_err(|e| CallError::Transport(format!("connect {endpoint}: {e}")))?;
        let (send_half, recv_half) = socket.split();
        let (data_tx, data_rx) = mpsc::channel(queue.max(1));
        let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
        let link = Arc::new(Self {
            endpoint: endpoint.to_string(),
            node_name,
            data_tx,
            ctl_tx,
            pending: Mutex::new(HashMap::new()),
            connected: AtomicBool::new(true),
            next_corr: AtomicU64::new(1),
            max_frame,
            metrics,
            stop: stop.child_token(),
        });
        tokio::spawn(write_loop(
            send_half,
            data_rx,
            ctl_rx,
            link.metrics.clone(),
            link.stop.clone(),
        ));
        tokio::spawn(read_loop(
            recv_half,
            Arc::downgrade(&link),
            link.stop.clone(),
        ));
        tokio::spawn(monitor_loop(
            monitor,
            Arc::downgrade(&link),
            link.stop.clone(),
        ));
        Ok(link)
    }

    pub(crate) fn next_corr(&self) -> u64 {
        self.next_corr.fetch_add(1, Ordering::Relaxed)
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a request waiting for its answer; refuses it while the peer is disconnected
    /// (the DEALER would only queue it until a reconnect that may never come).
    pub(crate) fn add_pending(&self, corr_id: u64, pending: Pending) -> Result<(), CallError> {
        let mut table = self.table();
        if !self.connected.load(Ordering::Relaxed) {
            return Err(CallError::PeerGone(format!(
                "{} (disconnected)",
                self.endpoint
            )));
        }
        table.insert(corr_id, pending);
        Ok(())
    }

    fn set_connected(&self) {
        let _table = self.table();
        self.connected.store(true, Ordering::Relaxed);
    }

    pub(crate) fn remove_pending(&self, corr_id: u64) -> Option<Pending> {
        self.table().remove(&corr_id)
    }

    /// Sends a request frame, waiting for room in the bounded send queue.
    pub(crate) async fn send(&self, env: &Envelope) -> Result<(), CallError> {
        self.data_tx
            .send(wire::encode_frame(env))
            .await
            .map_err(|_| CallError::PeerGone(self.endpoint.clone()))
    }

    /// Queues a frame without waiting; gives it back when the queue is full.
    pub(crate) fn try_send(&self, env: &Envelope) -> Result<(), Option<Bytes>> {
        match self.data_tx.try_send(wire::encode_frame(env)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(frame)) => Err(Some(frame)),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(None),
        }
    }

    /// Queues an already encoded frame, waiting for room.
    pub(crate) async fn send_frame(&self, frame: Bytes) -> Result<(), CallError> {
        self.data_tx
            .send(frame)
            .await
            .map_err(|_| CallError::PeerGone(self.endpoint.clone()))
    }

    /// Sends a control frame (cancel, credit) ahead of queued data, without waiting.
    pub(crate) fn send_control(&self, kind: Kind, corr_id: u64, payload: Bytes) {
        let env = Envelope {
            to: String::new(),
            from: String::new(),
            corr_id,
            kind,
            payload,
            trace: None,
        };
        let _ = self.ctl_tx.send(wire::encode_frame(&env));
    }

    /// Fails every pending request: the peer is gone.
    fn fail_all(&self, why: &str) {
        let drained: Vec<Pending> = {
            let mut table = self.table();
            self.connected.store(false, Ordering::Relaxed);
            table.drain().map(|(_, p)| p).collect()
        };
        for pending in drained {
            let err = CallError::PeerGone(format!("{} ({why})", self.endpoint));
            match pending {
                Pending::Call(tx) => {
                    let _ = tx.send(Err(err));
                }
                Pending::Stream(tx) => {
                    let _ = tx.try_send(Err(err));
                }
            }
        }
    }

    fn on_frame(&self, env: Envelope) {
        match env.kind {
            Kind::Reply | Kind::Error => {
                let result = if env.kind == Kind::Reply {
                    Ok(env.payload)
                } else {
                    Err(wire::from_payload::<WireError>(&env.payload)
                        .map(CallError::from)
                        .unwrap_or_else(CallError::Codec))
                };
                match self.remove_pending(env.corr_id) {
                    Some(Pending::Call(tx)) => {
                        let _ = tx.send(result);
                    }
                    Some(Pending::Stream(tx)) => {
                        if let Err(e) = result {
                            let _ = tx.try_send(Err(e));
                        }
                    }
                    None => self.metrics.drop_frame(DropReason::Unexpected),
                }
            }
            Kind::StreamItem => {
                let table = self.table();
                match table.get(&env.corr_id) {
                    Some(Pending::Stream(tx)) => {
                        // The credit window bounds in-flight items to the channel capacity,
                        // so a full channel means the peer ignored flow control.
                        if tx.try_send(Ok(env.payload)).is_err() {
                            self.metrics.drop_frame(DropReason::Unexpected);
                        }
                    }
                    _ => self.metrics.drop_frame(DropReason::Unexpected),
                }
            }
            Kind::StreamBatch => {
                let Ok(items) = wire::from_payload::<Vec<Bytes>>(&env.payload) else {
                    self.metrics.drop_frame(DropReason::Malformed);
                    return;
                };
                let table = self.table();
                match table.get(&env.corr_id) {
                    Some(Pending::Stream(tx)) => {
                        for item in items {
                            if tx.try_send(Ok(item)).is_err() {
                                self.metrics.drop_frame(DropReason::Unexpected);
                                break;
                            }
                        }
                    }
                    _ => self.metrics.drop_frame(DropReason::Unexpected),
                }
            }
            Kind::StreamEnd => {
                if self.remove_pending(env.corr_id).is_none() {
                    self.metrics.drop_frame(DropReason::Unexpected);
                }
            }
            _ => self.metrics.drop_frame(DropReason::Unexpected),
        }
    }
}

impl Drop for PeerLink {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn write_loop(
    mut socket: zeromq::DealerSendHalf,
    mut data_rx: mpsc::Receiver<Bytes>,
    mut ctl_rx: mpsc::UnboundedReceiver<Bytes>,
    metrics: RuntimeMetrics,
    stop: CancellationToken,
) {
    loop {
        let frame = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            Some(f) = ctl_rx.recv() => f,
            Some(f) = data_rx.recv() => f,
            else => return,
        };
        if let Err(e) = socket.send(ZmqMessage::from(frame)).await {
            tracing::debug!(error = %e, "dealer send failed");
            continue;
        }
        metrics.frame_out();
    }
}

async fn read_loop(
    mut socket: zeromq::DealerRecvHalf,
    link: std::sync::Weak<PeerLink>,
    stop: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => return,
            m = socket.recv() => m,
        };
        let Some(link) = link.upgrade() else { return };
        let msg = match msg {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %e, peer = %link.endpoint, "dealer recv failed");
                link.fail_all("receive failed");
                return;
            }
        };
        link.metrics.frame_in();
        if msg.len() != 1 {
            link.metrics.drop_frame(DropReason::Malformed);
            continue;
        }
        let Some(frame) = msg.get(0) else { continue };
        match wire::decode_frame(frame, link.max_frame) {
            Ok(env) => link.on_frame(env),
            Err(e) => link.metrics.drop_frame(e.reason()),
        }
    }
}

async fn monitor_loop(
    mut events: futures::channel::mpsc::Receiver<SocketEvent>,
    link: std::sync::Weak<PeerLink>,
    stop: CancellationToken,
) {
    use futures::StreamExt;
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => return,
            e = events.next() => e,
        };
        let Some(event) = event else { return };
        let Some(link) = link.upgrade() else { return };
        match event {
            SocketEvent::Disconnected(_) => {
                tracing::debug!(peer = %link.endpoint, "peer disconnected");
                link.fail_all("disconnected");
            }
            SocketEvent::Connected(..) => link.set_connected(),
            _ => {}
        }
    }
}
