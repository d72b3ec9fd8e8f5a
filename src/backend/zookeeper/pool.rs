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
//!   Once `2/3 × timeout` pass without contact, the session is retired: every
//!   grant on it is reported lost (`BackendUnreachable`), every wait on it
//!   fails with `Unavailable`, and the client is dropped so that, should the
//!   connection come back, its ephemeral nodes go with it. Curator treats
//!   SUSPENDED as lost for the same reason. A grant whose reply arrives after
//!   that point (but before the monitor's next tick) is refused too.
//! - A retired session is replaced by a supervisor task per slot, with
//!   back-off; meanwhile new work goes to the other, healthy sessions.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use clastor_protocol::LostReason;
use futures_util::FutureExt as _;
use futures_util::future::BoxFuture;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};
use zookeeper_client::{Client, SessionState};

use crate::backend::{BackendError, LostNotifier};
use crate::key::LockKey;

/// What the pool needs to open sessions.
#[derive(Debug, Clone)]
pub(crate) struct PoolConfig {
    pub hosts: String,
    pub sessions: usize,
    pub session_timeout: Duration,
    pub connect_timeout: Duration,
}

/// Health of one session, as the pool sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Health {
    /// Connected and heard from recently.
    Connected = 0,
    /// The client lost its connection and is reconnecting; requests queue.
    Disconnected = 1,
    /// Retired: lost, expired or closed. Never used again.
    Lost = 2,
}

impl Health {
    fn from_u8(v: u8) -> Health {
        match v {
            0 => Health::Connected,
            1 => Health::Disconnected,
            _ => Health::Lost,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Health::Connected => "connected",
            Health::Disconnected => "disconnected",
            Health::Lost => "lost",
        }
    }
}

/// A grant made through a session, kept so its holder can be told if the
/// session is lost.
#[derive(Debug)]
pub(crate) struct GrantRecord {
    pub key: LockKey,
    pub token: u64,
    pub notifier: LostNotifier,
}

/// One pooled ZooKeeper session.
#[derive(Debug)]
pub(crate) struct ZkSession {
    slot: usize,
    generation: u64,
    session_id: i64,
    timeout: Duration,
    /// Holders are told their locks are lost after this long without contact.
    lost_after: Duration,
    /// `None` once retired: the last clone going closes the session. Shared as
    /// an `Arc` so an operation costs a reference count, not a `Client` clone.
    client: Mutex<Option<Arc<Client>>>,
    health: AtomicU8,
    born: Instant,
    /// Milliseconds since `born` of the send time of the last answered request.
    last_contact_ms: AtomicU64,
    grants: Mutex<HashMap<String, GrantRecord>>,
    retired: CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these short critical sections leaves the
    // data consistent (plain inserts and removes), so poisoning is ignored.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ZkSession {
    fn new(slot: usize, generation: u64, client: Client) -> ZkSession {
        let timeout = client.session_timeout();
        let mut session = ZkSession::detached(slot, generation, client.session_id().0, timeout);
        session.client = Mutex::new(Some(Arc::new(client)));
        session
    }

    /// A session record without a client (the client is attached by `new`;
    /// tests use this directly for the timing logic).
    fn detached(slot: usize, generation: u64, session_id: i64, timeout: Duration) -> ZkSession {
        ZkSession {
            slot,
            generation,
            session_id,
            timeout,
            lost_after: timeout * 2 / 3,
            client: Mutex::new(None),
            health: AtomicU8::new(Health::Connected as u8),
            born: Instant::now(),
            last_contact_ms: AtomicU64::new(0),
            grants: Mutex::new(HashMap::new()),
            retired: CancellationToken::new(),
        }
    }

    /// ZooKeeper's id for this session.
    pub fn session_id(&self) -> i64 {
        self.session_id
    }

    /// The negotiated session timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A client handle for one operation.
    ///
    /// # Errors
    /// [`BackendError::Unavailable`] once the session is retired.
    pub fn client(&self) -> Result<Arc<Client>, BackendError> {
        lock(&self.client).clone().ok_or_else(|| self.gone())
    }

    /// The error for work caught on a retired session.
    pub fn gone(&self) -> BackendError {
        BackendError::Unavailable(format!("ZooKeeper session {:#x} was lost", self.session_id))
    }

    /// Resolves when the session is retired.
    pub fn retired(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.retired.cancelled()
    }

    /// Whether the session is retired.
    pub fn is_retired(&self) -> bool {
        self.retired.is_cancelled()
    }

