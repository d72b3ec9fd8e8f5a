//! `impl Backend for EtcdBackend`: the one-transaction acquire, the wait for
//! the keys ahead to go, the holder's eye on its own key, release and the
//! reads.
//!
//! **Acquire.** One transaction: *if* the kind's version record has the mod
//! revision this server last saw, *then* put our key (with a pooled lease)
//! and read the lock's first contender, *else* read the record. The put's
//! revision is our key's create revision, the fencing token; if the first
//! contender is ours, the lock is granted, in one round trip. Otherwise we
//! wait: one consistent read of the keys created before ours (up to
//! [`TRACKED_PREDECESSORS`]) *and* of our own key, then their deletions as
//! the backend's standing watch reports them (`deletions.rs`, subscribed
//! before our key was created, so none is missed). When the last of them
//! goes we hold the lock — a hand-over costs one watch event, no read. In a
//! longer queue we wait, as Go's `concurrency.Mutex` does, for the key just
//! ahead of ours and read again when it goes. A key deleted from outside
//! (or with its lease) is never granted: its deletion comes in the same
//! batch as the last key ahead's, or an earlier one.
//!
//! **Holding.** A holder's deletions subscription stays with it: its key
//! deleted from outside, or with its lease revoked by hand, the holder is
//! told `NodeDeleted` at once. Its lease's loss reports it too (`lease.rs`).
//!
//! **Nothing left behind.** A key being waited on belongs to a
//! [`PendingKey`], and a granted one to an [`EtcdGuard`]; dropping either
//! deletes the key (in the background, retried until it is gone or its
//! lease is), so a cancelled, timed-out or failed acquire and a vanished
//! holder leave nothing that would block the next contender.

use std::sync::Arc;
use std::time::Duration;

use clastor_protocol::{LockMode, LostReason};
use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::warn;

use super::EtcdBackend;
use super::EtcdClient;
use super::deletions::{DelMsg, Subscription};
use super::error;
use super::kinds::seen_in;
use super::lease::{Lease, keepalive_interval, lost_after};
use super::names::{NameClaim, is_shared};
use crate::backend::{
    AcquireRequest, Backend, BackendError, BackendHealth, Grant, KindVersion, RotateOutcome, RotateRequest,
};
use crate::backoff::Backoff;
use crate::key::LockKey;

/// Times a waiting key deleted from outside is put again before the acquire
/// gives up.
const MAX_REQUEUES: u32 = 3;

/// A waiter tracks this many keys ahead of it: with no more in the queue
/// it is granted on the last one's deletion event, without another read;
/// further back in a longer queue it watches only the key just ahead, and
/// reads again when that goes (Go's `concurrency.Mutex`).
const TRACKED_PREDECESSORS: i64 = 64;

/// A contender's key not (yet) granted: deleted when dropped, unless it
/// became a grant.
#[derive(Debug)]
struct PendingKey {
    client: EtcdClient,
    name: Option<NameClaim>,
    lease: Arc<Lease>,
    /// What is known of the key in etcd.
    state: KeyState,
}

/// What a contender knows of its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyState {
    /// Not sent yet, or refused: nothing to delete.
    Absent,
    /// Created at this revision.
    Created(i64),
    /// The put was sent and its answer lost: it may be applied even after a
    /// delete of ours; delete, then delete again once no request of ours can
    /// still be in flight ([`LATE_WRITE`]).
    Unknown,
}

/// How long after its answer was lost a put can still be applied: past
/// etcd's own request timeout (5 s) plus two election timeouts, with room.
const LATE_WRITE: Duration = Duration::from_secs(15);

impl PendingKey {
    fn new(client: &EtcdClient, name: NameClaim, lease: Arc<Lease>) -> PendingKey {
        PendingKey {
            client: client.clone(),
            name: Some(name),
            lease,
            state: KeyState::Unknown,
        }
    }

    fn key(&self) -> &str {
        self.name.as_ref().map_or("", NameClaim::key)
    }

    /// The key was never created, or is known to be gone: free its name.
    fn forget(mut self) {
        self.name = None;
    }

