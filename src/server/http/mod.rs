//! The operators' HTTP port (feature `http`): Prometheus metrics, health
//! checks, the REST API and the live status page, served by axum on hyper
//! on the server's own runtime, next to the lock protocol's TCP port.
//!
//! It has limits of its own: connections (past `max_connections` a new one
//! gets a JSON `503 LIMIT_EXCEEDED` and is closed, and is counted), lock
//! requests (acquires and rotations, which may wait: past
//! `max_lock_requests` an immediate JSON `429`; kept below the connection
//! limit so waiting acquires never starve `/healthz`, `/readyz` and
//! `/metrics`), header read time, body size (413), and one timeout per
//! request (503). Every answer is counted by route template and status.
//! Shutdown is the server's: the same token stops the accept loop, and
//! connections finish their request in flight.
//!
//! Files: `config.rs` (settings), `error.rs` (JSON errors), `metrics.rs`
//! (the Prometheus recorder and the engine observer), `gateway.rs` (locks
//! held over HTTP), `rest.rs` (`/api/v1/locks/...`), `compat.rs` (the
//! original Clastor's two-segment paths), `ops.rs` (`/healthz`, `/readyz`,
//! `/metrics`, OpenAPI), `status.rs` (the page).

mod auth;
mod compat;
mod config;
mod error;
mod gateway;
mod metrics;
mod ops;
mod rest;
mod status;

pub use config::{HttpConfig, HttpConfigError};

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use clastor_protocol::Status;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use self::error::ApiError;
use self::gateway::Gateway;
use self::metrics::Metrics;
use super::accept::{Port, accept_loop};
use super::state::ServerState;
use crate::backend::Backend;

/// What every HTTP handler shares.
#[derive(Debug)]
pub(super) struct HttpState<B: Backend> {
    shared: Arc<ServerState<B>>,
    config: HttpConfig,
    metrics: Arc<Metrics>,
    gateway: Gateway<B>,
    shutdown: CancellationToken,
    /// Permits for lock requests in progress (`max_lock_requests`).
    lock_requests: Arc<Semaphore>,
    connections_open: AtomicU64,
    connections_refused: AtomicU64,
}

/// Refused connections being answered (503) at once; past it a refused
/// connection is closed without an answer, so a flood costs nothing more.
const MAX_REFUSALS_ANSWERING: usize = 32;

/// How long a refused connection gets to send its request and read the 503.
const REFUSAL_TIME: Duration = Duration::from_secs(2);

/// The route label of requests that matched no route (bounded, unlike paths).
const UNMATCHED_ROUTE: &str = "unmatched";

/// The peer of the HTTP connection a request came on.
#[derive(Debug, Clone, Copy)]
pub(super) struct Peer(SocketAddr);

/// The name the connection's verified client certificate gives (mTLS).
#[derive(Debug, Clone)]
pub(super) struct ClientCert(Option<Arc<str>>);

/// Binds the HTTP port: done before the server reports itself started, so
/// a port in use fails `spawn`.
pub(super) async fn bind(config: &HttpConfig) -> std::io::Result<TcpListener> {
    TcpListener::bind(config.listen).await
}

/// Serves HTTP on `listener` until `shutdown`.
pub(super) async fn serve<B: Backend>(
    listener: TcpListener,
    shared: Arc<ServerState<B>>,
    config: HttpConfig,
    shutdown: CancellationToken,
) {
    if config.compat_tokenless_release {
        warn!(
            "HTTP releases without a token are honoured (compatibility switch on): anyone who can reach the HTTP port can release anyone's HTTP lock"
        );
    }
    let metrics = Arc::new(Metrics::new(config.max_metric_kinds, shared.engine.backend().name()));
    if !shared.engine.set_observer(metrics.clone()) {
        warn!("the engine already reports to another observer; grant and hold metrics stay empty");
    }
    let state = Arc::new(HttpState {
        gateway: Gateway::new(shared.engine.clone(), config.max_locks),
        shared,
        metrics,
        shutdown: shutdown.clone(),
        lock_requests: Arc::new(Semaphore::new(config.max_lock_requests)),
        connections_open: AtomicU64::new(0),
        connections_refused: AtomicU64::new(0),
        config,
    });
    let router = router(state.clone());
    let tracker = TaskTracker::new();
    let port = Port {
        name: "http",
        max_connections: state.config.max_connections,
        max_refusals: MAX_REFUSALS_ANSWERING,
        tls: state.shared.tls_on(),
        // As the binary port's: no Nagle delay on answers (a long-poll's
        // grant goes out at once), keepalive so a vanished client's
        // connection (and its waits) go away.
        keepalive: state.shared.config.tcp_keepalive,
        refused: &state.connections_refused,
    };
    let serve = |stream, peer| {
        let (router, state, shutdown) = (router.clone(), state.clone(), shutdown.clone());
        async move {
            state.connections_open.fetch_add(1, Ordering::Relaxed);
            serve_connection(stream, peer, router, &state, &shutdown).await;
            state.connections_open.fetch_sub(1, Ordering::Relaxed);
        }
    };
    let max = state.config.max_connections;
    let answer_503 = move |stream, peer| {
        debug!(%peer, "HTTP connection refused: over the limit; answering 503");
        refuse(stream, max)
    };
    accept_loop(listener, port, &shutdown, &tracker, serve, answer_503).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), tracker.wait()).await;
    info!("HTTP port stopped");
}

