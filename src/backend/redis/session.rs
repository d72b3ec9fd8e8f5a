//! This server's session in Redis: one key, `{prefix}:session:{sid}`, whose
//! value is a random secret, kept alive by a refresh every tenth of its TTL;
//! its last proven contact, the grants made under it, and their loss.
//!
//! **Liveness.** Every contender this server queues is named `{sid}:{n}`
//! and is alive exactly while the session key exists: Redis expires the key
//! on its own clock, and every script that looks at a queue judges the
//! contenders ahead by that (`scripts.rs`). So a server that dies, freezes
//! or is cut off loses all its contenders one TTL after its last refresh,
//! at once, without anyone having to clean up after it.
//!
//! **Safe-until.** A refresh (`PEXPIRE key TTL`, by a script that first
//! checks the key still holds our secret) sent at `s` and answered was
//! applied by Redis after `s`, so the key cannot expire before `s + TTL` on
//! Redis' clock. Holders are told their locks are lost at `s + lost_after`,
//! `lost_after` = 3/5 of the TTL, with the margins of the etcd backend
//! (`etcd/lease.rs`): a quarter for what a replicated store would spend on a
//! failover (none here; kept so every backend promises the same share), a
//! tenth for the holder's own confirmation to come back, a twentieth for
//! timer slack and the two clocks' rates. Nobody is promised more
//! (`safe_until`). What this cannot cover: Redis' clock jumping forward
//! (Redis expires keys by its wall clock), and a failover to a replica
//! (the README's "Redis backend").
//!
//! **Loss.** A session whose refreshes go unanswered until `lost_after` is
//! retired, every grant under it reported `backend_unreachable` (at that
//! instant, not at the next tick); one whose key is found gone (expired:
//! this server was frozen or cut off past the TTL; deleted by hand) is
//! retired `session_expired`. Either way a new session (a new sid) opens,
//! and the old key, with the contenders this server knows of, is deleted
//! as soon as Redis answers. Each refresh also checks that the contenders
//! this server holds are still queued, up to 512 of them per refresh in
//! turn: one removed from outside (`redis-cli ZREM`) is reported
//! `node_deleted` within `ceil(held / 512)` refresh intervals (one, below
//! 512 held locks) plus a round trip.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use clastor_protocol::LostReason;
use redis::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::scripts::Scripts;
use super::{Conn, Keys, error};
use crate::backend::{BackendError, LostNotifier, SessionHealth};
use crate::backoff::Backoff;
use crate::key::LockKey;

/// Holders are told at this part of the TTL after the last answered
/// refresh (module docs).
pub(super) fn lost_after(ttl: Duration) -> Duration {
    ttl * 3 / 5
}

/// How often the session is refreshed: a tenth of its TTL (at least
/// 20 ms), so several go unanswered before anyone is told.
pub(super) fn refresh_interval(ttl: Duration) -> Duration {
    (ttl / 10).max(Duration::from_millis(20))
}

/// A grant made under a session, kept so its holder can be told if it is
/// lost, and so each refresh can check its contender is still queued.
#[derive(Debug)]
struct GrantRecord {
    key: LockKey,
    token: u64,
    notifier: LostNotifier,
    contender: Contender,
}

/// Where a contender lives: its queue, the version's index, its member
/// name and the lock's id.
#[derive(Debug, Clone)]
pub(super) struct Contender {
    pub(super) queue: String,
    pub(super) index: String,
    pub(super) member: String,
    pub(super) id: String,
}

/// One session of this server.
#[derive(Debug)]
pub(super) struct Session {
    sid: String,
    secret: String,
    key: String,
    ttl: Duration,
    lost_after: Duration,
    born: Instant,
    /// Send time (µs since `born`) of the last answered refresh.
    contact_us: AtomicU64,
    /// Round trip of the last answered refresh, µs.
    last_probe_us: AtomicU64,
    refreshes: AtomicU64,
    next_member: AtomicU64,
    retired: CancellationToken,
    grants: Mutex<Grants>,
}

