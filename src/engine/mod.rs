//! The lock engine: backend-independent lock semantics on top of a
//! [`Backend`]. Usable in-process ("library mode") or behind the server.
//!
//! The engine hands out [`Session`]s (one per connection or in-process owner)
//! and keeps a registry of them for server-wide listings and shutdown. All
//! per-lock state lives in the sessions; the engine itself only counts.
//!
//! `session` is a submodule because a session reads and updates the
//! engine's state (backend, limits, registry, counters) directly.

mod observer;
mod session;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use clastor_protocol::{DrainState, KindLayout, KindMode, RotationProgress, name};
use dashmap::DashMap;

pub use self::observer::{EngineObserver, HoldEnd};
use self::session::SessionState;
pub use self::session::{AcquireOptions, Granted, HeldInfo, LostEvent, LostEvents, Session, WaitInfo};
use crate::backend::{Backend, KindVersion, RotateOutcome, RotateRequest};
use crate::error::LockError;
use crate::key::validate_kind;

/// How long a rotation's drain may take when the request does not say.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Per-session limits. Defaults suit a server with thousands of connections.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Locks one session may hold at once.
    pub max_held_per_session: usize,
    /// Acquires one session may have waiting at once. A try-once (zero
    /// wait) never counts; an acquire with a wait past this limit is tried
    /// once, granted if the lock is free, refused with
    /// [`LockError::LimitExceeded`] only if it would have had to wait.
    pub max_waits_per_session: usize,
    /// Longest wait an acquire may ask for.
    pub max_wait: Duration,
    /// Longest lease an acquire or renew may ask for.
    pub max_lease: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_held_per_session: 1024,
            max_waits_per_session: 256,
            max_wait: Duration::from_secs(24 * 3600),
            max_lease: Duration::from_secs(24 * 3600),
        }
    }
}

/// One open session, for listings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// Engine-wide id (the connection id on the wire).
    pub id: u64,
    /// Its label (a connection's peer address).
    pub label: Arc<str>,
    /// The name its client gave (binary `HELLO`, HTTP `User-Agent`), if any.
    pub client: Option<Arc<str>>,
    /// Locks it holds.
    pub held: usize,
    /// Acquires it has waiting.
    pub waiting: usize,
}

/// The lock engine. Cheap to clone; clones share everything.
#[derive(Debug)]
pub struct Engine<B: Backend> {
    inner: Arc<EngineState<B>>,
}

impl<B: Backend> Clone for Engine<B> {
    fn clone(&self) -> Self {
        Engine {
            inner: self.inner.clone(),
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct EngineStats {
    pub(crate) sessions_opened: AtomicU64,
    pub(crate) granted: AtomicU64,
    pub(crate) not_granted: AtomicU64,
    pub(crate) released: AtomicU64,
    pub(crate) lost: AtomicU64,
    pub(crate) lease_expired: AtomicU64,
}

pub(crate) struct EngineState<B: Backend> {
    pub(crate) backend: B,
    pub(crate) config: EngineConfig,
    pub(crate) sessions: DashMap<u64, Weak<SessionState<B>>>,
    pub(crate) stats: EngineStats,
    pub(crate) observer: OnceLock<Arc<dyn EngineObserver>>,
    next_session: AtomicU64,
    next_grant: AtomicU64,
}

impl<B: Backend> std::fmt::Debug for EngineState<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineState")
            .field("backend", &self.backend.name())
            .field("config", &self.config)
            .field("sessions", &self.sessions.len())
            .finish_non_exhaustive()
    }
}

impl<B: Backend> EngineState<B> {
    pub(crate) fn next_grant_id(&self) -> u64 {
        self.next_grant.fetch_add(1, Ordering::Relaxed)
    }
}

impl<B: Backend> Engine<B> {
    /// An engine over `backend`.
    pub fn new(backend: B, config: EngineConfig) -> Engine<B> {
        Engine {
            inner: Arc::new(EngineState {
                backend,
                config,
                sessions: DashMap::new(),
                stats: EngineStats::default(),
                observer: OnceLock::new(),
                next_session: AtomicU64::new(1),
                next_grant: AtomicU64::new(1),
            }),
        }
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.inner.backend
    }

    /// The limits in force.
    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// Opens a session: an owner of locks. Everything it holds is released
    /// when it is closed, or when its last clone is dropped. Lost-lock events
    /// for its locks arrive on the returned [`LostEvents`].
    pub fn open_session(&self, label: impl Into<Arc<str>>) -> (Session<B>, LostEvents) {
        let id = self.inner.next_session.fetch_add(1, Ordering::Relaxed);
        self.inner.stats.sessions_opened.fetch_add(1, Ordering::Relaxed);
        Session::open(self.inner.clone(), id, label.into())
    }

