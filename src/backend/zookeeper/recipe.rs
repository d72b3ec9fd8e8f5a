//! The lock recipe: Curator's InterProcessMutex protocol, pipelined.
//!
//! Acquire, uncontended, is one network round trip: `create` of an
//! ephemeral-sequential node (its Stat carries the czxid, our fencing token),
//! `get_data` of the kind's version node and `list_children` of the lock
//! directory are sent back-to-back on one session — `zookeeper_client` sends a
//! request when the method is called, not when the future is polled — and
//! awaited together. ZooKeeper runs one session's requests in order, so the
//! read sees any rotation that began before our create, and the listing
//! contains our node and every predecessor.
//!
//! A lock directory not known to exist (a fresh id) is created in the same
//! round trip: on a miss in a small cache of known directories, container
//! `create`s of the version and lock directories go out just ahead of the
//! lock node's. Read paths (`is_held`, `version`) never write: a missing
//! version node reads as `v1`/normal.
//!
//! Contended, a waiter watches only its predecessor (no herd). Every node this
//! module creates is owned by a [`PendingNode`] until it is either handed out
//! in a [`ZkGuard`] or deleted; dropping either deletes the node in the
//! background, so timeouts, cancellations and lost replies leave nothing
//! behind.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use clastor_protocol::{KindMode, LockMode};
use dashmap::{DashMap, DashSet};
use futures_util::future::{join, join3};
use tokio::time::Instant;
use tracing::{debug, warn};
use uuid::Uuid;
use zookeeper_client::{Acls, CreateMode, CreateOptions, EventType, SessionState};

use super::layout::{self, Layout};
use super::pool::{GrantRecord, Pool, ZkSession};
use crate::backend::{AcquireRequest, BackendError, Grant, KindVersion};
use crate::key::LockKey;

type ZkError = zookeeper_client::Error;

const LOCK_NODE: CreateOptions<'static> = CreateMode::EphemeralSequential.with_acls(Acls::anyone_all());
const CONTAINER: CreateOptions<'static> = CreateMode::Container.with_acls(Acls::anyone_all());
const PERSISTENT: CreateOptions<'static> = CreateMode::Persistent.with_acls(Acls::anyone_all());
/// Parents can be reaped between our `create`s; give up after this many tries.
const MAX_ATTEMPTS: usize = 8;
/// Bounds of the caches: cleared when full (cheap, and a miss only costs a
/// pipelined request or a read).
const MAX_CACHED_KINDS: usize = 1024;
const MAX_CACHED_DIRS: usize = 4096;
/// Longest an acquire may overrun its wait while ZooKeeper does not answer.
const MAX_GRACE: Duration = Duration::from_secs(2);

/// The recipe's shared state: the pool, the layout, a cache of each kind's
/// version (to build the lock path before the pipelined read confirms it) and
/// a cache of lock directories known to exist. Both caches are hints: the
/// acquire round checks the version, and a reaped directory fails the create
/// with `NoNode`.
#[derive(Debug)]
pub(crate) struct Recipe {
    pub pool: Arc<Pool>,
    pub layout: Layout,
    versions: DashMap<Arc<str>, KindVersion>,
    dirs: DashSet<String>,
}

/// What a read of a kind's version node does when the node is missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Missing {
    /// Create it as `v1`/normal (acquire: the node must exist before a lock
    /// node does, so a rotation can see and drain it).
    Create,
    /// Answer `v1`/normal without writing (read paths).
    AssumeInitial,
}

/// Result of a successful create round.
struct Created {
    czxid: i64,
    seen: KindVersion,
    children: Vec<String>,
}

/// Maps a ZooKeeper error: connectivity problems are `Unavailable` (retry
/// may help), anything else `Internal`.
fn map_err(what: &str, e: ZkError) -> BackendError {
    match e {
        ZkError::ConnectionLoss
        | ZkError::Custom(_)
        | ZkError::SessionExpired
        | ZkError::SessionMoved
        | ZkError::ClientClosed
        | ZkError::NoHosts
        | ZkError::Timeout
        | ZkError::Throttled
        | ZkError::NotReadOnly => BackendError::Unavailable(format!("ZooKeeper {what}: {e}")),
        e => BackendError::Internal(format!("ZooKeeper {what}: {e}")),
    }
}