#[derive(Debug, Default)]
struct Grants {
    next: u64,
    table: BTreeMap<u64, GrantRecord>,
    /// The last grant whose contender a refresh checked: the next refresh
    /// goes on after it.
    checked: u64,
}

/// Held contenders one refresh checks, at most: the refresh stays a short
/// script however many locks this server holds, and every contender is
/// checked once per `ceil(held / CHECK_BATCH)` refreshes.
const CHECK_BATCH: usize = 512;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The critical sections here cannot panic half-way; a poisoned table is
    // still consistent.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// 64 random bits from the standard library's randomly keyed hasher (the
/// OS seeds its keys), mixed with the time and the process.
fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}

impl Session {
    fn new(keys: &Keys, ttl: Duration, sent: Instant) -> Session {
        let sid = format!("{:016x}", random_u64());
        Session {
            key: format!("{}{sid}", keys.session_prefix()),
            sid,
            secret: format!("{:016x}{:016x}", random_u64(), random_u64()),
            ttl,
            lost_after: lost_after(ttl),
            born: sent,
            contact_us: AtomicU64::new(0),
            last_probe_us: AtomicU64::new(0),
            refreshes: AtomicU64::new(0),
            next_member: AtomicU64::new(0),
            retired: CancellationToken::new(),
            grants: Mutex::default(),
        }
    }

    /// The session's id (the `{sid}` of its key and of its contenders).
    pub(super) fn sid(&self) -> &str {
        &self.sid
    }

    /// Its key.
    pub(super) fn key(&self) -> &str {
        &self.key
    }

    /// `{prefix}:session:`: what its key is its sid after.
    pub(super) fn session_prefix(&self) -> &str {
        &self.key[..self.key.len() - self.sid.len()]
    }

    /// Its secret: the key's value.
    pub(super) fn secret(&self) -> &str {
        &self.secret
    }

    /// Its TTL.
    pub(super) fn ttl(&self) -> Duration {
        self.ttl
    }

    /// A new contender name of this session: `{sid}:{n}`, never reused.
    pub(super) fn member(&self) -> String {
        let n = self.next_member.fetch_add(1, Ordering::Relaxed);
        format!("{}:{n:x}", self.sid)
    }

    /// A refresh sent at `sent` was answered now.
    fn contact(&self, sent: Instant) {
        let at = micros(sent.saturating_duration_since(self.born));
        self.contact_us.fetch_max(at, Ordering::AcqRel);
        self.last_probe_us.store(micros(sent.elapsed()), Ordering::Release);
        self.refreshes.fetch_add(1, Ordering::Relaxed);
    }

    /// When holders of grants made under it must be told they are lost,
    /// unless contact is proven again first.
    pub(super) fn contact_deadline(&self) -> Instant {
        self.born + Duration::from_micros(self.contact_us.load(Ordering::Acquire)) + self.lost_after
    }

    /// Until when nobody else can be granted a lock held under this session.
    pub(super) fn safe_until(&self) -> Instant {
        if self.is_retired() {
            Instant::now()
        } else {
            self.contact_deadline()
        }
    }

    /// Whether new grants may be made under it.
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
    /// the notifier back when the session is already retired.
    pub(super) fn register(
        &self,
        key: &LockKey,
        token: u64,
        notifier: LostNotifier,
        contender: Contender,
    ) -> Result<u64, LostNotifier> {
        let mut grants = lock(&self.grants);
        // Checked under the table's lock: `retire` takes the table after
        // marking the session retired, so no grant slips in after it.
        if self.is_retired() {
            return Err(notifier);
        }
        grants.next += 1;
        let id = grants.next;
        grants.table.insert(
            id,
            GrantRecord {
                key: key.clone(),
                token,
                notifier,
                contender,
            },
        );
        Ok(id)
    }

