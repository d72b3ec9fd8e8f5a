//! One pooled ZooKeeper session: its client, its health, when it was last
//! heard by the leader, the grants made through it, and the one retry policy
//! every request on it follows.
//!
//! **Retry policy.** A request whose connection broke (outcome unknown, see
//! [`connection_broke`]) is sent again on the same session, at most
//! [`MAX_ATTEMPTS`] times in all: `zookeeper_client` queues requests made
//! while it reconnects, so re-sending needs no back-off of its own. Every
//! wait also ends when the session is retired — which the pool does after
//! 3/5 of the session timeout without contact — so no request on a session
//! outlives it. Requests whose outcome matters when unknown (a lock node's
//! `create`) are not blindly re-sent: the recipe recovers them by uuid.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use clastor_protocol::LostReason;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use zookeeper_client::Client;

use super::error::{ZkResult, connection_broke};
use super::views::Views;
use super::watches::spawn_background;
use crate::backend::{BackendError, LostNotifier, SessionHealth};
use crate::key::LockKey;

/// How many times one request is sent before its connection-loss error is
/// returned (see the module docs).
pub(super) const MAX_ATTEMPTS: usize = 8;

/// Health of one session, as the pool sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum Health {
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

    pub(super) fn name(self) -> &'static str {
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
pub(super) struct GrantRecord {
    pub(super) key: LockKey,
    pub(super) token: u64,
    pub(super) notifier: LostNotifier,
}

/// One pooled ZooKeeper session.
#[derive(Debug)]
pub(super) struct ZkSession {
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
    /// Requests answered through `retry`, and their total time in µs.
    requests: AtomicU64,
    request_us: AtomicU64,
    /// Round trip of the last answered liveness probe, in µs (`u64::MAX`: none yet).
    probe_us: AtomicU64,
    grants: Mutex<HashMap<String, GrantRecord>>,
    /// Live views of hot lock directories (`views.rs`).
    views: Arc<Views>,
    retired: CancellationToken,
}

