//! TLS test support: a throwaway certificate authority that issues server certificates
//! for `localhost` and `127.0.0.1`, and TLS clients that trust only that authority.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::rustls::{self, pki_types::CertificateDer, pki_types::ServerName};

pub type TlsClientStream = tokio_rustls::client::TlsStream<TcpStream>;

/// A certificate authority made for one test.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A server certificate the authority issued, written to disk as PEM.
pub struct Issued {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// The certificate, as a client sees it in the handshake.
    pub der: CertificateDer<'static>,
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

impl TestCa {
    pub fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "roomcast test CA");
        let key = KeyPair::generate().expect("CA key");
        Self { issuer: CertifiedIssuer::self_signed(params, key).expect("CA certificate") }
    }

    /// Issue a certificate for `localhost` and `127.0.0.1` with a fresh key, and write
    /// `NAME.crt` and `NAME.key` into `dir`.
    pub fn issue(&self, dir: &Path, name: &str) -> Issued {
        let params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).expect("params");
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        let issued = Issued {
            cert_file: dir.join(format!("{name}.crt")),
            key_file: dir.join(format!("{name}.key")),
            der: cert.der().clone(),
        };
        std::fs::write(&issued.cert_file, cert.pem()).expect("write certificate");
        std::fs::write(&issued.key_file, key.serialize_pem()).expect("write key");
        issued
    }

    /// The authority's certificate in PEM, for a client in another process to trust.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A TLS client configuration that trusts this authority only.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.issuer.der().clone()).expect("trust the CA");
        let mut config =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("protocol versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }

    /// Open TCP to `addr` and complete a TLS handshake for `localhost`.
    pub async fn connect(&self, addr: SocketAddr) -> anyhow::Result<TlsClientStream> {
        let tcp = TcpStream::connect(addr).await?;
        let connector = tokio_rustls::TlsConnector::from(self.client_config());
        Ok(connector.connect(ServerName::try_from("localhost")?.to_owned(), tcp).await?)
    }

    /// `GET path` over TLS: status and body.
    pub async fn https_get(&self, addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
        let mut stream = self.connect(addr).await?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: localhost:{}\r\nConnection: close\r\n\r\n", addr.port());
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        // A server may end the stream without close_notify after `Connection: close`.
        let _ = stream.read_to_end(&mut response).await;
        let response = String::from_utf8_lossy(&response).into_owned();
        let status =
            crate::status_of(&response).ok_or_else(|| anyhow::anyhow!("no status in {response:?}"))?;
        let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
        Ok((status, body))
    }

    /// A `wss://localhost:PORT/ws/ROOM` client.
    pub async fn wss(
        &self,
        addr: SocketAddr,
        room: &str,
    ) -> anyhow::Result<tokio_tungstenite::WebSocketStream<TlsClientStream>> {
        let stream = self.connect(addr).await?;
        let url = format!("wss://localhost:{}/ws/{room}", addr.port());
        let (client, _) = tokio_tungstenite::client_async(url, stream).await?;
        Ok(client)
    }
}

/// The certificate the server presented on `stream`.
pub fn peer_certificate(stream: &TlsClientStream) -> CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().expect("server certificates")[0].clone().into_owned()
}
