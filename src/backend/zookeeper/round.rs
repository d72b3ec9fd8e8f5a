//! The create round of an acquire (see `recipe.rs` for the recipe): one
//! pipelined exchange with ZooKeeper that makes our lock node and learns
//! what deciding the turn needs, in two steps.
//!
//! - [`ZooKeeperBackend::send_round`] sends, back to back on one session,
//!   the containers of a directory not known to exist, an `addWatch` that
//!   establishes a view, the `create` of our node, the version read (cold)
//!   and the listing (without a view) — `zookeeper_client` sends a request
//!   when the method is called, so they leave in this order and ZooKeeper
//!   runs them in it — and awaits them together.
//! - [`ZooKeeperBackend::finish_round`] reads the replies: our node (its
//!   czxid is the fencing token), the kind's version as of our create, and
//!   the contenders up to ours (from the view, made current by the events
//!   that came before the create's reply, or from the listing); or, on
//!   `NoNode`, whether the kind moved on or the directories must be made.
//!
//! [`ZooKeeperBackend::create_round`] repeats the two on `NoNode` and after
//! a connection broke (recovering a create whose reply was lost, by uuid).

use std::fmt::Write as _;
use std::sync::Arc;

use futures_util::future::{join, join4};
use tokio::time::Instant;
use zookeeper_client::{AddWatchMode, CreateSequence, OneshotWatcher, PersistentWatcher, Stat};

use super::ZooKeeperBackend;
use super::error::{ZkResult, connection_broke, definitely_not_created, map_err};
use super::layout;
use super::nodes::{self, Created, PendingNode};
use super::session::{MAX_ATTEMPTS, ZkSession};
use super::turn::list_children;
use super::views::{ChildWatch, DirView, GuardedWatch, Plan, Ticket, Views};
use super::watches::OwnWatch;
use crate::backend::{BackendError, KindVersion};

/// How a create round ended.
pub(super) enum Round {
    /// Our node exists (see [`Created`]).
    Created(Created),
    /// No node was made: the lock directory is gone and the kind's version
    /// node, read in the same round, says the kind moved on.
    Moved(KindVersion),
}

/// The listing a create round sends, if any.
enum List<W, P> {
    Watched(W, ChildWatch),
    Plain(P),
    None,
}

/// A listing, with the child watch it left and that watch's count.
type Listing = (Vec<String>, Option<(OwnWatch, ChildWatch)>);

/// What one round's requests answered, awaited together.
struct Replies {
    /// The path our node was created with, before ZooKeeper's sequence.
    prefix: String,
    /// When the create was sent: the session's contact, if it answered.
    sent_at: Instant,
    created: ZkResult<(Stat, CreateSequence)>,
    /// The version node's data with a watch (cold rounds only).
    read: Option<ZkResult<(Vec<u8>, Stat, OneshotWatcher)>>,
    /// The listing, with the child watch it left and its count (rounds
    /// without a view).
    list: Option<ZkResult<Listing>>,
    /// The session's view of the directory (warm rounds).
    view: Option<Arc<DirView>>,
    /// A view being established: its slot and its `addWatch`'s answer.
    establishing: Option<(Ticket, ZkResult<PersistentWatcher>)>,
}

/// What to do after a round's replies.
enum Next {
    Done(Round),
    /// Again, with what is now known of the directory.
    Again {
        dir_known: bool,
    },
}

impl ZooKeeperBackend {
    /// The pipelined create round (see the module docs), with parent creation
    /// on `NoNode` and recovery of a create whose reply was lost.
    pub(super) async fn create_round(
        &self,
        session: &ZkSession,
        kind: &Arc<str>,
        version: &KindVersion,
        pending: &mut PendingNode,
        data: &[u8],
    ) -> Result<Round, BackendError> {
        let mut dir_known = self.kinds.dir_known(pending.dir());
        for _ in 0..MAX_ATTEMPTS {
            let replies = self
                .send_round(session, kind, version, pending, data, dir_known)
                .await?;
            match self
                .finish_round(session, kind, version, pending, replies, dir_known)
                .await?
            {
                Next::Done(round) => return Ok(round),
                Next::Again { dir_known: known } => dir_known = known,
            }
        }
        Err(BackendError::Internal(format!(
            "could not create a lock node in {} after {MAX_ATTEMPTS} attempts",
            pending.dir()
        )))
    }