/// How long after the last proven contact a session's holders are told
/// their locks are lost: 3/5 of the session timeout. The leader expires a
/// session no earlier than the timeout after *its* last touch of it, which
/// may lag our last answered `sync` by
/// - tickTime/2: a follower reports its sessions' touches to the leader only
///   with its pings, every tickTime/2 — at most timeout/4, since ZooKeeper's
///   smallest session timeout is 2×tickTime, whatever the ensemble's tickTime;
/// - one probe interval (timeout/10): an answered `sync` proves that the
///   follower reached the leader, not that its report of our touch did, so
///   the touch the leader surely has may be the previous probe's;
/// - timeout/20 for timer slack and the two clocks' rates.
///
/// 1 − 1/4 − 1/10 − 1/20 = 3/5.
pub(super) fn lost_after(timeout: Duration) -> Duration {
    timeout * 3 / 5
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these short critical sections leaves the
    // data consistent (plain inserts and removes), so poisoning is ignored.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ZkSession {
    pub(super) fn new(slot: usize, generation: u64, client: Client, views: Views) -> ZkSession {
        let timeout = client.session_timeout();
        let mut session = ZkSession::detached(slot, generation, client.session_id().0, timeout);
        session.client = Mutex::new(Some(Arc::new(client)));
        session.views = Arc::new(views);
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
            lost_after: lost_after(timeout),
            client: Mutex::new(None),
            health: AtomicU8::new(Health::Connected as u8),
            born: Instant::now(),
            last_contact_ms: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            request_us: AtomicU64::new(0),
            probe_us: AtomicU64::new(u64::MAX),
            grants: Mutex::new(HashMap::new()),
            views: Arc::new(Views::new(0, Duration::ZERO)),
            retired: CancellationToken::new(),
        }
    }

    /// The pool slot this session serves.
    pub(super) fn slot(&self) -> usize {
        self.slot
    }

    /// How many sessions this slot had before this one.
    pub(super) fn generation(&self) -> u64 {
        self.generation
    }

    /// ZooKeeper's id for this session.
    pub(super) fn session_id(&self) -> i64 {
        self.session_id
    }

    /// The negotiated session timeout.
    pub(super) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// How long without contact before holders are told their locks are lost.
    pub(super) fn lost_after(&self) -> Duration {
        self.lost_after
    }

    /// A client handle for one operation.
    ///
    /// # Errors
    /// [`BackendError::Unavailable`] once the session is retired.
    pub(super) fn client(&self) -> Result<Arc<Client>, BackendError> {
        lock(&self.client).clone().ok_or_else(|| self.gone())
    }

    /// The error for work caught on a retired session.
    pub(super) fn gone(&self) -> BackendError {
        BackendError::Unavailable(format!("ZooKeeper session {:#x} was lost", self.session_id))
    }

    /// Resolves when the session is retired.
    pub(super) fn retired(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.retired.cancelled()
    }

    /// Whether the session is retired.
    pub(super) fn is_retired(&self) -> bool {
        self.retired.is_cancelled()
    }

    /// Awaits `f` unless the session is retired first (lost, expired, shut
    /// down), which fails with [`ZkSession::gone`].
    pub(super) async fn until_retired<T>(&self, f: impl Future<Output = T>) -> Result<T, BackendError> {
        tokio::select! {
            biased;
            r = f => Ok(r),
            () = self.retired() => Err(self.gone()),
        }
    }

    /// Sends the request `send` makes, again after connection loss, per the
    /// retry policy in the module docs. The inner result is ZooKeeper's last
    /// answer: a success, a refusal (`NoNode`…), or a connection-loss error
    /// after [`MAX_ATTEMPTS`] sends.
    ///
    /// # Errors
    /// [`ZkSession::gone`] if the session is (or becomes) retired.
    pub(super) async fn retry<T, F>(&self, mut send: impl FnMut(Arc<Client>) -> F) -> Result<ZkResult<T>, BackendError>
    where
        F: Future<Output = ZkResult<T>>,
    {
        let mut attempt = 1;
        let started = Instant::now();
        loop {
            let reply = self.until_retired(send(self.client()?)).await?;
            match reply {
                Err(e) if connection_broke(&e) && attempt < MAX_ATTEMPTS => {
                    debug!(session = format_args!("{:#x}", self.session_id), attempt, error = %e, "ZooKeeper connection broke; sending again");
                    attempt += 1;
                }
                reply => {
                    let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                    self.requests.fetch_add(1, Ordering::Relaxed);
                    self.request_us.fetch_add(us, Ordering::Relaxed);
                    return Ok(reply);
                }
            }
        }
    }

    pub(super) fn health(&self) -> Health {
        Health::from_u8(self.health.load(Ordering::Acquire))
    }

    pub(super) fn set_health(&self, health: Health) {
        // Lost is terminal.
        let _ = self.health.fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
            (cur != Health::Lost as u8).then_some(health as u8)
        });
    }

    /// Records that a request sent at `sent_at` was answered.
    pub(super) fn touch(&self, sent_at: Instant) {
        let ms = u64::try_from(sent_at.saturating_duration_since(self.born).as_millis()).unwrap_or(u64::MAX);
        self.last_contact_ms.fetch_max(ms, Ordering::AcqRel);
    }

    /// Time since the send time of the last answered request.
    pub(super) fn since_contact(&self) -> Duration {
        let last = self.born + Duration::from_millis(self.last_contact_ms.load(Ordering::Acquire));
        Instant::now().saturating_duration_since(last)
    }

    /// When holders must be told their locks are lost unless contact is
    /// proven again first.
    pub(super) fn contact_deadline(&self) -> Instant {
        self.born + Duration::from_millis(self.last_contact_ms.load(Ordering::Acquire)) + self.lost_after
    }

    /// Whether the session went `lost_after` without contact: its locks are
    /// (about to be) reported lost, so it must not hand out new ones.
    pub(super) fn out_of_contact(&self) -> bool {
        self.since_contact() >= self.lost_after
    }

    /// Records the round trip of an answered liveness probe.
    pub(super) fn record_probe(&self, rtt: Duration) {
        let us = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX - 1);
        self.probe_us.store(us, Ordering::Relaxed);
    }

    /// This session's health, for readiness and metrics.
    pub(super) fn report(&self) -> SessionHealth {
        let state = self.health();
        SessionHealth {
            slot: self.slot,
            id: format!("{:#x}", self.session_id),
            state: state.name(),
            trusted: state == Health::Connected && !self.out_of_contact(),
            grants: self.grant_count(),
            last_contact: Some(self.since_contact()),
            last_probe: Some(self.probe_us.load(Ordering::Relaxed))
                .filter(|&us| us != u64::MAX)
                .map(Duration::from_micros),
            requests: self.requests.load(Ordering::Relaxed),
            request_time: Duration::from_micros(self.request_us.load(Ordering::Relaxed)),
        }
    }

    /// Remembers a grant so its holder can be told if the session is lost.
    ///
    /// # Errors
    /// The record back if the session is retired, or has gone `lost_after`
    /// without contact and is about to be (the grant must not be handed out:
    /// its holder could not be told in time that it is lost).
    pub(super) fn register(&self, path: String, record: GrantRecord) -> Result<(), GrantRecord> {
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
    pub(super) fn unregister(&self, path: &str) -> Option<GrantRecord> {
        lock(&self.grants).remove(path)
    }

    /// This session's views of hot lock directories.
    pub(super) fn views(&self) -> &Arc<Views> {
        &self.views
    }

    /// Number of grants held through this session.
    pub(super) fn grant_count(&self) -> usize {
        lock(&self.grants).len()
    }

    /// Retires the session: refuses new work, fails waits, reports every
    /// grant lost with `reason` and lets go of the client. Idempotent.
    ///
    /// A session retired as unreachable may still be connected (a slow
    /// leader, a one-way partition): closing it now would delete its lock
    /// nodes at once and take away the head start its holders were promised.
    /// So its client is kept open until the session timeout has passed since
    /// the last contact — when ZooKeeper may expire it anyway — and only then
    /// dropped. Otherwise the client is dropped at once, and the returned
    /// handle waits for the close.
    pub(super) fn retire(&self, reason: LostReason) -> Option<ClosingSession> {
        self.health.store(Health::Lost as u8, Ordering::Release);
        self.retired.cancel();
        self.views.clear();
        let mut client = lock(&self.client).take();
        if reason == LostReason::BackendUnreachable
            && let Some(kept) = client.take()
        {
            let until = self.timeout.saturating_sub(self.since_contact());
            debug!(session = format_args!("{:#x}", self.session_id), keep_open = ?until, "keeping the unreachable session open until it would expire");
            spawn_background(async move {
                tokio::time::sleep(until).await;
                drop(kept);
            });
        }
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
        client.map(|c| ClosingSession(c.state_watcher()))
    }
}

