//! The lock API: a request builder, and the guard that owns a grant, knows
//! its fencing token, learns of its loss, renews its lease and releases it.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clastor_protocol::{Acquire, LockMode, Request, ResponseBody, Status, name};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::backoff::Backoff;
use crate::client::Client;
use crate::conn::{self, Conn, HeldGrant, HeldUpdate, Reply};
use crate::error::{Error, LostReason};
use crate::reply::{body, unexpected};

impl Client {
    /// Starts building a lock request on `(kind, id)`.
    ///
    /// ```no_run
    /// # async fn f(client: clastor_client::Client) -> Result<(), clastor_client::Error> {
    /// use std::time::Duration;
    /// if let Some(guard) = client.lock("transaction", "tx-1").wait(Duration::from_secs(5)).acquire().await? {
    ///     println!("fencing token {}", guard.token());
    ///     let _released_or_already_gone = guard.release().await;
    /// }
    /// # Ok(()) }
    /// ```
    pub fn lock(&self, kind: impl Into<String>, id: impl Into<String>) -> LockRequest {
        LockRequest::new(self.clone(), kind.into(), id.into())
    }

    /// Starts building a shared (read) lock request on `(kind, id)`: many
    /// owners may hold it at once, never with an exclusive holder; FIFO
    /// with the exclusive requests. Needs a server speaking protocol
    /// version 4 and a kind in the read-write layout (PROTOCOL.md,
    /// "Layouts"). One connection holds one grant per key, so two shared
    /// requests of one key on one [`Client`] take turns: give independent
    /// readers their own owner ([`Client::new_owner`]).
    pub fn lock_shared(&self, kind: impl Into<String>, id: impl Into<String>) -> LockRequest {
        self.lock(kind, id).mode(LockMode::Shared)
    }
}

/// How a lock request retries failures that may pass — a server restarting,
/// a connection being re-established, a backend briefly unavailable: the
/// errors [`Error::is_retryable`] accepts. Contention is never retried: "not
/// acquired within the wait" is an outcome. While the server is down, each
/// attempt itself blocks for up to the client's connect timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (0 counts as 1).
    pub attempts: u32,
    /// Pause before the second attempt; it doubles each time, up to
    /// `max_backoff`.
    pub backoff: Duration,
    /// Longest pause between attempts.
    pub max_backoff: Duration,
    /// No attempt starts later than this after the first (`None`: only
    /// `attempts` bounds the retries).
    pub deadline: Option<Duration>,
}

impl RetryPolicy {
    /// One attempt, no retry (the default).
    pub const fn none() -> RetryPolicy {
        RetryPolicy {
            attempts: 1,
            backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(1),
            deadline: None,
        }
    }

    /// Retry for up to `deadline`, as often as it takes (backoff from 50 ms
    /// to 1 s).
    pub const fn until(deadline: Duration) -> RetryPolicy {
        RetryPolicy {
            attempts: u32::MAX,
            deadline: Some(deadline),
            ..RetryPolicy::none()
        }
    }
}

impl Default for RetryPolicy {
    fn default() -> RetryPolicy {
        RetryPolicy::none()
    }
}

/// A lock request being built: from [`Client::lock`].
///
/// Defaults: try once (no wait), no lease, no automatic renewal, no retry.
#[derive(Debug, Clone)]
#[must_use = "a lock request does nothing until `.acquire()` or `.try_acquire()` is awaited"]
pub struct LockRequest {
    client: Client,
    kind: String,
    id: String,
    wait: Duration,
    lease: Option<Duration>,
    auto_renew: bool,
    retry: RetryPolicy,
    trace_id: Option<String>,
    mode: LockMode,
}

impl LockRequest {
    fn new(client: Client, kind: String, id: String) -> LockRequest {
        LockRequest {
            client,
            kind,
            id,
            wait: Duration::ZERO,
            lease: None,
            auto_renew: false,
            retry: RetryPolicy::none(),
            trace_id: None,
            mode: LockMode::Exclusive,
        }
    }

