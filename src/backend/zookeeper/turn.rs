//! A waiter's turn: watching only the predecessor (no herd), its own node
//! (deleted from outside, it can never be granted), and pruning the queue
//! ahead in one step when the predecessor goes.

use futures_util::FutureExt as _;
use tokio::time::Instant;
use tracing::debug;
use zookeeper_client::{EventType, SessionState, WatchedEvent};

use super::error::{ZkError, map_err};
use super::layout;
use super::nodes::{self, PendingNode};
use super::session::ZkSession;
use super::views::DirView;
use super::watches::OwnWatch;
use crate::backend::BackendError;

/// Lists a lock directory (a missing one is empty).
pub(super) async fn list_children(session: &ZkSession, dir: &str) -> Result<Vec<String>, BackendError> {
    match session.retry(|c| async move { c.list_children(dir).await }).await? {
        Ok(children) => Ok(children),
        Err(ZkError::NoNode) => Ok(Vec::new()),
        Err(e) => Err(map_err("list lock directory", e)),
    }
}

/// How a wait for our turn ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Turn {
    /// Our node is first: the lock is ours.
    First,
    /// The deadline passed first.
    TimedOut,
    /// Our own node was deleted from outside: it can never be granted.
    NodeGone,
}

/// Waits until no contender ahead of our node keeps it from holding (a
/// writer: none is left ahead; a reader: no writer is), the deadline passes,
/// or our own node is found deleted, watching only the predecessor — and,
/// once it has to wait, our own node, on this same task: one session's
/// events arrive in order, so when a predecessor's deletion comes in, the
/// deletion of our own node (an operator's `deleteall` taking both) is
/// already there to be seen, and we are never granted on a node that is
/// gone. Returns that watch with `First`, for the holder to keep.
///
/// The listing came back after our create on the same session, so it holds
/// every node that sorts before ours; any node created later gets a later
/// sequence number from the same parent. The set of nodes ahead of us can
/// therefore only shrink. When the closest predecessor goes, the others
/// ahead have usually gone before it (each released in turn): they are
/// pruned in one step — from the session's view of the directory, as fresh
/// as the deletion event (`views`), or else from one listing — rather than
/// checked one round trip each. A node is pruned only if it is seen gone, so
/// pruning can only make us wait less, never be granted early. In a FIFO
/// queue a hand-over then costs the delete's watch event and nothing more.
pub(super) async fn wait_turn(
    session: &ZkSession,
    pending: &PendingNode,
    children: Vec<String>,
    view: Option<&DirView>,
    deadline: Instant,
) -> Result<(Turn, Option<OwnWatch>), BackendError> {
    let me = pending.name();
    let mine = pending.path().unwrap_or_default();
    let dir = pending.dir();
    // Names of the contenders ahead of us that keep us from holding (every
    // one, unless we and it are both readers), closest last.
    let mut ahead: Vec<String> = {
        let contenders = layout::sorted_contenders(&children);
        let Some(pos) = contenders.iter().position(|c| c.name == me) else {
            return Ok((Turn::NodeGone, None));
        };
        let mine = &contenders[pos];
        contenders[..pos]
            .iter()
            .filter(|c| c.blocks(mine))
            .map(|c| c.name.to_owned())
            .collect()
    };
    if ahead.is_empty() {
        return Ok((Turn::First, None));
    }
    let Some(mut own) = nodes::arm_own_watch(session, mine).await? else {
        return Ok((Turn::NodeGone, None));
    };
    // Watch the closest predecessor; on its deletion, prune and go on.
    while let Some(closest) = ahead.last() {
        // Anything already delivered about our own node comes first.
        if let Some(event) = (&mut own).now_or_never() {
            match rearm(session, mine, &event).await? {
                Some(watch) => own = watch,
                None => return Ok((Turn::NodeGone, None)),
            }
            continue;
        }
        if Instant::now() >= deadline {
            return Ok((Turn::TimedOut, None));
        }
        let predecessor = format!("{dir}/{closest}");
        let node = predecessor.as_str();
        let deleted = match session
            .retry(|c| async move { c.get_and_watch_data(node).await })
            .await?
        {
            Ok((_, _, watcher)) => {
                debug!(node = me, predecessor = node, "waiting for predecessor");
                tokio::select! {
                    biased;
                    event = &mut own => match rearm(session, mine, &event).await? {
                        Some(watch) => {
                            own = watch;
                            false
                        }
                        None => return Ok((Turn::NodeGone, None)),
                    },
                    event = watcher.changed() => match event.event_type {
                        EventType::NodeDeleted => true,
                        EventType::Session
                            if matches!(
                                event.session_state,
                                SessionState::Expired | SessionState::Closed | SessionState::AuthFailed
                            ) =>
                        {
                            return Err(session.gone());
                        }
                        // Data changed (or a non-terminal session event): the
                        // node is still there; watch it again.
                        _ => false,
                    },
                    () = tokio::time::sleep_until(deadline) => return Ok((Turn::TimedOut, None)),
                    () = session.retired() => return Err(session.gone()),
                }
            }
            Err(ZkError::NoNode) => true,
            Err(e) => return Err(map_err("watch predecessor", e)),
        };
        if deleted {
            ahead.pop();
            if !ahead.is_empty() {
                prune_gone(session, dir, me, view, &mut ahead).await?;
            }
        }
    }
    match (&mut own).now_or_never() {
        None => Ok((Turn::First, Some(own))),
        Some(event) => match rearm(session, mine, &event).await? {
            Some(watch) => Ok((Turn::First, Some(watch))),
            None => Ok((Turn::NodeGone, None)),
        },
    }
}

/// Drops from `ahead` the nodes seen gone: by the session's view of `dir`
/// when it has a usable one, else by one listing. Our own node missing from
/// the listing is left for the own-node watch to report.
async fn prune_gone(
    session: &ZkSession,
    dir: &str,
    me: &str,
    view: Option<&DirView>,
    ahead: &mut Vec<String>,
) -> Result<(), BackendError> {
    if let Some(view) = view
        && view.retain_present(ahead)
    {
        return Ok(());
    }
    let children = list_children(session, dir).await?;
    let present: std::collections::HashSet<&str> = children.iter().map(String::as_str).collect();
    ahead.retain(|name| present.contains(name.as_str()));
    debug!(
        node = me,
        left = ahead.len(),
        "pruned the queue ahead of us from a listing"
    );
    Ok(())
}

/// After an event on our own node's watch: `None` if the node is gone, else
/// a new watch (its data changed, which ours never does, so rarely).
///
/// # Errors
/// [`ZkSession::gone`] for a session event (the session ended), and as
/// [`nodes::arm_own_watch`].
async fn rearm(session: &ZkSession, path: &str, event: &WatchedEvent) -> Result<Option<OwnWatch>, BackendError> {
    match event.event_type {
        EventType::NodeDeleted => Ok(None),
        EventType::Session => Err(session.gone()),
        _ => nodes::arm_own_watch(session, path).await,
    }
}
