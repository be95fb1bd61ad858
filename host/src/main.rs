//! The `roomcast` binary: wires the configuration to [`roomcast::server::run`].
fn main() {}
