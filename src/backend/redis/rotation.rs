//! Version rotation on Redis (PROTOCOL.md, "Version rotation"): claim,
//! mark, drain, switch, clean up — every step one script whose check
//! decides it.
//!
//! - **Claim**: `{kind}/rotation`, set only if absent or naming a session
//!   whose key is gone, its value naming the driver's server session: a
//!   second driver is refused "in progress"; the claim dies with its
//!   driver's session (a dead server's claim is taken over), and is deleted
//!   when the driver ends or is cancelled, only if it still holds this
//!   driver's value — so a rotation can always be resumed.
//! - **Mode**: the kind's version record. Every transition (mark, resume,
//!   switch, abort) is a write conditioned on the record's whole text as
//!   the writer last saw it (`SET_RECORD`), so of a switch and an abort
//!   racing exactly one wins; each write is published on the record's
//!   channel, which draining acquires wait on (`kinds.rs`).
//! - **No acquire slips past the mark.** The acquire script queues a
//!   contender only if the record is the text it saw normal (`recipe.rs`),
//!   and Redis runs one script at a time; the mark changes the text. So
//!   once marked, no contender of a Clastor acquire appears under `from`
//!   any more, and a census that finds none there is final: the switch
//!   follows it.
//! - **Drain**: the census (`COUNT`) counts the live contenders of every
//!   lock in the version's index, removing those whose session died; it
//!   runs again on every emptied queue (published on the version's
//!   channel), at least every second, and when the record changes — a
//!   change by someone else (`ROTATE_ABORT`, an acquire aborting an
//!   abandoned drain) ends the rotation aborted. Progress goes out at the
//!   start, when the count changes (at most four times a second) and at
//!   least every second.
//! - **Resuming after the switch** is recognised by the record's `prev=`.

use std::sync::Arc;
use std::time::Duration;

use clastor_protocol::{KindLayout, KindMode, RotationHolder, RotationPhase, RotationProgress};
use redis::Value;
use tokio::time::Instant;
use tracing::{info, warn};

use super::kinds::{Seen, seen_at};
use super::scripts::Scripts;
use super::session::{int, text};
use super::{Conn, RedisBackend, error};
use crate::backend::version_record::encode_switched;
use crate::backend::{BackendError, KindVersion, RotateOutcome, RotateRequest, RotationStart};

/// Longest pause between two progress reports while a kind drains.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Shortest pause between two progress reports caused by releases.
const PROGRESS_MIN_GAP: Duration = Duration::from_millis(250);

/// Times a transition is tried again after the record moved under it.
const MAX_RACES: u32 = 3;

/// This driver's claim on a kind's rotation; deleted (if still ours) when
/// dropped.
#[derive(Debug)]
struct Claim {
    conn: Conn,
    scripts: Arc<Scripts>,
    key: String,
    value: String,
    released: bool,
}

async fn unclaim(conn: &Conn, scripts: &Scripts, key: &str, value: &str) -> Result<(), BackendError> {
    error::retry("release a rotation claim", || {
        let mut c = conn.get();
        let mut inv = scripts.unclaim.key(key);
        inv.arg(value);
        async move { inv.invoke_async::<Value>(&mut c).await }
    })
    .await
    .map(drop)
}

impl Claim {
    /// Releases the claim and waits for it (so the same rotation sent again
    /// right after is not refused as "in progress").
    async fn release(mut self) {
        self.released = true;
        if let Err(e) = unclaim(&self.conn, &self.scripts, &self.key, &self.value).await {
            warn!(key = %self.key, error = %e, "cannot release a rotation claim; it goes with the session");
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let (conn, scripts, key, value) = (
            self.conn.clone(),
            self.scripts.clone(),
            self.key.clone(),
            self.value.clone(),
        );
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = unclaim(&conn, &scripts, &key, &value).await;
            });
        }
    }
}

/// What is left under a version: the count and some of the ids.
struct Census {
    remaining: u32,
    holders: Vec<RotationHolder>,
}

impl RedisBackend {
    /// A conditional write of the kind's record: whether it won.
    async fn set_record(&self, kind: &str, expected: &str, new: &str) -> Result<bool, BackendError> {
        let key = self.keys.record(kind);
        let answer: Vec<Value> = error::retry("write a kind's version", || {
            let mut c = self.conn.get();
            let mut inv = self.scripts.set_record.key(&key);
            inv.arg(expected).arg(new);
            async move { inv.invoke_async(&mut c).await }
        })
        .await?;
        Ok(matches!(answer.first(), Some(Value::Int(1))))
    }

    /// Live contenders under `{kind}/{version}`, and up to a few of their
    /// ids (dead ones are removed on the way).
    pub(super) async fn census(&self, kind: &str, version: &str) -> Result<(u32, Vec<RotationHolder>), BackendError> {
        let (index, prefix) = (self.keys.index(kind, version), self.keys.queue_prefix(kind, version));
        let answer: Vec<Value> = error::retry("count a version's locks", || {
            let mut c = self.conn.get();
            let mut inv = self.scripts.count.key(&index);
            inv.arg(&prefix)
                .arg(self.keys.session_prefix())
                .arg(clastor_protocol::MAX_PROGRESS_HOLDERS);
            async move { inv.invoke_async(&mut c).await }
        })
        .await?;
        let remaining = u32::try_from(int(answer.first()).unwrap_or(0)).unwrap_or(u32::MAX);
        let holders = answer[1.min(answer.len())..]
            .chunks_exact(2)
            .filter_map(|pair| {
                let id = text(&pair[0])?;
                let n = int(pair.get(1))?;
                Some(RotationHolder {
                    id,
                    holder: if n > 1 { "contended" } else { "held" }.to_owned(),
                })
            })
            .collect();
        Ok((remaining, holders))
    }

