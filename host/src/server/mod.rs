//! The server: the listening socket, one HTTP/1.1 connection task per TCP connection
//! with a handshake watchdog, the router (`/ws/{room}`, `/healthz`, `/metrics`), and
//! [`run`], which returns only when every session and room has drained.

mod head;
pub mod shutdown;
mod sockopt;
pub mod tls;
pub mod watchdog;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use bytes::{Bytes, BytesMut};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service as _;

use crate::config::Config;
use crate::http::upgrade::{self, ConnInfo, UpgradeHead};
use crate::http::{Shared, router};
use crate::metrics::{Metrics, RejectReason};
use crate::plugin::reload::{LivePlugins, PluginsError, Watcher};
use crate::plugin::{HistorySettings, HostCaps};
use crate::room::{Gate, Rooms};
use crate::ws::handshake::Rejection;
use crate::ws::transport::{Prefixed, Transport};
use tls::TlsError;
use watchdog::{Admitted, Overstay, Pending, Tracked, Watch, watchdog};

/// The most a request head may take (request line and headers): what production
/// servers allow; more gets 431 before the request is handled.
pub const MAX_HEAD_BYTES: usize = 16 << 10;
/// The most one header line (or the request target) may take; more gets 431 (414).
pub const MAX_HEADER_LINE: usize = 8 << 10;
/// hyper's read buffer per connection before the upgrade (its minimum is 8 KiB).
const MAX_HTTP_BUFFER: usize = 32 << 10;

/// A startup failure.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}{hint}")]
    Bind {
        addr: SocketAddr,
        /// A next step for the common causes.
        hint: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Plugins(#[from] PluginsError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error("cannot set up the poll that watches idle connections")]
    Parking(#[source] std::io::Error),
}

/// Bind the listening socket with an explicit backlog (tokio's default of 128
/// overflows under a reconnect storm, and clients then wait a second for a SYN
/// retransmit) and, on Linux, deferred accept (see [`sockopt::defer_accept`]).
pub fn bind(addr: SocketAddr, backlog: u32) -> Result<TcpListener, ServerError> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() };
    let bind = |socket: TcpSocket| -> std::io::Result<TcpListener> {
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        if let Err(error) = sockopt::defer_accept(&socket) {
            // Not fatal: connections are then accepted on the handshake's last ACK.
            tracing::warn!(%error, "cannot defer accept until a connection's first bytes");
        }
        socket.listen(backlog)
    };
    socket.and_then(bind).map_err(|source| {
        let hint = match source.kind() {
            std::io::ErrorKind::AddrInUse => " (another server holds the port; pick another with --listen)",
            std::io::ErrorKind::PermissionDenied => {
                " (ports below 1024 need privileges; try --listen 127.0.0.1:8080)"
            }
            _ => "",
        };
        ServerError::Bind { addr, hint, source }
    })
}

/// Serve on `listener` until `shutdown` resolves; see [`Server::run`].
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    Server::new(config)?.run(listener, shutdown).await
}

/// A configured server, before it runs. Holding it gives access to its metrics.
#[derive(Debug)]
pub struct Server {
    shared: Arc<Shared>,
    /// The connections that have not upgraded (`--max-http-connections`); at the cap
    /// no more are accepted until one leaves or a stalled one makes room. With the
    /// watchdog's deadlines, what a client without a token can hold.
    pending: Arc<Pending>,
}

