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
//! - **Drain**: `drain.rs` keeps a count of what is left under `{kind}/{from}`
//!   with child watches; the switch waits for a full census that finds
//!   nothing. Progress goes out at the start, when the count changes (at
//!   most four times a second) and at least every second.
//! - **Claim release**: awaited before the rotation answers (so the same
//!   rotation sent again right after is never refused as "in progress"),
//!   and conditional on the claim's uuid, so a driver never deletes another
//!   driver's claim — even one on the same pooled session.
//! - **A driver that fails** (its session lost, ZooKeeper unreachable)
//!   tries, once, to put the kind back to normal on `from` (conditionally, as
//!   always) before it reports the failure, so a kind is left draining only
//!   when even that write cannot be made; then the recovery of PROTOCOL.md
//!   applies (resume, `ROTATE_ABORT`, or the first acquire waiting past the
//!   deadline).
//! - **Resuming after the switch** is recognised by the `prev=` line the
//!   switch writes into the version node, so a `ROTATE` with a mistyped
//!   `from` is refused rather than taken for a finished rotation.

use std::sync::Arc;
use std::time::Duration;

use clastor_protocol::{KindLayout, KindMode, RotationHolder, RotationPhase, RotationProgress};
use tokio::time::Instant;
use tracing::{info, warn};
use uuid::Uuid;
use zookeeper_client::Stat;

use super::ZooKeeperBackend;
use super::drain::{Drain, count_nodes};
use super::error::{ZkError, map_err};
use super::layout::{self, Layout};
use super::session::{MAX_ATTEMPTS, ZkSession};
use super::watches::spawn_background;
use crate::backend::{BackendError, KindVersion, RotateOutcome, RotateRequest, RotationStart};
use crate::backoff::Backoff;

/// Longest pause between two progress reports while a kind drains.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Shortest pause between two progress reports caused by changes.
const PROGRESS_MIN_GAP: Duration = Duration::from_millis(250);

/// Passes over the old subtree before the clean-up gives up on what is left.
const CLEANUP_PASSES: usize = 3;

/// The claim on a kind's rotation: an ephemeral node whose data starts with
/// this driver's uuid.
struct Claim {
    session: Arc<ZkSession>,
    path: String,
    uuid: String,
    released: bool,
}

impl Claim {
    /// Creates the claim node; `None` if another driver holds it.
    async fn take(
        session: &Arc<ZkSession>,
        layout: &Layout,
        kind: &str,
        from: &str,
        to: &str,
    ) -> Result<Option<Claim>, BackendError> {
        let path = layout.rotation_path(kind);
        let uuid = Uuid::new_v4().to_string();
        let data = format!(
            "{uuid}\n{from} -> {to}, driven through ZooKeeper session {:#x} by {} (pid {})",
            session.session_id(),
            host_name(),
            std::process::id()
        );
        let (node, bytes) = (path.as_str(), data.as_bytes());
        let ephemeral = &layout.nodes().ephemeral();
        let claim = |path| Claim {
            session: session.clone(),
            path,
            uuid: uuid.clone(),
            released: false,
        };
        match session
            .retry(|c| async move { c.create(node, bytes, ephemeral).await })
            .await?
        {
            Ok(_) => Ok(Some(claim(path))),
            // Ours only if an earlier send of this very create went through
            // before its connection broke: the uuid says.
            Err(ZkError::NodeExists) => match read_claim(session, node).await? {
                Some((owner, _)) if owner == uuid => Ok(Some(claim(path))),
                _ => Ok(None),
            },
            Err(e) => Err(map_err("create rotation claim", e)),
        }
    }

    /// Deletes the claim (if it is still ours), before the rotation answers.
    async fn release(mut self) {
        self.released = true;
        if let Err(e) = delete_claim(&self.session, &self.path, &self.uuid).await {
            warn!(path = %self.path, error = %e, "could not delete the rotation claim; it goes with its session");
        }
    }
}