    /// Sends one round's requests and awaits their answers together.
    async fn send_round(
        &self,
        session: &ZkSession,
        kind: &Arc<str>,
        version: &KindVersion,
        pending: &mut PendingNode,
        data: &[u8],
        dir_known: bool,
    ) -> Result<Replies, BackendError> {
        let layout = self.kinds.layout();
        let (container, lock_node) = (layout.nodes().container(), layout.nodes().lock_node());
        let prefix = pending.create_prefix();
        let client = session.client()?;
        let sent_at = Instant::now();
        // From here the node may exist: every request below is sent as
        // its method is called.
        pending.mark_sent();
        // A directory not known to exist is created ahead of the node, in
        // the same round trip (its result shows in the node's create).
        let version_dir = (!dir_known).then(|| layout.version_dir(kind, &version.version));
        let parents = version_dir.as_deref().map(|version_dir| {
            join(
                client.create(version_dir, &[], &container),
                client.create(pending.dir(), &[], &container),
            )
        });
        // Warm: this session's version watch vouches for the version
        // (see `kinds`); cold: read it, leaving a watch for next time.
        let warm = self.kinds.watched(session, kind).is_some_and(|v| v == *version);
        // A view of the directory replaces the listing; establishing one
        // sends its `addWatch` here, ahead of the create (`views`).
        let plan = session.views().plan(pending.dir(), dir_known, || {
            client.watch(pending.dir(), AddWatchMode::PersistentRecursive)
        });
        let create = client.create(&prefix, data, &lock_node);
        let version_path = (!warm).then(|| layout.version_path(kind));
        let read = version_path.as_deref().map(|path| client.get_and_watch_data(path));
        let (view, ticket, adding, list) = match plan {
            Plan::Warm(view) => (Some(view), None, None, List::None),
            Plan::Establish(ticket, adding) => (
                None,
                Some(ticket),
                Some(adding),
                List::Plain(client.list_children(pending.dir())),
            ),
            // With a child watch: a holder's first watch on its node, free.
            Plan::List { watch: Some(guard) } => (
                None,
                None,
                None,
                List::Watched(client.list_and_watch_children(pending.dir()), guard),
            ),
            Plan::List { watch: None } => (None, None, None, List::Plain(client.list_children(pending.dir()))),
        };
        let read = async move {
            match read {
                Some(read) => Some(read.await),
                None => None,
            }
        };
        let adding = async move {
            match adding {
                Some(adding) => Some(adding.await),
                None => None,
            }
        };
        let list = async move {
            match list {
                List::Watched(list, guard) => Some(list.await.map(|(children, watch)| {
                    let watch: OwnWatch = Box::pin(watch.changed());
                    let counted = guard.clone();
                    let watch = Box::pin(GuardedWatch::new(watch, guard)) as OwnWatch;
                    (children, Some((watch, counted)))
                })),
                List::Plain(list) => Some(list.await.map(|children| (children, None))),
                List::None => None,
            }
        };
        let parents = async move {
            if let Some(parents) = parents {
                // `NodeExists` is the usual answer; any failure that
                // matters shows in the node's create (`NoNode`).
                let _ = parents.await;
            }
        };
        let ((), (created, read, list, adding)) = session
            .until_retired(join(parents, join4(create, read, list, adding)))
            .await?;
        Ok(Replies {
            prefix,
            sent_at,
            created,
            read,
            list,
            view,
            establishing: ticket.zip(adding),
        })
    }

