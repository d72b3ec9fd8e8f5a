//! The connection's table of held locks: the grants it holds, one per key,
//! and the keys whose release is in flight. The reader registers a grant here
//! *before* handing it to the caller, so a `LOCK_LOST` that follows the grant
//! on the wire always finds its guard.
//!
//! One grant per key and connection: the table refuses a second acquire of a
//! key the connection holds, and orders an acquire after a release of the
//! same key that is still in flight; RELEASE and RENEW name the grant's
//! token, so a late one from a lost grant never touches a newer grant of the
//! same key. The table lives in the connection's state, under the same mutex
//! as the requests in flight, so a release leaves the table and goes on the
//! wire in one step.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::Notify;

use super::grant::HeldGrant;
use super::key::Key;
use crate::error::{Error, LostReason};

#[derive(Debug, Default)]
pub(super) struct HeldLocks {
    held: HashMap<Key, Arc<HeldGrant>>,
    /// Keys whose background release is in flight: an acquire of the same key
    /// on this connection waits for it, or the server would say ALREADY_HELD.
    releasing: HashMap<Key, Arc<Notify>>,
}

impl HeldLocks {
    /// Registers a grant; returns the one it replaces, if any.
    pub(super) fn insert(&mut self, grant: Arc<HeldGrant>) -> Option<Arc<HeldGrant>> {
        self.held.insert(grant.key.clone(), grant)
    }

    /// Removes `lock` from the table if it is still the grant there.
    pub(super) fn forget(&mut self, lock: &HeldGrant) {
        if self.held.get(&lock.key).is_some_and(|l| l.token == lock.token) {
            self.held.remove(&lock.key);
        }
    }

    /// Removes and returns the grant of `key` if it has `token` (a
    /// `LOCK_LOST` names the grant it is about).
    pub(super) fn remove_lost(&mut self, key: &str, token: u64) -> Option<Arc<HeldGrant>> {
        match self.held.get(key) {
            Some(l) if l.token == token => self.held.remove(key),
            _ => None,
        }
    }

    /// Refuses an acquire of a key this connection holds: the server would
    /// refuse it too, unless the held grant was lost a moment ago and its
    /// `LOCK_LOST` is still on the way, in which case two grants of one key
    /// would be alive on the client at once.
    pub(super) fn check_not_held(&mut self, key: &str) -> Result<(), Error> {
        match self.held.get(key) {
            Some(l) if l.lost_reason().is_some() => {
                self.held.remove(key);
                Ok(())
            }
            Some(l) => Err(Error::AlreadyHeld(format!(
                "{key} is already held by this connection (token {})",
                l.token
            ))),
            None => Ok(()),
        }
    }

    /// Every grant in the table.
    pub(super) fn grants(&self) -> Vec<Arc<HeldGrant>> {
        self.held.values().cloned().collect()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Counts `key` as releasing until [`HeldLocks::finish_release`].
    pub(super) fn start_release(&mut self, key: &str) {
        self.releasing
            .entry(key.to_owned())
            .or_insert_with(|| Arc::new(Notify::new()));
    }

    /// A release of `key` (grant `token`, 0 for any) got its reply.
    pub(super) fn finish_release(&mut self, key: &str, token: u64) {
        if self.held.get(key).is_some_and(|l| token == 0 || l.token == token) {
            self.held.remove(key);
        }
        if let Some(n) = self.releasing.remove(key) {
            n.notify_waiters();
        }
    }

    /// What wakes the acquires waiting for `key`'s release in flight, if one is.
    pub(super) fn releasing(&self, key: &str) -> Option<&Arc<Notify>> {
        self.releasing.get(key)
    }

    /// Empties the table (the connection ended), to be lost with
    /// [`HeldLocks::lose_all`] outside the connection's lock.
    pub(super) fn take(&mut self) -> HeldLocks {
        std::mem::take(self)
    }

    /// Marks every lock lost with the connection and wakes every acquire
    /// waiting for a release. Returns how many locks were lost.
    pub(super) fn lose_all(&self) -> usize {
        for lock in self.held.values() {
            lock.mark_lost(LostReason::ConnectionLost);
        }
        for n in self.releasing.values() {
            n.notify_waiters();
        }
        self.held.len()
    }
}
