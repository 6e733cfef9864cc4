//! [`Link`]: a model of the wire between a caller and a service, for [`Addr::via`].
//!
//! A real deployment reaches a remote service over ZeroMQ; the simulator instead wraps a
//! local [`Addr`] so every request, reply, stream item and cancellation first *crosses a
//! link* it models itself (latency, partitions that hold messages back, a crashed node that
//! answers nothing). The caller keeps using the same `Addr` API and sees the same errors as
//! over the real transport (`PeerGone`, `Timeout`), so the code under test cannot tell.
//!
//! [`Addr::via`]: crate::Addr::via
//! [`Addr`]: crate::Addr

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use crate::service::CallError;

/// Which way a message crosses a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// Caller to service: requests, casts, stream cancellation.
    Request,
    /// Service to caller: replies and stream items.
    Reply,
}

/// A message's passage over a link: resolves once it has arrived, or fails when it never
/// will (the far node is gone).
pub type Transit = Pin<Box<dyn Future<Output = Result<(), CallError>> + Send + 'static>>;

/// A wire between one caller node and one service node.
pub trait Link: Send + Sync + fmt::Debug + 'static {
    /// Starts the passage of one message sent now in `dir`. Messages of one direction must
    /// be delivered in the order their transits resolve; a link that wants FIFO delivery
    /// (like TCP) never lets a later transit resolve before an earlier one.
    fn transit(&self, dir: Direction) -> Transit;

    /// The passage of a message carrying `bytes` of bulk data (a transfer-plane piece). A
    /// link that models bandwidth charges the size here; by default a piece costs what any
    /// message costs.
    fn transit_bytes(&self, dir: Direction, bytes: u64) -> Transit {
        let _ = bytes;
        self.transit(dir)
    }
}
