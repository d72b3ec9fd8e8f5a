//! `impl Backend for PostgresBackend`: the one-statement acquire, the wait
//! for our turn, release and the reads.
//!
//! **Acquire.** One prepared statement calls `{schema}.acquire`
//! (`schema.rs`): under the shared kind lock it compares the kind's
//! revision with the one this server last saw, checks our server row is
//! live, takes the key lock, inserts our contender row with the next
//! token, and returns the lock's first *live* contender (lowest `seq`
//! whose server row has not expired by the database's clock) that blocks
//! ours — any, for an exclusive lock; an exclusive one, for a shared lock
//! (a reader's row is marked `shared`). If there is none, the lock is
//! granted, in one round trip. Readers hold together; a reader queued
//! behind a writer waits for it, and a writer for every row before it, so
//! the queue is FIFO and no writer is starved by a stream of readers. The row's `seq` is the
//! fencing token: one sequence for every lock, so a later grant — by any
//! server, after any restart, under any version — has a larger one. A
//! try-once that is not first has its row deleted by the same statement; a
//! wait that times out deletes its row before it answers.
//!
//! **Waiting** (FIFO by `seq`): subscribe to the lock's notifications
//! (`listen.rs`), then look — one statement reading our own row and the
//! first live contender that blocks it; a row of ours deleted from outside is never
//! granted. Look again on each notification (a release or reap of a
//! contender of this lock), and at least every [`RECHECK`] — then after
//! reaping expired servers (at most once per [`RECHECK`] per server): a
//! dead server's holder is passed over by the look anyway, and the reap
//! deletes its rows and wakes the other waiters. Every contender with a lower `seq` committed
//! before ours existed (the key lock), so no look can miss one.
//!
//! **Holding.** A holder is told `node_deleted` when its row is found
//! deleted from outside — at the next heartbeat (`session.rs`), within
//! ttl/10 plus a round trip — and `backend_unreachable` or
//! `session_expired` when its server's session is lost.
//!
//! **Nothing left behind.** A row being waited on belongs to a
//! [`PendingRow`], a granted one to a [`PgGuard`]; dropping either deletes
//! the row by its `(server, tag)` key (in the background, retried until it
//! is gone or its session is retired, whose clean-up or a reaper deletes
//! it), so a cancelled, timed-out or failed acquire — even one whose insert
//! went unanswered — and a vanished holder leave nothing that would block
//! the next contender.

use std::sync::Arc;
use std::time::Duration;

use clastor_protocol::{KindMode, LockMode};
use tokio::time::Instant;
use tracing::warn;

use super::PostgresBackend;
use super::kinds::{Seen, internal};
use super::listen::lock_topic;
use super::pool::Pool;
use super::session::{ServerSession, heartbeat_interval, lost_after};
use crate::backend::{
    AcquireRequest, Backend, BackendError, BackendHealth, Grant, KindVersion, RotateOutcome, RotateRequest,
};
use crate::backoff::Backoff;
use crate::key::LockKey;

/// Times a waiting row deleted from outside is inserted again before the
/// acquire gives up.
const MAX_REQUEUES: u32 = 3;

/// How often a waiter looks even without a notification.
pub(super) const RECHECK: Duration = Duration::from_secs(1);

/// A contender row not (yet) granted: deleted when dropped, unless it
/// became a grant.
#[derive(Debug)]
struct PendingRow {
    pool: Arc<Pool>,
    affinity: Option<u64>,
    session: Arc<ServerSession>,
    tag: Option<i64>,
}

impl PendingRow {
    fn new(pool: &Arc<Pool>, affinity: Option<u64>, session: Arc<ServerSession>) -> PendingRow {
        let tag = session.next_tag();
        PendingRow {
            pool: pool.clone(),
            affinity,
            session,
            tag: Some(tag),
        }
    }

    fn tag(&self) -> i64 {
        self.tag.unwrap_or(0)
    }

    /// The row was never inserted, or is known to be gone.
    fn forget(mut self) {
        self.tag = None;
    }

    /// The row is granted: the guard owns it now.
    fn into_granted(mut self) -> (i64, Arc<ServerSession>) {
        (self.tag.take().unwrap_or(0), self.session.clone())
    }
}

