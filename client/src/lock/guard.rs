//! [`LockGuard`]: the proof of holding a lock — its grant, the connection it
//! is tied to, its renewal task — with what it reports (token, loss,
//! safe-until, jeopardy) and how it ends (renew, release, drop); and
//! [`Released`], [`LostWatch`].

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clastor_protocol::{Request, ResponseBody};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::DropGuard;

use super::millis::lease_millis;
use super::renew::{apply_renewal, renew_call};
use crate::conn::{Conn, HeldGrant};
use crate::error::{Error, LostReason};
use crate::reply::{body, unexpected};

/// Proof of holding a lock, with its fencing token.
///
/// Pass [`token`](LockGuard::token) to every store the critical section
/// writes to, and have the store reject tokens lower than the highest it has
/// seen: that, not timing, is what keeps a stale holder out.
///
/// The lock is tied to the connection that acquired it. Dropping the guard
/// releases the lock in the background; [`release`](LockGuard::release) does
/// it explicitly and reports the outcome. [`lost`](LockGuard::lost) resolves
/// when the lock is lost (lease expired, backend session expired, connection
/// lost, renewal failed).
#[derive(Debug)]
#[must_use = "dropping the guard releases the lock"]
pub struct LockGuard {
    pub(super) conn: Conn,
    pub(super) lock: Arc<HeldGrant>,
    /// Released (or handed to an explicit release): `Drop` has nothing to do.
    pub(super) done: bool,
    /// The client's request timeout, for explicit renewals.
    pub(super) request_timeout: Option<Duration>,
    /// Stops the renewal task when the guard goes.
    pub(super) _renewer: Option<DropGuard>,
}

impl LockGuard {
    /// The resource kind.
    pub fn kind(&self) -> &str {
        self.lock.kind()
    }

    /// The resource id.
    pub fn id(&self) -> &str {
        self.lock.id()
    }

    /// The fencing token: strictly greater than every token granted before
    /// for this key.
    pub fn token(&self) -> u64 {
        self.lock.token
    }

    /// The kind's version the lock was taken under.
    pub fn version(&self) -> &str {
        &self.lock.version
    }

