//! Recording a grant: what the session does with the backend's answer to
//! an admitted acquire (`admission.rs`). A grant joins the held table, with
//! its lease and trace id, unless the session closed or the grant was lost
//! while the answer was on its way (it is let go at once); no grant is
//! counted, or refused past the wait limit.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;
use tracing::debug;

use super::admission::{AcquireOptions, PendingGuard};
use super::{Held, Session};
use crate::backend::{Backend, BackendError, Grant};
use crate::error::LockError;

/// A successful acquire or renew.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Granted {
    /// Fencing token.
    pub token: u64,
    /// Version of the kind the lock was taken under.
    pub version: Arc<str>,
    /// The lease in force, if any.
    pub lease: Option<Duration>,
}

impl<B: Backend> Session<B> {
    /// Records the backend's answer `grant` to the acquire `pending` marks
    /// (admitted with `opts` and `trace_id`, past the wait limit if
    /// `over_wait_limit`, begun at `started`).
    ///
    /// # Errors
    /// [`LockError::LimitExceeded`] when an acquire past the wait limit
    /// found the lock taken; [`LockError::SessionClosed`] or
    /// [`LockError::LostDuringAcquire`] (the grant is let go); the
    /// backend's error.
    pub(super) fn record(
        &self,
        mut pending: PendingGuard<'_, B>,
        opts: &AcquireOptions,
        trace_id: Option<Arc<str>>,
        over_wait_limit: Option<usize>,
        started: Instant,
        grant: Result<Option<Grant<B::Guard>>, BackendError>,
    ) -> Result<Option<Granted>, LockError> {
        let s = &*self.state;
        let (key, grant_id) = (pending.key, pending.grant_id);
        pending.armed = false;
        let mut st = s.lock();
        let lost = st.take_pending(key).and_then(|p| p.lost);
        let grant = match grant {
            Ok(Some(grant)) => grant,
            Ok(None) => {
                if let Some(waiting) = over_wait_limit {
                    return Err(LockError::LimitExceeded(format!(
                        "this session has {waiting} acquires waiting, the most allowed"
                    )));
                }
                s.engine.stats.not_granted.fetch_add(1, Ordering::Relaxed);
                drop(st);
                if let Some(o) = s.engine.observer.get() {
                    o.not_granted(key, started.elapsed());
                }
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        if st.closed || lost.is_some() {
            drop(st);
            // Dropping the guard releases in the background.
            drop(grant.guard);
            return Err(lost.map_or(LockError::SessionClosed, LockError::LostDuringAcquire));
        }
        let lease = opts.lease.map(|duration| self.start_lease(key, grant_id, duration));
        st.held.insert(
            key.clone(),
            Held {
                grant_id,
                granted_at: Instant::now(),
                mode: opts.mode,
                trace_id,
                token: grant.token,
                version: grant.version.clone(),
                lease,
                guard: grant.guard,
            },
        );
        drop(st);
        s.engine.stats.granted.fetch_add(1, Ordering::Relaxed);
        if let Some(o) = s.engine.observer.get() {
            o.granted(key, started.elapsed());
        }
        debug!(session = s.id, %key, token = grant.token, "granted");
        Ok(Some(Granted {
            token: grant.token,
            version: grant.version,
            lease: opts.lease,
        }))
    }
}
