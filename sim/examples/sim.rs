//! Stand-alone `turbine sim` (same arguments): `cargo run --release -p turbine-sim --example sim -- --help`.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    turbine_sim::run_cli(turbine_sim::SimArgs::parse())
}
