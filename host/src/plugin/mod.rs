//! The plugin runtime: wasmtime engine, one sandboxed instance per live room.
