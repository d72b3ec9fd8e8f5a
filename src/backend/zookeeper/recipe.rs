//! The lock recipe — Apache Curator's InterProcessMutex (and, for kinds in
//! the read-write layout, InterProcessReadWriteLock) protocol, pipelined —
//! as the ZooKeeper backend's [`Backend`] implementation. The create round
//! itself (send, then read the replies) is `round.rs`.
//!
//! Acquire, uncontended, is one network round trip. Warm — the session has a
//! view of the lock directory (`views.rs`: a persistent recursive watch) —
//! it is the `create` of an ephemeral-sequential node alone (its Stat
//! carries the czxid, our fencing token): the events that reach the session
//! before the create's reply bring the view up to date, and it says whether
//! our node is first. Cold, `create` and `list_children` of the lock
//! directory are sent back-to-back on one session — `zookeeper_client`
//! sends a request when the method is called, not when the future is
//! polled — and awaited together; ZooKeeper runs one session's requests in
//! order, so the listing contains our node and every predecessor. A cold
//! round for a directory used before also sends an `addWatch` first, which
//! establishes the view for next time. The holder's first watch on its node
//! costs no request: the view's (or, with views off, the listing's child
//! watch).
//!
//! The kind's version as of our create must be known too (rotation,
//! `rotation.rs`): on the warm path the session's unfired one-shot watch on
//! the version node vouches for it (see [`Kinds`]); on the cold path a
//! watched `get_data` of the version node goes out in the same round trip.
//! Either way a rotation that began before our create is seen, and the
//! acquire backs out.
//!
//! A lock directory not known to exist (a fresh id) is created in the same
//! round trip: on a miss in the directory cache ([`Kinds`]), container
//! `create`s of the version and lock directories go out just ahead of the
//! lock node's.
//!
//! Contended, a waiter watches only the closest contender ahead that
//! excludes it (no herd; `turn.rs`). Every node
//! made here is owned by a [`PendingNode`] until it is granted in a
//! [`ZkGuard`] or deleted (see [`super::nodes`]).

use std::sync::Arc;
use std::time::Duration;

use clastor_protocol::{KindLayout, KindMode, LockMode};
use futures_util::future::join;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::ZooKeeperBackend;
use super::error::{ZkError, connection_broke, map_err};
use super::layout;
use super::nodes::{self, Created, PendingNode, ZkGuard};
use super::round::Round;
use super::session::{GrantRecord, MAX_ATTEMPTS, ZkSession};
use super::turn::{Turn, wait_turn};
use super::views::{ChildWatch, DirView};
use super::watches::OwnWatch;
use crate::backend::{
    AcquireRequest, Backend, BackendError, BackendHealth, Grant, KindVersion, LostNotifier, RotateOutcome,
    RotateRequest,
};
use crate::key::LockKey;

/// Longest an acquire may overrun its wait while ZooKeeper does not answer.
const MAX_GRACE: Duration = Duration::from_secs(2);

/// Which session a lock's acquires start from (see [`super::pool::Pool::pick_for`]).
fn affinity(key: &LockKey) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    key.kind().hash(&mut hasher);
    key.id().hash(&mut hasher);
    hasher.finish()
}

fn far_deadline(wait: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(wait)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400))
}

impl Backend for ZooKeeperBackend {
    type Guard = ZkGuard;

