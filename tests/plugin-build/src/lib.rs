//! How the tests build plugins: the one place where a test runs a nested `cargo build`.
//! The host's unit tests, the host's tests of its binary and the end-to-end tests all
//! build the example plugins (and the crates `roomcast plugin new` writes) through this
//! crate, so they build them the same way; the tidy test keeps it the only one.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The plugins workspace (`plugins/` at the repository's root).
pub fn plugins_workspace() -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../plugins");
    std::fs::canonicalize(&path).unwrap_or(path)
}

/// The plugins' own target folder. Every nested build writes there, never into the
/// target folder of the `cargo test` that runs it, whose lock it would wait on forever.
pub fn plugins_target() -> PathBuf {
    plugins_workspace().join("target")
}

/// Where release builds for `wasm32-wasip2` leave their `NAME.wasm`.
fn release_dir() -> PathBuf {
    plugins_target().join("wasm32-wasip2/release")
}

/// `cargo build --release` in `dir` (its `.cargo/config.toml` names the
/// `wasm32-wasip2` target) into [`plugins_target`]; cargo's output if it fails.
fn cargo_build(dir: &Path, extra: &[&str]) -> Result<(), String> {
    let output = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "--quiet"])
        .args(extra)
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", plugins_target())
        // Nothing that configures the host's build may reach the wasm build: not its
        // flags, not its target folder, not its target.
        .env_remove("CARGO_BUILD_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("RUSTFLAGS")
        .output()
        .map_err(|error| format!("cannot run cargo in {}: {error}", dir.display()))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!("cargo build in {} failed:\n{}", dir.display(), String::from_utf8_lossy(&output.stderr)))
    }
}

/// Build the plugins workspace once per test process. `--keep-going`, so that one
/// broken plugin does not keep the others from building (see [`plugin_file`]).
fn build_once() -> &'static Result<(), String> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    BUILT.get_or_init(|| cargo_build(&plugins_workspace(), &["--keep-going"]))
}

/// The folder holding every example plugin's `NAME.wasm`, built once per test
/// process. Panics, with cargo's output, if any plugin failed to build.
pub fn built_plugins() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    if let Err(output) = build_once() {
        panic!("building the plugins failed: {output}");
    }
    DIR.get_or_init(release_dir)
}

/// The built `NAME.wasm` of one example plugin. Only that plugin has to have built: a
/// test of one plugin is not stopped by another plugin's error, but a missing file
/// fails with cargo's output.
pub fn plugin_file(name: &str) -> PathBuf {
    let built = build_once();
    let file = release_dir().join(format!("{name}.wasm"));
    if !file.is_file() {
        panic!(
            "plugin {name} was not built ({}); build output:\n{}",
            file.display(),
            built.as_ref().err().map(String::as_str).unwrap_or("")
        );
    }
    file
}

/// Build the plugin crate at `krate` (one that `roomcast plugin new` wrote, outside the
/// plugins workspace) as its author would, into the plugins' target folder so that the
/// SDK's dependencies compile once. Its `NAME.wasm`: `plugin new` names the package
/// after the crate's folder.
pub fn build_crate(krate: &Path) -> Result<PathBuf, String> {
    cargo_build(krate, &[])?;
    let name = krate.file_name().and_then(|name| name.to_str()).ok_or("a crate folder with a name")?;
    Ok(release_dir().join(format!("{name}.wasm")))
}
