//! Taga: a test plugin that rewrites every text message `m` to `A:m` and broadcasts it
//! to everyone, the sender included; its twin `tagb` writes `B:m`. Hot-reload tests
//! replace one with the other under the same file name and watch the prefix change.
//!
//! Build and run:
//!
//! ```text
//! cd plugins && cargo build --release
//! cp target/wasm32-wasip2/release/taga.wasm /path/to/plugins-dir/tag.wasm
//! roomcast serve --plugins /path/to/plugins-dir
//! # connect to ws://127.0.0.1:8080/ws/tag, send "hi", get "A:hi"; then copy tagb.wasm
//! # over tag.wasm and the same message comes back as "B:hi"
//! ```

#[path = "../../tag.rs"]
mod tag;

roomcast_guest::export!(tag::Tag<'A'>);
