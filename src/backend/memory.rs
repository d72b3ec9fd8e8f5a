//! In-memory backend: one process, no persistence. For development, tests and
//! embedding (library mode).
//!
//! Each key has a holder and a FIFO queue of waiters behind a `DashMap` shard
//! lock; a release hands the lock straight to the first live waiter through a
//! oneshot channel. Every state change for a key happens under that key's
//! shard lock, which is what makes cancellation simple: a waiter that gives up
//! takes the lock and is either still queued (it leaves the queue) or already
//! the holder (it releases, handing off to the next).
//!
//! Kinds and version rotation live in [`rotation`]: an acquire passes its
//! kind's gate (normal: go ahead; draining: wait) before it queues.
//!
//! Tokens come from one process-wide hybrid clock: each grant's token is the
//! larger of the previous token plus one and the current Unix time in
//! microseconds. So they increase per key (and globally), including after a
//! key is forgotten and across restarts of the process (as long as the clock
//! does not go backwards, and the process did not grant faster than a million
//! locks per second for long), and they stay below 2^53 — exact in a JSON
//! number or a JavaScript double — until the year 2255.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use clastor_protocol::LockMode;
use dashmap::DashMap;
use tokio::sync::oneshot;

use self::rotation::{KindGate, KindState};
use super::{AcquireRequest, Backend, BackendError, Grant, KindVersion, RotateOutcome, RotateRequest};
use crate::key::{KeyHashing, LockKey};

mod rotation;

/// The version every kind starts at.
const INITIAL_VERSION: &str = "v1";

/// The in-memory backend. Cheap to clone; clones share state.
#[derive(Debug, Clone, Default)]
pub struct MemoryBackend {
    inner: Arc<MemoryState>,
}

/// Everything the backend knows: the keys, the token clock, the kinds' version.
#[derive(Debug)]
struct MemoryState {
    keys: DashMap<LockKey, KeyState, KeyHashing>,
    /// Kinds that were ever rotated (the others are at `v1`, normal).
    kinds: DashMap<Arc<str>, KindState>,
    /// How many kinds drain now: releases only look a kind up when some do.
    draining: AtomicUsize,
    /// Read by an acquire of a kind that has no entry in `kinds` while it
    /// queues; written by a rotation while it makes a kind's entry, so every
    /// acquire that found none has queued (and is counted) before the kind
    /// can be marked.
    first_rotation: std::sync::RwLock<()>,
    /// The last token granted.
    last_token: AtomicU64,
    next_waiter: AtomicU64,
    closed: AtomicBool,
}

/// Microseconds since the Unix epoch (0 if the clock is before it).
fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 2))
}

impl Default for MemoryState {
    fn default() -> Self {
        MemoryState {
            keys: DashMap::default(),
            kinds: DashMap::new(),
            draining: AtomicUsize::new(0),
            first_rotation: std::sync::RwLock::new(()),
            last_token: AtomicU64::new(0),
            next_waiter: AtomicU64::new(1),
            closed: AtomicBool::new(false),
        }
    }
}

#[derive(Debug, Default)]
struct KeyState {
    /// Ticket of the current holder.
    holder: Option<u64>,
    waiters: VecDeque<Waiter>,
}

#[derive(Debug)]
struct Waiter {
    ticket: u64,
    grant: oneshot::Sender<u64>,
}

/// A grant of the memory backend. Dropping it releases the lock.
#[derive(Debug)]
pub struct MemoryGuard {
    inner: Arc<MemoryState>,
    key: LockKey,
    ticket: u64,
}

impl Drop for MemoryGuard {
    fn drop(&mut self) {
        self.inner.release(&self.key, self.ticket);
    }
}

impl MemoryBackend {
    /// A new, empty backend.
    pub fn new() -> MemoryBackend {
        MemoryBackend::default()
    }

    /// Number of keys with a holder or waiters (for tests: proves nothing is
    /// left behind).
    pub fn active_keys(&self) -> usize {
        self.inner.keys.len()
    }

    /// Holder plus queued waiters of one key (0 when the key is free and
    /// forgotten).
    pub fn contenders(&self, key: &LockKey) -> usize {
        self.inner
            .keys
            .get(key)
            .map_or(0, |s| usize::from(s.holder.is_some()) + s.waiters.len())
    }

    /// Number of queued waiters across all keys.
    pub fn queued_waiters(&self) -> usize {
        self.inner.keys.iter().map(|e| e.waiters.len()).sum()
    }
}

