//! This server's session in PostgreSQL — its row in `{schema}.servers` —,
//! kept alive by heartbeats on a connection of its own; the grants made
//! through it and their loss; and the reaper of other servers' expired
//! rows.
//!
//! **Liveness, as etcd's lease.** A heartbeat is `UPDATE servers SET
//! expires_at = now() + ttl WHERE id = ours AND expires_at > now()`, sent
//! every ttl/10. One answered, sent at `s` on our clock, was applied at the
//! database's `now()`, after `s`: the row cannot expire before `s + ttl`.
//! Holders are told their locks are lost (`backend_unreachable`) at
//! `s + lost_after`, `lost_after` = 3/5 of the TTL, with the margins of
//! `etcd/lease.rs` (a tenth for the holder's own confirmation to come back,
//! a twentieth for timer slack and the two clocks' rates, the rest spare:
//! there is no election here), and nobody is promised more (`safe_until`).
//!
//! **Expiry is judged by the database's clock alone.** Every server treats
//! a contender whose server row has `expires_at <= now()` as gone (the
//! acquire and the waiters' look skip it), and the reaper — on every
//! server, every ttl/5, and before a waiter's timed look — deletes such
//! rows and their contenders. No server compares its clock with another's;
//! the database's clock must only not jump forward (NTP slewing is fine).
//! A dead server's holders were told at 3/5 of the TTL on their own clock,
//! counted from a send that came before the database's `now()` of the last
//! heartbeat: strictly before anyone can be granted their locks.
//!
//! **Loss.** A heartbeat that finds our row gone or expired retires the
//! session with `session_expired`; no answered heartbeat until
//! `lost_after` retires it with `backend_unreachable`. Either way every
//! grant made through it is reported lost at once, a new row is
//! registered, and the old row and its contenders are deleted as soon as
//! the database answers (else they expire and another server reaps them).
//!
//! **Rows deleted from outside.** Each heartbeat also names the tags of
//! this server's held rows and gets back those that are gone: their
//! holders are told `node_deleted` within one heartbeat interval (plus a
//! round trip) of the delete.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use clastor_protocol::LostReason;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::error::REQUEST_TIMEOUT;
use super::pool::{self, Conn, Pool, Target};
use crate::backend::{BackendError, LostNotifier, SessionHealth};
use crate::backoff::Backoff;
use crate::key::LockKey;

/// Holders are told at this part of the TTL after the last answered
/// heartbeat's send (module docs).
pub(super) fn lost_after(ttl: Duration) -> Duration {
    ttl * 3 / 5
}

/// How often a heartbeat goes out: a tenth of the TTL (at least 20 ms).
pub(super) fn heartbeat_interval(ttl: Duration) -> Duration {
    (ttl / 10).max(Duration::from_millis(20))
}

/// How often each server reaps expired server rows: a fifth of the TTL.
fn reap_interval(ttl: Duration) -> Duration {
    (ttl / 5).max(Duration::from_millis(50))
}

/// Every this many reaps, contenders without any server row go too.
const ORPHAN_SWEEP_EVERY: u64 = 10;