    pub fn health(&self) -> Health {
        Health::from_u8(self.health.load(Ordering::Acquire))
    }

    fn set_health(&self, health: Health) {
        // Lost is terminal.
        let _ = self.health.fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
            (cur != Health::Lost as u8).then_some(health as u8)
        });
    }

    /// Records that a request sent at `sent_at` was answered.
    pub fn touch(&self, sent_at: Instant) {
        let ms = u64::try_from(sent_at.saturating_duration_since(self.born).as_millis()).unwrap_or(u64::MAX);
        self.last_contact_ms.fetch_max(ms, Ordering::AcqRel);
    }

    /// Time since the send time of the last answered request.
    pub fn since_contact(&self) -> Duration {
        let last = self.born + Duration::from_millis(self.last_contact_ms.load(Ordering::Acquire));
        Instant::now().saturating_duration_since(last)
    }

    /// Whether the session went `lost_after` without contact: its locks are
    /// (about to be) reported lost, so it must not hand out new ones.
    fn out_of_contact(&self) -> bool {
        self.since_contact() >= self.lost_after
    }

    /// Remembers a grant so its holder can be told if the session is lost.
    ///
    /// # Errors
    /// The record back if the session is retired, or has gone `lost_after`
    /// without contact and is about to be (the grant must not be handed out:
    /// its holder could not be told in time that it is lost).
    pub fn register(&self, path: String, record: GrantRecord) -> Result<(), GrantRecord> {
        let mut grants = lock(&self.grants);
        // Checked under the grants lock, which `retire` takes after cancelling,
        // so a grant is either registered before the drain or refused.
        if self.is_retired() || self.out_of_contact() {
            return Err(record);
        }
        grants.insert(path, record);
        Ok(())
    }

    /// Forgets a grant (release); `None` if the session already reported it lost.
    pub fn unregister(&self, path: &str) -> Option<GrantRecord> {
        lock(&self.grants).remove(path)
    }

    /// Number of grants held through this session.
    pub fn grant_count(&self) -> usize {
        lock(&self.grants).len()
    }

    /// Retires the session: refuses new work, fails waits, drops the client
    /// and reports every grant lost with `reason`. Idempotent.
    fn retire(&self, reason: LostReason) -> Option<StateWatcherHandle> {
        self.health.store(Health::Lost as u8, Ordering::Release);
        self.retired.cancel();
        let client = lock(&self.client).take();
        let drained: Vec<(String, GrantRecord)> = lock(&self.grants).drain().collect();
        if !drained.is_empty() {
            warn!(
                slot = self.slot,
                session = format_args!("{:#x}", self.session_id),
                grants = drained.len(),
                reason = reason.name(),
                "ZooKeeper session lost; reporting its locks lost"
            );
        }
        // Notify outside every lock: the engine drops the guards inside.
        for (path, record) in drained {
            debug!(%path, key = %record.key, token = record.token, reason = reason.name(), "lock lost");
            record.notifier.notify(reason);
        }
        client.map(|c| StateWatcherHandle(c.state_watcher()))
    }
}

/// The state watcher of a client being closed, to await the close.
struct StateWatcherHandle(zookeeper_client::StateWatcher);

