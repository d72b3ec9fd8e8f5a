//! The pooled etcd leases: each kept alive by its own keepalive stream, its
//! last proven contact, the grants made with it, and their loss.
//!
//! **Safe-until.** A keepalive answered at all was applied by the leader
//! (a follower forwards it), which renews the lease to the full TTL from
//! *its* present — after our send. So a lease whose keepalive was sent at
//! `s` and answered cannot expire before `s + TTL` on the leader's clock.
//! A new leader promotes every lease by the full TTL plus an election
//! timeout from its election, and a leader cut off from its quorum steps
//! down within an election timeout, so an answer from a leader about to be
//! deposed is covered too. Holders are told their locks are lost at
//! `s + lost_after`, `lost_after` = 3/5 of the TTL, keeping the margins of
//! the ZooKeeper backend (`zookeeper/session.rs`): a quarter for an
//! election in flight, a tenth for the holder's own confirmation to come
//! back, a twentieth for timer slack and the two clocks' rates. Nobody is
//! promised more than that (`safe_until`).
//!
//! **Loss.** A lease whose keepalives go unanswered until `lost_after`, or
//! that etcd says is gone (revoked from outside, expired), is retired: every
//! grant made with it is reported lost (at that instant, not at the next
//! tick), the slot gets a new lease, and the old one is revoked as soon as
//! etcd answers, which deletes whatever keys it still carries.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use clastor_protocol::LostReason;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::EtcdClient;
use super::error;
use crate::backend::{BackendError, LostNotifier, SessionHealth};
use crate::backoff::Backoff;
use crate::key::LockKey;

/// Holders are told at this part of the TTL after the last answered
/// keepalive (module docs).
pub(super) fn lost_after(ttl: Duration) -> Duration {
    ttl * 3 / 5
}

/// How often a lease's keepalive goes out: a tenth of its TTL (at least
/// 20 ms), so several go unanswered before anyone is told.
pub(super) fn keepalive_interval(ttl: Duration) -> Duration {
    (ttl / 10).max(Duration::from_millis(20))
}

/// How long an acquire waits, at least, for a lease when none is in contact.
const LEASE_PATIENCE: Duration = Duration::from_secs(1);

/// Keepalives sent and not yet answered, at most (a stalled stream is
/// judged by the deadline, not by piling up requests).
const MAX_PENDING: usize = 16;

/// A grant made with a lease, kept so its holder can be told if the lease
/// is lost.
#[derive(Debug)]
struct GrantRecord {
    key: LockKey,
    token: u64,
    notifier: LostNotifier,
}

/// One pooled lease.
#[derive(Debug)]
pub(super) struct Lease {
    slot: usize,
    id: i64,
    ttl: Duration,
    lost_after: Duration,
    born: Instant,
    /// Send time (µs since `born`) of the last answered keepalive.
    contact_us: AtomicU64,
    /// Round trip of the last answered keepalive, µs.
    last_probe_us: AtomicU64,
    keepalives: AtomicU64,
    retired: CancellationToken,
    grants: Mutex<Grants>,
}

#[derive(Debug, Default)]
struct Grants {
    next: u64,
    table: HashMap<u64, GrantRecord>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The critical sections here cannot panic half-way; a poisoned table is
    // still consistent.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Lease {
    fn new(slot: usize, id: i64, ttl: Duration, sent: Instant) -> Lease {
        Lease {
            slot,
            id,
            ttl,
            lost_after: lost_after(ttl),
            born: sent,
            contact_us: AtomicU64::new(0),
            last_probe_us: AtomicU64::new(0),
            keepalives: AtomicU64::new(0),
            retired: CancellationToken::new(),
            grants: Mutex::default(),
        }
    }

    /// The lease's id in etcd.
    pub(super) fn id(&self) -> i64 {
        self.id
    }

    /// A keepalive sent at `sent` was answered now.
    fn contact(&self, sent: Instant) {
        let at = micros(sent.saturating_duration_since(self.born));
        self.contact_us.fetch_max(at, Ordering::AcqRel);
        self.last_probe_us.store(micros(sent.elapsed()), Ordering::Release);
        self.keepalives.fetch_add(1, Ordering::Relaxed);
    }

