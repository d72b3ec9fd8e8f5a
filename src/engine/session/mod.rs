//! Sessions: the owners of locks. One per connection, or per in-process user
//! of the engine.
//!
//! A session's table of held locks and pending acquires sits behind a plain
//! mutex that is never held across an await. Operations on one session may
//! run concurrently (a connection pipelines requests); a second acquire of a
//! key the session holds or awaits is refused rather than queued behind itself.
//!
//! Leases are one timer task per leased lock, aborted when the lock goes away
//! first. Lost locks (lease ran out, backend gave up the grant) are removed
//! from the table and reported as a [`LostEvent`] before the backend is told
//! to release, so the holder hears of the loss no later than anyone else can
//! be granted the lock.
//!
//! Files, one concern each: `admission.rs` (may this session ask: the
//! checks and limits before the backend, the pending marker), `grant.rs`
//! (recording the backend's answer in the held table), `lease.rs` (lease
//! timers, renew, expiry), `lost.rs` (how a loss is queued and reaches the
//! owner), `listing.rs` (what a session shows of itself). This file has the
//! session and its table, the acquire that goes through them, release,
//! safe-until and close. Each file below imports this one (the table and
//! the session's state); `grant.rs` and `lease.rs` also import
//! `admission.rs`; no other two import each other.

mod admission;
mod grant;
mod lease;
mod listing;
mod lost;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use clastor_protocol::{LockMode, LostReason};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

pub use self::admission::AcquireOptions;
pub use self::grant::Granted;
use self::lease::Lease;
pub use self::listing::{HeldInfo, WaitInfo};
use self::lost::LostQueue;
pub use self::lost::{LostEvent, LostEvents};
use super::EngineState;
use super::observer::HoldEnd;
use crate::backend::{AcquireRequest, Backend};
use crate::error::LockError;
use crate::key::{KeyMap, LockKey};

/// Longest client name kept (characters): a name is for people reading a
/// listing, and it comes from the network.
const MAX_CLIENT_NAME: usize = 128;

/// An owner of locks. Cheap to clone; the session closes (releasing
/// everything) on [`Session::close`] or when the last clone is dropped.
#[derive(Debug)]
pub struct Session<B: Backend> {
    state: Arc<SessionState<B>>,
}

impl<B: Backend> Clone for Session<B> {
    fn clone(&self) -> Self {
        Session {
            state: self.state.clone(),
        }
    }
}

pub(crate) struct SessionState<B: Backend> {
    id: u64,
    label: Arc<str>,
    /// The name the client gave, set once (after `HELLO`): listings clone
    /// the `Arc`, so naming costs nothing per request.
    client: OnceLock<Arc<str>>,
    /// Its tokens are capabilities (HTTP locks: the token renews and
    /// releases), so listings leave them out.
    private_tokens: AtomicBool,
    engine: Arc<EngineState<B>>,
    table: Mutex<LockTable<B::Guard>>,
    events: Arc<LostQueue>,
    /// Cancelled by `close`, to withdraw acquires still waiting.
    closing: CancellationToken,
}

impl<B: Backend> std::fmt::Debug for SessionState<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .field("label", &self.label)
            .finish_non_exhaustive()
    }
}

struct LockTable<G> {
    held: KeyMap<Held<G>>,
    pending: KeyMap<Pending>,
    /// How many of `pending` may wait: what the wait limit counts.
    waiting: usize,
    /// Keys taken out of `held` whose backend release is still running, with
    /// how many such releases are in flight: a RELEASE racing one of them is
    /// answered "not held", not NOT_OWNER.
    releasing: KeyMap<usize>,
    closed: bool,
}

struct Held<G> {
    grant_id: u64,
    granted_at: Instant,
    mode: LockMode,
    trace_id: Option<Arc<str>>,
    token: u64,
    version: Arc<str>,
    lease: Option<Lease>,
    guard: G,
}

struct Pending {
    grant_id: u64,
    since: Instant,
    trace_id: Option<Arc<str>>,
    /// Counted in `LockTable::waiting` (asked for a wait, within the limit).
    waits: bool,
    lost: Option<LostReason>,
}

impl<G> LockTable<G> {
    /// Removes the pending acquire of `key`, keeping the wait count right.
    fn take_pending(&mut self, key: &LockKey) -> Option<Pending> {
        let p = self.pending.remove(key)?;
        self.waiting -= usize::from(p.waits);
        Some(p)
    }
}

impl<B: Backend> Session<B> {
    pub(crate) fn open(engine: Arc<EngineState<B>>, id: u64, label: Arc<str>) -> (Session<B>, LostEvents) {
        let events = Arc::new(LostQueue::default());
        let state = Arc::new(SessionState {
            id,
            label,
            client: OnceLock::new(),
            private_tokens: AtomicBool::new(false),
            engine: engine.clone(),
            table: Mutex::new(LockTable {
                held: KeyMap::default(),
                pending: KeyMap::default(),
                waiting: 0,
                releasing: KeyMap::default(),
                closed: false,
            }),
            events: events.clone(),
            closing: CancellationToken::new(),
        });
        engine.sessions.insert(id, Arc::downgrade(&state));
        debug!(session = id, label = %state.label, "session opened");
        (Session { state }, LostEvents { queue: events })
    }