impl Drop for Claim {
    /// A driver cancelled mid-way (its connection closed): the claim goes in
    /// the background, retried until it is gone or its session ends.
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let (session, path, uuid) = (
            self.session.clone(),
            std::mem::take(&mut self.path),
            std::mem::take(&mut self.uuid),
        );
        spawn_background(async move {
            let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
            while let Err(e) = delete_claim(&session, &path, &uuid).await {
                warn!(%path, error = %e, retry_in = ?backoff.delay(), "could not delete the rotation claim; trying again");
                if !backoff.wait_or(session.retired()).await {
                    return;
                }
            }
        });
    }
}

/// Deletes the claim node at `path` if its data starts with `uuid`.
async fn delete_claim(session: &ZkSession, path: &str, uuid: &str) -> Result<(), BackendError> {
    for _ in 0..MAX_ATTEMPTS {
        let stat = match read_claim(session, path).await? {
            Some((owner, stat)) if owner == uuid => stat,
            // Gone, or another driver's by now.
            _ => return Ok(()),
        };
        let version = stat.version;
        match session
            .retry(|c| async move { c.delete(path, Some(version)).await })
            .await?
        {
            Ok(()) | Err(ZkError::NoNode) => return Ok(()),
            // Changed under us: look again.
            Err(ZkError::BadVersion) => {}
            Err(e) => return Err(map_err("delete rotation claim", e)),
        }
    }
    Err(BackendError::Unavailable(format!("could not delete {path}")))
}

/// The claim at `path`: its owner's uuid (first line) and Stat; `None` if
/// there is none.
async fn read_claim(session: &ZkSession, path: &str) -> Result<Option<(String, Stat)>, BackendError> {
    match session.retry(|c| async move { c.get_data(path).await }).await? {
        Ok((data, stat)) => {
            let text = String::from_utf8_lossy(&data);
            Ok(Some((text.lines().next().unwrap_or_default().to_owned(), stat)))
        }
        Err(ZkError::NoNode) => Ok(None),
        Err(e) => Err(map_err("read rotation claim", e)),
    }
}

/// Who holds a kind's rotation claim, for a refusal.
async fn describe_claim(session: &ZkSession, path: &str) -> String {
    match session.retry(|c| async move { c.get_data(path).await }).await {
        Ok(Ok((data, _))) => {
            let text = String::from_utf8_lossy(&data);
            text.split_once('\n')
                .map_or_else(|| text.to_string(), |(_, rest)| rest.to_owned())
        }
        _ => "its driver could not be read".to_owned(),
    }
}

/// One rotation being driven: what it needs at every step.
struct Driver<'a> {
    session: &'a Arc<ZkSession>,
    kind: &'a Arc<str>,
    from: &'a str,
    to: &'a str,
    /// The layout `to` gets, if the request named one.
    to_layout: Option<KindLayout>,
    version_path: String,
    started: Instant,
    deadline: Instant,
    progress: &'a (dyn Fn(RotationProgress) + Send + Sync),
}

impl Driver<'_> {
    fn report(&self, phase: RotationPhase, remaining: u32, holders: Vec<RotationHolder>) {
        (self.progress)(RotationProgress {
            kind: self.kind.to_string(),
            from: self.from.to_owned(),
            to: self.to.to_owned(),
            phase,
            remaining,
            elapsed_ms: millis(self.started.elapsed()),
            left_ms: millis(self.deadline.saturating_duration_since(Instant::now())),
            holders,
        });
    }
}

impl ZooKeeperBackend {
    /// [`Backend::rotate`](crate::backend::Backend::rotate) on ZooKeeper.
    pub(super) async fn rotate_kind(&self, req: RotateRequest<'_>) -> Result<RotateOutcome, BackendError> {
        let session = self.pool.pick()?;
        let layout = self.kinds.layout();
        self.kinds.ensure_kind(&session, req.kind).await?;
        // 1. Claim.
        let Some(claim) = Claim::take(&session, layout, req.kind, req.from, req.to).await? else {
            let by = describe_claim(&session, &layout.rotation_path(req.kind)).await;
            return Ok(RotateOutcome::Refused(format!(
                "another rotation of {} is in progress ({by})",
                req.kind
            )));
        };
        let started = Instant::now();
        let driver = Driver {
            session: &session,
            kind: req.kind,
            from: req.from,
            to: req.to,
            to_layout: req.layout,
            version_path: layout.version_path(req.kind),
            started,
            deadline: started + req.drain_timeout,
            progress: req.progress,
        };
        let outcome = self.drive(&driver, req.drain_timeout).await;
        claim.release().await;
        outcome
    }