    /// Forgets a grant (released); its notifier is dropped unfired.
    pub(super) fn forget(&self, grant: u64) {
        let record = lock(&self.grants).table.remove(&grant);
        drop(record);
    }

    /// Reports the grants whose contenders are `gone` lost: removed from
    /// outside.
    fn lose_members(&self, gone: &[String]) {
        let lost: Vec<GrantRecord> = {
            let mut grants = lock(&self.grants);
            let ids: Vec<u64> = grants
                .table
                .iter()
                .filter(|(_, r)| gone.contains(&r.contender.member))
                .map(|(id, _)| *id)
                .collect();
            ids.iter().filter_map(|id| grants.table.remove(id)).collect()
        };
        for r in lost {
            warn!(key = %r.key, token = r.token, member = %r.contender.member, "lock's contender removed from outside Clastor: lock lost");
            r.notifier.notify(LostReason::NodeDeleted);
        }
    }

    /// The next [`CHECK_BATCH`] held contenders, for a refresh's check, in
    /// grant order from where the last refresh stopped, wrapping around.
    fn held(&self) -> Vec<Contender> {
        let mut grants = lock(&self.grants);
        let after = grants.checked;
        let batch: Vec<(u64, Contender)> = grants
            .table
            .range(after + 1..)
            .chain(grants.table.range(..=after))
            .take(CHECK_BATCH)
            .map(|(id, r)| (*id, r.contender.clone()))
            .collect();
        if let Some((last, _)) = batch.last() {
            grants.checked = *last;
        }
        batch.into_iter().map(|(_, k)| k).collect()
    }

    /// Retires the session and reports every grant under it lost; returns
    /// their contenders (to remove from Redis).
    fn retire(&self, reason: LostReason) -> Vec<Contender> {
        self.retired.cancel();
        let lost: Vec<GrantRecord> = std::mem::take(&mut lock(&self.grants).table).into_values().collect();
        if !lost.is_empty() {
            warn!(
                session = %self.sid,
                reason = reason.name(),
                grants = lost.len(),
                "Redis session retired: its locks are lost"
            );
        }
        let mut contenders = Vec::with_capacity(lost.len());
        for r in lost {
            contenders.push(r.contender);
            r.notifier.notify(reason);
        }
        contenders
    }

    fn health(&self) -> SessionHealth {
        let retired = self.is_retired();
        let since = Instant::now()
            .saturating_duration_since(self.born + Duration::from_micros(self.contact_us.load(Ordering::Acquire)));
        SessionHealth {
            slot: 0,
            id: self.sid.clone(),
            state: if retired {
                "lost"
            } else if since < refresh_interval(self.ttl) * 3 {
                "connected"
            } else {
                "disconnected"
            },
            trusted: self.trusted(),
            grants: lock(&self.grants).table.len(),
            last_contact: Some(since),
            last_probe: Some(Duration::from_micros(self.last_probe_us.load(Ordering::Acquire))),
            requests: self.refreshes.load(Ordering::Relaxed),
            request_time: Duration::ZERO,
        }
    }
}

/// This server's sessions: the current one, replaced by its supervisor
/// whenever it is retired.
#[derive(Debug)]
pub(super) struct Sessions {
    conn: Conn,
    keys: Arc<Keys>,
    scripts: Arc<Scripts>,
    ttl: Duration,
    current: Mutex<Option<Arc<Session>>>,
    /// Bumped whenever a new session opens.
    opened: tokio::sync::watch::Sender<u64>,
    closed: CancellationToken,
    tasks: TaskTracker,
}