/// The state watcher of a client being closed, to await the close.
pub(super) struct ClosingSession(zookeeper_client::StateWatcher);

impl ClosingSession {
    /// Waits (bounded) until the dropped client's session reached a terminal
    /// state, so its ephemeral nodes are gone when this returns.
    pub(super) async fn closed(mut self, within: Duration) {
        let wait = async {
            while !self.0.peek_state().is_terminated() {
                self.0.changed().await;
            }
        };
        let _ = tokio::time::timeout(within, wait).await;
    }
}

#[cfg(test)]
mod tests {
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
        // Just before 3/5 of the timeout: still fine.
        tokio::time::advance(Duration::from_millis(1_790)).await;
        assert!(session.register("/a/2".into(), record()).is_ok());
        // At 3/5 the monitor may not have run yet, but the grant is refused.
        tokio::time::advance(Duration::from_millis(10)).await;
        assert!(!session.is_retired());
        assert!(session.register("/a/3".into(), record()).is_err());
        assert_eq!(session.grant_count(), 2);
        // A probe sent now and answered restores it.
        session.touch(Instant::now());
        assert!(session.register("/a/3".into(), record()).is_ok());
    }

    #[tokio::test]
    async fn a_retired_session_refuses_work_and_reports_its_grants() {
        let session = ZkSession::detached(0, 0, 1, Duration::from_secs(3));
        let (tx, rx) = std::sync::mpsc::channel();
        let notifier = LostNotifier::new(move |reason| {
            let _ = tx.send(reason);
        });
        let key = LockKey::new("tx", "a").unwrap_or_else(|e| panic!("{e}"));
        assert!(
            session
                .register(
                    "/a/1".into(),
                    GrantRecord {
                        key,
                        token: 7,
                        notifier
                    }
                )
                .is_ok()
        );
        assert!(session.retire(LostReason::SessionExpired).is_none());
        assert_eq!(rx.try_recv().ok(), Some(LostReason::SessionExpired));
        assert_eq!(session.health(), Health::Lost);
        session.set_health(Health::Connected);
        assert_eq!(session.health(), Health::Lost, "lost is terminal");
        assert!(session.register("/a/2".into(), record()).is_err());
        assert!(matches!(
            session.until_retired(std::future::pending::<()>()).await,
            Err(BackendError::Unavailable(_))
        ));
        let sends = std::sync::atomic::AtomicUsize::new(0);
        let r = session
            .retry(|_| {
                sends.fetch_add(1, Ordering::Relaxed);
                async { Ok(()) }
            })
            .await;
        assert!(r.is_err(), "no client once retired");
        assert_eq!(sends.load(Ordering::Relaxed), 0);
    }
}