    /// Steps 2 to 5: mark, drain, switch, clean up.
    async fn drive(&self, d: &Driver<'_>, drain_timeout: Duration) -> Result<RotateOutcome, BackendError> {
        let (kind, from, to) = (d.kind, d.from, d.to);
        let layout = self.kinds.layout();
        // 2. Mark draining (or resume), conditioned on what we read.
        let mut marked = None;
        let mut draining = KindVersion::draining(from, to, drain_timeout);
        for _ in 0..MAX_ATTEMPTS {
            let (current, stat, previous) = read_version_node(d.session, &d.version_path).await?;
            // The target's layout: as asked, or as a resumed rotation set
            // it, or the one `from` has.
            let resumed = current.rotation.as_ref().map(|r| r.layout);
            let to_layout = match (d.to_layout, current.mode, resumed) {
                (Some(asked), KindMode::Draining, Some(set))
                    if asked != set && current.rotation.as_ref().is_some_and(|r| *r.to == *to) =>
                {
                    return Ok(RotateOutcome::Refused(format!(
                        "{kind} is draining towards {to} in the {} layout, not {}; abort it first (clastor rotate --abort {kind})",
                        set.name(),
                        asked.name()
                    )));
                }
                (Some(asked), _, _) => asked,
                (None, KindMode::Draining, Some(set)) => set,
                (None, _, _) => current.layout,
            };
            draining = KindVersion::draining(from, to, drain_timeout).with_layouts(current.layout, to_layout);
            match current.rotation_start(kind, previous.as_deref(), from, to) {
                RotationStart::Switched if d.to_layout.is_some_and(|asked| asked != current.layout) => {
                    return Ok(RotateOutcome::Refused(format!(
                        "{kind} was already rotated from {from} to {to}, in the {} layout, not {}",
                        current.layout.name(),
                        d.to_layout.map_or("", KindLayout::name)
                    )));
                }
                RotationStart::Switched => {
                    // The driver died while cleaning up.
                    info!(%kind, from, to, "resuming a rotation after its switch: cleaning up");
                    d.report(RotationPhase::Switched, 0, Vec::new());
                    let leftover = self.delete_subtree(d.session, &layout.version_dir(kind, from)).await;
                    return Ok(RotateOutcome::Completed {
                        drained: Duration::ZERO,
                        leftover,
                    });
                }
                RotationStart::Mark => {}
                RotationStart::Resume => info!(%kind, from, to, "resuming a rotation left draining"),
                RotationStart::Refuse(why) => return Ok(RotateOutcome::Refused(why)),
            }
            if let Some(stat) = set_if(
                d.session,
                &d.version_path,
                &layout::encode_version(&draining),
                stat.version,
            )
            .await?
            {
                marked = Some(stat.version);
                break;
            }
        }
        let Some(data_version) = marked else {
            return Err(BackendError::Unavailable(format!(
                "the version node of {kind} kept changing; rotation not started"
            )));
        };
        self.kinds.remember(kind, &draining);
        info!(%kind, from, to, ?drain_timeout, "rotation started: draining");
        match self.drain_and_switch(d, &draining, drain_timeout, data_version).await {
            Err(e) => {
                // Leave the kind normal on `from` if we still can (and if
                // nobody changed it since our mark).
                let normal = layout::encode_version(&draining.aborted());
                let undone = match self.pool.pick() {
                    Ok(s) => set_if(&s, &d.version_path, &normal, data_version)
                        .await
                        .ok()
                        .flatten()
                        .is_some(),
                    Err(_) => false,
                };
                warn!(%kind, from, to, error = %e, undone, "rotation failed; {}", if undone { "the kind is back to normal" } else { "the kind may be left draining (resume it, or abort it)" });
                Err(e)
            }
            ok => ok,
        }
    }