    fn name(&self) -> &'static str {
        "zookeeper"
    }

    /// Takes the lock. Bounded by the wait plus a grace (a third of the
    /// session timeout, at most 2 s), even if ZooKeeper stops answering. A
    /// try-once (`wait` zero) uses only a connected session.
    ///
    /// # Cancellation safety
    /// Dropping the future withdraws the wait: the node (even one whose create
    /// reply had not arrived) is deleted in the background.
    ///
    /// # Errors
    /// `Unsupported` for shared mode on a kind in the mutex layout, `Closed`
    /// after shutdown, `Unavailable`
    /// when ZooKeeper cannot be reached (no connected session for a try-once;
    /// no answer within the wait plus the grace) or the session was lost
    /// while waiting.
    async fn acquire(&self, req: AcquireRequest<'_>) -> Result<Option<Grant<ZkGuard>>, BackendError> {
        let (key, wait) = (req.key, req.wait);
        let deadline = far_deadline(wait);
        let grace = (self.pool.negotiated_timeout() / 3).min(MAX_GRACE);
        let limit = deadline.checked_add(grace).unwrap_or(deadline);
        // Dropping the inner future on expiry cleans up like a cancellation.
        // Boxed: the acquire's state (a pipelined round of ZooKeeper calls, a
        // turn in the queue) is kilobytes, and unboxed it made every future
        // above it as big, copied at each level and for every request the
        // connection serves, not only acquires.
        let until = Box::pin(self.acquire_until(req, deadline));
        match tokio::time::timeout_at(limit, until).await {
            Ok(result) => result,
            Err(_) => Err(BackendError::Unavailable(format!(
                "ZooKeeper did not answer the acquire of {key} within its wait ({wait:?}) plus {grace:?}"
            ))),
        }
    }

    async fn release(&self, guard: ZkGuard) -> Result<(), BackendError> {
        // Boxed for the reason `acquire` is.
        Box::pin(guard.release()).await
    }

    /// Whether any contender node exists for `key` under the kind's current
    /// version (one round trip: version read and listing pipelined). Writes
    /// nothing: a missing version node means `v1`.
    async fn is_held(&self, key: &LockKey) -> Result<bool, BackendError> {
        let session = self.pool.pick()?;
        let layout = self.kinds.layout();
        let mut version = self
            .kinds
            .cached(key.kind())
            .map_or_else(|| Arc::from(layout::INITIAL_VERSION), |v| v.version);
        let version_path = layout.version_path(key.kind());
        let version_path = version_path.as_str();
        for _ in 0..MAX_ATTEMPTS {
            let dir = layout.lock_dir(key.kind(), &version, key.id());
            let dir = dir.as_str();
            let (read, list) = session
                .retry(|c| async move {
                    match join(c.get_data(version_path), c.list_children(dir)).await {
                        (Err(e), _) | (_, Err(e)) if connection_broke(&e) => Err(e),
                        pair => Ok(pair),
                    }
                })
                .await?
                .map_err(|e| map_err("check lock directory", e))?;
            let seen = match read {
                Ok((data, _)) => {
                    let seen = layout::decode_version(&data).map_err(BackendError::Internal)?;
                    self.kinds.remember(key.kind_arc(), &seen);
                    seen
                }
                // Never acquired through Clastor; a Curator or kazoo client
                // may still hold it under `v1`.
                Err(ZkError::NoNode) => layout::initial_version(),
                Err(e) => return Err(map_err("read version node", e)),
            };
            if seen.version != version {
                version = seen.version;
                continue;
            }
            return match list {
                Ok(children) => Ok(!layout::sorted_contenders(&children).is_empty()),
                Err(ZkError::NoNode) => Ok(false),
                Err(e) => Err(map_err("list lock directory", e)),
            };
        }
        Err(BackendError::Unavailable(format!("could not check {key}")))
    }

    async fn version(&self, kind: &str) -> Result<KindVersion, BackendError> {
        let kind = crate::key::validate_kind(kind).map_err(|e| BackendError::Internal(e.to_string()))?;
        let session = self.pool.pick()?;
        self.kinds.read_version(&session, &kind).await
    }

    fn cached_version(&self, kind: &str) -> Option<KindVersion> {
        self.kinds.cached(kind)
    }

    async fn rotate(&self, req: RotateRequest<'_>) -> Result<RotateOutcome, BackendError> {
        self.rotate_kind(req).await
    }

    async fn abort_rotation(&self, kind: &Arc<str>) -> Result<(KindVersion, bool), BackendError> {
        self.abort_kind_rotation(kind).await
    }

    async fn count_locks(&self, kind: &Arc<str>, version: &str) -> Result<u32, BackendError> {
        self.count_kind_locks(kind, version).await
    }

    fn safe_until(&self, guard: &ZkGuard) -> Option<Instant> {
        Some(guard.safe_until())
    }

    /// The pool's probe interval: a tenth of the session timeout, as often as
    /// contact is proven.
    fn confirm_interval(&self) -> Option<Duration> {
        Some(crate::backend::zookeeper::pool::probe_interval(
            self.pool.negotiated_timeout(),
        ))
    }

    fn fixed_layout(&self) -> Option<clastor_protocol::KindLayout> {
        // Each kind has its own, in its version node.
        None
    }

    fn health(&self) -> BackendHealth {
        self.pool.health()
    }

    fn info(&self) -> Vec<(String, String)> {
        let mut info = self.pool.info();
        info.push(("zk.base".to_owned(), self.kinds.layout().base().to_owned()));
        info
    }

    async fn shutdown(&self) {
        self.pool.shutdown().await;
    }
}

