//! Resource kinds in ZooKeeper: each kind's version node (version and mode),
//! the nodes above the lock directories, two caches that let the hot path
//! skip work, and each session's *watched* versions, which let it skip the
//! version read.
//!
//! The caches are hints. A lock directory that was reaped since it was
//! cached fails the create with `NoNode`, and is created again; a stale
//! cached version is caught after the create (below). Read paths never
//! write: a missing version node reads as `v1`/normal.
//!
//! **Watched versions.** An acquire must know the kind's version and mode as
//! of its own create (the rotation argument, `rotation.rs`). The cold way is
//! a read of the version node pipelined behind the create on the same
//! session. The warm way costs nothing: when a session reads the version
//! node it leaves a one-shot data watch there, and as long as that watch has
//! not fired, the version it read is still the version — and still as of any
//! later create on that session, because ZooKeeper delivers a session's watch
//! events in order with its replies (a change committed before our create
//! fires the watch, and the event reaches us before the create's reply;
//! `zookeeper_client` hands the event to the watcher before it completes the
//! reply, so polling the watcher once the reply is in sees it). A fired
//! watch (a change, or the session's end) makes the next acquire read again
//! and watch anew. One-shot watches survive reconnections (the client sets
//! them again, and the server fires those whose node changed meanwhile).

use std::sync::Arc;

use std::future::Future;
use std::pin::Pin;

use clastor_protocol::KindMode;
use dashmap::{DashMap, DashSet};
use futures_util::FutureExt as _;
use futures_util::future::{join, join_all};
use tokio::time::Instant;
use tracing::{debug, warn};
use zookeeper_client::{OneshotWatcher, WatchedEvent};

use super::error::{ZkError, ZkResult, map_err};
use super::layout::{self, Layout};
use super::session::{MAX_ATTEMPTS, ZkSession};
use crate::backend::{BackendError, KindVersion};

