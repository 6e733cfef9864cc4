//! Figures derived from a run: latency percentiles, throughput, goodput under an SLO, cache
//! hit rate, utilisation; as a table, as JSON, and as an SVG of latency over time.

use crate::plot::{tick, xml_escape};
use crate::run::{Outcome, SimOutcome};
use serde::Serialize;
use std::fmt::Write as _;

/// Latency objectives for goodput: a request counts when it completed with TTFT and mean
/// inter-token latency within these bounds.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Slo {
    pub ttft_ms: f64,
    pub itl_ms: f64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub mean: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles of `v` (sorted in place); zeros when empty.
    pub fn of(v: &mut [f64]) -> Percentiles {
        if v.is_empty() {
            return Percentiles::default();
        }
        v.sort_by(f64::total_cmp);
        let at = |p: f64| v[(((p * v.len() as f64).ceil() as usize).max(1) - 1).min(v.len() - 1)];
        Percentiles {
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            mean: v.iter().sum::<f64>() / v.len() as f64,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct WorkerUtil {
    pub slot: u32,
    pub utilisation: f64,
    pub steps: u64,
    pub crashes: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub router: String,
    pub policy: String,
    pub seed: u64,
    pub workers: u32,
    pub profile: String,
    pub requests: usize,
    pub completed: usize,
    pub failed: usize,
    pub simulated_s: f64,
    pub ttft_ms: Percentiles,
    pub itl_ms: Percentiles,
    pub e2e_ms: Percentiles,
    pub throughput_rps: f64,
    pub output_tok_s: f64,
    pub slo: Slo,
    pub goodput_rps: f64,
    pub slo_attainment: f64,
    /// Prompt tokens served from workers' prefix caches / prompt tokens looked up.
    pub prefix_hit_rate: f64,
    /// Blocks the router predicted cached on its choice / blocks routed.
    pub router_overlap_rate: f64,
    pub mean_utilisation: f64,
    pub per_worker: Vec<WorkerUtil>,
    pub events: u64,
    pub event_log_hash: String,
    pub resyncs: u64,
    pub leases_expired: u64,
    pub net_dropped: u64,
    /// Disaggregated runs: prefill decisions, fallbacks and KV transfers.
    pub disagg: Option<turbine_actors::disagg::metrics::DisaggSummary>,
    pub invariant_violations: Vec<String>,
}

impl Report {
    pub fn build(o: &SimOutcome, seed: u64, policy: &str, profile: &str, slo: Slo) -> Report {
        let start = o
            .requests
            .iter()
            .map(|r| r.arrival)
            .min()
            .unwrap_or_default();
        let end = o
            .requests
            .iter()
            .filter_map(|r| r.finished)
            .max()
            .unwrap_or(start);
        let span = end.since(start).as_secs_f64().max(1e-9);
        let (mut ttft, mut itl, mut e2e) = (Vec::new(), Vec::new(), Vec::new());
        let (mut completed, mut failed, mut good, mut out_tokens) = (0usize, 0usize, 0usize, 0u64);
        for r in &o.requests {
            match r.outcome {
                Some(Outcome::Completed) => completed += 1,
                _ => {
                    failed += 1;
                    continue;
                }
            }
            out_tokens += r.token_times.len() as u64;
            let Some(first) = r.token_times.first() else {
                continue;
            };
            let t = first.since(r.arrival).as_millis_f64();
            ttft.push(t);
            let gaps: Vec<f64> = r
                .token_times
                .windows(2)
                .map(|w| w[1].since(w[0]).as_millis_f64())
                .collect();
            let mean_itl = if gaps.is_empty() {
                0.0
            } else {
                gaps.iter().sum::<f64>() / gaps.len() as f64
            };
            itl.extend(gaps);
            if let Some(f) = r.finished {
                e2e.push(f.since(r.arrival).as_millis_f64());
            }
            if t <= slo.ttft_ms && mean_itl <= slo.itl_ms {
                good += 1;
            }
        }
        let (q, h) = o.workers.iter().fold((0u64, 0u64), |(q, h), w| {
            (q + w.prefix_query_tokens, h + w.prefix_hit_tokens)
        });
        let per_worker: Vec<WorkerUtil> = o
            .workers
            .iter()
            .map(|w| WorkerUtil {
                slot: w.slot,
                utilisation: (w.busy_s / span).min(1.0),
                steps: w.steps,
                crashes: w.crashes,
            })
            .collect();
        let mean_util =
            per_worker.iter().map(|w| w.utilisation).sum::<f64>() / per_worker.len().max(1) as f64;
        Report {
            router: "actors".to_string(),
            policy: policy.to_string(),
            seed,
            workers: o.workers.len() as u32,
            profile: profile.to_string(),
            requests: o.requests.len(),
            completed,
            failed,
            simulated_s: o.end.as_secs_f64(),
            ttft_ms: Percentiles::of(&mut ttft),
            itl_ms: Percentiles::of(&mut itl),
            e2e_ms: Percentiles::of(&mut e2e),
            throughput_rps: completed as f64 / span,
            output_tok_s: out_tokens as f64 / span,
            slo,
            goodput_rps: good as f64 / span,
            slo_attainment: good as f64 / o.requests.len().max(1) as f64,
            prefix_hit_rate: if q == 0 { 0.0 } else { h as f64 / q as f64 },
            router_overlap_rate: if o.routed_blocks == 0 {
                0.0
            } else {
                o.routed_overlap_blocks as f64 / o.routed_blocks as f64
            },
            mean_utilisation: mean_util,
            per_worker,
            events: o.events,
            event_log_hash: format!("{:016x}", o.event_log_hash),
            resyncs: o.resyncs,
            leases_expired: o.leases_expired,
            net_dropped: o.net.dropped_loss + o.net.dropped_partition,
            disagg: o.disagg.clone(),
            invariant_violations: o.invariant_violations.clone(),
        }
    }

    /// A plain-text table for the terminal.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "router {} ({}), profile {}, {} workers, seed {}",
            self.policy, self.router, self.profile, self.workers, self.seed
        );
        let _ = writeln!(
            s,
            "requests {}  completed {}  failed {}  simulated {:.1} s  events {}",
            self.requests, self.completed, self.failed, self.simulated_s, self.events
        );
        let _ = writeln!(
            s,
            "{:<10} {:>10} {:>10} {:>10} {:>10}",
            "latency", "p50 ms", "p90 ms", "p99 ms", "mean ms"
        );
        for (n, p) in [
            ("TTFT", &self.ttft_ms),
            ("ITL", &self.itl_ms),
            ("E2E", &self.e2e_ms),
        ] {
            let _ = writeln!(
                s,
                "{n:<10} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
                p.p50, p.p90, p.p99, p.mean
            );
        }
        let _ = writeln!(
            s,
            "throughput {:.2} req/s, {:.1} output tok/s",
            self.throughput_rps, self.output_tok_s
        );
        let _ = writeln!(
            s,
            "goodput {:.2} req/s under TTFT <= {} ms, ITL <= {} ms ({:.1}% of requests)",
            self.goodput_rps,
            self.slo.ttft_ms,
            self.slo.itl_ms,
            100.0 * self.slo_attainment
        );
        let _ = writeln!(
            s,
            "prefix-cache hit rate {:.1}% (router-predicted overlap {:.1}%)",
            100.0 * self.prefix_hit_rate,
            100.0 * self.router_overlap_rate
        );
        let utils: Vec<String> = self
            .per_worker
            .iter()
            .take(16)
            .map(|w| format!("{:.0}%", 100.0 * w.utilisation))
            .collect();
        let more = if self.per_worker.len() > 16 {
            " ..."
        } else {
            ""
        };
        let _ = writeln!(
            s,
            "utilisation mean {:.1}%  per worker [{}{more}]",
            100.0 * self.mean_utilisation,
            utils.join(" ")
        );
        if let Some(d) = &self.disagg {
            let _ = writeln!(
                s,
                "prefills: {} remote, {} local, {} fell back {:?}; KV transfers {}: {} blocks, {:.1} MB, {:.3} s pulling (mean {:.1} ms)",
                d.remote,
                d.local,
                d.fallbacks,
                d.fallback_reasons,
                d.transfers,
                d.blocks,
                d.bytes as f64 / 1e6,
                d.seconds,
                if d.transfers == 0 { 0.0 } else { 1e3 * d.seconds / d.transfers as f64 }
            );
        }
        let _ = writeln!(
            s,
            "faults: leases expired {}, resyncs {}, messages dropped {}",
            self.leases_expired, self.resyncs, self.net_dropped
        );
        let _ = writeln!(s, "event log hash {}", self.event_log_hash);
        if self.invariant_violations.is_empty() {
            let _ = writeln!(s, "invariants: ok");
        } else {
            let _ = writeln!(
                s,
                "INVARIANT VIOLATIONS ({}):",
                self.invariant_violations.len()
            );
            for v in self.invariant_violations.iter().take(20) {
                let _ = writeln!(s, "  {v}");
            }
        }
        s
    }
}

