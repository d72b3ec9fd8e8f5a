//! One connection's shared state — [`Connection`]: the socket's write half,
//! its tables under one mutex ([`State`]: requests in flight, queued frames,
//! locks held), and the signals its reader, writer and keepalive tasks share
//! — and [`Conn`], the handle callers and guards keep; with the calls that
//! read that state (liveness, the in-flight permits, the tasks' turns, the
//! held-locks table). Sending is `submit.rs`.

use std::net::SocketAddr;
use std::ops::Deref;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use clastor_protocol::HelloOk;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, TryAcquireError, broadcast};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::grant::HeldGrant;
use super::held::HeldLocks;
use super::outbound::Outbound;
use super::pending::PendingRequests;
use super::turn::{LocalTurn, LocalTurns};
use crate::error::Error;
use crate::event::ClientEvent;
use crate::transport::Writer;

/// What the connection's mutex guards: everything a submission, a reply or
/// the teardown must change in one step.
#[derive(Debug)]
pub(super) struct State {
    pub(super) requests: PendingRequests,
    pub(super) out: Outbound,
    pub(super) held: HeldLocks,
    /// Set once; every later submission fails with it.
    pub(super) dead: Option<Error>,
    /// The last `CLOSING` event, to explain the disconnect that follows.
    pub(super) closing: Option<String>,
}

/// One connection: its socket's write half, its tables (requests in flight,
/// locks held), and the signals its reader, writer and keepalive tasks share.
/// Handles reach it through [`Conn`].
#[derive(Debug)]
pub(crate) struct Connection {
    /// Itself, for grants that must find the connection again when dropped.
    pub(super) me: Weak<Connection>,
    pub(crate) hello: HelloOk,
    pub(crate) peer: SocketAddr,
    pub(super) write: Writer,
    pub(super) state: Mutex<State>,
    /// Per key, the turn its own tasks take, in arrival order (see
    /// [`Connection::local_turn`]).
    pub(super) turns: Arc<LocalTurns>,
    pub(super) writer_wake: Notify,
    pub(super) closed: CancellationToken,
    pub(super) permits: Arc<Semaphore>,
    pub(super) events: broadcast::Sender<ClientEvent>,
    pub(super) born: Instant,
    /// Milliseconds since `born` when the last frame arrived.
    pub(super) last_rx_ms: AtomicU64,
    /// Wakes the confirm loop early (a grant arrived already in jeopardy).
    pub(super) confirm_now: Notify,
    /// `CONFIRM`s sent and not answered yet.
    pub(super) confirms_out: AtomicUsize,
}

/// A handle on a live connection. The connection closes (and the server
/// releases its locks) when the last handle is dropped.
#[derive(Debug, Clone)]
pub(crate) struct Conn(Arc<CloseOnDrop>);

/// What every [`Conn`] clone shares: the connection, and the guard that
/// closes it when the last clone goes.
#[derive(Debug)]
struct CloseOnDrop {
    shared: Arc<Connection>,
    _close: DropGuard,
}

impl Conn {
    /// The first handle on `shared`: closing it when the last clone goes.
    pub(super) fn new(shared: Arc<Connection>) -> Conn {
        let close = shared.closed.clone().drop_guard();
        Conn(Arc::new(CloseOnDrop { shared, _close: close }))
    }
}

impl Deref for Conn {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        &self.0.shared
    }
}

impl Connection {
    /// This connection's turn at `key` among the tasks that share it, in
    /// arrival order: taken at once (no round trip) when no other task of the
    /// connection holds or is acquiring the key, else waited for. The server
    /// sees one owner per connection, so without it a second task asking for a
    /// key the first holds would be refused instead of waiting. The acquire
    /// holds the turn, then its guard, until the lock is given back.
    ///
    /// # Errors
    /// The connection's error once it is dead.
    ///
    /// # Cancellation safety
    /// Safe: a turn not yet taken is given up.
    pub(crate) async fn local_turn(&self, key: &str) -> Result<LocalTurn, Error> {
        self.turns.take(key).await.map_err(|_| self.dead_error())
    }