impl MemoryState {
    /// The next token of the hybrid clock (see the module docs).
    fn token(&self) -> u64 {
        let now = unix_micros();
        let next = |last: u64| last.saturating_add(1).max(now);
        match self
            .last_token
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |last| Some(next(last)))
        {
            Ok(last) | Err(last) => next(last),
        }
    }

    /// Gives up `ticket`'s hold on `key`, handing the lock to the first waiter
    /// still listening. A no-op if `ticket` is not the holder.
    fn release(&self, key: &LockKey, ticket: u64) {
        let Some(mut state) = self.keys.get_mut(key) else {
            return;
        };
        if state.holder != Some(ticket) {
            return;
        }
        state.holder = None;
        self.hand_off(&mut state);
        let empty = state.holder.is_none() && state.waiters.is_empty();
        drop(state);
        if empty {
            self.keys
                .remove_if(key, |_, s| s.holder.is_none() && s.waiters.is_empty());
        }
        self.kind_changed(key.kind_arc());
    }

    /// With the key's lock held and no holder: grants to the first waiter whose
    /// receiver is alive. A dead receiver means that waiter was cancelled and
    /// its clean-up is about to find it gone from the queue.
    fn hand_off(&self, state: &mut KeyState) {
        while let Some(w) = state.waiters.pop_front() {
            state.holder = Some(w.ticket);
            if w.grant.send(self.token()).is_ok() {
                return;
            }
            state.holder = None;
        }
    }

    /// Clean-up for a waiter that stops waiting (timeout or cancellation).
    /// Returns the token if the lock had been handed to it meanwhile and
    /// `keep` is true; otherwise undoes whatever the waiter had.
    fn withdraw(&self, key: &LockKey, ticket: u64, rx: &mut oneshot::Receiver<u64>, keep: bool) -> Option<u64> {
        let mut state = self.keys.get_mut(key)?;
        if state.holder == Some(ticket) {
            if keep {
                // Granted just as the wait ran out: the grant stands. The
                // token is in the channel, sent under this same lock.
                if let Ok(token) = rx.try_recv() {
                    return Some(token);
                }
            }
            state.holder = None;
            self.hand_off(&mut state);
        } else {
            state.waiters.retain(|w| w.ticket != ticket);
        }
        let empty = state.holder.is_none() && state.waiters.is_empty();
        drop(state);
        if empty {
            self.keys
                .remove_if(key, |_, s| s.holder.is_none() && s.waiters.is_empty());
        }
        self.kind_changed(key.kind_arc());
        None
    }
}

/// Withdraws a queued wait if the acquire future is dropped mid-wait.
struct WaitGuard<'a> {
    inner: &'a MemoryState,
    key: &'a LockKey,
    ticket: u64,
    rx: oneshot::Receiver<u64>,
    armed: bool,
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.inner.withdraw(self.key, self.ticket, &mut self.rx, false);
        }
    }
}

impl Backend for MemoryBackend {
    type Guard = MemoryGuard;

