//! The TCP server: a listener, one actor task per connection, and graceful
//! shutdown.
//!
//! Each accepted connection is told apart by its first byte: `0x00` starts a
//! binary frame (frames are under 16 MiB, so the high byte of the length
//! prefix is zero), anything else is the line-based text form. Both forms end
//! in the same [`dispatch`] onto the engine.
//!
//! Connection limit: a connection past `max_connections` is accepted only to
//! be told why it is refused (an error frame or line) and closed, by a small,
//! separately bounded set of refusal tasks, so a client learns "limit
//! exceeded" instead of hanging in the kernel's backlog; past that bound,
//! extra connections are dropped at once.

mod binary;
mod conn;
mod dispatch;
mod text;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::backend::Backend;
use crate::engine::Engine;

/// Server settings. `Default` gives the production defaults.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Connections served at once; more are refused with `LIMIT_EXCEEDED`.
    pub max_connections: usize,
    /// Requests processed concurrently per connection; further frames are
    /// read only as earlier requests finish (TCP back-pressure). Keep it above
    /// the engine's `max_waits_per_session`: a connection whose slots were
    /// all taken by waits would not be read, so its going away would not be
    /// noticed until one of them ends (`clastor serve` enforces this).
    pub max_in_flight: usize,
    /// Largest frame accepted from a client (header + body).
    pub max_frame_len: usize,
    /// Time a new connection has to send its first byte and, in binary mode,
    /// to complete `HELLO`.
    pub handshake_timeout: Duration,
    /// A connection with no request in flight, no lock held and no traffic for
    /// this long is closed. `None`: never.
    pub idle_timeout: Option<Duration>,
    /// How long a stalled client may block a write before it is dropped.
    pub write_timeout: Duration,
    /// TCP keepalive idle time on accepted connections (`None`: off). A
    /// client whose host vanished (power loss, partition) holds its locks
    /// until its connection is known dead: about twice this long (idle time,
    /// then three probes a third of it apart; unacknowledged writes give up
    /// after the same time).
    pub tcp_keepalive: Option<Duration>,
    /// On shutdown, how long connections get to say goodbye and release their
    /// locks before they are cut.
    pub shutdown_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            max_connections: 10_000,
            max_in_flight: 512,
            max_frame_len: clastor_protocol::DEFAULT_MAX_FRAME_LEN,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Some(Duration::from_secs(600)),
            write_timeout: Duration::from_secs(30),
            tcp_keepalive: Some(Duration::from_secs(30)),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Counters shared by all connections.
#[derive(Debug, Default)]
pub(crate) struct ServerStats {
    pub(crate) connections_open: AtomicU64,
    pub(crate) connections_accepted: AtomicU64,
    pub(crate) connections_refused: AtomicU64,
    pub(crate) requests: AtomicU64,
    pub(crate) bad_requests: AtomicU64,
    pub(crate) protocol_errors: AtomicU64,
}

/// What every connection task shares.
#[derive(Debug)]
pub(crate) struct Shared<B: Backend> {
    pub(crate) engine: Engine<B>,
    pub(crate) config: ServerConfig,
    pub(crate) stats: ServerStats,
    pub(crate) local_addr: SocketAddr,
    pub(crate) started: Instant,
    /// Cancelled when the shutdown grace runs out: connections still
    /// writing to a client that does not read give up at once.
    pub(crate) hard_stop: CancellationToken,
}

impl<B: Backend> Shared<B> {
    pub(crate) fn server_name(&self) -> String {
        format!(
            "clastor {} ({})",
            env!("CARGO_PKG_VERSION"),
            self.engine.backend().name()
        )
    }

    pub(crate) fn info(&self) -> Vec<(String, String)> {
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed).to_string();
        let s = &self.stats;
        let mut out = vec![
            ("server".to_owned(), self.server_name()),
            ("listen".to_owned(), self.local_addr.to_string()),
            ("uptime_s".to_owned(), self.started.elapsed().as_secs().to_string()),
            ("connections_open".to_owned(), n(&s.connections_open)),
            ("connections_accepted".to_owned(), n(&s.connections_accepted)),
            ("connections_refused".to_owned(), n(&s.connections_refused)),
            ("max_connections".to_owned(), self.config.max_connections.to_string()),
            ("requests".to_owned(), n(&s.requests)),
            ("bad_requests".to_owned(), n(&s.bad_requests)),
            ("protocol_errors".to_owned(), n(&s.protocol_errors)),
        ];
        out.extend(self.engine.info());
        out
    }
}

/// A running server.
#[derive(Debug)]
pub struct ServerHandle {
    local_addr: SocketAddr,
    shutdown: CancellationToken,
    join: JoinHandle<()>,
}