    pub(super) fn state(&self) -> MutexGuard<'_, State> {
        // The lock is never held across code that can panic on input; if it
        // was poisoned anyway, the state is still consistent enough to tear down.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The server's id for this connection.
    pub(crate) fn connection_id(&self) -> u64 {
        self.hello.connection_id
    }

    /// The protocol version negotiated with the server.
    pub(crate) fn version(&self) -> u8 {
        self.hello.version
    }

    /// Whether the connection can still carry requests.
    pub(crate) fn is_alive(&self) -> bool {
        !self.closed.is_cancelled()
    }

    /// Resolves once the connection is closed, for whatever reason.
    pub(crate) async fn closed(&self) {
        self.closed.cancelled().await;
    }

    /// Why the connection is gone (or a generic error if it is not).
    pub(crate) fn dead_error(&self) -> Error {
        self.state()
            .dead
            .clone()
            .unwrap_or_else(|| Error::ConnectionLost("connection closed".into()))
    }

    /// Marks the connection dead with `error` (the first error wins) and
    /// stops its tasks; the reader tears down.
    pub(crate) fn fail(&self, error: Error) {
        {
            let mut st = self.state();
            if st.dead.is_none() {
                st.dead = Some(error);
            }
        }
        self.closed.cancel();
    }

    /// An in-flight permit, waiting for one if all are taken.
    pub(crate) async fn permit(&self) -> Result<OwnedSemaphorePermit, Error> {
        match self.permits.clone().try_acquire_owned() {
            Ok(p) => Ok(p),
            Err(TryAcquireError::Closed) => Err(self.dead_error()),
            Err(TryAcquireError::NoPermits) => tokio::select! {
                p = self.permits.clone().acquire_owned() => p.map_err(|_| self.dead_error()),
                () = self.closed.cancelled() => Err(self.dead_error()),
            },
        }
    }

    /// Removes `lock` from the table of held locks (if it is still the grant
    /// there): the server said it no longer holds it.
    pub(crate) fn forget(&self, lock: &HeldGrant) {
        self.state().held.forget(lock);
    }

    /// Refuses an acquire of a key this connection holds (see
    /// [`HeldLocks::check_not_held`]).
    pub(crate) fn check_not_held(&self, key: &str) -> Result<(), Error> {
        self.state().held.check_not_held(key)
    }

    /// Waits until no background release of `key` is in flight on this
    /// connection.
    ///
    /// # Cancellation safety
    /// Safe: it only waits.
    pub(crate) async fn wait_released(&self, key: &str) {
        loop {
            let Some(notify) = self.state().held.releasing(key).cloned() else {
                return;
            };
            let mut notified = pin!(notify.notified());
            notified.as_mut().enable();
            // Re-check after enabling, so a release finishing in between is not missed.
            let still = self
                .state()
                .held
                .releasing(key)
                .is_some_and(|n| Arc::ptr_eq(n, &notify));
            if !still {
                continue;
            }
            notified.await;
        }
    }

    /// Notes that a frame arrived (for the keepalive).
    pub(super) fn touch(&self) {
        let ms = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_rx_ms.store(ms, Ordering::Relaxed);
    }

    /// How long since the last frame arrived.
    pub(super) fn since_last_rx(&self) -> Duration {
        let last = Duration::from_millis(self.last_rx_ms.load(Ordering::Relaxed));
        self.born.elapsed().saturating_sub(last)
    }

    /// Every lock this connection holds, for [`Client::release_all`](crate::Client::release_all).
    pub(crate) fn held_locks(&self) -> Vec<Arc<HeldGrant>> {
        self.state().held.grants()
    }

    /// Asks the confirm loop for a `CONFIRM` now rather than at its next tick.
    pub(crate) fn confirm_soon(&self) {
        self.confirm_now.notify_one();
    }
}