    /// When holders of grants made with it must be told they are lost,
    /// unless contact is proven again first.
    pub(super) fn contact_deadline(&self) -> Instant {
        self.born + Duration::from_micros(self.contact_us.load(Ordering::Acquire)) + self.lost_after
    }

    /// Until when nobody else can be granted a lock held with this lease.
    pub(super) fn safe_until(&self) -> Instant {
        if self.is_retired() {
            Instant::now()
        } else {
            self.contact_deadline()
        }
    }

    /// Whether new grants may be made with it.
    pub(super) fn trusted(&self) -> bool {
        !self.is_retired() && Instant::now() < self.contact_deadline()
    }

    pub(super) fn is_retired(&self) -> bool {
        self.retired.is_cancelled()
    }

    /// Resolves when the lease is retired.
    pub(super) async fn until_retired(&self) {
        self.retired.cancelled().await;
    }

    /// Registers a grant, so its holder is told if the lease is lost.
    /// `Err` gives the notifier back when the lease is already retired.
    pub(super) fn register(&self, key: &LockKey, token: u64, notifier: LostNotifier) -> Result<u64, LostNotifier> {
        let mut grants = lock(&self.grants);
        // Checked under the table's lock: `retire` takes the table after
        // marking the lease retired, so no grant slips in after it.
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
            },
        );
        Ok(id)
    }

    /// Forgets a grant (released); its notifier is dropped unfired.
    pub(super) fn forget(&self, grant: u64) {
        let record = lock(&self.grants).table.remove(&grant);
        drop(record);
    }

    /// Reports one grant lost (its key was deleted from outside), if it is
    /// still registered.
    pub(super) fn lose(&self, grant: u64, reason: LostReason) {
        let record = lock(&self.grants).table.remove(&grant);
        if let Some(r) = record {
            warn!(key = %r.key, token = r.token, lease = format_args!("{:x}", self.id), reason = reason.name(), "lock lost");
            r.notifier.notify(reason);
        }
    }

    /// Retires the lease and reports every grant made with it lost (also
    /// when etcd answered a request with "lease not found": it was revoked
    /// or expired, and the keepalive has not heard yet). Idempotent.
    pub(super) fn retire(&self, reason: LostReason) {
        self.retired.cancel();
        let lost: Vec<GrantRecord> = lock(&self.grants).table.drain().map(|(_, r)| r).collect();
        if !lost.is_empty() {
            warn!(
                slot = self.slot,
                lease = format_args!("{:x}", self.id),
                reason = reason.name(),
                grants = lost.len(),
                "etcd lease retired: its locks are lost"
            );
        }
        for r in lost {
            r.notifier.notify(reason);
        }
    }

    fn health(&self) -> SessionHealth {
        let retired = self.is_retired();
        let since = Instant::now()
            .saturating_duration_since(self.born + Duration::from_micros(self.contact_us.load(Ordering::Acquire)));
        SessionHealth {
            slot: self.slot,
            id: format!("{:#x}", self.id),
            state: if retired {
                "lost"
            } else if since < keepalive_interval(self.ttl) * 3 {
                "connected"
            } else {
                "disconnected"
            },
            trusted: self.trusted(),
            grants: lock(&self.grants).table.len(),
            last_contact: Some(since),
            last_probe: Some(Duration::from_micros(self.last_probe_us.load(Ordering::Acquire))),
            requests: self.keepalives.load(Ordering::Relaxed),
            request_time: Duration::ZERO,
        }
    }
}

/// The leases, each slot kept filled by its supervisor task.
#[derive(Debug)]
pub(super) struct LeasePool {
    client: EtcdClient,
    ttl: Duration,
    slots: Vec<Mutex<Option<Arc<Lease>>>>,
    /// Bumped whenever a slot gets a new lease.
    filled: tokio::sync::watch::Sender<u64>,
    next: AtomicUsize,
    closed: CancellationToken,
    tasks: TaskTracker,
}