    /// Attaches the observer told of every grant and end of a hold (the HTTP
    /// port's metrics). One per engine: `false` if one was attached already.
    pub fn set_observer(&self, observer: Arc<dyn EngineObserver>) -> bool {
        self.inner.observer.set(observer).is_ok()
    }

    /// Every open session: id, label, locks held, acquires waiting; by id.
    pub fn sessions(&self) -> Vec<SessionInfo> {
        let mut out: Vec<SessionInfo> = self
            .live_sessions()
            .iter()
            .map(|s| SessionInfo {
                id: s.id(),
                label: s.label().clone(),
                client: s.client().cloned(),
                held: s.held_len(),
                waiting: s.waiting().len(),
            })
            .collect();
        out.sort_by_key(|s| s.id);
        out
    }

    /// Every acquire waiting through this engine, up to `limit` entries, by
    /// key, then longest wait first: for each key the order they queued in.
    pub fn waiting_all(&self, limit: usize) -> Vec<WaitInfo> {
        let mut out: Vec<WaitInfo> = self.live_sessions().iter().flat_map(|s| s.waiting()).collect();
        out.sort_by(|a, b| a.key.cmp(&b.key).then(b.waited.cmp(&a.waited)));
        out.truncate(limit);
        out
    }

    /// Every lock held through this engine, up to `limit` entries, ordered by
    /// session then key.
    pub fn held_all(&self, limit: usize) -> Vec<HeldInfo> {
        let mut sessions = self.live_sessions();
        sessions.sort_by_key(|s| s.id());
        let mut out = Vec::new();
        for s in sessions {
            if out.len() >= limit {
                break;
            }
            let mut held = s.held();
            held.truncate(limit - out.len());
            out.extend(held);
        }
        out
    }

    /// A kind's current version and mode.
    ///
    /// # Errors
    /// [`LockError::InvalidName`] for a bad kind; backend failures.
    pub async fn version(&self, kind: &str) -> Result<KindVersion, LockError> {
        let kind = validate_kind(kind)?;
        Ok(self.with_fixed_layout(self.inner.backend.version(&kind).await?))
    }

    /// `v` with the backend's layout, for a backend with one for every kind.
    fn with_fixed_layout(&self, v: KindVersion) -> KindVersion {
        match self.inner.backend.fixed_layout() {
            Some(layout) => v.with_layouts(layout, layout),
            None => v,
        }
    }

    /// A kind's version and mode and, while it drains, its rotation's target,
    /// the locks left under the current version and the time left.
    ///
    /// # Errors
    /// [`LockError::InvalidName`] for a bad kind; backend failures.
    pub async fn version_detail(&self, kind: &str) -> Result<(KindVersion, Option<DrainState>), LockError> {
        let kind = validate_kind(kind)?;
        let backend = &self.inner.backend;
        let v = self.with_fixed_layout(backend.version(&kind).await?);
        let drain = match (&v.rotation, v.mode) {
            (Some(r), KindMode::Draining) => Some(DrainState {
                to: r.to.to_string(),
                remaining: backend.count_locks(&kind, &v.version).await?,
                left_ms: v
                    .drain_left()
                    .map_or(0, |d| u32::try_from(d.as_millis()).unwrap_or(u32::MAX)),
            }),
            _ => None,
        };
        Ok((v, drain))
    }

    /// Rotates `kind` from `from` to `to` (PROTOCOL.md, "Version rotation"),
    /// calling `progress` as it goes. A zero `drain_timeout` means
    /// [`DEFAULT_DRAIN_TIMEOUT`]. `to` keeps the layout `from` has.
    ///
    /// # Errors
    /// [`LockError::InvalidName`] for a bad kind or version name,
    /// [`LockError::InvalidArgument`] if `from` = `to` or the timeout exceeds
    /// the longest wait, [`LockError::RotationRefused`] (also for a layout
    /// the backend does not have), [`LockError::RotationAborted`], and
    /// backend failures.
    pub async fn rotate(
        &self,
        kind: &str,
        from: &str,
        to: &str,
        drain_timeout: Duration,
        progress: &(dyn Fn(RotationProgress) + Send + Sync),
    ) -> Result<(Duration, u32), LockError> {
        self.rotate_to_layout(kind, from, to, None, drain_timeout, progress)
            .await
    }

