//! The coordination backend trait, and its implementations.
//!
//! A backend owns where locks live and how waiting works (a FIFO queue in
//! memory; sequential znodes and predecessor watches in ZooKeeper). The engine
//! above it owns everything that is the same for every backend: sessions,
//! per-session tables, leases, limits and lost-lock events.
//!
//! The trait is built for remote backends with sessions and watches:
//! - a grant carries an opaque [`Backend::Guard`] naming what the backend made
//!   (a znode path and the session it lives on); dropping the guard releases
//!   the lock in the background, so a holder that vanishes leaves nothing behind;
//! - every acquire carries a [`LostNotifier`] the backend keeps with the grant
//!   and fires when it can no longer guarantee it (session expiry, connection
//!   loss past the safety margin);
//! - all methods are cancel-safe: dropping a pending `acquire` withdraws the
//!   wait and undoes anything it created.
//!
//! Static dispatch on the hot path: the engine is generic over `B: Backend`.

#[cfg(feature = "etcd")]
pub mod etcd;
pub mod memory;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(any(feature = "zookeeper", feature = "etcd", feature = "postgres", feature = "redis"))]
mod version_record;
#[cfg(feature = "zookeeper")]
pub mod zookeeper;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use clastor_protocol::{KindLayout, KindMode, LockMode, LostReason, RotationProgress, Status};
use thiserror::Error;

use crate::key::LockKey;

/// What a backend can fail with. Contention is not an error: an acquire that
/// does not get the lock in time returns `Ok(None)`.
#[derive(Debug, Clone, Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The backend cannot be reached, or lost its session mid-operation; the
    /// caller may retry.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// The backend does not support what was asked (e.g. shared mode).
    #[error("not supported by this backend: {0}")]
    Unsupported(String),
    /// The backend is closed (server shutting down).
    #[error("backend is shut down")]
    Closed,
    /// The backend answered something that should not happen.
    #[error("backend error: {0}")]
    Internal(String),
}

impl BackendError {
    /// The single mapping from backend errors to wire status codes.
    pub fn status(&self) -> Status {
        match self {
            BackendError::Unavailable(_) => Status::Unavailable,
            BackendError::Unsupported(_) => Status::Unsupported,
            BackendError::Closed => Status::ShuttingDown,
            BackendError::Internal(_) => Status::Internal,
        }
    }
}

/// A successful acquire.
#[derive(Debug)]
pub struct Grant<G> {
    /// Fencing token: strictly greater than every token granted before for
    /// this key, by any server, across restarts.
    pub token: u64,
    /// The kind's version the lock was taken under.
    pub version: Arc<str>,
    /// Backend handle for the grant; dropping it releases the lock.
    pub guard: G,
}

/// A kind's version and mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KindVersion {
    /// Current version name (`v1`).
    pub version: Arc<str>,
    /// Normal, or draining for a rotation.
    pub mode: KindMode,
    /// While draining: the rotation's target and deadline.
    pub rotation: Option<RotationTarget>,
    /// How the kind's locks are laid out under `version` (whether it takes
    /// shared locks). Backends with one layout for every kind
    /// ([`Backend::fixed_layout`]) leave the default here; the engine
    /// reports theirs.
    pub layout: KindLayout,
}

/// What a draining kind is being rotated to, stored with its mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationTarget {
    /// The version the kind moves to.
    pub to: Arc<str>,
    /// When the drain times out, in ms since the Unix epoch (wall clock, so
    /// every server reads it the same way; skew only moves when an abandoned
    /// rotation is aborted, never whether a grant is safe).
    pub deadline_unix_ms: u64,
    /// The layout the kind gets at `to`.
    pub layout: KindLayout,
}

impl KindVersion {
    /// A kind in normal mode at `version`.
    pub fn normal(version: impl Into<Arc<str>>) -> KindVersion {
        KindVersion {
            version: version.into(),
            mode: KindMode::Normal,
            rotation: None,
            layout: KindLayout::Mutex,
        }
    }

    /// The same, with `layout`.
    pub fn with_layout(mut self, layout: KindLayout) -> KindVersion {
        self.layout = layout;
        self
    }

    /// Time left before the drain deadline (zero once passed; `None` when
    /// not draining).
    pub fn drain_left(&self) -> Option<Duration> {
        let r = self.rotation.as_ref()?;
        Some(Duration::from_millis(r.deadline_unix_ms.saturating_sub(unix_ms())))
    }
}

