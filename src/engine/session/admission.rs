//! Admission: may this session ask for the lock? The checks an acquire
//! passes before the backend sees it — wait and lease within the configured
//! maxima, the session open, the key neither held nor awaited by it, under
//! the held limit — the wait limit (past it an acquire is tried once), and
//! the pending marker that holds the acquire's place in the table until the
//! backend answers (`grant.rs` records the answer).

use std::sync::Arc;
use std::time::Duration;

use clastor_protocol::LockMode;
use tokio::time::Instant;

use super::{LockTable, Pending, Session, SessionState};
use crate::backend::Backend;
use crate::engine::EngineConfig;
use crate::error::LockError;
use crate::key::LockKey;

/// Options of one acquire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AcquireOptions {
    /// How long to wait for the lock; zero tries once.
    pub wait: Duration,
    /// Lease: the lock is released (and reported lost) when it runs out
    /// unless renewed. `None` holds it until released or the session closes.
    pub lease: Option<Duration>,
    /// Requested mode: exclusive (a writer) or shared (a reader).
    pub mode: LockMode,
}

impl AcquireOptions {
    /// Try once, no lease.
    pub fn try_once() -> AcquireOptions {
        AcquireOptions::default()
    }

    /// Wait up to `wait`, no lease.
    pub fn wait(wait: Duration) -> AcquireOptions {
        AcquireOptions {
            wait,
            ..AcquireOptions::default()
        }
    }

    /// Adds a lease.
    pub fn with_lease(mut self, lease: Duration) -> AcquireOptions {
        self.lease = Some(lease);
        self
    }
}

impl<G> LockTable<G> {
    /// Whether an acquire of `key` may join the table: the session is open,
    /// holds and awaits no `key`, and is under its limit on locks held.
    fn admit(&self, key: &LockKey, cfg: &EngineConfig) -> Result<(), LockError> {
        if self.closed {
            return Err(LockError::SessionClosed);
        }
        if self.held.contains_key(key) || self.pending.contains_key(key) {
            return Err(LockError::AlreadyHeld(key.clone()));
        }
        // Waits count too: each may turn into a held lock.
        if self.held.len() + self.pending.len() >= cfg.max_held_per_session {
            return Err(LockError::LimitExceeded(format!(
                "this session holds {} locks and waits for {}; at most {} are allowed",
                self.held.len(),
                self.pending.len(),
                cfg.max_held_per_session
            )));
        }
        Ok(())
    }
}

impl<B: Backend> Session<B> {
    /// The checks [`Session::acquire`] makes before it tries the lock, and
    /// nothing else: for a caller that refuses the request after them
    /// (a shared lock asked for on a connection of protocol version 1 to 3,
    /// PROTOCOL.md, ACQUIRE, step 6).
    ///
    /// # Errors
    /// As [`Session::acquire`], but never from the backend.
    pub fn check_acquire(&self, key: &LockKey, opts: &AcquireOptions) -> Result<(), LockError> {
        let cfg = &self.state.engine.config;
        check_options(opts, cfg)?;
        self.state.lock().admit(key, cfg)
    }
}

impl<B: Backend> SessionState<B> {
    /// Admits an acquire of `key` (the checks of [`Session::check_acquire`])
    /// and marks it pending in the table, counted against the wait limit if
    /// it may wait. Returns the marker's guard, and `Some(waiting)` if the
    /// wait limit was reached, so this acquire only tries once.
    ///
    /// # Errors
    /// As [`Session::check_acquire`].
    pub(super) fn admit<'a>(
        &'a self,
        key: &'a LockKey,
        opts: &AcquireOptions,
        trace_id: Option<&Arc<str>>,
    ) -> Result<(PendingGuard<'a, B>, Option<usize>), LockError> {
        let cfg = &self.engine.config;
        check_options(opts, cfg)?;
        let grant_id = self.engine.next_grant_id();
        // `Some(waiting)`: the wait limit was reached, so this acquire only tries once.
        let over_wait_limit = {
            let mut st = self.lock();
            st.admit(key, cfg)?;
            // A try-once never waits, so it never counts against the wait
            // limit; a wait past the limit is tried once, and refused only
            // if it would have had to wait.
            let over = (!opts.wait.is_zero() && st.waiting >= cfg.max_waits_per_session).then_some(st.waiting);
            let waits = !opts.wait.is_zero() && over.is_none();
            st.waiting += usize::from(waits);
            st.pending.insert(
                key.clone(),
                Pending {
                    grant_id,
                    since: Instant::now(),
                    trace_id: trace_id.cloned(),
                    waits,
                    lost: None,
                },
            );
            over
        };
        let pending = PendingGuard {
            session: self,
            key,
            grant_id,
            armed: true,
        };
        Ok((pending, over_wait_limit))
    }
}

/// An acquire's wait and lease against the configured maxima.
fn check_options(opts: &AcquireOptions, cfg: &EngineConfig) -> Result<(), LockError> {
    if opts.wait > cfg.max_wait {
        return Err(LockError::InvalidArgument(format!(
            "wait is over the maximum of {:?}",
            cfg.max_wait
        )));
    }
    if let Some(lease) = opts.lease {
        check_lease(lease, cfg.max_lease)?;
    }
    Ok(())
}

/// A lease against the configured maximum (and not zero).
pub(super) fn check_lease(lease: Duration, max: Duration) -> Result<(), LockError> {
    if lease.is_zero() {
        return Err(LockError::InvalidArgument("a lease must be longer than zero".into()));
    }
    if lease > max {
        return Err(LockError::InvalidArgument(format!(
            "lease is over the maximum of {max:?}"
        )));
    }
    Ok(())
}

/// Removes a pending-acquire marker if the acquire future is dropped.
pub(super) struct PendingGuard<'a, B: Backend> {
    session: &'a SessionState<B>,
    pub(super) key: &'a LockKey,
    pub(super) grant_id: u64,
    /// Cleared once the backend answered: the answer's recording takes the
    /// marker out itself.
    pub(super) armed: bool,
}

impl<B: Backend> Drop for PendingGuard<'_, B> {
    fn drop(&mut self) {
        if self.armed {
            let mut st = self.session.lock();
            if st.pending.get(self.key).is_some_and(|p| p.grant_id == self.grant_id) {
                st.take_pending(self.key);
            }
        }
    }
}
