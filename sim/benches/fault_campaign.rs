//! 1,000 seeds of the CI fault campaign (`sim/tests/campaign.rs`, the same arguments): prints
//! the summary, each failing seed with its replay command, and the wall time.
//! `cargo bench -p turbine-sim --bench fault_campaign` (`-- N` for another count).

use std::time::Instant;
use turbine_sim::campaign::{run_campaign, standard_args};

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this binary without
    // it, where the 100-seed campaign of tests/campaign.rs already runs.
    if !std::env::args().any(|a| a == "--bench") {
        println!("fault_campaign: run it with `cargo bench -p turbine-sim --bench fault_campaign`");
        return;
    }
    let count: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1000);
    let args = standard_args();
    let start = Instant::now();
    let summary = run_campaign(&args, count);
    print!("{}", summary.report(&args));
    println!("wall time {:.1} s", start.elapsed().as_secs_f64());
    if !summary.failing.is_empty() {
        std::process::exit(1);
    }
}