/// Whether a request failed because its connection broke, so its outcome is
/// unknown but the session may live on. `zookeeper_client` fails every
/// in-flight request with the error that ended the connection: usually
/// `ConnectionLoss`, but `Custom` for an I/O error, a read timeout ("no
/// response from connection") or a switch to a writable server, and
/// `UnexpectedError`/`UnmarshalError` for a reply it could not match or
/// parse (the request may well have been applied). Requests made after it
/// queue until the session reconnects or ends.
fn connection_broke(e: &ZkError) -> bool {
    matches!(
        e,
        ZkError::ConnectionLoss | ZkError::Custom(_) | ZkError::UnexpectedError(_) | ZkError::UnmarshalError { .. }
    )
}

/// Whether a failed `create` definitely made no node: ZooKeeper answered
/// with a refusal, or the client refused to send it. Any other error (a lost
/// connection, an expired or closed session, a reply that could not be read)
/// leaves the outcome unknown, so the node must still be looked for.
fn definitely_not_created(e: &ZkError) -> bool {
    matches!(
        e,
        ZkError::NodeExists
            | ZkError::NoNode
            | ZkError::NoAuth
            | ZkError::InvalidAcl
            | ZkError::NoChildrenForEphemerals
            | ZkError::BadArguments(_)
            | ZkError::BadVersion
            | ZkError::NotEmpty
            | ZkError::SessionMoved
            | ZkError::Throttled
            | ZkError::NotReadOnly
            | ZkError::QuotaExceeded
            | ZkError::MarshallingError
            | ZkError::Unimplemented
            | ZkError::UnexpectedErrorCode(_)
    )
}

/// Awaits `f` unless the session is retired first (lost, expired, shut down).
async fn on<T>(session: &ZkSession, f: impl Future<Output = T>) -> Result<T, BackendError> {
    tokio::select! {
        biased;
        r = f => Ok(r),
        () = session.retired() => Err(session.gone()),
    }
}

fn far_deadline(wait: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(wait)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400))
}

/// Deletes `path` on `session`, retrying after connection loss. A retired
/// session counts as success: the node goes with it.
async fn delete_node(session: &ZkSession, path: &str) -> Result<(), BackendError> {
    loop {
        let Ok(client) = session.client() else {
            return Ok(());
        };
        match on(session, client.delete(path, None)).await {
            Err(_) => return Ok(()),
            Ok(Ok(()) | Err(ZkError::NoNode)) => return Ok(()),
            Ok(Err(e)) if connection_broke(&e) => continue,
            Ok(Err(ZkError::SessionExpired | ZkError::ClientClosed)) => return Ok(()),
            Ok(Err(e)) => return Err(map_err("delete", e)),
        }
    }
}

/// Runs `f` in the background on the current runtime, if there is one (a
/// guard dropped outside any runtime relies on the session closing instead).
fn spawn_cleanup(f: impl Future<Output = ()> + Send + 'static) {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => {
            handle.spawn(f);
        }
        Err(_) => warn!("no tokio runtime to delete a ZooKeeper lock node; it goes when its session closes"),
    }
}

/// A lock node being created or waited on: deleted on drop unless disarmed.
#[derive(Debug)]
struct PendingNode {
    session: Arc<ZkSession>,
    dir: String,
    uuid: Uuid,
    /// Known once the create's reply arrived.
    path: Option<String>,
    /// A create was sent whose node may exist.
    sent: bool,
}

impl PendingNode {
    fn new(session: &Arc<ZkSession>, dir: String) -> PendingNode {
        PendingNode {
            session: Arc::clone(session),
            dir,
            uuid: Uuid::new_v4(),
            path: None,
            sent: false,
        }
    }

    fn name(&self) -> &str {
        self.path.as_deref().and_then(|p| p.rsplit('/').next()).unwrap_or("")
    }

    fn disarm(&mut self) {
        self.sent = false;
        self.path = None;
    }

