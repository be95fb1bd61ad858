//! Building the example plugins once per test process. Shared by this crate and the
//! host's CLI tests (`#[path]`-included there), so both build them the same way.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The plugins workspace, next to this crate.
pub fn plugins_workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins")
}

/// Build every plugin once per test process and return the folder with the `.wasm`
/// files. The plugins workspace has its own target directory, so this nested cargo
/// never waits on the lock of the build that runs the tests.
pub fn built_plugins() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let workspace = plugins_workspace();
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--release", "--quiet"])
            .current_dir(&workspace)
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("CARGO_BUILD_TARGET")
            .status()
            .expect("run cargo for the plugins");
        assert!(status.success(), "building the plugins failed");
        workspace.join("target/wasm32-wasip2/release")
    })
}
