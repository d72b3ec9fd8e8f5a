//! The HTTP gateway's locks. Each lock taken over HTTP gets an engine
//! session of its own, labelled `http <peer>`: HTTP callers then queue for a
//! key first come first served like any connection (one shared session would
//! refuse a second caller with `ALREADY_HELD` instead of queueing it). The
//! gateway keeps the session while the lock is held; the fencing token is
//! the capability to renew and release it. Every HTTP lock has a lease, since
//! no connection's end would ever release it; when the lease runs out (or
//! the lock is lost) a small watcher task drops the session.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use clastor_protocol::{LockMode, Status};
use tracing::info;

use super::error::ApiError;
use crate::backend::Backend;
use crate::engine::{AcquireOptions, Engine, Granted, Session};
use crate::key::{KeyMap, LockKey};

struct HttpLock<B: Backend> {
    token: u64,
    session: Session<B>,
}

/// The HTTP locks of each key: one exclusive, or any number shared (each
/// with its own session and token).
type Table<B> = Mutex<KeyMap<Vec<HttpLock<B>>>>;

/// What an HTTP caller asks of an acquire.
#[derive(Debug, Clone, Copy)]
pub(super) struct Terms {
    /// How long it may wait in line.
    pub(super) wait: Duration,
    /// Its lease (an HTTP lock always has one).
    pub(super) lease: Duration,
    /// Exclusive or shared.
    pub(super) mode: LockMode,
}

/// The locks held over HTTP.
pub(super) struct Gateway<B: Backend> {
    engine: Engine<B>,
    locks: Arc<Table<B>>,
    /// Locks held plus acquires in progress, against `max_locks`.
    in_use: Arc<AtomicUsize>,
    max_locks: usize,
}

impl<B: Backend> std::fmt::Debug for Gateway<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("in_use", &self.in_use.load(Ordering::Relaxed))
            .field("max_locks", &self.max_locks)
            .finish_non_exhaustive()
    }
}

fn lock<B: Backend>(t: &Table<B>) -> MutexGuard<'_, KeyMap<Vec<HttpLock<B>>>> {
    // Critical sections are single inserts and removes: consistent even after a panic.
    t.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One slot of `max_locks`, given back when dropped unless kept.
struct Slot(Option<Arc<AtomicUsize>>);

