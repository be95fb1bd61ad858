//! TLS for `https://` and `wss://`: the PEM certificate chain and key from
//! `--tls-cert`/`--tls-key`, checked against each other at start-up, and a certificate
//! resolver that picks up files replaced on disk at the next handshake, without a
//! restart.
//!
//! rustls runs with the `ring` provider (the default aws-lc-rs provider builds C for
//! minutes on a small machine). Each handshake looks at the two files' metadata (two
//! `stat` calls, cheap next to the handshake's own cryptography); when either changed
//! since the last look, both are read again. A pair that fails to load (half-written,
//! or a key that does not match) is logged and the previous certificate keeps serving;
//! the next change to either file is tried again.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::config::Config;

/// Why TLS could not be set up. The server does not start with one.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS needs both --tls-cert and --tls-key ([tls] cert and key); only {given} is set")]
    Incomplete { given: &'static str },
    #[error("cannot read TLS {what} file {}: {reason}", file.display())]
    Unreadable { what: &'static str, file: PathBuf, reason: String },
    #[error("TLS certificate file {} holds no PEM certificate", .0.display())]
    NoCertificate(PathBuf),
    #[error("TLS key file {} holds no PEM private key", .0.display())]
    NoKey(PathBuf),
    #[error("TLS key file {} is not a usable private key: {reason}", file.display())]
    BadKey { file: PathBuf, reason: String },
    #[error("TLS key {} does not match certificate {}", key.display(), cert.display())]
    Mismatch { cert: PathBuf, key: PathBuf },
    #[error("cannot set up TLS: {0}")]
    Rustls(String),
}

/// The TLS settings for `config`, or `None` when TLS is off (neither file set).
pub fn server_config(config: &Config) -> Result<Option<Arc<rustls::ServerConfig>>, TlsError> {
    let (cert, key) = match (&config.tls_cert, &config.tls_key) {
        (None, None) => return Ok(None),
        (Some(_), None) => return Err(TlsError::Incomplete { given: "the certificate" }),
        (None, Some(_)) => return Err(TlsError::Incomplete { given: "the key" }),
        (Some(cert), Some(key)) => (cert.clone(), key.clone()),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let resolver = Arc::new(ReloadingCert::load(cert, key, provider.clone())?);
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    // The server speaks HTTP/1.1 only (WebSocket upgrades need it).
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(Arc::new(server)))
}

/// What identifies one version of a file: modification time, size and inode. A file
/// replaced by a rename or rewritten in place changes at least one of them.
type Stamp = Option<(SystemTime, u64, u64)>;

fn stamp(path: &Path) -> Stamp {
    let meta = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let inode = 0;
    Some((meta.modified().ok()?, meta.len(), inode))
}

/// A certificate resolver that reloads its files when they change on disk.
#[derive(Debug)]
pub struct ReloadingCert {
    cert_file: PathBuf,
    key_file: PathBuf,
    provider: Arc<CryptoProvider>,
    /// The files' stamps at the last look and the pair now served. Locked only to
    /// compare stamps and, after a change, to load the new pair.
    state: Mutex<(Stamp, Stamp, Arc<CertifiedKey>)>,
}

impl ReloadingCert {
    /// Load the pair now; a pair that does not load is an error.
    pub fn load(
        cert_file: PathBuf,
        key_file: PathBuf,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, TlsError> {
        let stamps = (stamp(&cert_file), stamp(&key_file));
        let key = Arc::new(load_pair(&cert_file, &key_file, &provider)?);
        Ok(Self { cert_file, key_file, provider, state: Mutex::new((stamps.0, stamps.1, key)) })
    }

    /// The pair to serve: the one loaded last, reloaded first if a file changed.
    pub fn current(&self) -> Arc<CertifiedKey> {
        let stamps = (stamp(&self.cert_file), stamp(&self.key_file));
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if (&state.0, &state.1) != (&stamps.0, &stamps.1) {
            // Whatever the outcome, this version of the files is not tried again.
            (state.0, state.1) = stamps;
            match load_pair(&self.cert_file, &self.key_file, &self.provider) {
                Ok(key) => {
                    tracing::info!(cert = %self.cert_file.display(), "TLS certificate reloaded");
                    state.2 = Arc::new(key);
                }
                Err(error) => {
                    tracing::warn!(%error, "TLS certificate not reloaded; the previous one keeps serving");
                }
            }
        }
        state.2.clone()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// The largest certificate chain or key file read (a long chain is a few dozen KiB).
const MAX_PEM_FILE: u64 = 1 << 20;

/// Read a PEM certificate chain and private key and check that they belong together.
fn load_pair(cert_file: &Path, key_file: &Path, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    let read = |what, file: &Path| {
        crate::files::read_regular(file, MAX_PEM_FILE).map_err(|e| TlsError::Unreadable {
            what,
            file: file.to_owned(),
            reason: e.to_string(),
        })
    };
    let cert_pem = read("certificate", cert_file)?;
    let key_pem = read("key", key_file)?;
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&cert_pem).filter_map(Result::ok).collect();
    if chain.is_empty() {
        return Err(TlsError::NoCertificate(cert_file.to_owned()));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| TlsError::NoKey(key_file.to_owned()))?;
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::BadKey { file: key_file.to_owned(), reason: e.to_string() })?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) => Ok(certified),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err(TlsError::Mismatch { cert: cert_file.to_owned(), key: key_file.to_owned() })
        }
        // A key type whose public half rustls cannot derive: nothing to compare.
        Err(rustls::Error::InconsistentKeys(_)) => Ok(certified),
        Err(other) => Err(TlsError::Rustls(format!("certificate {}: {other}", cert_file.display()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let (cert_file, key_file) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
        std::fs::write(&cert_file, cert.cert.pem()).unwrap();
        std::fs::write(&key_file, cert.signing_key.serialize_pem()).unwrap();
        (cert_file, key_file)
    }

    fn temp_dir() -> PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "roomcast-tls-unit-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_key_from_another_pair_is_a_mismatch() {
        let dir = temp_dir();
        let (cert, _) = write_pair(&dir, "a");
        let (_, key) = write_pair(&dir, "b");
        let provider = rustls::crypto::ring::default_provider();
        let error = load_pair(&cert, &key, &provider).unwrap_err();
        assert!(matches!(error, TlsError::Mismatch { .. }), "{error}");
        assert!(error.to_string().contains("does not match"), "{error}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_replaced_pair_is_served_and_a_broken_one_is_not() {
        let dir = temp_dir();
        let (cert, key) = write_pair(&dir, "live");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let resolver = ReloadingCert::load(cert.clone(), key.clone(), provider).unwrap();
        let first = resolver.current();
        assert!(Arc::ptr_eq(&first, &resolver.current()), "unchanged files are not read again");

        let (new_cert, new_key) = write_pair(&dir, "next");
        std::fs::rename(&new_cert, &cert).unwrap();
        std::fs::rename(&new_key, &key).unwrap();
        let second = resolver.current();
        assert_ne!(first.cert, second.cert, "the new certificate is served");

        std::fs::write(&key, "not a key").unwrap();
        assert_eq!(resolver.current().cert, second.cert, "a broken pair keeps the previous one");
        let _ = std::fs::remove_dir_all(dir);
    }
}
