//! The requests in flight on a connection: their ids, the channels their
//! replies go to, and what each reply changes in the table of held locks —
//! and what a reply carries to its caller ([`Reply`], [`PendingGrant`]).

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use clastor_protocol::{Opcode, Response};
use tokio::sync::{OwnedSemaphorePermit, oneshot};

use super::grant::HeldGrant;
use super::key::Key;
use crate::error::Error;

/// Request id of the handshake; ids of later requests start after `AUTH_ID`.
pub(super) const HELLO_ID: u32 = 1;

/// Request id of the `AUTH` sent right after `HELLO` when a token is set.
pub(super) const AUTH_ID: u32 = 2;

/// How a request's reply updates the connection's table of held locks,
/// besides completing the request.
#[derive(Debug)]
pub(crate) enum HeldUpdate {
    /// Nothing.
    None,
    /// An acquire through the lock API: register the grant. The key is
    /// `kind/id`, the kind its first `kind_len` bytes.
    Acquire { key: Key, kind_len: usize },
    /// A release through the lock API: forget the grant with this token.
    Release { key: Key, token: u64 },
}

/// A reply and, for a granted acquire, the registered grant (whose version
/// has moved out of the response body into the grant).
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) response: Response,
    pub(crate) grant: Option<PendingGrant>,
}

/// What a [`PendingGrant`] needs of its connection: a way to give the lock
/// back. The connection implements it; the trait keeps this file from
/// importing the connection that owns the requests in flight.
pub(super) trait GiveBack: Send + Sync {
    /// Releases `lock` without waiting for the reply.
    fn give_back(&self, lock: &HeldGrant);
}

/// A registered grant on its way to the caller. Until [`accept`] hands it to a
/// guard, dropping it (the caller stopped waiting, possibly after the reply was
/// already in its channel) gives the lock back in the background, so a
/// cancelled acquire never leaves a lock held for nobody.
///
/// [`accept`]: PendingGrant::accept
#[derive(Debug)]
pub(crate) struct PendingGrant {
    lock: Option<Arc<HeldGrant>>,
    conn: Weak<dyn GiveBack>,
}

impl PendingGrant {
    /// A grant the reader registered on `conn`, armed.
    pub(super) fn new(lock: Arc<HeldGrant>, conn: Weak<dyn GiveBack>) -> PendingGrant {
        PendingGrant { lock: Some(lock), conn }
    }

    /// Disarms the grant: the caller's guard owns the lock from now on.
    pub(crate) fn accept(mut self) -> Option<Arc<HeldGrant>> {
        self.lock.take()
    }
}

impl Drop for PendingGrant {
    fn drop(&mut self) {
        if let Some(lock) = self.lock.take()
            && let Some(conn) = self.conn.upgrade()
        {
            tracing::debug!(key = %lock.key, token = lock.token, "releasing a grant nobody waited for");
            conn.give_back(&lock);
        }
    }
}

pub(crate) type ReplyTx = oneshot::Sender<Result<Reply, Error>>;

#[derive(Debug)]
pub(super) struct Pending {
    /// `None` for fire-and-forget requests (background releases, keepalive).
    pub(super) tx: Option<ReplyTx>,
    pub(super) opcode: Opcode,
    pub(super) update: HeldUpdate,
    /// Held until the reply arrives: bounds requests in flight.
    pub(super) _permit: Option<OwnedSemaphorePermit>,
}

/// The requests sent and not answered yet, by request id.
#[derive(Debug)]
pub(super) struct PendingRequests {
    next_id: u32,
    pending: HashMap<u32, Pending>,
}

impl PendingRequests {
    /// No request in flight; the next id is `next_id`.
    pub(super) fn new(next_id: u32) -> PendingRequests {
        PendingRequests {
            next_id,
            pending: HashMap::new(),
        }
    }

    pub(super) fn alloc_id(&mut self) -> u32 {
        loop {
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1).max(HELLO_ID + 1);
            if id > HELLO_ID && !self.pending.contains_key(&id) {
                return id;
            }
        }
    }

    pub(super) fn insert(&mut self, id: u32, pending: Pending) {
        self.pending.insert(id, pending);
    }

    /// The request `id` is answered: its record, if it was pending.
    pub(super) fn remove(&mut self, id: u32) -> Option<Pending> {
        self.pending.remove(&id)
    }

    /// Every request still in flight (the connection ended).
    pub(super) fn take(&mut self) -> HashMap<u32, Pending> {
        std::mem::take(&mut self.pending)
    }
}
