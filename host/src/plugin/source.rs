//! A plugin's files, read once: `NAME.wasm` and the optional `NAME.toml` beside it.
//!
//! Only regular files are read (symlinks followed), each up to a limit, through
//! [`crate::files::read_regular`]: a FIFO named `x.wasm` costs an error instead of a
//! reload thread blocked forever, and a `.wasm` symlinked to `/dev/zero` an error
//! instead of unbounded memory. The bytes read here are both what the reload compares
//! (their hash) and what is compiled, so the two can never disagree.
//!
//! A name with no entry at all is *gone*; an entry that exists but cannot be read (a
//! symlink loop, a dangling symlink, a folder, a FIFO, a device, a file over the
//! limit) is an error, never taken for a deleted file.

use std::io;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::files::{self, FileError};
use crate::units::format_size;

/// The largest `NAME.wasm` the host reads (real plugins weigh tens to hundreds of KiB).
pub const MAX_PLUGIN_BYTES: u64 = 64 << 20;
/// The largest `NAME.toml` the host reads.
pub const MAX_MANIFEST_BYTES: u64 = 1 << 20;

/// A plugin's files as read from its folder.
#[derive(Clone)]
pub struct PluginSource {
    wasm_path: PathBuf,
    wasm: Vec<u8>,
    /// The text of `NAME.toml`, `None` when there is none.
    manifest: Option<String>,
}

impl std::fmt::Debug for PluginSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginSource")
            .field("wasm_path", &self.wasm_path)
            .field("wasm_bytes", &self.wasm.len())
            .field("manifest_bytes", &self.manifest.as_ref().map(String::len))
            .finish()
    }
}

/// Why a plugin's files could not be read: the file and the reason, e.g.
/// `cannot read /srv/plugins/x.wasm: not a regular file (...)`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("cannot read {}: {reason}", file.display())]
pub struct SourceError {
    pub file: PathBuf,
    pub reason: String,
}

impl PluginSource {
    /// Read `wasm_path` and the `NAME.toml` beside it (absent: the defaults apply).
    /// `Ok(None)` when there is no entry named `wasm_path` at all: the plugin is gone.
    /// Anything else that stops the read is an error naming the file; in particular a
    /// dangling symlink is not "gone": the operator left something there.
    pub fn read(wasm_path: &Path) -> Result<Option<PluginSource>, SourceError> {
        let Some(wasm) = read_entry(wasm_path, MAX_PLUGIN_BYTES, "a plugin's .wasm")? else {
            return Ok(None);
        };
        let manifest_path = wasm_path.with_extension("toml");
        let manifest = match read_entry(&manifest_path, MAX_MANIFEST_BYTES, "a plugin's .toml")? {
            Some(bytes) => Some(String::from_utf8(bytes).map_err(|_| SourceError {
                file: manifest_path.clone(),
                reason: "not UTF-8 text".to_owned(),
            })?),
            None => None,
        };
        Ok(Some(PluginSource { wasm_path: wasm_path.to_owned(), wasm, manifest }))
    }

    /// The `.wasm` file this was read from.
    pub fn wasm_path(&self) -> &Path {
        &self.wasm_path
    }

    /// The `NAME.toml` beside it (which may not exist).
    pub fn manifest_path(&self) -> PathBuf {
        self.wasm_path.with_extension("toml")
    }

    /// The `.wasm` file's bytes.
    pub fn wasm(&self) -> &[u8] {
        &self.wasm
    }

    /// The text of `NAME.toml`, if there is one.
    pub fn manifest(&self) -> Option<&str> {
        self.manifest.as_deref()
    }

    /// SHA-256 over both files (and whether `NAME.toml` exists): equal for two reads of
    /// the same files, so an unchanged plugin is not compiled again.
    pub fn content_hash(&self) -> [u8; 32] {
        let mut hasher = Sha256::new();
        hasher.update((self.wasm.len() as u64).to_le_bytes());
        hasher.update(&self.wasm);
        match &self.manifest {
            Some(text) => {
                hasher.update([1]);
                hasher.update(text.as_bytes());
            }
            None => hasher.update([0]),
        }
        hasher.finalize().into()
    }
}