    /// Steps 3 to 5, once the kind is marked (at `data_version`).
    async fn drain_and_switch(
        &self,
        d: &Driver<'_>,
        draining: &KindVersion,
        drain_timeout: Duration,
        data_version: i32,
    ) -> Result<RotateOutcome, BackendError> {
        let (session, kind, from, to) = (d.session, d.kind, d.from, d.to);
        let from_dir = self.kinds.layout().version_dir(kind, from);
        // 3. Drain.
        let mut drain = Drain::start(session, from_dir.clone()).await?;
        let mut reported: Option<(Instant, u32)> = None;
        loop {
            // Watch the version node too: an abort (ours or anyone's) shows there.
            let node = d.version_path.as_str();
            let (data, stat, version_watch) = session
                .retry(|c| async move { c.get_and_watch_data(node).await })
                .await?
                .map_err(|e| map_err("watch version node", e))?;
            if stat.version != data_version {
                let now = layout::decode_version(&data).map_err(BackendError::Internal)?;
                self.kinds.remember(kind, &now);
                return Ok(aborted_by_someone(kind, from, &now));
            }
            let mut count = drain.remaining();
            if count == 0 {
                // Only a full census may conclude "empty".
                drain.full(session).await?;
                count = drain.remaining();
                if count == 0 {
                    if reported.is_none() {
                        d.report(RotationPhase::Draining, 0, Vec::new());
                    }
                    break;
                }
            }
            let now = Instant::now();
            if now >= d.deadline {
                // Back to normal on `from`, unless someone beat us to a change.
                let holders = drain.holders(session).await;
                let normal = draining.aborted();
                return match set_if(session, &d.version_path, &layout::encode_version(&normal), data_version).await? {
                    Some(_) => {
                        self.kinds.remember(kind, &normal);
                        warn!(%kind, from, to, remaining = count, "drain timed out; rotation aborted");
                        Ok(RotateOutcome::Aborted(format!(
                            "the drain did not finish within {drain_timeout:?}: {count} lock node(s) of {kind} remain under {from}{}; {kind} is back to normal on {from}, nothing was lost",
                            describe(&holders)
                        )))
                    }
                    None => {
                        let (now, _, _) = read_version_node(session, &d.version_path).await?;
                        Ok(aborted_by_someone(kind, from, &now))
                    }
                };
            }
            let due = match reported {
                None => true,
                Some((at, n)) => now - at >= PROGRESS_EVERY || (n != count && now - at >= PROGRESS_MIN_GAP),
            };
            if due {
                d.report(RotationPhase::Draining, count, drain.holders(session).await);
                reported = Some((now, count));
            }
            let next_report = reported.map_or(now, |(at, _)| at + PROGRESS_EVERY);
            tokio::select! {
                changed = drain.changed(session) => changed?,
                _ = version_watch.changed() => {}
                () = tokio::time::sleep_until(next_report.min(d.deadline)) => {}
                () = session.retired() => return Err(session.gone()),
            }
        }
        // 4. Switch: `to`, normal, if the node is still as we left it; `prev`
        // lets a resumed rotation recognise its own switch.
        let to_layout = draining.rotation.as_ref().map_or(draining.layout, |r| r.layout);
        let switched = KindVersion::normal(to).with_layout(to_layout);
        let data = layout::encode_switched(to, from, to_layout);
        if set_if(session, &d.version_path, &data, data_version).await?.is_none() {
            let (now, _, _) = read_version_node(session, &d.version_path).await?;
            return Ok(aborted_by_someone(kind, from, &now));
        }
        self.kinds.remember(kind, &switched);
        let drained = d.started.elapsed();
        info!(%kind, from, to, ?drained, "rotation switched; deleting the old version's subtree");
        d.report(RotationPhase::Switched, 0, Vec::new());
        // 5. Clean up.
        let leftover = self.delete_subtree(session, &from_dir).await;
        if leftover > 0 {
            warn!(%kind, from, leftover, "nodes left under the old version (a foreign client still creating there?)");
        }
        Ok(RotateOutcome::Completed { drained, leftover })
    }

