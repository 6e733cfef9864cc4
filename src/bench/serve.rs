//! `turbine bench serve`: a load generator for any OpenAI-compatible server.
//!
//! For each concurrency level it keeps that many streaming chat requests in flight until a
//! fixed number of requests has been sent (or the level's time cap passes), then reports
//! TTFT, inter-token latency (ITL), end-to-end latency and throughput. Percentiles are
//! nearest-rank (see [`crate::bench::stats`]). ITL percentiles pool the gaps between
//! consecutive content chunks of all successful requests of the level.

use super::client::OpenAiClient;
use super::prompts::PromptSource;
use super::stats::{LatencySummary, Samples};
use super::trace::RequestOutcome;
use anyhow::Context;
use bytes::Bytes;
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CHAT_PATH: &str = "/v1/chat/completions";

/// Options of `turbine bench serve`.
#[derive(clap::Args, Clone, Debug)]
pub struct ServeBenchArgs {
    /// Base URL of the OpenAI-compatible server (plain http; a trailing /v1 is accepted).
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub url: String,
    /// Model name to request; default: the first model GET /v1/models lists.
    #[arg(long)]
    pub model: Option<String>,
    /// Concurrency levels to measure, in order (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub concurrency: Vec<usize>,
    /// Requests per level; default max(8, 4 x concurrency).
    #[arg(long)]
    pub requests_per_level: Option<usize>,
    /// Approximate prompt length in tokens for synthetic prompts (one common word each).
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Words at the start of every synthetic prompt that all requests share (0: none), to
    /// measure prefix caching on purpose.
    #[arg(long, default_value_t = 0)]
    pub shared_prefix: usize,
    /// A fixed prompt for every request instead of synthetic ones (servers may cache it).
    #[arg(long, conflicts_with_all = ["prompt_tokens", "shared_prefix"])]
    pub prompt: Option<String>,
    /// max_tokens of every request.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: u32,
    /// Send `ignore_eos: true` (vLLM-style extension) so every request produces max_tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Sampling temperature to send; default: the server's.
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Requests sent (one at a time) before the first level and discarded.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Seed of the synthetic prompts; default: from the clock, so runs do not share prompts.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Give up on one request after this many seconds (counted as an error).
    #[arg(long, default_value_t = 300)]
    pub request_timeout_secs: u64,
    /// Stop starting requests of a level after this many seconds; requests still in flight
    /// are cut at that time plus the request timeout at most.
    #[arg(long, default_value_t = 600)]
    pub level_timeout_secs: u64,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

impl ServeBenchArgs {
    /// The defaults, pointed at `url` (for tests and programmatic use).
    pub fn new(url: impl Into<String>) -> Self {
        ServeBenchArgs {
            url: url.into(),
            model: None,
            concurrency: vec![1, 8, 32],
            requests_per_level: None,
            prompt_tokens: 128,
            shared_prefix: 0,
            prompt: None,
            max_tokens: 64,
            ignore_eos: false,
            temperature: None,
            warmup: 1,
            seed: None,
            request_timeout_secs: 300,
            level_timeout_secs: 600,
            json: None,
        }
    }