    /// Deletes the node now (backing out or timing out). On failure the drop
    /// handler tries again in the background.
    async fn delete(&mut self) {
        if let Some(path) = self.path.as_deref() {
            match delete_node(&self.session, path).await {
                Ok(()) => self.disarm(),
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
        spawn_cleanup(async move {
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
            if let Err(e) = delete_node(&session, &path).await {
                warn!(%path, error = %e, "could not delete withdrawn lock node");
            }
        });
    }
}

/// Lists `dir` (retrying after connection loss) and returns the path of the
/// child created with `uuid`, if any. The listing follows a `sync`, as in
/// [`Recipe::recover`]: after a reconnect to another server, that server must
/// first catch up with the leader, or it may not show a node we created.
async fn find_by_uuid(session: &ZkSession, dir: &str, uuid: &Uuid) -> Option<String> {
    loop {
        let client = session.client().ok()?;
        let (sync, list) = on(session, join(client.sync(dir), client.list_children(dir)))
            .await
            .ok()?;
        match sync.and(list) {
            Ok(children) => {
                return children
                    .iter()
                    .find(|c| layout::is_ours(c, uuid))
                    .map(|c| format!("{dir}/{c}"));
            }
            Err(e) if connection_broke(&e) => continue,
            Err(_) => return None,
        }
    }
}

/// A granted lock: its node and the session it lives on. Dropping it releases
/// the lock in the background.
#[derive(Debug)]
pub struct ZkGuard {
    session: Arc<ZkSession>,
    path: String,
    token: u64,
    released: bool,
}

impl ZkGuard {
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
}

impl Drop for ZkGuard {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        self.session.unregister(&self.path);
        if self.session.is_retired() {
            return;
        }
        let session = Arc::clone(&self.session);
        let path = std::mem::take(&mut self.path);
        spawn_cleanup(async move {
            if let Err(e) = delete_node(&session, &path).await {
                warn!(%path, error = %e, "background release failed; the node goes with its session");
            }
        });
    }
}

impl Recipe {
    pub fn new(pool: Arc<Pool>, layout: Layout) -> Recipe {
        Recipe {
            pool,
            layout,
            versions: DashMap::new(),
            dirs: DashSet::new(),
        }
    }

    fn remember(&self, kind: &Kind<'_>, v: &KindVersion) {
        if self.versions.len() >= MAX_CACHED_KINDS && !self.versions.contains_key(&**kind.0) {
            self.versions.clear();
        }
        self.versions.insert(Arc::clone(kind.0), v.clone());
    }

    fn remember_dir(&self, dir: &str) {
        if self.dirs.contains(dir) {
            return;
        }
        if self.dirs.len() >= MAX_CACHED_DIRS {
            self.dirs.clear();
        }
        self.dirs.insert(dir.to_owned());
    }

    /// Takes the lock; see [`crate::backend::Backend::acquire`]. Bounded by
    /// the wait plus a grace (a third of the session timeout, at most 2 s),
    /// even if ZooKeeper stops answering. A try-once (`wait` zero) uses only
    /// a connected session.
    ///
    /// # Cancellation safety
    /// Dropping the future withdraws the wait: the node (even one whose create
    /// reply had not arrived) is deleted in the background.
    ///
    /// # Errors
    /// `Unsupported` for shared mode, `Closed` after shutdown, `Unavailable`
    /// when ZooKeeper cannot be reached (no connected session for a try-once;
    /// no answer within the wait plus the grace) or the session was lost
    /// while waiting.
    pub async fn acquire(&self, req: AcquireRequest<'_>) -> Result<Option<Grant<ZkGuard>>, BackendError> {
        if req.mode != LockMode::Exclusive {
            return Err(BackendError::Unsupported("shared locks on ZooKeeper".into()));
        }
        let (key, wait) = (req.key, req.wait);
        let deadline = far_deadline(wait);
        let grace = (self.pool.session_timeout() / 3).min(MAX_GRACE);
        let limit = deadline.checked_add(grace).unwrap_or(deadline);
        // Dropping the inner future on expiry cleans up like a cancellation.
        match tokio::time::timeout_at(limit, self.acquire_by(req, deadline)).await {
            Ok(result) => result,
            Err(_) => Err(BackendError::Unavailable(format!(
                "ZooKeeper did not answer the acquire of {key} within its wait ({wait:?}) plus {grace:?}"
            ))),
        }
    }

