//! Transfer-plane frames. Control frames are `[TRANSFER_VERSION] ++ msgpack(..)`, small and
//! size-limited; data travels as a separate raw ZeroMQ frame next to its header, never
//! inside MessagePack, so a piece is neither encoded nor copied into an envelope.
//!
//! Consumer → owner: `[Request]`. Owner → consumer: `[Header::Piece, raw bytes]`, then
//! `[Header::End]`, or `[Header::Failed]` at any point.

use bytes::Bytes;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use super::descriptor::{BufferId, ByteRange, TransferError};

/// The version byte every transfer control frame starts with.
pub const TRANSFER_VERSION: u8 = 1;

/// Largest control frame either side accepts (a request carries the range list).
pub(crate) const MAX_CONTROL_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Request {
    /// Start sending `ranges` of `buffer`; `credit` pieces may be sent before more credit.
    Pull {
        buffer: BufferId,
        ranges: Vec<ByteRange>,
        credit: u32,
    },
    /// The consumer took `n` more pieces: the owner may send `n` more.
    Credit(u32),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Header {
    /// The next frame holds `len` raw bytes of chunk `chunk` at buffer offset `offset`.
    Piece { chunk: u32, offset: u64, len: u64 },
    /// Every piece was sent; `bytes` in total.
    End { bytes: u64 },
    /// The pull cannot be served.
    Failed(TransferError),
}

pub(crate) fn encode<T: Serialize>(value: &T) -> Bytes {
    let mut buf = vec![TRANSFER_VERSION];
    // Serialising plain enums into a Vec cannot fail.
    let _ = rmp_serde::encode::write(&mut buf, value);
    Bytes::from(buf)
}

pub(crate) fn decode<T: DeserializeOwned>(frame: &[u8]) -> Result<T, TransferError> {
    if frame.len() > MAX_CONTROL_BYTES {
        return Err(TransferError::Protocol(format!(
            "control frame of {} bytes",
            frame.len()
        )));
    }
    match frame.split_first() {
        Some((&TRANSFER_VERSION, body)) => {
            rmp_serde::from_slice(body).map_err(|e| TransferError::Protocol(e.to_string()))
        }
        Some((v, _)) => Err(TransferError::Protocol(format!("unknown version {v}"))),
        None => Err(TransferError::Protocol("empty frame".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn requests_round_trip() {
        let f = encode(&Request::Credit(3));
        assert!(matches!(decode::<Request>(&f), Ok(Request::Credit(3))));
        assert!(decode::<Request>(&[9, 1]).is_err());
        assert!(decode::<Request>(&[]).is_err());
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = decode::<Request>(&data);
            let _ = decode::<Header>(&data);
        }
    }
}
