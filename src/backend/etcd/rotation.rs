//! Version rotation on etcd (PROTOCOL.md, "Version rotation"): claim, mark,
//! drain, switch, clean up — every step one transaction whose compare
//! decides it.
//!
//! - **Claim**: `{kind}/rotation`, put only if absent, with the driving
//!   server's lease: a second driver is refused "in progress"; the claim
//!   goes when the driver ends, is cancelled, or its server dies (with the
//!   lease), so a rotation can always be resumed. It is deleted only if it
//!   still holds this driver's value.
//! - **Mode**: the kind's version record. Every transition (mark, resume,
//!   switch, abort) is a put conditioned on the record's mod revision as the
//!   writer last saw it, so of a switch and an abort racing exactly one wins.
//! - **No acquire slips past the mark.** Every acquire's transaction puts
//!   its key only if the record's mod revision is the one it saw normal
//!   (`recipe.rs`); the mark changes it. So once marked, no key of a Clastor
//!   acquire appears under `from` any more, and a census that finds none
//!   there is final: the switch follows it. (Foreign clients — `etcdctl
//!   lock`, Go's Mutex — know nothing of versions; their keys under `from`
//!   are drained like ours while they last, and the clean-up deletes any
//!   put after the switch.)
//! - **Drain**: one watch over the kind's keys from the census' revision;
//!   every change recounts, and a change of the record by someone else
//!   (`ROTATE_ABORT`, an acquire aborting an abandoned drain) ends the
//!   rotation aborted. Progress goes out at the start, when the count
//!   changes (at most four times a second) and at least every second.
//! - **Resuming after the switch** is recognised by the record's `prev=`.

use std::sync::Arc;
use std::time::Duration;

use clastor_protocol::{KindLayout, KindMode, RotationHolder, RotationPhase, RotationProgress};
use etcd_client::{Compare, CompareOp, DeleteOptions, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse};
use tokio::time::Instant;
use tracing::{info, warn};

use super::EtcdClient;
use super::kinds::{Seen, seen_in};
use super::lease::Lease;
use super::watch::WatchMsg;
use super::{EtcdBackend, error};
use crate::backend::version_record::{encode_switched, encode_version};
use crate::backend::{BackendError, KindVersion, RotateOutcome, RotateRequest, RotationStart};
use crate::backoff::Backoff;

/// Longest pause between two progress reports while a kind drains.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Shortest pause between two progress reports caused by releases.
const PROGRESS_MIN_GAP: Duration = Duration::from_millis(250);

/// Times a transition is tried again after the record moved under it.
const MAX_RACES: u32 = 3;

/// This driver's claim on a kind's rotation; deleted (if still ours) when
/// released or dropped — in the background, retried until etcd confirms it
/// or the lease it lives on is gone, so a claim never outlives its rotation
/// on a lease the server keeps alive.
#[derive(Debug)]
struct Claim {
    client: EtcdClient,
    key: String,
    value: String,
    lease: Arc<Lease>,
    released: bool,
}

impl Claim {
    fn delete_if_ours(&self) -> Txn {
        Txn::new()
            .when([Compare::value(self.key.as_str(), CompareOp::Equal, self.value.as_str())])
            .and_then([TxnOp::delete(self.key.as_str(), None)])
    }

    /// Releases the claim and waits for it (so the same rotation sent again
    /// right after is not refused as "in progress"); if that cannot be
    /// confirmed now, the drop keeps trying.
    async fn release(mut self) {
        let txn = self.delete_if_ours();
        let deleted = error::retry("release a rotation claim", || {
            let mut kv = self.client.kv_client();
            let txn = txn.clone();
            async move { kv.txn(txn).await }
        })
        .await;
        match deleted {
            Ok(_) => self.released = true,
            Err(e) => {
                warn!(key = %self.key, error = %e, "cannot release a rotation claim yet; retrying in the background")
            }
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let (client, txn, lease) = (self.client.clone(), self.delete_if_ours(), self.lease.clone());
        let key = std::mem::take(&mut self.key);
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let mut pause = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
                loop {
                    let deleted = error::retry("release a rotation claim", || {
                        let mut kv = client.kv_client();
                        let txn = txn.clone();
                        async move { kv.txn(txn).await }
                    });
                    tokio::select! {
                        r = deleted => match r {
                            Ok(_) => return,
                            Err(e) => warn!(%key, error = %e, "cannot release a rotation claim yet; retrying"),
                        },
                        () = lease.until_retired() => return,
                    }
                    if !pause.wait_or(lease.until_retired()).await {
                        return;
                    }
                }
            });
        }
    }
}