    /// The acquire proper: not granted (`Ok(None)`) after `deadline`.
    async fn acquire_by(
        &self,
        req: AcquireRequest<'_>,
        deadline: Instant,
    ) -> Result<Option<Grant<ZkGuard>>, BackendError> {
        let AcquireRequest {
            key,
            wait,
            owner,
            on_lost,
            ..
        } = req;
        let started = Instant::now();
        let session = if wait.is_zero() {
            self.pool.pick_connected()?
        } else {
            self.pool.pick()?
        };
        let kind = Kind(key.kind_arc());
        let mut version = match self.versions.get(key.kind()) {
            Some(v) => v.clone(),
            None => self.read_version(&session, &kind, Missing::Create).await?,
        };
        let data = format!("clastor owner={owner}");
        loop {
            if version.mode == KindMode::Draining {
                match self.wait_normal(&session, &kind, deadline).await? {
                    Some(v) => version = v,
                    None => return Ok(None),
                }
            }
            let dir = self.layout.lock_dir(key.kind(), &version.version, key.id());
            let mut pending = PendingNode::new(&session, dir);
            let created = self
                .create(&session, &kind, &version, &mut pending, data.as_bytes())
                .await?;
            if created.seen != version {
                // A rotation began (or finished) since we built the path: back
                // out and follow the version node.
                debug!(%key, from = %version.version, to = %created.seen.version, mode = created.seen.mode.name(), "kind version changed; backing out");
                self.remember(&kind, &created.seen);
                pending.delete().await;
                version = created.seen;
                continue;
            }
            if !self.wait_turn(&session, &pending, created.children, deadline).await? {
                pending.delete().await;
                debug!(%key, waited = ?started.elapsed(), "not granted in time");
                return Ok(None);
            }
            let token = u64::try_from(created.czxid)
                .map_err(|_| BackendError::Internal(format!("lock node has a negative czxid {}", created.czxid)))?;
            let path = pending.path.clone().unwrap_or_default();
            let record = GrantRecord {
                key: key.clone(),
                token,
                notifier: on_lost,
            };
            if session.register(path.clone(), record).is_err() {
                return Err(session.gone());
            }
            pending.disarm();
            debug!(%key, token, %path, waited = ?started.elapsed(), "granted");
            return Ok(Some(Grant {
                token,
                version: version.version,
                guard: ZkGuard {
                    session,
                    path,
                    token,
                    released: false,
                },
            }));
        }
    }

    /// The pipelined create round (see the module docs), with parent creation
    /// on `NoNode` and recovery of a create whose reply was lost.
    async fn create(
        &self,
        session: &ZkSession,
        kind: &Kind<'_>,
        version: &KindVersion,
        pending: &mut PendingNode,
        data: &[u8],
    ) -> Result<Created, BackendError> {
        let version_path = self.layout.version_path(kind.0);
        let version_dir = self.layout.version_dir(kind.0, &version.version);
        let prefix = layout::node_prefix(&pending.dir, &pending.uuid);
        let mut dir_known = self.dirs.contains(&pending.dir);
        for _ in 0..MAX_ATTEMPTS {
            let client = session.client()?;
            let sent_at = Instant::now();
            // A directory not known to exist is created ahead of the node, in
            // the same round trip (its result shows in the node's create).
            let parents = (!dir_known).then(|| {
                join(
                    client.create(&version_dir, &[], &CONTAINER),
                    client.create(&pending.dir, &[], &CONTAINER),
                )
            });
            let create = client.create(&prefix, data, &LOCK_NODE);
            pending.sent = true;
            let read = client.get_data(&version_path);
            let list = client.list_children(&pending.dir);
            let parents = async move {
                if let Some(parents) = parents {
                    // `NodeExists` is the usual answer; any failure that
                    // matters shows in the node's create (`NoNode`).
                    let _ = parents.await;
                }
            };
            let ((), (created, read, list)) = on(session, join(parents, join3(create, read, list))).await?;
            match created {
                Ok((stat, seq)) => {
                    session.touch(sent_at);
                    pending.path = Some(format!("{prefix}{seq}"));
                    self.remember_dir(&pending.dir);
                    let seen = match read {
                        Ok((data, _)) => layout::decode_version(&data).map_err(BackendError::Internal)?,
                        Err(_) => self.read_version(session, kind, Missing::Create).await?,
                    };
                    let children = match list {
                        Ok(children) => children,
                        Err(_) => self.list(session, &pending.dir).await?,
                    };
                    return Ok(Created {
                        czxid: stat.czxid,
                        seen,
                        children,
                    });
                }
                Err(ZkError::NoNode) => {
                    pending.sent = false;
                    self.dirs.remove(&pending.dir);
                    if dir_known {
                        // Reaped since we saw it: create it with the node.
                        dir_known = false;
                    } else {
                        // The kind's nodes are missing too.
                        self.ensure_parents(session, kind, &version.version, &pending.dir)
                            .await?;
                        dir_known = true;
                    }
                }
                Err(e) if connection_broke(&e) => {
                    if let Some(created) = self.recover(session, &version_path, pending).await? {
                        self.remember_dir(&pending.dir);
                        return Ok(created);
                    }
                }
                Err(e) => {
                    // Only a definite refusal means no node was made;
                    // otherwise the drop of `pending` looks for it by uuid.
                    if definitely_not_created(&e) {
                        pending.sent = false;
                    }
                    return Err(map_err("create lock node", e));
                }
            }
        }
        Err(BackendError::Internal(format!(
            "could not create a lock node in {} after {MAX_ATTEMPTS} attempts",
            pending.dir
        )))
    }