impl Slot {
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(n) = &self.0 {
            n.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl<B: Backend> Gateway<B> {
    pub(super) fn new(engine: Engine<B>, max_locks: usize) -> Gateway<B> {
        Gateway {
            engine,
            locks: Arc::new(Mutex::new(KeyMap::default())),
            in_use: Arc::new(AtomicUsize::new(0)),
            max_locks,
        }
    }

    fn take_slot(&self) -> Result<Slot, ApiError> {
        let max = self.max_locks;
        self.in_use
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .map(|_| Slot(Some(self.in_use.clone())))
            .map_err(|_| {
                ApiError::status(
                    Status::LimitExceeded,
                    format!("{max} locks are held or being acquired over HTTP, the most allowed"),
                )
            })
    }

    /// Acquires `key` for an HTTP caller at `peer`, with a lease.
    /// `Ok(None)`: not granted within `wait`.
    ///
    /// # Cancellation safety
    /// Dropping the future (the caller went away) withdraws the wait.
    ///
    /// # Errors
    /// `LIMIT_EXCEEDED` past the gateway's lock limit; the engine's errors.
    pub(super) async fn acquire(
        &self,
        key: &LockKey,
        Terms { wait, lease, mode }: Terms,
        peer: SocketAddr,
        client: Option<&str>,
        trace_id: Option<Arc<str>>,
    ) -> Result<Option<Granted>, ApiError> {
        let slot = self.take_slot()?;
        let (session, mut lost) = self.engine.open_session(format!("http {peer}"));
        // The token renews and releases an HTTP lock: `HELD ALL` on the lock
        // port must not hand it to whoever asks.
        session.keep_tokens_private();
        if let Some(name) = client {
            session.set_client_name(name);
        }
        let opts = AcquireOptions {
            wait,
            lease: Some(lease),
            mode,
        };
        let Some(granted) = session.acquire_traced(key, opts, trace_id).await? else {
            return Ok(None);
        };
        // Beside the key's other HTTP locks: shared ones, or one lost a
        // moment ago whose watcher has not forgotten it yet (it will, and
        // give back its slot then).
        lock(&self.locks).entry(key.clone()).or_default().push(HttpLock {
            token: granted.token,
            session,
        });
        slot.keep();
        let (locks, in_use, key, token) = (
            Arc::downgrade(&self.locks),
            self.in_use.clone(),
            key.clone(),
            granted.token,
        );
        tokio::spawn(async move {
            // An event: the lock was lost (lease ran out...). `None`: the
            // session is gone (released over HTTP, or shutdown).
            if let Some(ev) = lost.recv().await {
                info!(%key, token = ev.token, reason = ev.reason.name(), "HTTP lock lost");
            }
            forget(&locks, &in_use, &key, token);
        });
        Ok(Some(granted))
    }

    /// Renews the HTTP lock on `key` whose token is `token`.
    ///
    /// # Errors
    /// `NOT_HELD` (409) if no HTTP lock on `key` has that token; the engine's errors.
    pub(super) fn renew(&self, key: &LockKey, token: u64, lease: Duration) -> Result<Granted, ApiError> {
        let session = lock(&self.locks)
            .get(key)
            .and_then(|ls| ls.iter().find(|l| l.token == token))
            .map(|l| l.session.clone())
            .ok_or_else(|| not_held(key, Some(token)))?;
        Ok(session.renew_grant(key, lease, Some(token))?)
    }

    /// Releases the HTTP lock on `key` whose token is `token`; with `None`,
    /// whichever HTTP lock `key` has (the original Clastor's tokenless
    /// release, only behind its compatibility switch).
    ///
    /// # Errors
    /// `NOT_HELD` (409) if no HTTP lock on `key` has that token (or it was
    /// lost a moment ago); backend errors (the lock is gone from the gateway
    /// either way).
    pub(super) async fn release(&self, key: &LockKey, token: Option<u64>) -> Result<(), ApiError> {
        let held = {
            let mut locks = lock(&self.locks);
            take(&mut locks, key, |l| token.is_none_or(|t| t == l.token))
        };
        let held = held.ok_or_else(|| not_held(key, token))?;
        self.in_use.fetch_sub(1, Ordering::AcqRel);
        let released = held.session.release_grant(key, Some(held.token)).await;
        held.session.close().await;
        match released? {
            true => Ok(()),
            false => Err(not_held(key, token)),
        }
    }
}

fn not_held(key: &LockKey, token: Option<u64>) -> ApiError {
    let message = match token {
        Some(token) => {
            format!("{key} is not held over HTTP with token {token} (released, expired, or another holder's)")
        }
        None => format!("{key} is not held over HTTP (released, expired, or never taken over HTTP)"),
    };
    ApiError::status(Status::NotHeld, message)
}

/// Drops the gateway's record of `key` if it is still the grant `token`.
/// Removes the newest HTTP lock of `key` that `which` picks (for a
/// tokenless release, the newest: an older one may be lost and not yet
/// forgotten), dropping the key's entry once empty.
fn take<B: Backend>(
    locks: &mut KeyMap<Vec<HttpLock<B>>>,
    key: &LockKey,
    which: impl Fn(&HttpLock<B>) -> bool,
) -> Option<HttpLock<B>> {
    let ls = locks.get_mut(key)?;
    let at = ls.iter().rposition(which)?;
    let taken = ls.remove(at);
    if ls.is_empty() {
        locks.remove(key);
    }
    Some(taken)
}

fn forget<B: Backend>(locks: &Weak<Table<B>>, in_use: &AtomicUsize, key: &LockKey, token: u64) {
    let Some(locks) = locks.upgrade() else { return };
    let removed = take(&mut lock(&locks), key, |l| l.token == token);
    if removed.is_some() {
        in_use.fetch_sub(1, Ordering::AcqRel);
    }
    // The session (if removed) closes here, outside the table's lock.
    drop(removed);
}
