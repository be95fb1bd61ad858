//! Reading the files an operator points the server at (the config file, the admin
//! token file, TLS certificates): regular files only, bounded in size, and never a
//! wait on something that is not a file.
//!
//! A FIFO, a device or a socket where a file was expected would block a plain `read`
//! forever, or (`/dev/zero`) grow it without end. The file is opened non-blocking,
//! checked with `fstat` on the open descriptor (so a swap between a check and the open
//! cannot fool it), and read up to a limit.

use std::io::{self, Read as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

/// Why a file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("not a regular file")]
    NotRegular,
    #[error("larger than {0} bytes")]
    TooLarge(u64),
}

impl FileError {
    /// Whether the file does not exist (as opposed to existing and being unreadable).
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Io(e) if e.kind() == io::ErrorKind::NotFound)
    }
}

/// The whole of the regular file at `path` (symlinks followed), if it is at most
/// `limit` bytes.
pub fn read_regular(path: &Path, limit: u64) -> Result<Vec<u8>, FileError> {
    const O_NONBLOCK: i32 = 0o4000; // Linux; opening a FIFO must not wait for a writer
    let file = std::fs::OpenOptions::new().read(true).custom_flags(O_NONBLOCK).open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(FileError::NotRegular);
    }
    if meta.len() > limit {
        return Err(FileError::TooLarge(limit));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // The file may grow while it is read: never take more than the limit.
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(FileError::TooLarge(limit));
    }
    Ok(bytes)
}

/// [`read_regular`] as UTF-8 text.
pub fn read_regular_text(path: &Path, limit: u64) -> Result<String, FileError> {
    let bytes = read_regular(path, limit)?;
    String::from_utf8(bytes)
        .map_err(|_| FileError::Io(io::Error::new(io::ErrorKind::InvalidData, "not UTF-8 text")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_within_the_limit() {
        let dir = std::env::temp_dir().join(format!("roomcast-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("ok.txt");
        std::fs::write(&file, "hello").unwrap();
        assert_eq!(read_regular(&file, 5).unwrap(), b"hello");
        assert!(matches!(read_regular(&file, 4), Err(FileError::TooLarge(4))));
        assert!(matches!(read_regular(Path::new("/dev/zero"), 1 << 20), Err(FileError::NotRegular)));
        assert!(matches!(read_regular(&dir, 10), Err(FileError::NotRegular)));
        let fifo = dir.join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(made.success());
        assert!(
            matches!(read_regular(&fifo, 10), Err(FileError::NotRegular)),
            "a FIFO is refused, not waited on"
        );
        let missing = read_regular(&dir.join("missing"), 10).unwrap_err();
        assert!(missing.is_not_found());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
