//! `roomcast plugin new NAME`: write a plugin crate that builds as it stands, from the
//! host's own template (`host/templates/plugin.rs`, the same code as the `echo`
//! example; a test keeps the two in step).

use std::path::{Path, PathBuf};

/// The source every new plugin starts from; `{{name}}` and `{{Type}}` are filled in.
const TEMPLATE: &str = include_str!("../templates/plugin.rs");

/// Why a plugin crate could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ScaffoldError {
    #[error("`{0}` is not a plugin name: use a lower-case letter, then lower-case letters, digits or _")]
    BadName(String),
    #[error("{} already exists", .0.display())]
    Exists(PathBuf),
    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
}

/// The guest SDK of the source tree this binary was built from.
pub fn default_sdk_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-sdk")
}

/// Write crate `name` into `parent/name`, depending on the guest SDK at `sdk`.
/// Returns the crate's folder.
pub fn new_plugin(name: &str, parent: &Path, sdk: &Path) -> Result<PathBuf, ScaffoldError> {
    let valid = name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !valid {
        return Err(ScaffoldError::BadName(name.to_owned()));
    }
    let dir = parent.join(name);
    if dir.exists() {
        return Err(ScaffoldError::Exists(dir));
    }
    let sdk = sdk.canonicalize().unwrap_or_else(|_| sdk.to_owned());
    let type_name: String = name
        .split('_')
        .filter(|part| !part.is_empty())
        .map(|part| {
            let mut chars = part.chars();
            chars.next().map(|c| c.to_ascii_uppercase()).into_iter().chain(chars).collect::<String>()
        })
        .collect();
    let source = TEMPLATE.replace("{{name}}", name).replace("{{Type}}", &type_name);
    let manifest = format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false

# A plugin is a WebAssembly component: `cargo build --release` builds
# target/wasm32-wasip2/release/{name}.wasm (see .cargo/config.toml).
[lib]
crate-type = ["cdylib"]

[dependencies]
roomcast-guest = {{ path = "{sdk}" }}

[profile.release]
opt-level = "s"
lto = true
strip = true
codegen-units = 1
panic = "abort"

# A crate of its own, not part of any enclosing workspace.
[workspace]
"#,
        sdk = sdk.display().to_string().replace('\\', "/"),
    );
    let files = [
        (dir.join("Cargo.toml"), manifest),
        (dir.join(".cargo/config.toml"), "[build]\ntarget = \"wasm32-wasip2\"\n".to_owned()),
        (dir.join("src/lib.rs"), source),
        (dir.join(".gitignore"), "/target\n".to_owned()),
    ];
    for (path, text) in files {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|source| ScaffoldError::Write { path: parent.to_owned(), source })?;
        }
        std::fs::write(&path, text).map_err(|source| ScaffoldError::Write { path, source })?;
    }
    Ok(dir)
}
