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

mod accept;
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
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use self::accept::Port;
// The gRPC port accepts through its own stream, tuned the same way.
#[cfg(feature = "grpc")]
use self::accept::tune;
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

/// Serves the TCP port (`accept.rs`) until `shutdown`; then gives its
/// connections `shutdown_grace` to finish, and cuts those still open.
async fn accept_loop<B: Backend>(listener: TcpListener, shared: Arc<ServerState<B>>, shutdown: CancellationToken) {
    let tracker = TaskTracker::new();
    let port = Port {
        name: "tcp",
        max_connections: shared.config.max_connections,
        max_refusals: MAX_REFUSALS,
        tls: shared.tls_on(),
        keepalive: shared.config.tcp_keepalive,
        refused: &shared.stats.connections_refused,
    };
    let serve = |stream, peer| {
        shared.stats.connections_accepted.fetch_add(1, Ordering::Relaxed);
        conn::serve(stream, peer, shared.clone(), shutdown.clone())
    };
    let max = shared.config.max_connections;
    let refuse = move |stream, peer| conn::refuse(stream, peer, max);
    accept::accept_loop(listener, port, &shutdown, &tracker, serve, refuse).await;
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