impl ZooKeeperBackend {
    /// The acquire proper: not granted (`Ok(None)`) after `deadline`.
    async fn acquire_until(
        &self,
        req: AcquireRequest<'_>,
        deadline: Instant,
    ) -> Result<Option<Grant<ZkGuard>>, BackendError> {
        let AcquireRequest {
            key,
            wait,
            mode,
            owner,
            on_lost,
        } = req;
        let started = Instant::now();
        let session = self.pool.pick_for(affinity(key), !wait.is_zero())?;
        let kind = key.kind_arc();
        let mut version = self.kinds.for_acquire(&session, kind).await?;
        let data = format!("clastor owner={owner}");
        let mut on_lost = Some(on_lost);
        loop {
            version = match self.settle_version(&session, kind, mode, version, deadline).await? {
                Some(v) => v,
                None => return Ok(None),
            };
            let dir = self.kinds.layout().lock_dir(kind, &version.version, key.id());
            let mut pending = PendingNode::new(&session, dir, layout::lock_name(version.layout, mode));
            let created = match self
                .create_round(&session, kind, &version, &mut pending, data.as_bytes())
                .await?
            {
                Round::Created(created) => created,
                Round::Moved(seen) => {
                    // The directory is gone because the kind moved on (a
                    // rotation deleted it): follow it rather than create the
                    // old directory again.
                    debug!(%key, from = %version.version, to = %seen.version, mode = seen.mode.name(), "kind version changed; following it");
                    self.kinds.remember(kind, &seen);
                    version = seen;
                    continue;
                }
            };
            if created.seen != version {
                // A rotation began (or finished) since we built the path: back
                // out and follow the version node.
                debug!(%key, from = %version.version, to = %created.seen.version, mode = created.seen.mode.name(), "kind version changed; backing out");
                self.kinds.remember(kind, &created.seen);
                pending.delete().await;
                version = created.seen;
                continue;
            }
            let path = pending.path().unwrap_or_default().to_owned();
            let Created {
                czxid,
                children,
                dir_watch,
                child_watch,
                dir_view,
                ..
            } = created;
            let (turn, armed) = wait_turn(&session, &pending, children, dir_view.as_deref(), deadline).await?;
            match turn {
                Turn::First => {}
                Turn::TimedOut => {
                    pending.delete().await;
                    debug!(%key, waited = ?started.elapsed(), "not granted in time");
                    return Ok(None);
                }
                Turn::NodeGone => {
                    warn!(%key, %path, "our waiting lock node was deleted from outside; queueing again");
                    continue;
                }
            }
            let Some(notifier) = on_lost.take() else {
                return Err(BackendError::Unavailable(format!(
                    "the lock node for {key} kept being deleted from outside"
                )));
            };
            let watches = HolderWatches {
                armed,
                dir_view,
                dir_watch,
                child_watch,
            };
            match hold(&session, key, pending, czxid, watches, notifier)? {
                Hold::Granted { token, guard } => {
                    debug!(%key, token, %path, waited = ?started.elapsed(), "granted");
                    return Ok(Some(Grant {
                        token,
                        version: version.version,
                        guard,
                    }));
                }
                Hold::DeletedAsGranted(notifier) => {
                    on_lost = Some(notifier);
                    warn!(%key, %path, "our lock node was deleted from outside as it was granted; queueing again");
                }
            }
        }
    }

