//! Workloads: synthetic arrivals, and trace replay (Mooncake JSONL, Azure-style CSV).
//!
//! A request's prompt is described by a list of *chunk ids*: chunk k covers tokens
//! `k*chunk_tokens ..`; its tokens are a pure function of (chunk id, position in chunk), so
//! equal chunk ids give equal tokens and hence equal KV block hashes in every worker, the
//! indexer and the router. Tokens past the listed chunks are unique to the request. Prompts
//! are materialised only at arrival, so a long trace never holds all prompts at once.

use crate::rng::{exponential, mix64, SeedSplitter, Stream};
use crate::time::SimTime;
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use turbine_actors::ids::TokenId;

/// Mooncake traces hash every 512 tokens.
pub const MOONCAKE_CHUNK: u32 = 512;
/// Vocabulary range used for synthetic token ids (away from special ids at the start).
const VOCAB_LO: u64 = 100;
const VOCAB_SPAN: u64 = 30_000;

/// One request of a workload, before it is materialised.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RequestSpec {
    pub arrival: SimTime,
    pub input_len: u32,
    pub output_len: u32,
    /// Shared chunk ids covering the start of the prompt.
    pub chunk_ids: Vec<u64>,
    pub chunk_tokens: u32,
}

impl RequestSpec {
    /// The prompt's token ids. `index` (the request's position in the workload) makes the
    /// tokens past the shared chunks unique.
    pub fn prompt(&self, index: u64) -> Vec<TokenId> {
        let chunk = self.chunk_tokens.max(1) as u64;
        (0..self.input_len as u64)
            .map(|pos| {
                let c = pos / chunk;
                let key = match self.chunk_ids.get(c as usize) {
                    Some(id) => mix64(*id).wrapping_add(pos % chunk),
                    None => mix64(index ^ 0xA5A5_0000_0000_0000).wrapping_add(pos),
                };
                (VOCAB_LO + mix64(key) % VOCAB_SPAN) as TokenId
            })
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("cannot read trace {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {msg}")]
    Parse {
        path: String,
        line: usize,
        msg: String,
    },
    #[error("trace {0} has no requests")]
    Empty(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ArrivalKind {
    /// Exponential inter-arrival times at `rate`.
    Poisson,
    /// On/off: 1 s bursts at `burst_factor`×rate alternating with quiet gaps, same mean.
    Bursty,
    /// Planner scale: every 120 s, a 30 s surge at 3×rate, then 90 s at rate/3 (same mean).
    Surges,
    /// A compressed day: the rate follows rate·(1 − 0.9·cos(2πt / 600 s)), same mean.
    Diurnal,
}

/// A synthetic workload with optional shared-prefix groups.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Synthetic {
    pub num_requests: usize,
    /// Mean requests per second.
    pub rate: f64,
    pub arrival: ArrivalKind,
    pub burst_factor: f64,
    /// Input/output lengths are uniform in [mean/2, 3·mean/2].
    pub input_mean: u32,
    pub output_mean: u32,
    /// Number of shared-prefix groups (0: no sharing); each request joins one uniformly.
    pub prefix_groups: u32,
    /// Tokens of the shared prefix (capped by the input length).
    pub prefix_len: u32,
}

impl Default for Synthetic {
    fn default() -> Self {
        Synthetic {
            num_requests: 200,
            rate: 10.0,
            arrival: ArrivalKind::Poisson,
            burst_factor: 4.0,
            input_mean: 512,
            output_mean: 64,
            prefix_groups: 8,
            prefix_len: 384,
        }
    }
}

/// Chunk size of synthetic shared prefixes.
const SYNTH_CHUNK: u32 = 64;

impl Synthetic {
    pub fn generate(&self, seeds: &SeedSplitter) -> Vec<RequestSpec> {
        let mut rng = seeds.stream(Stream::Workload);
        let mut t = 0.0f64;
        let rate = self.rate.max(1e-9);
        let mut out = Vec::with_capacity(self.num_requests);
        for _ in 0..self.num_requests {
            let r = match self.arrival {
                ArrivalKind::Poisson => rate,
                ArrivalKind::Bursty => {
                    // Even seconds burst, odd seconds trickle; the mean stays `rate`.
                    let f = self.burst_factor.max(1.0);
                    if (t as u64) % 2 == 0 {
                        rate * f
                    } else {
                        rate * (2.0 - f).max(0.05)
                    }
                }
                ArrivalKind::Surges => {
                    if t % 120.0 < 30.0 {
                        rate * 3.0
                    } else {
                        rate / 3.0
                    }
                }
                ArrivalKind::Diurnal => {
                    let phase = std::f64::consts::TAU * t / 600.0;
                    (rate * (1.0 - 0.9 * phase.cos())).max(rate * 0.05)
                }
            };
            t += exponential(&mut rng, 1.0 / r);
            let input_len = spread(&mut rng, self.input_mean).max(1);
            let output_len = spread(&mut rng, self.output_mean).max(1);
            let chunk_ids = if self.prefix_groups > 0 {
                let g = rng.gen_range(0..self.prefix_groups) as u64;
                let n = self.prefix_len.min(input_len) / SYNTH_CHUNK;
                (0..n as u64).map(|k| (g << 32) | k).collect()
            } else {
                Vec::new()
            };
            out.push(RequestSpec {
                arrival: SimTime::from_secs_f64(t),
                input_len,
                output_len,
                chunk_ids,
                chunk_tokens: SYNTH_CHUNK,
            });
        }
        out
    }
}

fn spread(rng: &mut impl Rng, mean: u32) -> u32 {
    let lo = (mean / 2).max(1);
    let hi = (mean + mean / 2).max(lo + 1);
    rng.gen_range(lo..hi)
}

#[derive(Deserialize)]
struct MooncakeLine {
    timestamp: f64,
    input_length: u32,
    output_length: u32,
    #[serde(default)]
    hash_ids: Vec<u64>,
}

/// Mooncake JSONL: `{"timestamp": ms, "input_length", "output_length", "hash_ids": [...]}`.
pub fn parse_mooncake(text: &str, origin: &str) -> Result<Vec<RequestSpec>, WorkloadError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let l: MooncakeLine = serde_json::from_str(line).map_err(|e| WorkloadError::Parse {
            path: origin.to_string(),
            line: i + 1,
            msg: e.to_string(),
        })?;
        out.push(RequestSpec {
            arrival: SimTime::from_secs_f64(l.timestamp / 1000.0),
            input_len: l.input_length.max(1),
            output_len: l.output_length.max(1),
            chunk_ids: l.hash_ids,
            chunk_tokens: MOONCAKE_CHUNK,
        });
    }
    finish(out, origin)
}