    /// [`Engine::rotate`], giving `to` the layout `layout` (`None`: the one
    /// `from` has): the one way to move a kind between the mutex and the
    /// read-write layout (PROTOCOL.md, "Layouts").
    ///
    /// # Errors
    /// As [`Engine::rotate`].
    pub async fn rotate_to_layout(
        &self,
        kind: &str,
        from: &str,
        to: &str,
        layout: Option<KindLayout>,
        drain_timeout: Duration,
        progress: &(dyn Fn(RotationProgress) + Send + Sync),
    ) -> Result<(Duration, u32), LockError> {
        let kind = validate_kind(kind)?;
        name::validate_version("from", from)?;
        name::validate_version("to", to)?;
        if from == to {
            return Err(LockError::InvalidArgument(format!("from and to are both {from}")));
        }
        if let (Some(want), Some(fixed)) = (layout, self.inner.backend.fixed_layout())
            && want != fixed
        {
            return Err(LockError::RotationRefused(format!(
                "the {} backend keeps every kind in the {} layout; it has no {} layout",
                self.inner.backend.name(),
                fixed.name(),
                want.name()
            )));
        }
        // A backend with one layout for every kind is told none.
        let layout = layout.filter(|_| self.inner.backend.fixed_layout().is_none());
        let max = self.inner.config.max_wait;
        let drain_timeout = if drain_timeout.is_zero() {
            DEFAULT_DRAIN_TIMEOUT.min(max)
        } else {
            drain_timeout
        };
        if drain_timeout > max {
            return Err(LockError::InvalidArgument(format!(
                "drain timeout {drain_timeout:?} exceeds the longest wait {max:?}"
            )));
        }
        // The observer hears of the drain once the backend first reports it.
        let started = std::sync::atomic::AtomicBool::new(false);
        let observed = |p: RotationProgress| {
            if !started.swap(true, Ordering::Relaxed)
                && let Some(o) = self.inner.observer.get()
            {
                o.rotation_started(&kind);
            }
            progress(p);
        };
        let req = RotateRequest {
            kind: &kind,
            from,
            to,
            drain_timeout,
            layout,
            progress: &observed,
        };
        let observer = self.inner.observer.get();
        let outcome = self.inner.backend.rotate(req).await;
        if let Some(o) = observer {
            let name = match &outcome {
                Ok(RotateOutcome::Completed { .. }) => "completed",
                Ok(RotateOutcome::Refused(_)) => "refused",
                Ok(RotateOutcome::Aborted(_)) => "aborted",
                Err(_) => "failed",
            };
            o.rotation_ended(&kind, name, started.load(Ordering::Relaxed));
        }
        match outcome? {
            RotateOutcome::Completed { drained, leftover } => Ok((drained, leftover)),
            RotateOutcome::Refused(m) => Err(LockError::RotationRefused(m)),
            RotateOutcome::Aborted(m) => Err(LockError::RotationAborted(m)),
        }
    }

    /// Aborts `kind`'s rotation; see [`Backend::abort_rotation`].
    ///
    /// # Errors
    /// [`LockError::InvalidName`] for a bad kind; backend failures.
    pub async fn rotate_abort(&self, kind: &str) -> Result<(KindVersion, bool), LockError> {
        let kind = validate_kind(kind)?;
        Ok(self.inner.backend.abort_rotation(&kind).await?)
    }

    /// Engine and backend counters as `name → value` pairs.
    pub fn info(&self) -> Vec<(String, String)> {
        let s = &self.inner.stats;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed).to_string();
        let mut out = vec![
            ("backend".to_owned(), self.inner.backend.name().to_owned()),
            ("sessions_open".to_owned(), self.inner.sessions.len().to_string()),
            ("sessions_opened".to_owned(), n(&s.sessions_opened)),
            ("locks_held".to_owned(), self.held_count().to_string()),
            ("acquires_granted".to_owned(), n(&s.granted)),
            ("acquires_not_granted".to_owned(), n(&s.not_granted)),
            ("releases".to_owned(), n(&s.released)),
            ("locks_lost".to_owned(), n(&s.lost)),
            ("leases_expired".to_owned(), n(&s.lease_expired)),
        ];
        out.extend(self.inner.backend.info());
        out
    }

    fn held_count(&self) -> usize {
        self.live_sessions().iter().map(|s| s.held_len()).sum()
    }

    /// Strong handles on every open session. Collected before use: dropping
    /// the last handle of a session inside a map iteration would deadlock on
    /// the session's own removal from the map.
    fn live_sessions(&self) -> Vec<Arc<SessionState<B>>> {
        self.inner.sessions.iter().filter_map(|e| e.value().upgrade()).collect()
    }

    /// Closes every open session (releasing their locks), then the backend.
    pub async fn shutdown(&self) {
        let sessions = self.live_sessions();
        futures_util::future::join_all(sessions.iter().map(|s| s.close())).await;
        self.inner.backend.shutdown().await;
    }
}
