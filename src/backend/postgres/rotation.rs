//! Version rotation on PostgreSQL (PROTOCOL.md, "Version rotation"):
//! claim, mark, drain, switch, clean up — every transition one conditional
//! write of the kind's row.
//!
//! - **Claim**: a row of `{schema}.rotations`, inserted only if absent or
//!   if the server that claimed it is no longer live, naming this server's
//!   row: a second driver is refused "in progress"; the claim goes when
//!   the driver ends or is cancelled, and is taken over once its server
//!   dies, so a rotation can always be resumed. It is deleted only if it
//!   still holds this driver's text.
//! - **Mode**: the kind's record. Every transition (mark, resume, switch,
//!   abort) is `set_record`, conditioned on the row's revision as the
//!   writer last saw it, so of a switch and an abort racing exactly one
//!   wins.
//! - **No acquire slips past the mark.** `set_record` takes the kind lock
//!   exclusively, so the mark commits only once every acquire holding it
//!   shared — each between its comparison and its commit — has committed,
//!   and every acquire after it compares against the new revision and
//!   inserts nothing (`schema.rs`). So once marked, no Clastor row appears
//!   under `from` any more, and a census that finds none there is final:
//!   the switch follows it.
//! - **Drain**: a census every [`POLL`] (one indexed count), and a look at
//!   the record: a change by someone else (`ROTATE_ABORT`, an acquire
//!   aborting an abandoned drain) ends the rotation aborted. Progress goes
//!   out at the start, when the count changes (at most four times a
//!   second) and at least every second.
//! - **Resuming after the switch** is recognised by the record's `prev=`.

use std::sync::Arc;
use std::time::Duration;

use clastor_protocol::{KindLayout, KindMode, RotationHolder, RotationPhase, RotationProgress};
use tokio::time::Instant;
use tracing::{info, warn};

use super::kinds::{Seen, internal};
use super::pool::Pool;
use super::{PostgresBackend, millis};
use crate::backend::version_record::{encode_switched, encode_version};
use crate::backend::{BackendError, KindVersion, RotateOutcome, RotateRequest, RotationStart};

/// Longest pause between two progress reports while a kind drains.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Shortest pause between two progress reports caused by releases.
const PROGRESS_MIN_GAP: Duration = Duration::from_millis(250);

/// How often a drain counts what is left.
const POLL: Duration = Duration::from_millis(50);

/// Times a transition is tried again after the record moved under it.
const MAX_RACES: u32 = 3;

/// This driver's claim on a kind's rotation; deleted (if still ours) when
/// dropped.
#[derive(Debug)]
struct Claim {
    pool: Arc<Pool>,
    kind: String,
    server: i64,
    text: String,
    released: bool,
}

impl Claim {
    async fn delete(pool: &Pool, kind: &str, server: i64, text: &str) -> Result<u64, BackendError> {
        pool.retry("release a rotation claim", |c| async move {
            c.client.execute(&c.st.unclaim, &[&kind, &server, &text]).await
        })
        .await
    }

    /// Releases the claim and waits for it (so the same rotation sent again
    /// right after is not refused as "in progress").
    async fn release(mut self) {
        self.released = true;
        if let Err(e) = Claim::delete(&self.pool, &self.kind, self.server, &self.text).await {
            warn!(kind = %self.kind, error = %e, "cannot release a rotation claim; it goes with this server's row");
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let (pool, kind, text, server) = (
            self.pool.clone(),
            std::mem::take(&mut self.kind),
            std::mem::take(&mut self.text),
            self.server,
        );
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = Claim::delete(&pool, &kind, server, &text).await;
            });
        }
    }
}

/// What is left under a version: the count and some of the ids.
pub(super) struct Census {
    pub(super) remaining: u32,
    holders: Vec<RotationHolder>,
}

impl PostgresBackend {
    /// Contender rows under `(kind, version)`, and up to a few of their ids.
    pub(super) async fn census(&self, kind: &str, version: &str) -> Result<Census, BackendError> {
        let rows = self
            .pool
            .retry("count a version's locks", |c| async move {
                c.client.query(&c.st.census, &[&kind, &version]).await
            })
            .await?;
        let mut remaining: i64 = 0;
        let mut holders = Vec::new();
        for row in &rows {
            let id: String = row.try_get(0).map_err(|e| internal("census", &e))?;
            let n: i64 = row.try_get(1).map_err(|e| internal("census", &e))?;
            remaining = row.try_get(2).map_err(|e| internal("census", &e))?;
            if holders.len() < clastor_protocol::MAX_PROGRESS_HOLDERS {
                holders.push(RotationHolder {
                    id,
                    holder: if n > 1 { "contended" } else { "held" }.to_owned(),
                });
            }
        }
        Ok(Census {
            remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
            holders,
        })
    }