impl LeasePool {
    /// Starts one supervisor per slot; leases come as etcd grants them.
    pub(super) fn start(client: EtcdClient, slots: usize, ttl: Duration) -> Arc<LeasePool> {
        let pool = Arc::new(LeasePool {
            client,
            ttl,
            slots: (0..slots).map(|_| Mutex::new(None)).collect(),
            filled: tokio::sync::watch::Sender::new(0),
            next: AtomicUsize::new(0),
            closed: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        for slot in 0..slots {
            let p = pool.clone();
            pool.tasks.spawn(async move { p.supervise(slot).await });
        }
        pool
    }

    /// Waits until every slot holds a lease.
    ///
    /// # Errors
    /// A message if that took longer than `timeout`.
    pub(super) async fn wait_all(&self, timeout: Duration) -> Result<(), String> {
        let mut filled = self.filled.subscribe();
        let full = async {
            loop {
                if self.slots.iter().all(|s| lock(s).as_ref().is_some_and(|l| l.trusted())) {
                    return;
                }
                if filled.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::time::timeout(timeout, full)
            .await
            .map_err(|_| format!("no lease granted within {timeout:?}"))
    }

    /// A lease new grants may be made with: the slots in turn, skipping
    /// those without contact; when none is, waits for one until `until`
    /// (at least [`LEASE_PATIENCE`]: a slot gets a new lease in one round
    /// trip once etcd answers).
    ///
    /// # Errors
    /// [`BackendError::Closed`] after shutdown, [`BackendError::Unavailable`]
    /// when no lease came in contact in time.
    pub(super) async fn pick(&self, until: Instant) -> Result<Arc<Lease>, BackendError> {
        let until = until.max(Instant::now() + LEASE_PATIENCE);
        let mut filled = self.filled.subscribe();
        loop {
            if self.closed.is_cancelled() {
                return Err(BackendError::Closed);
            }
            let start = self.next.fetch_add(1, Ordering::Relaxed);
            let n = self.slots.len();
            if let Some(lease) = (0..n).find_map(|i| lock(&self.slots[(start + i) % n]).clone().filter(|l| l.trusted()))
            {
                return Ok(lease);
            }
            tokio::select! {
                r = filled.changed() => if r.is_err() { return Err(BackendError::Closed) },
                () = tokio::time::sleep_until(until) => {
                    return Err(BackendError::Unavailable(
                        "no etcd lease is in contact with the cluster (etcd unreachable?)".into(),
                    ));
                }
            }
        }
    }

    /// The pool's lease TTL as configured.
    pub(super) fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Whether a grant can be made now, and every lease's state.
    pub(super) fn health(&self) -> (bool, Vec<SessionHealth>) {
        let sessions: Vec<SessionHealth> = self
            .slots
            .iter()
            .enumerate()
            .map(|(slot, s)| {
                lock(s).as_ref().map_or_else(
                    || SessionHealth {
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
                    |l| l.health(),
                )
            })
            .collect();
        (sessions.iter().any(|s| s.trusted), sessions)
    }

    /// Tells the supervisors to stop (without waiting for them): every
    /// lease is retired and revoked in the background.
    pub(super) fn close(&self) {
        self.closed.cancel();
    }

    /// Stops the supervisors: every lease is retired (its grants reported
    /// lost to whoever still holds them) and revoked, within a few seconds.
    pub(super) async fn shutdown(&self) {
        self.closed.cancel();
        self.tasks.close();
        if tokio::time::timeout(error::REQUEST_TIMEOUT * 2, self.tasks.wait())
            .await
            .is_err()
        {
            warn!("etcd leases not revoked in time; they expire with their TTL");
        }
    }

    /// Keeps `slot` filled until the pool closes.
    async fn supervise(&self, slot: usize) {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
        while !self.closed.is_cancelled() {
            let sent = Instant::now();
            let granted = tokio::select! {
                () = self.closed.cancelled() => return,
                r = error::once("grant a lease", async {
                    let mut leases = self.client.lease_client();
                    leases.grant(secs(self.ttl), None).await
                }) => r,
            };
            let lease = match granted {
                Ok(resp) => {
                    let ttl = Duration::from_secs(resp.ttl().max(1).unsigned_abs());
                    if ttl != self.ttl {
                        info!(slot, asked = ?self.ttl, granted = ?ttl, "etcd granted another lease TTL than asked");
                    }
                    backoff.reset();
                    Arc::new(Lease::new(slot, resp.id(), ttl, sent))
                }
                Err(e) => {
                    warn!(slot, error = %e, "cannot grant an etcd lease; retrying");
                    if !backoff.wait(&self.closed).await {
                        return;
                    }
                    continue;
                }
            };
            info!(slot, lease = format_args!("{:x}", lease.id), ttl = ?lease.ttl, "etcd lease granted");
            *lock(&self.slots[slot]) = Some(lease.clone());
            self.filled.send_modify(|n| *n += 1);
            let reason = self.keep_alive(&lease).await;
            *lock(&self.slots[slot]) = None;
            lease.retire(reason);
            // Revoke it in the background (the slot needs a new lease now):
            // its keys go at once rather than at its expiry. On shutdown
            // this is the release of whatever is left.
            let client = self.client.clone();
            self.tasks.spawn(async move {
                let id = lease.id;
                let revoked = error::retry("revoke a lease", || {
                    let mut leases = client.lease_client();
                    async move { leases.revoke(id).await }
                });
                match tokio::time::timeout(lease.ttl, revoked).await {
                    Ok(Ok(_)) => info!(slot, lease = format_args!("{id:x}"), "etcd lease revoked"),
                    Ok(Err(e)) if e.to_string().contains("not found") => {}
                    Ok(Err(e)) => {
                        warn!(slot, lease = format_args!("{id:x}"), error = %e, "cannot revoke an etcd lease; it expires with its TTL");
                    }
                    Err(_) => warn!(slot, lease = format_args!("{id:x}"), "cannot revoke an etcd lease in time; it expires with its TTL"),
                }
            });
        }
    }

    /// Keeps `lease` alive until it must be retired; returns why.
    async fn keep_alive(&self, lease: &Lease) -> LostReason {
        let every = keepalive_interval(lease.ttl);
        let mut pause = Backoff::new(Duration::from_millis(20), every);
        'stream: loop {
            let sent = Instant::now();
            let opened = tokio::select! {
                biased;
                () = self.closed.cancelled() => return LostReason::ServerShutdown,
                () = lease.until_retired() => return LostReason::SessionExpired,
                () = tokio::time::sleep_until(lease.contact_deadline()) => return LostReason::BackendUnreachable,
                r = async { self.client.lease_client().keep_alive(lease.id).await } => r,
            };
            let (mut keeper, mut stream) = match opened {
                Ok(pair) => pair,
                Err(e) if e.to_string().contains("lease not found") => return LostReason::SessionExpired,
                Err(e) => {
                    tracing::debug!(lease = format_args!("{:x}", lease.id), error = %e, "etcd keepalive stream failed; reopening");
                    tokio::select! {
                        () = self.closed.cancelled() => return LostReason::ServerShutdown,
                        () = tokio::time::sleep_until(lease.contact_deadline()) => return LostReason::BackendUnreachable,
                        () = pause.sleep() => {}
                    }
                    continue 'stream;
                }
            };
            pause.reset();
            lease.contact(sent);
            let mut pending: VecDeque<Instant> = VecDeque::new();
            let mut tick = tokio::time::interval_at(Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    biased;
                    () = self.closed.cancelled() => return LostReason::ServerShutdown,
                    () = lease.until_retired() => return LostReason::SessionExpired,
                    () = tokio::time::sleep_until(lease.contact_deadline()) => {
                        // The deadline moves with every answer: lost only if
                        // it has really passed.
                        if Instant::now() >= lease.contact_deadline() {
                            return LostReason::BackendUnreachable;
                        }
                    }
                    msg = stream.message() => match msg {
                        Ok(Some(resp)) => {
                            let sent = pending.pop_front();
                            if resp.ttl() <= 0 {
                                return LostReason::SessionExpired;
                            }
                            if let Some(sent) = sent {
                                lease.contact(sent);
                            }
                        }
                        Ok(None) | Err(_) => continue 'stream,
                    },
                    _ = tick.tick() => {
                        if pending.len() < MAX_PENDING {
                            pending.push_back(Instant::now());
                            if keeper.keep_alive().await.is_err() {
                                continue 'stream;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A TTL in etcd's unit (whole seconds, rounded down, at least 1).
fn secs(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn margins() {
        assert_eq!(lost_after(Duration::from_secs(10)), Duration::from_secs(6));
        assert_eq!(keepalive_interval(Duration::from_secs(10)), Duration::from_secs(1));
        assert_eq!(
            keepalive_interval(Duration::from_millis(100)),
            Duration::from_millis(20)
        );
        assert_eq!(secs(Duration::from_millis(2500)), 2);
        assert_eq!(secs(Duration::from_millis(10)), 1);
    }
}
