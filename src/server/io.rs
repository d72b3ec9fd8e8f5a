//! Pieces both connection actors (binary and text) use: the wire form of
//! lost-lock events, the goodbye on shutdown, bounded writes and timers. A
//! leaf, so the actors never import from the module that spawns them.

use clastor_protocol::{Event, LostReason, Status};
use tracing::debug;

use super::state::ServerState;
use crate::backend::Backend;
use crate::engine::{LostEvent, LostEvents, Session};

/// The wire event reporting a lost lock.
pub(super) fn lost_event(ev: &LostEvent) -> Event {
    Event::LockLost {
        kind: ev.key.kind().to_owned(),
        id: ev.key.id().to_owned(),
        token: ev.token,
        reason: ev.reason,
    }
}

/// What a connection is told when the server shuts down: losses already
/// queued, then `LOCK_LOST reason=shutdown` for every lock it still holds,
/// then `CLOSING`.
pub(super) fn goodbye<B: Backend>(session: &Session<B>, lost: &mut LostEvents) -> Vec<Event> {
    let mut out = Vec::new();
    while let Some(ev) = lost.try_recv() {
        out.push(lost_event(&ev));
    }
    for h in session.held() {
        out.push(lost_event(&LostEvent {
            key: h.key,
            token: h.token,
            reason: LostReason::ServerShutdown,
        }));
    }
    out.push(Event::Closing {
        status: Status::ShuttingDown,
        message: "server shutting down".into(),
    });
    out
}

/// Sleeps until `at`; forever if `None` (a deadline too far to represent).
pub(super) async fn sleep_until_or_never(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Runs a write (a flush or a send) within the write timeout, giving up when
/// the server's hard stop comes. `Err` means the connection is done for.
pub(super) async fn write_within<B: Backend, E: std::fmt::Display>(
    shared: &ServerState<B>,
    write: impl std::future::Future<Output = Result<(), E>>,
) -> Result<(), ()> {
    tokio::select! {
        r = tokio::time::timeout(shared.config.write_timeout, write) => match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                debug!(error = %e, "write failed");
                Err(())
            }
            Err(_) => {
                tracing::info!("client stopped reading; dropping connection");
                Err(())
            }
        },
        () = shared.hard_stop.cancelled() => Err(()),
    }
}
