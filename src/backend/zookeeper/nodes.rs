//! Lock nodes and who owns them: a [`PendingNode`] from the moment its
//! `create` is sent until it is granted or withdrawn, then a [`ZkGuard`].
//!
//! Dropping either deletes the node in the background, so timeouts,
//! cancellations and lost replies leave nothing behind. A node whose create
//! reply was lost is found again by the uuid in its Curator-style name
//! ([`recover`], [`PendingNode`]'s drop).

use std::sync::Arc;
use std::time::Duration;

use clastor_protocol::LostReason;
use futures_util::future::{join, join3};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use uuid::Uuid;
use zookeeper_client::EventType;

use super::error::{ZkError, map_err};
use super::layout;
use super::session::ZkSession;
use super::views::{ChildWatch, DirView};
use super::watches::{OwnWatch, spawn_background};
use crate::backend::{BackendError, KindVersion};
use crate::backoff::Backoff;

/// A lock node that exists, as its create round saw it.
pub(super) struct Created {
    /// The node's `czxid`: the fencing token.
    pub(super) czxid: i64,
    /// The kind's version and mode, read after the create.
    pub(super) seen: KindVersion,
    /// The lock directory's children, listed after the create.
    pub(super) children: Vec<String>,
    /// The child watch that listing left on the directory (`None` after a
    /// recovery): a holder's first watch on its node, at no extra request.
    pub(super) dir_watch: Option<OwnWatch>,
    /// The count of that child watch on the session's views, for the
    /// holder's guard to end once its release's delete (which fires the
    /// watch) is confirmed.
    pub(super) child_watch: Option<ChildWatch>,
    /// The session's view of the directory, when it stood in for the
    /// listing: a holder's watch on its node, through the view.
    pub(super) dir_view: Option<Arc<DirView>>,
}

impl std::fmt::Debug for Created {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Created")
            .field("czxid", &self.czxid)
            .field("seen", &self.seen)
            .field("children", &self.children)
            .field("dir_watch", &self.dir_watch.is_some())
            .field("dir_view", &self.dir_view.is_some())
            .finish()
    }
}

/// Deletes `path` on `session` (retried per the session's policy). Gone
/// already, or a retired session, counts as success: the node goes with it.
pub(super) async fn delete_node(session: &ZkSession, path: &str) -> Result<(), BackendError> {
    match session.retry(|c| async move { c.delete(path, None).await }).await {
        Err(_) => Ok(()),
        Ok(Ok(()) | Err(ZkError::NoNode | ZkError::SessionExpired | ZkError::ClientClosed)) => Ok(()),
        Ok(Err(e)) => Err(map_err("delete", e)),
    }
}

/// Deletes `path` in the background until it is gone or its session ends,
/// backing off between tries: a node left behind would head its queue for as
/// long as the (pooled, long-lived) session lives.
async fn delete_until_gone(session: Arc<ZkSession>, path: String) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        match delete_node(&session, &path).await {
            Ok(()) => return,
            Err(e) => {
                warn!(%path, error = %e, retry_in = ?backoff.delay(), "could not delete lock node; trying again");
                if !backoff.wait_or(session.retired()).await {
                    return;
                }
            }
        }
    }
}

/// Starts watching a lock node of ours for deletion by anyone but us (an
/// operator "unsticking" a lock with `deleteall`), from `armed` (a watch on
/// the node the caller already set), else from `dir_watch` (the child watch
/// the create round's listing left on the lock directory: free, and for an
/// uncontended lock it fires only when the holder's own release deletes the
/// node), else by setting one. A directory event (someone queued, or left)
/// makes it watch the node itself. The returned token is cancelled when the
/// node is found gone; if it was granted by then (its grant is registered on
/// the session), the holder is told at once that the lock is lost. `done` is
/// cancelled by the guard before its own delete, so our own deletions report
/// nothing and cost no further request. The watch ends with the node or the
/// session.
pub(super) fn watch_own(
    session: &Arc<ZkSession>,
    path: &str,
    armed: Option<OwnWatch>,
    dir_watch: Option<OwnWatch>,
    done: CancellationToken,
) -> CancellationToken {
    let gone = CancellationToken::new();
    let (session, path, signal) = (Arc::clone(session), path.to_owned(), gone.clone());
    spawn_background(async move {
        if own_node_deleted(&session, &path, armed, dir_watch, &done).await {
            signal.cancel();
            if let Some(record) = session.unregister(&path) {
                warn!(%path, key = %record.key, token = record.token, "held lock node was deleted from outside; reporting the lock lost");
                record.notifier.notify(LostReason::NodeDeleted);
            }
        }
    });
    gone
}