/// What a `ROTATE from → to` makes of a kind's current state: the one rule
/// every backend applies before it marks anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RotationStart {
    /// Normal at `from`: mark it draining.
    Mark,
    /// Left draining from `from` to `to` by a driver that went away: take it over.
    Resume,
    /// Already switched from `from` to `to` (its driver died cleaning up).
    Switched,
    /// Anything else: refused, with why.
    Refuse(String),
}

impl KindVersion {
    /// The kind draining from `from` to `to` until `drain` from now, in the
    /// mutex layout before and after (see [`KindVersion::with_layouts`]).
    pub(crate) fn draining(from: &str, to: &str, drain: Duration) -> KindVersion {
        KindVersion {
            version: Arc::from(from),
            mode: KindMode::Draining,
            rotation: Some(RotationTarget {
                to: Arc::from(to),
                deadline_unix_ms: unix_ms().saturating_add(u64::try_from(drain.as_millis()).unwrap_or(u64::MAX)),
                layout: KindLayout::Mutex,
            }),
            layout: KindLayout::Mutex,
        }
    }

    /// The kind back to normal on its current version and layout: what an
    /// aborted rotation leaves.
    #[cfg_attr(not(feature = "zookeeper"), allow(dead_code))]
    pub(crate) fn aborted(&self) -> KindVersion {
        KindVersion::normal(self.version.clone()).with_layout(self.layout)
    }

    /// The same kind in `layout` now and, if draining, `to_layout` after.
    pub(crate) fn with_layouts(mut self, layout: KindLayout, to_layout: KindLayout) -> KindVersion {
        self.layout = layout;
        if let Some(r) = &mut self.rotation {
            r.layout = to_layout;
        }
        self
    }

    /// How a `ROTATE from → to` of `kind` starts from this state; `previous`
    /// is the version the last completed rotation switched away from.
    pub(crate) fn rotation_start(&self, kind: &str, previous: Option<&str>, from: &str, to: &str) -> RotationStart {
        match (self.mode, &self.rotation) {
            (KindMode::Normal, _) if *self.version == *to && previous == Some(from) => RotationStart::Switched,
            (KindMode::Normal, _) if *self.version == *from => RotationStart::Mark,
            (KindMode::Draining, Some(r)) if *self.version == *from && *r.to == *to => RotationStart::Resume,
            (KindMode::Draining, Some(r)) if *self.version == *from => RotationStart::Refuse(format!(
                "{kind} is draining towards {} (a rotation left half-done); abort it first (clastor rotate --abort {kind})",
                r.to
            )),
            _ => RotationStart::Refuse(format!(
                "{kind} is at version {} ({}), not {from}",
                self.version,
                self.mode.name()
            )),
        }
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A request to rotate a kind (PROTOCOL.md, "Version rotation").
pub struct RotateRequest<'a> {
    /// The kind (a validated name).
    pub kind: &'a Arc<str>,
    /// The version the kind must be at (validated).
    pub from: &'a str,
    /// The version to move to (validated, not `from`).
    pub to: &'a str,
    /// How long the drain may take before the rotation aborts.
    pub drain_timeout: Duration,
    /// The layout `to` gets; `None`: the layout `from` has.
    pub layout: Option<KindLayout>,
    /// Called with progress while the rotation runs; must not block.
    pub progress: &'a (dyn Fn(RotationProgress) + Send + Sync),
}

impl fmt::Debug for RotateRequest<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RotateRequest")
            .field("kind", &self.kind)
            .field("from", &self.from)
            .field("to", &self.to)
            .field("drain_timeout", &self.drain_timeout)
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

/// How a rotation ended, when the backend could carry it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RotateOutcome {
    /// The kind is at `to`, normal, and the old subtree is gone.
    Completed {
        /// How long the drain took.
        drained: Duration,
        /// Nodes left under the old version that could not be deleted.
        leftover: u32,
    },
    /// Not started: the kind is not at `from`, or another rotation of it is
    /// running or half-done with another target. The message says which.
    Refused(String),
    /// Given up (drain timeout, or aborted by someone); the kind is normal on
    /// `from`. The message says why and what remained.
    Aborted(String),
}

