//! Socket options the standard library and `socket2` do not offer, set with
//! `setsockopt(2)` directly: the one place in `server/` with `unsafe`.

use tokio::net::TcpSocket;

/// How long the kernel holds a connection that has sent nothing before handing it to
/// `accept` anyway (Linux rounds it to its SYN-ACK retransmission schedule: one
/// retransmission, about a second).
#[cfg(target_os = "linux")]
const DEFER_ACCEPT_SECS: libc::c_int = 1;

/// `TCP_DEFER_ACCEPT`: the kernel hands a connection to `accept` once its first bytes
/// (the request head, or TLS's ClientHello) have arrived, not on the handshake's last
/// ACK. The server then accepts and reads in one wake-up instead of two (paired
/// measurement in bench/PROFILE.md section 17), and a client that connects and sends
/// nothing holds no descriptor and no place under `max_http_connections` for its first
/// [`DEFER_ACCEPT_SECS`]: until then it is a request socket in the kernel's SYN queue,
/// which the listen backlog bounds (past it the kernel answers with SYN cookies, and
/// such a connection is accepted on its last ACK as without this option). After that
/// it is accepted and the handshake timeout runs as for any connection.
#[cfg(target_os = "linux")]
pub(super) fn defer_accept(socket: &TcpSocket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let secs = DEFER_ACCEPT_SECS;
    // SAFETY: `setsockopt` on a descriptor this function borrows, with a pointer to a
    // live `c_int` and its size; the kernel only reads those 4 bytes.
    #[allow(unsafe_code)]
    let set = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&raw const secs).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if set == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

#[cfg(not(target_os = "linux"))]
pub(super) fn defer_accept(_socket: &TcpSocket) -> std::io::Result<()> {
    Ok(())
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpStream;

    use crate::server::bind;

    #[tokio::test]
    async fn a_connection_is_accepted_once_it_sends_or_once_the_deferral_has_passed() {
        let listener = bind("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = TcpStream::connect(addr).await.unwrap();
        // Connected on the client's side, but not handed to `accept` while it is silent.
        let early = tokio::time::timeout(Duration::from_millis(500), listener.accept()).await;
        assert!(early.is_err(), "a connection that sent nothing was accepted at once");
        client.write_all(b"G").await.unwrap();
        let accepted = tokio::time::timeout(Duration::from_secs(5), listener.accept()).await;
        let (mut accepted, _) = accepted.expect("not accepted after its first byte").unwrap();
        let mut byte = [0u8; 1];
        accepted.read_exact(&mut byte).await.unwrap();
        assert_eq!(&byte, b"G");
        // A client that never sends is still handed over (and then meets the handshake
        // timeout) once the deferral has passed: no connection is left behind.
        let _silent = TcpStream::connect(addr).await.unwrap();
        let late = tokio::time::timeout(Duration::from_secs(10), listener.accept()).await;
        late.expect("a silent connection was never accepted").unwrap();
    }
}