    /// The lease last granted (by the acquire or the latest renewal), if any.
    pub fn lease(&self) -> Option<Duration> {
        match self.lock.lease_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms.into())),
        }
    }

    /// The server's id for the connection that holds the lock.
    pub fn connection_id(&self) -> u64 {
        self.conn.connection_id()
    }

    /// Whether the lock is known to be lost.
    pub fn is_lost(&self) -> bool {
        self.lock.lost.borrow().is_some()
    }

    /// Why the lock was lost, if it was.
    pub fn lost_reason(&self) -> Option<LostReason> {
        self.lock.lost_reason()
    }

    /// Resolves when the lock is lost, with the reason; never resolves while
    /// the lock is held, nor after it was released without loss. Made for
    /// `select!` around a critical section:
    ///
    /// ```no_run
    /// # async fn work(_: u64) {}
    /// # async fn f(guard: clastor_client::LockGuard) -> Result<(), clastor_client::Error> {
    /// tokio::select! {
    ///     reason = guard.lost() => eprintln!("lock lost ({reason}); abandoning the work"),
    ///     () = work(guard.token()) => drop(guard.release().await),
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Cancellation safety
    /// Safe; call it as often as needed.
    pub fn lost(&self) -> impl Future<Output = LostReason> + Send + 'static {
        let mut rx = self.lock.lost.subscribe();
        async move {
            let reason = rx.wait_for(Option::is_some).await.ok().and_then(|r| r.clone());
            match reason {
                Some(reason) => reason,
                // The sender lives as long as the lock's state; once that is
                // gone (guard released and dropped) the lock was not lost.
                None => std::future::pending().await,
            }
        }
    }

    /// Until when the server guarantees that nobody else can be granted this
    /// lock, on this process's clock (safe-until, PROTOCOL.md "Safe-until"):
    /// counted from when the request the server answered was *sent*, and kept
    /// fresh by the client's `CONFIRM`s. `None` if the server speaks protocol
    /// version 1 and promises nothing.
    ///
    /// Past this instant, unconfirmed, the lock is in **jeopardy**: it may
    /// still be held, but another holder may be granted it at any moment.
    /// Stop acting on it ([`LockGuard::jeopardy`]); a later confirmation may
    /// make it safe again, and a loss is reported as usual. Pauses inside this
    /// process (a GC, a swapped-out page) can outlast any safe-until: give the
    /// fencing token to the store as the last line of defence.
    pub fn safe_until(&self) -> Option<Instant> {
        self.lock.safe_until()
    }

    /// Waits until the safe-until changes (a `CONFIRM` or renewal reply that
    /// moved it) and returns the new instant; `None` if the lock's state is
    /// gone (released).
    ///
    /// # Cancellation safety
    /// Safe.
    pub async fn confirmation(&self) -> Option<Instant> {
        let mut rx = self.lock.safe.subscribe();
        rx.changed().await.ok()?;
        rx.borrow().effective()
    }

    /// Whether the lock is held and inside its safe-until (true with a server
    /// that promises nothing, as long as no loss is known).
    pub fn is_safe(&self) -> bool {
        !self.is_lost() && self.safe_until().is_none_or(|t| Instant::now() < t)
    }

    /// Resolves when the lock is lost or falls into jeopardy: its safe-until
    /// passed without a newer confirmation. Never resolves with a server that
    /// promises nothing, while the lock is held.
    ///
    /// # Cancellation safety
    /// Safe; call it as often as needed.
    pub fn jeopardy(&self) -> impl Future<Output = ()> + Send + 'static {
        self.jeopardy_within(Duration::ZERO)
    }

    /// As [`LockGuard::jeopardy`], but `margin` before the safe-until: time
    /// for the holder to stop its work (a child process's grace period)
    /// before anyone else can be granted the lock.
    ///
    /// # Cancellation safety
    /// Safe; call it as often as needed.
    pub fn jeopardy_within(&self, margin: Duration) -> impl Future<Output = ()> + Send + 'static {
        let mut safe = self.lock.safe.subscribe();
        let mut lost = self.lock.lost.subscribe();
        let early = move |t: Instant| t.checked_sub(margin).unwrap_or(t);
        async move {
            loop {
                if lost.borrow().is_some() {
                    return;
                }
                let at = safe.borrow_and_update().effective().map(early);
                tokio::select! {
                    () = sleep_until_or_never(at) => {
                        if safe.borrow().effective().is_some_and(|t| early(t) <= Instant::now()) {
                            return;
                        }
                    }
                    changed = safe.changed() => if changed.is_err() { return },
                    // The state is gone with the guard: released, not lost.
                    changed = lost.changed() => if changed.is_err() { return },
                }
            }
        }
    }

    /// A watch on the loss that outlives the guard: resolves with the reason
    /// if the lock is lost, or with `None` once it is released without loss.
    pub fn lost_watch(&self) -> LostWatch {
        LostWatch {
            rx: self.lock.lost.subscribe(),
        }
    }

    /// Sets the lease to `lease` from now.
    ///
    /// # Errors
    /// - [`Error::LockLost`] if the lock is already known lost, or the server
    ///   says it no longer holds this grant (the guard is then marked lost; a
    ///   newer grant of the same key on this connection is not affected: the
    ///   renewal names this grant's token);
    /// - [`Error::RequestTimeout`] if no reply came within the client's
    ///   request timeout;
    /// - [`Error::InvalidArgument`] for a zero or too long lease;
    /// - connection errors and server statuses ([`Error::Unsupported`] on a
    ///   backend without leases).
    ///
    /// # Cancellation safety
    /// Safe: a renewal already sent still takes effect.
    pub async fn renew(&self, lease: Duration) -> Result<(), Error> {
        if let Some(reason) = self.lost_reason() {
            return Err(Error::LockLost(reason));
        }
        let lease_ms = lease_millis(lease)?;
        let req = Request::Renew {
            kind: self.lock.kind().to_owned(),
            id: self.lock.id().to_owned(),
            lease_ms,
            token: self.lock.token,
        };
        let sent = Instant::now();
        let deadline = self.request_timeout.and_then(|t| sent.checked_add(t));
        let reply = renew_call(&self.conn, &req, deadline).await?;
        apply_renewal(&self.conn, &self.lock, sent, body(reply))
    }

    /// Releases the lock and waits for the server to confirm.
    ///
    /// Returns [`Released::Released`] when the lock was held to the end and
    /// is now released, and [`Released::AlreadyGone`] with the reason when
    /// it was not: lost before the release (reported by `LOCK_LOST`, or the
    /// server answering that this grant was no longer held, read as
    /// [`LostReason::Unknown`] until the loss event says more), or its
    /// connection ended ([`LostReason::ConnectionLost`]: the server releases
    /// a connection's locks when it ends). Then the critical section may not
    /// have been exclusive to the end: only the fencing token protected it.
    /// Either way, nothing is left to release.
    ///
    /// # Errors
    /// - [`Error::RequestTimeout`] if no reply came within the client's
    ///   request timeout (the release was sent and still takes effect);
    /// - another error the server answered with (a server in trouble:
    ///   [`Error::Unavailable`], say); the lock is not this guard's any more
    ///   either way.
    ///
    /// # Cancellation safety
    /// Safe: the release is sent before the first await; dropping the future
    /// only stops waiting for the confirmation.
    pub async fn release(mut self) -> Result<Released, Error> {
        drop(self._renewer.take());
        if let Some(reason) = self.lost_reason() {
            self.done = true;
            return Ok(Released::AlreadyGone(reason));
        }
        let deadline = self.request_timeout.and_then(|t| Instant::now().checked_add(t));
        let limit = self.request_timeout.unwrap_or_default();
        // Sent without waiting for an in-flight slot: with every slot taken
        // by acquires waiting for this very lock, waiting would deadlock. A
        // release is answered at once, so it holds the server's slot briefly.
        let (tx, rx) = tokio::sync::oneshot::channel();
        // A connection that is gone took the lock with it: the server
        // releases a connection's locks when it ends.
        self.done = true;
        let lock = Arc::clone(&self.lock);
        let gone = move |e: Error| match e {
            Error::ConnectionLost(_) => {
                lock.mark_lost(LostReason::ConnectionLost);
                Ok(Released::AlreadyGone(
                    lock.lost_reason().unwrap_or(LostReason::ConnectionLost),
                ))
            }
            e => Err(e),
        };
        if let Err(e) = self.conn.send_release(&self.lock, Some(tx)) {
            return gone(e);
        }
        let exchange = async { rx.await.unwrap_or_else(|_| Err(self.conn.dead_error())) };
        let reply = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, exchange)
                .await
                .unwrap_or(Err(Error::RequestTimeout(limit))),
            None => exchange.await,
        };
        let reply = match reply {
            Ok(reply) => reply,
            Err(e) => return gone(e),
        };
        match body(reply) {
            Ok(ResponseBody::Released { released: true }) => {
                tracing::debug!(key = %self.lock.key, token = self.lock.token, "released");
                Ok(Released::Released)
            }
            // `false`: this connection did not hold this grant any more (its
            // lease ran out, say, and the loss is still on the way).
            Ok(ResponseBody::Released { released: false }) | Err(Error::NotOwner(_)) => {
                self.lock.mark_lost(LostReason::Unknown);
                Ok(Released::AlreadyGone(self.lost_reason().unwrap_or(LostReason::Unknown)))
            }
            Ok(other) => Err(unexpected(&other)),
            Err(e) => Err(e),
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        drop(self._renewer.take());
        // A lost lock is already gone on the server.
        if !self.done && !self.is_lost() {
            self.conn.release_in_background(&self.lock);
        }
        // After the release is on its way (the next task waits for it).
        drop(self.lock.take_turn());
    }
}

