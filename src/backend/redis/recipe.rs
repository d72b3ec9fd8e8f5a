//! `impl Backend for RedisBackend`: the one-script acquire, the wait for the
//! turn, release and the reads.
//!
//! **Acquire.** One script (`ACQUIRE`): *if* the kind's record is the text
//! this server last saw *and* this server's session key holds its secret,
//! take a token (`INCR`), queue the contender scored by it, remove dead
//! contenders at the head, and say whether ours is first (a reader: whether
//! no live writer is ahead of it; `scripts.rs`) — granted in one round
//! trip. Otherwise we wait: subscribe to the lock's channel, then
//! look (`CHECK`: still queued? first? — removing dead contenders ahead;
//! if not, how long the head's session has left). A release announces the
//! contender it made first and how long that one's session has left: the
//! one named is granted without a look, and the others look again only
//! when that session could have expired — one look per waiter per head,
//! not per release, and no herd. The safety net: a look at least once per
//! session TTL (a queue changed by hand announces nothing), and at once
//! after a census or a broken pub/sub connection. A contender removed from
//! outside while it waits is queued again (a few times).
//!
//! **Holding.** A grant is registered with the session (`session.rs`): it
//! is reported lost with the session (`backend_unreachable`,
//! `session_expired`), and the refreshes check that its contender is still
//! queued (`node_deleted` within one refresh interval — a tenth of the TTL
//! — plus a round trip if someone removed it by hand, while the server
//! holds fewer than 512 locks; `session.rs` has the bound).
//!
//! **Nothing left behind.** A contender being waited for belongs to a
//! [`PendingKey`], and a granted one to a [`RedisGuard`]; dropping either
//! removes the contender (in the background, retried until it is gone or
//! its session is retired — after which it dies with the session key,
//! within one TTL), so a cancelled, timed-out or failed acquire and a
//! vanished holder leave nothing that would block the next contender.

use std::sync::Arc;
use std::time::Duration;

use clastor_protocol::{KindMode, LockMode};
use redis::Value;
use tokio::time::Instant;
use tracing::warn;

use super::kinds::seen_at;
use super::scripts::{self, Scripts};
use super::session::{Contender, Session, int, lost_after, refresh_interval};
use super::{Conn, RedisBackend, error};
use crate::backend::{
    AcquireRequest, Backend, BackendError, BackendHealth, Grant, KindVersion, RotateOutcome, RotateRequest,
};
use crate::backoff::Backoff;
use crate::key::LockKey;

/// Times a waiting contender removed from outside is queued again before
/// the acquire gives up.
const MAX_REQUEUES: u32 = 3;

/// Slack after the head's session key would expire before looking again:
/// Redis expires a key at its deadline or just after it.
const EXPIRY_SLACK: Duration = Duration::from_millis(5);

/// Removes `contender` until it is gone, or its session is retired (which
/// takes it with the session key); never gives up while both live.
fn remove_in_background(conn: &Conn, scripts: &Arc<Scripts>, contender: Contender, session: Arc<Session>) {
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let (conn, scripts) = (conn.clone(), scripts.clone());
    handle.spawn(async move {
        let mut pause = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
        loop {
            let removed = remove(&conn, &scripts, &session, &contender);
            tokio::select! {
                r = removed => match r {
                    Ok(()) => return,
                    Err(e) => warn!(member = %contender.member, error = %e, "cannot remove a lock's contender yet; retrying"),
                },
                () = session.until_retired() => return,
            }
            if !pause.wait_or(session.until_retired()).await {
                return;
            }
        }
    });
}

/// One `REMOVE` of contender `k` of `session` (retried).
async fn remove(conn: &Conn, scripts: &Scripts, session: &Session, k: &Contender) -> Result<(), BackendError> {
    let session_prefix = session.session_prefix();
    let mut cmd = scripts::evalsha(&scripts.remove, 2);
    cmd.arg(&k.queue)
        .arg(&k.index)
        .arg(&k.member)
        .arg(&k.id)
        .arg(session_prefix);
    error::retry("remove a lock's contender", || {
        let mut c = conn.get();
        let (script, cmd) = (&scripts.remove, &cmd);
        async move { scripts::run::<Value>(&mut c, script, cmd).await }
    })
    .await
    .map(drop)
}

/// A contender not (yet) granted: removed when dropped, unless it became a
/// grant or is known never to have been queued.
#[derive(Debug)]
struct PendingKey {
    conn: Conn,
    scripts: Arc<Scripts>,
    contender: Option<Contender>,
    session: Arc<Session>,
}

