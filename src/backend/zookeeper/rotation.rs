//! Version rotation on ZooKeeper (PROTOCOL.md, "Version rotation"; DESIGN.md,
//! "Version rotation"): claim, drain, switch, clean up — every step a single
//! ZooKeeper write whose success decides it.
//!
//! - **Claim**: an ephemeral `{kind}/rotation` node on the driving server's
//!   session. A second driver's create fails (`NodeExists`): refused. The
//!   claim goes when the driver ends, is cancelled (its connection closed) or
//!   its server dies (with the session), so a rotation can always be resumed.
//! - **Mode**: the kind's version node (`v1\ndraining\nto=v2\ndeadline_ms=…`).
//!   Every transition (mark, resume, switch, abort) is a `setData`
//!   conditioned on the data version the writer last saw, so of a switch and
//!   an abort racing (the driver at its deadline, an operator's
//!   `ROTATE_ABORT`, a waiting acquire aborting an abandoned drain) exactly
//!   one wins and the others learn it.
//! - **The race the original design had is closed** — a server that read
//!   "v1, normal" just before the mark, and creates its lock node under `v1`
//!   just after it. Every acquire reads the version node *after* its own
//!   create, on the same session, and backs out (deleting its node) unless it
//!   reads exactly the normal version it created under (`recipe.rs`). Its
//!   read is served after its create, so:
//!   - if the create was committed after the mark, the read sees the mark (or
//!     anything later) and the acquire backs out — its node is never granted;
//!   - if it was committed before the mark, the drain's census (read on the
//!     driver's session after the mark was acknowledged) sees the node, and
//!     the switch waits until it is gone.
//!
//!   So no lock node under a version is ever *granted* after the switch away
//!   from it. A stray node can still be created there by an acquire about to
//!   back out; it never heads a queue anyone is granted from, and the
//!   clean-up deletes it with the rest. A `multi` of a version check with the
//!   create would forbid even the stray, at the price of a second round trip
//!   per acquire (a `create` inside a `multi` returns no Stat on ZooKeeper
//!   3.8, so no czxid for the token): not worth it for an object nobody is
//!   ever granted.
//! - **Drain**: a census of `{kind}/{from}` (its lock directories and their
//!   children) with a child watch on each non-empty directory, repeated when
//!   one fires, when the version node changes (an abort) and at least every
//!   second for progress.

use std::sync::Arc;
use std::time::Duration;

use clastor_protocol::{KindMode, MAX_PROGRESS_HOLDERS, RotationHolder, RotationPhase, RotationProgress};
use futures_util::StreamExt as _;
use futures_util::future::join_all;
use futures_util::stream::FuturesUnordered;
use tokio::time::Instant;
use tracing::{info, warn};
use zookeeper_client::{Acls, CreateMode, CreateOptions, OneshotWatcher, Stat};

use super::ZooKeeperBackend;
use super::error::{ZkError, map_err};
use super::layout::{self, Layout};
use super::session::{MAX_ATTEMPTS, ZkSession, spawn_background};
use crate::backend::{BackendError, KindVersion, RotateOutcome, RotateRequest, RotationTarget, unix_ms};

/// The claim node: ephemeral, gone with its session.
const CLAIM: CreateOptions<'static> = CreateMode::Ephemeral.with_acls(Acls::anyone_all());

/// Longest pause between two progress reports while a kind drains.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Shortest pause between two progress reports caused by changes.
const PROGRESS_MIN_GAP: Duration = Duration::from_millis(250);

/// Passes over the old subtree before the clean-up gives up on what is left.
const CLEANUP_PASSES: usize = 3;

/// What the drain's census found under the version being drained.
struct Census {
    /// Children of every lock directory (holders, waiters, strays).
    count: u32,
    /// Up to [`MAX_PROGRESS_HOLDERS`] of them, described.
    holders: Vec<RotationHolder>,
    /// One child watch per non-empty directory (fires on any change there),
    /// and one on the version directory (new lock directories).
    watches: Vec<OneshotWatcher>,
}

/// The claim on a kind's rotation, deleted when the driver ends or is
/// dropped.
struct ClaimNode {
    session: Arc<ZkSession>,
    path: String,
}