/// What a backend says of its own health: for readiness checks, metrics and
/// the status page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendHealth {
    /// Whether it can grant locks now (ZooKeeper: at least one session is
    /// connected and in proven contact with the leader).
    pub ready: bool,
    /// One line on why (not) ready.
    pub detail: String,
    /// Its sessions, for backends that have them (one per pool slot).
    pub sessions: Vec<SessionHealth>,
}

/// One backend session (a ZooKeeper session of the pool).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionHealth {
    /// Pool slot.
    pub slot: usize,
    /// The backend's id for it (`0x…`); empty while the slot reconnects.
    pub id: String,
    /// `connected`, `disconnected`, `lost` or `reconnecting`.
    pub state: &'static str,
    /// Connected and in proven contact: new grants may go through it.
    pub trusted: bool,
    /// Grants made through it and still held.
    pub grants: usize,
    /// Time since the send time of its last answered request.
    pub last_contact: Option<Duration>,
    /// Round trip of its last answered liveness probe (ZooKeeper: a `sync`).
    pub last_probe: Option<Duration>,
    /// Requests answered through it (retries of one request count once).
    pub requests: u64,
    /// Their total time, from first send to answer.
    pub request_time: Duration,
}

/// Everything an acquire needs to know.
#[derive(Debug)]
pub struct AcquireRequest<'a> {
    /// The lock.
    pub key: &'a LockKey,
    /// How long to wait; zero tries once.
    pub wait: Duration,
    /// Requested mode.
    pub mode: LockMode,
    /// Engine-wide id of the owning session (for diagnostics in backend data).
    pub owner: u64,
    /// To be fired if the grant is later lost.
    pub on_lost: LostNotifier,
}

/// Called by a backend, at most once, when a grant it made can no longer be
/// guaranteed. Firing it for a grant that was already released is harmless.
///
/// Call it without holding any lock that dropping a [`Backend::Guard`] takes:
/// the engine drops the lost grant's guard inside.
pub struct LostNotifier(Box<dyn FnOnce(LostReason) + Send + Sync>);

impl LostNotifier {
    /// Wraps a callback.
    pub fn new(f: impl FnOnce(LostReason) + Send + Sync + 'static) -> LostNotifier {
        LostNotifier(Box::new(f))
    }

    /// A notifier that does nothing (for grants nobody needs to hear about).
    pub fn noop() -> LostNotifier {
        LostNotifier::new(|_| {})
    }

    /// Reports the grant lost.
    pub fn notify(self, reason: LostReason) {
        (self.0)(reason);
    }
}

impl fmt::Debug for LostNotifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LostNotifier")
    }
}