/// Serves one accepted connection: TLS first when it is on (within the
/// header timeout), then HTTP/1 until it closes or the server shuts down.
async fn serve_connection<B: Backend>(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    router: Router,
    state: &HttpState<B>,
    shutdown: &CancellationToken,
) {
    #[cfg(feature = "tls")]
    if let Some(acceptor) = &state.shared.tls {
        let tls = match tokio::time::timeout(state.config.header_timeout, acceptor.0.accept(stream)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                state.shared.stats.tls_failures.fetch_add(1, Ordering::Relaxed);
                info!(%peer, error = %e, "HTTP TLS handshake failed");
                return;
            }
            Err(_) => {
                state.shared.stats.tls_failures.fetch_add(1, Ordering::Relaxed);
                debug!(%peer, "HTTP TLS handshake timed out");
                return;
            }
        };
        let cert = crate::server::tls::peer_name(tls.get_ref().1).map(Arc::from);
        let router = router.layer(axum::Extension(ClientCert(cert)));
        return serve_http(tls, peer, router, state, shutdown).await;
    }
    serve_http(
        stream,
        peer,
        router.layer(axum::Extension(ClientCert(None))),
        state,
        shutdown,
    )
    .await;
}

async fn serve_http<B: Backend, S>(
    io: S,
    peer: SocketAddr,
    router: Router,
    state: &HttpState<B>,
    shutdown: &CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(router.layer(axum::Extension(Peer(peer))));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(state.config.header_timeout);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            tokio::time::timeout(Duration::from_secs(1), conn.as_mut()).await.unwrap_or(Ok(()))
        }
    };
    if let Err(e) = result {
        debug!(%peer, error = %e, "HTTP connection ended with an error");
    }
}

/// Answers a connection over the limit with a JSON 503 (so a probe or a
/// client sees why, not a reset socket), then closes it.
async fn refuse(stream: tokio::net::TcpStream, max: usize) {
    let service = hyper::service::service_fn(move |_req| async move {
        let mut response = ApiError::with_http(
            StatusCode::SERVICE_UNAVAILABLE,
            Status::LimitExceeded,
            format!("too many HTTP connections (limit {max}); try again later"),
        )
        .into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        Ok::<_, std::convert::Infallible>(response)
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(REFUSAL_TIME)
        .keep_alive(false);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    if let Ok(Err(e)) = tokio::time::timeout(REFUSAL_TIME, conn).await {
        debug!(error = %e, "refused HTTP connection ended with an error");
    }
}

fn router<B: Backend>(state: Arc<HttpState<B>>) -> Router {
    let timeout = state.config.request_timeout;
    // The requests that may wait, under their own limit.
    let lock_requests = Router::new()
        .route("/api/v1/locks/{kind}/rotate", post(rest::rotate::<B>))
        .route("/api/v1/locks/{kind}/{id}/acquire", post(rest::acquire::<B>))
        .route("/api/v1/locks/{resource}/acquire", post(compat::acquire::<B>))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            limit_lock_requests::<B>,
        ));
    Router::new()
        .route("/", get(status::page))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz::<B>))
        .route("/metrics", get(ops::metrics::<B>))
        .route("/api/v1/openapi.json", get(ops::openapi))
        .route("/api/v1/status", get(status::status::<B>))
        .route("/api/v1/locks/held", get(rest::held::<B>))
        .route("/api/v1/locks/{kind}/version", get(rest::version::<B>))
        .route("/api/v1/locks/{kind}/rotate/abort", post(rest::rotate_abort::<B>))
        .route("/api/v1/locks/{kind}/{id}/renew", post(rest::renew::<B>))
        .route("/api/v1/locks/{kind}/{id}/release", post(rest::release::<B>))
        .route("/api/v1/locks/{resource}/release", post(compat::release::<B>))
        .merge(lock_requests)
        // Inside the counting and the timeout, outside the lock-request
        // limit: a refused request takes no lock-request permit.
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::authorize::<B>,
        ))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.config.max_body))
        .layer(axum::middleware::from_fn(move |req: Request, next: Next| async move {
            match tokio::time::timeout(timeout, next.run(req)).await {
                Ok(response) => response,
                Err(_) => ApiError::with_http(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Status::Timeout,
                    format!("no answer within {} ms", timeout.as_millis()),
                )
                .into_response(),
            }
        }))
        // Outermost, so it counts every answer, timeouts and refusals included.
        .layer(axum::middleware::from_fn_with_state(state.clone(), count_requests::<B>))
        .with_state(state)
}

/// Past `max_lock_requests` acquires and rotations in progress, an
/// immediate 429: a lock request never takes the connections the rest need.
async fn limit_lock_requests<B: Backend>(State(st): State<Arc<HttpState<B>>>, req: Request, next: Next) -> Response {
    let Ok(_permit) = st.lock_requests.clone().try_acquire_owned() else {
        return ApiError::status(
            Status::LimitExceeded,
            format!(
                "{} lock requests (acquires, rotations) are in progress over HTTP, the most allowed; try again later",
                st.config.max_lock_requests
            ),
        )
        .into_response();
    };
    next.run(req).await
}

/// Counts each answer by route template (never the raw path: bounded
/// label values) and status.
async fn count_requests<B: Backend>(State(st): State<Arc<HttpState<B>>>, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().cloned();
    let response = next.run(req).await;
    let route = route.as_ref().map_or(UNMATCHED_ROUTE, MatchedPath::as_str);
    st.metrics.http_request(route, response.status());
    response
}

async fn not_found() -> Response {
    ApiError::status(Status::UnknownOpcode, "no such path; see /api/v1/openapi.json").into_response()
}

async fn method_not_allowed() -> Response {
    ApiError::with_http(
        StatusCode::METHOD_NOT_ALLOWED,
        Status::BadRequest,
        "method not allowed on this path; see /api/v1/openapi.json",
    )
    .into_response()
}
