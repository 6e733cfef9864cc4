//! `turbine sim --validate`: how close is the simulator to the real engine on this machine?
//!
//! 1. Profile: measure the engine of the cluster file's first worker group (`turbine
//!    profile`, over a grid sized to the workload), unless a measured profile is given.
//! 2. Real: start `turbine up` (a child process: the real graph, HTTP and all), replay the
//!    workload open-loop (each request sent at its arrival time as a token-id prompt of
//!    exactly its input length, `max_tokens` its output length, `ignore_eos`, greedy), and
//!    time every streamed chunk as `turbine bench serve` does.
//! 3. Simulated: the same workload through `turbine sim` with the measured profile.
//! 4. TTFT, ITL and end-to-end p50/p90 of both, side by side, with the relative error.
//!
//! The simulated clients read tokens where the frontend's dispatcher does; the real ones read
//! them after HTTP and SSE: that cost is part of the error being measured.

use crate::bench::client::OpenAiClient;
use crate::bench::trace::RequestOutcome;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use turbine_actors::cluster_config::ClusterConfig;
use turbine_sim::plot::Latencies;
use turbine_sim::workload::RequestSpec;
use turbine_sim::SimArgs;

/// p50 and p90 of one metric on both sides.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub metric: &'static str,
    pub real_p50_ms: f64,
    pub sim_p50_ms: f64,
    /// (sim - real) / real.
    pub p50_error: f64,
    pub real_p90_ms: f64,
    pub sim_p90_ms: f64,
    pub p90_error: f64,
}

/// What `--validate` measured.
#[derive(Clone, Debug, Serialize)]
pub struct Validation {
    pub requests: usize,
    pub real_failed: usize,
    pub sim_failed: usize,
    pub profile: String,
    pub real_wall_s: f64,
    pub rows: Vec<Row>,
}

impl Validation {
    pub fn table(&self) -> String {
        let mut s = format!(
            "validation: {} requests, real {:.1} s wall ({} failed), simulated ({} failed), profile {}\n",
            self.requests, self.real_wall_s, self.real_failed, self.sim_failed, self.profile
        );
        s.push_str(
            "| metric | real p50 ms | sim p50 ms | error | real p90 ms | sim p90 ms | error |\n",
        );
        s.push_str("|---|---|---|---|---|---|---|\n");
        for r in &self.rows {
            s.push_str(&format!(
                "| {} | {:.2} | {:.2} | {:+.1}% | {:.2} | {:.2} | {:+.1}% |\n",
                r.metric,
                r.real_p50_ms,
                r.sim_p50_ms,
                100.0 * r.p50_error,
                r.real_p90_ms,
                r.sim_p90_ms,
                100.0 * r.p90_error
            ));
        }
        s
    }
}

/// Nearest-rank percentile of `v` (any order).
fn pct(v: &[f64], p: f64) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[(((p * v.len() as f64).ceil() as usize).max(1) - 1).min(v.len() - 1)]
}

fn rel(sim: f64, real: f64) -> f64 {
    if real.abs() < 1e-12 {
        f64::NAN
    } else {
        (sim - real) / real
    }
}