fn millis_f64(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A grant made through a session, kept so its holder can be told.
#[derive(Debug)]
struct GrantRecord {
    key: LockKey,
    token: u64,
    tag: i64,
    notifier: LostNotifier,
}

#[derive(Debug, Default)]
struct Grants {
    next: u64,
    table: HashMap<u64, GrantRecord>,
}

/// One registration of this server: its `servers` row.
#[derive(Debug)]
pub(super) struct ServerSession {
    id: i64,
    ttl: Duration,
    lost_after: Duration,
    born: Instant,
    /// Send time (µs since `born`) of the last answered heartbeat.
    contact_us: AtomicU64,
    last_probe_us: AtomicU64,
    heartbeats: AtomicU64,
    next_tag: AtomicI64,
    retired: CancellationToken,
    grants: Mutex<Grants>,
}

impl ServerSession {
    fn new(id: i64, ttl: Duration, sent: Instant) -> ServerSession {
        ServerSession {
            id,
            ttl,
            lost_after: lost_after(ttl),
            born: sent,
            contact_us: AtomicU64::new(0),
            last_probe_us: AtomicU64::new(0),
            heartbeats: AtomicU64::new(0),
            next_tag: AtomicI64::new(0),
            retired: CancellationToken::new(),
            grants: Mutex::default(),
        }
    }

    /// The row's id in `servers`.
    pub(super) fn id(&self) -> i64 {
        self.id
    }

    /// A tag for a new contender row of this session: `(server, tag)` is
    /// the row's key, known before the insert is sent, so a row whose
    /// insert went unanswered can still be deleted.
    pub(super) fn next_tag(&self) -> i64 {
        self.next_tag.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// A heartbeat sent at `sent` was answered now.
    fn contact(&self, sent: Instant) {
        let at = micros(sent.saturating_duration_since(self.born));
        self.contact_us.fetch_max(at, Ordering::AcqRel);
        self.last_probe_us.store(micros(sent.elapsed()), Ordering::Release);
        self.heartbeats.fetch_add(1, Ordering::Relaxed);
    }

    /// When holders must be told, unless contact is proven again first.
    pub(super) fn contact_deadline(&self) -> Instant {
        self.born + Duration::from_micros(self.contact_us.load(Ordering::Acquire)) + self.lost_after
    }

    /// Until when nobody else can be granted a lock held through it.
    pub(super) fn safe_until(&self) -> Instant {
        if self.is_retired() {
            Instant::now()
        } else {
            self.contact_deadline()
        }
    }

    /// Whether new grants may be made through it.
    pub(super) fn trusted(&self) -> bool {
        !self.is_retired() && Instant::now() < self.contact_deadline()
    }

    pub(super) fn is_retired(&self) -> bool {
        self.retired.is_cancelled()
    }

    /// Resolves when the session is retired.
    pub(super) async fn until_retired(&self) {
        self.retired.cancelled().await;
    }

    /// Registers a grant, so its holder is told if it is lost. `Err` gives
    /// the notifier back when the session is retired or out of contact.
    pub(super) fn register(
        &self,
        key: &LockKey,
        token: u64,
        tag: i64,
        notifier: LostNotifier,
    ) -> Result<u64, LostNotifier> {
        let mut grants = lock(&self.grants);
        // Under the table's lock: `retire` marks the session first, then
        // drains the table, so no grant slips in after it.
        if !self.trusted() {
            return Err(notifier);
        }
        grants.next += 1;
        let id = grants.next;
        grants.table.insert(
            id,
            GrantRecord {
                key: key.clone(),
                token,
                tag,
                notifier,
            },
        );
        Ok(id)
    }

    /// Forgets a grant (released); its notifier is dropped unfired.
    pub(super) fn forget(&self, grant: u64) {
        let record = lock(&self.grants).table.remove(&grant);
        drop(record);
    }

    /// The tags of the rows held through it.
    fn held_tags(&self) -> Vec<i64> {
        lock(&self.grants).table.values().map(|g| g.tag).collect()
    }

    /// Reports the grants of these rows lost: they were deleted from outside.
    fn lose_tags(&self, tags: &[i64]) {
        let lost: Vec<GrantRecord> = {
            let mut grants = lock(&self.grants);
            let ids: Vec<u64> = grants
                .table
                .iter()
                .filter(|(_, g)| tags.contains(&g.tag))
                .map(|(id, _)| *id)
                .collect();
            ids.iter().filter_map(|id| grants.table.remove(id)).collect()
        };
        for r in lost {
            warn!(key = %r.key, token = r.token, server = self.id, "lock row deleted from outside Clastor: lock lost");
            r.notifier.notify(LostReason::NodeDeleted);
        }
    }

    /// Retires the session and reports every grant made through it lost.
    fn retire(&self, reason: LostReason) {
        self.retired.cancel();
        let lost: Vec<GrantRecord> = lock(&self.grants).table.drain().map(|(_, r)| r).collect();
        if !lost.is_empty() {
            warn!(
                server = self.id,
                reason = reason.name(),
                grants = lost.len(),
                "PostgreSQL server session retired: its locks are lost"
            );
        }
        for r in lost {
            r.notifier.notify(reason);
        }
    }

    fn health(&self) -> SessionHealth {
        let since = Instant::now()
            .saturating_duration_since(self.born + Duration::from_micros(self.contact_us.load(Ordering::Acquire)));
        SessionHealth {
            slot: 0,
            id: format!("server {}", self.id),
            state: if self.is_retired() {
                "lost"
            } else if since < heartbeat_interval(self.ttl) * 3 {
                "connected"
            } else {
                "disconnected"
            },
            trusted: self.trusted(),
            grants: lock(&self.grants).table.len(),
            last_contact: Some(since),
            last_probe: Some(Duration::from_micros(self.last_probe_us.load(Ordering::Acquire))),
            requests: self.heartbeats.load(Ordering::Relaxed),
            request_time: Duration::ZERO,
        }
    }
}

/// This server's current session, kept registered by a supervisor task,
/// and the periodic reaper.
#[derive(Debug)]
pub(super) struct Sessions {
    pool: Arc<Pool>,
    ttl: Duration,
    name: String,
    current: Mutex<Option<Arc<ServerSession>>>,
    /// Bumped whenever a new session is registered.
    filled: tokio::sync::watch::Sender<u64>,
    closed: CancellationToken,
    tasks: TaskTracker,
    /// When the last reap from the wait path started (ms since `epoch`).
    waiters_reaped_ms: AtomicU64,
    epoch: Instant,
}

impl Sessions {
    /// Starts the supervisor and the reaper; the session comes as the
    /// database registers it.
    pub(super) fn start(pool: Arc<Pool>, ttl: Duration, name: String) -> Arc<Sessions> {
        let sessions = Arc::new(Sessions {
            pool,
            ttl,
            name,
            current: Mutex::new(None),
            filled: tokio::sync::watch::Sender::new(0),
            closed: CancellationToken::new(),
            tasks: TaskTracker::new(),
            waiters_reaped_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        });
        let s = sessions.clone();
        sessions.tasks.spawn(async move { s.supervise().await });
        let s = sessions.clone();
        sessions.tasks.spawn(async move { s.reap_periodically().await });
        sessions
    }

    /// Waits until a session is registered and in contact.
    ///
    /// # Errors
    /// A message if that took longer than `timeout`.
    pub(super) async fn wait_ready(&self, timeout: Duration) -> Result<(), String> {
        let mut filled = self.filled.subscribe();
        let ready = async {
            loop {
                if lock(&self.current).as_ref().is_some_and(|s| s.trusted()) {
                    return;
                }
                if filled.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::time::timeout(timeout, ready)
            .await
            .map_err(|_| format!("no server session registered within {timeout:?}"))
    }

    /// The session new grants are made through.
    ///
    /// # Errors
    /// [`BackendError::Closed`] after shutdown, `Unavailable` when the
    /// session is out of contact (or being registered again).
    pub(super) fn pick(&self) -> Result<Arc<ServerSession>, BackendError> {
        if self.closed.is_cancelled() {
            return Err(BackendError::Closed);
        }
        lock(&self.current).clone().filter(|s| s.trusted()).ok_or_else(|| {
            BackendError::Unavailable(
                "this server's PostgreSQL session is not in contact (database unreachable?)".into(),
            )
        })
    }

    /// The TTL of the server rows.
    pub(super) fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Whether a grant can be made now, and the session's state.
    pub(super) fn health(&self) -> (bool, Vec<SessionHealth>) {
        let session = lock(&self.current).as_ref().map_or_else(
            || SessionHealth {
                slot: 0,
                id: String::new(),
                state: "reconnecting",
                trusted: false,
                grants: 0,
                last_contact: None,
                last_probe: None,
                requests: 0,
                request_time: Duration::ZERO,
            },
            |s| s.health(),
        );
        (session.trusted, vec![session])
    }

    /// Stops the tasks: the session is retired (its grants reported lost
    /// to whoever still holds them) and its row and contenders deleted,
    /// within a few seconds.
    pub(super) async fn shutdown(&self) {
        self.closed.cancel();
        self.tasks.close();
        if tokio::time::timeout(REQUEST_TIMEOUT * 2, self.tasks.wait())
            .await
            .is_err()
        {
            warn!("PostgreSQL server row not deleted in time; it expires with its TTL");
        }
    }

    /// Keeps a session registered until shutdown.
    async fn supervise(&self) {
        let target = self.pool.target().clone();
        let mut conn: Option<Conn> = None;
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
        while !self.closed.is_cancelled() {
            let c = match conn.take() {
                Some(c) if !c.client.is_closed() => c,
                _ => match self.connect(&target).await {
                    Some(c) => c,
                    None => return,
                },
            };
            let (ttl_ms, ttl_f) = (ms_i64(self.ttl), millis_f64(self.ttl));
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] = [&self.name, &ttl_ms, &ttl_f];
            let sent = Instant::now();
            let registered = tokio::select! {
                () = self.closed.cancelled() => return,
                r = tokio::time::timeout(REQUEST_TIMEOUT, c.client.query_one(&c.st.register, &params)) => r,
            };
            let id: i64 = match registered {
                Ok(Ok(row)) => match row.try_get(0) {
                    Ok(id) => id,
                    Err(e) => {
                        warn!(error = %e, "PostgreSQL answered a registration without an id");
                        continue;
                    }
                },
                Ok(Err(e)) => {
                    warn!(db = %target.shown, error = %e, "cannot register this server in PostgreSQL; retrying");
                    if !c.client.is_closed() {
                        conn = Some(c);
                    }
                    if !backoff.wait(&self.closed).await {
                        return;
                    }
                    continue;
                }
                Err(_) => {
                    warn!(db = %target.shown, "PostgreSQL did not answer a registration in time; reconnecting");
                    if !backoff.wait(&self.closed).await {
                        return;
                    }
                    continue;
                }
            };
            backoff.reset();
            let session = Arc::new(ServerSession::new(id, self.ttl, sent));
            session.contact(sent);
            info!(server = id, ttl = ?self.ttl, "PostgreSQL server session registered");
            *lock(&self.current) = Some(session.clone());
            self.filled.send_modify(|n| *n += 1);
            let (reason, kept) = self.heartbeat(c, &session).await;
            conn = kept;
            *lock(&self.current) = None;
            session.retire(reason);
            if reason == LostReason::ServerShutdown {
                // The release of whatever is left, awaited (within a bound),
                // on our own connection if it still works.
                if let Some(c) = conn.take() {
                    let _ = tokio::time::timeout(REQUEST_TIMEOUT, c.client.query_one(&c.st.reap, &[&Some(id), &false]))
                        .await;
                }
                return;
            }
            // Delete the old row and its contenders as soon as the database
            // answers, in the background: the next session registers now.
            let pool = self.pool.clone();
            self.tasks.spawn(async move {
                let done = pool.retry("delete a retired server row", |c| async move {
                    c.client.query_one(&c.st.reap, &[&Some(id), &false]).await
                });
                match tokio::time::timeout(session.ttl, done).await {
                    Ok(Ok(_)) => info!(server = id, "retired PostgreSQL server row deleted"),
                    Ok(Err(e)) => {
                        warn!(server = id, error = %e, "cannot delete a retired server row; it expires with its TTL");
                    }
                    Err(_) => warn!(
                        server = id,
                        "cannot delete a retired server row in time; it expires with its TTL"
                    ),
                }
            });
        }
    }

    /// A heartbeat connection, retried until shutdown (`None`).
    async fn connect(&self, target: &Target) -> Option<Conn> {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
        loop {
            let c = tokio::select! {
                () = self.closed.cancelled() => return None,
                c = pool::connect(target, "heartbeat") => c,
            };
            match c {
                Ok(c) => return Some(c),
                Err(e) => {
                    warn!(error = %e, "cannot open the PostgreSQL heartbeat connection; retrying");
                    if !backoff.wait(&self.closed).await || self.closed.is_cancelled() {
                        return None;
                    }
                }
            }
        }
    }

    /// Heartbeats `session` until it must be retired; returns why, and the
    /// connection if it is still fit for use.
    async fn heartbeat(&self, mut conn: Conn, session: &ServerSession) -> (LostReason, Option<Conn>) {
        let every = heartbeat_interval(self.ttl);
        let ttl_ms = millis_f64(self.ttl);
        let target = self.pool.target().clone();
        let mut tick = tokio::time::interval_at(Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = self.closed.cancelled() => return (LostReason::ServerShutdown, Some(conn)),
                () = tokio::time::sleep_until(session.contact_deadline()) => {
                    if Instant::now() >= session.contact_deadline() {
                        return (LostReason::BackendUnreachable, None);
                    }
                }
                _ = tick.tick() => {}
            }
            if conn.client.is_closed() {
                // Reconnect within the deadline; the session lives on.
                let c = tokio::select! {
                    biased;
                    () = self.closed.cancelled() => return (LostReason::ServerShutdown, None),
                    () = tokio::time::sleep_until(session.contact_deadline()) => return (LostReason::BackendUnreachable, None),
                    c = pool::connect(&target, "heartbeat") => c,
                };
                match c {
                    Ok(c) => conn = c,
                    Err(e) => {
                        debug!(error = %e, "heartbeat connection not reopened yet");
                        continue;
                    }
                }
            }
            let tags = session.held_tags();
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] = [&session.id, &ttl_ms, &tags];
            let sent = Instant::now();
            let answered = tokio::select! {
                biased;
                () = self.closed.cancelled() => return (LostReason::ServerShutdown, Some(conn)),
                () = tokio::time::sleep_until(session.contact_deadline()) => return (LostReason::BackendUnreachable, None),
                r = conn.client.query_one(&conn.st.heartbeat, &params) => r,
            };
            match answered {
                Ok(row) => {
                    let updated: i64 = row.try_get(0).unwrap_or(0);
                    if updated == 0 {
                        warn!(
                            server = session.id,
                            "this server's PostgreSQL row expired or was deleted"
                        );
                        return (LostReason::SessionExpired, Some(conn));
                    }
                    session.contact(sent);
                    let missing: Vec<i64> = row.try_get(1).unwrap_or_default();
                    if !missing.is_empty() {
                        session.lose_tags(&missing);
                    }
                }
                Err(e) => debug!(server = session.id, error = %e, "heartbeat failed"),
            }
        }
    }

    /// Reaps expired server rows for a waiter's timed look, unless a waiter
    /// of this server did so less than `every` ago (a thousand waiters do
    /// not make a thousand reaps a second).
    ///
    /// # Errors
    /// `Unavailable` if the database cannot be reached.
    pub(super) async fn reap_for_waiters(&self, every: Duration) -> Result<(), BackendError> {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        let last = self.waiters_reaped_ms.load(Ordering::Relaxed);
        let every = u64::try_from(every.as_millis()).unwrap_or(u64::MAX);
        if last != 0 && now.saturating_sub(last) < every {
            return Ok(());
        }
        if self
            .waiters_reaped_ms
            .compare_exchange(last, now.max(1), Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return Ok(());
        }
        reap(&self.pool, false).await.map(drop)
    }

    /// Reaps expired server rows every [`reap_interval`] until shutdown.
    async fn reap_periodically(&self) {
        let every = reap_interval(self.ttl);
        let mut n: u64 = 0;
        loop {
            tokio::select! {
                () = self.closed.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            n += 1;
            if let Err(e) = reap(&self.pool, n.is_multiple_of(ORPHAN_SWEEP_EVERY)).await {
                debug!(error = %e, "reaping expired server rows failed");
            }
        }
    }
}

/// Deletes expired server rows and their contenders (and, with `orphans`,
/// contenders of no server at all): how many contenders went.
///
/// # Errors
/// `Unavailable` if the database cannot be reached.
pub(super) async fn reap(pool: &Pool, orphans: bool) -> Result<i32, BackendError> {
    let none: Option<i64> = None;
    let row = pool
        .retry("reap expired server rows", |c| async move {
            c.client.query_one(&c.st.reap, &[&none, &orphans]).await
        })
        .await?;
    let n: i32 = row.try_get(0).unwrap_or(0);
    if n > 0 {
        info!(contenders = n, "reaped the contenders of expired Clastor servers");
    }
    Ok(n)
}

fn ms_i64(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn margins() {
        assert_eq!(lost_after(Duration::from_secs(10)), Duration::from_secs(6));
        assert_eq!(heartbeat_interval(Duration::from_secs(10)), Duration::from_secs(1));
        assert_eq!(
            heartbeat_interval(Duration::from_millis(100)),
            Duration::from_millis(20)
        );
        assert_eq!(reap_interval(Duration::from_secs(10)), Duration::from_secs(2));
    }
}