/// Azure-style CSV `TIMESTAMP,ContextTokens,GeneratedTokens`. TIMESTAMP is seconds (a
/// number) or `YYYY-MM-DD HH:MM:SS[.frac]`; times are taken relative to the first row.
pub fn parse_azure(text: &str, origin: &str) -> Result<Vec<RequestSpec>, WorkloadError> {
    let mut out = Vec::new();
    let mut first: Option<f64> = None;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || (i == 0 && line.to_ascii_uppercase().starts_with("TIMESTAMP")) {
            continue;
        }
        let err = |msg: &str| WorkloadError::Parse {
            path: origin.to_string(),
            line: i + 1,
            msg: msg.to_string(),
        };
        let cols: Vec<&str> = line.split(',').map(str::trim).collect();
        let [ts, ctx, gen] = cols[..] else {
            return Err(err(
                "expected 3 columns: TIMESTAMP,ContextTokens,GeneratedTokens",
            ));
        };
        let secs = parse_timestamp(ts).ok_or_else(|| err("bad TIMESTAMP"))?;
        let ctx: u32 = ctx.parse().map_err(|_| err("bad ContextTokens"))?;
        let gen: u32 = gen.parse().map_err(|_| err("bad GeneratedTokens"))?;
        let base = *first.get_or_insert(secs);
        out.push(RequestSpec {
            arrival: SimTime::from_secs_f64(secs - base),
            input_len: ctx.max(1),
            output_len: gen.max(1),
            chunk_ids: Vec::new(),
            chunk_tokens: MOONCAKE_CHUNK,
        });
    }
    finish(out, origin)
}

fn parse_timestamp(s: &str) -> Option<f64> {
    if let Ok(v) = s.parse::<f64>() {
        return Some(v);
    }
    // "YYYY-MM-DD HH:MM:SS.fffffff": days since an arbitrary epoch are enough for deltas.
    let (date, time) = s.split_once(' ')?;
    let d: Vec<i64> = date
        .split('-')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let [y, m, day] = d[..] else { return None };
    let days = y * 372 + m * 31 + day; // monotone within a trace; exact calendars not needed
    let t: Vec<&str> = time.split(':').collect();
    let [h, mi, sec] = t[..] else { return None };
    let h: f64 = h.parse().ok()?;
    let mi: f64 = mi.parse().ok()?;
    let sec: f64 = sec.parse().ok()?;
    Some(days as f64 * 86_400.0 + h * 3600.0 + mi * 60.0 + sec)
}

fn finish(mut out: Vec<RequestSpec>, origin: &str) -> Result<Vec<RequestSpec>, WorkloadError> {
    if out.is_empty() {
        return Err(WorkloadError::Empty(origin.to_string()));
    }
    out.sort_by_key(|r| r.arrival);
    Ok(out)
}