/// The bytes of the regular file `path` names, at most `limit` of them; `None` when
/// there is no entry of that name (as `symlink_metadata` sees it). `what` names the
/// file's role in the error for a file over the limit.
fn read_entry(path: &Path, limit: u64, what: &str) -> Result<Option<Vec<u8>>, SourceError> {
    let error = |reason: String| SourceError { file: path.to_owned(), reason };
    let gone = || std::fs::symlink_metadata(path).is_err_and(|e| e.kind() == io::ErrorKind::NotFound);
    if let Err(failure) = std::fs::symlink_metadata(path) {
        return if failure.kind() == io::ErrorKind::NotFound {
            Ok(None)
        } else {
            Err(error(failure.to_string()))
        };
    }
    match files::read_regular(path, limit) {
        Ok(bytes) => Ok(Some(bytes)),
        // Removed between the look and the open: gone after all.
        Err(failure) if failure.is_not_found() && gone() => Ok(None),
        Err(failure) if failure.is_not_found() => {
            Err(error("a symlink to a file that does not exist".to_owned()))
        }
        Err(FileError::NotRegular) => Err(error(
            "not a regular file (a folder, FIFO, device or socket); only regular files, or \
             symlinks to them, are read"
                .to_owned(),
        )),
        Err(FileError::TooLarge(limit)) => {
            Err(error(format!("larger than {}, the most {what} may be", format_size(limit))))
        }
        Err(FileError::Io(failure)) => Err(error(failure.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch folder removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Scratch {
            let dir = std::env::temp_dir().join(format!("roomcast-source-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn reason(path: &Path) -> String {
        let error = PluginSource::read(path).expect_err("an error");
        assert_eq!(error.file, path, "the error names the file");
        error.reason
    }

    #[test]
    fn reads_both_files_once_and_hashes_them() {
        let scratch = Scratch::new("read");
        let wasm = scratch.0.join("p.wasm");
        std::fs::write(&wasm, b"\0asm-ish").unwrap();
        let alone = PluginSource::read(&wasm).unwrap().expect("present");
        assert_eq!(alone.wasm(), b"\0asm-ish");
        assert_eq!(alone.manifest(), None);
        std::fs::write(scratch.0.join("p.toml"), "").unwrap();
        let with_toml = PluginSource::read(&wasm).unwrap().expect("present");
        assert_eq!(with_toml.manifest(), Some(""));
        assert_ne!(alone.content_hash(), with_toml.content_hash(), "an empty NAME.toml is a change");
        assert_eq!(with_toml.content_hash(), PluginSource::read(&wasm).unwrap().unwrap().content_hash());
        assert!(PluginSource::read(&scratch.0.join("absent.wasm")).unwrap().is_none(), "gone");
    }

    #[test]
    fn what_exists_but_cannot_be_read_is_an_error_not_gone() {
        let scratch = Scratch::new("unreadable");
        let dir = &scratch.0;
        let looped = dir.join("loop.wasm");
        std::os::unix::fs::symlink("loop.wasm", &looped).unwrap();
        assert!(reason(&looped).contains("symbolic links"), "{}", reason(&looped));

        let dangling = dir.join("dangling.wasm");
        std::os::unix::fs::symlink("nowhere.wasm", &dangling).unwrap();
        assert!(reason(&dangling).contains("does not exist"), "{}", reason(&dangling));

        let folder = dir.join("folder.wasm");
        std::fs::create_dir(&folder).unwrap();
        assert!(reason(&folder).contains("not a regular file"));

        let fifo = dir.join("fifo.wasm");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        assert!(reason(&fifo).contains("not a regular file"), "a FIFO is refused, not waited on");

        let zero = dir.join("zero.wasm");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        assert!(reason(&zero).contains("not a regular file"), "a device is refused, not read");

        let big = dir.join("big.wasm");
        std::fs::File::create(&big).unwrap().set_len(MAX_PLUGIN_BYTES + 1).unwrap();
        assert_eq!(reason(&big), "larger than 64MiB, the most a plugin's .wasm may be");

        // The `.wasm` is fine, its `NAME.toml` is not: the error names the `.toml`.
        let wasm = dir.join("ok.wasm");
        std::fs::write(&wasm, b"\0asm").unwrap();
        let toml = dir.join("ok.toml");
        assert!(std::process::Command::new("mkfifo").arg(&toml).status().unwrap().success());
        assert!(reason(&toml).contains("not a regular file"));
        assert_eq!(PluginSource::read(&wasm).unwrap_err().file, toml);
        std::fs::remove_file(&toml).unwrap();
        std::fs::File::create(&toml).unwrap().set_len(MAX_MANIFEST_BYTES + 1).unwrap();
        let error = PluginSource::read(&wasm).unwrap_err();
        assert_eq!(
            (error.file, error.reason.as_str()),
            (toml, "larger than 1MiB, the most a plugin's .toml may be")
        );
    }
}
