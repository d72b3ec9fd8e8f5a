//! In-memory backend: one process, no persistence. For development, tests and
//! embedding (library mode).
//!
//! Each key has its holders — one exclusive holder, or any number of shared
//! ones — and a FIFO queue of waiters behind a `DashMap` shard lock; a
//! release hands the lock straight to the waiters at the front of the queue
//! through oneshot channels: the first, and, if it is shared, every shared
//! waiter right behind it. Strict FIFO: a shared request queues behind a
//! waiting exclusive one even while the lock is shared, so a stream of
//! readers never starves a writer. Every state change for a key happens
//! under that key's shard lock, which is what makes cancellation simple: a
//! waiter that gives up takes the lock and is either still queued (it leaves
//! the queue, and the waiters it held back are let in) or already a holder
//! (it releases, handing off to the next).
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

use clastor_protocol::{KindLayout, LockMode};
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
    /// Tickets of the current holders: one exclusive, or any number shared.
    holders: Vec<u64>,
    /// The holders are shared (meaningless while there are none).
    shared: bool,
    waiters: VecDeque<Waiter>,
}

impl KeyState {
    /// Whether a request in `mode` may hold alongside the current holders.
    fn admits(&self, mode: LockMode) -> bool {
        self.holders.is_empty() || (self.shared && mode == LockMode::Shared)
    }

    fn is_idle(&self) -> bool {
        self.holders.is_empty() && self.waiters.is_empty()
    }

    /// Makes `ticket` a holder in `mode`.
    fn hold(&mut self, ticket: u64, mode: LockMode) {
        self.shared = mode == LockMode::Shared;
        self.holders.push(ticket);
    }

    /// Removes `ticket` from the holders; whether it was one.
    fn unhold(&mut self, ticket: u64) -> bool {
        let before = self.holders.len();
        self.holders.retain(|&t| t != ticket);
        self.holders.len() != before
    }
}

#[derive(Debug)]
struct Waiter {
    ticket: u64,
    mode: LockMode,
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
            .map_or(0, |s| s.holders.len() + s.waiters.len())
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

    /// Gives up `ticket`'s hold on `key`, handing the lock to the waiters at
    /// the front still listening. A no-op if `ticket` is not a holder.
    fn release(&self, key: &LockKey, ticket: u64) {
        let Some(mut state) = self.keys.get_mut(key) else {
            return;
        };
        if !state.unhold(ticket) {
            return;
        }
        self.hand_off(&mut state);
        self.settle(key, state);
    }

    /// With the key's lock held: grants to the waiters at the front, in
    /// order, as long as each may hold alongside the holders — the first
    /// exclusive one alone, a run of shared ones together. A dead receiver
    /// means that waiter was cancelled and its clean-up is about to find it
    /// gone from the queue.
    fn hand_off(&self, state: &mut KeyState) {
        while let Some(w) = state.waiters.front() {
            if !state.admits(w.mode) {
                return;
            }
            let Some(w) = state.waiters.pop_front() else {
                return;
            };
            state.hold(w.ticket, w.mode);
            if w.grant.send(self.token()).is_err() {
                state.unhold(w.ticket);
            }
        }
    }

    /// Drops the key's entry once nobody holds or waits, and wakes a drain.
    fn settle(&self, key: &LockKey, state: dashmap::mapref::one::RefMut<'_, LockKey, KeyState>) {
        let idle = state.is_idle();
        drop(state);
        if idle {
            self.keys.remove_if(key, |_, s| s.is_idle());
        }
        self.kind_changed(key.kind_arc());
    }

    /// Clean-up for a waiter that stops waiting (timeout or cancellation).
    /// Returns the token if the lock had been handed to it meanwhile and
    /// `keep` is true; otherwise undoes whatever the waiter had — and lets
    /// in the waiters it held back (shared ones behind it, while the lock
    /// is shared).
    fn withdraw(&self, key: &LockKey, ticket: u64, rx: &mut oneshot::Receiver<u64>, keep: bool) -> Option<u64> {
        let mut state = self.keys.get_mut(key)?;
        if state.holders.contains(&ticket) {
            if keep {
                // Granted just as the wait ran out: the grant stands. The
                // token is in the channel, sent under this same lock.
                if let Ok(token) = rx.try_recv() {
                    return Some(token);
                }
            }
            state.unhold(ticket);
        } else {
            state.waiters.retain(|w| w.ticket != ticket);
        }
        self.hand_off(&mut state);
        self.settle(key, state);
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
        let inner = &*self.inner;
        let mode = req.mode;
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
            // FIFO: nobody passes a waiter, not even a reader joining readers.
            if state.waiters.is_empty() && state.admits(mode) {
                state.hold(ticket, mode);
                return Ok(Some(grant(inner.token(), version)));
            }
            if req.wait.is_zero() {
                return Ok(None);
            }
            let (tx, rx) = oneshot::channel();
            state.waiters.push_back(Waiter {
                ticket,
                mode,
                grant: tx,
            });
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
        Ok(self.inner.keys.get(key).is_some_and(|s| !s.holders.is_empty()))
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

    fn fixed_layout(&self) -> Option<KindLayout> {
        // Nothing outside this process shares its keys: every kind takes
        // shared locks.
        Some(KindLayout::ReadWrite)
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
