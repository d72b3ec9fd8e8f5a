//! Leases: one timer task per leased lock, renewal, and expiry. A renew to a
//! later deadline leaves the timer running (it sees the new deadline when it
//! wakes and sleeps on); a sooner one replaces it. A timer is aborted when
//! its lock goes away first; a lease that runs out takes the lock out of the
//! table, reports it lost (`lost.rs`) and releases it.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use clastor_protocol::LostReason;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::{info, warn};

use super::admission::check_lease;
use super::{Granted, Held, Releasing, Session, SessionState};
use crate::backend::Backend;
use crate::engine::HoldEnd;
use crate::error::LockError;
use crate::key::LockKey;

/// A held lock's lease: its length, its deadline (moved by a renew) and
/// the timer that expires it.
pub(super) struct Lease {
    duration: Duration,
    pub(super) deadline: Instant,
    timer: AbortHandle,
}

impl<G> Held<G> {
    /// Stops the lease timer (the caller removed the lock from the table).
    pub(super) fn disarm(self) -> G {
        if let Some(lease) = &self.lease {
            lease.timer.abort();
        }
        self.guard
    }
}

impl<B: Backend> Session<B> {
    /// Gives the held lock on `key` a lease of `lease` from now (replacing any
    /// lease it had, or adding one).
    ///
    /// # Errors
    /// [`LockError::NotHeld`] if this session does not hold `key`;
    /// [`LockError::InvalidArgument`] for a zero lease or one over the maximum.
    pub fn renew(&self, key: &LockKey, lease: Duration) -> Result<Granted, LockError> {
        self.renew_grant(key, lease, None)
    }

    /// [`Session::renew`], only if the held grant has fencing token `token`
    /// (any grant if `None`).
    ///
    /// # Errors
    /// As [`Session::renew`]; a grant with another token is [`LockError::NotHeld`].
    pub fn renew_grant(&self, key: &LockKey, lease: Duration, token: Option<u64>) -> Result<Granted, LockError> {
        let s = &*self.state;
        check_lease(lease, s.engine.config.max_lease)?;
        let mut st = s.lock();
        let Some(held) = st.held.get_mut(key).filter(|h| token.is_none_or(|t| t == h.token)) else {
            return Err(LockError::NotHeld(key.clone()));
        };
        let deadline = Instant::now() + lease;
        match &mut held.lease {
            // Later than the timer's wake-up: it sees the new deadline and sleeps on.
            Some(l) if deadline >= l.deadline => {
                l.duration = lease;
                l.deadline = deadline;
            }
            // Sooner (or no lease yet): a timer for the new deadline.
            current => {
                if let Some(old) = current.take() {
                    old.timer.abort();
                }
                held.lease = Some(self.start_lease(key, held.grant_id, lease));
            }
        }
        Ok(Granted {
            token: held.token,
            version: held.version.clone(),
            lease: Some(lease),
        })
    }

    /// Starts the timer of a lease of `duration` from now on the grant
    /// `grant_id` of `key`.
    pub(super) fn start_lease(&self, key: &LockKey, grant_id: u64, duration: Duration) -> Lease {
        let deadline = Instant::now() + duration;
        let timer = tokio::spawn(lease_timer(
            Arc::downgrade(&self.state),
            key.clone(),
            grant_id,
            deadline,
        ));
        Lease {
            duration,
            deadline,
            timer: timer.abort_handle(),
        }
    }
}

/// Sleeps until the lease deadline; if the lock was renewed meanwhile, sleeps
/// on; if not, removes it, reports it lost, and releases it.
async fn lease_timer<B: Backend>(session: Weak<SessionState<B>>, key: LockKey, grant_id: u64, mut deadline: Instant) {
    loop {
        tokio::time::sleep_until(deadline).await;
        let Some(s) = session.upgrade() else { return };
        let expired = {
            let mut st = s.lock();
            let Some(held) = st.held.get(&key).filter(|h| h.grant_id == grant_id) else {
                return;
            };
            match held.lease.as_ref().map(|l| l.deadline) {
                Some(d) if d > Instant::now() => {
                    deadline = d;
                    None
                }
                _ => st.held.remove(&key).map(|h| {
                    // Queued under the table lock: once the lock is out of
                    // the table its loss is in the channel (see `on_lost`).
                    s.report_lost(&key, h.token, LostReason::LeaseExpired);
                    (h, Releasing::start(&s, &mut st, &key))
                }),
            }
        };
        if let Some((held, _releasing)) = expired {
            s.engine.stats.lease_expired.fetch_add(1, Ordering::Relaxed);
            s.observe_end(&key, &held, HoldEnd::Lost(LostReason::LeaseExpired));
            info!(session = s.id, %key, token = held.token, trace_id = held.trace_id.as_deref(), "lease expired");
            // Not `disarm`: this task is the timer, and it is finishing anyway.
            if let Err(e) = s.engine.backend.release(held.guard).await {
                warn!(session = s.id, %key, error = %e, "release after lease expiry not confirmed");
            }
            return;
        }
    }
}
