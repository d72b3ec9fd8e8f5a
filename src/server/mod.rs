//! The TCP server: a listener, one actor task per connection, and graceful
//! shutdown.
//!
//! Each accepted connection is told apart by its first byte: `0x00` starts a
//! binary frame (frames are under 16 MiB, so the high byte of the length
//! prefix is zero), anything else is the line-based text form. Both forms end
//! in the same `dispatch` onto the engine.
//!
//! With the `http` feature and `ServerConfig::http` set, the same task also
//! serves the operators' HTTP port (`http/`), sharing the shutdown; with
//! the `grpc` feature and `ServerConfig::grpc` set, the gRPC API (`grpc/`)
//! likewise.
//!
//! Connection limit: a connection past `max_connections` is accepted only to
//! be told why it is refused (an error frame or line) and closed, by a small,
//! separately bounded set of refusal tasks, so a client learns "limit
//! exceeded" instead of hanging in the kernel's backlog; past that bound,
//! extra connections are dropped at once.

mod auth;
mod binary;
mod config;
mod conn;
mod dispatch;
#[cfg(feature = "grpc")]
mod grpc;
#[cfg(feature = "http")]
mod http;
mod io;
mod state;
mod stream;
mod text;
#[cfg(feature = "tls")]
mod tls;
mod wire;

#[cfg(feature = "tls")]
pub use auth::{AuthConfig, AuthError, hash_token};
pub use config::{ConfigError, IN_FLIGHT_HEADROOM, ServerConfig};
#[cfg(feature = "grpc")]
pub use grpc::proto as grpc_proto;
#[cfg(feature = "grpc")]
pub use grpc::{GrpcConfig, GrpcConfigError};
#[cfg(feature = "http")]
pub use http::{HttpConfig, HttpConfigError};
#[cfg(feature = "tls")]
pub use tls::{TlsConfig, TlsError};

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
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
use state::{ServerState, ServerStats};

/// Reloads a running server's auth file.
#[cfg(feature = "tls")]
#[derive(Debug, Clone)]
pub struct AuthReloader(Arc<auth::Authenticator>);

#[cfg(feature = "tls")]
impl AuthReloader {
    /// Reads the auth file again. Established connections keep their
    /// principal; their next request is checked against the new file.
    /// Returns how many principals it names.
    ///
    /// # Errors
    /// The file cannot be read or is invalid: the one in force stays.
    pub fn reload(&self) -> Result<usize, AuthError> {
        self.0.reload()
    }
}

/// A running server.
#[derive(Debug)]
pub struct ServerHandle {
    local_addr: SocketAddr,
    http_addr: Option<SocketAddr>,
    grpc_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    join: JoinHandle<()>,
    #[cfg(feature = "tls")]
    auth: Option<Arc<auth::Authenticator>>,
}

impl ServerHandle {
    /// The address the server listens on (with the real port if `:0` was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address of the HTTP port, if it is on (with the real port if `:0` was asked).
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// What reloads the auth file (on `SIGHUP`, in the CLI); `None` with
    /// authentication off.
    #[cfg(feature = "tls")]
    pub fn auth_reloader(&self) -> Option<AuthReloader> {
        self.auth.clone().map(AuthReloader)
    }

    /// The address of the gRPC port, if it is on (with the real port if `:0` was asked).
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.grpc_addr
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
/// [`std::io::ErrorKind::InvalidInput`] wrapping a [`ConfigError`] if the settings
/// break a rule of [`ServerConfig::validate`]; the listener could not be bound.
pub async fn spawn<B: Backend>(engine: Engine<B>, config: ServerConfig) -> std::io::Result<ServerHandle> {
    config
        .validate(engine.config())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let invalid = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, e);
    #[cfg(feature = "tls")]
    let auth = match &config.auth {
        Some(a) => Some(Arc::new(
            auth::Authenticator::load(a).map_err(|e| invalid(e.to_string()))?,
        )),
        None => None,
    };
    #[cfg(feature = "tls")]
    let tls = match &config.tls {
        Some(t) => Some(tls::acceptor(t).map_err(|e| invalid(e.to_string()))?),
        None => None,
    };
    let _ = &invalid;
    let listener = bind(config.listen)?;
    let local_addr = listener.local_addr()?;
    #[cfg(feature = "http")]
    let http = match &config.http {
        Some(http) => {
            let l = http::bind(http).await?;
            Some((l.local_addr()?, l, http.clone()))
        }
        None => None,
    };
    #[cfg(feature = "grpc")]
    let grpc = match &config.grpc {
        Some(grpc) => {
            let l = grpc::bind(grpc, &config).await?;
            Some((l.local_addr()?, l, grpc.clone()))
        }
        None => None,
    };
    let shared = Arc::new(ServerState {
        engine,
        config,
        stats: ServerStats::default(),
        local_addr,
        started: Instant::now(),
        hard_stop: CancellationToken::new(),
        #[cfg(feature = "tls")]
        auth: auth.clone(),
        #[cfg(feature = "tls")]
        tls,
    });
    if shared.auth_on() {
        info!("authentication on: requests need a principal (AUTH, a bearer token or a client certificate)");
    } else {
        warn!(
            "authentication off: anyone who can reach the ports can take, block or rotate any lock (see --auth-file)"
        );
    }
    if shared.tls_on() {
        info!("TLS on: every port speaks TLS only");
    }
    let shutdown = CancellationToken::new();
    #[allow(unused_mut)]
    let mut ports: Vec<Pin<Box<dyn Future<Output = ()> + Send>>> = Vec::new();
    #[allow(unused_mut)]
    let mut http_addr = None;
    #[cfg(feature = "http")]
    if let Some((addr, l, cfg)) = http {
        http_addr = Some(addr);
        info!(http = %addr, "HTTP port listening");
        ports.push(Box::pin(http::serve(l, shared.clone(), cfg, shutdown.clone())));
    }
    #[allow(unused_mut)]
    let mut grpc_addr = None;
    #[cfg(feature = "grpc")]
    if let Some((addr, l, cfg)) = grpc {
        grpc_addr = Some(addr);
        info!(grpc = %addr, "gRPC port listening");
        ports.push(Box::pin(grpc::serve(l, shared.clone(), cfg, shutdown.clone())));
    }
    let tcp = accept_loop(listener, shared.clone(), shutdown.clone());
    let join = tokio::spawn(async move {
        let others = futures_util::future::join_all(ports);
        tokio::join!(tcp, others);
        // Whatever is still open is released here.
        shared.engine.shutdown().await;
        info!("stopped");
    });
    info!(%local_addr, "listening");
    Ok(ServerHandle {
        local_addr,
        http_addr,
        grpc_addr,
        shutdown,
        join,
        #[cfg(feature = "tls")]
        auth,
    })
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
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

async fn accept_loop<B: Backend>(listener: TcpListener, shared: Arc<ServerState<B>>, shutdown: CancellationToken) {
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
                    // A TLS client would read a plain refusal as garbage:
                    // it is closed without a word.
                    Ok(_) if shared.tls_on() => debug!(%peer, "TLS connection dropped: over the limit"),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_connections_get_keepalive() -> std::io::Result<()> {
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
