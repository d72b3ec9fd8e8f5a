//! The gRPC port's connections: accepted and tuned like the TCP port's,
//! each holding one of `max_connections` permits for its life (past them a
//! connection is closed at once), with TLS when the server has it — the
//! handshakes run beside the accept loop, so a slow or silent client cannot
//! hold up the others — and what tonic's handlers learn of the peer
//! ([`GrpcPeer`]: its address and the name its client certificate gives).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;
use tracing::{debug, warn};

use crate::backend::Backend;
use crate::server::state::ServerState;

/// The longest a TLS handshake may take before the connection is dropped
/// (and its permit returned).
#[cfg(feature = "tls")]
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshaken connections waiting for tonic to take them.
const READY_BUFFER: usize = 64;

/// The acceptor of the gRPC port: the server's certificate with ALPN `h2`.
#[cfg(feature = "tls")]
pub(super) type Tls = Option<crate::server::tls::Acceptor>;
/// Without the `tls` feature there is no TLS to offer.
#[cfg(not(feature = "tls"))]
pub(super) type Tls = Option<std::convert::Infallible>;

/// What a request's extensions carry about its connection.
#[derive(Debug, Clone)]
pub(super) struct GrpcPeer {
    pub(super) addr: SocketAddr,
    /// The name the verified client certificate gives (mTLS), if any.
    pub(super) cert: Option<Arc<str>>,
}

/// The socket, plain or TLS.
#[derive(Debug)]
enum Io {
    Plain(TcpStream),
    #[cfg(feature = "tls")]
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// One gRPC connection with its connection permit.
#[derive(Debug)]
pub(super) struct Conn {
    io: Io,
    peer: GrpcPeer,
    _permit: OwnedSemaphorePermit,
}

/// The accepted (and, with TLS, handshaken) connections, for tonic's
/// `serve_with_incoming_shutdown`. The accept loop ends with `shutdown`.
pub(super) fn incoming<B: Backend>(
    listener: TcpListener,
    shared: Arc<ServerState<B>>,
    tls: Tls,
    max_connections: usize,
    shutdown: CancellationToken,
) -> ReceiverStream<std::io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(READY_BUFFER);
    tokio::spawn(accept(listener, shared, tls, max_connections, shutdown, tx));
    ReceiverStream::new(rx)
}

async fn accept<B: Backend>(
    listener: TcpListener,
    shared: Arc<ServerState<B>>,
    tls: Tls,
    max_connections: usize,
    shutdown: CancellationToken,
    ready: mpsc::Sender<std::io::Result<Conn>>,
) {
    let permits = Arc::new(Semaphore::new(max_connections));
    let keepalive = shared.config.tcp_keepalive;
    loop {
        let (stream, addr) = tokio::select! {
            () = shutdown.cancelled() => return,
            () = ready.closed() => return,
            r = listener.accept() => match r {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors, most likely: pause rather than spin.
                    warn!(error = %e, "gRPC accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            debug!(peer = %addr, "gRPC connection refused: over the limit; closed");
            continue;
        };
        crate::server::tune(&stream, keepalive);
        let peer = GrpcPeer { addr, cert: None };
        match &tls {
            None => {
                let conn = Conn {
                    io: Io::Plain(stream),
                    peer,
                    _permit: permit,
                };
                if ready.send(Ok(conn)).await.is_err() {
                    return;
                }
            }
            #[cfg(feature = "tls")]
            Some(acceptor) => {
                let (acceptor, ready, shared) = (acceptor.clone(), ready.clone(), shared.clone());
                tokio::spawn(async move {
                    if let Some(conn) = handshake(&acceptor, stream, peer, permit, &shared).await {
                        let _ = ready.send(Ok(conn)).await;
                    }
                });
            }
            #[cfg(not(feature = "tls"))]
            Some(never) => match *never {},
        }
    }
}

#[cfg(feature = "tls")]
async fn handshake<B: Backend>(
    acceptor: &crate::server::tls::Acceptor,
    stream: TcpStream,
    mut peer: GrpcPeer,
    permit: OwnedSemaphorePermit,
    shared: &ServerState<B>,
) -> Option<Conn> {
    use std::sync::atomic::Ordering;
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.0.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            shared.stats.tls_failures.fetch_add(1, Ordering::Relaxed);
            tracing::info!(peer = %peer.addr, error = %e, "gRPC TLS handshake failed");
            return None;
        }
        Err(_) => {
            shared.stats.tls_failures.fetch_add(1, Ordering::Relaxed);
            debug!(peer = %peer.addr, "gRPC TLS handshake timed out");
            return None;
        }
    };
    peer.cert = crate::server::tls::peer_name(tls.get_ref().1).map(Arc::from);
    Some(Conn {
        io: Io::Tls(Box::new(tls)),
        peer,
        _permit: permit,
    })
}

impl Connected for Conn {
    type ConnectInfo = GrpcPeer;
    fn connect_info(&self) -> GrpcPeer {
        self.peer.clone()
    }
}

macro_rules! on_io {
    ($self:ident, $s:ident => $e:expr) => {
        match &mut $self.io {
            Io::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            #[cfg(feature = "tls")]
            Io::Tls($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
        }
    };
}

impl AsyncRead for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        on_io!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        on_io!(self, s => s.poll_write(cx, buf))
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        on_io!(self, s => s.poll_flush(cx))
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        on_io!(self, s => s.poll_shutdown(cx))
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        on_io!(self, s => s.poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            #[cfg(feature = "tls")]
            Io::Tls(s) => s.is_write_vectored(),
        }
    }
}