/// An SVG scatter plot of TTFT and end-to-end latency against arrival time (log-free, linear
/// axes), written by hand so no plotting crate is needed.
pub fn latency_svg(o: &SimOutcome, title: &str) -> String {
    let (w, h, pad) = (900.0f64, 420.0f64, 60.0f64);
    let mut pts: Vec<(f64, f64, f64)> = Vec::new(); // (arrival s, ttft ms, e2e ms)
    for r in &o.requests {
        if let (Some(Outcome::Completed), Some(first), Some(fin)) =
            (&r.outcome, r.token_times.first(), r.finished)
        {
            pts.push((
                r.arrival.as_secs_f64(),
                first.since(r.arrival).as_millis_f64(),
                fin.since(r.arrival).as_millis_f64(),
            ));
        }
    }
    let xmax = pts.iter().map(|p| p.0).fold(1e-9, f64::max);
    let ymax = pts.iter().map(|p| p.2.max(p.1)).fold(1e-9, f64::max);
    let x = |v: f64| pad + (w - 2.0 * pad) * v / xmax;
    let y = |v: f64| h - pad - (h - 2.0 * pad) * v / ymax;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="20" text-anchor="middle" font-size="14">{}</text>"#,
        w / 2.0,
        xml_escape(title)
    );
    let _ = writeln!(
        s,
        r#"<line x1="{pad}" y1="{}" x2="{}" y2="{}" stroke="black"/>"#,
        h - pad,
        w - pad,
        h - pad
    );
    let _ = writeln!(
        s,
        r#"<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{}" stroke="black"/>"#,
        h - pad
    );
    for i in 0..=4 {
        let fx = xmax * i as f64 / 4.0;
        let fy = ymax * i as f64 / 4.0;
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
            x(fx),
            h - pad + 16.0,
            tick(fx, xmax)
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
            pad - 4.0,
            y(fy) + 4.0,
            tick(fy, ymax)
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">arrival time (s)</text>"#,
        w / 2.0,
        h - 15.0
    );
    let _ = writeln!(
        s,
        r#"<text x="15" y="{}" transform="rotate(-90 15 {})" text-anchor="middle">latency (ms)</text>"#,
        h / 2.0,
        h / 2.0
    );
    for (ax, ttft, e2e) in &pts {
        let _ = writeln!(
            s,
            r##"<circle cx="{:.1}" cy="{:.1}" r="1.6" fill="#1f77b4" fill-opacity="0.6"/>"##,
            x(*ax),
            y(*e2e)
        );
        let _ = writeln!(
            s,
            r##"<circle cx="{:.1}" cy="{:.1}" r="1.6" fill="#d62728" fill-opacity="0.6"/>"##,
            x(*ax),
            y(*ttft)
        );
    }
    let _ = writeln!(
        s,
        r##"<text x="{}" y="40" fill="#d62728">● TTFT</text><text x="{}" y="40" fill="#1f77b4">● end-to-end</text>"##,
        w - 220.0,
        w - 150.0
    );
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        let p = Percentiles::of(&mut v);
        assert_eq!((p.p50, p.p90, p.p99), (50.0, 90.0, 99.0));
        assert_eq!(Percentiles::of(&mut []), Percentiles::default());
    }
}
