//! Fault campaigns: the same run over many seeds, each seed drawing its own workload, network
//! jitter and faults, with every run's invariants checked (each request resolved exactly
//! once; a completed one streamed exactly its fault-free tokens; no KV block left held; the
//! index only lists what live workers hold) plus the campaign's own: a request may fail
//! only with "no worker" (when none was left to take it), never because a stream broke.
//!
//! `turbine sim --seeds N ...` runs seeds `--seed`, `--seed + 1`, ... and prints each failing
//! seed with the command that replays it; `sim/tests/campaign.rs` runs 100 seeds in CI and
//! `sim/benches/fault_campaign.rs` 1,000.

use crate::cli::{build_config, build_workload, SimArgs};
use crate::run::{simulate, Outcome};

/// One seed's result.
#[derive(Clone, Debug)]
pub struct SeedResult {
    pub seed: u64,
    pub requests: usize,
    pub completed: usize,
    pub failed: usize,
    /// Requests whose stream moved to another worker at least once.
    pub migrated: usize,
    pub problems: Vec<String>,
}

/// What a campaign found.
#[derive(Clone, Debug, Default)]
pub struct CampaignSummary {
    pub seeds: usize,
    pub requests: usize,
    pub completed: usize,
    pub failed: usize,
    pub migrated: usize,
    pub failing: Vec<SeedResult>,
}

impl CampaignSummary {
    /// One line per failing seed with its replay command, then the totals.
    pub fn report(&self, args: &SimArgs) -> String {
        let mut s = String::new();
        for r in &self.failing {
            s.push_str(&format!(
                "seed {} FAILED: {}\n  replay: {}\n",
                r.seed,
                r.problems.join("; "),
                replay_command(args, r.seed)
            ));
        }
        s.push_str(&format!(
            "campaign: {} seeds, {} failing; {} requests: {} completed ({} migrated), {} failed with no worker left\n",
            self.seeds,
            self.failing.len(),
            self.requests,
            self.completed,
            self.migrated,
            self.failed
        ));
        s
    }
}

/// The `turbine sim` command line that replays `seed` of a campaign run with `args`.
pub fn replay_command(args: &SimArgs, seed: u64) -> String {
    let mut cmd = format!(
        "turbine sim --seed {seed} --workers {} --profile {} --router {} --requests {} --rate {} \
         --input-mean {} --output-mean {} --prefix-groups {} --prefix-len {} --max-attempts {} \
         --loss {} --reorder {}",
        args.workers,
        args.profile,
        args.router.as_str(),
        args.requests,
        args.rate,
        args.input_mean,
        args.output_mean,
        args.prefix_groups,
        args.prefix_len,
        args.max_attempts,
        args.loss,
        args.reorder
    );
    if let Some(f) = &args.faults {
        cmd.push_str(&format!(" --faults {f}"));
    }
    if let Some(d) = args.duration_s {
        cmd.push_str(&format!(" --duration-s {d}"));
    }
    cmd
}

/// Runs `args` under one seed and checks it.
pub fn run_seed(args: &SimArgs, seed: u64) -> SeedResult {
    let mut args = args.clone();
    args.seed = seed;
    let mut result = SeedResult {
        seed,
        requests: 0,
        completed: 0,
        failed: 0,
        migrated: 0,
        problems: Vec::new(),
    };
    let outcome = build_workload(&args)
        .and_then(|wl| Ok((build_config(&args, &wl)?, wl)))
        .and_then(|(cfg, wl)| Ok(simulate(&cfg, &wl)?));
    let o = match outcome {
        Ok(o) => o,
        Err(e) => {
            result.problems.push(format!("the run failed: {e:#}"));
            return result;
        }
    };
    result
        .problems
        .extend(o.invariant_violations.iter().cloned());
    result.requests = o.requests.len();
    for (i, r) in o.requests.iter().enumerate() {
        if r.migrations > 0 {
            result.migrated += 1;
        }
        match &r.outcome {
            Some(Outcome::Completed) => result.completed += 1,
            Some(Outcome::Failed(msg)) => {
                result.failed += 1;
                if !msg.contains("no worker") && !msg.contains("no router") {
                    result
                        .problems
                        .push(format!("request {i} failed while workers remained: {msg}"));
                }
            }
            None => result.problems.push(format!("request {i} never resolved")),
        }
    }
    result
}

/// The campaign CI and the bench run: 3 workers, 24 requests of ~128 prompt and 24 output
/// tokens at 12 requests/s, two random faults (crash or partition) and one slow worker (its
/// steps 2 to 1,000 times as long for 0.5-5 s) per seed, 2 % event loss.
pub fn standard_args() -> SimArgs {
    use clap::Parser;
    SimArgs::parse_from([
        "sim",
        "--workers",
        "3",
        "--requests",
        "24",
        "--rate",
        "12",
        "--input-mean",
        "128",
        "--output-mean",
        "24",
        "--prefix-len",
        "64",
        "--faults",
        "random:2,random-slow:1",
        "--loss",
        "0.02",
    ])
}

/// Runs `count` seeds from `args.seed` on.
pub fn run_campaign(args: &SimArgs, count: u64) -> CampaignSummary {
    let mut summary = CampaignSummary::default();
    for seed in args.seed..args.seed.saturating_add(count) {
        let r = run_seed(args, seed);
        summary.seeds += 1;
        summary.requests += r.requests;
        summary.completed += r.completed;
        summary.failed += r.failed;
        summary.migrated += r.migrated;
        if !r.problems.is_empty() {
            summary.failing.push(r);
        }
    }
    summary
}