    /// Deletes what is left under `(kind, from)` after a switch; how many
    /// rows could not be deleted.
    async fn clean_up(&self, kind: &str, from: &str) -> u32 {
        let deleted = self
            .pool
            .retry("delete an old version's rows", |c| async move {
                c.client.execute(&c.st.drop_version, &[&kind, &from]).await
            })
            .await;
        match deleted {
            Ok(_) => 0,
            Err(e) => {
                warn!(%kind, from, error = %e, "cannot clean up the old version's rows");
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
        // 1. Claim, reading the record in the same statement.
        let session = self.sessions.pick()?;
        let server = session.id();
        let text = format!("{from} -> {to} by server {server} at {}", crate::backend::unix_ms());
        let (k, t) = (&**kind, text.as_str());
        let row = self
            .pool
            .once(None, "claim a rotation", |c| async move {
                c.client.query_one(&c.st.claim, &[&k, &server, &t]).await
            })
            .await?;
        let won: bool = row.try_get(0).map_err(|e| internal("claim", &e))?;
        let by: Option<String> = row.try_get(1).map_err(|e| internal("claim", &e))?;
        let record: Option<String> = row.try_get(2).map_err(|e| internal("claim", &e))?;
        let rev: i64 = row.try_get(3).map_err(|e| internal("claim", &e))?;
        if !won {
            return Ok(RotateOutcome::Refused(format!(
                "another rotation of {kind} is in progress ({})",
                by.unwrap_or_default()
            )));
        }
        let claim = Claim {
            pool: self.pool.clone(),
            kind: kind.to_string(),
            server,
            text,
            released: false,
        };
        let mut seen = Seen::from_parts(kind, record.as_deref(), rev)?;
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
                    if let Some(rev) = self
                        .kinds
                        .set(kind, seen.rev, &encode_version(&draining), false)
                        .await?
                    {
                        seen = Seen {
                            version: draining,
                            rev,
                            previous: None,
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
        let outcome = match self.drain(kind, from, to, mark_rev, deadline, started, &report).await {
            Ok(o) => o,
            Err(e) => {
                // Put the kind back to normal if we still can, then fail.
                let normal = KindVersion::normal(from);
                if let Ok(Some(_)) = self.kinds.set(kind, mark_rev, &encode_version(&normal), false).await {
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
        let mut census = self.census(kind, from).await?;
        report(RotationPhase::Draining, census.remaining, census.holders.clone());
        let mut reported = (Instant::now(), census.remaining);
        loop {
            if census.remaining == 0 {
                // Final (module docs): switch, if the record is still ours.
                return match self
                    .kinds
                    .set(kind, mark_rev, &encode_switched(to, from, KindLayout::Mutex), false)
                    .await?
                {
                    Some(rev) => {
                        self.kinds.remember(
                            kind,
                            &Seen {
                                version: KindVersion::normal(to),
                                rev,
                                previous: Some(from.to_owned()),
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
                return match self.kinds.set(kind, mark_rev, &encode_version(&normal), false).await? {
                    Some(rev) => {
                        self.kinds.remember(
                            kind,
                            &Seen {
                                version: normal,
                                rev,
                                previous: None,
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
            tokio::time::sleep_until((Instant::now() + POLL).min(deadline)).await;
            let now = self.kinds.read(kind).await?;
            if now.rev != mark_rev {
                return Ok(aborted_by_someone(kind, &now.version));
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
            if let Some(rev) = self.kinds.set(kind, seen.rev, &encode_version(&normal), false).await? {
                self.kinds.remember(
                    kind,
                    &Seen {
                        version: normal.clone(),
                        rev,
                        previous: None,
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

fn aborted_by_someone(kind: &str, now: &KindVersion) -> RotateOutcome {
    warn!(%kind, now = %now.version, mode = now.mode.name(), "rotation aborted by someone else");
    RotateOutcome::Aborted(format!(
        "the rotation of {kind} was aborted elsewhere (ROTATE_ABORT, or a waiting acquire after the drain timeout); {kind} is now {} at {}",
        now.mode.name(),
        now.version
    ))
}
