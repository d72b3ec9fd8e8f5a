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

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::time::Duration;

use clastor_protocol::{LockMode, LostReason};
use tokio::sync::Notify;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::observer::HoldEnd;
use super::{EngineConfig, EngineState};
use crate::backend::{AcquireRequest, Backend, LostNotifier};
use crate::error::LockError;
use crate::key::{KeyMap, LockKey};

/// Longest client name kept (characters): a name is for people reading a
/// listing, and it comes from the network.
const MAX_CLIENT_NAME: usize = 128;

/// Options of one acquire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AcquireOptions {
    /// How long to wait for the lock; zero tries once.
    pub wait: Duration,
    /// Lease: the lock is released (and reported lost) when it runs out
    /// unless renewed. `None` holds it until released or the session closes.
    pub lease: Option<Duration>,
    /// Requested mode: exclusive (a writer) or shared (a reader).
    pub mode: LockMode,
}

impl AcquireOptions {
    /// Try once, no lease.
    pub fn try_once() -> AcquireOptions {
        AcquireOptions::default()
    }

    /// Wait up to `wait`, no lease.
    pub fn wait(wait: Duration) -> AcquireOptions {
        AcquireOptions {
            wait,
            ..AcquireOptions::default()
        }
    }

    /// Adds a lease.
    pub fn with_lease(mut self, lease: Duration) -> AcquireOptions {
        self.lease = Some(lease);
        self
    }
}

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

/// One held lock, for listings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldInfo {
    /// The holding session's label (a connection's peer address).
    pub holder: Arc<str>,
    /// The name the holding client gave (binary `HELLO`, HTTP `User-Agent`), if any.
    pub client: Option<Arc<str>>,
    /// How long it has been held.
    pub age: Duration,
    /// The trace id it was acquired with, if any.
    pub trace_id: Option<Arc<str>>,
    /// The lock.
    pub key: LockKey,
    /// Its fencing token.
    pub token: u64,
    /// The token is a capability ([`Session::keep_tokens_private`]): a
    /// listing for anyone but the holder must not show it.
    pub token_private: bool,
    /// Version it was taken under.
    pub version: Arc<str>,
    /// Exclusive or shared.
    pub mode: LockMode,
    /// Lease left, if it has one.
    pub lease_remaining: Option<Duration>,
    /// The holding session.
    pub session: u64,
}

/// One acquire waiting for its lock, for listings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitInfo {
    /// The lock.
    pub key: LockKey,
    /// The waiting session.
    pub session: u64,
    /// The waiting session's label.
    pub holder: Arc<str>,
    /// The name the waiting client gave, if any.
    pub client: Option<Arc<str>>,
    /// How long it has been waiting.
    pub waited: Duration,
    /// The trace id it was sent with, if any.
    pub trace_id: Option<Arc<str>>,
}

/// A lock the session no longer holds, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LostEvent {
    /// The lock.
    pub key: LockKey,
    /// The lost grant's token.
    pub token: u64,
    /// Why.
    pub reason: LostReason,
}

/// The stream of a session's lost-lock events.
///
/// Unbounded, but each event stands for a grant removed from the session's
/// table, so it grows only as fast as the owner acquires and loses locks.
#[derive(Debug)]
pub struct LostEvents {
    queue: Arc<LostQueue>,
}

/// What a session and its [`LostEvents`] share. A queue that allocates only
/// when there is an event, unlike an mpsc channel, whose first block (32
/// slots, about 1.6 KiB here) every idle connection would otherwise carry.
#[derive(Debug, Default)]
struct LostQueue {
    state: Mutex<LostQueueState>,
    ready: Notify,
}

#[derive(Debug, Default)]
struct LostQueueState {
    events: VecDeque<LostEvent>,
    /// The session is gone: nothing more will be queued.
    closed: bool,
    /// The receiver is gone: events are dropped, not queued.
    deaf: bool,
}