/// What [`LockGuard::release`] found. Both are outcomes, not errors: the
/// work done under the lock is done either way; what differs is whether the
/// lock was still held to the end.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Released {
    /// The lock was held, and is now released.
    Released,
    /// The lock was already gone (lost, or its connection ended, which the
    /// server treats as a release); nothing was left to release. Whatever the
    /// holder wrote after the loss was fenced by its token.
    AlreadyGone(LostReason),
}

/// Watches a lock's loss beyond the guard's lifetime: from
/// [`LockGuard::lost_watch`].
#[derive(Debug, Clone)]
pub struct LostWatch {
    rx: watch::Receiver<Option<LostReason>>,
}

impl LostWatch {
    /// Why the lock was lost, if it was (so far).
    pub fn get(&self) -> Option<LostReason> {
        self.rx.borrow().clone()
    }

    /// Waits until the lock is lost (`Some(reason)`) or released without loss
    /// (`None`).
    ///
    /// # Cancellation safety
    /// Safe.
    pub async fn wait(&mut self) -> Option<LostReason> {
        let reason = self.rx.wait_for(Option::is_some).await.ok().and_then(|r| r.clone());
        reason.or_else(|| self.rx.borrow().clone())
    }
}

/// Sleeps until `at`; forever if `None`.
async fn sleep_until_or_never(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
