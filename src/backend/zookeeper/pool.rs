//! The ZooKeeper session pool: a few `zookeeper_client::Client` sessions shared
//! by every acquire, each watched for health and replaced when lost.
//!
//! Why it is built this way:
//! - One session tops out near 7k lock/unlock pairs per second; a handful
//!   spread the load (round-robin over healthy sessions).
//! - **Holders hear of a loss before anyone else can be granted.** The server
//!   expires a session `timeout` after the last packet it heard from us; the
//!   client crate only declares `Expired` at 7/5 of it. So each session is
//!   probed every `timeout / 10`, and the *send* time of the last answered
//!   request is its "last contact" (the server heard us no earlier than that).
//!   The probe is a `sync` (pipelined with an `exists`): a follower answers
//!   reads and pings from its own copy even while it is cut off from the
//!   leader, which is the server that expires sessions, but it must forward a
//!   `sync` to the leader. Only a write or a `sync` reply proves contact.
//!   Once `3/5 × timeout` pass without contact (the margins are explained at
//!   [`lost_after`](super::session::lost_after)), at that instant and not at
//!   the next probe tick, the session is retired: every grant on it is
//!   reported lost (`BackendUnreachable`), every wait on it fails with
//!   `Unavailable`, and the client is kept open only until the session would
//!   expire anyway (see [`ZkSession::retire`]). Curator treats SUSPENDED as
//!   lost for the same reason. A grant whose reply arrives after that point
//!   (but before the monitor ran) is refused too.
//! - A retired session is replaced by a supervisor task per slot, with
//!   back-off; meanwhile new work goes to the other, healthy sessions.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use clastor_protocol::LostReason;
use futures_util::FutureExt as _;
use futures_util::future::BoxFuture;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};
use zookeeper_client::{Client, SessionState};

use super::error::ZkResult;
use super::session::{Health, ZkSession};
use super::views::Views;
use crate::backend::{BackendError, BackendHealth, SessionHealth};
use crate::backoff::Backoff;

/// What the pool needs to open sessions.
#[derive(Debug, Clone)]
pub(super) struct PoolConfig {
    pub(super) hosts: String,
    pub(super) sessions: usize,
    pub(super) session_timeout: Duration,
    pub(super) connect_timeout: Duration,
    /// Directory views per session (`views.rs`).
    pub(super) watched_dirs: usize,
    /// How long an unused view is kept (`views.rs`; zero: until evicted).
    pub(super) view_idle: Duration,
    /// Digest credentials every session authenticates with.
    pub(super) digest: Option<super::ZkDigest>,
}

/// One slot of the pool: the session currently serving it, if any.
#[derive(Debug, Default)]
struct Slot {
    current: RwLock<Option<Arc<ZkSession>>>,
    generations: AtomicU64,
}

impl Slot {
    fn get(&self) -> Option<Arc<ZkSession>> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn set(&self, session: Option<Arc<ZkSession>>) {
        *self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner) = session;
    }
}

/// Why a session's monitor ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SessionEnd {
    Shutdown,
    Unreachable,
    Expired,
    Closed,
}

impl SessionEnd {
    fn reason(self) -> LostReason {
        match self {
            SessionEnd::Shutdown => LostReason::ServerShutdown,
            SessionEnd::Unreachable => LostReason::BackendUnreachable,
            SessionEnd::Expired => LostReason::SessionExpired,
            SessionEnd::Closed => LostReason::BackendError,
        }
    }
}

