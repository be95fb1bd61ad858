//! The real `roomcast` executable, run as a child process (`CARGO_BIN_EXE_roomcast`):
//! as an operator meets it (`cli`: flags, configuration errors, start-up and SIGTERM,
//! `plugin check` and `plugin new`), and as hostile and odd input meets it (`http`,
//! `ws`: clients that stall, flood or break the protocol; `plugins`, `files`: folders
//! and files holding what they should not). The hostile tests assert what must hold
//! (bounded memory, a room still gated, `/healthz` still answered, SIGTERM still ending
//! the process), never how fast. `js_client` runs the browser client's own tests
//! (Node) against this executable. One test binary: each test starts its own server
//! process on a free port, so they share nothing but the built plugins.

mod support;

mod cli;
mod cluster;
mod files;
mod http;
mod js_client;
mod plugins;
mod ws;