impl Drop for PendingRow {
    fn drop(&mut self) {
        if let Some(tag) = self.tag.take() {
            delete_in_background(&self.pool, self.affinity, self.session.clone(), tag);
        }
    }
}

/// Deletes our row `(session, tag)` until it is gone, or the session is
/// retired (its clean-up deletes every row of it, else it expires and is
/// reaped).
fn delete_in_background(pool: &Arc<Pool>, affinity: Option<u64>, session: Arc<ServerSession>, tag: i64) {
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let pool = pool.clone();
    handle.spawn(async move {
        let mut pause = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
        loop {
            tokio::select! {
                r = release_row(&pool, affinity, session.id(), tag) => match r {
                    Ok(_) | Err(BackendError::Closed) => return,
                    Err(e) => warn!(server = session.id(), tag, error = %e, "cannot delete a lock row yet; retrying"),
                },
                () = session.until_retired() => return,
            }
            if !pause.wait_or(session.until_retired()).await {
                return;
            }
        }
    });
}

/// The pool connection every statement about `key` goes through.
fn affinity(key: &LockKey) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.kind().hash(&mut h);
    key.id().hash(&mut h);
    Some(h.finish())
}

/// Deletes our row (and notifies the lock's waiters): whether it was there.
async fn release_row(pool: &Pool, affinity: Option<u64>, server: i64, tag: i64) -> Result<bool, BackendError> {
    let row = pool
        .retry_on(affinity, "delete a lock row", |c| async move {
            c.client.query_one(&c.st.release, &[&server, &tag]).await
        })
        .await?;
    row.try_get(0).map_err(|e| internal("release", &e))
}

/// A grant: its row and the session it was made through. Dropping it
/// releases the lock in the background.
#[derive(Debug)]
pub struct PgGuard {
    held: Option<Held>,
}

#[derive(Debug)]
struct Held {
    pool: Arc<Pool>,
    affinity: Option<u64>,
    session: Arc<ServerSession>,
    tag: i64,
    grant: u64,
}

impl PgGuard {
    /// The row's key in `{schema}.contenders`: `(server, tag)`.
    pub fn row(&self) -> (i64, i64) {
        self.held.as_ref().map_or((0, 0), |h| (h.session.id(), h.tag))
    }

    fn take(&mut self) -> Option<Held> {
        let held = self.held.take()?;
        held.session.forget(held.grant);
        Some(held)
    }
}

impl Drop for PgGuard {
    fn drop(&mut self) {
        if let Some(h) = self.take() {
            delete_in_background(&h.pool, h.affinity, h.session, h.tag);
        }
    }
}

/// How a wait for our turn ended.
enum Turn {
    Granted,
    TimedOut,
    /// Our row was deleted from outside while we waited.
    Deleted,
}

impl PostgresBackend {
    /// Waits until our row `(session, tag)`, `seq`, is the lock's first
    /// live contender — for a `shared` one, until no live exclusive row is
    /// before it (module docs).
    #[allow(clippy::too_many_arguments)]
    async fn wait_turn(
        &self,
        key: &LockKey,
        version: &str,
        shared: bool,
        session: &ServerSession,
        tag: i64,
        seq: i64,
        deadline: Instant,
    ) -> Result<Turn, BackendError> {
        let mut notified = self.listener.subscribe(lock_topic(key.kind(), version, key.id()));
        let (kind, id, server) = (key.kind(), key.id(), session.id());
        let mut timed = false;
        loop {
            if timed {
                // Delete the rows of servers that died without a word (their
                // rows are passed over already; this wakes the others).
                self.sessions.reap_for_waiters(RECHECK).await?;
            }
            let row = self
                .pool
                .retry_on(affinity(key), "look at a lock's queue", |c| async move {
                    c.client
                        .query_one(&c.st.turn, &[&kind, &version, &id, &server, &tag, &shared])
                        .await
                })
                .await?;
            let mine: Option<i64> = row.try_get(0).map_err(|e| internal("turn", &e))?;
            let head: Option<i64> = row.try_get(1).map_err(|e| internal("turn", &e))?;
            if mine.is_none() {
                return Ok(Turn::Deleted);
            }
            if head == Some(seq) {
                return Ok(Turn::Granted);
            }
            timed = tokio::select! {
                biased;
                () = session.until_retired() => {
                    return Err(BackendError::Unavailable(
                        "the PostgreSQL session of a waiting acquire was lost".into(),
                    ));
                }
                () = tokio::time::sleep_until(deadline) => return Ok(Turn::TimedOut),
                () = notified.changed() => false,
                () = tokio::time::sleep(RECHECK) => true,
            };
        }
    }

