//! Several locks taken as one ([`Client::lock_many`]): a transfer between two
//! accounts, a job touching a few resources. Like Curator's
//! `InterProcessMultiLock`, and deadlock-free the classic way: every request
//! takes its keys in one global order (sorted by kind, then id), so two
//! requests with overlapping keys can never each hold what the other waits
//! for. All or nothing: a request that cannot have every key gives back the
//! ones it got.

use std::future::Future;
use std::time::Duration;

use futures_util::future::{join_all, select_all};
use tokio::time::Instant;

use crate::client::Client;
use crate::error::{Error, LostReason};
use crate::lock::{LockGuard, LockRequest, Released, RetryPolicy};

impl Client {
    /// Starts building a request for several locks at once, each named by
    /// `(kind, id)`; duplicates count once.
    ///
    /// ```no_run
    /// # async fn f(client: clastor_client::Client) -> Result<(), clastor_client::Error> {
    /// use std::time::Duration;
    /// let accounts = [("account", "alice"), ("account", "bob")];
    /// if let Some(both) = client.lock_many(accounts).wait(Duration::from_secs(5)).acquire().await? {
    ///     let (alice, bob) = (both.token("account", "alice"), both.token("account", "bob"));
    ///     // ... fence each account's write with its own token ...
    ///     # let _ = (alice, bob);
    ///     let _released_or_already_gone = both.release().await;
    /// }
    /// # Ok(()) }
    /// ```
    pub fn lock_many<K: Into<String>, I: Into<String>>(
        &self,
        keys: impl IntoIterator<Item = (K, I)>,
    ) -> MultiLockRequest {
        let mut keys: Vec<(String, String)> = keys.into_iter().map(|(k, i)| (k.into(), i.into())).collect();
        keys.sort();
        keys.dedup();
        MultiLockRequest {
            keys,
            // Every key's request is this one with its key.
            request: self.lock(String::new(), String::new()),
        }
    }
}

/// A request for several locks, being built: from [`Client::lock_many`].
///
/// Defaults: try once (no wait), no lease, no automatic renewal, no retry.
#[derive(Debug, Clone)]
#[must_use = "a lock request does nothing until `.acquire()` or `.try_acquire()` is awaited"]
pub struct MultiLockRequest {
    /// Sorted and without duplicates: the global order.
    keys: Vec<(String, String)>,
    /// The options every key's request shares.
    request: LockRequest,
}

impl MultiLockRequest {
    /// How long the whole request may wait for all its locks (each waits in
    /// its key's FIFO queue within what is left). Zero tries once, with every
    /// request sent at once.
    pub fn wait(mut self, wait: Duration) -> MultiLockRequest {
        self.request = self.request.wait(wait);
        self
    }

    /// Exclusive (the default) or shared, for every lock (see
    /// [`Client::lock_shared`](crate::Client::lock_shared)).
    pub fn mode(mut self, mode: clastor_protocol::LockMode) -> MultiLockRequest {
        self.request = self.request.mode(mode);
        self
    }

    /// A lease on every lock (see [`LockRequest::lease`]).
    pub fn lease(mut self, lease: Duration) -> MultiLockRequest {
        self.request = self.request.lease(lease);
        self
    }

    /// Renew every lease in the background (see [`LockRequest::auto_renew`]).
    pub fn auto_renew(mut self, on: bool) -> MultiLockRequest {
        self.request = self.request.auto_renew(on);
        self
    }

    /// Retry failures that may pass, per `policy`, for each lock.
    pub fn retry(mut self, policy: RetryPolicy) -> MultiLockRequest {
        self.request = self.request.retry(policy);
        self
    }

    fn one(&self, (kind, id): &(String, String), wait: Duration) -> LockRequest {
        self.request.for_key(kind, id).wait(wait)
    }

    /// Takes every lock, or none: `Ok(None)` if they were not all granted
    /// within the wait (the ones that were are given back).
    ///
    /// # Errors
    /// As [`LockRequest::acquire`], for the first lock that failed (the ones
    /// already granted are given back); [`Error::InvalidArgument`] for an
    /// empty request.
    ///
    /// # Cancellation safety
    /// Safe: guards already granted are dropped, which releases them.
    pub async fn acquire(self) -> Result<Option<MultiLockGuard>, Error> {
        if self.keys.is_empty() {
            return Err(Error::InvalidArgument("lock_many needs at least one key".into()));
        }
        let wait = self.request.wait_time();
        if wait.is_zero() {
            // Nobody waits, so nobody can deadlock: send every request at once.
            let outcomes = join_all(self.keys.iter().map(|k| self.one(k, Duration::ZERO).acquire())).await;
            let mut guards = Vec::with_capacity(outcomes.len());
            let mut missing = false;
            let mut first_error = None;
            for outcome in outcomes {
                match outcome {
                    Ok(Some(guard)) => guards.push(guard),
                    Ok(None) => missing = true,
                    Err(e) => first_error = first_error.or(Some(e)),
                }
            }
            return finish(guards, missing, first_error).await;
        }
        let deadline = Instant::now().checked_add(wait);
        let mut guards = Vec::with_capacity(self.keys.len());
        for key in &self.keys {
            let left = deadline.map_or(wait, |d| d.saturating_duration_since(Instant::now()));
            match self.one(key, left).acquire().await {
                Ok(Some(guard)) => guards.push(guard),
                Ok(None) => return finish(guards, true, None).await,
                Err(e) => return finish(guards, false, Some(e)).await,
            }
        }
        Ok(Some(MultiLockGuard { guards }))
    }