    fn requests_for(&self, concurrency: usize) -> usize {
        self.requests_per_level
            .unwrap_or_else(|| concurrency.saturating_mul(4).max(8))
    }
}

/// Results of one concurrency level.
#[derive(Clone, Debug, Serialize)]
pub struct LevelReport {
    pub concurrency: usize,
    /// Requests sent (successful + failed).
    pub requests: usize,
    pub errors: usize,
    /// Requests not started because the level's time cap passed.
    pub not_started: usize,
    /// Failure messages and how often each occurred.
    pub error_kinds: BTreeMap<String, usize>,
    pub wall_secs: f64,
    pub ttft: LatencySummary,
    pub itl: LatencySummary,
    pub e2e: LatencySummary,
    /// Output tokens of successful requests.
    pub output_tokens: u64,
    /// Whether every successful request reported usage (else tokens are counted chunks).
    pub tokens_from_usage: bool,
    pub mean_prompt_tokens: Option<f64>,
    /// `output_tokens / wall_secs`.
    pub output_tokens_per_sec: f64,
    /// Successful requests per second of wall time.
    pub requests_per_sec: f64,
}

impl LevelReport {
    /// Aggregates the outcomes of one level that took `wall` from first send to last answer.
    pub fn from_outcomes(
        concurrency: usize,
        outcomes: &[RequestOutcome],
        not_started: usize,
        wall: Duration,
    ) -> Self {
        let ok: Vec<&RequestOutcome> = outcomes.iter().filter(|o| o.is_ok()).collect();
        let mut error_kinds = BTreeMap::new();
        for error in outcomes.iter().filter_map(|o| o.error.as_ref()) {
            *error_kinds.entry(error.clone()).or_insert(0) += 1;
        }
        let output_tokens: u64 = ok.iter().map(|o| o.output_tokens).sum();
        let prompt_tokens: Vec<u64> = ok.iter().filter_map(|o| o.prompt_tokens).collect();
        let wall_secs = wall.as_secs_f64();
        let per_sec = |n: f64| if wall_secs > 0.0 { n / wall_secs } else { 0.0 };
        LevelReport {
            concurrency,
            requests: outcomes.len(),
            errors: outcomes.len() - ok.len(),
            not_started,
            error_kinds,
            wall_secs,
            ttft: Samples::from_durations(ok.iter().filter_map(|o| o.ttft)).summary(),
            itl: Samples::from_durations(ok.iter().flat_map(|o| o.inter_token.iter().copied()))
                .summary(),
            e2e: Samples::from_durations(ok.iter().map(|o| o.e2e)).summary(),
            output_tokens,
            tokens_from_usage: ok.iter().all(|o| o.tokens_from_usage),
            mean_prompt_tokens: (!prompt_tokens.is_empty())
                .then(|| prompt_tokens.iter().sum::<u64>() as f64 / prompt_tokens.len() as f64),
            output_tokens_per_sec: per_sec(output_tokens as f64),
            requests_per_sec: per_sec(ok.len() as f64),
        }
    }
}

/// Everything one run measured.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub url: String,
    pub model: String,
    pub max_tokens: u32,
    pub ignore_eos: bool,
    pub prompt: String,
    pub seed: u64,
    pub percentile_method: &'static str,
    pub levels: Vec<LevelReport>,
}

/// Shared by every request of a run.
struct RunContext {
    client: OpenAiClient,
    model: String,
    prompts: PromptSource,
    args: ServeBenchArgs,
    /// Numbers every request of the run, so no two share a synthetic prompt.
    next_index: AtomicU64,
}