/// Trace file formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum TraceFormat {
    Mooncake,
    Azure,
}

/// Loads a trace; the format is guessed from the extension when not given.
pub fn load_trace(
    path: &Path,
    format: Option<TraceFormat>,
) -> Result<Vec<RequestSpec>, WorkloadError> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| WorkloadError::Read {
        path: origin.clone(),
        source,
    })?;
    let fmt = format.unwrap_or(if origin.ends_with(".csv") {
        TraceFormat::Azure
    } else {
        TraceFormat::Mooncake
    });
    match fmt {
        TraceFormat::Mooncake => parse_mooncake(&text, &origin),
        TraceFormat::Azure => parse_azure(&text, &origin),
    }
}

/// Scales arrival times (speed a trace up or slow it down) and repeats it to fill
/// `min_duration`. Chunk ids used by several requests of the trace (shared prefixes) stay
/// shared across repeats; ids used by one request only are renamed per repeat, so a repeat
/// does not turn unique content into spurious cache hits.
pub fn reshape(
    trace: &[RequestSpec],
    time_scale: f64,
    min_duration: Option<SimTime>,
) -> Vec<RequestSpec> {
    let scale = if time_scale > 0.0 { time_scale } else { 1.0 };
    let scaled: Vec<RequestSpec> = trace
        .iter()
        .map(|r| RequestSpec {
            arrival: SimTime((r.arrival.0 as f64 / scale) as u64),
            ..r.clone()
        })
        .collect();
    let Some(min) = min_duration else {
        return scaled;
    };
    let mut uses: BTreeMap<u64, u32> = BTreeMap::new();
    for r in &scaled {
        for id in &r.chunk_ids {
            *uses.entry(*id).or_default() += 1;
        }
    }
    let span = scaled.last().map(|r| r.arrival.0).unwrap_or(0).max(1) + 1_000_000;
    let mut out = Vec::new();
    let mut offset = 0u64;
    let mut repeat = 0u64;
    while offset < min.0 && !scaled.is_empty() {
        for r in &scaled {
            let chunk_ids = r
                .chunk_ids
                .iter()
                .map(|id| {
                    if repeat == 0 || uses.get(id).copied().unwrap_or(0) > 1 {
                        *id
                    } else {
                        mix64(id ^ (repeat << 48))
                    }
                })
                .collect();
            out.push(RequestSpec {
                arrival: SimTime(r.arrival.0 + offset),
                chunk_ids,
                ..r.clone()
            });
        }
        offset += span;
        repeat += 1;
    }
    out.retain(|r| r.arrival <= min);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_hash_ids_give_equal_tokens() {
        let t = "{\"timestamp\": 0, \"input_length\": 1100, \"output_length\": 5, \"hash_ids\": [7, 8, 9]}\n\
                 {\"timestamp\": 10, \"input_length\": 700, \"output_length\": 5, \"hash_ids\": [7, 3]}\n";
        let r = parse_mooncake(t, "t").unwrap();
        let (a, b) = (r[0].prompt(0), r[1].prompt(1));
        assert_eq!(a.len(), 1100);
        assert_eq!(a[..512], b[..512]);
        assert_ne!(a[512..700], b[512..700]);
        assert_eq!(r[1].arrival, SimTime::from_millis(10));
    }

    #[test]
    fn repeats_keep_shared_ids_and_rename_single_use_ones() {
        let t = "{\"timestamp\": 0, \"input_length\": 1024, \"output_length\": 1, \"hash_ids\": [1, 2]}\n\
                 {\"timestamp\": 1000, \"input_length\": 1024, \"output_length\": 1, \"hash_ids\": [1, 3]}\n";
        let r = parse_mooncake(t, "t").unwrap();
        let out = reshape(&r, 2.0, Some(SimTime::from_millis(1000)));
        // Span 500 ms + 1 ms gap: arrivals 0, 500, then the repeat at 501 (1001 is cut).
        assert_eq!(out.len(), 3);
        assert_eq!(out[1].arrival, SimTime::from_millis(500));
        assert_eq!(out[2].chunk_ids[0], 1);
        assert_ne!(out[2].chunk_ids[1], 2);
        assert!(out[2].arrival > out[1].arrival);
    }

    #[test]
    fn azure_csv_accepts_datetimes() {
        let t = "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.5,100,10\n2023-11-16 18:15:47.0,50,3\n";
        let r = parse_azure(t, "t").unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].arrival, SimTime::from_millis(500));
        assert!(parse_azure("TIMESTAMP,a\n1,2\n", "t").is_err());
    }
}