/// Sleeps until `at`, or forever when there is no such instant.
async fn sleep_until_or_never(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Bounds of the caches: cleared when full (cheap, and a miss only costs a
/// pipelined request or a read).
const MAX_CACHED_KINDS: usize = 1024;
const MAX_CACHED_DIRS: usize = 4096;

/// The kinds' nodes and caches, under one layout.
#[derive(Debug)]
pub(super) struct Kinds {
    layout: Layout,
    versions: DashMap<Arc<str>, KindVersion>,
    dirs: DashSet<String>,
    /// Per (session id, kind): the version read with a watch still unfired.
    watched: DashMap<(i64, Arc<str>), Watched>,
}

/// A version read with a one-shot watch that vouches for it until it fires.
struct Watched {
    version: KindVersion,
    /// The watch's event, polled without waiting (behind a mutex only to be
    /// `Sync`; `get` holds only a shared lock on the map's shard); `None`
    /// once it has fired. Two acquires may look at once: the one that sees
    /// it fire removes the entry, and the other must not poll the finished
    /// future in between (an `async fn` panics when resumed after completion).
    fired: std::sync::Mutex<FiredSlot>,
}

impl std::fmt::Debug for Watched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watched")
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

type FiredSlot = Option<Pin<Box<dyn Future<Output = WatchedEvent> + Send>>>;

/// Whether the watch in `slot` has fired, polling it without waiting; a
/// finished future is dropped, never polled again.
fn has_fired(slot: &mut FiredSlot) -> bool {
    if let Some(fut) = slot.as_mut()
        && fut.as_mut().now_or_never().is_none()
    {
        return false;
    }
    // It fired now or before.
    *slot = None;
    true
}

/// `Ok` when every create made its node or found it there.
fn all_made<T>(results: Vec<ZkResult<T>>) -> ZkResult<()> {
    results.into_iter().try_for_each(|r| match r {
        Ok(_) | Err(ZkError::NodeExists) => Ok(()),
        Err(e) => Err(e),
    })
}

impl Kinds {
    pub(super) fn new(layout: Layout) -> Kinds {
        Kinds {
            layout,
            versions: DashMap::new(),
            dirs: DashSet::new(),
            watched: DashMap::new(),
        }
    }

    /// The kind's version as `session`'s watch vouches for it now (see the
    /// module docs): `None` if the session has no watch on it, or the watch
    /// fired — then the caller reads the version node again.
    pub(super) fn watched(&self, session: &ZkSession, kind: &Arc<str>) -> Option<KindVersion> {
        let key = (session.session_id(), Arc::clone(kind));
        let entry = self.watched.get(&key)?;
        let fired = match entry.fired.lock() {
            Ok(mut slot) => has_fired(&mut slot),
            // A panic while polling: trust nothing.
            Err(_) => true,
        };
        if fired {
            drop(entry);
            self.watched.remove(&key);
            return None;
        }
        Some(entry.version.clone())
    }

    /// Remembers a version read with a watch on `session`.
    pub(super) fn install(&self, session: &ZkSession, kind: &Arc<str>, version: &KindVersion, watch: OneshotWatcher) {
        if self.watched.len() >= MAX_CACHED_KINDS {
            // Dropping a watcher unregisters it.
            self.watched.clear();
        }
        self.remember(kind, version);
        self.watched.insert(
            (session.session_id(), Arc::clone(kind)),
            Watched {
                version: version.clone(),
                fired: std::sync::Mutex::new(Some(Box::pin(watch.changed()))),
            },
        );
    }

    /// Reads the kind's version node with a watch and installs it for
    /// `session` (creating the node as `v1`/normal if the kind is new).
    ///
    /// # Errors
    /// As [`Kinds::read_version`].
    pub(super) async fn read_and_watch(
        &self,
        session: &ZkSession,
        kind: &Arc<str>,
    ) -> Result<KindVersion, BackendError> {
        let path = self.layout.version_path(kind);
        let node = path.as_str();
        for _ in 0..MAX_ATTEMPTS {
            match session
                .retry(|c| async move { c.get_and_watch_data(node).await })
                .await?
            {
                Ok((data, _, watch)) => {
                    let v = layout::decode_version(&data).map_err(BackendError::Internal)?;
                    self.install(session, kind, &v, watch);
                    return Ok(v);
                }
                Err(ZkError::NoNode) => self.ensure_kind(session, kind).await?,
                Err(e) => return Err(map_err("read version node", e)),
            }
        }
        Err(BackendError::Unavailable(format!("could not read {path}")))
    }

    pub(super) fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The kind's version as last seen, if cached.
    pub(super) fn cached(&self, kind: &str) -> Option<KindVersion> {
        self.versions.get(kind).map(|v| v.clone())
    }

    /// Caches what a read of the kind's version node returned.
    pub(super) fn remember(&self, kind: &Arc<str>, v: &KindVersion) {
        if self.versions.len() >= MAX_CACHED_KINDS && !self.versions.contains_key(&**kind) {
            self.versions.clear();
        }
        self.versions.insert(Arc::clone(kind), v.clone());
    }

    /// Whether the lock directory was seen to exist.
    pub(super) fn dir_known(&self, dir: &str) -> bool {
        self.dirs.contains(dir)
    }

    /// Caches that the lock directory exists.
    pub(super) fn remember_dir(&self, dir: &str) {
        if self.dirs.contains(dir) {
            return;
        }
        if self.dirs.len() >= MAX_CACHED_DIRS {
            self.dirs.clear();
        }
        self.dirs.insert(dir.to_owned());
    }

    /// Forgets a lock directory that turned out to be gone.
    pub(super) fn forget_dir(&self, dir: &str) {
        self.dirs.remove(dir);
    }

    /// Pre-creates the root and provider nodes (at connect, to fail early on
    /// a bad root or missing permissions).
    ///
    /// # Errors
    /// `Unavailable` or `Internal` with ZooKeeper's reason.
    pub(super) async fn ensure_base(&self, session: &ZkSession) -> Result<(), BackendError> {
        let layout = &self.layout;
        let persistent = &layout.nodes().persistent();
        session
            .retry(|c| async move {
                let creates = layout.ancestors().into_iter().map(|a| c.create(a, &[], persistent));
                all_made(join_all(creates).await)
            })
            .await?
            .map_err(|e| map_err(&format!("create {}", layout.base()), e))
    }

    /// With credentials (a secured layout), warns if the base node is open
    /// to anyone: it was created before them (or by another client), and
    /// so, most likely, are kinds and version nodes under it, which stay
    /// world-writable — ACLs are set at creation only.
    pub(super) async fn warn_if_open(&self, session: &ZkSession) {
        if !self.layout.nodes().is_secured() {
            return;
        }
        let base = self.layout.base();
        let Ok(client) = session.client() else { return };
        match client.get_acl(base).await {
            Ok((acls, _)) if layout::open_to_anyone(&acls) => tracing::warn!(
                base,
                "the ZooKeeper base node is open to anyone (world:anyone may write, create or delete): it \
                 was created without --zk-digest-file, and nodes made before it keep their open ACLs; \
                 set ACLs by hand (setAcl) or move the kinds to a new root"
            ),
            Ok(_) => {}
            Err(e) => tracing::debug!(base, error = %e, "cannot read the base node's ACL"),
        }
    }

    /// Creates the root, provider and kind nodes and the version node (as
    /// `v1`/normal) where missing, pipelined.
    pub(super) async fn ensure_kind(&self, session: &ZkSession, kind: &str) -> Result<(), BackendError> {
        let layout = &self.layout;
        let (kind_path, version_path) = (layout.kind_path(kind), layout.version_path(kind));
        let (kind_path, version_path) = (kind_path.as_str(), version_path.as_str());
        let initial = layout::encode_version(&layout::initial_version());
        let initial = initial.as_slice();
        let persistent = &layout.nodes().persistent();
        session
            .retry(|c| async move {
                let mut creates: Vec<_> = layout
                    .ancestors()
                    .into_iter()
                    .map(|a| c.create(a, &[], persistent))
                    .collect();
                creates.push(c.create(kind_path, &[], persistent));
                creates.push(c.create(version_path, initial, persistent));
                all_made(join_all(creates).await)
            })
            .await?
            .map_err(|e| map_err("create kind nodes", e))
    }

    /// Creates the version and lock directories (containers), and the kind's
    /// nodes if they are missing too. Both creates go out back-to-back.
    ///
    /// # Errors
    /// `Unavailable` or `Internal` with ZooKeeper's reason; `Internal` if the
    /// directories keep vanishing.
    pub(super) async fn ensure_parents(
        &self,
        session: &ZkSession,
        kind: &str,
        version: &str,
        dir: &str,
    ) -> Result<(), BackendError> {
        let version_dir = self.layout.version_dir(kind, version);
        let version_dir = version_dir.as_str();
        let container = &self.layout.nodes().container();
        for _ in 0..MAX_ATTEMPTS {
            let made = session
                .retry(|c| async move {
                    let (outer, inner) =
                        join(c.create(version_dir, &[], container), c.create(dir, &[], container)).await;
                    match (outer, inner) {
                        (_, Ok(_) | Err(ZkError::NodeExists)) => Ok(true),
                        // The kind's own nodes are missing.
                        (Err(ZkError::NoNode), _) => Ok(false),
                        (_, Err(e)) => Err(e),
                    }
                })
                .await?;
            match made {
                Ok(true) => return Ok(()),
                Ok(false) => self.ensure_kind(session, kind).await?,
                // The version directory was reaped between the two creates.
                Err(ZkError::NoNode) => {}
                Err(e) => return Err(map_err("create lock directory", e)),
            }
        }
        Err(BackendError::Internal(format!(
            "could not create {dir} after {MAX_ATTEMPTS} attempts"
        )))
    }

    /// The kind's version for an acquire: as this session's watch vouches
    /// for it, or cached, or read with a watch (creating the version node if
    /// the kind is new).
    ///
    /// # Errors
    /// As [`Kinds::read_version`].
    pub(super) async fn for_acquire(&self, session: &ZkSession, kind: &Arc<str>) -> Result<KindVersion, BackendError> {
        if let Some(v) = self.watched(session, kind).or_else(|| self.cached(kind)) {
            return Ok(v);
        }
        self.read_and_watch(session, kind).await
    }

    /// Reads a kind's version node, without writing anything: a missing one
    /// reads as `v1`/normal.
    ///
    /// # Errors
    /// `Unavailable` if ZooKeeper cannot be reached; `Internal` if the node
    /// holds something unreadable.
    pub(super) async fn read_version(&self, session: &ZkSession, kind: &Arc<str>) -> Result<KindVersion, BackendError> {
        let path = self.layout.version_path(kind);
        let node = path.as_str();
        match session.retry(|c| async move { c.get_data(node).await }).await? {
            Ok((data, _)) => {
                let v = layout::decode_version(&data).map_err(BackendError::Internal)?;
                self.remember(kind, &v);
                Ok(v)
            }
            Err(ZkError::NoNode) => Ok(layout::initial_version()),
            Err(e) => Err(map_err("read version node", e)),
        }
    }

    /// Waits until the kind is back to normal mode (a rotation finished or
    /// aborted); `None` at the deadline.
    ///
    /// A drain whose deadline has passed while nobody holds the kind's
    /// rotation claim (its driver was killed, or its server died) is aborted
    /// here, back to normal on the version it drained — conditioned on the
    /// version node's data version, so it cannot undo a switch or a resume
    /// that got there first.
    ///
    /// # Errors
    /// As [`Kinds::read_version`], and [`ZkSession::gone`] if the session is
    /// lost while waiting.
    pub(super) async fn wait_normal(
        &self,
        session: &ZkSession,
        kind: &Arc<str>,
        deadline: Instant,
    ) -> Result<Option<KindVersion>, BackendError> {
        let path = self.layout.version_path(kind);
        let node = path.as_str();
        loop {
            let watched = session
                .retry(|c| async move { c.get_and_watch_data(node).await })
                .await?;
            let (data, stat, watcher) = match watched {
                Ok(found) => found,
                Err(ZkError::NoNode) if Instant::now() < deadline => {
                    self.ensure_kind(session, kind).await?;
                    continue;
                }
                Err(ZkError::NoNode) => return Ok(None),
                Err(e) => return Err(map_err("watch version node", e)),
            };
            let stat = stat.version;
            let v = layout::decode_version(&data).map_err(BackendError::Internal)?;
            self.remember(kind, &v);
            if v.mode == KindMode::Normal {
                return Ok(Some(v));
            }
            debug!(%kind, version = %v.version, "kind is draining; waiting");
            let changed = watcher.changed();
            tokio::pin!(changed);
            if Instant::now() >= deadline {
                // A try-once (or a wait already over) never aborts an
                // abandoned drain: only an acquire that waits does
                // (PROTOCOL.md, "Version rotation"), so a try-once can never
                // be granted under the version being drained.
                return Ok(None);
            }
            let abandoned_at = v.drain_left().map(|left| Instant::now() + left);
            tokio::select! {
                // Checked in this order: when the wait and the drain run out
                // together, the wait ends without aborting anything.
                biased;
                _ = &mut changed => continue,
                () = tokio::time::sleep_until(deadline) => return Ok(None),
                () = sleep_until_or_never(abandoned_at) => {}
                () = session.retired() => return Err(session.gone()),
            }
            // The drain deadline passed: abort it unless a driver is still
            // at work (it aborts by itself; clocks may differ).
            let claim = self.layout.rotation_path(kind);
            let claim = claim.as_str();
            match session
                .retry(|c| async move { c.check_and_watch_stat(claim).await })
                .await?
                .map_err(|e| map_err("check rotation claim", e))?
            {
                (None, _) => {
                    let normal = v.aborted();
                    let bytes = layout::encode_version(&normal);
                    let bytes = bytes.as_slice();
                    let expected = stat;
                    match session
                        .retry(|c| async move { c.set_data(node, bytes, Some(expected)).await })
                        .await?
                    {
                        Ok(_) => {
                            warn!(%kind, version = %v.version, "drain deadline passed with no rotation driving it; aborted it");
                            self.remember(kind, &normal);
                        }
                        // Someone changed it first (or our write went through
                        // and its reply was lost): the loop reads again.
                        Err(ZkError::BadVersion) => {}
                        // Anything else (no permission to write, say) would
                        // only repeat: give up waiting.
                        Err(e) => return Err(map_err("abort an abandoned drain", e)),
                    }
                }
                (Some(_), claim_watch) => {
                    tokio::select! {
                        _ = &mut changed => {}
                        _ = claim_watch.changed() => {}
                        () = tokio::time::sleep_until(deadline) => return Ok(None),
                        () = session.retired() => return Err(session.gone()),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use zookeeper_client::EventType;

    use super::*;

    /// Two acquires can look at one version watch at once: once one has
    /// seen it fire, the other's look must say "fired" too, not resume the
    /// finished `async fn` (which panics).
    #[test]
    fn a_fired_version_watch_is_never_polled_again() {
        let fired = async { WatchedEvent::new(EventType::NodeDataChanged, "/locks/p/k/version") };
        let mut slot: FiredSlot = Some(Box::pin(fired));
        assert!(has_fired(&mut slot));
        assert!(slot.is_none());
        assert!(has_fired(&mut slot), "still fired, and no panic");

        let mut pending: FiredSlot = Some(Box::pin(std::future::pending()));
        assert!(!has_fired(&mut pending));
        assert!(!has_fired(&mut pending));
    }
}