impl RunContext {
    fn request_body(&self) -> Bytes {
        let index = self.next_index.fetch_add(1, Ordering::Relaxed);
        let mut body = json!({
            "model": self.model,
            "messages": [{"role": "user", "content": self.prompts.prompt(index)}],
            "max_tokens": self.args.max_tokens,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        if let Value::Object(fields) = &mut body {
            if self.args.ignore_eos {
                fields.insert("ignore_eos".into(), Value::Bool(true));
            }
            if let Some(t) = self.args.temperature {
                fields.insert("temperature".into(), json!(t));
            }
        }
        Bytes::from(body.to_string())
    }

    async fn one_request(&self, level_deadline: tokio::time::Instant) -> RequestOutcome {
        let own = tokio::time::Instant::now() + Duration::from_secs(self.args.request_timeout_secs);
        let deadline = own.min(level_deadline);
        self.client
            .stream(CHAT_PATH, self.request_body(), deadline)
            .await
    }
}

/// Measures every level and returns the results (prints nothing).
pub async fn measure(args: ServeBenchArgs) -> anyhow::Result<BenchReport> {
    measure_with_progress(args, |_| {}).await
}

/// [`measure`], calling `on_level` with each level's results as soon as it is done (a run
/// on a slow server takes minutes; the table should not wait for the last level).
pub async fn measure_with_progress(
    args: ServeBenchArgs,
    mut on_level: impl FnMut(&LevelReport),
) -> anyhow::Result<BenchReport> {
    anyhow::ensure!(
        !args.concurrency.is_empty() && args.concurrency.iter().all(|&c| c > 0),
        "--concurrency needs at least one level, each > 0"
    );
    let max_concurrency = args.concurrency.iter().copied().max().unwrap_or(1);
    let client = OpenAiClient::new(&args.url, max_concurrency)?;
    let model = match &args.model {
        Some(model) => model.clone(),
        None => client
            .first_model()
            .await
            .context("asking the server which model it serves (or pass --model)")?,
    };
    let seed = args.seed.unwrap_or_else(clock_seed);
    let prompts = match &args.prompt {
        Some(text) => PromptSource::Fixed(text.clone()),
        None => PromptSource::Synthetic {
            words: args.prompt_tokens,
            shared_prefix: args.shared_prefix,
            seed,
        },
    };
    let prompt_label = match &prompts {
        PromptSource::Fixed(text) => format!("fixed: {text:?}"),
        PromptSource::Synthetic {
            words,
            shared_prefix,
            ..
        } => format!("synthetic: {words} words, {shared_prefix} shared"),
    };
    let ctx = Arc::new(RunContext {
        client,
        model: model.clone(),
        prompts,
        args: args.clone(),
        next_index: AtomicU64::new(0),
    });

    let warmup_deadline =
        tokio::time::Instant::now() + Duration::from_secs(args.level_timeout_secs);
    for _ in 0..args.warmup {
        let outcome = ctx.one_request(warmup_deadline).await;
        if let Some(error) = outcome.error {
            tracing::warn!(%error, "warm-up request failed");
        }
    }

    let mut levels = Vec::with_capacity(args.concurrency.len());
    for &concurrency in &args.concurrency {
        let total = args.requests_for(concurrency);
        let level = run_level(&ctx, concurrency, total).await?;
        on_level(&level);
        levels.push(level);
    }
    Ok(BenchReport {
        url: args.url.clone(),
        model,
        max_tokens: args.max_tokens,
        ignore_eos: args.ignore_eos,
        prompt: prompt_label,
        seed,
        percentile_method: "nearest-rank",
        levels,
    })
}

/// Keeps `concurrency` requests in flight until `total` were sent or the time cap passed.
async fn run_level(
    ctx: &Arc<RunContext>,
    concurrency: usize,
    total: usize,
) -> anyhow::Result<LevelReport> {
    let start = Instant::now();
    let stop_starting =
        tokio::time::Instant::now() + Duration::from_secs(ctx.args.level_timeout_secs);
    let hard_deadline = stop_starting + Duration::from_secs(ctx.args.request_timeout_secs);
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.min(total) {
        let ctx = Arc::clone(ctx);
        let next = Arc::clone(&next);
        workers.spawn(async move {
            let mut outcomes = Vec::new();
            while tokio::time::Instant::now() < stop_starting
                && next.fetch_add(1, Ordering::Relaxed) < total
            {
                outcomes.push(ctx.one_request(hard_deadline).await);
            }
            outcomes
        });
    }
    let mut outcomes = Vec::with_capacity(total);
    while let Some(joined) = workers.join_next().await {
        outcomes.extend(joined.context("a bench worker task panicked")?);
    }
    let wall = start.elapsed();
    let not_started = total.saturating_sub(outcomes.len());
    Ok(LevelReport::from_outcomes(
        concurrency,
        &outcomes,
        not_started,
        wall,
    ))
}

/// Runs the bench, prints the table (a row as each level finishes) and writes `--json` if
/// asked.
pub async fn run(args: ServeBenchArgs) -> anyhow::Result<()> {
    let json_path = args.json.clone();
    println!(
        "bench serve: {} at {}, levels {:?}, max_tokens {}{}; nearest-rank percentiles, ms",
        args.model.as_deref().unwrap_or("(model from /v1/models)"),
        args.url,
        args.concurrency,
        args.max_tokens,
        if args.ignore_eos { ", ignore_eos" } else { "" },
    );
    print!("{}", table_header());
    let report = measure_with_progress(args, |level| print!("{}", table_row(level))).await?;
    print!("{}", render_notes(&report));
    println!(
        "model {}; prompt {}; seed {}",
        report.model, report.prompt, report.seed
    );
    if let Some(path) = json_path {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(&path, text + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        println!("results written to {}", path.display());
    }
    Ok(())
}

/// The human-readable results: a header, one row per level, then notes and error messages.
pub fn render_table(report: &BenchReport) -> String {
    let mut out =
        format!(
        "model {} at {}; prompt {}; max_tokens {}{}; percentiles nearest-rank, latencies in ms\n",
        report.model,
        report.url,
        report.prompt,
        report.max_tokens,
        if report.ignore_eos { ", ignore_eos" } else { "" },
    );
    out.push_str(&table_header());
    for level in &report.levels {
        out.push_str(&table_row(level));
    }
    out.push_str(&render_notes(report));
    out
}

/// The column titles of the results table.
pub fn table_header() -> String {
    format!(
        "{:>5} {:>6} {:>6} {:>9} {:>9} {:>8} {:>8} {:>9} {:>10} {:>7}\n",
        "conc",
        "reqs",
        "errors",
        "TTFT p50",
        "TTFT p99",
        "ITL p50",
        "ITL p99",
        "E2E p50",
        "out tok/s",
        "req/s"
    )
}

/// One level's row of the results table.
pub fn table_row(level: &LevelReport) -> String {
    format!(
        "{:>5} {:>6} {:>6} {:>9} {:>9} {:>8} {:>8} {:>9} {:>10.1} {:>7.2}\n",
        level.concurrency,
        level.requests,
        level.errors,
        ms(level.ttft.p50_ms),
        ms(level.ttft.p99_ms),
        ms(level.itl.p50_ms),
        ms(level.itl.p99_ms),
        ms(level.e2e.p50_ms),
        level.output_tokens_per_sec,
        level.requests_per_sec,
    )
}

/// Notes under the table: token counting, requests cut by the time cap, error messages.
pub fn render_notes(report: &BenchReport) -> String {
    let mut out = String::new();
    for level in &report.levels {
        if !level.tokens_from_usage && level.requests > level.errors {
            out.push_str(&format!(
                "note (conc {}): the server sent no usage; output tokens are counted chunks\n",
                level.concurrency
            ));
        }
        if level.not_started > 0 {
            out.push_str(&format!(
                "note (conc {}): {} requests not started, the level's time cap passed\n",
                level.concurrency, level.not_started
            ));
        }
        for (error, count) in &level.error_kinds {
            out.push_str(&format!(
                "errors (conc {}): {count} x {error}\n",
                level.concurrency
            ));
        }
    }
    out
}

fn ms(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_string(), |v| format!("{v:.1}"))
}

fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(ttft_ms: u64, gaps_ms: &[u64], tokens: u64) -> RequestOutcome {
        RequestOutcome {
            ttft: Some(Duration::from_millis(ttft_ms)),
            inter_token: gaps_ms.iter().map(|&g| Duration::from_millis(g)).collect(),
            e2e: Duration::from_millis(ttft_ms + gaps_ms.iter().sum::<u64>()),
            output_tokens: tokens,
            tokens_from_usage: true,
            prompt_tokens: Some(10),
            finish_reason: Some("length".into()),
            error: None,
        }
    }

    #[test]
    fn level_report_aggregates_successes_and_counts_errors() {
        let t0 = Instant::now();
        let outcomes = vec![
            outcome(10, &[1, 3], 3),
            outcome(30, &[2], 2),
            RequestOutcome::failed(t0, t0, "HTTP 500: boom".into()),
            RequestOutcome::failed(t0, t0, "HTTP 500: boom".into()),
        ];
        let report = LevelReport::from_outcomes(2, &outcomes, 1, Duration::from_secs(2));
        assert_eq!(report.requests, 4);
        assert_eq!(report.errors, 2);
        assert_eq!(report.not_started, 1);
        assert_eq!(report.error_kinds.get("HTTP 500: boom"), Some(&2));
        assert_eq!(report.output_tokens, 5);
        assert_eq!(report.output_tokens_per_sec, 2.5);
        assert_eq!(report.requests_per_sec, 1.0);
        assert_eq!(report.ttft.count, 2);
        assert_eq!(report.ttft.p50_ms, Some(10.0));
        assert_eq!(report.ttft.p99_ms, Some(30.0));
        assert_eq!(report.itl.count, 3, "gaps are pooled over requests");
        assert_eq!(report.itl.p50_ms, Some(2.0));
        assert_eq!(report.mean_prompt_tokens, Some(10.0));
        assert!(report.tokens_from_usage);
    }

    #[test]
    fn table_has_a_row_per_level_and_lists_errors() {
        let t0 = Instant::now();
        let failed = RequestOutcome::failed(t0, t0, "HTTP 503: busy".into());
        let report = BenchReport {
            url: "http://x".into(),
            model: "m".into(),
            max_tokens: 4,
            ignore_eos: false,
            prompt: "p".into(),
            seed: 1,
            percentile_method: "nearest-rank",
            levels: vec![
                LevelReport::from_outcomes(1, &[outcome(10, &[1], 2)], 0, Duration::from_secs(1)),
                LevelReport::from_outcomes(8, &[failed], 3, Duration::from_secs(1)),
            ],
        };
        let table = render_table(&report);
        let rows: Vec<&str> = table.lines().collect();
        assert!(rows[1].contains("TTFT p50"), "{table}");
        assert!(rows[2].trim_start().starts_with("1 "), "{table}");
        assert!(rows[3].trim_start().starts_with("8 "), "{table}");
        assert!(
            table.contains("errors (conc 8): 1 x HTTP 503: busy"),
            "{table}"
        );
        assert!(table.contains("3 requests not started"), "{table}");
    }

    #[test]
    fn default_request_counts() {
        let args = ServeBenchArgs::new("http://127.0.0.1:1");
        assert_eq!(args.requests_for(1), 8);
        assert_eq!(args.requests_for(8), 32);
        assert_eq!(args.requests_for(32), 128);
        let fixed = ServeBenchArgs {
            requests_per_level: Some(5),
            ..args
        };
        assert_eq!(fixed.requests_for(32), 5);
    }

    #[test]
    fn clap_parses_the_documented_flags() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: ServeBenchArgs,
        }
        let cli = Cli::parse_from([
            "bench",
            "--concurrency",
            "2,4",
            "--max-tokens",
            "16",
            "--ignore-eos",
            "--json",
            "/tmp/x.json",
            "--warmup",
            "0",
            "--seed",
            "5",
        ]);
        assert_eq!(cli.args.concurrency, vec![2, 4]);
        assert_eq!(cli.args.max_tokens, 16);
        assert!(cli.args.ignore_eos);
        assert_eq!(cli.args.warmup, 0);
        assert_eq!(cli.args.seed, Some(5));
        assert_eq!(cli.args.url, "http://127.0.0.1:8000");
        assert!(Cli::try_parse_from(["bench", "--prompt", "x", "--shared-prefix", "3"]).is_err());
    }
}