    /// Contender rows of `(kind, id)` under the kind's current version.
    async fn count_contenders(&self, key: &LockKey) -> Result<i64, BackendError> {
        let seen = self.kinds.read(key.kind_arc()).await?;
        let (kind, version, id) = (key.kind(), &*seen.version.version, key.id());
        let row = self
            .pool
            .retry("count lock rows", |c| async move {
                c.client.query_one(&c.st.count_lock, &[&kind, &version, &id]).await
            })
            .await?;
        row.try_get(0).map_err(|e| internal("count", &e))
    }
}

impl Backend for PostgresBackend {
    type Guard = PgGuard;

    fn name(&self) -> &'static str {
        "postgres"
    }

    async fn acquire(&self, req: AcquireRequest<'_>) -> Result<Option<Grant<PgGuard>>, BackendError> {
        let shared = req.mode == LockMode::Shared;
        let deadline = Instant::now() + req.wait;
        let key = req.key;
        let kind = key.kind_arc();
        let owner = format!("clastor owner={}", req.owner);
        let affine = affinity(key);
        let mut seen = self.kinds.cached(kind);
        let mut requeues = 0;
        loop {
            if seen.version.mode != KindMode::Normal {
                // The cold paths are boxed, so the uncontended acquire's
                // future stays small (it is moved several times per request).
                match Box::pin(self.kinds.wait_normal(kind, seen, deadline)).await? {
                    Some(s) => seen = s,
                    None => return Ok(None),
                }
            }
            let session = self.sessions.pick()?;
            let pending = PendingRow::new(&self.pool, affine, session.clone());
            let (k, version, id, server, tag, rev) = (
                &**kind,
                &*seen.version.version,
                key.id(),
                session.id(),
                pending.tag(),
                seen.rev,
            );
            let owner = owner.as_str();
            let try_once = req.wait.is_zero();
            // Sent once: a lost answer leaves the row to `pending`'s drop.
            let row = self
                .pool
                .once(affine, "insert a lock row", |c| async move {
                    c.client
                        .query_one(
                            &c.st.acquire,
                            &[&k, &version, &id, &server, &tag, &owner, &rev, &try_once, &shared],
                        )
                        .await
                })
                .await?;
            let seq: Option<i64> = row.try_get(0).map_err(|e| internal("acquire", &e))?;
            let Some(seq) = seq else {
                // The kind's record moved on: learn it and go again.
                pending.forget();
                let record: Option<String> = row.try_get(2).map_err(|e| internal("acquire", &e))?;
                let rev: i64 = row.try_get(3).map_err(|e| internal("acquire", &e))?;
                seen = Seen::from_parts(kind, record.as_deref(), rev)?;
                self.kinds.remember(kind, &seen);
                continue;
            };
            let head: Option<i64> = row.try_get(1).map_err(|e| internal("acquire", &e))?;
            let turn = if head == Some(seq) {
                Turn::Granted
            } else if try_once {
                // Deleted again by the same statement.
                pending.forget();
                return Ok(None);
            } else {
                Box::pin(self.wait_turn(key, version, shared, &session, tag, seq, deadline)).await?
            };
            match turn {
                Turn::Granted => {}
                Turn::TimedOut => {
                    // Gone before the answer, so a look right after finds
                    // nothing of ours (else the drop deletes it later).
                    if Box::pin(release_row(&self.pool, affine, server, tag)).await.is_ok() {
                        pending.forget();
                    }
                    return Ok(None);
                }
                Turn::Deleted if requeues < MAX_REQUEUES => {
                    requeues += 1;
                    warn!(%key, server, tag, "our waiting lock row was deleted from outside; queueing again");
                    pending.forget();
                    continue;
                }
                Turn::Deleted => {
                    return Err(BackendError::Unavailable(format!(
                        "the lock row for {key} kept being deleted from outside"
                    )));
                }
            }
            let token = u64::try_from(seq).map_err(|_| BackendError::Internal(format!("negative token {seq}")))?;
            let grant = session.register(key, token, tag, req.on_lost).map_err(|_| {
                BackendError::Unavailable("the PostgreSQL session was lost as the lock was granted".into())
            })?;
            let (tag, session) = pending.into_granted();
            return Ok(Some(Grant {
                token,
                version: seen.version.version.clone(),
                guard: PgGuard {
                    held: Some(Held {
                        pool: self.pool.clone(),
                        affinity: affine,
                        session,
                        tag,
                        grant,
                    }),
                },
            }));
        }
    }

    async fn release(&self, mut guard: PgGuard) -> Result<(), BackendError> {
        let Some(h) = guard.take() else { return Ok(()) };
        match release_row(&h.pool, h.affinity, h.session.id(), h.tag).await {
            Ok(_) => Ok(()),
            // Its session is gone, and the row with it (or soon).
            Err(_) if h.session.is_retired() => Ok(()),
            Err(e) => {
                delete_in_background(&h.pool, h.affinity, h.session, h.tag);
                Err(e)
            }
        }
    }

    async fn is_held(&self, key: &LockKey) -> Result<bool, BackendError> {
        Ok(self.count_contenders(key).await? > 0)
    }

    async fn rotate(&self, req: RotateRequest<'_>) -> Result<RotateOutcome, BackendError> {
        self.rotate_kind(req).await
    }

    async fn abort_rotation(&self, kind: &Arc<str>) -> Result<(KindVersion, bool), BackendError> {
        self.abort_kind(kind).await
    }

    async fn count_locks(&self, kind: &Arc<str>, version: &str) -> Result<u32, BackendError> {
        Ok(self.census(kind, version).await?.remaining)
    }

    async fn version(&self, kind: &str) -> Result<KindVersion, BackendError> {
        let kind: Arc<str> = Arc::from(kind);
        Ok(self.kinds.read(&kind).await?.version)
    }

    fn cached_version(&self, kind: &str) -> Option<KindVersion> {
        self.kinds.cached_version(kind)
    }

    fn safe_until(&self, guard: &PgGuard) -> Option<Instant> {
        Some(
            guard
                .held
                .as_ref()
                .map_or_else(Instant::now, |h| h.session.safe_until()),
        )
    }

    fn confirm_interval(&self) -> Option<Duration> {
        Some(heartbeat_interval(self.sessions.ttl()))
    }

    fn fixed_layout(&self) -> Option<clastor_protocol::KindLayout> {
        // Readers' rows are marked `shared`; every kind takes shared locks.
        Some(clastor_protocol::KindLayout::ReadWrite)
    }

    fn health(&self) -> BackendHealth {
        let (ready, sessions) = self.sessions.health();
        let open = self.pool.open_count();
        BackendHealth {
            ready,
            detail: if ready {
                format!(
                    "postgres at {}: server session in contact, {open} of {} connections open, notifications {}",
                    self.pool.target().shown,
                    self.pool.size(),
                    if self.listener.is_up() { "up" } else { "reconnecting" }
                )
            } else {
                format!(
                    "postgres at {}: server session not in contact with the database",
                    self.pool.target().shown
                )
            },
            sessions,
        }
    }

    fn info(&self) -> Vec<(String, String)> {
        let (ready, sessions) = self.sessions.health();
        let ttl = self.sessions.ttl();
        let mut out = vec![
            ("postgres_ready".to_owned(), ready.to_string()),
            ("postgres_db".to_owned(), self.pool.target().shown.clone()),
            ("postgres_schema".to_owned(), self.pool.target().schema.name.clone()),
            ("postgres_connections".to_owned(), self.pool.size().to_string()),
            (
                "postgres_connections_open".to_owned(),
                self.pool.open_count().to_string(),
            ),
            ("postgres_listening".to_owned(), self.listener.is_up().to_string()),
            ("postgres_ttl_ms".to_owned(), ttl.as_millis().to_string()),
            (
                "postgres_lost_after_ms".to_owned(),
                lost_after(ttl).as_millis().to_string(),
            ),
        ];
        for s in sessions {
            out.push((
                "postgres_session".to_owned(),
                format!("{} {} grants={}", s.id, s.state, s.grants),
            ));
        }
        out
    }

    async fn shutdown(&self) {
        self.sessions.shutdown().await;
        self.listener.close();
        self.pool.close();
    }
}