/// Sets a watch on our node `path`: `None` if the node is already gone.
///
/// # Errors
/// [`ZkSession::gone`] if the session is lost; ZooKeeper's refusal, or its
/// last connection error after the retry policy's sends, as a backend error.
pub(super) async fn arm_own_watch(session: &ZkSession, path: &str) -> Result<Option<OwnWatch>, BackendError> {
    match session
        .retry(|c| async move { c.check_and_watch_stat(path).await })
        .await?
    {
        Ok((None, _)) => Ok(None),
        Ok((Some(_), watcher)) => Ok(Some(Box::pin(watcher.changed()))),
        Err(e) => Err(map_err("watch lock node", e)),
    }
}

/// Waits until `path` is deleted (`true`), or the session ends (`false`: the
/// session's retirement reports its grants). Watches again after other
/// events, and after failures with backoff: a node that could not be watched
/// would be deleted from outside unnoticed.
async fn own_node_deleted(
    session: &ZkSession,
    path: &str,
    mut armed: Option<OwnWatch>,
    mut dir_watch: Option<OwnWatch>,
    done: &CancellationToken,
) -> bool {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        if armed.is_none()
            && let Some(watch) = dir_watch.take()
        {
            let event = tokio::select! {
                event = watch => event,
                () = session.retired() => return false,
            };
            // Our own release's delete, or the session's end: nothing to report.
            if done.is_cancelled() || event.event_type == EventType::Session {
                return false;
            }
            // Someone came or went in the directory: look at the node itself.
            continue;
        }
        let watch = match armed.take() {
            Some(watch) => watch,
            None => match arm_own_watch(session, path).await {
                Ok(Some(watch)) => watch,
                Ok(None) => return true,
                Err(_) if session.is_retired() => return false,
                Err(e) => {
                    warn!(%path, error = %e, retry_in = ?backoff.delay(), "cannot watch our lock node; trying again");
                    if !backoff.wait_or(session.retired()).await {
                        return false;
                    }
                    continue;
                }
            },
        };
        let event = tokio::select! {
            event = watch => event,
            () = session.retired() => return false,
        };
        match event.event_type {
            EventType::NodeDeleted if done.is_cancelled() => return false,
            EventType::NodeDeleted => return true,
            // The session ended: its retirement reports the grants.
            EventType::Session => return false,
            // Data changed: still there; watch again.
            _ => {}
        }
    }
}

/// A lock node being created or waited on: deleted on drop unless disarmed.
#[derive(Debug)]
pub(super) struct PendingNode {
    session: Arc<ZkSession>,
    dir: String,
    uuid: Uuid,
    /// Curator's lock name for the node ([`layout::lock_name`]).
    lock: &'static str,
    /// Known once the create's reply arrived.
    path: Option<String>,
    /// A create was sent whose node may exist.
    sent: bool,
}

impl PendingNode {
    /// A node to be created in `dir` under the lock name `lock`.
    pub(super) fn new(session: &Arc<ZkSession>, dir: String, lock: &'static str) -> PendingNode {
        PendingNode {
            session: Arc::clone(session),
            dir,
            uuid: layout::fresh_uuid(),
            lock,
            path: None,
            sent: false,
        }
    }

    /// The lock directory.
    pub(super) fn dir(&self) -> &str {
        &self.dir
    }

