//! A rotation's view of the version it drains: how many lock nodes remain
//! under `{kind}/{version}`, which directories hold them, and who holds
//! their heads — kept current with one-shot child watches, so a release
//! costs one listing of its own directory, not a census of the kind.
//!
//! Every non-empty lock directory carries a child watch, and the version
//! directory one for new lock directories. When a directory's watch fires,
//! only that directory is listed again (with a new watch); when the version
//! directory's fires, everything is. "Empty" is only ever concluded from a
//! full census, so a directory the incremental view missed cannot be
//! skipped: the rotation switches only after a full census, made after the
//! kind was marked draining, found nothing.
//!
//! While the census watches, the session keeps no views of the directories
//! it watches (`views.rs`: ZooKeeper 3.8 keeps one watch mode per path and
//! session).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;

use clastor_protocol::{MAX_PROGRESS_HOLDERS, RotationHolder};
use futures_util::StreamExt as _;
use futures_util::future::join_all;
use futures_util::stream::FuturesUnordered;
use zookeeper_client::Stat;

use super::error::{ZkError, map_err};
use super::layout;
use super::session::ZkSession;
use super::views::Suspended;
use crate::backend::BackendError;

/// A watch's firing, tagged with its lock directory's id (`None`: the
/// version directory).
type Fired = Pin<Box<dyn Future<Output = Option<String>> + Send>>;

/// One non-empty lock directory.
#[derive(Debug)]
struct Dir {
    /// Its children (holder, waiters, strays).
    count: u32,
    /// The first contender's name (or the first child's).
    head: String,
}

/// The drain's view of one version directory.
pub(super) struct Drain {
    /// `{kind}/{version}`.
    root: String,
    dirs: HashMap<String, Dir>,
    fired: FuturesUnordered<Fired>,
    /// The session's directory views stay off under `root` while the
    /// census's one-shot child watches are there (`views.rs`).
    _views_off: Suspended,
}

impl Drain {
    /// A full census of `root`, with watches.
    ///
    /// # Errors
    /// `Unavailable` if the session is lost; ZooKeeper's other failures.
    pub(super) async fn start(session: &ZkSession, root: String) -> Result<Drain, BackendError> {
        let views_off = session.views().suspend(&root);
        let mut drain = Drain {
            root,
            dirs: HashMap::new(),
            fired: FuturesUnordered::new(),
            _views_off: views_off,
        };
        drain.full(session).await?;
        Ok(drain)
    }

    /// Lock nodes left.
    pub(super) fn remaining(&self) -> u32 {
        self.dirs.values().fold(0u32, |n, d| n.saturating_add(d.count))
    }

    /// Lists everything again, with fresh watches.
    ///
    /// # Errors
    /// As [`Drain::start`].
    pub(super) async fn full(&mut self, session: &ZkSession) -> Result<(), BackendError> {
        self.dirs.clear();
        self.fired = FuturesUnordered::new();
        let root = self.root.as_str();
        let ids = match session
            .retry(|c| async move { c.list_and_watch_children(root).await })
            .await?
        {
            Ok((ids, watch)) => {
                self.fired.push(Box::pin(async move {
                    watch.changed().await;
                    None
                }));
                ids
            }
            Err(ZkError::NoNode) => Vec::new(),
            Err(e) => return Err(map_err("list version directory", e)),
        };
        // One pipelined round: every directory's children, each watched.
        let root = self.root.clone();
        let listings = join_all(ids.into_iter().map(|id| list_dir(session, &root, id))).await;
        for listing in listings {
            self.take(listing?);
        }
        Ok(())
    }

    /// Waits for the next change anywhere in the view and brings the view up
    /// to date (listing again only what changed). Never resolves if nothing
    /// is watched.
    ///
    /// # Errors
    /// As [`Drain::start`].
    pub(super) async fn changed(&mut self, session: &ZkSession) -> Result<(), BackendError> {
        let Some(first) = self.fired.next().await else {
            return std::future::pending().await;
        };
        let mut ids = vec![first];
        // Everything else that fired meanwhile, in the same round.
        while let Some(Some(more)) = futures_util::FutureExt::now_or_never(self.fired.next()) {
            ids.push(more);
        }
        if ids.iter().any(Option::is_none) {
            return self.full(session).await;
        }
        let root = self.root.clone();
        let listings = join_all(ids.into_iter().flatten().map(|id| list_dir(session, &root, id))).await;
        for listing in listings {
            self.take(listing?);
        }
        Ok(())
    }