    /// Exclusive (the default) or shared; see [`Client::lock_shared`].
    pub fn mode(mut self, mode: LockMode) -> LockRequest {
        self.mode = mode;
        self
    }

    /// The same request for another key (for [`Client::lock_many`]).
    pub(crate) fn for_key(&self, kind: &str, id: &str) -> LockRequest {
        LockRequest {
            kind: kind.to_owned(),
            id: id.to_owned(),
            ..self.clone()
        }
    }

    /// The configured wait.
    pub(crate) fn wait_time(&self) -> Duration {
        self.wait
    }

    /// Retry failures that may pass, per `policy` ([`RetryPolicy`]).
    pub fn retry(mut self, policy: RetryPolicy) -> LockRequest {
        self.retry = policy;
        self
    }

    /// How long the server may queue the request (FIFO per key) before
    /// answering "not acquired". Zero tries once. Millisecond precision.
    pub fn wait(mut self, wait: Duration) -> LockRequest {
        self.wait = wait;
        self
    }

    /// Ask for a lease: the server releases the lock (and reports it lost) if
    /// it is not renewed within `lease`. Without a lease the lock is held until
    /// released or until the connection closes.
    pub fn lease(mut self, lease: Duration) -> LockRequest {
        self.lease = Some(lease);
        self
    }

    /// Attach a trace id (protocol version 3): the server logs it with
    /// everything it does for this request and lists it with the grant
    /// (`HELD ALL`, the status page). 1 to 32 ASCII letters, digits, `-`,
    /// `_`, `.` or `:` — a W3C trace-id fits. Servers that speak only
    /// version 1 or 2 are sent the request without it.
    pub fn trace_id(mut self, trace_id: impl Into<String>) -> LockRequest {
        self.trace_id = Some(trace_id.into());
        self
    }

    /// Renew the lease in the background every third of it while the guard
    /// lives. If a renewal fails for good, the guard reports
    /// [`LostReason::RenewFailed`] and the lock is released. Needs a lease.
    pub fn auto_renew(mut self, on: bool) -> LockRequest {
        self.auto_renew = on;
        self
    }

