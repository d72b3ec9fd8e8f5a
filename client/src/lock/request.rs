//! Asking for a lock: [`Client::lock`], the [`LockRequest`] builder and its
//! [`RetryPolicy`], and the acquire — the turn among this connection's
//! tasks, the `ACQUIRE` call, and the guard (with its renewal task) it
//! returns.

use std::sync::atomic::Ordering;
use std::time::Duration;

use clastor_protocol::{Acquire, LockMode, Request, ResponseBody, name};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::guard::LockGuard;
use super::millis::{lease_millis, millis};
use super::renew::renew_loop;
use crate::backoff::Backoff;
use crate::client::Client;
use crate::conn::{self, HeldUpdate, Reply};
use crate::error::Error;
use crate::reply::unexpected;

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
    /// [`LostReason::RenewFailed`](crate::LostReason::RenewFailed) and the lock is released. Needs a lease.
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