    /// After a create's reply was lost: waits for the session to come back,
    /// then finds the node by its uuid. `None` if it was never created.
    async fn recover(
        &self,
        session: &ZkSession,
        version_path: &str,
        pending: &mut PendingNode,
    ) -> Result<Option<Created>, BackendError> {
        loop {
            let client = session.client()?;
            // `sync` first: if we reconnected to another server, make it catch
            // up with the leader so it has seen our create if it happened.
            let sync = client.sync(&pending.dir);
            let read = client.get_data(version_path);
            let list = client.list_children(&pending.dir);
            let (_, read, list) = on(session, join3(sync, read, list)).await?;
            let children = match list {
                Ok(children) => children,
                Err(ZkError::NoNode) => {
                    pending.sent = false;
                    return Ok(None);
                }
                Err(e) if connection_broke(&e) => continue,
                Err(e) => return Err(map_err("list lock directory", e)),
            };
            let Some(name) = children.iter().find(|c| layout::is_ours(c, &pending.uuid)) else {
                debug!(dir = %pending.dir, uuid = %pending.uuid, "create reply was lost and no node was made; creating again");
                pending.sent = false;
                return Ok(None);
            };
            let path = format!("{}/{name}", pending.dir);
            pending.path = Some(path.clone());
            let stat = loop {
                match on(session, client.check_stat(&path)).await? {
                    Ok(Some(stat)) => break stat,
                    Ok(None) => return Err(session.gone()),
                    Err(e) if connection_broke(&e) => continue,
                    Err(e) => return Err(map_err("stat lock node", e)),
                }
            };
            let seen = match read {
                Ok((data, _)) => layout::decode_version(&data).map_err(BackendError::Internal)?,
                Err(e) => return Err(map_err("read version node", e)),
            };
            debug!(%path, "recovered a lock node whose create reply was lost");
            return Ok(Some(Created {
                czxid: stat.czxid,
                seen,
                children,
            }));
        }
    }

    /// Creates the version and lock directories (containers), and the kind's
    /// nodes if they are missing too. Both creates go out back-to-back.
    async fn ensure_parents(
        &self,
        session: &ZkSession,
        kind: &Kind<'_>,
        version: &str,
        dir: &str,
    ) -> Result<(), BackendError> {
        let version_dir = self.layout.version_dir(kind.0, version);
        for _ in 0..MAX_ATTEMPTS {
            let client = session.client()?;
            let outer = client.create(&version_dir, &[], &CONTAINER);
            let inner = client.create(dir, &[], &CONTAINER);
            let (outer, inner) = on(session, join(outer, inner)).await?;
            match (outer, inner) {
                (_, Ok(_) | Err(ZkError::NodeExists)) => return Ok(()),
                (Err(ZkError::NoNode), _) => self.ensure_kind(session, kind).await?,
                (_, Err(ZkError::NoNode)) => {}
                (_, Err(e)) if connection_broke(&e) => {}
                (_, Err(e)) => return Err(map_err("create lock directory", e)),
            }
        }
        Err(BackendError::Internal(format!(
            "could not create {dir} after {MAX_ATTEMPTS} attempts"
        )))
    }