    /// The prefix to create the node with (ZooKeeper appends the sequence).
    pub(super) fn create_prefix(&self) -> String {
        layout::node_prefix(&self.dir, &self.uuid, self.lock)
    }

    /// The node's full path, once its create was answered.
    pub(super) fn path(&self) -> Option<&str> {
        self.path.as_deref()
    }

    /// The node's name, once its create was answered (empty before).
    pub(super) fn name(&self) -> &str {
        self.path.as_deref().and_then(|p| p.rsplit('/').next()).unwrap_or("")
    }

    /// Marks the create as sent: from now on the node may exist.
    pub(super) fn mark_sent(&mut self) {
        self.sent = true;
    }

    /// Marks the create as refused: no node was made.
    pub(super) fn mark_not_created(&mut self) {
        self.sent = false;
    }

    /// Records the node's full path from the create's reply.
    pub(super) fn created(&mut self, path: String) {
        self.path = Some(path);
    }

    /// Hands the node over to a grant: the caller now owns its deletion.
    /// Returns its path.
    pub(super) fn into_granted(mut self) -> String {
        self.sent = false;
        self.path.take().unwrap_or_default()
    }

    /// Deletes the node now (backing out or timing out). On failure the drop
    /// handler tries again in the background.
    pub(super) async fn delete(&mut self) {
        if let Some(path) = self.path.as_deref() {
            match delete_node(&self.session, path).await {
                Ok(()) => {
                    self.sent = false;
                    self.path = None;
                }
                Err(e) => {
                    warn!(%path, error = %e, "could not delete lock node; retrying in the background")
                }
            }
        }
    }
}

impl Drop for PendingNode {
    fn drop(&mut self) {
        if !self.sent || self.session.is_retired() {
            return;
        }
        let session = Arc::clone(&self.session);
        let (dir, uuid, path) = (std::mem::take(&mut self.dir), self.uuid, self.path.take());
        debug!(%dir, path = ?path, "withdrawing a lock node in the background");
        spawn_background(async move {
            let path = match path {
                Some(path) => path,
                // The create was cancelled before its reply: find it by uuid.
                // This listing is sent after the create on the same session,
                // so it sees the node if the create succeeded.
                None => match find_by_uuid(&session, &dir, &uuid).await {
                    Some(path) => path,
                    None => return,
                },
            };
            delete_until_gone(session, path).await;
        });
    }
}

/// Lists `dir` and returns the path of the child created with `uuid`, if
/// any. The listing follows a `sync`, as in [`recover`]: after a reconnect to
/// another server, that server must first catch up with the leader, or it
/// may not show a node we created.
async fn find_by_uuid(session: &ZkSession, dir: &str, uuid: &Uuid) -> Option<String> {
    let children = session
        .retry(|c| async move {
            let (sync, list) = join(c.sync(dir), c.list_children(dir)).await;
            sync.and(list)
        })
        .await
        .ok()?
        .ok()?;
    children
        .iter()
        .find(|c| layout::is_ours(c, uuid))
        .map(|c| format!("{dir}/{c}"))
}