impl ServerHandle {
    /// The address the server listens on (with the real port if `:0` was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A token that shuts the server down when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Shuts down gracefully: stops accepting, tells every connection, releases
    /// every lock, closes the backend; returns when all of it is done (or the
    /// grace period ran out).
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.wait().await;
    }

    /// Waits until the server has stopped (after its token was cancelled).
    pub async fn wait(self) {
        if let Err(e) = self.join.await {
            warn!(error = %e, "server task failed");
        }
    }
}

/// Binds `config.listen` and serves `engine` on it until shut down.
///
/// # Errors
/// The listener could not be bound.
pub async fn spawn<B: Backend>(engine: Engine<B>, config: ServerConfig) -> io::Result<ServerHandle> {
    let listener = bind(config.listen)?;
    let local_addr = listener.local_addr()?;
    let shared = Arc::new(Shared {
        engine,
        config,
        stats: ServerStats::default(),
        local_addr,
        started: Instant::now(),
        hard_stop: CancellationToken::new(),
    });
    let shutdown = CancellationToken::new();
    let join = tokio::spawn(accept_loop(listener, shared, shutdown.clone()));
    info!(%local_addr, "listening");
    Ok(ServerHandle {
        local_addr,
        shutdown,
        join,
    })
}

fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // Restarting a server must not wait for TIME_WAIT sockets to clear.
    socket.set_reuse_address(true)?;
    socket.set_tcp_nodelay(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// Refusals in progress at once; past this, over-limit connections are
/// dropped without a word.
const MAX_REFUSALS: usize = 64;

async fn accept_loop<B: Backend>(listener: TcpListener, shared: Arc<Shared<B>>, shutdown: CancellationToken) {
    let permits = Arc::new(Semaphore::new(shared.config.max_connections));
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS));
    let tracker = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors or similar: back off instead of
                    // spinning, the condition usually clears as connections close.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        tune(&stream, shared.config.tcp_keepalive);
        match permits.clone().try_acquire_owned() {
            Ok(permit) => {
                shared.stats.connections_accepted.fetch_add(1, Ordering::Relaxed);
                let shared = shared.clone();
                let shutdown = shutdown.clone();
                tracker.spawn(async move {
                    conn::serve(stream, peer, shared, shutdown).await;
                    drop(permit);
                });
            }
            Err(_) => {
                shared.stats.connections_refused.fetch_add(1, Ordering::Relaxed);
                match refusals.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let max = shared.config.max_connections;
                        tracker.spawn(async move {
                            conn::refuse(stream, peer, max).await;
                            drop(permit);
                        });
                    }
                    Err(_) => debug!(%peer, "connection dropped: over the limit and refusals saturated"),
                }
            }
        }
    }
    drop(listener);
    tracker.close();
    info!(connections = tracker.len(), "shutting down");
    if tokio::time::timeout(shared.config.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        warn!(
            connections = tracker.len(),
            "shutdown grace period ran out; cutting the connections still open"
        );
        shared.hard_stop.cancel();
        // They now stop writing and release their locks; the backend's
        // shutdown below releases whatever is still held regardless.
        let _ = tokio::time::timeout(Duration::from_secs(1), tracker.wait()).await;
    }
    // Whatever is still open is released here.
    shared.engine.shutdown().await;
    info!("stopped");
}

/// Per-connection socket options: no Nagle delay, and keepalive so that a
/// client whose host vanished is noticed and its locks released.
fn tune(stream: &tokio::net::TcpStream, keepalive: Option<Duration>) {
    let sock = socket2::SockRef::from(stream);
    if let Err(e) = sock.set_tcp_nodelay(true) {
        debug!(error = %e, "TCP_NODELAY not set");
    }
    let Some(idle) = keepalive else { return };
    let params = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval((idle / 3).max(Duration::from_secs(1)))
        .with_retries(3);
    if let Err(e) = sock.set_tcp_keepalive(&params) {
        debug!(error = %e, "TCP keepalive not set");
    }
    // Data the peer never acknowledges (a LOCK_LOST to a vanished host) ends
    // the connection in the same time.
    #[cfg(target_os = "linux")]
    if let Err(e) = sock.set_tcp_user_timeout(Some(idle.saturating_mul(2))) {
        debug!(error = %e, "TCP_USER_TIMEOUT not set");
    }
}

/// Clamps a duration to whole milliseconds in `u32`.
pub(crate) fn millis_u32(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_connections_get_keepalive() -> io::Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let _client = tokio::net::TcpStream::connect(listener.local_addr()?).await?;
        let (accepted, _) = listener.accept().await?;
        tune(&accepted, Some(Duration::from_secs(30)));
        let sock = socket2::SockRef::from(&accepted);
        assert!(sock.keepalive()?);
        assert!(sock.tcp_nodelay()?);
        assert_eq!(sock.tcp_keepalive_time()?, Duration::from_secs(30));
        assert_eq!(sock.tcp_keepalive_interval()?, Duration::from_secs(10));
        #[cfg(target_os = "linux")]
        assert_eq!(sock.tcp_user_timeout()?, Some(Duration::from_secs(60)));
        Ok(())
    }
}
