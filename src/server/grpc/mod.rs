//! The gRPC API (feature `grpc`): `proto/clastor/v1/lock.proto` served by
//! tonic on the server's runtime, on its own port (`GrpcConfig::listen`).
//!
//! Its own port rather than the HTTP port's: the operators' port is
//! HTTP/1.1 with a per-request timeout and limits sized for probes and
//! short REST calls, while a `Session` stream is a long-lived HTTP/2 call
//! that must outlive any request timeout; separate, the two keep their own
//! limits, can be exposed to different networks, and gRPC needs no `http`
//! feature.
//!
//! Owners: a `Session` stream is one engine session (`stream.rs`); unary
//! calls name a session that `OpenSession` made (`sessions.rs`), which
//! expires when idle. Every request runs through the server's `dispatch`,
//! so gRPC has the binary protocol's semantics (`calls.rs`); errors map to
//! gRPC codes in one place (`status.rs`).
//!
//! Limits: connections (past `max_connections` a new one is closed),
//! HTTP/2 streams per connection, sessions (`max_sessions`), requests in
//! flight per stream (the TCP server's `max_in_flight`), message size.
//! Shutdown is the server's: the same token stops accepting, streams say
//! goodbye and close, unary sessions are closed, and tonic drains the
//! connections within the shutdown grace.

mod calls;
mod config;
pub mod proto;
mod sessions;
mod status;
mod stream;

pub use config::{GrpcConfig, GrpcConfigError};

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use clastor_protocol::LostReason;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::{Request, Response, Streaming};
use tracing::{debug, info, warn};

use self::proto::locks_server::{Locks, LocksServer};
use self::sessions::{CallGuard, Owner, Sessions};
use super::state::ServerState;
use crate::backend::Backend;

/// What the gRPC service and its stream tasks share.
#[derive(Debug)]
pub(super) struct GrpcPort<B: Backend> {
    shared: Arc<ServerState<B>>,
    sessions: Sessions<B>,
    shutdown: CancellationToken,
}

impl<B: Backend> GrpcPort<B> {
    fn idle_ms(&self) -> u32 {
        u32::try_from(self.sessions.idle_expiry().as_millis()).unwrap_or(u32::MAX - 1)
    }
}

/// The `Locks` service.
#[derive(Debug)]
struct Service<B: Backend> {
    port: Arc<GrpcPort<B>>,
}

/// Binds the gRPC port: done before the server reports itself started, so
/// a port in use fails `spawn`.
pub(super) async fn bind(config: &GrpcConfig) -> std::io::Result<TcpListener> {
    TcpListener::bind(config.listen).await
}

/// Serves gRPC on `listener` until `shutdown`.
pub(super) async fn serve<B: Backend>(
    listener: TcpListener,
    shared: Arc<ServerState<B>>,
    config: GrpcConfig,
    shutdown: CancellationToken,
) {
    let port = Arc::new(GrpcPort {
        sessions: Sessions::new(shared.engine.clone(), config.max_sessions, config.idle_expiry),
        shared: shared.clone(),
        shutdown: shutdown.clone(),
    });
    let expiry = {
        let port = port.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move { port.sessions.run_expiry(shutdown).await })
    };
    let service = LocksServer::new(Service { port: port.clone() })
        .max_decoding_message_size(config.max_message)
        .max_encoding_message_size(config.max_message);
    // HTTP/2 pings find a vanished peer within the TCP keepalive's time, so
    // a stream's promise (bounded by the server's horizon) holds for gRPC too.
    let ping = shared
        .config
        .tcp_keepalive
        .map(|idle| (idle / 2).max(Duration::from_secs(1)));
    let incoming = incoming(listener, shared.clone(), config.max_connections);
    let grace = shared.config.shutdown_grace + Duration::from_secs(1);
    let server = tonic::transport::Server::builder()
        .max_concurrent_streams(config.max_streams_per_connection)
        .http2_keepalive_interval(ping)
        .http2_keepalive_timeout(ping)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned());
    tokio::select! {
        r = server => if let Err(e) = r {
            warn!(error = %e, "gRPC server failed");
        },
        // Streams end themselves on shutdown; a connection that does not
        // finish within the grace is cut.
        () = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
            warn!("gRPC connections still open after the shutdown grace; cut");
        }
    }
    let _ = expiry.await;
    info!("gRPC port stopped");
}

/// Accepted connections, tuned like the TCP port's, each holding one of
/// `max_connections` permits for its life; past them a connection is
/// closed at once.
fn incoming<B: Backend>(
    listener: TcpListener,
    shared: Arc<ServerState<B>>,
    max_connections: usize,
) -> impl futures_util::Stream<Item = std::io::Result<Limited>> {
    let permits = Arc::new(Semaphore::new(max_connections));
    futures_util::stream::unfold((listener, permits), move |(listener, permits)| {
        let keepalive = shared.config.tcp_keepalive;
        async move {
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        warn!(error = %e, "gRPC accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    debug!(%peer, "gRPC connection refused: over the limit; closed");
                    continue;
                };
                super::tune(&stream, keepalive);
                return Some((
                    Ok(Limited {
                        stream,
                        _permit: permit,
                    }),
                    (listener, permits),
                ));
            }
        }
    })
}

