//! The request-plane wire format.
//!
//! One ZeroMQ message part per envelope: `[WIRE_VERSION] ++ msgpack(Envelope)`. The payload
//! is itself MessagePack of the service's request/response type, kept as opaque bytes so the
//! transport never needs to know service types. Anything that fails to decode is dropped and
//! counted by [`DropReason`]; it never closes a connection.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::telemetry::{DropReason, TraceContext};

/// The version byte every frame starts with.
pub const WIRE_VERSION: u8 = 1;

/// What an envelope carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// A request expecting exactly one `Reply` (or `Error`).
    Call,
    /// A fire-and-forget request.
    Cast,
    /// A request expecting a sequence of `StreamItem`s closed by `StreamEnd` (or `Error`).
    Stream,
    /// The answer to a `Call`.
    Reply,
    /// One item of a stream.
    StreamItem,
    /// The stream finished normally.
    StreamEnd,
    /// Several stream items in one frame: payload is msgpack of a list of item payloads.
    /// Producers batch items that are already waiting, so latency never waits for a batch.
    StreamBatch,
    /// The caller lost interest in a call or stream; the callee should stop.
    Cancel,
    /// Flow control: the caller grants the callee `payload = msgpack(u32)` more stream items.
    Credit,
    /// The call or stream failed; payload is a msgpack [`WireError`].
    Error,
}

/// One request-plane message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Name of the target service on the receiving node (empty for replies).
    pub to: String,
    /// Name of the sending node (informational: routing uses the socket identity).
    pub from: String,
    /// Correlates replies, stream items, cancels and credits with their request.
    pub corr_id: u64,
    /// What this is.
    pub kind: Kind,
    /// MessagePack bytes of the request/response, or of a [`WireError`] / credit count.
    pub payload: Bytes,
    /// The caller's trace context and request id, on requests made inside one (see
    /// [`TraceContext`]); `None` on replies, control frames and background requests. Last
    /// and defaulted, so a frame from a peer that predates it still decodes.
    #[serde(default)]
    pub trace: Option<TraceContext>,
}

/// An error carried in an `Error` envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireError {
    /// No service of that name on the callee node.
    UnknownActor(String),
    /// The handler returned an error or failed while serving.
    Handler(String),
    /// The callee could not decode the request.
    BadRequest(String),
    /// The service cannot serve this kind of request.
    Unsupported(String),
}

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// See [`DropReason::Oversized`].
    #[error("frame of {size} bytes exceeds the {max} byte limit")]
    Oversized {
        /// Frame size.
        size: usize,
        /// Configured limit.
        max: usize,
    },
    /// See [`DropReason::Truncated`].
    #[error("empty frame")]
    Truncated,
    /// See [`DropReason::UnknownVersion`].
    #[error("unknown wire version {0}")]
    UnknownVersion(u8),
    /// See [`DropReason::Malformed`].
    #[error("malformed envelope: {0}")]
    Malformed(String),
}

impl FrameError {
    /// The counter this error is recorded under.
    pub fn reason(&self) -> DropReason {
        match self {
            FrameError::Oversized { .. } => DropReason::Oversized,
            FrameError::Truncated => DropReason::Truncated,
            FrameError::UnknownVersion(_) => DropReason::UnknownVersion,
            FrameError::Malformed(_) => DropReason::Malformed,
        }
    }
}

/// Encodes an envelope into one frame (version byte + MessagePack).
pub fn encode_frame(env: &Envelope) -> Bytes {
    let mut buf = Vec::with_capacity(env.payload.len() + env.to.len() + env.from.len() + 32);
    buf.push(WIRE_VERSION);
    // Serialising plain structs into a Vec cannot fail.
    let _ = rmp_serde::encode::write(&mut buf, env);
    Bytes::from(buf)
}

/// Decodes one frame, enforcing `max_frame` bytes.
pub fn decode_frame(frame: &[u8], max_frame: usize) -> Result<Envelope, FrameError> {
    if frame.len() > max_frame {
        return Err(FrameError::Oversized {
            size: frame.len(),
            max: max_frame,
        });
    }
    let (&version, body) = frame.split_first().ok_or(FrameError::Truncated)?;
    if version != WIRE_VERSION {
        return Err(FrameError::UnknownVersion(version));
    }
    rmp_serde::from_slice(body).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Serialises a payload value to MessagePack.
pub fn to_payload<T: Serialize>(value: &T) -> Result<Bytes, String> {
    rmp_serde::to_vec(value)
        .map(Bytes::from)
        .map_err(|e| e.to_string())
}

/// Deserialises a payload value from MessagePack.
pub fn from_payload<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    rmp_serde::from_slice(bytes).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Envelope {
        Envelope {
            to: "echo".into(),
            from: "node-a".into(),
            corr_id: 42,
            kind: Kind::Call,
            payload: Bytes::from_static(b"\x93\x01\x02\x03"),
            trace: None,
        }
    }

    #[test]
    fn the_trace_context_round_trips() {
        let mut env = sample();
        env.trace = Some(TraceContext {
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
            tracestate: String::new(),
            request_id: Some("6b950675787294c8d2c721e621b94e29".into()),
        });
        assert_eq!(decode_frame(&encode_frame(&env), 1 << 20).unwrap(), env);
        // What the context costs on the wire (docs/TRACING.md says so).
        assert_eq!(encode_frame(&env).len() - encode_frame(&sample()).len(), 92);
    }

    #[test]
    fn a_frame_without_a_trace_context_still_decodes() {
        /// The envelope as peers built before the trace context wrote it.
        #[derive(Serialize)]
        struct OldEnvelope {
            to: String,
            from: String,
            corr_id: u64,
            kind: Kind,
            payload: Bytes,
        }
        let old = OldEnvelope {
            to: "echo".into(),
            from: "node-a".into(),
            corr_id: 42,
            kind: Kind::Call,
            payload: Bytes::from_static(b"\x93\x01\x02\x03"),
        };
        let mut frame = vec![WIRE_VERSION];
        rmp_serde::encode::write(&mut frame, &old).unwrap();
        assert_eq!(decode_frame(&frame, 1 << 20).unwrap(), sample());
    }

    #[test]
    fn round_trip() {
        let frame = encode_frame(&sample());
        assert_eq!(frame[0], WIRE_VERSION);
        assert_eq!(decode_frame(&frame, 1 << 20).unwrap(), sample());
    }

    #[test]
    fn every_bad_shape_is_classified() {
        let frame = encode_frame(&sample());
        assert_eq!(
            decode_frame(&[], 100).unwrap_err().reason(),
            DropReason::Truncated
        );
        assert_eq!(
            decode_frame(&frame, 3).unwrap_err().reason(),
            DropReason::Oversized
        );
        let mut wrong = frame.to_vec();
        wrong[0] = 9;
        assert_eq!(
            decode_frame(&wrong, 1 << 20).unwrap_err().reason(),
            DropReason::UnknownVersion
        );
        assert_eq!(
            decode_frame(&frame[..frame.len() - 2], 1 << 20)
                .unwrap_err()
                .reason(),
            DropReason::Malformed
        );
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_frame(&data, 128);
        }
    }
}
