//! The `turbine` command line: `up`, `worker`, `sim`, `bench`.

fn main() {
    println!("turbine {}", env!("CARGO_PKG_VERSION"));
}