    /// The key is granted: the guard owns it now.
    fn into_granted(mut self) -> (Option<NameClaim>, Arc<Lease>) {
        (self.name.take(), self.lease.clone())
    }
}

impl Drop for PendingKey {
    fn drop(&mut self) {
        if let Some(name) = self.name.take() {
            delete_in_background(&self.client, name, self.lease.clone(), self.state);
        }
    }
}

/// Deletes the key named by `name` until it is gone, or its lease is (which
/// takes the key with it); never gives up while both live. A key created at
/// a known revision is deleted only if it is still that one (a late delete
/// must never take a later key of the same name); one whose put is in
/// doubt is deleted again after [`LATE_WRITE`]. The name is free again only
/// then (`names.rs`).
fn delete_in_background(client: &EtcdClient, name: NameClaim, lease: Arc<Lease>, state: KeyState) {
    if state == KeyState::Absent {
        return;
    }
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let client = client.clone();
    handle.spawn(async move {
        let deleted = delete_until_done(&client, name.key(), &lease, state);
        if !deleted.await || state != KeyState::Unknown {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(LATE_WRITE) => {}
            () = lease.until_retired() => return,
        }
        delete_until_done(&client, name.key(), &lease, state).await;
        drop(name);
    });
}

/// One delete of `key` (conditional on its create revision when known),
/// retried until etcd confirms it; `false` if the lease went first.
async fn delete_until_done(client: &EtcdClient, key: &str, lease: &Lease, state: KeyState) -> bool {
    let mut pause = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
    loop {
        let deleted = delete_key(client, key, state);
        tokio::select! {
            r = deleted => match r {
                Ok(()) => return true,
                Err(e) => warn!(%key, error = %e, "cannot delete a lock key yet; retrying"),
            },
            () = lease.until_retired() => return false,
        }
        if !pause.wait_or(lease.until_retired()).await {
            return false;
        }
    }
}

/// Deletes `key` — only the incarnation created at `rev` when it is known
/// (a retried delete whose first attempt applied late must not take the
/// next key of that name). Gone already is success.
///
/// # Errors
/// As [`error::retry`].
async fn delete_key(client: &EtcdClient, key: &str, state: KeyState) -> Result<(), BackendError> {
    let txn = match state {
        KeyState::Created(rev) => Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, rev)])
            .and_then([TxnOp::delete(key, None)]),
        KeyState::Unknown | KeyState::Absent => Txn::new().and_then([TxnOp::delete(key, None)]),
    };
    error::retry("delete a lock key", || {
        let mut kv = client.kv_client();
        let txn = txn.clone();
        async move { kv.txn(txn).await }
    })
    .await
    .map(drop)
}

/// A grant: its key, the lease it lives on, and the watch on its deletion.
/// Dropping it releases the lock in the background.
#[derive(Debug)]
pub struct EtcdGuard {
    held: Option<Held>,
}

#[derive(Debug)]
struct Held {
    client: EtcdClient,
    name: NameClaim,
    /// The key's create revision (the token).
    rev: i64,
    lease: Arc<Lease>,
    grant: u64,
    watcher: AbortHandle,
}

impl EtcdGuard {
    /// The lock's key in etcd.
    pub fn key(&self) -> &str {
        self.held.as_ref().map_or("", |h| h.name.key())
    }

    /// The id of the lease the key lives on.
    pub fn lease_id(&self) -> i64 {
        self.held.as_ref().map_or(0, |h| h.lease.id())
    }

    fn take(&mut self) -> Option<Held> {
        let held = self.held.take()?;
        held.lease.forget(held.grant);
        held.watcher.abort();
        Some(held)
    }
}

impl Drop for EtcdGuard {
    fn drop(&mut self) {
        if let Some(h) = self.take() {
            delete_in_background(&h.client, h.name, h.lease, KeyState::Created(h.rev));
        }
    }
}

/// How a wait for our turn ended.
enum Turn {
    Granted,
    TimedOut,
    /// Our key was deleted from outside while we waited.
    Deleted,
}