    /// The version an acquire of `mode` can go on with: `version`, or what
    /// the kind settles on after a drain (`None`: the deadline passed
    /// first). A shared request on a mutex kind is refused at once —
    /// unless the kind drains towards the read-write layout: then it waits.
    async fn settle_version(
        &self,
        session: &ZkSession,
        kind: &Arc<str>,
        mode: LockMode,
        mut version: KindVersion,
        deadline: Instant,
    ) -> Result<Option<KindVersion>, BackendError> {
        loop {
            let rw_ahead = version
                .rotation
                .as_ref()
                .is_some_and(|r| r.layout == KindLayout::ReadWrite);
            if mode == LockMode::Shared && version.layout == KindLayout::Mutex && !rw_ahead {
                return Err(BackendError::Unsupported(format!(
                    "kind {kind} is in the mutex layout (Curator's InterProcessMutex), which has no shared locks; \
                     rotate it to the read_write layout to take them (clastor rotate {kind} {v} <new> --layout read_write)",
                    v = version.version
                )));
            }
            if version.mode == KindMode::Draining {
                match self.kinds.wait_normal(session, kind, deadline).await? {
                    Some(v) => version = v,
                    None => return Ok(None),
                }
            }
            if mode == LockMode::Shared && version.layout == KindLayout::Mutex {
                // The drain ended back on the mutex layout (aborted).
                continue;
            }
            return Ok(Some(version));
        }
    }
}

/// The watches a waiter or a fresh holder already has on its node (from
/// `create_round` and `wait_turn`), for the holder's watch to carry on.
struct HolderWatches {
    /// The watch a waiter set while it waited.
    armed: Option<OwnWatch>,
    /// The session's view of the directory (an uncontended grant).
    dir_view: Option<Arc<DirView>>,
    /// The child watch the create round's listing left.
    dir_watch: Option<OwnWatch>,
    /// Its count on the session's views, for the guard to end.
    child_watch: Option<ChildWatch>,
}

/// What became of a node whose turn came.
enum Hold {
    Granted {
        token: u64,
        guard: ZkGuard,
    },
    /// Deleted from outside as it was granted: queue again, with the
    /// notifier back.
    DeletedAsGranted(LostNotifier),
}

/// Our node's turn came: watch it as its holder, register the grant with
/// the session (which reports it lost with the session), and hand the node
/// to a guard — unless it was deleted from outside meanwhile.
fn hold(
    session: &Arc<ZkSession>,
    key: &LockKey,
    pending: PendingNode,
    czxid: i64,
    watches: HolderWatches,
    notifier: LostNotifier,
) -> Result<Hold, BackendError> {
    let token =
        u64::try_from(czxid).map_err(|_| BackendError::Internal(format!("lock node has a negative czxid {czxid}")))?;
    let path = pending.path().unwrap_or_default().to_owned();
    // From here on the held node is watched: a waiter's watch, set while it
    // waited, carries on; an uncontended grant watches through the
    // session's view of the directory, or keeps the child watch its create
    // round's listing left there.
    let HolderWatches {
        armed,
        dir_view,
        dir_watch,
        child_watch,
    } = watches;
    let (dir_watch, child_watch) = match (&armed, dir_view) {
        (None, Some(view)) => (Some(view.subscribe(pending.name())), None),
        (None, None) => (dir_watch, child_watch),
        (Some(_), _) => (None, None),
    };
    let done = CancellationToken::new();
    let gone = nodes::watch_own(session, &path, armed, dir_watch, done.clone());
    let record = GrantRecord {
        key: key.clone(),
        token,
        notifier,
    };
    if session.register(path.clone(), record).is_err() {
        return Err(session.gone());
    }
    // The watch cancels before it looks for a registered grant, so a
    // deletion it saw before the registration shows here.
    if gone.is_cancelled() {
        // The watch may already have reported it (its notifier is then
        // spent): fail now rather than wait in the queue again.
        let Some(record) = session.unregister(&path) else {
            return Err(BackendError::Unavailable(format!(
                "the lock node for {key} was deleted from outside as it was granted"
            )));
        };
        return Ok(Hold::DeletedAsGranted(record.notifier));
    }
    pending.into_granted();
    Ok(Hold::Granted {
        token,
        guard: ZkGuard::new(session.clone(), path, token, done, child_watch),
    })
}