/// The pool.
#[derive(Debug)]
pub(super) struct Pool {
    cfg: PoolConfig,
    slots: Vec<Slot>,
    next: AtomicUsize,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

/// Opens one session, bounded by the connect timeout. Also returns when the
/// connect began: the session was created, and last heard of, no earlier.
async fn open(cfg: &PoolConfig) -> Result<(Client, Instant), BackendError> {
    let started = Instant::now();
    let mut connector = Client::connector().with_session_timeout(cfg.session_timeout);
    if let Some(digest) = &cfg.digest {
        connector = connector.with_auth("digest", digest.as_bytes());
    }
    let connect = connector.connect(&cfg.hosts);
    match tokio::time::timeout(cfg.connect_timeout, connect).await {
        Ok(Ok(client)) => Ok((client, started)),
        Ok(Err(e)) => Err(BackendError::Unavailable(format!(
            "cannot connect to ZooKeeper at {}: {e}",
            cfg.hosts
        ))),
        Err(_) => Err(BackendError::Unavailable(format!(
            "cannot connect to ZooKeeper at {}: no session within {:?}",
            cfg.hosts, cfg.connect_timeout
        ))),
    }
}

impl Pool {
    /// Opens every session (all must succeed) and starts their supervisors.
    ///
    /// # Errors
    /// [`BackendError::Unavailable`] if ZooKeeper cannot be reached within the
    /// connect timeout.
    pub(super) async fn start(cfg: PoolConfig) -> Result<Arc<Pool>, BackendError> {
        let n = cfg.sessions;
        let opened = futures_util::future::join_all((0..n).map(|_| open(&cfg))).await;
        let clients = opened.into_iter().collect::<Result<Vec<_>, _>>()?;
        let pool = Arc::new(Pool {
            slots: (0..n).map(|_| Slot::default()).collect(),
            cfg,
            next: AtomicUsize::new(0),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        for (i, (client, started)) in clients.into_iter().enumerate() {
            let first = pool.install(i, client, started);
            let weak = Arc::downgrade(&pool);
            pool.tasks.spawn(supervise(weak, i, first));
        }
        pool.tasks.close();
        info!(hosts = %pool.cfg.hosts, sessions = n, timeout = ?pool.cfg.session_timeout, "ZooKeeper session pool ready");
        Ok(pool)
    }

    /// Puts a new session in `slot`, its last contact counted from `started`
    /// (when its connect began), not from now: sessions opened together wait
    /// for each other, and the leader may have created this one long ago.
    fn install(&self, slot: usize, client: Client, started: Instant) -> Arc<ZkSession> {
        let generation = self.slots[slot].generations.fetch_add(1, Ordering::AcqRel);
        let session = Arc::new(ZkSession::new(
            slot,
            generation,
            client,
            Views::new(self.cfg.watched_dirs, self.cfg.view_idle),
        ));
        session.touch(started);
        info!(
            slot,
            generation,
            session = format_args!("{:#x}", session.session_id()),
            timeout = ?session.timeout(),
            "ZooKeeper session established"
        );
        self.slots[slot].set(Some(Arc::clone(&session)));
        session
    }

    /// A session for new work: round-robin over connected sessions, falling
    /// back to one that is reconnecting (its requests queue until it is back
    /// or is retired).
    ///
    /// # Errors
    /// [`BackendError::Closed`] after shutdown; [`BackendError::Unavailable`]
    /// if every session is lost and not yet replaced.
    pub(super) fn pick(&self) -> Result<Arc<ZkSession>, BackendError> {
        self.pick_where(self.next.fetch_add(1, Ordering::Relaxed), true)
    }

    /// As [`Pool::pick`], starting from the slot `affinity` chooses: the
    /// acquires of one lock go through one session while it is healthy, so
    /// one session, not all of them, keeps a view of its directory. Without
    /// `reconnecting_ok`, only a connected session: for work that must not
    /// queue behind a reconnect (a try-once acquire answers at once).
    ///
    /// # Errors
    /// [`BackendError::Closed`] after shutdown; [`BackendError::Unavailable`]
    /// if no session is usable.
    pub(super) fn pick_for(&self, affinity: u64, reconnecting_ok: bool) -> Result<Arc<ZkSession>, BackendError> {
        // Truncation is fine: only the remainder matters.
        self.pick_where(affinity as usize, reconnecting_ok)
    }

    /// The shortest session timeout ZooKeeper granted the current sessions
    /// (it may clamp the requested one); the requested one while none is up.
    pub(super) fn negotiated_timeout(&self) -> Duration {
        self.slots
            .iter()
            .filter_map(|slot| slot.get().map(|s| s.timeout()))
            .min()
            .unwrap_or(self.cfg.session_timeout)
    }

    fn pick_where(&self, start: usize, reconnecting_ok: bool) -> Result<Arc<ZkSession>, BackendError> {
        if self.shutdown.is_cancelled() {
            return Err(BackendError::Closed);
        }
        let n = self.slots.len();
        let mut fallback = None;
        for k in 0..n {
            let Some(session) = self.slots[(start % n + k) % n].get() else {
                continue;
            };
            match session.health() {
                // One past its contact deadline would only refuse the grant.
                Health::Connected if !session.out_of_contact() => return Ok(session),
                Health::Connected if reconnecting_ok && fallback.is_none() => fallback = Some(session),
                Health::Disconnected if reconnecting_ok && fallback.is_none() => fallback = Some(session),
                _ => {}
            }
        }
        fallback.ok_or_else(|| {
            BackendError::Unavailable(format!(
                "no {} ZooKeeper session is available ({})",
                if reconnecting_ok { "usable" } else { "connected" },
                self.cfg.hosts
            ))
        })
    }

    /// Whether the pool was shut down.
    pub(super) fn is_shut_down(&self) -> bool {
        self.shutdown.is_cancelled()
    }

    /// Every slot's session health; ready when one is trusted.
    pub(super) fn health(&self) -> BackendHealth {
        let sessions: Vec<SessionHealth> = self
            .slots
            .iter()
            .enumerate()
            .map(|(slot, s)| match s.get() {
                Some(s) => s.report(),
                None => SessionHealth {
                    slot,
                    id: String::new(),
                    state: "reconnecting",
                    trusted: false,
                    grants: 0,
                    last_contact: None,
                    last_probe: None,
                    requests: 0,
                    request_time: Duration::ZERO,
                },
            })
            .collect();
        let trusted = sessions.iter().filter(|s| s.trusted).count();
        let ready = trusted > 0 && !self.is_shut_down();
        let detail = if self.is_shut_down() {
            "shut down".to_owned()
        } else {
            format!("{trusted} of {} ZooKeeper sessions trusted", sessions.len())
        };
        BackendHealth {
            ready,
            detail,
            sessions,
        }
    }

    /// `INFO` pairs: one per session, plus totals.
    pub(super) fn info(&self) -> Vec<(String, String)> {
        let mut out = vec![
            ("zk.hosts".to_owned(), self.cfg.hosts.clone()),
            ("zk.sessions".to_owned(), self.slots.len().to_string()),
            (
                "zk.session_timeout_ms".to_owned(),
                self.cfg.session_timeout.as_millis().to_string(),
            ),
            ("zk.watched_dirs".to_owned(), self.cfg.watched_dirs.to_string()),
            ("zk.view_idle".to_owned(), format!("{:?}", self.cfg.view_idle)),
        ];
        let mut healthy = 0;
        for (i, slot) in self.slots.iter().enumerate() {
            let value = match slot.get() {
                Some(s) => {
                    if s.health() == Health::Connected {
                        healthy += 1;
                    }
                    format!(
                        "id={:#x} state={} grants={} views={} last_contact_ms={} generation={}",
                        s.session_id(),
                        s.health().name(),
                        s.grant_count(),
                        s.views().len(),
                        s.since_contact().as_millis(),
                        s.generation()
                    )
                }
                None => "state=reconnecting".to_owned(),
            };
            out.push((format!("zk.session.{i}"), value));
        }
        out.push(("zk.sessions_healthy".to_owned(), healthy.to_string()));
        out
    }

    /// Closes every session (ephemeral nodes vanish) and stops the supervisors.
    pub(super) async fn shutdown(&self) {
        self.shutdown.cancel();
        let grace = self.cfg.session_timeout.min(Duration::from_secs(5));
        if tokio::time::timeout(grace, self.tasks.wait()).await.is_err() {
            warn!("ZooKeeper session supervisors did not stop within {grace:?}");
        }
    }
}

/// Keeps one slot served: monitors its session, retires it when lost, opens a
/// replacement with back-off. Holds the pool weakly so dropping the backend
/// without `shutdown` still ends it.
async fn supervise(pool: std::sync::Weak<Pool>, slot: usize, first: Arc<ZkSession>) {
    let mut session = Some(first);
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        let Some(current) = session.take() else {
            // Open a replacement.
            let Some(p) = pool.upgrade() else { return };
            if p.is_shut_down() {
                return;
            }
            let shutdown = p.shutdown.clone();
            let cfg = p.cfg.clone();
            drop(p);
            let opened = tokio::select! {
                r = open(&cfg) => r,
                () = shutdown.cancelled() => return,
            };
            match opened {
                Ok((client, started)) => {
                    let Some(p) = pool.upgrade() else { return };
                    session = Some(p.install(slot, client, started));
                    backoff.reset();
                }
                Err(e) => {
                    warn!(slot, error = %e, retry_in = ?backoff.delay(), "cannot replace ZooKeeper session");
                    if !backoff.wait(&shutdown).await {
                        return;
                    }
                }
            }
            continue;
        };
        let Some(shutdown) = pool.upgrade().map(|p| p.shutdown.clone()) else {
            current.retire(LostReason::ServerShutdown);
            return;
        };
        let end = monitor(&current, &shutdown).await;
        if let Some(p) = pool.upgrade() {
            p.slots[slot].set(None);
        }
        let reason = end.reason();
        info!(
            slot,
            session = format_args!("{:#x}", current.session_id()),
            reason = reason.name(),
            since_contact = ?current.since_contact(),
            "retiring ZooKeeper session"
        );
        let closing = current.retire(reason);
        if let SessionEnd::Shutdown = end {
            if let Some(closing) = closing {
                closing.closed(Duration::from_secs(2)).await;
            }
            return;
        }
    }
}

type Probe = BoxFuture<'static, ProbeOutcome>;

/// What one probe (`sync` + `exists`, pipelined) says about the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProbeOutcome {
    /// The `sync` was answered, so the leader heard the session when the
    /// probe was sent: contact.
    Contact,
    /// No proof of contact (a read answered by a follower proves nothing).
    NoContact,
    /// The session is over.
    Ended(SessionEnd),
}

impl ProbeOutcome {
    fn of(sync: &ZkResult<()>, exists: &ZkResult<Option<zookeeper_client::Stat>>) -> ProbeOutcome {
        use zookeeper_client::Error::{ClientClosed, SessionExpired};
        match (sync, exists) {
            (Err(SessionExpired), _) | (_, Err(SessionExpired)) => ProbeOutcome::Ended(SessionEnd::Expired),
            (Err(ClientClosed), _) | (_, Err(ClientClosed)) => ProbeOutcome::Ended(SessionEnd::Closed),
            (Ok(()), _) => ProbeOutcome::Contact,
            (Err(_), _) => ProbeOutcome::NoContact,
        }
    }
}

/// What a session-state change means for the pool.
fn on_state(session: &ZkSession, state: SessionState) -> Result<bool, SessionEnd> {
    match state {
        SessionState::SyncConnected | SessionState::ConnectedReadOnly => {
            session.set_health(Health::Connected);
            Ok(true)
        }
        SessionState::Disconnected => {
            warn!(
                slot = session.slot(),
                session = format_args!("{:#x}", session.session_id()),
                "ZooKeeper session disconnected"
            );
            session.set_health(Health::Disconnected);
            Ok(false)
        }
        SessionState::Expired => Err(SessionEnd::Expired),
        SessionState::Closed | SessionState::AuthFailed => Err(SessionEnd::Closed),
    }
}

/// How often a session's contact with the leader is probed: a tenth of its
/// timeout (at least 20 ms).
pub(super) fn probe_interval(timeout: Duration) -> Duration {
    (timeout / 10).max(Duration::from_millis(20))
}

/// Watches one session until it must be retired.
async fn monitor(session: &ZkSession, shutdown: &CancellationToken) -> SessionEnd {
    let Ok(client) = session.client() else {
        return SessionEnd::Closed;
    };
    let mut states = client.state_watcher();
    drop(client);
    // `state_watcher` marks the current state as seen: apply it, or a
    // disconnect between connecting and here would go unnoticed.
    if let Err(end) = on_state(session, states.peek_state()) {
        return end;
    }
    let every = probe_interval(session.timeout());
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut probe: Option<(Instant, Probe)> = None;
    loop {
        let probing = probe.is_some();
        tokio::select! {
            () = shutdown.cancelled() => return SessionEnd::Shutdown,
            state = states.changed() => match on_state(session, state) {
                Ok(true) => {
                    info!(slot = session.slot(), session = format_args!("{:#x}", session.session_id()), "ZooKeeper session reconnected");
                    // Prove contact on the new connection right away.
                    probe = new_probe(session);
                }
                Ok(false) => {}
                Err(end) => return end,
            },
            outcome = async { match probe.as_mut() { Some((_, f)) => f.await, None => std::future::pending().await } }, if probing => {
                let sent_at = probe.take().map(|(at, _)| at);
                match outcome {
                    ProbeOutcome::Contact => {
                        if let Some(at) = sent_at {
                            session.touch(at);
                            session.record_probe(at.elapsed());
                        }
                    }
                    ProbeOutcome::NoContact => debug!(slot = session.slot(), "ZooKeeper probe failed"),
                    ProbeOutcome::Ended(end) => return end,
                }
            }
            () = tokio::time::sleep_until(session.contact_deadline()) => {
                if session.out_of_contact() {
                    warn!(
                        slot = session.slot(),
                        session = format_args!("{:#x}", session.session_id()),
                        since_contact = ?session.since_contact(),
                        limit = ?session.lost_after(),
                        "no answer from the ZooKeeper leader for 3/5 of the session timeout"
                    );
                    return SessionEnd::Unreachable;
                }
            }
            _ = tick.tick() => {
                if probe.is_none() {
                    probe = new_probe(session);
                }
                session.views().expire_idle();
            }
        }
    }
}

/// Sends a probe: `sync("/")`, which a follower must pass to the leader, then
/// `exists("/")` behind it.
fn new_probe(session: &ZkSession) -> Option<(Instant, Probe)> {
    let client = session.client().ok()?;
    let sent_at = Instant::now();
    let probe = async move {
        // Sent back-to-back on the first poll; `sent_at` was taken before,
        // which only makes the contact estimate more conservative.
        let sync = client.sync("/");
        let exists = client.check_stat("/");
        let (sync, exists) = futures_util::future::join(sync, exists).await;
        ProbeOutcome::of(&sync, &exists)
    };
    Some((sent_at, probe.boxed()))
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Dropping the backend without `shutdown` still stops the supervisors
        // and closes the sessions.
        self.shutdown.cancel();
    }
}

#[cfg(test)]
mod tests {
    use zookeeper_client::Error as ZkError;

    use super::*;

    #[test]
    fn only_an_answered_sync_is_contact() {
        let stat = Ok(None);
        assert_eq!(ProbeOutcome::of(&Ok(()), &stat), ProbeOutcome::Contact);
        // A follower cut off from the leader still answers `exists`.
        assert_eq!(
            ProbeOutcome::of(&Err(ZkError::ConnectionLoss), &stat),
            ProbeOutcome::NoContact
        );
        assert_eq!(
            ProbeOutcome::of(&Err(ZkError::Timeout), &Err(ZkError::Timeout)),
            ProbeOutcome::NoContact
        );
        assert!(matches!(
            ProbeOutcome::of(&Err(ZkError::SessionExpired), &Err(ZkError::SessionExpired)),
            ProbeOutcome::Ended(SessionEnd::Expired)
        ));
        assert!(matches!(
            ProbeOutcome::of(&Ok(()), &Err(ZkError::ClientClosed)),
            ProbeOutcome::Ended(SessionEnd::Closed)
        ));
    }
}
