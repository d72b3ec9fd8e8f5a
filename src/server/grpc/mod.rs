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

mod auth;
mod calls;
mod config;
mod conn;
pub mod proto;
mod sessions;
mod status;
mod stream;

pub use config::{GrpcConfig, GrpcConfigError};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clastor_protocol::LostReason;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Streaming};
use tracing::{info, warn};

use self::conn::GrpcPeer;
use self::proto::locks_server::{Locks, LocksServer};
use self::sessions::{CallGuard, Owner, Sessions};
use super::ServerConfig;
use super::auth::Permission;
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

/// The bound gRPC port, with its TLS acceptor when the server has TLS.
#[derive(Debug)]
pub(super) struct Bound {
    listener: TcpListener,
    tls: conn::Tls,
}

impl Bound {
    pub(super) fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// Binds the gRPC port (and reads the TLS files for it, with ALPN `h2`):
/// done before the server reports itself started, so a port in use fails
/// `spawn`.
pub(super) async fn bind(config: &GrpcConfig, server: &ServerConfig) -> std::io::Result<Bound> {
    #[cfg(feature = "tls")]
    let tls = match &server.tls {
        Some(t) => Some(
            super::tls::acceptor_with_alpn(t, vec![b"h2".to_vec()])
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?,
        ),
        None => None,
    };
    #[cfg(not(feature = "tls"))]
    let tls = {
        let _ = server;
        None
    };
    Ok(Bound {
        listener: TcpListener::bind(config.listen).await?,
        tls,
    })
}

/// Serves gRPC on `bound` until `shutdown`.
pub(super) async fn serve<B: Backend>(
    bound: Bound,
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
    if bound.tls.is_some() {
        info!("gRPC port speaks TLS only (ALPN h2)");
    }
    let incoming = conn::incoming(
        bound.listener,
        shared.clone(),
        bound.tls,
        config.max_connections,
        shutdown.clone(),
    );
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
    match req.extensions().get::<GrpcPeer>() {
        Some(peer) => format!("grpc {}", peer.addr),
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
    /// The session a unary call names, marked in use for the call, if the
    /// caller is the principal that opened it.
    fn session<T>(&self, request: &Request<T>, id: u64) -> Result<CallGuard<B>, tonic::Status> {
        if self.port.shutdown.is_cancelled() {
            return Err(status::to_status(clastor_protocol::ErrorReply {
                status: clastor_protocol::Status::ShuttingDown,
                message: "server shutting down".into(),
            }));
        }
        let entry = self.port.sessions.get(id).ok_or_else(|| status::no_session(id))?;
        auth::same_principal(&self.port.shared, request, &entry.access)?;
        Ok(entry.call())
    }
}

fn answer<T>(r: Result<T, clastor_protocol::ErrorReply>) -> Reply<T> {
    r.map(Response::new).map_err(status::to_status)
}

#[tonic::async_trait]
impl<B: Backend> Locks for Service<B> {
    type SessionStream = ReceiverStream<Result<proto::SessionEvent, tonic::Status>>;

    async fn session(&self, request: Request<Streaming<proto::SessionRequest>>) -> Reply<Self::SessionStream> {
        let access = auth::caller(&self.port.shared, &request)?;
        let label = label(&request);
        let Some((id, entry, lost)) = self.port.sessions.open(label, Owner::Stream, access) else {
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
        let access = auth::caller(&self.port.shared, &request)?;
        let label = label(&request);
        let Some((id, entry, _lost)) = self.port.sessions.open(label, Owner::Unary, access) else {
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
        let id = request.get_ref().session_id;
        let closed = match self.port.sessions.get(id) {
            // A stream's session is the stream's to close.
            Some(e) if e.owner == Owner::Stream => {
                return Err(tonic::Status::failed_precondition(
                    "a Session stream's session closes with its stream",
                ));
            }
            Some(e) => {
                auth::same_principal(&self.port.shared, &request, &e.access)?;
                self.port.sessions.close(id).await
            }
            None => false,
        };
        Ok(Response::new(proto::CloseSessionReply { closed }))
    }

    async fn acquire(&self, request: Request<proto::AcquireRequest>) -> Reply<proto::AcquireReply> {
        let entry = self.session(&request, request.get_ref().session_id)?;
        let a = request.into_inner();
        let rid = a.request_id;
        answer(calls::acquire(&self.port.shared, &entry, self.port.idle_ms(), rid, a).await)
    }

    async fn release(&self, request: Request<proto::ReleaseRequest>) -> Reply<proto::ReleaseReply> {
        let entry = self.session(&request, request.get_ref().session_id)?;
        let r = request.into_inner();
        answer(calls::release(&self.port.shared, &entry, r).await)
    }

    async fn renew(&self, request: Request<proto::RenewRequest>) -> Reply<proto::RenewReply> {
        let entry = self.session(&request, request.get_ref().session_id)?;
        let r = request.into_inner();
        answer(calls::renew(&self.port.shared, &entry, self.port.idle_ms(), r).await)
    }

    async fn confirm(&self, request: Request<proto::ConfirmRequest>) -> Reply<proto::ConfirmReply> {
        let entry = self.session(&request, request.get_ref().session_id)?;
        answer(calls::confirm(&self.port.shared, &entry, self.port.idle_ms()).await)
    }

    async fn held(&self, request: Request<proto::HeldRequest>) -> Reply<proto::HeldReply> {
        if request.get_ref().all && request.get_ref().session_id == 0 {
            auth::require(&self.port.shared, &request, Permission::Admin, None)?;
            return Ok(Response::new(calls::held_all(&self.port.shared)));
        }
        let entry = self.session(&request, request.get_ref().session_id)?;
        let h = request.into_inner();
        answer(calls::held(&self.port.shared, &entry, h.all).await)
    }

    async fn version(&self, request: Request<proto::VersionRequest>) -> Reply<proto::VersionReply> {
        auth::require(
            &self.port.shared,
            &request,
            Permission::Read,
            Some(&request.get_ref().kind),
        )?;
        answer(calls::version(&self.port.shared, &request.into_inner().kind).await)
    }

    async fn rotate(&self, request: Request<proto::RotateRequest>) -> Reply<proto::RotateReply> {
        auth::require(
            &self.port.shared,
            &request,
            Permission::Rotate,
            Some(&request.get_ref().kind),
        )?;
        answer(calls::rotate(&self.port.shared, request.into_inner()).await)
    }
}

impl<B: Backend> GrpcPort<B> {
    fn sessions_max(&self) -> usize {
        self.sessions.max()
    }
}