    /// [`MultiLockRequest::acquire`] with a wait of zero.
    ///
    /// # Errors
    /// As [`MultiLockRequest::acquire`].
    pub async fn try_acquire(self) -> Result<Option<MultiLockGuard>, Error> {
        self.wait(Duration::ZERO).acquire().await
    }
}

/// All or nothing: the guards as one if nothing is missing and nothing
/// failed; otherwise they are given back first.
async fn finish(guards: Vec<LockGuard>, missing: bool, error: Option<Error>) -> Result<Option<MultiLockGuard>, Error> {
    if !missing && error.is_none() {
        return Ok(Some(MultiLockGuard { guards }));
    }
    join_all(guards.into_iter().map(LockGuard::release)).await;
    match error {
        Some(e) => Err(e),
        None => Ok(None),
    }
}

/// Several locks held as one: from [`MultiLockRequest::acquire`]. Each keeps
/// its own fencing token (tokens are per key). Dropping it releases them all.
#[derive(Debug)]
pub struct MultiLockGuard {
    /// In the global key order.
    guards: Vec<LockGuard>,
}

impl MultiLockGuard {
    /// The fencing token of `kind`/`id`, if it is one of these locks.
    pub fn token(&self, kind: &str, id: &str) -> Option<u64> {
        self.guards
            .iter()
            .find(|g| g.kind() == kind && g.id() == id)
            .map(LockGuard::token)
    }

    /// The locks, in the global key order (kind, then id).
    pub fn guards(&self) -> &[LockGuard] {
        &self.guards
    }

    /// Whether any of the locks is known to be lost.
    pub fn is_lost(&self) -> bool {
        self.guards.iter().any(LockGuard::is_lost)
    }

    /// Whether every lock is held and inside its safe-until.
    pub fn is_safe(&self) -> bool {
        self.guards.iter().all(LockGuard::is_safe)
    }

    /// Resolves when any of the locks is lost, with its reason.
    ///
    /// # Cancellation safety
    /// Safe; call it as often as needed.
    pub fn lost(&self) -> impl Future<Output = LostReason> + Send + 'static {
        let each: Vec<_> = self.guards.iter().map(|g| Box::pin(g.lost())).collect();
        async move { select_all(each).await.0 }
    }

    /// Resolves when any of the locks is lost or falls into jeopardy (see
    /// [`LockGuard::jeopardy`]).
    ///
    /// # Cancellation safety
    /// Safe; call it as often as needed.
    pub fn jeopardy(&self) -> impl Future<Output = ()> + Send + 'static {
        self.jeopardy_within(Duration::ZERO)
    }

    /// As [`MultiLockGuard::jeopardy`], `margin` before the earliest
    /// safe-until (see [`LockGuard::jeopardy_within`]).
    ///
    /// # Cancellation safety
    /// Safe; call it as often as needed.
    pub fn jeopardy_within(&self, margin: Duration) -> impl Future<Output = ()> + Send + 'static {
        let each: Vec<_> = self
            .guards
            .iter()
            .map(|g| Box::pin(g.jeopardy_within(margin)))
            .collect();
        async move {
            select_all(each).await;
        }
    }

    /// The earliest safe-until of the locks (see [`LockGuard::safe_until`]);
    /// `None` if the server promises nothing.
    pub fn safe_until(&self) -> Option<Instant> {
        self.guards.iter().filter_map(LockGuard::safe_until).min()
    }

    /// Waits until any lock's safe-until moves, and returns the earliest one
    /// then (see [`LockGuard::confirmation`]).
    ///
    /// # Cancellation safety
    /// Safe.
    pub async fn confirmation(&self) -> Option<Instant> {
        select_all(self.guards.iter().map(|g| Box::pin(g.confirmation()))).await;
        self.safe_until()
    }

    /// The locks, to hold or release one by one.
    pub fn into_guards(self) -> Vec<LockGuard> {
        self.guards
    }

    /// Releases every lock (all requests at once). `Released` if all were
    /// held to the end; `AlreadyGone` with the reason of one that was not.
    ///
    /// # Errors
    /// The first error of a release whose outcome is unknown (the others
    /// are released all the same).
    pub async fn release(self) -> Result<Released, Error> {
        let outcomes = join_all(self.guards.into_iter().map(LockGuard::release)).await;
        let mut released = Released::Released;
        for outcome in outcomes {
            if let Released::AlreadyGone(reason) = outcome? {
                released = Released::AlreadyGone(reason);
            }
        }
        Ok(released)
    }
}
