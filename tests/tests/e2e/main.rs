//! End to end, one test binary: real servers on port 0 in this process, real sockets,
//! real wasmtime and the real example plugins (built once for the whole binary). Each
//! module is one area; the helpers are the `roomcast_tests` library (`tests/src`).
//!
//! The tests run in parallel threads of one process, so none may depend on the process
//! being its own: each server takes its own port, plugins folder and Redis; a test
//! that measures the process itself (its resident memory) reruns alone in a child
//! process (`alone_in_a_process`); the browser tests take turns (one Chromium at a
//! time on two cores).

mod broadcast;
mod browser;
mod churn;
mod cluster;
mod compression;
mod conformance;
mod contract;
mod dashboard;
mod handshake;
mod identity;
mod parking;
mod plugins;
mod recovery;
mod reload;
mod rooms;
mod timeouts;
mod tls;
