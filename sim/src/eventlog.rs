//! The run's event log: a running xxh3-64 over a compact binary record of every processed
//! event (what, when, to whom), optionally also kept as text lines. Two runs with the same
//! seed and inputs must produce the same hash; that is the determinism contract.

use crate::time::SimTime;
use std::fmt::Write as _;
use xxhash_rust::xxh3::Xxh3;

const FLUSH_AT: usize = 64 * 1024;

pub struct EventLog {
    hasher: Xxh3,
    /// Records are batched here and hashed in large chunks (xxh3's streaming update is slow
    /// for many tiny pieces); the digest is the same as hashing the records one by one.
    buf: Vec<u8>,
    count: u64,
    lines: Option<Vec<String>>,
}

impl EventLog {
    /// `keep_lines`: also keep a human-readable line per event (costs memory on long runs).
    pub fn new(keep_lines: bool) -> Self {
        EventLog {
            hasher: Xxh3::new(),
            buf: Vec::with_capacity(FLUSH_AT + 64),
            count: 0,
            lines: keep_lines.then(Vec::new),
        }
    }

    /// Records one event: a short kind tag and up to three numeric fields.
    pub fn record(&mut self, at: SimTime, kind: &'static str, a: u64, b: u64, c: u64) {
        self.count += 1;
        self.buf.extend_from_slice(&at.0.to_le_bytes());
        self.buf.extend_from_slice(kind.as_bytes());
        self.buf.extend_from_slice(&a.to_le_bytes());
        self.buf.extend_from_slice(&b.to_le_bytes());
        self.buf.extend_from_slice(&c.to_le_bytes());
        if self.buf.len() >= FLUSH_AT {
            self.hasher.update(&self.buf);
            self.buf.clear();
        }
        if let Some(lines) = &mut self.lines {
            let mut s = String::with_capacity(48);
            let _ = write!(s, "{} {kind} {a} {b} {c}", at.0);
            lines.push(s);
        }
    }

    /// xxh3-64 of every record so far, in order.
    pub fn hash(&self) -> u64 {
        let mut h = self.hasher.clone();
        h.update(&self.buf);
        h.digest()
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn lines(&self) -> Option<&[String]> {
        self.lines.as_deref()
    }
}