impl Server {
    /// Set up the server: start the plugin runtime and load the plugins folder.
    pub fn new(config: Config) -> Result<Self, ServerError> {
        let tls = tls::server_config(&config)?;
        let metrics = Arc::new(Metrics::default());
        let tracker = TaskTracker::new();
        let caps =
            HostCaps { max_deadline: config.plugin_max_deadline, max_memory: config.plugin_max_memory };
        let plugins = Arc::new(LivePlugins::load(
            config.plugins.as_deref(),
            caps,
            config.plugin_cache.clone(),
            metrics.clone(),
        )?);
        let cluster = match &config.redis {
            Some(url) => Some(crate::cluster::Cluster::new(url, config.cluster_lease)?),
            None => None,
        };
        if let Some(cluster) = &cluster {
            metrics.register_collector(cluster.metrics_collector());
        }
        let gate = Arc::new(Gate::new(plugins.clone(), metrics.clone()));
        let shutdown = CancellationToken::new();
        let rooms = Arc::new(
            Rooms::new(metrics.clone(), plugins, tracker.clone())
                .with_cluster(cluster)
                .with_history(
                    (config.history_size > 0)
                        .then_some(HistorySettings { size: config.history_size, ttl: config.history_ttl }),
                    usize::try_from(config.max_queue_bytes / 2).unwrap_or(usize::MAX),
                    usize::try_from(config.history_memory).unwrap_or(usize::MAX),
                )
                .with_compression(config.compression.then_some(config.compression_threshold)),
        );
        let shared = Arc::new(Shared {
            sessions: Arc::new(Semaphore::new(config.max_connections)),
            gate,
            draining: AtomicBool::new(false),
            next_member: AtomicU64::new(1),
            tls,
            dashboard: Default::default(),
            session_context: Arc::new(
                crate::session::Context::new(
                    rooms.clone(),
                    metrics.clone(),
                    crate::session::Limits {
                        heartbeat_interval: config.heartbeat_interval,
                        pong_timeout: config.pong_timeout,
                        max_message_bytes: config.max_message_bytes as usize,
                    },
                    shutdown.clone(),
                    tracker.clone(),
                )
                .map_err(ServerError::Parking)?,
            ),
            rooms,
            metrics,
            tracker,
            shutdown,
            config,
        });
        // After each reload, every live room re-resolves its plugin at once.
        let rooms = Arc::downgrade(&shared.rooms);
        shared.rooms.plugins().on_publish(move || {
            if let Some(rooms) = rooms.upgrade() {
                rooms.plugins_changed();
            }
        });
        let pending = Pending::new(shared.config.max_http_connections);
        Ok(Self { shared, pending })
    }

    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.shared.metrics.clone()
    }

    /// Serve on `listener` until `shutdown` resolves, then drain: `/healthz` answers
    /// 503, the listener closes, every session gets close 1001, and `run` returns once
    /// all sessions and rooms have ended or `shutdown_timeout` has passed.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServerError> {
        let shared = self.shared;
        let router = router(shared.clone());
        // Told to stop when `run` returns (never waited for: it may be compiling).
        let _watcher = Watcher::start(shared.rooms.plugins().clone());
        // Parked sessions' heartbeats; ends once shutdown has woken them all.
        tokio::spawn(crate::session::park::keep_time(shared.session_context.clone()));
        if let Some(cluster) = shared.rooms.cluster() {
            // Member ids must be unique across the cluster: each node gets its own range.
            shared.next_member.store(cluster.start().await, Relaxed);
        }
        if let Ok(addr) = listener.local_addr() {
            log_start(&shared, addr);
        }

        accept_until(&shared, &self.pending, &router, &listener, shutdown).await;
        // Drain: health checks fail and upgrades are refused first, so load balancers
        // stop sending, then the listener closes and sessions get 1001.
        shared.draining.store(true, Relaxed);
        if !shared.config.drain_delay.is_zero() {
            tracing::info!(delay = ?shared.config.drain_delay, "draining: /healthz answers 503");
            accept_until(
                &shared,
                &self.pending,
                &router,
                &listener,
                tokio::time::sleep(shared.config.drain_delay),
            )
            .await;
        }
        tracing::info!("shutting down: closing sessions");
        drop(listener);
        shared.shutdown.cancel();
        shared.tracker.close();
        if tokio::time::timeout(shared.config.shutdown_timeout, shared.tracker.wait()).await.is_err() {
            tracing::warn!("shutdown timeout passed with sessions still open; dropping them");
        }
        if let Some(cluster) = shared.rooms.cluster() {
            // The rooms handed their leases over as they emptied; send what is queued.
            cluster.stop().await;
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// The start-up line: where to connect, which plugins folder, whether the admin API
/// and the dashboard are on.
fn log_start(shared: &Shared, addr: SocketAddr) {
    let scheme = if shared.tls.is_some() { "https" } else { "http" };
    let url = format!("{scheme}://{addr}");
    let plugins = shared.rooms.plugins();
    let plugins = match plugins.dir() {
        Some(dir) => format!("{} ({} loaded)", dir.display(), plugins.current().len()),
        None => "none (every room broadcasts)".to_owned(),
    };
    let admin = if shared.config.admin_token.is_some() {
        format!("on: {url}/admin/…, dashboard at {url}/dashboard")
    } else {
        "off (set --admin-token to turn on the admin API and the dashboard)".to_owned()
    };
    let cluster = if shared.rooms.cluster().is_some() { "on (Redis)" } else { "off" };
    tracing::info!(%url, demo = %format!("{url}/"), %plugins, %admin, %cluster, "listening");
}

/// Accept connections until `until` resolves.
async fn accept_until(
    shared: &Arc<Shared>,
    pending: &Arc<Pending>,
    router: &Router,
    listener: &TcpListener,
    until: impl Future<Output = ()>,
) {
    tokio::pin!(until);
    loop {
        // At `max_http_connections`, accept nothing more (new connections wait in the
        // listen backlog) until a place frees up or a stalled connection makes room.
        tokio::select! {
            () = &mut until => return,
            () = pending.room() => {}
        }
        tokio::select! {
            () = &mut until => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, remote)) => {
                    let _ = stream.set_nodelay(true);
                    let admitted = pending.admit();
                    tokio::spawn(serve_connection(shared.clone(), router.clone(), stream, remote, admitted));
                }
                Err(error) => {
                    // Out of file descriptors or similar: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// Checks every request passes before it is routed: an over-long header line or
/// request target (431, 414) and a request with more than one `Host` (400, which an
/// origin check could otherwise read two ways).
fn refuse_head<B>(req: &hyper::Request<B>) -> Option<Rejection> {
    let target = req.uri().path_and_query().map_or(0, |target| target.as_str().len());
    refused(target, req.headers())
}

/// [`refuse_head`] on a request target's length and the headers.
fn refused(target: usize, headers: &axum::http::HeaderMap) -> Option<Rejection> {
    let refuse = |status, message| Some(Rejection::new(status, RejectReason::BadRequest, message));
    if target > MAX_HEADER_LINE {
        return refuse(StatusCode::URI_TOO_LONG, "request target too long");
    }
    if headers.iter().any(|(name, value)| name.as_str().len() + value.len() > MAX_HEADER_LINE) {
        return refuse(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "header line too long");
    }
    if headers.get_all(header::HOST).iter().nth(1).is_some() {
        return refuse(StatusCode::BAD_REQUEST, "more than one Host header");
    }
    None
}

/// Serve one accepted TCP connection: complete the TLS handshake first when TLS is on,
/// then serve HTTP on it. The handshake timeout runs from accept, so a client that
/// opens TCP and never finishes TLS is closed after it and counted as `timeout`.
async fn serve_connection(
    shared: Arc<Shared>,
    router: Router,
    stream: TcpStream,
    remote: SocketAddr,
    admitted: Admitted,
) {
    let accepted = Instant::now();
    let evicted = admitted.evicted.clone();
    match shared.tls.clone() {
        None => serve_plain(shared, router, stream, remote, accepted, evicted).await,
        // Boxed: the TLS states are several KiB, and inline they would make every
        // plain connection's task that large too.
        Some(tls) => Box::pin(serve_tls(shared, router, stream, remote, accepted, tls, evicted)).await,
    }
    // After an upgrade the session holds its own slot (`max_connections`).
    drop(admitted);
}

/// Plain TCP: the first request head is read here, and a WebSocket upgrade that passes
/// every check is answered without hyper (see [`head`]); anything else is served by
/// hyper, the bytes read so far in front of the socket.
async fn serve_plain(
    shared: Arc<Shared>,
    router: Router,
    stream: TcpStream,
    remote: SocketAddr,
    accepted: Instant,
    evicted: CancellationToken,
) {
    let mut buf = BytesMut::new();
    let deadline = accepted + shared.config.handshake_timeout;
    let Some(first) = in_time(&shared, &evicted, deadline, head::read(&stream, &mut buf)).await else {
        tracing::debug!(%remote, "no complete request head in time, or closed to make room");
        return;
    };
    let stream = match first {
        Ok(head::First::Upgrade(head)) => {
            match upgrade_plain(&shared, stream, head, buf, remote, &evicted).await {
                Some((stream, bytes)) => Prefixed::new(bytes, stream),
                None => return,
            }
        }
        Ok(head::First::Other) => Prefixed::new(buf.freeze(), stream),
        Ok(head::First::Closed) | Err(_) => return,
    };
    serve_http(shared, router, stream, remote, accepted, evicted).await;
}

/// Answer an upgrade head read by [`serve_plain`]: the 101 and a session, or the
/// plugin's refusal. A request that fails a check before the plugin's decision is
/// given back (with the bytes read) for hyper to refuse, as it refuses every other.
async fn upgrade_plain(
    shared: &Arc<Shared>,
    mut stream: TcpStream,
    head: head::Head,
    mut buf: BytesMut,
    remote: SocketAddr,
    evicted: &CancellationToken,
) -> Option<(TcpStream, Bytes)> {
    let request = UpgradeHead {
        method: &axum::http::Method::GET,
        version: axum::http::Version::HTTP_11,
        path: head.path(),
        query: head.query(),
        headers: &head.headers,
        remote,
    };
    let Ok((valid, permit)) = upgrade::check(shared, &request) else {
        return Some((stream, buf.freeze()));
    };
    // The request is this connection's now: its handling and the answer have the
    // handshake timeout from here, as under hyper's watchdog.
    let deadline = Instant::now() + shared.config.handshake_timeout;
    let answered = async {
        match upgrade::decide(shared, &request, valid, permit).await {
            Ok(upgrade) => {
                stream.write_all(&upgrade.response_head()).await?;
                Ok(Ok(upgrade))
            }
            Err(rejection) => {
                shared.metrics.rejected(rejection.reason);
                stream.write_all(&rejection.http1_response()).await?;
                Ok(Err(()))
            }
        }
    };
    let answered: std::io::Result<_> = in_time(shared, evicted, deadline, answered).await?;
    match answered {
        Ok(Ok(upgrade)) => {
            // What the client sent after the head (its first frames) is the session's.
            let rest = buf.split_off(head.len).freeze();
            upgrade.start(shared, std::future::ready(Some((Transport::Plain(Arc::new(stream)), rest))));
        }
        Ok(Err(())) => {
            // Refused: close once the client has read the answer (its unread bytes
            // would make the kernel send a reset that can destroy it), within the
            // request's deadline, and at once when the place is needed or at shutdown.
            let _ = stream.shutdown().await;
            let drain = async {
                let mut scratch = [0u8; 512];
                while matches!(stream.read(&mut scratch).await, Ok(n) if n > 0) {}
            };
            // The refusal is counted already: an end of the drain is not a timeout.
            let _ = within(shared, evicted, deadline, drain).await;
        }
        Err(error) => tracing::debug!(%remote, %error, "upgrade answer not written"),
    }
    None
}

/// Run `work` for a connection that has not upgraded, until `deadline`. `None` when the
/// deadline passed or the connection is closed to make room (both counted as a
/// handshake `timeout`, as the watchdog counts them under hyper), or at shutdown.
async fn in_time<T>(
    shared: &Shared,
    evicted: &CancellationToken,
    deadline: Instant,
    work: impl Future<Output = T>,
) -> Option<T> {
    match within(shared, evicted, deadline, work).await {
        Ok(done) => Some(done),
        Err(Cut::Shutdown) => None,
        Err(Cut::Expired) => {
            shared.metrics.rejected(RejectReason::Timeout);
            None
        }
    }
}

/// What ended a connection's wait before its work was done.
enum Cut {
    /// The deadline passed, or the connection is closed to make room under
    /// `max_http_connections`.
    Expired,
    Shutdown,
}

/// Run `work` until `deadline`, the connection's eviction or shutdown, whichever comes
/// first; counts nothing (see [`in_time`]).
async fn within<T>(
    shared: &Shared,
    evicted: &CancellationToken,
    deadline: Instant,
    work: impl Future<Output = T>,
) -> Result<T, Cut> {
    tokio::select! {
        done = work => Ok(done),
        () = tokio::time::sleep_until(deadline) => Err(Cut::Expired),
        () = evicted.cancelled() => Err(Cut::Expired),
        () = shared.shutdown.cancelled() => Err(Cut::Shutdown),
    }
}

async fn serve_tls(
    shared: Arc<Shared>,
    router: Router,
    stream: TcpStream,
    remote: SocketAddr,
    accepted: Instant,
    tls: Arc<rustls::ServerConfig>,
    evicted: CancellationToken,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let handshake = tokio::select! {
        done = tokio::time::timeout(shared.config.handshake_timeout, acceptor.accept(stream)) => done,
        () = shared.shutdown.cancelled() => return,
        () = evicted.cancelled() => {
            shared.metrics.rejected(RejectReason::Timeout);
            return;
        }
    };
    match handshake {
        Ok(Ok(stream)) => serve_http(shared, router, stream, remote, accepted, evicted).await,
        Ok(Err(error)) => {
            shared.metrics.rejected(RejectReason::BadRequest);
            tracing::debug!(%remote, %error, "TLS handshake failed");
        }
        Err(_) => {
            shared.metrics.rejected(RejectReason::Timeout);
            tracing::debug!(%remote, "TLS handshake timeout");
        }
    }
}

/// Serve HTTP on one connection until it upgrades, closes, idles out or the server
/// shuts down.
async fn serve_http<S>(
    shared: Arc<Shared>,
    router: Router,
    stream: S,
    remote: SocketAddr,
    accepted: Instant,
    evicted: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let watch = Arc::new(Watch::default());
    let service_watch = watch.clone();
    let metrics = shared.metrics.clone();
    let service = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        let exchange = service_watch.begin();
        req.extensions_mut().insert(ConnInfo { remote });
        let mut router = router.clone();
        let metrics = metrics.clone();
        let watch = service_watch.clone();
        async move {
            let response = match refuse_head(&req) {
                Some(refused) => {
                    if req.uri().path().starts_with("/ws") {
                        metrics.rejected(refused.reason);
                    }
                    refused.into_response()
                }
                None => router.call(req).await.unwrap_or_else(|never| match never {}),
            };
            if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                // The session owns the socket's time from here on.
                watch.upgraded();
            }
            Ok::<_, std::convert::Infallible>(Tracked::response(response, exchange))
        }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .max_header_size(MAX_HEAD_BYTES)
        .max_buf_size(MAX_HTTP_BUFFER)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(connection);

    let timeout = shared.config.handshake_timeout;
    tokio::select! {
        _ = &mut connection => {}
        overstay = watchdog(&watch, accepted, timeout) => {
            if overstay == Overstay::NeverCompleted {
                shared.metrics.rejected(RejectReason::Timeout);
            }
            tracing::debug!(%remote, ?overstay, "HTTP connection closed by the watchdog");
        }
        () = evicted.cancelled() => {
            if watch.is_upgraded() {
                // Too late to make room with it: the upgrade is being handed over.
                let _ = connection.as_mut().await;
                return;
            }
            // Waited too long while new connections queue behind `max_http_connections`;
            // one that never completed a request counts as a handshake timeout.
            if !watch.completed_any() {
                shared.metrics.rejected(RejectReason::Timeout);
            }
            tracing::debug!(%remote, "HTTP connection closed to make room for a newer one");
        }
        () = shared.shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(1), connection).await;
        }
    }
}