impl PendingKey {
    fn contender(&self) -> Option<&Contender> {
        self.contender.as_ref()
    }

    /// The contender was never queued, or is known to be gone.
    fn forget(mut self) {
        self.contender = None;
    }

    /// The contender is granted: the guard owns it now.
    fn into_granted(mut self) -> Option<Contender> {
        self.contender.take()
    }
}

impl Drop for PendingKey {
    fn drop(&mut self) {
        if let Some(k) = self.contender.take() {
            remove_in_background(&self.conn, &self.scripts, k, self.session.clone());
        }
    }
}

/// A grant: its contender and the session it lives on. Dropping it
/// releases the lock in the background.
#[derive(Debug)]
pub struct RedisGuard {
    held: Option<Held>,
}

#[derive(Debug)]
struct Held {
    conn: Conn,
    scripts: Arc<Scripts>,
    contender: Contender,
    session: Arc<Session>,
    grant: u64,
}

impl RedisGuard {
    /// The lock's queue in Redis (a sorted set).
    pub fn queue(&self) -> &str {
        self.held.as_ref().map_or("", |h| &h.contender.queue)
    }

    /// The contender's member name in the queue (`{session}:{n}`).
    pub fn member(&self) -> &str {
        self.held.as_ref().map_or("", |h| &h.contender.member)
    }

    fn take(&mut self) -> Option<Held> {
        let held = self.held.take()?;
        held.session.forget(held.grant);
        Some(held)
    }
}

impl Drop for RedisGuard {
    fn drop(&mut self) {
        if let Some(h) = self.take() {
            remove_in_background(&h.conn, &h.scripts, h.contender, h.session);
        }
    }
}

/// How a wait for our turn ended.
enum Turn {
    Granted,
    TimedOut,
    /// Our contender was removed from outside while we waited.
    Deleted,
}

/// What `ACQUIRE` answered.
enum Queued {
    /// The kind's record is not what we expected: here it is.
    Record(Value),
    /// Our session key is gone.
    NoSession,
    /// Queued with this token, first or not.
    At { token: u64, first: bool },
}

impl RedisBackend {
    /// Waits until our contender is first — a reader (`shared`), until no
    /// live writer is ahead of it.
    async fn wait_turn(
        &self,
        k: &Contender,
        shared: bool,
        session: &Session,
        deadline: Instant,
    ) -> Result<Turn, BackendError> {
        let recheck_max = session.ttl();
        // When the head's session would expire if its server stopped
        // refreshing it: look again just after (at most a TTL away).
        let look_after = |pttl: i64| {
            Instant::now()
                + match u64::try_from(pttl) {
                    Ok(ms) => (Duration::from_millis(ms) + EXPIRY_SLACK).min(recheck_max),
                    Err(_) => recheck_max,
                }
        };
        let lost = || BackendError::Unavailable("the Redis session of a waiting acquire was lost".into());
        let mut sub = tokio::select! {
            s = self.notify.subscribe(&k.queue) => s?,
            () = tokio::time::sleep_until(deadline) => return Ok(Turn::TimedOut),
        };
        // Look at once, after subscribing: a release before the
        // subscription is seen by the look, one after it wakes us.
        let mut next_look = Instant::now();
        loop {
            if Instant::now() >= next_look {
                let mut cmd = scripts::evalsha(&self.scripts.check, 1);
                cmd.arg(&k.queue).arg(&k.member).arg(self.keys.session_prefix());
                let look = error::retry("look at a lock's queue", || {
                    let mut c = self.conn.get();
                    let (script, cmd) = (&self.scripts.check, &cmd);
                    async move { scripts::run::<Vec<Value>>(&mut c, script, cmd).await }
                });
                let answer = tokio::select! {
                    biased;
                    () = session.until_retired() => return Err(lost()),
                    r = look => r?,
                    () = tokio::time::sleep_until(deadline) => return Ok(Turn::TimedOut),
                };
                match int(answer.first()) {
                    Some(1) => return Ok(Turn::Granted),
                    Some(2) => next_look = look_after(int(answer.get(1)).unwrap_or(-1)),
                    _ => return Ok(Turn::Deleted),
                }
            }
            tokio::select! {
                biased;
                () = session.until_retired() => return Err(lost()),
                r = sub.changed() => {
                    let payload = r?;
                    match payload.as_deref().and_then(|p| p.split_once(' ')) {
                        // Named first: first until removed, no look needed
                        // (`scripts.rs`).
                        Some((member, _)) if member == k.member => return Ok(Turn::Granted),
                        // A reader may hold beside a new head: look.
                        Some(_) if shared => next_look = Instant::now(),
                        // Another is first, alive as the message was sent:
                        // nothing to look at before its session could expire.
                        Some((_, pttl)) => next_look = look_after(pttl.parse().unwrap_or(-1)),
                        // A census changed the queue, or the connection
                        // broke: look.
                        None => next_look = Instant::now(),
                    }
                }
                () = tokio::time::sleep_until(next_look) => {}
                () = tokio::time::sleep_until(deadline) => return Ok(Turn::TimedOut),
            }
        }
    }