    /// The session's engine-wide id (the connection id on the wire).
    pub fn id(&self) -> u64 {
        self.state.id
    }

    /// Names the client behind this session, for listings and logs: once
    /// (a later call changes nothing and returns `None`). The name comes
    /// from the client, so it is cut to `MAX_CLIENT_NAME` (128) characters with
    /// control characters replaced; an empty name names nothing. Returns the
    /// name as stored.
    pub fn set_client_name(&self, name: &str) -> Option<Arc<str>> {
        let clean: String = name
            .trim()
            .chars()
            .take(MAX_CLIENT_NAME)
            .map(|c| if c.is_control() { '\u{fffd}' } else { c })
            .collect();
        if clean.is_empty() {
            return None;
        }
        let name: Arc<str> = Arc::from(clean);
        self.state.client.set(name.clone()).ok()?;
        Some(name)
    }

    /// Marks this session's tokens as capabilities (whoever knows one can
    /// renew or release the lock, as over HTTP): listings of other owners'
    /// locks ([`HeldInfo::token_private`]) leave them out.
    pub fn keep_tokens_private(&self) {
        self.state.private_tokens.store(true, Ordering::Relaxed);
    }

    /// The name the client gave, if any ([`Session::set_client_name`]).
    pub fn client_name(&self) -> Option<&Arc<str>> {
        self.state.client.get()
    }

    /// Takes the lock on `key`, waiting up to `opts.wait` (FIFO behind earlier
    /// waiters). `Ok(None)`: not granted within the wait.
    ///
    /// # Cancellation safety
    /// Dropping the future withdraws the wait; if the lock had just been
    /// granted, it is released. Nothing is left behind.
    ///
    /// # Errors
    /// [`LockError::AlreadyHeld`] if this session holds or awaits `key`;
    /// [`LockError::LimitExceeded`] past the held limit (waits included), or
    /// past the wait limit when the lock is taken (an acquire with a wait
    /// past that limit is tried once instead; a try-once never counts);
    /// [`LockError::InvalidArgument`] for a wait or lease over the configured
    /// maximum or a zero lease;
    /// [`LockError::SessionClosed`]; backend failures.
    pub async fn acquire(&self, key: &LockKey, opts: AcquireOptions) -> Result<Option<Granted>, LockError> {
        self.acquire_traced(key, opts, None).await
    }

    /// [`Session::acquire`] on behalf of a request carrying trace id
    /// `trace_id`: the grant keeps it, listings show it, and the engine's
    /// log lines about the grant (lease expiry, loss) name it.
    ///
    /// # Cancellation safety
    /// As [`Session::acquire`].
    ///
    /// # Errors
    /// As [`Session::acquire`].
    pub async fn acquire_traced(
        &self,
        key: &LockKey,
        opts: AcquireOptions,
        trace_id: Option<Arc<str>>,
    ) -> Result<Option<Granted>, LockError> {
        let s = &*self.state;
        let started = Instant::now();
        let (pending, over_wait_limit) = s.admit(key, &opts, trace_id.as_ref())?;
        let req = AcquireRequest {
            key,
            wait: if over_wait_limit.is_some() {
                Duration::ZERO
            } else {
                opts.wait
            },
            mode: opts.mode,
            owner: s.id,
            on_lost: self.notifier(key, pending.grant_id),
        };
        // Dropping the backend's future on close withdraws the wait.
        let grant = tokio::select! {
            // The acquire first: one that is ready at once (an uncontended
            // in-memory lock) then never registers with the closing token.
            biased;
            grant = s.engine.backend.acquire(req) => grant,
            () = s.closing.cancelled() => return Err(LockError::SessionClosed),
        };
        self.record(pending, &opts, trace_id, over_wait_limit, started, grant)
    }

    /// Releases `key`. `Ok(true)` if this session held it; `Ok(false)` if
    /// nobody holds it (release is idempotent).
    ///
    /// # Errors
    /// [`LockError::NotOwner`] if another owner holds it; backend failures
    /// (the lock is no longer this session's either way: the backend frees it
    /// when it can, at worst when its own session ends).
    pub async fn release(&self, key: &LockKey) -> Result<bool, LockError> {
        self.release_grant(key, None).await
    }