impl Drop for ClaimNode {
    fn drop(&mut self) {
        let session = self.session.clone();
        let path = std::mem::take(&mut self.path);
        spawn_background(async move {
            if let Err(e) = super::nodes::delete_node(&session, &path).await {
                warn!(%path, error = %e, "could not delete the rotation claim; it goes with its session");
            }
        });
    }
}

impl ZooKeeperBackend {
    /// [`Backend::rotate`](crate::backend::Backend::rotate) on ZooKeeper.
    pub(super) async fn rotate_kind(&self, req: RotateRequest<'_>) -> Result<RotateOutcome, BackendError> {
        let RotateRequest {
            kind,
            from,
            to,
            drain_timeout,
            progress,
        } = req;
        let session = self.pool.pick()?;
        let layout = self.kinds.layout();
        let version_path = layout.version_path(kind);
        self.kinds.ensure_kind(&session, kind).await?;
        // 1. Claim.
        let Some(claim) = claim(&session, layout, kind, from, to).await? else {
            let by = read_claim(&session, &layout.rotation_path(kind)).await;
            return Ok(RotateOutcome::Refused(format!(
                "another rotation of {kind} is in progress ({by})"
            )));
        };
        let started = Instant::now();
        let deadline = started + drain_timeout;
        let report = |phase, remaining, holders| {
            progress(RotationProgress {
                kind: kind.to_string(),
                from: from.to_owned(),
                to: to.to_owned(),
                phase,
                remaining,
                elapsed_ms: millis(started.elapsed()),
                left_ms: millis(deadline.saturating_duration_since(Instant::now())),
                holders,
            });
        };
        // 2. Mark draining (or resume), conditioned on what we read.
        let draining = KindVersion {
            version: Arc::from(from),
            mode: KindMode::Draining,
            rotation: Some(RotationTarget {
                to: Arc::from(to),
                deadline_unix_ms: unix_ms()
                    .saturating_add(u64::try_from(drain_timeout.as_millis()).unwrap_or(u64::MAX)),
            }),
        };
        let mut marked = None;
        for _ in 0..MAX_ATTEMPTS {
            let (current, stat) = read_version_node(&session, &version_path).await?;
            match (current.mode, &current.rotation) {
                (KindMode::Normal, _) if *current.version == *to => {
                    // Switched already: the driver died while cleaning up.
                    info!(%kind, from, to, "resuming a rotation after its switch: cleaning up");
                    report(RotationPhase::Switched, 0, Vec::new());
                    let leftover = self.delete_subtree(&session, &layout.version_dir(kind, from)).await;
                    drop(claim);
                    return Ok(RotateOutcome::Completed {
                        drained: Duration::ZERO,
                        leftover,
                    });
                }
                (KindMode::Normal, _) if *current.version == *from => {}
                (KindMode::Draining, Some(r)) if *current.version == *from && *r.to == *to => {
                    info!(%kind, from, to, "resuming a rotation left draining");
                }
                (KindMode::Draining, Some(r)) if *current.version == *from => {
                    return Ok(RotateOutcome::Refused(format!(
                        "{kind} is draining towards {} (a rotation left half-done); abort it first (clastor rotate --abort {kind})",
                        r.to
                    )));
                }
                _ => {
                    return Ok(RotateOutcome::Refused(format!(
                        "{kind} is at version {} ({}), not {from}",
                        current.version,
                        current.mode.name()
                    )));
                }
            }
            if let Some(stat) = set_if(&session, &version_path, &draining, stat.version).await? {
                marked = Some(stat.version);
                break;
            }
        }
        let Some(mut data_version) = marked else {
            return Err(BackendError::Unavailable(format!(
                "the version node of {kind} kept changing; rotation not started"
            )));
        };
        self.kinds.remember(kind, &draining);
        info!(%kind, from, to, ?drain_timeout, "rotation started: draining");
        // 3. Drain.
        let from_dir = layout.version_dir(kind, from);
        let mut reported: Option<(Instant, u32)> = None;
        loop {
            let (version_watch, census) = {
                let node = version_path.as_str();
                let watched = session
                    .retry(|c| async move { c.get_and_watch_data(node).await })
                    .await?;
                let (data, stat, watch) = watched.map_err(|e| map_err("watch version node", e))?;
                if stat.version != data_version {
                    let now = layout::decode_version(&data).map_err(BackendError::Internal)?;
                    self.kinds.remember(kind, &now);
                    return Ok(aborted_by_someone(kind, from, &now));
                }
                (watch, census(&session, &from_dir).await?)
            };
            let Census {
                count,
                holders,
                watches,
            } = census;
            if count == 0 {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                // Back to normal on `from`, unless someone beat us to a change.
                let normal = KindVersion::normal(from);
                return match set_if(&session, &version_path, &normal, data_version).await? {
                    Some(_) => {
                        self.kinds.remember(kind, &normal);
                        warn!(%kind, from, to, remaining = count, "drain timed out; rotation aborted");
                        Ok(RotateOutcome::Aborted(format!(
                            "the drain did not finish within {drain_timeout:?}: {count} lock node(s) of {kind} remain under {from}{}; {kind} is back to normal on {from}, nothing was lost",
                            describe(&holders)
                        )))
                    }
                    None => {
                        let (now, _) = read_version_node(&session, &version_path).await?;
                        Ok(aborted_by_someone(kind, from, &now))
                    }
                };
            }
            let due = match reported {
                None => true,
                Some((at, n)) => now - at >= PROGRESS_EVERY || (n != count && now - at >= PROGRESS_MIN_GAP),
            };
            if due {
                report(RotationPhase::Draining, count, holders);
                reported = Some((now, count));
            }
            let next_report = reported.map_or(now, |(at, _)| at + PROGRESS_EVERY);
            let mut fired: FuturesUnordered<_> = watches.into_iter().map(OneshotWatcher::changed).collect();
            fired.push(version_watch.changed());
            tokio::select! {
                _ = fired.next() => {}
                () = tokio::time::sleep_until(next_report.min(deadline)) => {}
                () = session.retired() => return Err(session.gone()),
            }
        }
        // 4. Switch: `to`, normal, if the node is still as we left it.
        let switched = KindVersion::normal(to);
        let Some(stat) = set_if(&session, &version_path, &switched, data_version).await? else {
            let (now, _) = read_version_node(&session, &version_path).await?;
            return Ok(aborted_by_someone(kind, from, &now));
        };
        data_version = stat.version;
        self.kinds.remember(kind, &switched);
        let drained = started.elapsed();
        info!(%kind, from, to, ?drained, data_version, "rotation switched; deleting the old version's subtree");
        report(RotationPhase::Switched, 0, Vec::new());
        // 5. Clean up.
        let leftover = self.delete_subtree(&session, &from_dir).await;
        if leftover > 0 {
            warn!(%kind, from, leftover, "nodes left under the old version (a foreign client still creating there?)");
        }
        drop(claim);
        Ok(RotateOutcome::Completed { drained, leftover })
    }