fn compare(real: &Latencies, sim: &Latencies) -> Vec<Row> {
    let metrics: [(&'static str, &Vec<f64>, &Vec<f64>); 3] = [
        ("TTFT", &real.ttft, &sim.ttft),
        ("ITL", &real.itl, &sim.itl),
        ("E2E", &real.e2e, &sim.e2e),
    ];
    metrics
        .into_iter()
        .map(|(metric, r, s)| {
            let (r50, s50, r90, s90) = (pct(r, 0.5), pct(s, 0.5), pct(r, 0.9), pct(s, 0.9));
            Row {
                metric,
                real_p50_ms: r50,
                sim_p50_ms: s50,
                p50_error: rel(s50, r50),
                real_p90_ms: r90,
                sim_p90_ms: s90,
                p90_error: rel(s90, r90),
            }
        })
        .collect()
}

/// A grid for `turbine profile` that covers the workload: prefill at its input lengths'
/// quantiles, decode at batches up to what can be in flight and contexts over its range.
fn grid(workload: &[RequestSpec], max_seqs: usize) -> (Vec<usize>, Vec<usize>, Vec<usize>) {
    let mut inputs: Vec<usize> = workload.iter().map(|r| r.input_len as usize).collect();
    inputs.sort_unstable();
    let q = |v: &[usize], p: f64| v[((p * (v.len() - 1) as f64).round() as usize).min(v.len() - 1)];
    let mut prefill: Vec<usize> = [0.0, 0.25, 0.5, 0.75, 1.0]
        .iter()
        .map(|&p| q(&inputs, p).max(1))
        .collect();
    prefill.dedup();
    let longest = workload
        .iter()
        .map(|r| (r.input_len + r.output_len) as usize)
        .max()
        .unwrap_or(1);
    let contexts = vec![(inputs[0] / 2).max(1), longest.max(2)];
    // No more sequences can decode together than there are requests.
    let most = max_seqs.min(workload.len()).max(1);
    let mut batches: Vec<usize> = [1usize, 2, 4, 8, 16]
        .into_iter()
        .filter(|&b| b <= most)
        .collect();
    if batches.last() != Some(&most) && most < 16 {
        batches.push(most);
    }
    (prefill, batches, contexts)
}

/// A child `turbine up` that is killed when dropped.
struct Cluster {
    child: Child,
    url: String,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `turbine up` on a free port and waits for its "serving on" line.
fn start_cluster(cluster_file: Option<&Path>) -> Result<Cluster> {
    let exe = std::env::current_exe().context("finding the turbine executable")?;
    let mut cmd = Command::new(exe);
    cmd.args(["up", "--no-fetch", "--host", "127.0.0.1", "--port", "0"]);
    if let Some(f) = cluster_file {
        cmd.arg("-f").arg(f);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting `turbine up`")?;
    let stdout = child.stdout.take().context("the child's stdout")?;
    let mut cluster = Cluster {
        child,
        url: String::new(),
    };
    let mut lines = BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        let line = line.context("reading `turbine up`'s output")?;
        if let Some(rest) = line.split(" on http://").nth(1) {
            let addr = rest.split_whitespace().next().unwrap_or_default();
            cluster.url = format!("http://{addr}");
            // Keep reading what it prints, so that it never writes into a closed pipe.
            std::thread::spawn(move || lines.for_each(drop));
            return Ok(cluster);
        }
    }
    bail!("`turbine up` exited before serving (see its errors above)")
}

/// Replays `workload` open-loop against `url`; the outcomes in workload order.
async fn replay(url: &str, workload: &[RequestSpec]) -> Result<(Vec<RequestOutcome>, f64)> {
    let client = std::sync::Arc::new(OpenAiClient::new(url, workload.len().max(1))?);
    let model = client
        .first_model()
        .await
        .context("asking the cluster which model it serves")?;
    let body = |spec: &RequestSpec, index: u64| {
        serde_json::json!({
            "model": model,
            "prompt": spec.prompt(index),
            "max_tokens": spec.output_len,
            "ignore_eos": true,
            "temperature": 0.0,
            "stream": true,
        })
        .to_string()
    };
    // One warm-up request (not counted): the first forward pass pages the model in.
    if let Some(first) = workload.first() {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        let warm = client
            .stream("/v1/completions", body(first, u64::MAX).into(), deadline)
            .await;
        if let Some(e) = warm.error {
            bail!("the warm-up request failed: {e}");
        }
    }
    let start = tokio::time::Instant::now();
    let deadline = start
        + workload
            .last()
            .map_or(Duration::ZERO, |r| Duration::from_nanos(r.arrival.0))
        + Duration::from_secs(600);
    let mut tasks = Vec::with_capacity(workload.len());
    for (i, spec) in workload.iter().enumerate() {
        let at = start + Duration::from_nanos(spec.arrival.0);
        let client = client.clone();
        let payload: bytes::Bytes = body(spec, i as u64).into();
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            client.stream("/v1/completions", payload, deadline).await
        }));
    }
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.context("a replay task panicked")?);
    }
    Ok((out, start.elapsed().as_secs_f64()))
}