/// A gRPC connection's socket with its connection permit.
#[derive(Debug)]
struct Limited {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl Connected for Limited {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Limited {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Limited {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// The lost reason in the `.proto`'s enum.
fn lost_reason(r: LostReason) -> proto::LostReason {
    match r {
        LostReason::Unknown => proto::LostReason::Unknown,
        LostReason::LeaseExpired => proto::LostReason::LeaseExpired,
        LostReason::SessionExpired => proto::LostReason::SessionExpired,
        LostReason::BackendUnreachable => proto::LostReason::BackendUnreachable,
        LostReason::ServerShutdown => proto::LostReason::Shutdown,
        LostReason::BackendError => proto::LostReason::BackendError,
        LostReason::NodeDeleted => proto::LostReason::NodeDeleted,
    }
}

fn label<T>(req: &Request<T>) -> String {
    match req.remote_addr() {
        Some(peer) => format!("grpc {peer}"),
        None => "grpc".to_owned(),
    }
}

fn too_many_sessions(max: usize) -> tonic::Status {
    status::to_status(clastor_protocol::ErrorReply {
        status: clastor_protocol::Status::LimitExceeded,
        message: format!("too many gRPC sessions (limit {max}); try again later"),
    })
}

type Reply<T> = Result<Response<T>, tonic::Status>;

impl<B: Backend> Service<B> {
    /// The session a unary call names, marked in use for the call.
    fn session(&self, id: u64) -> Result<CallGuard<B>, tonic::Status> {
        if self.port.shutdown.is_cancelled() {
            return Err(status::to_status(clastor_protocol::ErrorReply {
                status: clastor_protocol::Status::ShuttingDown,
                message: "server shutting down".into(),
            }));
        }
        self.port
            .sessions
            .get(id)
            .map(|e| e.call())
            .ok_or_else(|| status::no_session(id))
    }
}

fn answer<T>(r: Result<T, clastor_protocol::ErrorReply>) -> Reply<T> {
    r.map(Response::new).map_err(status::to_status)
}

#[tonic::async_trait]
impl<B: Backend> Locks for Service<B> {
    type SessionStream = ReceiverStream<Result<proto::SessionEvent, tonic::Status>>;

    async fn session(&self, request: Request<Streaming<proto::SessionRequest>>) -> Reply<Self::SessionStream> {
        let label = label(&request);
        let Some((id, entry, lost)) = self.port.sessions.open(label, Owner::Stream) else {
            return Err(too_many_sessions(self.port.sessions_max()));
        };
        let (tx, rx) = mpsc::channel(stream::OUTBOUND_BUFFER);
        tokio::spawn(stream::run(
            self.port.clone(),
            id,
            entry,
            lost,
            request.into_inner(),
            tx,
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn open_session(&self, request: Request<proto::OpenSessionRequest>) -> Reply<proto::OpenSessionReply> {
        let label = label(&request);
        let Some((id, entry, _lost)) = self.port.sessions.open(label, Owner::Unary) else {
            return Err(too_many_sessions(self.port.sessions_max()));
        };
        // Unary sessions hear of losses by asking (Confirm, Held, Renew):
        // their lost events are dropped with `_lost`.
        let name = request.into_inner().client_name;
        if !name.is_empty() {
            entry.session.set_client_name(&name);
        }
        Ok(Response::new(proto::OpenSessionReply {
            session_id: id,
            idle_expiry_ms: self.port.idle_ms(),
            confirm_ms: crate::server::dispatch::confirm_ms(&self.port.shared).min(self.port.idle_ms() / 4),
            server: self.port.shared.server_name(),
        }))
    }

    async fn close_session(&self, request: Request<proto::CloseSessionRequest>) -> Reply<proto::CloseSessionReply> {
        let id = request.into_inner().session_id;
        let closed = match self.port.sessions.get(id) {
            // A stream's session is the stream's to close.
            Some(e) if e.owner == Owner::Stream => {
                return Err(tonic::Status::failed_precondition(
                    "a Session stream's session closes with its stream",
                ));
            }
            Some(_) => self.port.sessions.close(id).await,
            None => false,
        };
        Ok(Response::new(proto::CloseSessionReply { closed }))
    }

    async fn acquire(&self, request: Request<proto::AcquireRequest>) -> Reply<proto::AcquireReply> {
        let a = request.into_inner();
        let entry = self.session(a.session_id)?;
        let rid = a.request_id;
        answer(calls::acquire(&self.port.shared, &entry, self.port.idle_ms(), rid, a).await)
    }

    async fn release(&self, request: Request<proto::ReleaseRequest>) -> Reply<proto::ReleaseReply> {
        let r = request.into_inner();
        let entry = self.session(r.session_id)?;
        answer(calls::release(&self.port.shared, &entry, r).await)
    }

    async fn renew(&self, request: Request<proto::RenewRequest>) -> Reply<proto::RenewReply> {
        let r = request.into_inner();
        let entry = self.session(r.session_id)?;
        answer(calls::renew(&self.port.shared, &entry, self.port.idle_ms(), r).await)
    }

    async fn confirm(&self, request: Request<proto::ConfirmRequest>) -> Reply<proto::ConfirmReply> {
        let entry = self.session(request.into_inner().session_id)?;
        answer(calls::confirm(&self.port.shared, &entry, self.port.idle_ms()).await)
    }

    async fn held(&self, request: Request<proto::HeldRequest>) -> Reply<proto::HeldReply> {
        let h = request.into_inner();
        if h.all && h.session_id == 0 {
            return Ok(Response::new(calls::held_all(&self.port.shared)));
        }
        let entry = self.session(h.session_id)?;
        answer(calls::held(&self.port.shared, &entry, h.all).await)
    }

    async fn version(&self, request: Request<proto::VersionRequest>) -> Reply<proto::VersionReply> {
        answer(calls::version(&self.port.shared, &request.into_inner().kind).await)
    }

    async fn rotate(&self, request: Request<proto::RotateRequest>) -> Reply<proto::RotateReply> {
        answer(calls::rotate(&self.port.shared, request.into_inner()).await)
    }
}

impl<B: Backend> GrpcPort<B> {
    fn sessions_max(&self) -> usize {
        self.sessions.max()
    }
}