    /// [`Backend::abort_rotation`](crate::backend::Backend::abort_rotation) on ZooKeeper.
    pub(super) async fn abort_kind_rotation(&self, kind: &Arc<str>) -> Result<(KindVersion, bool), BackendError> {
        let session = self.pool.pick()?;
        let version_path = self.kinds.layout().version_path(kind);
        for _ in 0..MAX_ATTEMPTS {
            let (current, stat) = match read_version_node(&session, &version_path).await {
                Ok(found) => found,
                // Never used: nothing to abort.
                Err(NotFound::Missing) => return Ok((layout::initial_version(), false)),
                Err(NotFound::Failed(e)) => return Err(e),
            };
            if current.mode != KindMode::Draining {
                return Ok((current, false));
            }
            let normal = KindVersion::normal(current.version.clone());
            if set_if(&session, &version_path, &normal, stat.version).await?.is_some() {
                self.kinds.remember(kind, &normal);
                info!(%kind, version = %normal.version, "rotation aborted by request");
                return Ok((normal, true));
            }
        }
        Err(BackendError::Unavailable(format!(
            "the version node of {kind} kept changing; not aborted"
        )))
    }

    /// [`Backend::count_locks`](crate::backend::Backend::count_locks) on ZooKeeper.
    pub(super) async fn count_kind_locks(&self, kind: &Arc<str>, version: &str) -> Result<u32, BackendError> {
        let session = self.pool.pick()?;
        let dir = self.kinds.layout().version_dir(kind, version);
        Ok(census(&session, &dir).await?.count)
    }

