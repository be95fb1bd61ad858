//! Tests of the plugin runtime against real wasmtime and real plugin components.
