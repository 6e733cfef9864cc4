//! A small hand-written SVG line chart, and the report's plots drawn with it: latency CDFs,
//! queue depth over time and replicas over time. Written by hand so that no plotting crate
//! is needed (the plots are lines on linear axes; nothing more).

use crate::run::{Outcome, SimOutcome};
use std::fmt::Write as _;

/// One line of a chart.
#[derive(Clone, Debug)]
pub struct Series {
    pub name: String,
    /// `#rrggbb`.
    pub color: &'static str,
    /// Points in x order.
    pub points: Vec<(f64, f64)>,
    /// Drawn as a staircase (the value holds until the next point), else straight segments.
    pub step: bool,
    /// Dashed line (e.g. the simulated side of a comparison).
    pub dashed: bool,
}

/// A chart: linear axes from zero to the largest value of any series.
#[derive(Clone, Debug)]
pub struct LineChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
}

/// Colours for successive series.
pub const PALETTE: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

/// At most this many points per series are drawn (evenly thinned): a 60,000-request CDF
/// would otherwise be a 2 MB file that looks the same.
const MAX_POINTS: usize = 2_000;

impl LineChart {
    pub fn new(title: &str, x_label: &str, y_label: &str) -> Self {
        LineChart {
            title: title.to_string(),
            x_label: x_label.to_string(),
            y_label: y_label.to_string(),
            series: Vec::new(),
        }
    }

    /// Adds a series with the next palette colour.
    pub fn line(mut self, name: &str, points: Vec<(f64, f64)>, step: bool, dashed: bool) -> Self {
        let color = PALETTE[self.series.len() % PALETTE.len()];
        self.series.push(Series {
            name: name.to_string(),
            color,
            points,
            step,
            dashed,
        });
        self
    }

    pub fn to_svg(&self) -> String {
        let (w, h, pad) = (900.0f64, 420.0f64, 60.0f64);
        let all = self.series.iter().flat_map(|s| s.points.iter());
        let (xmax, ymax) = all.fold((1e-9f64, 1e-9f64), |(x, y), p| {
            (x.max(finite(p.0)), y.max(finite(p.1)))
        });
        let ymax = ymax * 1.05;
        let x = |v: f64| pad + (w - 2.0 * pad) * finite(v) / xmax;
        let y = |v: f64| h - pad - (h - 2.0 * pad) * finite(v) / ymax;
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
            xml_escape(&self.title)
        );
        let _ = writeln!(
            s,
            r#"<path d="M{pad} {pad} V{} H{}" fill="none" stroke="black"/>"#,
            h - pad,
            w - pad
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
                r##"<text x="{}" y="{:.1}" text-anchor="end">{}</text><line x1="{pad}" y1="{:.1}" x2="{}" y2="{:.1}" stroke="#dddddd"/>"##,
                pad - 4.0,
                y(fy) + 4.0,
                tick(fy, ymax),
                y(fy),
                w - pad,
                y(fy)
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            w / 2.0,
            h - 15.0,
            xml_escape(&self.x_label)
        );
        let _ = writeln!(
            s,
            r#"<text x="15" y="{}" transform="rotate(-90 15 {})" text-anchor="middle">{}</text>"#,
            h / 2.0,
            h / 2.0,
            xml_escape(&self.y_label)
        );
        for (i, series) in self.series.iter().enumerate() {
            let pts = thin(&series.points);
            if let Some(first) = pts.first() {
                let mut d = format!("M{:.1} {:.1}", x(first.0), y(first.1));
                let mut last_y = first.1;
                for p in &pts[1..] {
                    if series.step {
                        let _ = write!(d, " H{:.1} V{:.1}", x(p.0), y(p.1));
                    } else {
                        let _ = write!(d, " L{:.1} {:.1}", x(p.0), y(p.1));
                    }
                    last_y = p.1;
                }
                if series.step {
                    let _ = write!(d, " H{:.1} V{:.1}", w - pad, y(last_y));
                }
                let dash = if series.dashed {
                    r#" stroke-dasharray="6 4""#
                } else {
                    ""
                };
                let _ = writeln!(
                    s,
                    r#"<path d="{d}" fill="none" stroke="{}" stroke-width="1.5"{dash}/>"#,
                    series.color
                );
            }
            let ly = 40.0 + 16.0 * i as f64;
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{ly}" fill="{}">— {}</text>"#,
                w - pad - 240.0,
                series.color,
                xml_escape(&series.name)
            );
        }
        s.push_str("</svg>\n");
        s
    }
}

fn finite(v: f64) -> f64 {
    if v.is_finite() {
        v.max(0.0)
    } else {
        0.0
    }
}

/// Every k-th point (and the last) so that at most [`MAX_POINTS`] remain.
fn thin(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    if points.len() <= MAX_POINTS {
        return points.to_vec();
    }
    let k = points.len().div_ceil(MAX_POINTS);
    let mut out: Vec<(f64, f64)> = points.iter().step_by(k).copied().collect();
    if let Some(&last) = points.last() {
        out.push(last);
    }
    out
}