/// What is left under a version: the count and some of the ids, at a revision.
struct Census {
    remaining: u32,
    holders: Vec<RotationHolder>,
    revision: i64,
}

impl EtcdBackend {
    /// A conditional write of the kind's record: whether it won, and the
    /// revision it was written at.
    async fn set_record(&self, kind: &str, expected_rev: i64, data: Vec<u8>) -> Result<Option<i64>, BackendError> {
        let key = self.keys.version_key(kind);
        let txn = Txn::new()
            .when([Compare::mod_revision(key.as_str(), CompareOp::Equal, expected_rev)])
            .and_then([TxnOp::put(key.as_str(), data.clone(), None::<PutOptions>)]);
        let resp = error::retry("write a kind's version", || {
            let mut kv = self.client.kv_client();
            let txn = txn.clone();
            async move { kv.txn(txn).await }
        })
        .await?;
        if resp.succeeded() {
            return Ok(Some(resp.header().map_or(expected_rev, |h| h.revision())));
        }
        // Lost to someone — or to our own earlier attempt, applied with its
        // answer lost: then the record holds exactly what we wrote, since.
        let now = error::retry("read a kind's version", || {
            let mut kv = self.client.kv_client();
            let key = key.clone();
            async move { kv.get(key, None).await }
        })
        .await?;
        Ok(now
            .kvs()
            .first()
            .filter(|kv| kv.value() == data.as_slice() && kv.mod_revision() > expected_rev)
            .map(etcd_client::KeyValue::mod_revision))
    }

    /// Lock keys under `{kind}/{version}/`, and up to a few of their ids.
    async fn census(&self, kind: &str, version: &str) -> Result<Census, BackendError> {
        let dir = self.keys.version_dir(kind, version);
        let resp = error::retry("count a version's locks", || {
            let mut kv = self.client.kv_client();
            let dir = dir.clone();
            async move {
                kv.get(
                    dir,
                    Some(GetOptions::new().with_prefix().with_keys_only().with_limit(256)),
                )
                .await
            }
        })
        .await?;
        let mut holders: Vec<RotationHolder> = Vec::new();
        for kv in resp.kvs() {
            let Some(rest) = kv.key().strip_prefix(dir.as_bytes()) else {
                continue;
            };
            let id = String::from_utf8_lossy(rest.split(|b| *b == b'/').next().unwrap_or(rest)).into_owned();
            if let Some(h) = holders.iter_mut().find(|h| h.id == id) {
                h.holder = "contended".to_owned();
            } else if holders.len() < clastor_protocol::MAX_PROGRESS_HOLDERS {
                holders.push(RotationHolder {
                    id,
                    holder: "held".to_owned(),
                });
            }
        }
        Ok(Census {
            remaining: u32::try_from(resp.count()).unwrap_or(u32::MAX),
            holders,
            revision: resp.header().map_or(0, |h| h.revision()),
        })
    }

    /// Deletes what is left under `{kind}/{from}/` after a switch; how many
    /// keys could not be deleted.
    async fn clean_up(&self, kind: &str, from: &str) -> u32 {
        let dir = self.keys.version_dir(kind, from);
        let deleted = error::retry("delete an old version's keys", || {
            let mut kv = self.client.kv_client();
            let dir = dir.clone();
            async move { kv.delete(dir, Some(DeleteOptions::new().with_prefix())).await }
        })
        .await;
        match deleted {
            Ok(_) => 0,
            Err(e) => {
                warn!(%kind, from, error = %e, "cannot clean up the old version's keys");
                self.census(kind, from).await.map_or(u32::MAX, |c| c.remaining)
            }
        }
    }