    /// [`Backend::abort_rotation`](crate::backend::Backend::abort_rotation) on ZooKeeper.
    pub(super) async fn abort_kind_rotation(&self, kind: &Arc<str>) -> Result<(KindVersion, bool), BackendError> {
        let session = self.pool.pick()?;
        let version_path = self.kinds.layout().version_path(kind);
        for _ in 0..MAX_ATTEMPTS {
            let (current, stat, _) = match read_version_node(&session, &version_path).await {
                Ok(found) => found,
                // Never used: nothing to abort.
                Err(NotFound::Missing) => return Ok((layout::initial_version(), false)),
                Err(NotFound::Failed(e)) => return Err(e),
            };
            if current.mode != KindMode::Draining {
                return Ok((current, false));
            }
            let normal = current.aborted();
            if set_if(&session, &version_path, &layout::encode_version(&normal), stat.version)
                .await?
                .is_some()
            {
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
        count_nodes(&session, &self.kinds.layout().version_dir(kind, version)).await
    }

    /// Deletes `dir` and everything under it (lock directories and any stray
    /// node), pipelined per pass; returns how many nodes could not be deleted.
    async fn delete_subtree(&self, session: &ZkSession, dir: &str) -> u32 {
        let mut left = 0;
        for _ in 0..CLEANUP_PASSES {
            let Ok(ids) = list(session, dir).await else {
                return u32::MAX;
            };
            let subs: Vec<String> = ids.iter().map(|id| format!("{dir}/{id}")).collect();
            let listings = futures_util::future::join_all(subs.iter().map(|sub| list(session, sub))).await;
            let nodes: Vec<String> = subs
                .iter()
                .zip(listings)
                .flat_map(|(sub, l)| l.unwrap_or_default().into_iter().map(move |n| format!("{sub}/{n}")))
                .collect();
            let deleted =
                futures_util::future::join_all(nodes.iter().map(|n| super::nodes::delete_node(session, n))).await;
            left = deleted.iter().filter(|r| r.is_err()).count();
            let deleted =
                futures_util::future::join_all(subs.iter().map(|s| super::nodes::delete_node(session, s))).await;
            left += deleted.iter().filter(|r| r.is_err()).count();
            for sub in &subs {
                self.kinds.forget_dir(sub);
            }
            match session.retry(|c| async move { c.delete(dir, None).await }).await {
                Ok(Ok(()) | Err(ZkError::NoNode)) => return 0,
                // Something was created meanwhile (a backing-out acquire):
                // another pass.
                Ok(Err(ZkError::NotEmpty)) => left = left.max(1),
                Ok(Err(_)) | Err(_) => left += 1,
            }
        }
        u32::try_from(left).unwrap_or(u32::MAX)
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

/// The version node's content, Stat, and the version a switch left behind
/// (`prev=`, absent otherwise).
async fn read_version_node(session: &ZkSession, path: &str) -> Result<(KindVersion, Stat, Option<String>), NotFound> {
    match session.retry(|c| async move { c.get_data(path).await }).await? {
        Ok((data, stat)) => Ok((
            layout::decode_version(&data).map_err(BackendError::Internal)?,
            stat,
            layout::decode_previous(&data),
        )),
        Err(ZkError::NoNode) => Err(NotFound::Missing),
        Err(e) => Err(NotFound::Failed(map_err("read version node", e))),
    }
}

/// Writes `data` to the version node if its data version is still
/// `expected`; `None` if someone changed it first.
///
/// A `setData` whose reply was lost may have been applied: a retry then
/// fails with `BadVersion` although the write is ours. It is told apart by
/// reading the node back: our exact data at `expected + 1`.
async fn set_if(session: &ZkSession, path: &str, data: &[u8], expected: i32) -> Result<Option<Stat>, BackendError> {
    match session
        .retry(|c| async move { c.set_data(path, data, Some(expected)).await })
        .await?
    {
        Ok(stat) => Ok(Some(stat)),
        Err(ZkError::BadVersion) => match session.retry(|c| async move { c.get_data(path).await }).await? {
            Ok((now, stat)) if stat.version == expected.wrapping_add(1) && now == data => Ok(Some(stat)),
            Ok(_) | Err(ZkError::NoNode) => Ok(None),
            Err(e) => Err(map_err("read version node", e)),
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