    /// Releases `key` only if this session holds it under fencing token
    /// `token` (any grant if `None`). A holder that names its token cannot
    /// release a later grant of the same key by mistake: a stale release
    /// finds its grant gone and answers `Ok(false)`.
    ///
    /// # Errors
    /// As [`Session::release`].
    pub async fn release_grant(&self, key: &LockKey, token: Option<u64>) -> Result<bool, LockError> {
        let s = &*self.state;
        let held = {
            let mut st = s.lock();
            match st.held.get(key) {
                Some(h) if token.is_some_and(|t| t != h.token) => return Ok(false),
                Some(_) => st.held.remove(key).map(|h| (h, Releasing::start(s, &mut st, key))),
                // Our own release of it is still on its way to the backend.
                None if st.releasing.contains_key(key) => return Ok(false),
                None => None,
            }
        };
        match held {
            Some((held, _releasing)) => {
                s.engine.stats.released.fetch_add(1, Ordering::Relaxed);
                s.observe_end(key, &held, HoldEnd::Released);
                debug!(session = s.id, %key, token = held.token, trace_id = held.trace_id.as_deref(), "released");
                s.engine.backend.release(held.disarm()).await?;
                Ok(true)
            }
            // Boxed: rare, and a network backend's future is big.
            None if Box::pin(s.engine.backend.is_held(key)).await? => Err(LockError::NotOwner(key.clone())),
            None => Ok(false),
        }
    }

    /// Until when nobody else can be granted `key`, as far as the engine and
    /// the backend know: the earlier of its lease's end and the backend's own
    /// bound ([`Backend::safe_until`]). With `None`: the earliest backend
    /// bound of every lock this session holds, leases left out (each lock's
    /// holder counts its own lease; one short lease must not cut the others'
    /// promise). `Some(None)`: held, with no bound; `None`: not held (with
    /// `None`: nothing held), so nothing is promised.
    pub fn safe_until(&self, key: Option<&LockKey>) -> Option<Option<Instant>> {
        let backend = &self.state.engine.backend;
        let st = self.state.lock();
        let with_lease = key.is_some();
        let bound = |h: &Held<B::Guard>| {
            let lease = h.lease.as_ref().filter(|_| with_lease).map(|l| l.deadline);
            match (lease, backend.safe_until(&h.guard)) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        };
        match key {
            Some(key) => st.held.get(key).map(bound),
            None if st.held.is_empty() => None,
            None => Some(st.held.values().filter_map(bound).min()),
        }
    }

    /// Closes the session: refuses new acquires, withdraws waiting ones (they
    /// fail with [`LockError::SessionClosed`]) and releases everything held.
    pub async fn close(&self) {
        self.state.close().await;
    }
}

/// Marks a key as being released by this session until dropped (after the
/// backend release finished, failed, or was cancelled).
struct Releasing<'a, B: Backend> {
    session: &'a SessionState<B>,
    key: LockKey,
}

impl<'a, B: Backend> Releasing<'a, B> {
    fn start(session: &'a SessionState<B>, st: &mut LockTable<B::Guard>, key: &LockKey) -> Releasing<'a, B> {
        *st.releasing.entry(key.clone()).or_default() += 1;
        Releasing {
            session,
            key: key.clone(),
        }
    }
}

impl<B: Backend> Drop for Releasing<'_, B> {
    fn drop(&mut self) {
        let mut st = self.session.lock();
        if let Some(n) = st.releasing.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                st.releasing.remove(&self.key);
            }
        }
    }
}

impl<B: Backend> SessionState<B> {
    fn lock(&self) -> MutexGuard<'_, LockTable<B::Guard>> {
        // No code path panics while holding the lock, but if one ever did,
        // the table is still consistent (every mutation is a single insert or
        // remove): carry on rather than poison every later operation.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    pub(crate) fn label(&self) -> &Arc<str> {
        &self.label
    }

    pub(crate) fn client(&self) -> Option<&Arc<str>> {
        self.client.get()
    }

    fn observe_end(&self, key: &LockKey, held: &Held<B::Guard>, how: HoldEnd) {
        if let Some(o) = self.engine.observer.get() {
            o.ended(key, held.granted_at.elapsed(), how);
        }
    }

    pub(crate) async fn close(&self) {
        let held = {
            let mut st = self.lock();
            st.closed = true;
            std::mem::take(&mut st.held)
        };
        self.closing.cancel();
        self.engine.sessions.remove(&self.id);
        if !held.is_empty() {
            debug!(session = self.id, locks = held.len(), "releasing on close");
        }
        for (key, h) in &held {
            self.observe_end(key, h, HoldEnd::Closed);
        }
        let backend = &self.engine.backend;
        let releases = held.into_iter().map(|(key, h)| async move {
            if let Err(e) = backend.release(h.disarm()).await {
                warn!(%key, error = %e, "release on close not confirmed");
            }
        });
        futures_util::future::join_all(releases).await;
    }
}

impl<B: Backend> Drop for SessionState<B> {
    fn drop(&mut self) {
        self.engine.sessions.remove(&self.id);
        self.events.close();
        let st = self.table.get_mut().unwrap_or_else(PoisonError::into_inner);
        // Guards release in the background when dropped.
        for (_, held) in st.held.drain() {
            drop(held.disarm());
        }
    }
}
