//! The gRPC port's sessions: every engine session a stream or `OpenSession`
//! made, by session id, with what the unary calls and idempotent acquires
//! need — the session's last use (unary sessions expire when idle), its
//! calls in progress (never expired under them), and the grants made per
//! request id (a retried acquire returns its grant).
//!
//! Session ids are capabilities: random, never listed (`Held` lists the
//! engine's session number, another value), so knowing a lock's holder
//! does not let anyone act as it.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use clastor_protocol::{AcquireOk, LockMode};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::backend::Backend;
use crate::engine::{Engine, Session};
use crate::key::LockKey;
use crate::server::auth::Access;

/// Who ends a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Owner {
    /// A `Session` stream: the session ends with it.
    Stream,
    /// `OpenSession`: ends on `CloseSession` or after its idle expiry.
    Unary,
}

/// One grant an acquire with a request id made, for its retries.
#[derive(Debug, Clone)]
pub(super) struct Recorded {
    key: LockKey,
    mode: LockMode,
    reply: AcquireOk,
}

/// One session of the gRPC port.
#[derive(Debug)]
pub(super) struct Entry<B: Backend> {
    pub(super) session: Session<B>,
    pub(super) owner: Owner,
    /// Who opened the session and what it may do (`auth.rs`): its requests
    /// run with it, and unary calls on it must come from its principal.
    pub(super) access: Access,
    last_used: Mutex<Instant>,
    calls: AtomicUsize,
    /// The engine's `max_held_per_session`: how many grants are remembered
    /// before the gone ones are pruned.
    held_limit: usize,
    /// Grants by request id; entries whose lock is gone are pruned as it grows.
    granted: Mutex<HashMap<u64, Recorded>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<B: Backend> Entry<B> {
    /// The grant a previous acquire with `request_id` made, if the session
    /// still holds it (same key and mode): a retry gets it again.
    pub(super) fn replay(&self, request_id: u64, key: &LockKey, mode: LockMode) -> Option<AcquireOk> {
        if request_id == 0 {
            return None;
        }
        let rec = lock(&self.granted).get(&request_id).cloned()?;
        if rec.key != *key || rec.mode != mode {
            return None;
        }
        let token = rec.reply.token;
        self.session
            .held()
            .iter()
            .any(|h| h.key == rec.key && h.token == token)
            .then_some(rec.reply)
    }

    /// Remembers the grant of the acquire with `request_id`.
    pub(super) fn record(&self, request_id: u64, key: &LockKey, mode: LockMode, reply: &AcquireOk) {
        if request_id == 0 {
            return;
        }
        let mut granted = lock(&self.granted);
        // Bounded by what the session can hold: past it, forget the grants
        // that are gone (released or lost), which no retry can return.
        if granted.len() >= self.held_limit {
            let held: Vec<(LockKey, u64)> = self.session.held().into_iter().map(|h| (h.key, h.token)).collect();
            granted.retain(|_, r| held.iter().any(|(k, t)| *k == r.key && *t == r.reply.token));
        }
        granted.insert(
            request_id,
            Recorded {
                key: key.clone(),
                mode,
                reply: reply.clone(),
            },
        );
    }

    /// Marks a unary call on the session; the session is not expired until
    /// the guard drops, and its idle time counts from then.
    pub(super) fn call(self: &Arc<Self>) -> CallGuard<B> {
        self.calls.fetch_add(1, Ordering::AcqRel);
        *lock(&self.last_used) = Instant::now();
        CallGuard { entry: self.clone() }
    }

    fn idle_since(&self) -> Option<Instant> {
        (self.calls.load(Ordering::Acquire) == 0).then(|| *lock(&self.last_used))
    }
}

/// A unary call in progress on a session ([`Entry::call`]).
#[derive(Debug)]
pub(super) struct CallGuard<B: Backend> {
    entry: Arc<Entry<B>>,
}

impl<B: Backend> std::ops::Deref for CallGuard<B> {
    type Target = Entry<B>;
    fn deref(&self) -> &Entry<B> {
        &self.entry
    }
}

impl<B: Backend> Drop for CallGuard<B> {
    fn drop(&mut self) {
        *lock(&self.entry.last_used) = Instant::now();
        self.entry.calls.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Every session of the gRPC port.
#[derive(Debug)]
pub(super) struct Sessions<B: Backend> {
    engine: Engine<B>,
    map: Mutex<HashMap<u64, Arc<Entry<B>>>>,
    max: usize,
    idle_expiry: Duration,
    ids: RandomState,
    counter: AtomicU64,
}

impl<B: Backend> Sessions<B> {
    pub(super) fn new(engine: Engine<B>, max: usize, idle_expiry: Duration) -> Sessions<B> {
        Sessions {
            engine,
            map: Mutex::new(HashMap::new()),
            max,
            idle_expiry,
            ids: RandomState::new(),
            counter: AtomicU64::new(0),
        }
    }

    pub(super) fn max(&self) -> usize {
        self.max
    }

    pub(super) fn idle_expiry(&self) -> Duration {
        self.idle_expiry
    }

    /// Opens an engine session labelled `label` for `access`; `None` past
    /// `max_sessions`.
    pub(super) fn open(
        &self,
        label: String,
        owner: Owner,
        access: Access,
    ) -> Option<(u64, Arc<Entry<B>>, crate::engine::LostEvents)> {
        let mut map = lock(&self.map);
        if map.len() >= self.max {
            return None;
        }
        let (session, lost) = self.engine.open_session(label);
        let entry = Arc::new(Entry {
            session,
            owner,
            access,
            last_used: Mutex::new(Instant::now()),
            calls: AtomicUsize::new(0),
            held_limit: self.engine.config().max_held_per_session.max(16),
            granted: Mutex::new(HashMap::new()),
        });
        let id = loop {
            // Unguessable (a keyed hash of a counter) and never 0.
            let id = self.ids.hash_one(self.counter.fetch_add(1, Ordering::Relaxed));
            if id != 0 && !map.contains_key(&id) {
                break id;
            }
        };
        map.insert(id, entry.clone());
        Some((id, entry, lost))
    }

    /// The session `id`, for a unary call.
    pub(super) fn get(&self, id: u64) -> Option<Arc<Entry<B>>> {
        lock(&self.map).get(&id).cloned()
    }

    /// Forgets session `id` and closes it (releasing its locks); false if
    /// there was none.
    pub(super) async fn close(&self, id: u64) -> bool {
        let entry = lock(&self.map).remove(&id);
        match entry {
            Some(entry) => {
                entry.session.close().await;
                true
            }
            None => false,
        }
    }

    /// Closes the unary sessions idle for longer than the expiry; returns
    /// how many.
    pub(super) async fn expire_idle(&self) -> usize {
        let now = Instant::now();
        let expired: Vec<Arc<Entry<B>>> = {
            let mut map = lock(&self.map);
            let ids: Vec<u64> = map
                .iter()
                .filter(|(_, e)| e.owner == Owner::Unary)
                .filter(|(_, e)| {
                    e.idle_since()
                        .is_some_and(|t| now.saturating_duration_since(t) >= self.idle_expiry)
                })
                .map(|(id, _)| *id)
                .collect();
            ids.iter().filter_map(|id| map.remove(id)).collect()
        };
        for e in &expired {
            debug!(
                session = e.session.id(),
                "gRPC session expired after its idle time; releasing its locks"
            );
            e.session.close().await;
        }
        expired.len()
    }

    /// Expires idle unary sessions until `shutdown`, then closes every
    /// unary session (streams close their own).
    pub(super) async fn run_expiry(&self, shutdown: CancellationToken) {
        let every = (self.idle_expiry / 4).max(Duration::from_millis(10));
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(every) => {}
            }
            self.expire_idle().await;
        }
        let unary: Vec<Arc<Entry<B>>> = {
            let mut map = lock(&self.map);
            let ids: Vec<u64> = map
                .iter()
                .filter(|(_, e)| e.owner == Owner::Unary)
                .map(|(id, _)| *id)
                .collect();
            ids.iter().filter_map(|id| map.remove(id)).collect()
        };
        for e in unary {
            e.session.close().await;
        }
    }
}
