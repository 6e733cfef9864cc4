//! The `turbine` package's library: code the `turbine` binary and the integration tests in
//! tests/ share.

pub mod bench;
pub mod fetch;
pub mod profile;
pub mod serve;
pub mod stages;
pub mod validate;