    fn name(&self) -> &'static str {
        "memory"
    }

    async fn acquire(&self, req: AcquireRequest<'_>) -> Result<Option<Grant<MemoryGuard>>, BackendError> {
        if req.mode != LockMode::Exclusive {
            return Err(BackendError::Unsupported("shared locks".into()));
        }
        let inner = &*self.inner;
        if inner.closed.load(Ordering::Acquire) {
            return Err(BackendError::Closed);
        }
        // The in-memory backend never loses a grant on its own.
        drop(req.on_lost);
        let key = req.key;
        let started = tokio::time::Instant::now();
        let wait_deadline = started.checked_add(req.wait);
        let ticket = inner.next_waiter.fetch_add(1, Ordering::Relaxed);
        let grant = |token, version| Grant {
            token,
            version,
            guard: MemoryGuard {
                inner: self.inner.clone(),
                key: key.clone(),
                ticket,
            },
        };
        let (rx, version) = loop {
            // The kind's entry stays read-locked while the key queues; a kind
            // without one (never rotated) is covered by the gate instead (see
            // `rotation`'s lock order).
            let mut kind = inner.kinds.get(key.kind());
            let gate = match kind {
                Some(_) => None,
                None => {
                    let gate = inner
                        .first_rotation
                        .read()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    // A rotation may have made the entry meanwhile.
                    kind = inner.kinds.get(key.kind());
                    Some(gate)
                }
            };
            let version = match kind.as_deref().map(|k| inner.gate(k)) {
                None => Arc::from(INITIAL_VERSION),
                Some(KindGate::Open(version)) => version,
                Some(KindGate::Draining {
                    mut changed,
                    abandoned_at,
                }) => {
                    drop(kind);
                    drop(gate);
                    if req.wait.is_zero() {
                        return Ok(None);
                    }
                    let until = match (wait_deadline, abandoned_at) {
                        (Some(w), Some(a)) => Some(w.min(a)),
                        (w, a) => w.or(a),
                    };
                    let sleep = async {
                        match until {
                            Some(t) => tokio::time::sleep_until(t).await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        _ = changed.changed() => {}
                        () = sleep => {
                            if wait_deadline.is_some_and(|w| tokio::time::Instant::now() >= w) {
                                return Ok(None);
                            }
                            inner.abort_abandoned(key.kind_arc());
                        }
                    }
                    if inner.closed.load(Ordering::Acquire) {
                        return Err(BackendError::Closed);
                    }
                    continue;
                }
            };
            let mut state = inner.keys.entry(key.clone()).or_default();
            if state.holder.is_none() && state.waiters.is_empty() {
                state.holder = Some(ticket);
                return Ok(Some(grant(inner.token(), version)));
            }
            if req.wait.is_zero() {
                return Ok(None);
            }
            let (tx, rx) = oneshot::channel();
            state.waiters.push_back(Waiter { ticket, grant: tx });
            break (rx, version);
        };
        let left = wait_deadline.map(|w| w.saturating_duration_since(tokio::time::Instant::now()));
        let mut wait = WaitGuard {
            inner,
            key,
            ticket,
            rx,
            armed: true,
        };
        let granted = match left {
            Some(left) => tokio::time::timeout(left, &mut wait.rx).await,
            None => Ok((&mut wait.rx).await),
        };
        match granted {
            Ok(Ok(token)) => {
                wait.armed = false;
                Ok(Some(grant(token, version)))
            }
            // The sender is dropped only by `shutdown` clearing the queues.
            Ok(Err(_)) => {
                wait.armed = false;
                Err(BackendError::Closed)
            }
            Err(_elapsed) => {
                wait.armed = false;
                Ok(inner
                    .withdraw(key, ticket, &mut wait.rx, true)
                    .map(|token| grant(token, version)))
            }
        }
    }

    async fn release(&self, guard: MemoryGuard) -> Result<(), BackendError> {
        drop(guard);
        Ok(())
    }

    async fn is_held(&self, key: &LockKey) -> Result<bool, BackendError> {
        Ok(self.inner.keys.get(key).is_some_and(|s| s.holder.is_some()))
    }

    async fn version(&self, kind: &str) -> Result<KindVersion, BackendError> {
        Ok(self.inner.kind_version(kind))
    }

    fn cached_version(&self, kind: &str) -> Option<KindVersion> {
        Some(self.inner.kind_version(kind))
    }

    async fn rotate(&self, req: RotateRequest<'_>) -> Result<RotateOutcome, BackendError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(BackendError::Closed);
        }
        self.inner.rotate(req).await
    }

    async fn abort_rotation(&self, kind: &Arc<str>) -> Result<(KindVersion, bool), BackendError> {
        Ok(self.inner.abort_rotation(kind))
    }

    async fn count_locks(&self, kind: &Arc<str>, version: &str) -> Result<u32, BackendError> {
        Ok(self.inner.count_locks(kind, version))
    }

    fn info(&self) -> Vec<(String, String)> {
        vec![
            ("memory.active_keys".into(), self.active_keys().to_string()),
            ("memory.queued_waiters".into(), self.queued_waiters().to_string()),
        ]
    }

    async fn shutdown(&self) {
        self.inner.closed.store(true, Ordering::Release);
        // Dropping the queued senders wakes every waiter with `Closed`.
        self.inner.keys.iter_mut().for_each(|mut s| s.waiters.clear());
        // Acquires waiting on a draining kind re-check and see `closed`.
        self.inner.kinds.iter().for_each(|k| {
            k.changed.send_replace(());
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_follow_the_clock_strictly_increase_and_stay_exact_in_a_double() {
        let state = MemoryState::default();
        let before = unix_micros();
        let mut last = 0;
        for _ in 0..10_000 {
            let t = state.token();
            assert!(t > last, "token {t} after {last}");
            last = t;
        }
        assert!(last >= before, "tokens start at the clock");
        assert!(last < 1 << 53, "token {last} is not exact as a double");
        // Ten thousand grants race ahead of the clock by at most their count.
        assert!(last <= unix_micros() + 10_000);
    }
}
