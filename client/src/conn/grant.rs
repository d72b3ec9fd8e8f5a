//! One grant held through a connection: the record its guard and the
//! connection's table of held locks both point to — token, version, lease,
//! loss, safe-until, and the holding task's turn at the key.

use std::sync::atomic::AtomicU32;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use clastor_protocol::AcquireOk;
use tokio::sync::watch;

use super::key::Key;
use super::turn::LocalTurn;
use crate::error::LostReason;

/// A grant held through a connection: the one record that its guard and the
/// connection's table of held locks both point to.
#[derive(Debug)]
pub(crate) struct HeldGrant {
    /// `kind/id`; the kind is its first `kind_len` bytes.
    pub(crate) key: Key,
    kind_len: usize,
    pub(crate) token: u64,
    pub(crate) version: String,
    pub(crate) lease_ms: AtomicU32,
    /// When the reader received the grant. The server started the lease no
    /// later than this (and, after a queue wait, possibly long after the
    /// ACQUIRE was sent).
    pub(crate) received: tokio::time::Instant,
    pub(crate) lost: watch::Sender<Option<LostReason>>,
    /// Until when the server guarantees nobody else is granted this lock, on
    /// this client's clock (protocol version 2).
    pub(crate) safe: watch::Sender<Safe>,
    /// The holding task's turn at the key among its connection's tasks:
    /// given back when the lock is released, dropped or lost.
    turn: Mutex<Option<LocalTurn>>,
}

/// A grant's safe-until and what may still move it.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Safe {
    /// `None` with a version 1 server, which promises nothing.
    pub(crate) until: Option<tokio::time::Instant>,
    /// Send instant of the latest renewal: it set `until` outright (a renewal
    /// can shorten the lease), and confirmations sent before it are stale.
    renewed: Option<tokio::time::Instant>,
    /// The lease's end counted from the send of the acquire or renewal that
    /// set it: `CONFIRM` replies leave leases out, so this caps them.
    lease_until: Option<tokio::time::Instant>,
}

impl Safe {
    /// The safe-until in force: the confirmed one, capped by the lease.
    pub(crate) fn effective(&self) -> Option<tokio::time::Instant> {
        match (self.until, self.lease_until) {
            (Some(u), Some(l)) => Some(u.min(l)),
            (u, _) => u,
        }
    }
}

impl HeldGrant {
    /// Takes the key (and the grant's version) instead of copying them: this
    /// runs once per acquire.
    pub(super) fn new(key: Key, kind_len: usize, grant: &mut AcquireOk) -> HeldGrant {
        HeldGrant {
            key,
            kind_len,
            token: grant.token,
            version: std::mem::take(&mut grant.version),
            lease_ms: AtomicU32::new(grant.lease_ms),
            received: tokio::time::Instant::now(),
            lost: watch::channel(None).0,
            safe: watch::channel(Safe::default()).0,
            turn: Mutex::new(None),
        }
    }

    /// Applies a `safe_ms` the server gave in reply to a request this client
    /// sent at `sent`: counted from the send, never from the receipt, since
    /// the server may have handled the request at any time in between.
    /// A grant's `safe_ms` and lease, for an acquire sent at `sent`.
    pub(crate) fn granted(&self, sent: tokio::time::Instant, safe_ms: u32, lease_ms: u32) {
        self.safe.send_modify(|cur| {
            cur.until = Some(later_by(sent, safe_ms));
            cur.lease_until = (lease_ms > 0).then(|| later_by(sent, lease_ms));
        });
    }

    /// A confirmation (a `CONFIRM`'s) moves it forward only.
    pub(crate) fn confirm(&self, sent: tokio::time::Instant, safe_ms: u32) {
        let until = later_by(sent, safe_ms);
        self.safe.send_if_modified(|cur| {
            let stale = cur.renewed.is_some_and(|r| sent < r);
            if !stale && cur.until.is_none_or(|c| until > c) {
                cur.until = Some(until);
                true
            } else {
                false
            }
        });
    }

    /// Applies a renewal's `safe_ms` (sent at `sent`): outright, since a
    /// renewal may have shortened the lease, and confirmations sent before it
    /// no longer count.
    pub(crate) fn renewed(&self, sent: tokio::time::Instant, safe_ms: u32, lease_ms: u32) {
        let until = later_by(sent, safe_ms);
        self.safe.send_if_modified(|cur| {
            if cur.renewed.is_some_and(|r| sent < r) {
                return false;
            }
            *cur = Safe {
                until: Some(until),
                renewed: Some(sent),
                lease_until: (lease_ms > 0).then(|| later_by(sent, lease_ms)),
            };
            true
        });
    }

    pub(crate) fn kind(&self) -> &str {
        &self.key[..self.kind_len]
    }

    pub(crate) fn safe_until(&self) -> Option<tokio::time::Instant> {
        self.safe.borrow().effective()
    }

    pub(crate) fn id(&self) -> &str {
        &self.key[self.kind_len + 1..]
    }

    /// Records the loss; the first reason wins. Returns whether this call
    /// recorded it.
    pub(crate) fn mark_lost(&self, reason: LostReason) -> bool {
        let recorded = self.lost.send_if_modified(|slot| {
            if slot.is_none() {
                *slot = Some(reason);
                true
            } else {
                false
            }
        });
        if recorded {
            // A lost lock holds nobody back: the next task of the
            // connection may go ahead even while this guard lives on.
            drop(self.take_turn());
        }
        recorded
    }

    /// Hands the grant the task's turn at its key (see
    /// `Connection::local_turn`), to give back when the grant ends.
    pub(crate) fn keep_turn(&self, turn: LocalTurn) {
        let mut slot = self.turn.lock().unwrap_or_else(PoisonError::into_inner);
        *slot = Some(turn);
        drop(slot);
        // Lost before it was handed over: give it back at once.
        if self.lost_reason().is_some() {
            drop(self.take_turn());
        }
    }

    /// Takes the turn back (to drop it).
    pub(crate) fn take_turn(&self) -> Option<LocalTurn> {
        self.turn.lock().unwrap_or_else(PoisonError::into_inner).take()
    }

    pub(crate) fn lost_reason(&self) -> Option<LostReason> {
        self.lost.borrow().clone()
    }
}

/// `sent + ms`, saturating a year ahead.
fn later_by(sent: tokio::time::Instant, ms: u32) -> tokio::time::Instant {
    sent.checked_add(Duration::from_millis(u64::from(ms)))
        .unwrap_or_else(|| sent + Duration::from_secs(86_400 * 365))
}