    /// Records one directory's listing, keeping its watch if it is not empty.
    fn take(&mut self, (id, found): Listing) {
        match found {
            Some((children, watch)) if !children.is_empty() => {
                let head = layout::sorted_contenders(&children)
                    .first()
                    .map_or_else(|| children[0].clone(), |c| c.name.to_owned());
                let count = u32::try_from(children.len()).unwrap_or(u32::MAX);
                let tag = id.clone();
                self.fired.push(Box::pin(async move {
                    watch.changed().await;
                    Some(tag)
                }));
                self.dirs.insert(id, Dir { count, head });
            }
            // Empty: dropping the watch unregisters it. A node created in it
            // later is found by the next full census (the version
            // directory's watch does not see it, but "empty" is only ever
            // concluded from a full census).
            _ => {
                self.dirs.remove(&id);
            }
        }
    }

    /// Up to [`MAX_PROGRESS_HOLDERS`] of the locks left, with who holds them
    /// (one pipelined read of each head node).
    pub(super) fn holders(&self, session: &ZkSession) -> impl Future<Output = Vec<RotationHolder>> + Send {
        // Owned, so the future does not borrow the view (which is not `Sync`).
        let mut heads: Vec<(String, String, u32)> = self
            .dirs
            .iter()
            .map(|(id, dir)| (id.clone(), dir.head.clone(), dir.count))
            .collect();
        heads.sort();
        heads.truncate(MAX_PROGRESS_HOLDERS);
        let root = self.root.clone();
        async move {
            let reads = join_all(heads.iter().map(|(id, head, _)| {
                let path = format!("{root}/{id}/{head}");
                async move {
                    let path = path.as_str();
                    session.retry(|c| async move { c.get_data(path).await }).await
                }
            }))
            .await;
            heads
                .into_iter()
                .zip(reads)
                .map(|((id, head, count), read)| {
                    let mut holder = match read {
                        Ok(Ok((data, stat))) => describe_node(&head, &data, &stat),
                        _ => head,
                    };
                    if count > 1 {
                        holder.push_str(&format!(" (+{} waiting)", count - 1));
                    }
                    RotationHolder { id, holder }
                })
                .collect()
        }
    }
}

/// A lock directory's listing with a watch (`None` if it is gone).
type Listing = (String, Option<(Vec<String>, zookeeper_client::OneshotWatcher)>);

/// Lists the lock directory `{root}/{id}` with a watch.
async fn list_dir(session: &ZkSession, root: &str, id: String) -> Result<Listing, BackendError> {
    let path = format!("{root}/{id}");
    let dir = path.as_str();
    match session
        .retry(|c| async move { c.list_and_watch_children(dir).await })
        .await?
    {
        Ok(found) => Ok((id, Some(found))),
        // Reaped (empty) since the parent was listed.
        Err(ZkError::NoNode) => Ok((id, None)),
        Err(e) => Err(map_err("list lock directory", e)),
    }
}

/// Lock nodes under the version directory `root`, without watches (for
/// `VERSION`).
///
/// # Errors
/// As [`Drain::start`].
pub(super) async fn count_nodes(session: &ZkSession, root: &str) -> Result<u32, BackendError> {
    let ids = match session.retry(|c| async move { c.list_children(root).await }).await? {
        Ok(ids) => ids,
        Err(ZkError::NoNode) => return Ok(0),
        Err(e) => return Err(map_err("list version directory", e)),
    };
    let counts = join_all(ids.iter().map(|id| {
        let path = format!("{root}/{id}");
        async move {
            let path = path.as_str();
            session.retry(|c| async move { c.list_children(path).await }).await
        }
    }))
    .await;
    let mut n = 0u32;
    for count in counts {
        match count? {
            Ok(children) => n = n.saturating_add(u32::try_from(children.len()).unwrap_or(u32::MAX)),
            Err(ZkError::NoNode) => {}
            Err(e) => return Err(map_err("list lock directory", e)),
        }
    }
    Ok(n)
}

/// Who made a lock node: its session and, for ours, the owner in its data.
fn describe_node(name: &str, data: &[u8], stat: &Stat) -> String {
    let client = if name.starts_with("_c_") {
        match std::str::from_utf8(data) {
            Ok(d) if d.starts_with("clastor") => d.to_owned(),
            _ => "curator".to_owned(),
        }
    } else if name.contains("__lock__") || name.contains("__rlock__") {
        "kazoo".to_owned()
    } else {
        format!("node {name}")
    };
    format!("session {:#x} {client}", stat.ephemeral_owner)
}