impl LostQueue {
    fn lock(&self) -> MutexGuard<'_, LostQueueState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn push(&self, ev: LostEvent) {
        {
            let mut q = self.lock();
            if q.deaf {
                return;
            }
            q.events.push_back(ev);
        }
        // Stores a permit if the receiver is not waiting yet: no lost wake-up.
        self.ready.notify_one();
    }

    fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_one();
    }

    /// The next event, or `Err(closed)` when there is none.
    fn pop(&self) -> Result<LostEvent, bool> {
        let mut q = self.lock();
        match q.events.pop_front() {
            Some(ev) => {
                if q.events.is_empty() {
                    // Losses are rare: give the space back.
                    q.events = VecDeque::new();
                }
                Ok(ev)
            }
            None => Err(q.closed),
        }
    }
}

impl LostEvents {
    /// The next event; `None` once the session is gone and all were read.
    ///
    /// # Cancellation safety
    /// Cancel-safe: an event is never lost by dropping the future.
    pub async fn recv(&mut self) -> Option<LostEvent> {
        loop {
            match self.queue.pop() {
                Ok(ev) => return Some(ev),
                Err(true) => return None,
                Err(false) => self.queue.ready.notified().await,
            }
        }
    }

    /// An event if one is ready.
    pub fn try_recv(&mut self) -> Option<LostEvent> {
        self.queue.pop().ok()
    }
}

impl Drop for LostEvents {
    fn drop(&mut self) {
        let mut q = self.queue.lock();
        q.deaf = true;
        q.events.clear();
    }
}

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

struct Lease {
    duration: Duration,
    deadline: Instant,
    timer: AbortHandle,
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
    /// Whether an acquire of `key` may join the table: the session is open,
    /// holds and awaits no `key`, and is under its limit on locks held.
    fn admit(&self, key: &LockKey, cfg: &EngineConfig) -> Result<(), LockError> {
        if self.closed {
            return Err(LockError::SessionClosed);
        }
        if self.held.contains_key(key) || self.pending.contains_key(key) {
            return Err(LockError::AlreadyHeld(key.clone()));
        }
        // Waits count too: each may turn into a held lock.
        if self.held.len() + self.pending.len() >= cfg.max_held_per_session {
            return Err(LockError::LimitExceeded(format!(
                "this session holds {} locks and waits for {}; at most {} are allowed",
                self.held.len(),
                self.pending.len(),
                cfg.max_held_per_session
            )));
        }
        Ok(())
    }

    /// Removes the pending acquire of `key`, keeping the wait count right.
    fn take_pending(&mut self, key: &LockKey) -> Option<Pending> {
        let p = self.pending.remove(key)?;
        self.waiting -= usize::from(p.waits);
        Some(p)
    }
}