    /// Creates the root, provider and kind nodes and the version node (as
    /// `v1`/normal) where missing, pipelined.
    async fn ensure_kind(&self, session: &ZkSession, kind: &Kind<'_>) -> Result<(), BackendError> {
        let kind_path = self.layout.kind_path(kind.0);
        let version_path = self.layout.version_path(kind.0);
        let initial = layout::encode_version(&layout::initial_version());
        for _ in 0..MAX_ATTEMPTS {
            let client = session.client()?;
            let mut creates = Vec::new();
            for ancestor in self.layout.ancestors() {
                creates.push(client.create(ancestor, &[], &PERSISTENT));
            }
            creates.push(client.create(&kind_path, &[], &PERSISTENT));
            creates.push(client.create(&version_path, &initial, &PERSISTENT));
            let results = on(session, futures_util::future::join_all(creates)).await?;
            let mut retry = false;
            for r in results {
                match r {
                    Ok(_) | Err(ZkError::NodeExists) => {}
                    Err(e) if connection_broke(&e) => retry = true,
                    Err(e) => return Err(map_err("create kind nodes", e)),
                }
            }
            if !retry {
                return Ok(());
            }
        }
        Err(BackendError::Unavailable(format!(
            "could not create {version_path}: connection keeps dropping"
        )))
    }

    /// Pre-creates the root and provider nodes (at connect, to fail early on
    /// a bad root or missing permissions).
    pub async fn ensure_base(&self, session: &ZkSession) -> Result<(), BackendError> {
        let client = session.client()?;
        let creates: Vec<_> = self
            .layout
            .ancestors()
            .into_iter()
            .map(|a| client.create(a, &[], &PERSISTENT))
            .collect();
        for r in on(session, futures_util::future::join_all(creates)).await? {
            match r {
                Ok(_) | Err(ZkError::NodeExists) => {}
                Err(e) => return Err(map_err(&format!("create {}", self.layout.base()), e)),
            }
        }
        Ok(())
    }

    /// Reads a kind's version node; if it is missing, creates it as
    /// `v1`/normal or just answers that, per `missing`.
    async fn read_version(
        &self,
        session: &ZkSession,
        kind: &Kind<'_>,
        missing: Missing,
    ) -> Result<KindVersion, BackendError> {
        let path = self.layout.version_path(kind.0);
        for _ in 0..MAX_ATTEMPTS {
            let client = session.client()?;
            match on(session, client.get_data(&path)).await? {
                Ok((data, _)) => {
                    let v = layout::decode_version(&data).map_err(BackendError::Internal)?;
                    self.remember(kind, &v);
                    return Ok(v);
                }
                Err(ZkError::NoNode) if missing == Missing::AssumeInitial => return Ok(layout::initial_version()),
                Err(ZkError::NoNode) => self.ensure_kind(session, kind).await?,
                Err(e) if connection_broke(&e) => {}
                Err(e) => return Err(map_err("read version node", e)),
            }
        }
        Err(BackendError::Unavailable(format!("could not read {path}")))
    }

    /// Waits until the kind is back to normal mode (a rotation finished or
    /// aborted); `None` at the deadline.
    async fn wait_normal(
        &self,
        session: &ZkSession,
        kind: &Kind<'_>,
        deadline: Instant,
    ) -> Result<Option<KindVersion>, BackendError> {
        let path = self.layout.version_path(kind.0);
        loop {
            let client = session.client()?;
            let (data, _, watcher) = match on(session, client.get_and_watch_data(&path)).await? {
                Ok(found) => found,
                Err(ZkError::NoNode) => {
                    self.ensure_kind(session, kind).await?;
                    continue;
                }
                Err(e) if connection_broke(&e) => continue,
                Err(e) => return Err(map_err("watch version node", e)),
            };
            let v = layout::decode_version(&data).map_err(BackendError::Internal)?;
            self.remember(kind, &v);
            if v.mode == KindMode::Normal {
                return Ok(Some(v));
            }
            debug!(kind = %kind.0, version = %v.version, "kind is draining; waiting");
            tokio::select! {
                _ = watcher.changed() => {}
                () = tokio::time::sleep_until(deadline) => return Ok(None),
                () = session.retired() => return Err(session.gone()),
            }
        }
    }

