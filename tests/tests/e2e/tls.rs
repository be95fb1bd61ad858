//! TLS end to end: `https://` and `wss://` with a certificate the test generates, a
//! certificate replaced on disk served to the next connection without a restart, and
//! the handshake timeout covering the TLS handshake.

use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use roomcast::config::Config;
use roomcast::metrics::RejectReason;
use roomcast::types::CloseReason;
use roomcast_tests::tls::{TestCa, peer_certificate};
use roomcast_tests::*;
use tokio::io::AsyncReadExt as _;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

fn tls_config(cert: &tls::Issued) -> Config {
    Config { tls_cert: Some(cert.cert_file.clone()), tls_key: Some(cert.key_file.clone()), ..test_config() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_and_wss_with_a_generated_certificate() {
    let dir = PluginDir::new(&[]);
    let ca = TestCa::new();
    let cert = ca.issue(&dir.path, "server");
    let server = TestServer::start(tls_config(&cert)).await;

    let (status, body) = ca.https_get(server.addr, "/healthz").await.unwrap();
    assert_eq!((status, body.as_str()), (200, "ok\n"));

    let mut ada = ca.wss(server.addr, "lobby").await.unwrap();
    let mut bob = ca.wss(server.addr, "lobby").await.unwrap();
    while server.metrics.room_members.load(std::sync::atomic::Ordering::Relaxed) < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    ada.send(Message::text("hello over TLS")).await.unwrap();
    assert_eq!(recv(&mut bob).await, Message::text("hello over TLS"));
    // Larger than one TLS record (16 KiB) each way, and a burst of small ones.
    let big = vec![7u8; 60_000];
    bob.send(Message::binary(big.clone())).await.unwrap();
    assert_eq!(recv(&mut ada).await, Message::binary(big));
    for i in 0..200 {
        ada.send(Message::text(format!("m{i}"))).await.unwrap();
    }
    for i in 0..200 {
        assert_eq!(recv(&mut bob).await, Message::text(format!("m{i}")));
    }

    // A close handshake over TLS: the client's close is echoed and counted as `client`.
    ada.close(None).await.unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ada.next()).await.expect("close answered") {
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
            Some(Ok(_)) => {}
        }
    }
    drop(bob);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while server.metrics.closed_count(CloseReason::Client) < 1 {
        assert!(tokio::time::Instant::now() < deadline, "the TLS close was not counted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Plain HTTP to a TLS port is not served.
    let response = raw_request(server.addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    assert!(!response.contains("200"), "{response}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_certificate_is_served_to_the_next_connection() {
    let dir = PluginDir::new(&[]);
    let ca = TestCa::new();
    let first = ca.issue(&dir.path, "server");
    let server = TestServer::start(tls_config(&first)).await;

    let before = ca.connect(server.addr).await.unwrap();
    assert_eq!(peer_certificate(&before), first.der);
    let mut live = ca.wss(server.addr, "room").await.unwrap();

    // Replace both files the way a certificate manager does: write new ones, rename.
    let next = ca.issue(&dir.path, "next");
    std::fs::rename(&next.cert_file, &first.cert_file).unwrap();
    std::fs::rename(&next.key_file, &first.key_file).unwrap();

    let after = ca.connect(server.addr).await.unwrap();
    assert_eq!(peer_certificate(&after), next.der, "the new certificate, without a restart");
    assert_ne!(next.der, first.der);

    // A connection made before the swap keeps working.
    live.send(Message::Ping(b"still here".to_vec().into())).await.unwrap();
    assert!(matches!(
        tokio::time::timeout(Duration::from_secs(5), live.next()).await.unwrap(),
        Some(Ok(Message::Pong(_)))
    ));

    // A broken replacement keeps the last good certificate serving.
    std::fs::write(&first.key_file, "not a key").unwrap();
    let still = ca.connect(server.addr).await.unwrap();
    assert_eq!(peer_certificate(&still), next.der);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_tls_is_closed_as_a_timeout() {
    let dir = PluginDir::new(&[]);
    let cert = TestCa::new().issue(&dir.path, "server");
    let server =
        TestServer::start(Config { handshake_timeout: Duration::from_millis(300), ..tls_config(&cert) })
            .await;

    let started = tokio::time::Instant::now();
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut byte)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "the server closes the connection: {read:?}");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(250) && took < Duration::from_secs(2), "closed after {took:?}");
    assert_eq!(server.metrics.rejected_count(RejectReason::Timeout), 1);
    server.stop().await;
}
