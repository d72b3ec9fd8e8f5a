//! A new connection: tell binary from text by the first byte, hand it to the
//! right actor, and keep the books. Also the refusal of connections over the
//! limit.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::BytesMut;
use clastor_protocol::{Event, Status};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, debug_span};

use super::dispatch::RequestContext;
use super::state::{ServerState, ServerStats};
#[cfg(feature = "tls")]
use super::stream::PutBack;
use super::stream::Stream;
use super::{binary, text};
use crate::backend::Backend;

/// Serves one accepted connection until it closes or the server shuts down;
/// everything its session held is released before this returns.
pub(super) async fn serve<B: Backend>(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<ServerState<B>>,
    shutdown: CancellationToken,
) {
    let deadline = tokio::time::Instant::now() + shared.config.handshake_timeout;
    let opened = tokio::select! {
        () = shutdown.cancelled() => return,
        r = tokio::time::timeout_at(deadline, open(stream, peer, &shared)) => r,
    };
    let (stream, first, cert_name) = match opened {
        Ok(Some(opened)) => opened,
        Ok(None) => return,
        Err(_) => {
            debug!(%peer, "no data within the handshake timeout; closing");
            return;
        }
    };
    let binary = first == 0;
    let (session, lost) = shared.engine.open_session(peer.to_string());
    // `client` is filled in by the binary actor once HELLO names it.
    let span = debug_span!(
        "conn",
        id = session.id(),
        %peer,
        mode = if binary { "binary" } else { "text" },
        client = tracing::field::Empty
    );
    let _open = OpenConnection::count(&shared.stats);
    let ctx = RequestContext {
        reports_safe: false,
        // Text has no versions: it always shows a draining kind's progress.
        reports_drain: !binary,
        // The text form shows trace ids; binary connections from version 3 on.
        reports_traces: !binary,
        // Text takes shared locks and shows modes; binary from version 4 on.
        speaks_modes: !binary,
        engine: shared.engine.clone(),
        session: session.clone(),
        access: shared.access(cert_name.as_deref()),
        peer,
    };
    async {
        debug!("connection opened");
        if binary {
            binary::run(stream, &shared, ctx, lost, &shutdown).await;
        } else {
            text::run(stream, &shared, ctx, lost, &shutdown).await;
        }
        // In-flight operations were dropped (cancelled) by the actor; now
        // release what the session still holds.
        session.close().await;
        debug!("connection closed");
    }
    .instrument(span)
    .await;
}

/// The connection's stream (after the TLS handshake, if TLS is on), its
/// first byte, and the name its verified client certificate gives; `None`
/// if it ended or failed first.
async fn open<B: Backend>(
    stream: TcpStream,
    peer: SocketAddr,
    shared: &ServerState<B>,
) -> Option<(Stream, u8, Option<String>)> {
    #[cfg(feature = "tls")]
    if let Some(acceptor) = &shared.tls {
        use tokio::io::AsyncReadExt;
        let mut tls = match acceptor.0.accept(stream).await {
            Ok(tls) => tls,
            Err(e) => {
                shared.stats.tls_failures.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%peer, error = %e, "TLS handshake failed");
                return None;
            }
        };
        let cert_name = super::tls::peer_name(tls.get_ref().1);
        let mut first = [0u8; 1];
        return match tls.read(&mut first).await {
            Ok(1..) => Some((
                Stream::Tls(Box::new(PutBack {
                    stream: tls,
                    first: Some(first[0]),
                })),
                first[0],
                cert_name,
            )),
            Ok(0) => None,
            Err(e) => {
                debug!(%peer, error = %e, "TLS connection failed before its first byte");
                None
            }
        };
    }
    let _ = shared;
    let mut first = [0u8; 1];
    match stream.peek(&mut first).await {
        Ok(1..) => Some((Stream::Tcp(stream), first[0], None)),
        Ok(_) => None,
        Err(e) => {
            debug!(%peer, error = %e, "connection failed before its first byte");
            None
        }
    }
}

/// Counts an open connection for as long as it lives, however its task ends.
struct OpenConnection<'a>(&'a ServerStats);

impl<'a> OpenConnection<'a> {
    fn count(stats: &'a ServerStats) -> OpenConnection<'a> {
        stats.connections_open.fetch_add(1, Ordering::Relaxed);
        OpenConnection(stats)
    }
}

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0.connections_open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How long a refused connection gets to show which form it speaks.
const REFUSAL_PEEK: Duration = Duration::from_secs(1);

/// Tells an over-limit connection why it is refused, in its own form, and
/// closes it.
pub(super) async fn refuse(mut stream: TcpStream, peer: SocketAddr, max: usize) {
    debug!(%peer, max, "refusing connection: limit reached");
    let message = format!("too many connections (limit {max}); try again later");
    let mut first = [0u8; 1];
    let binary =
        matches!(tokio::time::timeout(REFUSAL_PEEK, stream.peek(&mut first)).await, Ok(Ok(1..)) if first[0] == 0);
    let bytes = if binary {
        let mut buf = BytesMut::new();
        Event::Closing {
            status: Status::LimitExceeded,
            message,
        }
        .encode(&mut buf);
        buf.to_vec()
    } else {
        clastor_protocol::text::format_error(Status::LimitExceeded, &message).into_bytes()
    };
    let _ = tokio::time::timeout(REFUSAL_PEEK, async {
        let _ = stream.write_all(&bytes).await;
        let _ = stream.shutdown().await;
    })
    .await;
}