impl EtcdBackend {
    /// Waits until no key created before ours (`rev`) that excludes ours is
    /// left in `dir` (for a writer, any; for a reader, a writer's: one not
    /// named [`is_shared`]); `deletions` was subscribed to before our key
    /// was created.
    #[allow(clippy::too_many_arguments)]
    async fn wait_turn(
        &self,
        dir: &str,
        key: &str,
        rev: i64,
        shared: bool,
        lease: &Lease,
        deadline: Instant,
        deletions: &mut Subscription,
    ) -> Result<Turn, BackendError> {
        let look = Txn::new().and_then([
            TxnOp::get(
                dir,
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_max_create_revision(rev - 1)
                        .with_sort(SortTarget::Create, SortOrder::Descend)
                        .with_limit(TRACKED_PREDECESSORS)
                        .with_keys_only(),
                ),
            ),
            TxnOp::get(key, Some(GetOptions::new().with_count_only())),
        ]);
        loop {
            // One consistent look: the keys before ours (the last few), and ours.
            let looked = tokio::time::timeout_at(
                deadline,
                error::retry("look for the predecessors", || {
                    let mut kv = self.client.kv_client();
                    let look = look.clone();
                    async move { kv.txn(look).await }
                }),
            );
            let resp = tokio::select! {
                r = looked => match r {
                    Ok(r) => r?,
                    Err(_) => return Ok(Turn::TimedOut),
                },
                () = lease.until_retired() => {
                    return Err(BackendError::Unavailable("the etcd lease of a waiting acquire was lost".into()));
                }
            };
            let at = resp.header().map_or(rev, |h| h.revision());
            let ops = resp.op_responses();
            let (Some(TxnOpResponse::Get(before)), Some(TxnOpResponse::Get(mine))) = (ops.first(), ops.get(1)) else {
                return Err(BackendError::Internal(
                    "etcd answered a lookup with other operations".into(),
                ));
            };
            if mine.count() == 0 {
                return Ok(Turn::Deleted);
            }
            // All of them (nothing more in range: `count` would not do, etcd
            // counts before the create-revision filter), or in a long queue
            // only the last: then look again when it goes, as Go's Mutex does.
            let complete = !before.more();
            let mut ahead: Vec<Vec<u8>> = before
                .kvs()
                .iter()
                .map(|kv| kv.key())
                // A reader waits only for the writers ahead — once it has
                // seen every key ahead; in a long queue, for the closest key.
                .filter(|k| !(shared && complete && is_shared(k)))
                .map(<[u8]>::to_vec)
                .collect();
            if ahead.is_empty() {
                return Ok(Turn::Granted);
            }
            if !complete {
                ahead.truncate(1);
            }
            // Wait for their deletion (or ours), after the look.
            loop {
                let msg = tokio::select! {
                    biased;
                    () = lease.until_retired() => {
                        return Err(BackendError::Unavailable("the etcd lease of a waiting acquire was lost".into()));
                    }
                    msg = deletions.next() => msg,
                    () = tokio::time::sleep_until(deadline) => return Ok(Turn::TimedOut),
                };
                match msg {
                    DelMsg::Deleted { keys, revision } if revision > at => {
                        // One batch per revision: ours gone in the same one
                        // as the last ahead is ours gone, not our turn.
                        if keys.iter().any(|k| k == key.as_bytes()) {
                            return Ok(Turn::Deleted);
                        }
                        ahead.retain(|a| !keys.contains(a));
                        if ahead.is_empty() {
                            if complete {
                                // Every key created before ours is gone, and
                                // ours was not (it would have been in this
                                // batch or an earlier one): ours is the lowest.
                                return Ok(Turn::Granted);
                            }
                            break;
                        }
                    }
                    DelMsg::Deleted { .. } => {}
                    DelMsg::Broken => break,
                    DelMsg::Closed => return Err(BackendError::Closed),
                }
            }
        }
    }

    /// Reports the grant lost when its key (created at `rev`) is deleted
    /// from outside; the task ends with the guard.
    fn watch_held(
        &self,
        key: &str,
        rev: i64,
        lease: Arc<Lease>,
        grant: u64,
        mut deletions: Subscription,
    ) -> AbortHandle {
        let (client, key) = (self.client.clone(), key.to_owned());
        let task = tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    msg = deletions.next() => msg,
                    () = lease.until_retired() => return,
                };
                let gone = match msg {
                    DelMsg::Deleted { keys, revision } => revision > rev && keys.iter().any(|k| k == key.as_bytes()),
                    DelMsg::Closed => return,
                    // Look at the key: deletions may have been missed.
                    DelMsg::Broken => match still_there(&client, &key, &lease).await {
                        Some(there) => !there,
                        // The lease is retired: that reports the loss.
                        None => return,
                    },
                };
                if gone {
                    warn!(%key, "lock key deleted from outside Clastor");
                    lease.lose(grant, LostReason::NodeDeleted);
                    return;
                }
            }
        });
        task.abort_handle()
    }

    /// The directory of `key`'s contenders under the kind's version, as
    /// read now.
    async fn current_dir(&self, key: &LockKey) -> Result<String, BackendError> {
        let seen = self.kinds.read(key.kind_arc()).await?;
        Ok(self.keys.lock_dir(key.kind(), &seen.version.version, key.id()))
    }

    /// Keys with this prefix, counted at one revision.
    async fn count(&self, prefix: &str) -> Result<i64, BackendError> {
        let resp = error::retry("count lock keys", || {
            let mut kv = self.client.kv_client();
            let prefix = prefix.to_owned();
            async move {
                kv.get(prefix, Some(GetOptions::new().with_prefix().with_count_only()))
                    .await
            }
        })
        .await?;
        Ok(resp.count())
    }
}

