//! Hostile and odd input against the real `roomcast` binary: clients that stall,
//! flood or break the protocol, and plugin folders holding what no plugin folder should.
//! Each test asserts what must hold (bounded memory, a room still gated, `/healthz`
//! still answered, SIGTERM still ending the process), never how fast.

mod support;

mod files;
mod http;
mod plugins;
mod ws;