/// After a create's reply was lost: once the session is back, finds the node
/// by its uuid (after a `sync`, see [`find_by_uuid`]) with the version and
/// listing a create round reads. `None` if it was never created.
///
/// # Errors
/// `Unavailable` if the session is lost or ZooKeeper keeps failing.
pub(super) async fn recover(
    session: &ZkSession,
    version_path: &str,
    pending: &mut PendingNode,
) -> Result<Option<Created>, BackendError> {
    let dir = pending.dir.as_str();
    let listed = session
        .retry(|c| async move {
            let (sync, read, list) = join3(c.sync(dir), c.get_data(version_path), c.list_children(dir)).await;
            // Without the `sync` the listing may predate our create.
            sync.and(list).map(|children| (read, children))
        })
        .await?;
    let (read, children) = match listed {
        Ok(found) => found,
        Err(ZkError::NoNode) => {
            pending.sent = false;
            return Ok(None);
        }
        Err(e) => return Err(map_err("list lock directory", e)),
    };
    let Some(name) = children.iter().find(|c| layout::is_ours(c, &pending.uuid)) else {
        debug!(dir = %pending.dir, uuid = %pending.uuid, "create reply was lost and no node was made; creating again");
        pending.sent = false;
        return Ok(None);
    };
    let path = format!("{}/{name}", pending.dir);
    pending.path = Some(path.clone());
    let node = path.as_str();
    let stat = match session.retry(|c| async move { c.check_stat(node).await }).await? {
        Ok(Some(stat)) => stat,
        Ok(None) => return Err(session.gone()),
        Err(e) => return Err(map_err("stat lock node", e)),
    };
    let seen = match read {
        Ok((data, _)) => layout::decode_version(&data).map_err(BackendError::Internal)?,
        Err(e) => return Err(map_err("read version node", e)),
    };
    debug!(%path, "recovered a lock node whose create reply was lost");
    Ok(Some(Created {
        czxid: stat.czxid,
        seen,
        children,
        dir_watch: None,
        child_watch: None,
        dir_view: None,
    }))
}

/// A granted lock: its node and the session it lives on. Dropping it releases
/// the lock in the background.
#[derive(Debug)]
pub struct ZkGuard {
    session: Arc<ZkSession>,
    path: String,
    token: u64,
    released: bool,
    /// Tells the node's watch that what deletes it now is us.
    done: CancellationToken,
    /// The child watch the create round left on the lock directory, if the
    /// node's watch is that one: fired by our delete, so its count ends
    /// when the delete is confirmed.
    child_watch: Option<ChildWatch>,
}

impl ZkGuard {
    pub(super) fn new(
        session: Arc<ZkSession>,
        path: String,
        token: u64,
        done: CancellationToken,
        child_watch: Option<ChildWatch>,
    ) -> ZkGuard {
        ZkGuard {
            session,
            path,
            token,
            released: false,
            done,
            child_watch,
        }
    }

    /// Full path of the lock node.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The fencing token (the node's czxid).
    pub fn token(&self) -> u64 {
        self.token
    }

    /// Id of the ZooKeeper session that owns the node.
    pub fn session_id(&self) -> i64 {
        self.session.session_id()
    }

    /// Until when nobody else can be granted this lock: the instant its
    /// holder is told it is lost unless the session's contact with the
    /// leader is proven again first (now, once the session is retired).
    pub(super) fn safe_until(&self) -> tokio::time::Instant {
        if self.session.is_retired() {
            tokio::time::Instant::now()
        } else {
            self.session.contact_deadline()
        }
    }

    /// Releases the lock: one `delete`, confirmed within a third of the
    /// session timeout.
    ///
    /// # Cancellation safety
    /// Dropping the future drops the guard, which deletes in the background.
    ///
    /// # Errors
    /// `Unavailable` if the delete could not be confirmed in time; the
    /// guard's drop keeps trying in the background.
    pub(super) async fn release(mut self) -> Result<(), BackendError> {
        self.session.unregister(&self.path);
        self.done.cancel();
        let within = self.session.timeout() / 3;
        match tokio::time::timeout(within, delete_node(&self.session, &self.path)).await {
            Ok(Ok(())) => {
                self.released = true;
                if let Some(watch) = self.child_watch.take() {
                    watch.fired();
                }
                debug!(path = %self.path, token = self.token, "released");
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(BackendError::Unavailable(format!(
                "release of {} not confirmed within {within:?}; retrying in the background",
                self.path
            ))),
        }
    }
}

impl Drop for ZkGuard {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        self.session.unregister(&self.path);
        self.done.cancel();
        if self.session.is_retired() {
            return;
        }
        let (session, path, child_watch) = (
            Arc::clone(&self.session),
            std::mem::take(&mut self.path),
            self.child_watch.take(),
        );
        spawn_background(async move {
            delete_until_gone(session, path).await;
            if let Some(watch) = child_watch {
                watch.fired();
            }
        });
    }
}