fn real_latencies(outcomes: &[RequestOutcome]) -> Latencies {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mut l = Latencies::default();
    for o in outcomes.iter().filter(|o| o.is_ok()) {
        if let Some(t) = o.ttft {
            l.ttft.push(ms(t));
        }
        l.itl.extend(o.inter_token.iter().map(|&d| ms(d)));
        l.e2e.push(ms(o.e2e));
    }
    l
}

/// `turbine sim --validate`.
pub fn run(args: &SimArgs) -> Result<Validation> {
    let workload = turbine_sim::build_workload(args)?;
    anyhow::ensure!(!workload.is_empty(), "the workload has no requests");
    let cfg = match &args.validate_cluster {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            serde_yaml::from_str::<ClusterConfig>(&text)
                .with_context(|| format!("in {}", path.display()))?
        }
        None => ClusterConfig::default(),
    };
    let workers: usize = cfg.workers.iter().map(|g| g.replicas).sum();
    anyhow::ensure!(
        workers == args.workers as usize,
        "--workers {} but the cluster has {workers} worker(s): pass --workers {workers}",
        args.workers
    );
    let scratch = std::env::temp_dir().join(format!("turbine-validate-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let profile_path: PathBuf = match &args.validate_profile {
        Some(p) => p.clone(),
        None => {
            let group = cfg
                .workers
                .first()
                .context("the cluster has no worker group")?;
            let (prefill, batches, contexts) = grid(&workload, group.max_num_seqs);
            let out = scratch.join("profile.yaml");
            let pargs = crate::profile::ProfileArgs {
                file: args.validate_cluster.clone(),
                group: 0,
                model: None,
                prefill_lengths: prefill,
                batches,
                contexts,
                repeats: 3,
                output: out.clone(),
                name: Some("validate".to_string()),
                no_fetch: true,
            };
            crate::profile::run(cfg.clone(), &pargs).context("measuring the profile")?;
            out
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (outcomes, real_wall_s) = {
        let cluster = start_cluster(args.validate_cluster.as_deref())?;
        eprintln!(
            "replaying {} requests against {}",
            workload.len(),
            cluster.url
        );
        runtime.block_on(replay(&cluster.url, &workload))?
    };
    let mut sim_args = args.clone();
    sim_args.validate = false;
    sim_args.profile = profile_path.display().to_string();
    sim_args.compare_routers = false;
    let mut sim_cfg = turbine_sim::build_config(&sim_args, &workload)?;
    // The simulated frontend migrates as the real one does (the simulator's own default
    // liveness timeout is shorter than a step of a loaded CPU engine).
    sim_cfg.migration = cfg.migration.clone();
    sim_cfg.policy = cfg.router.policy;
    let outcome = turbine_sim::simulate(&sim_cfg, &workload)?;
    let sim_failed = outcome
        .requests
        .iter()
        .filter(|r| r.outcome != Some(turbine_sim::Outcome::Completed))
        .count();
    let real = real_latencies(&outcomes);
    let sim = Latencies::of(&outcome);
    let v = Validation {
        requests: workload.len(),
        real_failed: outcomes.iter().filter(|o| !o.is_ok()).count(),
        sim_failed,
        profile: profile_path.display().to_string(),
        real_wall_s,
        rows: compare(&real, &sim),
    };
    if let Some(first_error) = outcomes.iter().find_map(|o| o.error.as_deref()) {
        eprintln!("first real request error: {first_error}");
    }
    if let Some(dir) = &args.plots {
        std::fs::create_dir_all(dir)?;
        let [ttft, itl, e2e] = turbine_sim::plot::latency_cdfs(
            "real vs simulated",
            &[("real (turbine up)", &real), ("simulated", &sim)],
        );
        for (name, text) in [
            ("ttft_cdf.svg", ttft),
            ("itl_cdf.svg", itl),
            ("e2e_cdf.svg", e2e),
        ] {
            std::fs::write(dir.join(name), text)?;
        }
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(v)
}