    /// Reads one round's replies: our node and what deciding the turn
    /// needs, or why to go again.
    async fn finish_round(
        &self,
        session: &ZkSession,
        kind: &Arc<str>,
        version: &KindVersion,
        pending: &mut PendingNode,
        replies: Replies,
        dir_known: bool,
    ) -> Result<Next, BackendError> {
        let Replies {
            prefix,
            sent_at,
            created,
            read,
            list,
            view,
            establishing,
        } = replies;
        match created {
            Ok((stat, seq)) => {
                session.touch(sent_at);
                let mut path = String::with_capacity(prefix.len() + 11);
                path.push_str(&prefix);
                let _ = write!(path, "{seq}");
                pending.created(path);
                self.kinds.remember_dir(pending.dir());
                let seen = match read {
                    // Polled now that the create's reply is in: any
                    // change made before our create has fired the watch.
                    None => match self.kinds.watched(session, kind) {
                        Some(v) => v,
                        None => self.kinds.read_and_watch(session, kind).await?,
                    },
                    Some(Ok((data, _, watch))) => {
                        let v = layout::decode_version(&data).map_err(BackendError::Internal)?;
                        self.kinds.install(session, kind, &v, watch);
                        v
                    }
                    Some(Err(_)) => self.kinds.read_and_watch(session, kind).await?,
                };
                let mut dir_view = None;
                let (children, dir_watch): (_, Option<(OwnWatch, ChildWatch)>) = match (view, list) {
                    // The view, made current by the events that came
                    // before the create's reply, stands for the listing.
                    (Some(view), _) => match view.after_create(pending.name()) {
                        Some(upto) => {
                            dir_view = Some(view);
                            (upto, None)
                        }
                        None => (list_children(session, pending.dir()).await?, None),
                    },
                    (None, Some(Ok((children, watch)))) => {
                        if let Some((ticket, Ok(watcher))) = establishing {
                            dir_view = Views::complete(ticket, watcher, &children);
                        }
                        // A new view has applied the events that came
                        // after the listing too: trust it as the warm
                        // path does (our node already gone → list).
                        match dir_view.as_ref().map(|view| view.after_create(pending.name())) {
                            Some(Some(upto)) => (upto, watch),
                            Some(None) => {
                                dir_view = None;
                                (list_children(session, pending.dir()).await?, watch)
                            }
                            None => (children, watch),
                        }
                    }
                    (None, _) => (list_children(session, pending.dir()).await?, None),
                };
                let (dir_watch, child_watch) = dir_watch.unzip();
                Ok(Next::Done(Round::Created(Created {
                    czxid: stat.czxid,
                    seen,
                    children,
                    dir_watch,
                    child_watch,
                    dir_view,
                })))
            }
            Err(zookeeper_client::Error::NoNode) => {
                pending.mark_not_created();
                self.kinds.forget_dir(pending.dir());
                let seen = match read {
                    Some(Ok((data, _, watch))) => match layout::decode_version(&data) {
                        Ok(v) => {
                            self.kinds.install(session, kind, &v, watch);
                            Some(v)
                        }
                        Err(_) => None,
                    },
                    Some(Err(_)) => None,
                    None => match self.kinds.watched(session, kind) {
                        Some(v) => Some(v),
                        None => Some(self.kinds.read_and_watch(session, kind).await?),
                    },
                };
                if let Some(seen) = seen
                    && seen != *version
                {
                    return Ok(Next::Done(Round::Moved(seen)));
                }
                if dir_known {
                    // Reaped since we saw it: create it with the node.
                    Ok(Next::Again { dir_known: false })
                } else {
                    // The kind's nodes are missing too.
                    self.kinds
                        .ensure_parents(session, kind, &version.version, pending.dir())
                        .await?;
                    Ok(Next::Again { dir_known: true })
                }
            }
            Err(e) if connection_broke(&e) => {
                let version_path = self.kinds.layout().version_path(kind);
                match nodes::recover(session, &version_path, pending).await? {
                    Some(created) => {
                        self.kinds.remember_dir(pending.dir());
                        Ok(Next::Done(Round::Created(created)))
                    }
                    None => Ok(Next::Again { dir_known }),
                }
            }
            Err(e) => {
                // Only a definite refusal means no node was made;
                // otherwise the drop of `pending` looks for it by uuid.
                if definitely_not_created(&e) {
                    pending.mark_not_created();
                }
                Err(map_err("create lock node", e))
            }
        }
    }
}