    /// Sends `ACQUIRE` once for `k` under `session`, expecting `record`.
    async fn queue(
        &self,
        key: &LockKey,
        k: &Contender,
        session: &Session,
        record: &str,
    ) -> Result<Queued, BackendError> {
        let mut cmd = scripts::evalsha(&self.scripts.acquire, 5);
        cmd.arg(self.keys.record(key.kind()))
            .arg(self.keys.token())
            .arg(&k.queue)
            .arg(&k.index)
            .arg(session.key())
            .arg(record)
            .arg(&k.member)
            .arg(self.keys.session_prefix())
            .arg(&k.id)
            .arg(session.secret());
        let answer: Vec<Value> = error::once("queue a contender", async {
            let mut c = self.conn.get();
            scripts::run(&mut c, &self.scripts.acquire, &cmd).await
        })
        .await?;
        let bad = || BackendError::Internal(format!("redis: the acquire script answered {answer:?}"));
        match int(answer.first()) {
            Some(0) => Ok(Queued::Record(answer.get(1).cloned().ok_or_else(bad)?)),
            Some(-1) => Ok(Queued::NoSession),
            Some(n @ (1 | 2)) => {
                let token = int(answer.get(1)).and_then(|t| u64::try_from(t).ok()).ok_or_else(bad)?;
                Ok(Queued::At { token, first: n == 1 })
            }
            _ => Err(bad()),
        }
    }
}

impl Backend for RedisBackend {
    type Guard = RedisGuard;