/// An axis label with enough decimals for the axis range.
pub(crate) fn tick(v: f64, max: f64) -> String {
    if max >= 20.0 {
        format!("{v:.0}")
    } else if max >= 2.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

pub fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The empirical CDF of `samples`: (value, fraction of samples at or below it).
pub fn cdf(samples: &[f64]) -> Vec<(f64, f64)> {
    let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    let n = v.len() as f64;
    v.iter()
        .enumerate()
        .map(|(i, &x)| (x, (i + 1) as f64 / n))
        .collect()
}

/// Per-request latencies of a run's completed requests (ms): TTFT, every inter-token gap,
/// end-to-end.
#[derive(Clone, Debug, Default)]
pub struct Latencies {
    pub ttft: Vec<f64>,
    pub itl: Vec<f64>,
    pub e2e: Vec<f64>,
}

impl Latencies {
    pub fn of(o: &SimOutcome) -> Latencies {
        let mut l = Latencies::default();
        for r in &o.requests {
            let (Some(Outcome::Completed), Some(first), Some(fin)) =
                (&r.outcome, r.token_times.first(), r.finished)
            else {
                continue;
            };
            l.ttft.push(first.since(r.arrival).as_millis_f64());
            l.e2e.push(fin.since(r.arrival).as_millis_f64());
            l.itl.extend(
                r.token_times
                    .windows(2)
                    .map(|w| w[1].since(w[0]).as_millis_f64()),
            );
        }
        l
    }
}

/// TTFT, ITL and end-to-end CDFs of one or more runs (named), one chart each.
pub fn latency_cdfs(title: &str, runs: &[(&str, &Latencies)]) -> [String; 3] {
    let chart = |what: &str, pick: &dyn Fn(&Latencies) -> &Vec<f64>| {
        let mut c = LineChart::new(
            &format!("{title}: {what} CDF"),
            &format!("{what} (ms)"),
            "fraction of samples",
        );
        for (i, (name, l)) in runs.iter().enumerate() {
            c = c.line(name, cdf(pick(l)), true, i % 2 == 1);
        }
        c.to_svg()
    };
    [
        chart("TTFT", &|l| &l.ttft),
        chart("ITL", &|l| &l.itl),
        chart("end-to-end", &|l| &l.e2e),
    ]
}

/// A staircase of (time s, value) points.
pub type Steps = Vec<(f64, f64)>;

/// Requests waiting for their first token, and requests in flight (arrived, not resolved),
/// over workload time, as the clients saw them.
pub fn queue_depth(o: &SimOutcome) -> (Steps, Steps) {
    let mut waiting: Vec<(f64, i64)> = Vec::new();
    let mut flight: Vec<(f64, i64)> = Vec::new();
    for r in &o.requests {
        let a = r.arrival.as_secs_f64();
        let end = r.finished.map(|t| t.as_secs_f64());
        let first = r.token_times.first().map(|t| t.as_secs_f64()).or(end);
        waiting.push((a, 1));
        flight.push((a, 1));
        if let Some(f) = first {
            waiting.push((f, -1));
        }
        if let Some(e) = end {
            flight.push((e, -1));
        }
    }
    (running_count(waiting), running_count(flight))
}

/// (time, +1/-1) changes as a staircase of the running total.
fn running_count(mut changes: Vec<(f64, i64)>) -> Vec<(f64, f64)> {
    changes.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let mut n = 0i64;
    let mut out: Vec<(f64, f64)> = vec![(0.0, 0.0)];
    for (t, d) in changes {
        n += d;
        match out.last_mut() {
            Some(last) if last.0 == t => last.1 = n as f64,
            _ => out.push((t, n as f64)),
        }
    }
    out
}

/// The queue-depth chart of a run.
pub fn queue_svg(o: &SimOutcome, title: &str) -> String {
    let (waiting, flight) = queue_depth(o);
    LineChart::new(
        &format!("{title}: queue depth"),
        "workload time (s)",
        "requests",
    )
    .line("in flight (arrived, not done)", flight, true, false)
    .line("waiting for the first token", waiting, true, false)
    .to_svg()
}

/// Workers provisioned over time: the planner's timeline, or `workers` all along.
pub fn replicas(o: &SimOutcome, workers: u32) -> Vec<(f64, f64)> {
    let end = o.end.as_secs_f64();
    let mut out = vec![(0.0, f64::from(workers))];
    if let Some(p) = &o.planner {
        for (t, r) in &p.timeline {
            out.push((t.as_secs_f64(), r.total() as f64));
        }
    }
    out.push((end, out.last().map_or(f64::from(workers), |p| p.1)));
    out
}

/// The replicas chart of a run.
pub fn replicas_svg(o: &SimOutcome, workers: u32, title: &str) -> String {
    LineChart::new(
        &format!("{title}: replicas"),
        "workload time (s)",
        "workers provisioned",
    )
    .line("workers", replicas(o, workers), true, false)
    .to_svg()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cdf_is_sorted_and_ends_at_one() {
        let c = cdf(&[3.0, 1.0, 2.0, f64::NAN]);
        assert_eq!(c, vec![(1.0, 1.0 / 3.0), (2.0, 2.0 / 3.0), (3.0, 1.0)]);
    }

    #[test]
    fn running_count_merges_equal_times() {
        let c = running_count(vec![(1.0, 1), (2.0, -1), (1.0, 1), (3.0, -1)]);
        assert_eq!(c, vec![(0.0, 0.0), (1.0, 2.0), (2.0, 1.0), (3.0, 0.0)]);
    }

    #[test]
    fn chart_is_one_svg_with_every_series() {
        let svg = LineChart::new("t <x>", "x", "y")
            .line("a", vec![(0.0, 1.0), (1.0, 2.0)], false, false)
            .line("b", vec![(0.0, 0.0), (2.0, 1.0)], true, true)
            .to_svg();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<path d=\"M").count(), 3, "axes + 2 series");
        assert!(svg.contains("t &lt;x&gt;"));
        assert!(svg.contains("stroke-dasharray"));
    }
}