impl<G> Held<G> {
    /// Stops the lease timer (the caller removed the lock from the table).
    fn disarm(self) -> G {
        if let Some(lease) = &self.lease {
            lease.timer.abort();
        }
        self.guard
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

    /// The checks [`Session::acquire`] makes before it tries the lock, and
    /// nothing else: for a caller that refuses the request after them
    /// (a shared lock asked for on a connection of protocol version 1 to 3,
    /// PROTOCOL.md, ACQUIRE, step 6).
    ///
    /// # Errors
    /// As [`Session::acquire`], but never from the backend.
    pub fn check_acquire(&self, key: &LockKey, opts: &AcquireOptions) -> Result<(), LockError> {
        let cfg = &self.state.engine.config;
        check_options(opts, cfg)?;
        self.state.lock().admit(key, cfg)
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
        let cfg = &s.engine.config;
        check_options(&opts, cfg)?;
        let grant_id = s.engine.next_grant_id();
        // `Some(waiting)`: the wait limit was reached, so this acquire only tries once.
        let over_wait_limit = {
            let mut st = s.lock();
            st.admit(key, cfg)?;
            // A try-once never waits, so it never counts against the wait
            // limit; a wait past the limit is tried once, and refused only
            // if it would have had to wait.
            let over = (!opts.wait.is_zero() && st.waiting >= cfg.max_waits_per_session).then_some(st.waiting);
            let waits = !opts.wait.is_zero() && over.is_none();
            st.waiting += usize::from(waits);
            st.pending.insert(
                key.clone(),
                Pending {
                    grant_id,
                    since: Instant::now(),
                    trace_id: trace_id.clone(),
                    waits,
                    lost: None,
                },
            );
            over
        };
        let mut pending = PendingGuard {
            session: s,
            key,
            grant_id,
            armed: true,
        };
        let req = AcquireRequest {
            key,
            wait: if over_wait_limit.is_some() {
                Duration::ZERO
            } else {
                opts.wait
            },
            mode: opts.mode,
            owner: s.id,
            on_lost: self.notifier(key, grant_id),
        };
        // Dropping the backend's future on close withdraws the wait.
        let grant = tokio::select! {
            // The acquire first: one that is ready at once (an uncontended
            // in-memory lock) then never registers with the closing token.
            biased;
            grant = s.engine.backend.acquire(req) => grant,
            () = s.closing.cancelled() => return Err(LockError::SessionClosed),
        };
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
            None if s.engine.backend.is_held(key).await? => Err(LockError::NotOwner(key.clone())),
            None => Ok(false),
        }
    }

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

    /// The locks this session holds, ordered by key.
    pub fn held(&self) -> Vec<HeldInfo> {
        self.state.held()
    }