    fn name(&self) -> &'static str {
        "redis"
    }

    async fn acquire(&self, req: AcquireRequest<'_>) -> Result<Option<Grant<RedisGuard>>, BackendError> {
        let shared = req.mode == LockMode::Shared;
        let deadline = Instant::now() + req.wait;
        let key = req.key;
        let kind = key.kind_arc();
        let mut seen = self.kinds.cached(kind);
        let mut requeues = 0;
        let mut records = 0;
        loop {
            if seen.version.mode != KindMode::Normal {
                // The cold paths are boxed, so the uncontended acquire's
                // future stays small (it is moved several times per request).
                match Box::pin(self.kinds.wait_normal(kind, seen, deadline)).await? {
                    Some(s) => seen = s,
                    None => return Ok(None),
                }
            }
            let session = self.sessions.current()?;
            let version = &seen.version.version;
            let pending = PendingKey {
                conn: self.conn.clone(),
                scripts: self.scripts.clone(),
                contender: Some(Contender {
                    queue: self.keys.queue(kind, version, key.id()),
                    index: self.keys.index(kind, version),
                    // A reader's member ends with `:r` (`scripts.rs`).
                    member: if shared {
                        format!("{}:r", session.member())
                    } else {
                        session.member()
                    },
                    id: key.id().to_owned(),
                }),
                session: session.clone(),
            };
            let Some(k) = pending.contender().cloned() else {
                return Err(BackendError::Internal("a pending contender without its name".into()));
            };
            // Sent once: a lost answer leaves the contender to `pending`'s drop.
            let (token, first) = match self.queue(key, &k, &session, &seen.raw).await? {
                Queued::Record(record) => {
                    // The kind's record moved on: learn it and go again.
                    pending.forget();
                    records += 1;
                    if records > 16 {
                        return Err(BackendError::Unavailable(format!(
                            "the version record of {kind} kept changing under the acquire"
                        )));
                    }
                    seen = seen_at(&[record], 0)?;
                    self.kinds.remember(kind, &seen);
                    continue;
                }
                Queued::NoSession => {
                    pending.forget();
                    return Err(BackendError::Unavailable(
                        "the Redis session key is gone (expired); a new session is opening".into(),
                    ));
                }
                Queued::At { token, first } => (token, first),
            };
            let turn = if first {
                Turn::Granted
            } else {
                Box::pin(self.wait_turn(&k, shared, &session, deadline)).await?
            };
            match turn {
                Turn::Granted => {}
                Turn::TimedOut => return Ok(None),
                Turn::Deleted if requeues < MAX_REQUEUES => {
                    requeues += 1;
                    warn!(%key, member = %k.member, "our waiting contender was removed from outside; queueing again");
                    pending.forget();
                    continue;
                }
                Turn::Deleted => {
                    return Err(BackendError::Unavailable(format!(
                        "the contender for {key} kept being removed from outside"
                    )));
                }
            }
            let grant = session
                .register(key, token, req.on_lost, k)
                .map_err(|_| BackendError::Unavailable("the Redis session was lost as the lock was granted".into()))?;
            let Some(contender) = pending.into_granted() else {
                session.forget(grant);
                return Err(BackendError::Internal("a granted contender without its name".into()));
            };
            return Ok(Some(Grant {
                token,
                version: seen.version.version.clone(),
                guard: RedisGuard {
                    held: Some(Held {
                        conn: self.conn.clone(),
                        scripts: self.scripts.clone(),
                        contender,
                        session,
                        grant,
                    }),
                },
            }));
        }
    }

    async fn release(&self, mut guard: RedisGuard) -> Result<(), BackendError> {
        let Some(h) = guard.take() else { return Ok(()) };
        match remove(&h.conn, &h.scripts, &h.session, &h.contender).await {
            Ok(()) => Ok(()),
            // Its session is gone, and the contender with it.
            Err(_) if h.session.is_retired() => Ok(()),
            Err(e) => {
                remove_in_background(&h.conn, &h.scripts, h.contender, h.session);
                Err(e)
            }
        }
    }

    async fn is_held(&self, key: &LockKey) -> Result<bool, BackendError> {
        let seen = self.kinds.read(key.kind_arc()).await?;
        let queue = self.keys.queue(key.kind(), &seen.version.version, key.id());
        let held: i64 = error::retry("look at a lock's queue", || {
            let mut c = self.conn.get();
            let mut inv = self.scripts.held.key(&queue);
            inv.arg(self.keys.session_prefix());
            async move { inv.invoke_async(&mut c).await }
        })
        .await?;
        Ok(held == 1)
    }

    async fn rotate(&self, req: RotateRequest<'_>) -> Result<RotateOutcome, BackendError> {
        self.rotate_kind(req).await
    }

    async fn abort_rotation(&self, kind: &Arc<str>) -> Result<(KindVersion, bool), BackendError> {
        self.abort_kind(kind).await
    }

    async fn count_locks(&self, kind: &Arc<str>, version: &str) -> Result<u32, BackendError> {
        Ok(self.census(kind, version).await?.0)
    }

    async fn version(&self, kind: &str) -> Result<KindVersion, BackendError> {
        let kind: Arc<str> = Arc::from(kind);
        Ok(self.kinds.read(&kind).await?.version)
    }

    fn cached_version(&self, kind: &str) -> Option<KindVersion> {
        self.kinds.cached_version(kind)
    }

    fn safe_until(&self, guard: &RedisGuard) -> Option<Instant> {
        Some(
            guard
                .held
                .as_ref()
                .map_or_else(Instant::now, |h| h.session.safe_until()),
        )
    }

    fn fixed_layout(&self) -> Option<clastor_protocol::KindLayout> {
        // Readers' members are marked `:r`; every kind takes shared locks.
        Some(clastor_protocol::KindLayout::ReadWrite)
    }

    fn confirm_interval(&self) -> Option<Duration> {
        Some(refresh_interval(self.sessions.ttl()))
    }

    fn health(&self) -> BackendHealth {
        let (ready, sessions) = self.sessions.health();
        BackendHealth {
            ready,
            detail: if ready {
                "redis: session in contact".to_owned()
            } else {
                "redis: session not in contact with Redis".to_owned()
            },
            sessions,
        }
    }

    fn info(&self) -> Vec<(String, String)> {
        let (ready, sessions) = self.sessions.health();
        let mut out = vec![
            ("redis_ready".to_owned(), ready.to_string()),
            (
                "redis_session_ttl_ms".to_owned(),
                self.sessions.ttl().as_millis().to_string(),
            ),
            (
                "redis_lost_after_ms".to_owned(),
                lost_after(self.sessions.ttl()).as_millis().to_string(),
            ),
        ];
        for s in sessions {
            out.push((
                "redis_session".to_owned(),
                format!("{} {} grants={}", s.id, s.state, s.grants),
            ));
        }
        out
    }

    async fn shutdown(&self) {
        self.sessions.shutdown().await;
        self.notify.shutdown();
    }
}