impl Sessions {
    /// Starts the supervisor; the session opens as Redis answers.
    pub(super) fn start(conn: Conn, keys: Arc<Keys>, scripts: Arc<Scripts>, ttl: Duration) -> Arc<Sessions> {
        let sessions = Arc::new(Sessions {
            conn,
            keys,
            scripts,
            ttl,
            current: Mutex::new(None),
            opened: tokio::sync::watch::Sender::new(0),
            closed: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        let s = sessions.clone();
        sessions.tasks.spawn(async move { s.supervise().await });
        sessions
    }

    /// Waits until a session is open and trusted.
    ///
    /// # Errors
    /// A message if that took longer than `timeout`.
    pub(super) async fn wait_open(&self, timeout: Duration) -> Result<(), String> {
        let mut opened = self.opened.subscribe();
        let open = async {
            loop {
                if lock(&self.current).as_ref().is_some_and(|s| s.trusted()) {
                    return;
                }
                if opened.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::time::timeout(timeout, open)
            .await
            .map_err(|_| format!("no session opened within {timeout:?}"))
    }

    /// The session new grants are made under.
    ///
    /// # Errors
    /// [`BackendError::Closed`] after shutdown, [`BackendError::Unavailable`]
    /// when the session is not in contact.
    pub(super) fn current(&self) -> Result<Arc<Session>, BackendError> {
        if self.closed.is_cancelled() {
            return Err(BackendError::Closed);
        }
        lock(&self.current)
            .clone()
            .filter(|s| s.trusted())
            .ok_or_else(|| BackendError::Unavailable("the Redis session is not in contact (Redis unreachable?)".into()))
    }

    /// The session TTL as configured.
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

    /// Stops the supervisor: the session is retired (its grants reported
    /// lost to whoever still holds them) and its key deleted with the
    /// contenders it held, within a few seconds.
    pub(super) async fn shutdown(&self) {
        self.closed.cancel();
        self.tasks.close();
        if tokio::time::timeout(error::REQUEST_TIMEOUT * 2, self.tasks.wait())
            .await
            .is_err()
        {
            warn!("the Redis session was not ended in time; it expires with its TTL");
        }
    }

    /// Keeps a session open until the backend closes.
    async fn supervise(&self) {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
        while !self.closed.is_cancelled() {
            let sent = Instant::now();
            let session = Arc::new(Session::new(&self.keys, self.ttl, sent));
            let opened = tokio::select! {
                () = self.closed.cancelled() => return,
                r = error::once("open a session", {
                    let mut c = self.conn.get();
                    let cmd = redis::cmd("SET")
                        .arg(session.key())
                        .arg(session.secret())
                        .arg("PX")
                        .arg(millis(self.ttl))
                        .arg("NX")
                        .clone();
                    async move { cmd.query_async::<Value>(&mut c).await }
                }) => r,
            };
            match opened {
                Ok(Value::Okay) => backoff.reset(),
                other => {
                    match other {
                        Err(e) => warn!(error = %e, "cannot open a Redis session; retrying"),
                        Ok(v) => warn!(answer = ?v, "Redis refused a new session key; retrying"),
                    }
                    if !backoff.wait(&self.closed).await {
                        return;
                    }
                    continue;
                }
            }
            session.contact(sent);
            info!(session = %session.sid, ttl = ?self.ttl, "Redis session opened");
            *lock(&self.current) = Some(session.clone());
            self.opened.send_modify(|n| *n += 1);
            let reason = self.keep_alive(&session).await;
            *lock(&self.current) = None;
            let contenders = session.retire(reason);
            // End it in the background (the server needs a new session
            // now): its contenders go at once rather than at its expiry. On
            // shutdown this is the release of whatever is left.
            let (conn, scripts) = (self.conn.clone(), self.scripts.clone());
            self.tasks.spawn(async move {
                // In batches, so no one script keeps Redis busy for long;
                // the key goes with the last.
                let batches: Vec<&[Contender]> = if contenders.is_empty() {
                    vec![&[]]
                } else {
                    contenders.chunks(CHECK_BATCH).collect()
                };
                let ended = async {
                    for (i, batch) in batches.iter().enumerate() {
                        let last = if i + 1 == batches.len() { "1" } else { "0" };
                        error::retry("end a session", || {
                            let mut c = conn.get();
                            let mut inv = scripts.end.key(session.key());
                            inv.arg(session.secret()).arg(last).arg(session.session_prefix());
                            for k in *batch {
                                inv.arg(&k.queue).arg(&k.index).arg(&k.member).arg(&k.id);
                            }
                            async move { inv.invoke_async::<Value>(&mut c).await }
                        })
                        .await?;
                    }
                    Ok::<(), BackendError>(())
                };
                match tokio::time::timeout(session.ttl, ended).await {
                    Ok(Ok(_)) => info!(session = %session.sid, "Redis session ended"),
                    Ok(Err(e)) => {
                        warn!(session = %session.sid, error = %e, "cannot end a Redis session; it expires with its TTL");
                    }
                    Err(_) => warn!(session = %session.sid, "cannot end a Redis session in time; it expires with its TTL"),
                }
            });
        }
    }

    /// Refreshes `session` until it must be retired; returns why.
    async fn keep_alive(&self, session: &Session) -> LostReason {
        let every = refresh_interval(session.ttl);
        let mut tick = tokio::time::interval_at(Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = self.closed.cancelled() => return LostReason::ServerShutdown,
                () = tokio::time::sleep_until(session.contact_deadline()) => {
                    // The deadline moves with every answer: lost only if it
                    // has really passed.
                    if Instant::now() >= session.contact_deadline() {
                        return LostReason::BackendUnreachable;
                    }
                }
                _ = tick.tick() => {}
            }
            let sent = Instant::now();
            let held = session.held();
            let refresh = async {
                let mut c = self.conn.get();
                let mut inv = self.scripts.refresh.key(session.key());
                inv.arg(session.secret()).arg(millis(session.ttl));
                for k in &held {
                    inv.arg(&k.queue).arg(&k.member);
                }
                inv.invoke_async::<Vec<Value>>(&mut c).await
            };
            let answer = tokio::select! {
                biased;
                () = self.closed.cancelled() => return LostReason::ServerShutdown,
                () = tokio::time::sleep_until(session.contact_deadline()) => {
                    if Instant::now() >= session.contact_deadline() {
                        return LostReason::BackendUnreachable;
                    }
                    continue;
                }
                r = tokio::time::timeout(error::REQUEST_TIMEOUT, refresh) => r,
            };
            match answer {
                Ok(Ok(values)) => match values.first() {
                    Some(Value::Int(1)) => {
                        session.contact(sent);
                        let gone: Vec<String> = values[1..].iter().filter_map(text).collect();
                        if !gone.is_empty() {
                            session.lose_members(&gone);
                        }
                    }
                    _ => {
                        warn!(session = %session.sid, "the Redis session key is gone (expired, or deleted from outside)");
                        return LostReason::SessionExpired;
                    }
                },
                Ok(Err(e)) => tracing::debug!(session = %session.sid, error = %e, "Redis session refresh failed"),
                Err(_) => tracing::debug!(session = %session.sid, "Redis session refresh unanswered"),
            }
        }
    }
}

/// Milliseconds of `d`, for `PX` and `PEXPIRE`.
pub(super) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// A bulk or simple string reply as text.
pub(super) fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Okay => Some("OK".to_owned()),
        _ => None,
    }
}

/// An integer reply.
pub(super) fn int(v: Option<&Value>) -> Option<i64> {
    match v {
        Some(Value::Int(i)) => Some(*i),
        Some(Value::BulkString(b)) => std::str::from_utf8(b).ok()?.parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn margins() {
        assert_eq!(lost_after(Duration::from_secs(10)), Duration::from_secs(6));
        assert_eq!(refresh_interval(Duration::from_secs(10)), Duration::from_secs(1));
        assert_eq!(refresh_interval(Duration::from_millis(100)), Duration::from_millis(20));
        assert_ne!(random_u64(), random_u64());
    }
}