    /// How many locks this session holds.
    pub fn held_count(&self) -> usize {
        self.state.held_len()
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

    fn notifier(&self, key: &LockKey, grant_id: u64) -> LostNotifier {
        let weak = Arc::downgrade(&self.state);
        let key = key.clone();
        LostNotifier::new(move |reason| {
            if let Some(s) = weak.upgrade() {
                s.on_lost(&key, grant_id, reason);
            }
        })
    }

    fn start_lease(&self, key: &LockKey, grant_id: u64, duration: Duration) -> Lease {
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

/// An acquire's wait and lease against the configured maxima.
fn check_options(opts: &AcquireOptions, cfg: &EngineConfig) -> Result<(), LockError> {
    if opts.wait > cfg.max_wait {
        return Err(LockError::InvalidArgument(format!(
            "wait is over the maximum of {:?}",
            cfg.max_wait
        )));
    }
    if let Some(lease) = opts.lease {
        check_lease(lease, cfg.max_lease)?;
    }
    Ok(())
}

fn check_lease(lease: Duration, max: Duration) -> Result<(), LockError> {
    if lease.is_zero() {
        return Err(LockError::InvalidArgument("a lease must be longer than zero".into()));
    }
    if lease > max {
        return Err(LockError::InvalidArgument(format!(
            "lease is over the maximum of {max:?}"
        )));
    }
    Ok(())
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

/// Removes a pending-acquire marker if the acquire future is dropped.
struct PendingGuard<'a, B: Backend> {
    session: &'a SessionState<B>,
    key: &'a LockKey,
    grant_id: u64,
    armed: bool,
}

impl<B: Backend> Drop for PendingGuard<'_, B> {
    fn drop(&mut self) {
        if self.armed {
            let mut st = self.session.lock();
            if st.pending.get(self.key).is_some_and(|p| p.grant_id == self.grant_id) {
                st.take_pending(self.key);
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

    /// The acquires of this session waiting for their locks.
    pub(crate) fn waiting(&self) -> Vec<WaitInfo> {
        let now = Instant::now();
        let st = self.lock();
        st.pending
            .iter()
            .filter(|(_, p)| p.waits)
            .map(|(key, p)| WaitInfo {
                key: key.clone(),
                session: self.id,
                holder: self.label.clone(),
                client: self.client.get().cloned(),
                waited: now.saturating_duration_since(p.since),
                trace_id: p.trace_id.clone(),
            })
            .collect()
    }

    pub(crate) fn held_len(&self) -> usize {
        self.lock().held.len()
    }

    pub(crate) fn held(&self) -> Vec<HeldInfo> {
        let now = Instant::now();
        let st = self.lock();
        let mut out: Vec<HeldInfo> = st
            .held
            .iter()
            .map(|(key, h)| HeldInfo {
                holder: self.label.clone(),
                client: self.client.get().cloned(),
                age: now.saturating_duration_since(h.granted_at),
                trace_id: h.trace_id.clone(),
                key: key.clone(),
                token: h.token,
                token_private: self.private_tokens.load(Ordering::Relaxed),
                version: h.version.clone(),
                mode: h.mode,
                lease_remaining: h.lease.as_ref().map(|l| l.deadline.saturating_duration_since(now)),
                session: self.id,
            })
            .collect();
        drop(st);
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out
    }

    fn report_lost(&self, key: &LockKey, token: u64, reason: LostReason) {
        self.engine.stats.lost.fetch_add(1, Ordering::Relaxed);
        // The receiver is gone only if the owner stopped listening, in which
        // case it is closing the session anyway.
        self.events.push(LostEvent {
            key: key.clone(),
            token,
            reason,
        });
    }

    /// Backend callback: the grant `grant_id` on `key` is lost.
    ///
    /// The loss is queued while the table lock is held, so whoever sees the
    /// lock gone from the table (a `CONFIRM` computing what it still covers)
    /// finds its event already in the channel, to be written first.
    fn on_lost(&self, key: &LockKey, grant_id: u64, reason: LostReason) {
        let removed = {
            let mut st = self.lock();
            if st.held.get(key).is_some_and(|h| h.grant_id == grant_id) {
                let held = st.held.remove(key);
                if let Some(h) = &held {
                    self.report_lost(key, h.token, reason);
                }
                held
            } else {
                if let Some(p) = st.pending.get_mut(key).filter(|p| p.grant_id == grant_id) {
                    p.lost = Some(reason);
                }
                None
            }
        };
        if let Some(held) = removed {
            self.observe_end(key, &held, HoldEnd::Lost(reason));
            warn!(session = self.id, %key, token = held.token, trace_id = held.trace_id.as_deref(), reason = reason.name(), "lock lost");
            // Dropping the guard asks the backend to clean up in the background.
            drop(held.disarm());
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn event(id: &str) -> LostEvent {
        LostEvent {
            key: LockKey::new("k", id).unwrap(),
            token: 1,
            reason: LostReason::LeaseExpired,
        }
    }

    #[tokio::test]
    async fn lost_events_arrive_in_order_then_end_with_the_session() {
        let queue = Arc::new(LostQueue::default());
        let mut rx = LostEvents { queue: queue.clone() };
        assert!(rx.try_recv().is_none());
        let waiting = tokio::spawn(async move {
            let first = rx.recv().await.unwrap();
            let second = rx.recv().await.unwrap();
            (
                first.key.id().to_owned(),
                second.key.id().to_owned(),
                rx.recv().await.is_none(),
            )
        });
        tokio::task::yield_now().await;
        queue.push(event("a"));
        queue.push(event("b"));
        queue.close();
        assert_eq!(waiting.await.unwrap(), ("a".into(), "b".into(), true));
    }

    #[test]
    fn an_idle_queue_holds_no_memory_and_a_deaf_one_queues_nothing() {
        let queue = Arc::new(LostQueue::default());
        let mut rx = LostEvents { queue: queue.clone() };
        queue.push(event("a"));
        assert!(rx.try_recv().is_some());
        assert_eq!(queue.lock().events.capacity(), 0, "space given back once drained");
        drop(rx);
        queue.push(event("b"));
        assert!(queue.lock().events.is_empty(), "nobody listens: nothing is kept");
    }
}