    async fn census_now(&self, kind: &str, version: &str) -> Result<Census, BackendError> {
        let (remaining, holders) = self.census(kind, version).await?;
        Ok(Census { remaining, holders })
    }

    /// Deletes what is left under `{kind}/{from}` after a switch; how many
    /// locks could not be deleted.
    async fn clean_up(&self, kind: &str, from: &str) -> u32 {
        let (index, prefix) = (self.keys.index(kind, from), self.keys.queue_prefix(kind, from));
        let deleted = error::retry("delete an old version's locks", || {
            let mut c = self.conn.get();
            let mut inv = self.scripts.clean_up.key(&index);
            inv.arg(&prefix);
            async move { inv.invoke_async::<Value>(&mut c).await }
        })
        .await;
        match deleted {
            Ok(_) => 0,
            Err(e) => {
                warn!(%kind, from, error = %e, "cannot clean up the old version's locks");
                self.census(kind, from).await.map_or(u32::MAX, |c| c.0)
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
        // 1. Claim, reading the record in the same script.
        let session = self.sessions.current()?;
        let claim_key = self.keys.claim(kind);
        let record_key = self.keys.record(kind);
        let value = format!(
            "{from} -> {to} by session {} at {}",
            session.sid(),
            crate::backend::unix_ms()
        );
        let answer: Vec<Value> = error::once("claim a rotation", async {
            let mut c = self.conn.get();
            let mut inv = self.scripts.claim.key(&claim_key);
            inv.key(&record_key).arg(&value).arg(self.keys.session_prefix());
            inv.invoke_async(&mut c).await
        })
        .await?;
        let mut seen = seen_at(&answer, 1)?;
        if !matches!(answer.first(), Some(Value::Int(1))) {
            let by = answer.get(2).and_then(text).unwrap_or_default();
            return Ok(RotateOutcome::Refused(format!(
                "another rotation of {kind} is in progress ({by})"
            )));
        }
        let claim = Claim {
            conn: self.conn.clone(),
            scripts: self.scripts.clone(),
            key: claim_key,
            value,
            released: false,
        };
        // 2. Mark (or resume, or find it done).
        let mut races = 0;
        let mark = loop {
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
                    let draining = Seen::of(KindVersion::draining(from, to, drain_timeout));
                    if self.set_record(kind, &seen.raw, &draining.raw).await? {
                        self.kinds.remember(kind, &draining);
                        break draining;
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
        let outcome = self.drain(kind, from, to, &mark, deadline, started, &report).await;
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => {
                // Put the kind back to normal if we still can, then fail.
                let normal = Seen::of(KindVersion::normal(from));
                if let Ok(true) = self.set_record(kind, &mark.raw, &normal.raw).await {
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
        mark: &Seen,
        deadline: Instant,
        started: Instant,
        report: &(dyn Fn(RotationPhase, u32, Vec<RotationHolder>) + Sync),
    ) -> Result<RotateOutcome, BackendError> {
        // Subscribed before the first census: no emptied queue or change of
        // the record is missed after it.
        let mut emptied = self.notify.subscribe(&self.keys.index(kind, from)).await?;
        let mut record = self.notify.subscribe(&self.keys.record(kind)).await?;
        let mut census = self.census_now(kind, from).await?;
        report(RotationPhase::Draining, census.remaining, census.holders.clone());
        let mut reported = (Instant::now(), census.remaining);
        loop {
            if census.remaining == 0 {
                // Final (module docs): switch, if the record is still ours.
                let switched = Seen::from_raw(
                    String::from_utf8_lossy(&encode_switched(to, from, KindLayout::Mutex)).into_owned(),
                )?;
                return if self.set_record(kind, &mark.raw, &switched.raw).await? {
                    self.kinds.remember(kind, &switched);
                    let drained = started.elapsed();
                    info!(%kind, from, to, ?drained, "rotation switched; cleaning up");
                    report(RotationPhase::Switched, 0, Vec::new());
                    let leftover = self.clean_up(kind, from).await;
                    Ok(RotateOutcome::Completed { drained, leftover })
                } else {
                    Ok(aborted_by_someone(kind, &self.kinds.read(kind).await?.version))
                };
            }
            if Instant::now() >= deadline {
                let normal = Seen::of(KindVersion::normal(from));
                return if self.set_record(kind, &mark.raw, &normal.raw).await? {
                    self.kinds.remember(kind, &normal);
                    let remaining = census.remaining;
                    warn!(%kind, from, to, remaining, "drain timed out; rotation aborted");
                    Ok(RotateOutcome::Aborted(format!(
                        "the drain did not finish in time: {remaining} lock(s) of {kind} remain under {from}; {kind} is back to normal on {from}, nothing was lost"
                    )))
                } else {
                    Ok(aborted_by_someone(kind, &self.kinds.read(kind).await?.version))
                };
            }
            let next_report = reported.0 + PROGRESS_EVERY;
            tokio::select! {
                r = emptied.changed() => drop(r?),
                r = record.changed() => {
                    r?;
                    let now = self.kinds.read(kind).await?;
                    if now.raw != mark.raw {
                        return Ok(aborted_by_someone(kind, &now.version));
                    }
                }
                () = tokio::time::sleep_until(next_report.min(deadline)) => {}
            }
            census = self.census_now(kind, from).await?;
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
            let normal = Seen::of(KindVersion::normal(seen.version.version.clone()));
            if self.set_record(kind, &seen.raw, &normal.raw).await? {
                self.kinds.remember(kind, &normal);
                info!(%kind, version = %normal.version.version, "rotation aborted by request");
                return Ok((normal.version, true));
            }
        }
        Err(BackendError::Unavailable(format!(
            "the version of {kind} kept changing while aborting its rotation; try again"
        )))
    }
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