    /// Acquires the lock, waiting up to the configured wait.
    ///
    /// Returns `Ok(None)` if the lock was not granted in time: contention is
    /// an outcome, not an error.
    ///
    /// # Errors
    /// - [`Error::InvalidName`] (checked before sending) or
    ///   [`Error::InvalidArgument`] (a wait or lease over `u32::MAX` ms, or
    ///   `auto_renew` without a lease);
    /// - [`Error::AlreadyHeld`] if this connection holds or waits for the lock
    ///   outside the lock API (a raw request, or an earlier acquire that was
    ///   cancelled but is still queued on the server). A key another task holds
    ///   or is acquiring through this connection is not an error: this acquire
    ///   waits its turn, in arrival order, within the same wait;
    /// - [`Error::RequestTimeout`] if a request timeout is configured and no
    ///   answer came within the wait plus that timeout (waiting for a release
    ///   of the same key in flight on the connection included);
    /// - connection errors ([`Error::ConnectionLost`], [`Error::Connect`]) and
    ///   other server statuses ([`Error::Unavailable`], [`Error::LimitExceeded`], …).
    ///
    /// With a [`RetryPolicy`] ([`LockRequest::retry`]), the retryable ones are
    /// tried again first, and the last one is returned once the policy is
    /// spent. Each attempt may block up to the client's connect timeout while
    /// the server is unreachable.
    ///
    /// # Cancellation safety
    /// Safe: if the future is dropped after the request was sent, the server
    /// keeps the wait queued until it is granted or times out, and a grant that
    /// arrives with nobody waiting is released at once. Until then, another
    /// acquire of the same key on the same connection gets
    /// [`Error::AlreadyHeld`].
    pub async fn acquire(self) -> Result<Option<LockGuard>, Error> {
        let policy = self.retry;
        let started = Instant::now();
        let mut backoff = Backoff::new(policy.backoff, policy.max_backoff);
        let mut attempt = 1;
        loop {
            match self.clone().acquire_once().await {
                Err(e) if e.is_retryable() && attempt < policy.attempts.max(1) => {
                    let delay = backoff.next_delay();
                    let next = Instant::now() + delay;
                    if policy.deadline.is_some_and(|d| next > started + d) {
                        return Err(e);
                    }
                    tracing::debug!(kind = %self.kind, id = %self.id, attempt, error = %e, retry_in = ?delay, "acquire failed; retrying");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                outcome => return outcome,
            }
        }
    }

    /// One attempt of [`LockRequest::acquire`].
    async fn acquire_once(self) -> Result<Option<LockGuard>, Error> {
        let LockRequest {
            client,
            kind,
            id,
            wait,
            lease,
            auto_renew,
            retry: _,
            trace_id,
            mode,
        } = self;
        name::validate("kind", &kind).map_err(|e| Error::InvalidName(e.to_string()))?;
        name::validate("id", &id).map_err(|e| Error::InvalidName(e.to_string()))?;
        if let Some(t) = &trace_id {
            name::validate_trace_id(t).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        }
        millis("wait", wait)?;
        let lease_ms = lease.map(lease_millis).transpose()?.unwrap_or(0);
        if auto_renew && lease_ms == 0 {
            return Err(Error::InvalidArgument("auto_renew needs a lease".into()));
        }
        let request_timeout = client.config().request_timeout;
        // The whole acquire (waiting for a connection aside, which the connect
        // timeout bounds) fits in the server's wait plus the request timeout.
        let budget = request_timeout.map(|t| t.saturating_add(wait));
        let deadline = budget.and_then(|b| Instant::now().checked_add(b));
        let conn = client.pick().await?;
        let key = conn::key(&kind, &id);
        let kind_len = kind.len();
        // Another task of this connection holding or acquiring the key is
        // waited for like any other holder, within the same wait (a free key
        // costs no round trip here).
        let queued = Instant::now();
        let turn = match tokio::time::timeout(wait, conn.local_turn(&key)).await {
            Ok(turn) => turn?,
            Err(_) => return Ok(None),
        };
        let wait_ms = millis("wait", wait.saturating_sub(queued.elapsed()))?;
        if mode == LockMode::Shared && conn.version() < 4 {
            return Err(Error::Unsupported(format!(
                "shared locks need protocol version 4; the server speaks {}",
                conn.version()
            )));
        }
        let req = Request::Acquire(Acquire {
            kind,
            id,
            wait_ms,
            lease_ms,
            mode,
            trace_id: trace_id.filter(|_| conn.version() >= 3),
        });
        let mut started = Instant::now();
        let exchange = async {
            // A guard of this key dropped a moment ago may still be releasing
            // on this connection; the server would refuse the acquire until
            // it is done.
            conn.wait_released(&key).await;
            conn.check_not_held(&key)?;
            started = Instant::now();
            conn.call(&req, HeldUpdate::Acquire { key, kind_len }).await
        };
        let reply = match (deadline, budget) {
            (Some(deadline), Some(budget)) => tokio::time::timeout_at(deadline, exchange)
                .await
                .unwrap_or(Err(Error::RequestTimeout(budget)))?,
            _ => exchange.await?,
        };
        let Reply { response, grant } = reply;
        let safe_ms = match response.result.map_err(Error::from) {
            Ok(ResponseBody::Acquired(a)) => a.safe_ms.map(|ms| (ms, a.lease_ms)),
            Err(Error::Timeout(_)) => return Ok(None),
            Err(e) => return Err(e),
            Ok(other) => return Err(unexpected(&other)),
        };
        let Some(lock) = grant.and_then(conn::PendingGrant::accept) else {
            return Err(Error::Malformed("grant without a registered lock".into()));
        };
        if let Some((safe_ms, lease_ms)) = safe_ms {
            lock.granted(started, safe_ms, lease_ms);
            // After a queue wait, counting from the send may leave little or
            // nothing: confirm again now rather than at the next tick.
            let confirm_every = Duration::from_millis(conn.hello.confirm_ms.unwrap_or(0).into());
            if lock
                .safe_until()
                .is_none_or(|t| t.saturating_duration_since(Instant::now()) < confirm_every * 2)
            {
                conn.confirm_soon();
            }
        }
        tracing::debug!(key = %lock.key, token = lock.token, "acquired");
        // The turn at the key goes with the grant: given back on release,
        // drop or loss.
        lock.keep_turn(turn);
        let mut guard = LockGuard {
            conn,
            lock,
            done: false,
            request_timeout,
            _renewer: None,
        };
        if auto_renew {
            let stop = CancellationToken::new();
            let lease = Duration::from_millis(guard.lock.lease_ms.load(Ordering::Relaxed).into());
            tokio::spawn(renew_loop(
                request_timeout,
                guard.conn.clone(),
                guard.lock.clone(),
                lease,
                started,
                stop.clone(),
            ));
            guard._renewer = Some(stop.drop_guard());
        }
        Ok(Some(guard))
    }

    /// Acquires the lock if it is free right now (a wait of zero).
    ///
    /// # Errors
    /// As [`LockRequest::acquire`].
    ///
    /// # Cancellation safety
    /// As [`LockRequest::acquire`].
    pub async fn try_acquire(self) -> Result<Option<LockGuard>, Error> {
        self.wait(Duration::ZERO).acquire().await
    }
}

fn millis(what: &str, d: Duration) -> Result<u32, Error> {
    u32::try_from(d.as_millis())
        .map_err(|_| Error::InvalidArgument(format!("{what} of {d:?} exceeds the protocol's {} ms", u32::MAX)))
}

/// A lease in whole milliseconds, rounded up so a short lease is not zero
/// (which would mean "no lease").
fn lease_millis(d: Duration) -> Result<u32, Error> {
    if d.is_zero() {
        return Err(Error::InvalidArgument("a lease must be longer than zero".into()));
    }
    let ms = millis("lease", d)?;
    Ok(if Duration::from_millis(ms.into()) < d {
        ms.saturating_add(1)
    } else {
        ms
    })
}

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
    conn: Conn,
    lock: Arc<HeldGrant>,
    /// Released (or handed to an explicit release): `Drop` has nothing to do.
    done: bool,
    /// The client's request timeout, for explicit renewals.
    request_timeout: Option<Duration>,
    /// Stops the renewal task when the guard goes.
    _renewer: Option<DropGuard>,
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

/// Sends a renewal and waits for its reply, bounded by `limit`.
async fn renew_call(conn: &Conn, req: &Request, deadline: Option<Instant>) -> Result<Reply, Error> {
    match deadline {
        None => conn.call(req, HeldUpdate::None).await,
        Some(deadline) => {
            let limit = deadline.saturating_duration_since(Instant::now());
            tokio::time::timeout_at(deadline, conn.call(req, HeldUpdate::None))
                .await
                .unwrap_or(Err(Error::RequestTimeout(limit)))
        }
    }
}

/// Records a renewal's outcome on the lock.
fn apply_renewal(
    conn: &Conn,
    lock: &HeldGrant,
    sent: Instant,
    result: Result<ResponseBody, Error>,
) -> Result<(), Error> {
    match result {
        Ok(ResponseBody::Renewed {
            token,
            lease_ms,
            safe_ms,
        }) if token == lock.token => {
            lock.lease_ms.store(lease_ms, Ordering::Relaxed);
            if let Some(safe_ms) = safe_ms {
                lock.renewed(sent, safe_ms, lease_ms);
            }
            Ok(())
        }
        // The renewal names its grant's token, so a server answering for
        // another grant is broken.
        Ok(ResponseBody::Renewed { token, .. }) => Err(Error::Malformed(format!(
            "renewal of {} answered with token {token}, the grant has {}",
            lock.key, lock.token
        ))),
        Ok(other) => Err(unexpected(&other)),
        // This grant is gone on the server (a newer grant of the key, if any,
        // is untouched: it has another token).
        Err(e) if e.status() == Some(Status::NotHeld) => {
            lock.mark_lost(LostReason::Unknown);
            conn.forget(lock);
            Err(Error::LockLost(lock.lost_reason().unwrap_or(LostReason::Unknown)))
        }
        Err(e) => Err(e),
    }
}

/// Renews `lock` every third of its lease until stopped or lost. A renewal
/// that fails for good, or cannot succeed before the lease runs out, marks the
/// lock lost and releases it, so the holder never believes in a lease the
/// server may already have ended.
async fn renew_loop(
    request_timeout: Option<Duration>,
    conn: Conn,
    lock: Arc<HeldGrant>,
    lease: Duration,
    sent_at: Instant,
    stop: CancellationToken,
) {
    let period = (lease / 3).max(Duration::from_millis(1));
    let received = lock.received.max(sent_at);
    // The server started the lease between sending the ACQUIRE and receiving
    // the grant. After a quick grant, count from the send (the safe end).
    // After a queue wait, the send says nothing (the lease may have started
    // long after it, a count from it could even be past), so count from the
    // receipt and renew at once, which re-anchors the lease on the renewal's
    // own send time.
    let (mut expires, mut next) = if received.saturating_duration_since(sent_at) < period {
        (later(sent_at, lease), later(sent_at, period))
    } else {
        (later(received, lease), received)
    };
    let mut lost = lock.lost.subscribe();
    let req = Request::Renew {
        kind: lock.kind().to_owned(),
        id: lock.id().to_owned(),
        lease_ms: lease_millis_or_max(lease),
        token: lock.token,
    };
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = lost.wait_for(Option::is_some) => return,
            () = tokio::time::sleep_until(next) => {}
        }
        let sent = Instant::now();
        let limit = request_timeout.map_or(expires, |t| expires.min(later(sent, t)));
        let result = renew_call(&conn, &req, Some(limit))
            .await
            .and_then(|reply| apply_renewal(&conn, &lock, sent, body(reply)));
        let error = match result {
            Ok(()) => {
                expires = later(sent, lease);
                next = later(sent, period);
                continue;
            }
            Err(e) => e,
        };
        if lock.lost_reason().is_some() {
            return;
        }
        let retry_at = later(Instant::now(), period / 4);
        if error.is_retryable() && !error.is_connection_error() && retry_at < expires {
            tracing::debug!(key = %lock.key, %error, "lease renewal failed; retrying");
            next = retry_at;
            continue;
        }
        tracing::warn!(key = %lock.key, token = lock.token, %error, "lease renewal failed; lock lost");
        if lock.mark_lost(LostReason::RenewFailed(error.to_string())) {
            conn.release_in_background(&lock);
        }
        return;
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

/// Sleeps until `at`; forever if `None`.
async fn sleep_until_or_never(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// `t + d`, saturating far in the future instead of panicking on a huge
/// (configured) duration.
fn later(t: Instant, d: Duration) -> Instant {
    t.checked_add(d)
        .or_else(|| t.checked_add(Duration::from_secs(100 * 365 * 86_400)))
        .unwrap_or(t)
}

fn lease_millis_or_max(d: Duration) -> u32 {
    lease_millis(d).unwrap_or(u32::MAX)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_rounds_up_and_refuses_zero() {
        assert_eq!(lease_millis(Duration::from_micros(1)), Ok(1));
        assert_eq!(lease_millis(Duration::from_micros(1500)), Ok(2));
        assert_eq!(lease_millis(Duration::from_millis(300)), Ok(300));
        assert!(matches!(lease_millis(Duration::ZERO), Err(Error::InvalidArgument(_))));
        assert!(matches!(
            millis("wait", Duration::from_secs(u64::MAX / 4)),
            Err(Error::InvalidArgument(_))
        ));
    }
}