impl StateWatcherHandle {
    /// Waits (bounded) until the dropped client's session reached a terminal
    /// state, so its ephemeral nodes are gone when this returns.
    async fn closed(mut self, within: Duration) {
        let wait = async {
            while !self.0.peek_state().is_terminated() {
                self.0.changed().await;
            }
        };
        let _ = tokio::time::timeout(within, wait).await;
    }
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
enum End {
    Shutdown,
    Unreachable,
    Expired,
    Closed,
}

impl End {
    fn reason(self) -> LostReason {
        match self {
            End::Shutdown => LostReason::Shutdown,
            End::Unreachable => LostReason::BackendUnreachable,
            End::Expired => LostReason::SessionExpired,
            End::Closed => LostReason::BackendError,
        }
    }
}

/// The pool.
#[derive(Debug)]
pub(crate) struct Pool {
    cfg: PoolConfig,
    slots: Vec<Slot>,
    next: AtomicUsize,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

/// Opens one session, bounded by the connect timeout.
async fn open(cfg: &PoolConfig) -> Result<Client, BackendError> {
    let connect = Client::connector()
        .with_session_timeout(cfg.session_timeout)
        .connect(&cfg.hosts);
    match tokio::time::timeout(cfg.connect_timeout, connect).await {
        Ok(Ok(client)) => Ok(client),
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
    pub async fn start(cfg: PoolConfig) -> Result<Arc<Pool>, BackendError> {
        let n = cfg.sessions.max(1);
        let opened = futures_util::future::join_all((0..n).map(|_| open(&cfg))).await;
        let clients = opened.into_iter().collect::<Result<Vec<_>, _>>()?;
        let pool = Arc::new(Pool {
            slots: (0..n).map(|_| Slot::default()).collect(),
            cfg,
            next: AtomicUsize::new(0),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        for (i, client) in clients.into_iter().enumerate() {
            let first = pool.install(i, client);
            let weak = Arc::downgrade(&pool);
            pool.tasks.spawn(supervise(weak, i, first));
        }
        pool.tasks.close();
        info!(hosts = %pool.cfg.hosts, sessions = n, timeout = ?pool.cfg.session_timeout, "ZooKeeper session pool ready");
        Ok(pool)
    }

    fn install(&self, slot: usize, client: Client) -> Arc<ZkSession> {
        let generation = self.slots[slot].generations.fetch_add(1, Ordering::AcqRel);
        let session = Arc::new(ZkSession::new(slot, generation, client));
        session.touch(Instant::now());
        info!(
            slot,
            generation,
            session = format_args!("{:#x}", session.session_id),
            timeout = ?session.timeout,
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
    pub fn pick(&self) -> Result<Arc<ZkSession>, BackendError> {
        self.pick_where(true)
    }

    /// As [`Pool::pick`], but only a connected session: for work that must
    /// not queue behind a reconnect (a try-once acquire answers at once).
    ///
    /// # Errors
    /// [`BackendError::Closed`] after shutdown; [`BackendError::Unavailable`]
    /// if no session is connected.
    pub fn pick_connected(&self) -> Result<Arc<ZkSession>, BackendError> {
        self.pick_where(false)
    }

    /// The requested session timeout (the negotiated one may be clamped).
    pub fn session_timeout(&self) -> Duration {
        self.cfg.session_timeout
    }

    fn pick_where(&self, reconnecting_ok: bool) -> Result<Arc<ZkSession>, BackendError> {
        if self.shutdown.is_cancelled() {
            return Err(BackendError::Closed);
        }
        let n = self.slots.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut fallback = None;
        for k in 0..n {
            let Some(session) = self.slots[(start + k) % n].get() else {
                continue;
            };
            match session.health() {
                Health::Connected => return Ok(session),
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
    pub fn is_shut_down(&self) -> bool {
        self.shutdown.is_cancelled()
    }

    /// `INFO` pairs: one per session, plus totals.
    pub fn info(&self) -> Vec<(String, String)> {
        let mut out = vec![
            ("zk.hosts".to_owned(), self.cfg.hosts.clone()),
            ("zk.sessions".to_owned(), self.slots.len().to_string()),
            (
                "zk.session_timeout_ms".to_owned(),
                self.cfg.session_timeout.as_millis().to_string(),
            ),
        ];
        let mut healthy = 0;
        for (i, slot) in self.slots.iter().enumerate() {
            let value = match slot.get() {
                Some(s) => {
                    if s.health() == Health::Connected {
                        healthy += 1;
                    }
                    format!(
                        "id={:#x} state={} grants={} last_contact_ms={} generation={}",
                        s.session_id,
                        s.health().name(),
                        s.grant_count(),
                        s.since_contact().as_millis(),
                        s.generation
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
    pub async fn shutdown(&self) {
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
    let mut backoff = Duration::from_millis(100);
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
                Ok(client) => {
                    let Some(p) = pool.upgrade() else { return };
                    session = Some(p.install(slot, client));
                    backoff = Duration::from_millis(100);
                }
                Err(e) => {
                    warn!(slot, error = %e, retry_in = ?backoff, "cannot replace ZooKeeper session");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = shutdown.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
            continue;
        };
        let Some(shutdown) = pool.upgrade().map(|p| p.shutdown.clone()) else {
            current.retire(LostReason::Shutdown);
            return;
        };
        let end = monitor(&current, &shutdown).await;
        if let Some(p) = pool.upgrade() {
            p.slots[slot].set(None);
        }
        let reason = end.reason();
        info!(
            slot,
            session = format_args!("{:#x}", current.session_id),
            reason = reason.name(),
            since_contact = ?current.since_contact(),
            "retiring ZooKeeper session"
        );
        let closing = current.retire(reason);
        if let End::Shutdown = end {
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
    End(End),
}

type ZkResult<T> = Result<T, zookeeper_client::Error>;

impl ProbeOutcome {
    fn of(sync: &ZkResult<()>, exists: &ZkResult<Option<zookeeper_client::Stat>>) -> ProbeOutcome {
        use zookeeper_client::Error::{ClientClosed, SessionExpired};
        match (sync, exists) {
            (Err(SessionExpired), _) | (_, Err(SessionExpired)) => ProbeOutcome::End(End::Expired),
            (Err(ClientClosed), _) | (_, Err(ClientClosed)) => ProbeOutcome::End(End::Closed),
            (Ok(()), _) => ProbeOutcome::Contact,
            (Err(_), _) => ProbeOutcome::NoContact,
        }
    }
}

/// What a session-state change means for the pool.
fn on_state(session: &ZkSession, state: SessionState) -> Result<bool, End> {
    match state {
        SessionState::SyncConnected | SessionState::ConnectedReadOnly => {
            session.set_health(Health::Connected);
            Ok(true)
        }
        SessionState::Disconnected => {
            warn!(
                slot = session.slot,
                session = format_args!("{:#x}", session.session_id),
                "ZooKeeper session disconnected"
            );
            session.set_health(Health::Disconnected);
            Ok(false)
        }
        SessionState::Expired => Err(End::Expired),
        SessionState::Closed | SessionState::AuthFailed => Err(End::Closed),
    }
}

/// Watches one session until it must be retired.
async fn monitor(session: &ZkSession, shutdown: &CancellationToken) -> End {
    let Ok(client) = session.client() else {
        return End::Closed;
    };
    let mut states = client.state_watcher();
    drop(client);
    // `state_watcher` marks the current state as seen: apply it, or a
    // disconnect between connecting and here would go unnoticed.
    if let Err(end) = on_state(session, states.peek_state()) {
        return end;
    }
    let every = (session.timeout / 10).max(Duration::from_millis(20));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut probe: Option<(Instant, Probe)> = None;
    loop {
        let probing = probe.is_some();
        tokio::select! {
            () = shutdown.cancelled() => return End::Shutdown,
            state = states.changed() => match on_state(session, state) {
                Ok(true) => {
                    info!(slot = session.slot, session = format_args!("{:#x}", session.session_id), "ZooKeeper session reconnected");
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
                        }
                    }
                    ProbeOutcome::NoContact => debug!(slot = session.slot, "ZooKeeper probe failed"),
                    ProbeOutcome::End(end) => return end,
                }
            }
            _ = tick.tick() => {
                if session.out_of_contact() {
                    warn!(
                        slot = session.slot,
                        session = format_args!("{:#x}", session.session_id),
                        since_contact = ?session.since_contact(),
                        limit = ?session.lost_after,
                        "no answer from the ZooKeeper leader for 2/3 of the session timeout"
                    );
                    return End::Unreachable;
                }
                if probe.is_none() {
                    probe = new_probe(session);
                }
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

    fn record() -> GrantRecord {
        GrantRecord {
            key: LockKey::new("tx", "a").unwrap_or_else(|e| panic!("{e}")),
            token: 1,
            notifier: LostNotifier::noop(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn no_grant_is_registered_once_contact_is_overdue() {
        let session = ZkSession::detached(0, 0, 1, Duration::from_secs(3));
        session.touch(Instant::now());
        assert!(session.register("/a/1".into(), record()).is_ok());
        // Just before 2/3 of the timeout: still fine.
        tokio::time::advance(Duration::from_millis(1_990)).await;
        assert!(session.register("/a/2".into(), record()).is_ok());
        // At 2/3 the monitor may not have ticked yet, but the grant is refused.
        tokio::time::advance(Duration::from_millis(10)).await;
        assert!(!session.is_retired());
        assert!(session.register("/a/3".into(), record()).is_err());
        assert_eq!(session.grant_count(), 2);
        // A probe sent now and answered restores it.
        session.touch(Instant::now());
        assert!(session.register("/a/3".into(), record()).is_ok());
    }

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
            ProbeOutcome::End(End::Expired)
        ));
        assert!(matches!(
            ProbeOutcome::of(&Ok(()), &Err(ZkError::ClientClosed)),
            ProbeOutcome::End(End::Closed)
        ));
    }
}