/// Whether `key` still exists; `None` once `lease` is retired (keep
/// looking until then).
async fn still_there(client: &EtcdClient, key: &str, lease: &Lease) -> Option<bool> {
    loop {
        let look = error::retry("look at a held lock key", || {
            let mut kv = client.kv_client();
            let key = key.to_owned();
            async move { kv.get(key, Some(GetOptions::new().with_count_only())).await }
        });
        tokio::select! {
            r = look => if let Ok(resp) = r {
                return Some(resp.count() > 0);
            },
            () = lease.until_retired() => return None,
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
            () = lease.until_retired() => return None,
        }
    }
}

impl Backend for EtcdBackend {
    type Guard = EtcdGuard;

    fn name(&self) -> &'static str {
        "etcd"
    }

    async fn acquire(&self, req: AcquireRequest<'_>) -> Result<Option<Grant<EtcdGuard>>, BackendError> {
        let shared = req.mode == LockMode::Shared;
        let deadline = Instant::now() + req.wait;
        let key = req.key;
        let kind = key.kind_arc();
        let version_key = self.keys.version_key(kind);
        let mut seen = self.kinds.cached(kind);
        let (mut requeues, mut stale_leases) = (0, 0);
        loop {
            if seen.version.mode != clastor_protocol::KindMode::Normal {
                // The cold paths are boxed, so the uncontended acquire's
                // future stays small (it is moved several times per request).
                match Box::pin(self.kinds.wait_normal(kind, seen, deadline)).await? {
                    Some(s) => seen = s,
                    None => return Ok(None),
                }
            }
            let lease = self.leases.pick(deadline).await?;
            let dir = self.keys.lock_dir(kind, &seen.version.version, key.id());
            // Before the key exists: no deletion after it can be missed.
            let mut deletions = self.deletions.subscribe(&dir);
            let mut pending = PendingKey::new(&self.client, self.names.take(lease.id(), &dir, shared), lease.clone());
            // Only if the kind's record is as seen, and only a new key: a put
            // must never adopt a stray key of this name (a put of ours whose
            // answer was lost, applied after we gave up on it).
            let txn = Txn::new()
                .when([
                    Compare::mod_revision(version_key.as_str(), CompareOp::Equal, seen.mod_rev),
                    Compare::create_revision(pending.key(), CompareOp::Equal, 0),
                ])
                .and_then([
                    TxnOp::put(
                        pending.key(),
                        format!("clastor owner={}", req.owner),
                        Some(PutOptions::new().with_lease(lease.id())),
                    ),
                    // The first contender, for a writer; for a reader the
                    // first few, to see whether any writer is ahead of it.
                    TxnOp::get(
                        dir.as_str(),
                        Some(
                            GetOptions::new()
                                .with_prefix()
                                .with_sort(SortTarget::Create, SortOrder::Ascend)
                                .with_limit(if shared { TRACKED_PREDECESSORS + 1 } else { 1 })
                                .with_keys_only(),
                        ),
                    ),
                ])
                .or_else([
                    TxnOp::get(version_key.as_str(), None),
                    TxnOp::get(pending.key(), Some(GetOptions::new().with_keys_only())),
                ]);
            // Sent once: a lost answer leaves the key to `pending`'s drop.
            // Boxed: a gRPC call's future is several KiB, and this one
            // would otherwise be carried (and copied) by every level above.
            let once = Box::pin(error::once("create a lock key", async {
                let mut kv = self.client.kv_client();
                kv.txn(txn).await
            }));
            let resp = match once.await {
                Ok(resp) => resp,
                // The lease was revoked or expired before its keepalive
                // noticed: retire it now (nothing was put) and use another.
                Err(e) if e.to_string().contains("lease not found") && stale_leases < MAX_REQUEUES => {
                    warn!(
                        lease = format_args!("{:x}", lease.id()),
                        "etcd no longer knows a pooled lease; retiring it"
                    );
                    pending.state = KeyState::Absent;
                    pending.forget();
                    lease.retire(LostReason::SessionExpired);
                    stale_leases += 1;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let ops = resp.op_responses();
            if !resp.succeeded() {
                // A stray key of ours under this name: delete it (the name
                // stays taken until it is gone) and go again with another.
                match ops.get(1) {
                    Some(TxnOpResponse::Get(g)) if !g.kvs().is_empty() => {
                        let stray = g.kvs()[0].create_revision();
                        warn!(key = %pending.key(), stray, "a stray lock key of ours; deleting it");
                        pending.state = KeyState::Created(stray);
                        drop(pending);
                    }
                    _ => pending.forget(),
                }
                // The kind's record moved on (or did not): learn it, go again.
                seen = match ops.first().and_then(|op| seen_in(op, resp.header())) {
                    Some(s) => s?,
                    None => {
                        return Err(BackendError::Internal(
                            "etcd answered a failed compare without the record".into(),
                        ));
                    }
                };
                self.kinds.remember(kind, &seen);
                continue;
            }
            let Some(rev) = resp.header().map(|h| h.revision()) else {
                return Err(BackendError::Internal(
                    "etcd answered a transaction without a header".into(),
                ));
            };
            pending.state = KeyState::Created(rev);
            // Granted at once: a writer first in line, a reader with no
            // writer ahead (in a queue longer than the read, `wait_turn`
            // finds out).
            let now = match ops.get(1) {
                Some(TxnOpResponse::Get(get)) => {
                    let kvs = get.kvs();
                    kvs.iter()
                        .position(|kv| kv.create_revision() == rev)
                        .is_some_and(|pos| pos == 0 || (shared && kvs[..pos].iter().all(|kv| is_shared(kv.key()))))
                }
                _ => false,
            };
            let turn = if now {
                Turn::Granted
            } else {
                Box::pin(self.wait_turn(&dir, pending.key(), rev, shared, &lease, deadline, &mut deletions)).await?
            };
            match turn {
                Turn::Granted => {}
                Turn::TimedOut => return Ok(None),
                Turn::Deleted if requeues < MAX_REQUEUES => {
                    requeues += 1;
                    warn!(%key, key = %pending.key(), "our waiting lock key was deleted from outside; queueing again");
                    pending.forget();
                    continue;
                }
                Turn::Deleted => {
                    return Err(BackendError::Unavailable(format!(
                        "the lock key for {key} kept being deleted from outside"
                    )));
                }
            }
            let token = u64::try_from(rev).map_err(|_| BackendError::Internal(format!("negative revision {rev}")))?;
            let grant = lease
                .register(key, token, req.on_lost)
                .map_err(|_| BackendError::Unavailable("the etcd lease was lost as the lock was granted".into()))?;
            let watcher = self.watch_held(pending.key(), rev, lease.clone(), grant, deletions);
            let (Some(name), lease) = pending.into_granted() else {
                return Err(BackendError::Internal("a granted key without its name".into()));
            };
            return Ok(Some(Grant {
                token,
                version: seen.version.version.clone(),
                guard: EtcdGuard {
                    held: Some(Held {
                        client: self.client.clone(),
                        name,
                        rev,
                        lease,
                        grant,
                        watcher,
                    }),
                },
            }));
        }
    }

    async fn release(&self, guard: EtcdGuard) -> Result<(), BackendError> {
        let Some(h) = guard.held.as_ref() else { return Ok(()) };
        // The holder is done with it: no loss to report any more.
        h.lease.forget(h.grant);
        h.watcher.abort();
        // The guard stays armed until etcd confirmed the delete: dropped
        // before (this future cancelled), it deletes in the background.
        // Boxed, as the acquire's transaction (a gRPC call's future is big).
        let deleted = Box::pin(delete_key(&h.client, h.name.key(), KeyState::Created(h.rev))).await;
        match deleted {
            Ok(()) => {
                let mut guard = guard;
                drop(guard.held.take());
                Ok(())
            }
            // Its lease is gone, and the key with it.
            Err(_) if h.lease.is_retired() => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn is_held(&self, key: &LockKey) -> Result<bool, BackendError> {
        let dir = self.current_dir(key).await?;
        Ok(self.count(&dir).await? > 0)
    }

    async fn rotate(&self, req: RotateRequest<'_>) -> Result<RotateOutcome, BackendError> {
        self.rotate_kind(req).await
    }

    async fn abort_rotation(&self, kind: &Arc<str>) -> Result<(KindVersion, bool), BackendError> {
        self.abort_kind(kind).await
    }

    async fn count_locks(&self, kind: &Arc<str>, version: &str) -> Result<u32, BackendError> {
        let n = self.count(&self.keys.version_dir(kind, version)).await?;
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }

    async fn version(&self, kind: &str) -> Result<KindVersion, BackendError> {
        let kind: Arc<str> = Arc::from(kind);
        Ok(self.kinds.read(&kind).await?.version)
    }

    fn cached_version(&self, kind: &str) -> Option<KindVersion> {
        self.kinds.cached_version(kind)
    }

    fn safe_until(&self, guard: &EtcdGuard) -> Option<Instant> {
        Some(guard.held.as_ref().map_or_else(Instant::now, |h| h.lease.safe_until()))
    }

    fn confirm_interval(&self) -> Option<Duration> {
        Some(keepalive_interval(self.leases.ttl()))
    }

    fn health(&self) -> BackendHealth {
        let (ready, sessions) = self.leases.health();
        let trusted = sessions.iter().filter(|s| s.trusted).count();
        BackendHealth {
            ready,
            detail: if ready {
                format!("etcd: {trusted} of {} leases in contact", sessions.len())
            } else {
                "etcd: no lease in contact with the cluster".to_owned()
            },
            sessions,
        }
    }

    fn fixed_layout(&self) -> Option<clastor_protocol::KindLayout> {
        // Readers' keys are marked; Go's Mutex, which ignores the marks,
        // waits for them like any key: every kind takes shared locks.
        Some(clastor_protocol::KindLayout::ReadWrite)
    }

    fn info(&self) -> Vec<(String, String)> {
        let (ready, sessions) = self.leases.health();
        let mut out = vec![
            ("etcd_ready".to_owned(), ready.to_string()),
            ("etcd_leases".to_owned(), sessions.len().to_string()),
            (
                "etcd_lease_ttl_ms".to_owned(),
                self.leases.ttl().as_millis().to_string(),
            ),
            (
                "etcd_lost_after_ms".to_owned(),
                lost_after(self.leases.ttl()).as_millis().to_string(),
            ),
        ];
        for s in sessions {
            out.push((
                format!("etcd_lease_{}", s.slot),
                format!("{} {} grants={}", s.id, s.state, s.grants),
            ));
        }
        out
    }

    async fn shutdown(&self) {
        self.leases.shutdown().await;
        self.deletions.shutdown();
    }
}