    /// Deletes `dir` and everything under it (lock directories and any stray
    /// node); returns how many nodes could not be deleted.
    async fn delete_subtree(&self, session: &ZkSession, dir: &str) -> u32 {
        let mut left = 0;
        for _ in 0..CLEANUP_PASSES {
            left = 0;
            let ids = match list(session, dir).await {
                Ok(ids) => ids,
                Err(_) => return u32::MAX,
            };
            for id in ids {
                let sub = format!("{dir}/{id}");
                let nodes = list(session, &sub).await.unwrap_or_default();
                let deletes = nodes.iter().map(|n| {
                    let path = format!("{sub}/{n}");
                    async move { super::nodes::delete_node(session, &path).await }
                });
                left += join_all(deletes).await.into_iter().filter(Result::is_err).count();
                if super::nodes::delete_node(session, &sub).await.is_err() {
                    left += 1;
                }
                self.kinds.forget_dir(&sub);
            }
            match session.retry(|c| async move { c.delete(dir, None).await }).await {
                Ok(Ok(()) | Err(ZkError::NoNode)) => return 0,
                // Something was created meanwhile (a backing-out acquire):
                // another pass.
                Ok(Err(ZkError::NotEmpty)) => {}
                Ok(Err(_)) | Err(_) => left += 1,
            }
        }
        u32::try_from(left).unwrap_or(u32::MAX).max(1)
    }
}

/// Creates the claim node; `None` if another driver holds it.
async fn claim(
    session: &Arc<ZkSession>,
    layout: &Layout,
    kind: &str,
    from: &str,
    to: &str,
) -> Result<Option<ClaimNode>, BackendError> {
    let path = layout.rotation_path(kind);
    let data = format!(
        "{from} -> {to}, driven through ZooKeeper session {:#x} by {} (pid {})",
        session.session_id(),
        host_name(),
        std::process::id()
    );
    let (node, data) = (path.as_str(), data.as_bytes());
    match session
        .retry(|c| async move { c.create(node, data, &CLAIM).await })
        .await?
    {
        Ok(_) => Ok(Some(ClaimNode {
            session: session.clone(),
            path,
        })),
        Err(ZkError::NodeExists) => {
            // Ours, if an earlier send of this create went through before its
            // connection broke.
            let stat = session.retry(|c| async move { c.check_stat(node).await }).await?;
            match stat {
                Ok(Some(stat)) if stat.ephemeral_owner == session.session_id() => Ok(Some(ClaimNode {
                    session: session.clone(),
                    path,
                })),
                Ok(_) => Ok(None),
                Err(e) => Err(map_err("check rotation claim", e)),
            }
        }
        Err(e) => Err(map_err("create rotation claim", e)),
    }
}

/// Who holds a kind's rotation claim, for a refusal.
async fn read_claim(session: &ZkSession, path: &str) -> String {
    match session.retry(|c| async move { c.get_data(path).await }).await {
        Ok(Ok((data, _))) => String::from_utf8_lossy(&data).into_owned(),
        _ => "its driver could not be read".to_owned(),
    }
}

/// Why the version node could not be read.
enum NotFound {
    /// It does not exist.
    Missing,
    /// Any other failure.
    Failed(BackendError),
}

impl From<BackendError> for NotFound {
    fn from(e: BackendError) -> NotFound {
        NotFound::Failed(e)
    }
}

impl From<NotFound> for BackendError {
    fn from(e: NotFound) -> BackendError {
        match e {
            NotFound::Missing => BackendError::Internal("the kind's version node is missing".into()),
            NotFound::Failed(e) => e,
        }
    }
}

/// The version node's content and Stat.
async fn read_version_node(session: &ZkSession, path: &str) -> Result<(KindVersion, Stat), NotFound> {
    match session.retry(|c| async move { c.get_data(path).await }).await? {
        Ok((data, stat)) => Ok((layout::decode_version(&data).map_err(BackendError::Internal)?, stat)),
        Err(ZkError::NoNode) => Err(NotFound::Missing),
        Err(e) => Err(NotFound::Failed(map_err("read version node", e))),
    }
}