    /// `ROTATE`: see [`crate::backend::Backend::rotate`].
    pub(super) async fn rotate_kind(&self, req: RotateRequest<'_>) -> Result<RotateOutcome, BackendError> {
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
        // 1. Claim, reading the record in the same transaction.
        let lease = self.leases.pick(Instant::now()).await?;
        let claim_key = self.keys.rotation_key(kind);
        let version_key = self.keys.version_key(kind);
        let value = format!(
            "{from} -> {to} by lease {:x} at {}",
            lease.id(),
            crate::backend::unix_ms()
        );
        // The guard before the request: an answer lost (or this future
        // dropped) with the claim made still deletes it.
        let claim = Claim {
            client: self.client.clone(),
            key: claim_key.clone(),
            value: value.clone(),
            lease: lease.clone(),
            released: false,
        };
        let txn = Txn::new()
            .when([Compare::create_revision(claim_key.as_str(), CompareOp::Equal, 0)])
            .and_then([
                TxnOp::put(
                    claim_key.as_str(),
                    value.as_str(),
                    Some(PutOptions::new().with_lease(lease.id())),
                ),
                TxnOp::get(version_key.as_str(), None),
            ])
            .or_else([
                TxnOp::get(version_key.as_str(), None),
                TxnOp::get(claim_key.as_str(), None),
            ]);
        let resp = error::once("claim a rotation", async {
            let mut kv = self.client.kv_client();
            kv.txn(txn).await
        })
        .await?;
        let ops = resp.op_responses();
        let mut seen = read_seen(ops.get(usize::from(resp.succeeded())).or(ops.first()), resp.header())?;
        if !resp.succeeded() {
            // Someone else's claim: ours was never made.
            let mut claim = claim;
            claim.released = true;
            drop(claim);
            let by = match ops.get(1) {
                Some(TxnOpResponse::Get(g)) => g
                    .kvs()
                    .first()
                    .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
                    .unwrap_or_default(),
                _ => String::new(),
            };
            return Ok(RotateOutcome::Refused(format!(
                "another rotation of {kind} is in progress ({by})"
            )));
        }
        // 2. Mark (or resume, or find it done).
        let mut races = 0;
        let mark_rev = loop {
            match seen.version.rotation_start(kind, seen.previous.as_deref(), from, to) {
                RotationStart::Switched => {
                    let leftover = self.clean_up(kind, from).await;
                    claim.release().await;
                    return Ok(RotateOutcome::Completed {
                        drained: Duration::ZERO,
                        leftover,
                    });
                }
                RotationStart::Refuse(why) => {
                    claim.release().await;
                    return Ok(RotateOutcome::Refused(why));
                }
                RotationStart::Mark | RotationStart::Resume => {
                    let draining = KindVersion::draining(from, to, drain_timeout);
                    if let Some(rev) = self.set_record(kind, seen.mod_rev, encode_version(&draining)).await? {
                        seen = Seen {
                            version: draining,
                            mod_rev: rev,
                            previous: None,
                            at: rev,
                        };
                        self.kinds.remember(kind, &seen);
                        break rev;
                    }
                    races += 1;
                    if races >= MAX_RACES {
                        claim.release().await;
                        return Ok(RotateOutcome::Refused(format!(
                            "the version of {kind} kept changing while the rotation started; try again"
                        )));
                    }
                    seen = self.kinds.read(kind).await?;
                }
            }
        };
        info!(%kind, from, to, ?drain_timeout, "rotation started: draining");
        // 3. Drain, then 4. switch or abort.
        let outcome = self.drain(kind, from, to, mark_rev, deadline, started, &report).await;
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => {
                // Put the kind back to normal if we still can, then fail.
                let normal = KindVersion::normal(from);
                if let Ok(Some(_)) = self.set_record(kind, mark_rev, encode_version(&normal)).await {
                    warn!(%kind, from, to, error = %e, "rotation failed; the kind is back to normal on {from}");
                }
                claim.release().await;
                return Err(e);
            }
        };
        claim.release().await;
        Ok(outcome)
    }

    /// Waits until nothing is left under `from`, then switches; aborts at
    /// the deadline or when someone else changed the record.
    #[allow(clippy::too_many_arguments)]
    async fn drain(
        &self,
        kind: &Arc<str>,
        from: &str,
        to: &str,
        mark_rev: i64,
        deadline: Instant,
        started: Instant,
        report: &(dyn Fn(RotationPhase, u32, Vec<RotationHolder>) + Sync),
    ) -> Result<RotateOutcome, BackendError> {
        let version_key = self.keys.version_key(kind);
        let mut census = self.census(kind, from).await?;
        report(RotationPhase::Draining, census.remaining, census.holders.clone());
        let mut reported = (Instant::now(), census.remaining);
        let mut watch = self
            .watches
            .watch(&self.keys.kind_dir(kind), true, census.revision + 1, false)
            .await?;
        loop {
            if census.remaining == 0 {
                // Final (module docs): switch, if the record is still ours.
                return match self
                    .set_record(kind, mark_rev, encode_switched(to, from, KindLayout::Mutex))
                    .await?
                {
                    Some(rev) => {
                        self.kinds.remember(
                            kind,
                            &Seen {
                                version: KindVersion::normal(to),
                                mod_rev: rev,
                                previous: Some(from.to_owned()),
                                at: rev,
                            },
                        );
                        let drained = started.elapsed();
                        info!(%kind, from, to, ?drained, "rotation switched; cleaning up");
                        report(RotationPhase::Switched, 0, Vec::new());
                        let leftover = self.clean_up(kind, from).await;
                        Ok(RotateOutcome::Completed { drained, leftover })
                    }
                    None => Ok(aborted_by_someone(kind, &self.kinds.read(kind).await?.version)),
                };
            }
            if Instant::now() >= deadline {
                let normal = KindVersion::normal(from);
                return match self.set_record(kind, mark_rev, encode_version(&normal)).await? {
                    Some(rev) => {
                        self.kinds.remember(
                            kind,
                            &Seen {
                                version: normal,
                                mod_rev: rev,
                                previous: None,
                                at: rev,
                            },
                        );
                        let remaining = census.remaining;
                        warn!(%kind, from, to, remaining, "drain timed out; rotation aborted");
                        Ok(RotateOutcome::Aborted(format!(
                            "the drain did not finish in time: {remaining} lock(s) of {kind} remain under {from}; {kind} is back to normal on {from}, nothing was lost"
                        )))
                    }
                    None => Ok(aborted_by_someone(kind, &self.kinds.read(kind).await?.version)),
                };
            }
            let next_report = reported.0 + PROGRESS_EVERY;
            let msg = tokio::select! {
                msg = watch.next() => Some(msg),
                () = tokio::time::sleep_until(next_report.min(deadline)) => None,
            };
            match msg {
                Some(WatchMsg::Events(events))
                    if events
                        .iter()
                        .any(|e| e.kv().is_some_and(|kv| kv.key() == version_key.as_bytes())) =>
                {
                    let now = self.kinds.read(kind).await?;
                    if now.mod_rev != mark_rev {
                        return Ok(aborted_by_someone(kind, &now.version));
                    }
                }
                Some(WatchMsg::Events(_)) | None => {}
                Some(WatchMsg::Cancelled(_) | WatchMsg::Broken) => {
                    census = self.census(kind, from).await?;
                    watch = self
                        .watches
                        .watch(&self.keys.kind_dir(kind), true, census.revision + 1, false)
                        .await?;
                    let now = self.kinds.read(kind).await?;
                    if now.mod_rev != mark_rev {
                        return Ok(aborted_by_someone(kind, &now.version));
                    }
                }
            }
            census = self.census(kind, from).await?;
            let since = reported.0.elapsed();
            if census.remaining > 0
                && ((census.remaining != reported.1 && since >= PROGRESS_MIN_GAP) || since >= PROGRESS_EVERY)
            {
                report(RotationPhase::Draining, census.remaining, census.holders.clone());
                reported = (Instant::now(), census.remaining);
            }
        }
    }

    /// `ROTATE_ABORT`: see [`crate::backend::Backend::abort_rotation`].
    pub(super) async fn abort_kind(&self, kind: &Arc<str>) -> Result<(KindVersion, bool), BackendError> {
        for _ in 0..MAX_RACES {
            let seen = self.kinds.read(kind).await?;
            if seen.version.mode != KindMode::Draining {
                return Ok((seen.version, false));
            }
            let normal = KindVersion::normal(seen.version.version.clone());
            if let Some(rev) = self.set_record(kind, seen.mod_rev, encode_version(&normal)).await? {
                self.kinds.remember(
                    kind,
                    &Seen {
                        version: normal.clone(),
                        mod_rev: rev,
                        previous: None,
                        at: rev,
                    },
                );
                info!(%kind, version = %normal.version, "rotation aborted by request");
                return Ok((normal, true));
            }
        }
        Err(BackendError::Unavailable(format!(
            "the version of {kind} kept changing while aborting its rotation; try again"
        )))
    }
}

fn read_seen(op: Option<&TxnOpResponse>, header: Option<&etcd_client::ResponseHeader>) -> Result<Seen, BackendError> {
    op.and_then(|op| seen_in(op, header)).unwrap_or_else(|| {
        Err(BackendError::Internal(
            "etcd answered without the version record".into(),
        ))
    })
}

fn aborted_by_someone(kind: &str, now: &KindVersion) -> RotateOutcome {
    warn!(%kind, now = %now.version, mode = now.mode.name(), "rotation aborted by someone else");
    RotateOutcome::Aborted(format!(
        "the rotation of {kind} was aborted elsewhere (ROTATE_ABORT, or a waiting acquire after the drain timeout); {kind} is now {} at {}",
        now.mode.name(),
        now.version
    ))
}

fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}