    /// Lists a lock directory, retrying after connection loss.
    async fn list(&self, session: &ZkSession, dir: &str) -> Result<Vec<String>, BackendError> {
        loop {
            let client = session.client()?;
            match on(session, client.list_children(dir)).await? {
                Ok(children) => return Ok(children),
                Err(ZkError::NoNode) => return Ok(Vec::new()),
                Err(e) if connection_broke(&e) => continue,
                Err(e) => return Err(map_err("list lock directory", e)),
            }
        }
    }

    /// Waits until our node is first among the contenders (`true`) or the
    /// deadline passes (`false`), watching only the predecessor.
    ///
    /// The listing came back after our create on the same session, so it
    /// holds every node that sorts before ours; any node created later gets a
    /// later sequence number from the same parent. The set of nodes ahead of
    /// us can therefore only shrink, and when the last of them is deleted we
    /// are first without listing again: a hand-over costs the delete's watch
    /// event and nothing more.
    async fn wait_turn(
        &self,
        session: &ZkSession,
        pending: &PendingNode,
        children: Vec<String>,
        deadline: Instant,
    ) -> Result<bool, BackendError> {
        let me = pending.name();
        let mut ahead: Vec<String> = {
            let contenders = layout::sorted_contenders(&children);
            let Some(pos) = contenders.iter().position(|c| c.name == me) else {
                return Err(BackendError::Unavailable(format!(
                    "lock node {me} vanished while waiting (session {:#x} lost or node deleted)",
                    session.session_id()
                )));
            };
            contenders[..pos]
                .iter()
                .map(|c| format!("{}/{}", pending.dir, c.name))
                .collect()
        };
        // The closest predecessor is last: watch it, and on its deletion the
        // one before it, until none is left.
        while let Some(predecessor) = ahead.last() {
            if Instant::now() >= deadline {
                return Ok(false);
            }
            let client = session.client()?;
            match on(session, client.get_and_watch_data(predecessor)).await? {
                Ok((_, _, watcher)) => {
                    debug!(node = me, %predecessor, "waiting for predecessor");
                    tokio::select! {
                        event = watcher.changed() => match event.event_type {
                            EventType::NodeDeleted => {
                                ahead.pop();
                            }
                            EventType::Session
                                if matches!(
                                    event.session_state,
                                    SessionState::Expired | SessionState::Closed | SessionState::AuthFailed
                                ) =>
                            {
                                return Err(session.gone());
                            }
                            // Data changed (or a non-terminal session event):
                            // the node is still there; watch it again.
                            _ => {}
                        },
                        () = tokio::time::sleep_until(deadline) => return Ok(false),
                        () = session.retired() => return Err(session.gone()),
                    }
                }
                Err(ZkError::NoNode) => {
                    ahead.pop();
                }
                Err(e) if connection_broke(&e) => {}
                Err(e) => return Err(map_err("watch predecessor", e)),
            }
        }
        Ok(true)
    }