/// Writes the version node if its data version is still `expected`; `None`
/// if someone changed it first.
///
/// A `setData` whose reply was lost may have been applied: a retry then
/// fails with `BadVersion` although the write is ours. It is told apart by
/// reading the node back: our exact data at `expected + 1`.
async fn set_if(
    session: &ZkSession,
    path: &str,
    to: &KindVersion,
    expected: i32,
) -> Result<Option<Stat>, BackendError> {
    let data = layout::encode_version(to);
    let bytes = data.as_slice();
    match session
        .retry(|c| async move { c.set_data(path, bytes, Some(expected)).await })
        .await?
    {
        Ok(stat) => Ok(Some(stat)),
        Err(ZkError::BadVersion) => match read_version_node(session, path).await {
            Ok((now, stat)) if stat.version == expected.wrapping_add(1) && layout::encode_version(&now) == data => {
                Ok(Some(stat))
            }
            Ok(_) | Err(NotFound::Missing) => Ok(None),
            Err(NotFound::Failed(e)) => Err(e),
        },
        Err(e) => Err(map_err("write version node", e)),
    }
}

/// Children of `path`; a missing node has none.
async fn list(session: &ZkSession, path: &str) -> Result<Vec<String>, BackendError> {
    match session.retry(|c| async move { c.list_children(path).await }).await? {
        Ok(children) => Ok(children),
        Err(ZkError::NoNode) => Ok(Vec::new()),
        Err(e) => Err(map_err("list", e)),
    }
}

/// Counts every node under the version directory `dir`, describes the first
/// holders, and watches every non-empty lock directory (and `dir`).
async fn census(session: &ZkSession, dir: &str) -> Result<Census, BackendError> {
    let (ids, dir_watch) = match session
        .retry(|c| async move { c.list_and_watch_children(dir).await })
        .await?
    {
        Ok((ids, watch)) => (ids, Some(watch)),
        Err(ZkError::NoNode) => (Vec::new(), None),
        Err(e) => return Err(map_err("list version directory", e)),
    };
    // One pipelined round: every directory's children, each with a watch.
    let listings = join_all(ids.iter().map(|id| {
        let sub = format!("{dir}/{id}");
        async move {
            let path = sub.as_str();
            let found = session
                .retry(|c| async move { c.list_and_watch_children(path).await })
                .await;
            (sub, found)
        }
    }))
    .await;
    let mut census = Census {
        count: 0,
        holders: Vec::new(),
        watches: dir_watch.into_iter().collect(),
    };
    let mut heads = Vec::new();
    for (sub, found) in listings {
        match found? {
            Ok((children, watch)) if !children.is_empty() => {
                census.count = census
                    .count
                    .saturating_add(u32::try_from(children.len()).unwrap_or(u32::MAX));
                census.watches.push(watch);
                if heads.len() < MAX_PROGRESS_HOLDERS {
                    let contenders = layout::sorted_contenders(&children);
                    let head = contenders.first().map_or(children[0].as_str(), |c| c.name).to_owned();
                    heads.push((sub, head, children.len() - 1));
                }
            }
            // Empty (about to be reaped), or reaped already.
            Ok(_) | Err(ZkError::NoNode) => {}
            Err(e) => return Err(map_err("list lock directory", e)),
        }
    }
    let described = join_all(heads.iter().map(|(sub, head, _)| {
        let path = format!("{sub}/{head}");
        async move {
            let path = path.as_str();
            session.retry(|c| async move { c.get_data(path).await }).await
        }
    }))
    .await;
    for ((sub, head, waiting), found) in heads.into_iter().zip(described) {
        let id = sub.rsplit('/').next().unwrap_or_default().to_owned();
        let mut holder = match found {
            Ok(Ok((data, stat))) => describe_node(&head, &data, &stat),
            _ => head,
        };
        if waiting > 0 {
            holder.push_str(&format!(" (+{waiting} waiting)"));
        }
        census.holders.push(RotationHolder { id, holder });
    }
    Ok(census)
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

/// ` (held: a by x; b by y)` for an abort message.
fn describe(holders: &[RotationHolder]) -> String {
    if holders.is_empty() {
        return String::new();
    }
    let list: Vec<String> = holders.iter().map(|h| format!("{} by {}", h.id, h.holder)).collect();
    format!(" (held: {})", list.join("; "))
}

fn aborted_by_someone(kind: &str, from: &str, now: &KindVersion) -> RotateOutcome {
    warn!(%kind, from, now = %now.version, mode = now.mode.name(), "rotation aborted by someone else");
    RotateOutcome::Aborted(format!(
        "the rotation of {kind} was aborted elsewhere (ROTATE_ABORT, or a waiting acquire after the drain timeout); {kind} is now {} at {}",
        now.mode.name(),
        now.version
    ))
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown host".to_owned())
}

fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}