/// A coordination backend.
pub trait Backend: Send + Sync + 'static {
    /// Backend state for one grant. Dropping it must release the lock (in the
    /// background if that needs I/O); [`Backend::release`] is the awaited path.
    type Guard: Send + Sync + 'static;

    /// Short name for logs and `INFO` (`memory`, `zookeeper`).
    fn name(&self) -> &'static str;

    /// Takes the lock for `req.key`, waiting up to `req.wait` in FIFO order
    /// behind earlier waiters. `Ok(None)` means not granted in time.
    ///
    /// # Cancellation safety
    /// Dropping the future withdraws the wait and leaves nothing behind: no
    /// queue entry, no node, no grant.
    ///
    /// # Errors
    /// [`BackendError::Unavailable`] if the backend cannot be reached or its
    /// session was lost while waiting; [`BackendError::Unsupported`] for a mode
    /// it does not offer; [`BackendError::Closed`] after shutdown.
    fn acquire(
        &self,
        req: AcquireRequest<'_>,
    ) -> impl Future<Output = Result<Option<Grant<Self::Guard>>, BackendError>> + Send;

    /// Releases a grant. Idempotent with respect to a grant the backend already
    /// considers gone (expired session): that is `Ok`.
    ///
    /// # Cancellation safety
    /// Dropping the future still releases the lock (in the background).
    ///
    /// # Errors
    /// [`BackendError::Unavailable`] if the release could not be confirmed; the
    /// backend keeps trying, and the lock vanishes with its session at worst.
    fn release(&self, guard: Self::Guard) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Whether anyone (through any server) holds the lock now. Used to tell a
    /// harmless release of a free lock from a release of someone else's.
    ///
    /// # Cancellation safety
    /// Read-only; safe to drop.
    ///
    /// # Errors
    /// [`BackendError::Unavailable`] if the backend cannot be reached.
    fn is_held(&self, key: &LockKey) -> impl Future<Output = Result<bool, BackendError>> + Send;

    /// Rotates a kind to a new version, draining the old one first
    /// (PROTOCOL.md, "Version rotation"): claims the kind's rotation, marks it
    /// draining, waits (reporting progress) until no lock remains under
    /// `from` or the drain times out, then switches to `to` and deletes the
    /// old subtree — or aborts back to normal on `from`.
    ///
    /// # Cancellation safety
    /// Dropping the future stops driving the rotation and gives up its claim:
    /// the kind stays as it is (draining, or switched but not cleaned up),
    /// and the same rotation sent again resumes it; an abandoned drain is
    /// aborted by the first acquire that waits on it past its deadline.
    ///
    /// # Errors
    /// [`BackendError::Unavailable`] if the backend cannot be reached or its
    /// session is lost mid-way; [`BackendError::Closed`] after shutdown.
    fn rotate(&self, req: RotateRequest<'_>) -> impl Future<Output = Result<RotateOutcome, BackendError>> + Send;

    /// Aborts a kind's rotation: a draining kind goes back to normal on its
    /// current version, and the running rotation (on any server) ends
    /// aborted. Returns the kind's version afterwards and whether a rotation
    /// was aborted (false: the kind was not draining).
    ///
    /// # Cancellation safety
    /// One atomic write; safe to drop.
    ///
    /// # Errors
    /// [`BackendError::Unavailable`] if the backend cannot be reached.
    fn abort_rotation(&self, kind: &Arc<str>)
    -> impl Future<Output = Result<(KindVersion, bool), BackendError>> + Send;

    /// Lock entries (holders and waiters) of `kind` under `version`: a
    /// rotation's drain progress, for `VERSION`.
    ///
    /// # Cancellation safety
    /// Read-only; safe to drop.
    ///
    /// # Errors
    /// [`BackendError::Unavailable`] if the backend cannot be reached.
    fn count_locks(&self, kind: &Arc<str>, version: &str) -> impl Future<Output = Result<u32, BackendError>> + Send;

    /// The kind's current version and mode.
    ///
    /// # Cancellation safety
    /// Read-only (a kind never used reads as `v1`, normal, without writing
    /// anything); safe to drop.
    ///
    /// # Errors
    /// [`BackendError::Unavailable`] if the backend cannot be reached.
    fn version(&self, kind: &str) -> impl Future<Output = Result<KindVersion, BackendError>> + Send;

    /// The kind's version and mode as this server last saw them, without
    /// asking the store; `None` if it has not looked at the kind lately.
    /// For messages and listings only, never the ground for a grant: it
    /// may be stale by the time it is read.
    fn cached_version(&self, kind: &str) -> Option<KindVersion>;

    /// The one layout every kind of this backend has, or `None` if each kind
    /// has its own ([`KindVersion::layout`], changed by a rotation). The
    /// default: the mutex layout (exclusive locks only).
    fn fixed_layout(&self) -> Option<KindLayout> {
        Some(KindLayout::Mutex)
    }

    /// Until when the backend guarantees that nobody else is granted the lock
    /// `guard` holds, on this process's clock (safe-until; PROTOCOL.md,
    /// "Safe-until"). `None`: the backend sets no bound of its own (the memory
    /// backend: nobody else can be granted it while this process lives).
    fn safe_until(&self, guard: &Self::Guard) -> Option<tokio::time::Instant> {
        let _ = guard;
        None
    }

    /// How often holders should confirm their safe-until to keep it ahead of
    /// them; `None`: no preference of the backend's.
    fn confirm_interval(&self) -> Option<Duration> {
        None
    }

    /// Whether the backend can grant now, and its sessions' state. The
    /// default: always ready, no sessions (a backend in this process).
    fn health(&self) -> BackendHealth {
        BackendHealth {
            ready: true,
            detail: format!("{} backend", self.name()),
            sessions: Vec::new(),
        }
    }

    /// Backend-specific `name → value` pairs for `INFO` (sessions, health).
    fn info(&self) -> Vec<(String, String)>;

    /// Closes the backend: every grant is released, later calls fail with
    /// [`BackendError::Closed`].
    fn shutdown(&self) -> impl Future<Output = ()> + Send;
}
