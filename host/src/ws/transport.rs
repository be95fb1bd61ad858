//! The byte stream under a WebSocket session: plain TCP or TLS, and the read and write
//! halves a session drives at the same time.
//!
//! Plain TCP is the fast path: readiness plus `try_read_buf`, and [`send_frames`]
//! (`send(2)` for one frame, `sendmsg(2)` for several) straight on the socket, with
//! nothing in between. The stream is shared (`Arc`) so
//! that the member's outbound queue can write through to it (see `broadcast`); every
//! operation here takes `&TcpStream`. TLS runs rustls over the same socket; its halves
//! come from `tokio::io::split`, which puts the stream behind a lock that each half
//! takes only while it is being polled, so the reader waiting for bytes never blocks
//! the writer.

use std::io::{self, IoSlice};
use std::net::Shutdown;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// An upgraded connection.
#[derive(Debug)]
pub enum Transport {
    Plain(Arc<TcpStream>),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Transport {
    /// Take the connection back from hyper after a 101: the stream, and the bytes
    /// hyper read past the upgrade request. Gives `upgraded` back if its stream is
    /// neither of the server's own kinds.
    pub fn from_upgraded(upgraded: Upgraded) -> Result<(Self, Bytes), Upgraded> {
        let upgraded = match upgraded.downcast::<TokioIo<Prefixed>>() {
            Ok(parts) => {
                let Prefixed { prefix, stream } = parts.io.into_inner();
                // hyper's unread bytes came off the stream before what is left of the
                // prefix (only left when hyper's buffer could not take it all).
                let rest = if prefix.is_empty() {
                    parts.read_buf
                } else {
                    let mut rest = BytesMut::with_capacity(parts.read_buf.len() + prefix.len());
                    rest.extend_from_slice(&parts.read_buf);
                    rest.extend_from_slice(&prefix);
                    rest.freeze()
                };
                return Ok((Self::Plain(Arc::new(stream)), rest));
            }
            Err(upgraded) => upgraded,
        };
        let parts = upgraded.downcast::<TokioIo<TlsStream<TcpStream>>>()?;
        Ok((Self::Tls(Box::new(parts.io.into_inner())), parts.read_buf))
    }

    /// The socket, when the queue may write through to it (plain TCP).
    pub fn direct(&self) -> Option<Arc<TcpStream>> {
        match self {
            Self::Plain(stream) => Some(Arc::clone(stream)),
            Self::Tls(_) => None,
        }
    }

    /// The read and write halves, usable concurrently from one task.
    pub fn split(&mut self) -> (Reader<'_>, Writer<'_>) {
        match self {
            Self::Plain(stream) => (Reader::Plain(stream), Writer::Plain(stream)),
            Self::Tls(stream) => {
                let (read, write) = tokio::io::split(&mut **stream);
                (Reader::Tls(read), Writer::Tls(write))
            }
        }
    }
}

/// A TCP stream with bytes already read off it in front: what the server read of a
/// connection's first request head before it handed the connection to hyper (see
/// `server::head`). Reads give the prefix first; writes go straight to the stream.
#[derive(Debug)]
pub struct Prefixed {
    prefix: Bytes,
    stream: TcpStream,
}

impl Prefixed {
    pub fn new(prefix: Bytes, stream: TcpStream) -> Self {
        Self { prefix, stream }
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.prefix.is_empty() {
            return Pin::new(&mut this.stream).poll_read(cx, buf);
        }
        let n = this.prefix.len().min(buf.remaining());
        buf.put_slice(&this.prefix.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// The read half of a [`Transport`].
pub enum Reader<'a> {
    Plain(&'a TcpStream),
    Tls(tokio::io::ReadHalf<&'a mut TlsStream<TcpStream>>),
}

/// The write half of a [`Transport`].
pub enum Writer<'a> {
    Plain(&'a TcpStream),
    Tls(tokio::io::WriteHalf<&'a mut TlsStream<TcpStream>>),
}

impl Reader<'_> {
    /// Wait for bytes and append what is there to `buf`, first making room for at
    /// least `chunk` more; `Ok(0)` at the end of the stream. Cancel-safe: if the
    /// future is dropped, no bytes were taken. On plain TCP the room is made only once
    /// the socket is readable, and a readiness that turns out stale returns
    /// `WouldBlock`, so the caller can drop an empty buffer before it waits again: an
    /// idle connection holds no read buffer.
    pub async fn read_buf(&mut self, buf: &mut BytesMut, chunk: usize) -> io::Result<usize> {
        let reserve = |buf: &mut BytesMut| {
            if buf.capacity() - buf.len() < chunk {
                buf.reserve(chunk);
            }
        };
        match self {
            Self::Plain(half) => {
                // The socket's own read slot (`poll_read_ready`), not a waiter
                // (`readable`): the first wait replaces the waker that hyper's
                // connection task left there while it served the upgrade. That waker
                // kept the finished task's memory (1.5 KiB) until the socket next
                // became readable, so an idle connection held it until its first pong.
                std::future::poll_fn(|cx| half.poll_read_ready(cx)).await?;
                reserve(buf);
                try_read_emptying(half, buf)
            }
            Self::Tls(half) => {
                reserve(buf);
                half.read_buf(buf).await
            }
        }
    }

    /// Read and discard until the peer closes its side (or the stream fails).
    pub async fn drain_to_end(&mut self) {
        // On the heap: an array here would sit in every session's future, idle or not.
        let mut scratch = vec![0u8; 1024];
        loop {
            let read = match self {
                Self::Plain(half) => match half.readable().await {
                    Ok(()) => half.try_read(&mut scratch),
                    Err(e) => Err(e),
                },
                Self::Tls(half) => half.read(&mut scratch).await,
            };
            match read {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    }
}

impl Writer<'_> {
    /// Write a prefix of `frames` with one system call on plain TCP (`send(2)` for a
    /// single frame, else `writev(2)`), returning at once with `Ok(0)` when the kernel
    /// takes nothing; then [`Writer::ready`] waits for it. TLS waits inside.
    pub async fn write_some(&mut self, frames: &[Bytes]) -> io::Result<usize> {
        let written = match self {
            Self::Plain(stream) => stream.try_io(Interest::WRITABLE, || send_frames(stream, frames)),
            // On the heap: slices held across the await would grow every session's
            // future, plain ones included.
            Self::Tls(half) => {
                let slices: Vec<IoSlice<'_>> = frames.iter().map(|frame| IoSlice::new(frame)).collect();
                half.write_vectored(&slices).await
            }
        };
        match written {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Ok(0) if !frames.iter().all(Bytes::is_empty) => Err(io::ErrorKind::WriteZero.into()),
            result => result,
        }
    }

    /// Wait until the transport can take more bytes.
    pub async fn ready(&mut self) -> io::Result<()> {
        match self {
            Self::Plain(stream) => stream.writable().await,
            Self::Tls(_) => Ok(()),
        }
    }

    /// Push out whatever the transport still buffers (TLS records; nothing on TCP).
    pub async fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Plain(_) => Ok(()),
            Self::Tls(half) => half.flush().await,
        }
    }

    /// Whether this is plain TCP (no TLS session to end).
    pub fn is_plain(&self) -> bool {
        matches!(self, Self::Plain(_))
    }

    /// Close the sending side: a TLS `close_notify`, then the TCP FIN.
    pub async fn shutdown(&mut self) -> io::Result<()> {
        match self {
            Self::Plain(stream) => SockRef::from(*stream).shutdown(Shutdown::Write),
            Self::Tls(half) => half.shutdown().await,
        }
    }
}

/// One non-blocking read into `buf`'s spare room. A read that did not fill the room it
/// was given emptied the socket: readiness is cleared then (the closure's `WouldBlock`
/// makes `try_io` clear it, unless an event came meanwhile), as tokio's own `poll_read`
/// does, so the next wait for bytes waits instead of costing a `recvfrom` that returns
/// EAGAIN. `WouldBlock` when there was nothing to read.
pub fn try_read_emptying(stream: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    let room = buf.capacity() - buf.len();
    let mut short = None;
    let read = stream.try_io(Interest::READABLE, || {
        let n = stream.try_read_buf(buf)?;
        if n > 0 && n < room {
            short = Some(n);
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match (read, short) {
        (Err(e), Some(n)) if e.kind() == io::ErrorKind::WouldBlock => Ok(n),
        (read, _) => read,
    }
}

/// The most frames one write sends (the rest wait for the next).
pub const MAX_FRAMES_PER_WRITE: usize = 64;

/// One non-blocking `send(2)` of `frames` on `socket` (`sendmsg(2)` for several, up to
/// [`MAX_FRAMES_PER_WRITE`]), without consulting tokio's readiness: the caller decides
/// what a refusal means to it.
pub fn send_frames(socket: &impl std::os::fd::AsFd, frames: &[impl AsRef<[u8]>]) -> io::Result<usize> {
    let socket = SockRef::from(socket);
    if let [frame] = frames {
        return socket.send(frame.as_ref());
    }
    let mut slices = [IoSlice::new(&[]); MAX_FRAMES_PER_WRITE];
    let count = frames.len().min(MAX_FRAMES_PER_WRITE);
    for (slice, frame) in slices.iter_mut().zip(frames) {
        *slice = IoSlice::new(frame.as_ref());
    }
    socket.send_vectored(&slices[..count])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::{Context, Poll, Wake, Waker};
    use tokio::net::TcpListener;

    /// A waker that only counts who holds it.
    struct Held;

    impl Wake for Held {
        fn wake(self: Arc<Self>) {}
    }

    /// hyper's connection task polls the socket for reading while it serves the
    /// upgrade, and tokio keeps that task's waker until the socket next becomes
    /// readable; the waker keeps the finished task's memory. The session's first wait
    /// must take the slot over, or an idle connection holds that memory until its
    /// client sends something.
    #[tokio::test]
    async fn the_first_wait_for_bytes_drops_the_waker_left_on_the_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        // An accepted socket starts out assumed readable; one read finds out.
        let nothing = stream.try_read(&mut [0u8; 1]).unwrap_err();
        assert_eq!(nothing.kind(), io::ErrorKind::WouldBlock);
        let held = Arc::new(Held);
        let waker = Waker::from(held.clone());
        assert!(stream.poll_read_ready(&mut Context::from_waker(&waker)).is_pending());
        drop(waker);
        assert_eq!(Arc::strong_count(&held), 2, "the socket keeps the waker");

        let mut transport = Transport::Plain(Arc::new(stream));
        let (mut reader, _writer) = transport.split();
        let mut buf = BytesMut::new();
        let read = reader.read_buf(&mut buf, 4096);
        tokio::pin!(read);
        let polled = std::future::poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx))).await;
        assert!(polled.is_pending(), "nothing to read yet");
        assert_eq!(Arc::strong_count(&held), 1, "the session's wait replaced the waker");
    }

    /// A read that leaves room in the buffer emptied the socket: the next read waits
    /// for bytes instead of returning at once with `WouldBlock` (a `recvfrom` that
    /// finds nothing, once per message).
    #[tokio::test]
    async fn after_a_short_read_the_next_read_waits_for_bytes() {
        use tokio::io::AsyncWriteExt as _;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        let mut transport = Transport::Plain(Arc::new(stream));
        let (mut reader, _writer) = transport.split();
        let mut buf = BytesMut::new();
        client.write_all(b"0123456789").await.unwrap();
        assert_eq!(reader.read_buf(&mut buf, 4096).await.unwrap(), 10);
        assert_eq!(&buf[..], b"0123456789");

        {
            let read = reader.read_buf(&mut buf, 4096);
            tokio::pin!(read);
            let polled = std::future::poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx))).await;
            assert!(polled.is_pending(), "the socket is empty: the read waits ({polled:?})");
            client.write_all(b"abc").await.unwrap();
            assert_eq!(read.await.unwrap(), 3);
        }
        assert_eq!(&buf[..], &b"0123456789abc"[..]);
    }
}
