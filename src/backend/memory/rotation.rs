//! Kinds of the memory backend: each kind's version and mode, and version
//! rotation with the same semantics as on ZooKeeper (PROTOCOL.md, "Version
//! rotation"), so the conformance suite holds both to one standard.
//!
//! The lock table is keyed by `(kind, id)` whatever the version, so two
//! holders of one id under two versions cannot exist here at all; what this
//! file keeps exact is everything a user sees: acquires wait while a kind
//! drains, grants report the version they were queued under, the switch
//! happens only once nothing of the kind is held or queued, and an abandoned
//! drain is aborted by the first acquire that waits past its deadline.
//!
//! Lock order: the `first_rotation` gate, then a kind's entry in `kinds`,
//! then a key's entry in `keys`, never the other way round. An acquire holds
//! its kind's entry (read) while it joins the key's queue — or, for a kind
//! with no entry yet, the gate (read) — so once a rotation has made the
//! entry (under the gate, written) and marked the kind draining (the entry,
//! written), every acquire that saw it normal has already queued and is
//! counted by the drain.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clastor_protocol::{KindMode, RotationHolder, RotationPhase, RotationProgress};
use tokio::sync::watch;
use tokio::time::Instant;

use super::MemoryState;
use crate::backend::{BackendError, KindVersion, RotateOutcome, RotateRequest, RotationStart};

/// Longest pause between two progress reports while a kind drains.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Shortest pause between two progress reports caused by releases.
const PROGRESS_MIN_GAP: Duration = Duration::from_millis(250);

/// One kind's version, mode and rotation (absent from the table: `v1`,
/// normal, never rotated).
#[derive(Debug)]
pub(super) struct KindState {
    pub(super) current: KindVersion,
    /// A rotation is being driven (the claim: one driver per kind).
    driver: bool,
    /// The version the last completed rotation switched away from.
    previous: Option<Arc<str>>,
    /// Bumped by every change of `current` (a mark, resume, switch, abort).
    epoch: u64,
    /// Wakes acquires waiting on a draining kind (on every change of
    /// `current`) and the drain (on every release of the kind while it drains).
    pub(super) changed: watch::Sender<()>,
}

impl KindState {
    fn new() -> KindState {
        KindState {
            current: KindVersion::normal(super::INITIAL_VERSION),
            driver: false,
            previous: None,
            epoch: 0,
            changed: watch::Sender::new(()),
        }
    }

    fn set(&mut self, current: KindVersion) {
        self.current = current;
        self.epoch += 1;
        self.changed.send_replace(());
    }
}

/// What an acquire learned about its kind.
pub(super) enum KindGate {
    /// Go ahead under this version (the kind's entry stays locked by the
    /// caller's guard while it queues).
    Open(Arc<str>),
    /// The kind drains: wait for a change, until `abandoned_at` at most (the
    /// drain deadline, when no driver is left to abort it).
    Draining {
        changed: watch::Receiver<()>,
        abandoned_at: Option<Instant>,
    },
}

impl MemoryState {
    /// Whether `kind`'s acquires may go ahead, and under which version.
    pub(super) fn gate(&self, kind: &KindState) -> KindGate {
        match kind.current.mode {
            KindMode::Normal => KindGate::Open(kind.current.version.clone()),
            KindMode::Draining => KindGate::Draining {
                changed: kind.changed.subscribe(),
                abandoned_at: (!kind.driver)
                    .then(|| kind.current.drain_left())
                    .flatten()
                    .map(|left| Instant::now() + left),
            },
        }
    }