    /// Releases a grant: one `delete`.
    ///
    /// # Cancellation safety
    /// Dropping the future drops the guard, which deletes in the background.
    ///
    /// # Errors
    /// `Unavailable` if the delete could not be confirmed within a third of
    /// the session timeout; the guard's drop keeps trying in the background.
    pub async fn release(&self, mut guard: ZkGuard) -> Result<(), BackendError> {
        guard.session.unregister(&guard.path);
        let within = guard.session.timeout() / 3;
        match tokio::time::timeout(within, delete_node(&guard.session, &guard.path)).await {
            Ok(Ok(())) => {
                guard.released = true;
                debug!(path = %guard.path, token = guard.token, "released");
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(BackendError::Unavailable(format!(
                "release of {} not confirmed within {within:?}; retrying in the background",
                guard.path
            ))),
        }
    }

    /// Whether any contender node exists for `key` under the kind's current
    /// version (one round trip: version read and listing pipelined). Writes
    /// nothing: a missing version node means `v1`.
    ///
    /// # Errors
    /// `Unavailable` if ZooKeeper cannot be reached.
    pub async fn is_held(&self, key: &LockKey) -> Result<bool, BackendError> {
        let session = self.pool.pick()?;
        let kind = Kind(key.kind_arc());
        let mut version = match self.versions.get(key.kind()) {
            Some(v) => v.version.clone(),
            None => Arc::from(layout::INITIAL_VERSION),
        };
        let version_path = self.layout.version_path(key.kind());
        for _ in 0..MAX_ATTEMPTS {
            let client = session.client()?;
            let dir = self.layout.lock_dir(key.kind(), &version, key.id());
            let (read, list) = on(
                &session,
                join(client.get_data(&version_path), client.list_children(&dir)),
            )
            .await?;
            let seen = match read {
                Ok((data, _)) => {
                    let seen = layout::decode_version(&data).map_err(BackendError::Internal)?;
                    self.remember(&kind, &seen);
                    seen
                }
                // Never acquired through Clastor; a Curator or kazoo client
                // may still hold it under `v1`.
                Err(ZkError::NoNode) => layout::initial_version(),
                Err(e) if connection_broke(&e) => continue,
                Err(e) => return Err(map_err("read version node", e)),
            };
            if seen.version != version {
                version = seen.version;
                continue;
            }
            return match list {
                Ok(children) => Ok(!layout::sorted_contenders(&children).is_empty()),
                Err(ZkError::NoNode) => Ok(false),
                Err(e) if connection_broke(&e) => continue,
                Err(e) => Err(map_err("list lock directory", e)),
            };
        }
        Err(BackendError::Unavailable(format!("could not check {key}")))
    }

    /// The kind's version and mode, read from ZooKeeper (`v1`/normal if the
    /// kind was never used; nothing is written).
    ///
    /// # Errors
    /// `Unavailable` if ZooKeeper cannot be reached; `Internal` if the version
    /// node holds something unreadable.
    pub async fn version(&self, kind: &str) -> Result<KindVersion, BackendError> {
        let session = self.pool.pick()?;
        let kind: Arc<str> = Arc::from(kind);
        self.read_version(&session, &Kind(&kind), Missing::AssumeInitial).await
    }

    /// The lock directory of `key` under the kind's current version.
    ///
    /// # Errors
    /// As [`Recipe::version`].
    pub async fn lock_dir(&self, key: &LockKey) -> Result<String, BackendError> {
        let v = self.version(key.kind()).await?;
        Ok(self.layout.lock_dir(key.kind(), &v.version, key.id()))
    }
}

/// A validated kind, borrowed as the shared `Arc<str>` so caching it costs a
/// reference count, not an allocation.
struct Kind<'a>(&'a Arc<str>);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_refusals_mean_no_node_was_created() {
        for refused in [
            ZkError::NodeExists,
            ZkError::NoNode,
            ZkError::NoAuth,
            ZkError::InvalidAcl,
            ZkError::NoChildrenForEphemerals,
            ZkError::BadArguments(&"bad path"),
            ZkError::SessionMoved,
            ZkError::Throttled,
        ] {
            assert!(definitely_not_created(&refused), "{refused:?}");
            assert!(!connection_broke(&refused), "{refused:?}");
        }
        for unknown in [
            ZkError::ConnectionLoss,
            ZkError::SessionExpired,
            ZkError::ClientClosed,
            ZkError::Timeout,
            ZkError::UnexpectedError("recv response with xid 7 but no pending request".into()),
            ZkError::UnmarshalError {
                entity: "server path",
                reason: &"insufficient buf",
            },
        ] {
            assert!(!definitely_not_created(&unknown), "{unknown:?}");
        }
        // A reply that could not be matched or read: the create may have
        // happened, so it is recovered like a lost connection.
        assert!(connection_broke(&ZkError::UnexpectedError("x".into())));
        assert!(connection_broke(&ZkError::UnmarshalError {
            entity: "stat",
            reason: &"insufficient buf"
        }));
    }
}
