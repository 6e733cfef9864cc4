//! turbine-runtime: a generic actor runtime on ractor + tokio.
//!
//! Supervision trees, location-transparent actor references (local, or remote through a
//! ZeroMQ-bridged proxy), the wire format, the request / event / discovery planes, a `Clock`
//! (real or simulated), config loading and telemetry. No LLM words live here.