    /// Called by an acquire that waited on a draining kind until its drain
    /// deadline: aborts the rotation if nobody drives it any more.
    pub(super) fn abort_abandoned(&self, kind: &Arc<str>) {
        if let Some(mut k) = self.kinds.get_mut(kind)
            && !k.driver
            && k.current.mode == KindMode::Draining
            && k.current.drain_left().is_some_and(|left| left.is_zero())
        {
            tracing::warn!(%kind, version = %k.current.version, "drain deadline passed with no rotation driving it; aborting it");
            let version = k.current.version.clone();
            k.set(KindVersion::normal(version));
            self.draining.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Wakes a drain of `kind` after one of its keys changed.
    pub(super) fn kind_changed(&self, kind: &Arc<str>) {
        if self.draining.load(Ordering::Acquire) == 0 {
            return;
        }
        if let Some(k) = self.kinds.get(kind)
            && k.current.mode == KindMode::Draining
        {
            k.changed.send_replace(());
        }
    }

    /// The kind's version and mode.
    pub(super) fn kind_version(&self, kind: &str) -> KindVersion {
        self.kinds
            .get(kind)
            .map_or_else(|| KindVersion::normal(super::INITIAL_VERSION), |k| k.current.clone())
    }

    /// Holders and waiters of `kind`, with up to `limit` of them described.
    fn census(&self, kind: &str, limit: usize) -> (u32, Vec<RotationHolder>) {
        let mut count = 0u32;
        let mut holders = Vec::new();
        for entry in self.keys.iter().filter(|e| e.key().kind() == kind) {
            let n = entry.holders.len() + entry.waiters.len();
            count = count.saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
            if holders.len() < limit && n > 0 {
                let waiting = entry.waiters.len();
                holders.push(RotationHolder {
                    id: entry.key().id().to_owned(),
                    holder: if waiting > 0 {
                        format!("this server (+{waiting} waiting)")
                    } else {
                        "this server".to_owned()
                    },
                });
            }
        }
        (count, holders)
    }

    /// Lock entries of `kind` under `version` (every entry of a kind is under
    /// its current version).
    pub(super) fn count_locks(&self, kind: &str, version: &str) -> u32 {
        if *self.kind_version(kind).version != *version {
            return 0;
        }
        self.census(kind, 0).0
    }

    /// `ROTATE_ABORT`.
    pub(super) fn abort_rotation(&self, kind: &Arc<str>) -> (KindVersion, bool) {
        let Some(mut k) = self.kinds.get_mut(kind) else {
            return (KindVersion::normal(super::INITIAL_VERSION), false);
        };
        if k.current.mode != KindMode::Draining {
            return (k.current.clone(), false);
        }
        let normal = KindVersion::normal(k.current.version.clone());
        k.set(normal.clone());
        self.draining.fetch_sub(1, Ordering::AcqRel);
        tracing::info!(%kind, version = %normal.version, "rotation aborted by request");
        (normal, true)
    }

    /// `ROTATE`: see [`crate::backend::Backend::rotate`].
    pub(super) async fn rotate(self: &Arc<Self>, req: RotateRequest<'_>) -> Result<RotateOutcome, BackendError> {
        let RotateRequest {
            kind,
            from,
            to,
            drain_timeout,
            // One layout for every kind: the engine refuses another and passes none.
            layout: _,
            progress,
        } = req;
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
        // 1. Claim, check and mark, in one step under the kind's entry.
        let (mut changed, epoch, _claim) = {
            let mut k = match self.kinds.get_mut(kind) {
                Some(k) => k,
                None => {
                    let _gate = self
                        .first_rotation
                        .write()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    self.kinds.entry(kind.clone()).or_insert_with(KindState::new)
                }
            };
            if k.driver {
                let to = k.current.rotation.as_ref().map_or("?", |r| &*r.to).to_owned();
                return Ok(RotateOutcome::Refused(format!(
                    "another rotation of {kind} is in progress ({} -> {to})",
                    k.current.version
                )));
            }
            match k.current.rotation_start(kind, k.previous.as_deref(), from, to) {
                // Resuming after the switch: nothing is left to clean up in memory.
                RotationStart::Switched => {
                    return Ok(RotateOutcome::Completed {
                        drained: Duration::ZERO,
                        leftover: 0,
                    });
                }
                RotationStart::Mark => {
                    self.draining.fetch_add(1, Ordering::AcqRel);
                }
                RotationStart::Resume => tracing::info!(%kind, from, to, "resuming a rotation left draining"),
                RotationStart::Refuse(why) => return Ok(RotateOutcome::Refused(why)),
            }
            k.set(KindVersion::draining(from, to, drain_timeout));
            k.driver = true;
            (
                k.changed.subscribe(),
                k.epoch,
                Claim {
                    state: self.clone(),
                    kind: kind.clone(),
                },
            )
        };
        tracing::info!(%kind, from, to, ?drain_timeout, "rotation started: draining");
        // 2. Drain.
        let (mut remaining, holders) = self.census(kind, clastor_protocol::MAX_PROGRESS_HOLDERS);
        report(RotationPhase::Draining, remaining, holders);
        let mut reported = (Instant::now(), remaining);
        loop {
            if self.closed.load(Ordering::Acquire) {
                return Err(BackendError::Closed);
            }
            if remaining == 0 {
                // 3. Switch, if still ours and still empty (checked under the
                // kind's entry, which every new acquire of the kind reads).
                let mut k = self.kinds.entry(kind.clone()).or_insert_with(KindState::new);
                if k.epoch != epoch {
                    return Ok(aborted_by_someone(kind, from));
                }
                remaining = self.census(kind, 0).0;
                if remaining == 0 {
                    k.set(KindVersion::normal(Arc::from(to)));
                    k.previous = Some(Arc::from(from));
                    self.draining.fetch_sub(1, Ordering::AcqRel);
                    drop(k);
                    let drained = started.elapsed();
                    tracing::info!(%kind, from, to, ?drained, "rotation completed");
                    report(RotationPhase::Switched, 0, Vec::new());
                    return Ok(RotateOutcome::Completed { drained, leftover: 0 });
                }
                continue;
            }
            if Instant::now() >= deadline {
                let mut k = self.kinds.entry(kind.clone()).or_insert_with(KindState::new);
                if k.epoch != epoch {
                    return Ok(aborted_by_someone(kind, from));
                }
                k.set(KindVersion::normal(Arc::from(from)));
                self.draining.fetch_sub(1, Ordering::AcqRel);
                drop(k);
                tracing::warn!(%kind, from, to, remaining, "drain timed out; rotation aborted");
                return Ok(RotateOutcome::Aborted(format!(
                    "the drain did not finish within {drain_timeout:?}: {remaining} lock(s) of {kind} remain under {from}; {kind} is back to normal on {from}, nothing was lost"
                )));
            }
            let next_report = reported.0 + PROGRESS_EVERY;
            tokio::select! {
                _ = changed.changed() => {}
                () = tokio::time::sleep_until(next_report.min(deadline)) => {}
            }
            if self.kinds.get(kind).is_none_or(|k| k.epoch != epoch) {
                return Ok(aborted_by_someone(kind, from));
            }
            let (now_remaining, holders) = self.census(kind, clastor_protocol::MAX_PROGRESS_HOLDERS);
            remaining = now_remaining;
            let since = reported.0.elapsed();
            if remaining > 0 && ((remaining != reported.1 && since >= PROGRESS_MIN_GAP) || since >= PROGRESS_EVERY) {
                report(RotationPhase::Draining, remaining, holders);
                reported = (Instant::now(), remaining);
            }
        }
    }
}

/// The driver's claim on a kind's rotation: released when the rotation ends
/// or its future is dropped (the kind then stays as it is, resumable).
struct Claim {
    state: Arc<MemoryState>,
    kind: Arc<str>,
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Some(mut k) = self.state.kinds.get_mut(&self.kind) {
            k.driver = false;
            // Waiters re-read the kind: with no driver left, they now know
            // when to abort an abandoned drain.
            k.changed.send_replace(());
        }
    }
}

fn aborted_by_someone(kind: &str, from: &str) -> RotateOutcome {
    tracing::warn!(%kind, from, "rotation aborted by someone else (ROTATE_ABORT, or an acquire after the deadline)");
    RotateOutcome::Aborted(format!(
        "the rotation of {kind} was aborted (ROTATE_ABORT); {kind} is normal on {from}"
    ))
}

fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}
