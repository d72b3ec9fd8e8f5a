//! One watch of every deletion under the prefix, for the whole backend:
//! waiters learn that the keys ahead of them went, holders that their key
//! was deleted from outside, without a watch of their own.
//!
//! A watch per wait and per grant costs etcd a create and a cancel each, and
//! a watch made from a past revision is only served from etcd's next sync
//! (up to 100 ms later) once anything was written since. This one watch is
//! made once, from "now", and kept: puts are filtered out by etcd, and the
//! deletions of each revision are routed, as one batch per lock prefix (the
//! key up to its last `/`), to that prefix's subscribers. Every server
//! receives every deletion under the prefix — one event per release per
//! server, cheap next to a watch per grant while the servers are few.
//!
//! **No deletion is missed.** A subscriber subscribes *before* it creates
//! its key or reads the store, and the watch has been running since before
//! that. After a broken stream it resumes from the revision after the last
//! one it *delivered* (or that a progress notification, sent only to a
//! caught-up watch, vouched for) — never from a response header, which etcd
//! stamps with its current revision even on a catch-up batch. Only when that
//! history was compacted away does it start again from now — and once that
//! new watch runs, every subscriber is told [`DelMsg::Broken`] and looks at
//! the store again.
//!
//! **One batch per revision.** Several keys of one lock can go at one
//! revision (`etcdctl del --prefix`, a revoked lease carrying a holder and a
//! waiter): a waiter must learn of its own key's deletion in the same
//! message as its predecessor's, or it could take the lock on a key that is
//! already gone.
//!
//! Each batch carries its revision, so a subscriber ignores deletions older
//! than what it read (a name is reused once its key is gone, `names.rs`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use etcd_client::{EventType, WatchFilterType, WatchOptions, WatchStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::EtcdClient;
use super::error;
use crate::backend::BackendError;
use crate::backoff::Backoff;

/// What a subscriber hears.
#[derive(Debug)]
pub(super) enum DelMsg {
    /// These keys of the subscribed prefix were deleted at `revision`.
    Deleted { keys: Vec<Vec<u8>>, revision: i64 },
    /// Deletions may have been missed (history compacted while the stream
    /// was down): look at the store again.
    Broken,
    /// The backend is shutting down or gone: nothing more will come.
    Closed,
}

type Subscribers = HashMap<String, Vec<(u64, mpsc::UnboundedSender<DelMsg>)>>;

/// The watch and its subscribers.
#[derive(Debug)]
pub(super) struct Deletions {
    subs: Mutex<(u64, Subscribers)>,
    /// The revision up to which every deletion was delivered (-1: none;
    /// start again from now and tell everyone to look).
    seen: AtomicI64,
    /// Stops the pump (on shutdown, or when the backend is dropped).
    closed: CancellationToken,
}

impl Drop for Deletions {
    fn drop(&mut self) {
        self.closed.cancel();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Deletions under one lock's prefix, until dropped.
#[derive(Debug)]
pub(super) struct Subscription {
    id: u64,
    dir: String,
    rx: mpsc::UnboundedReceiver<DelMsg>,
    owner: Weak<Deletions>,
    closed: CancellationToken,
}

impl Subscription {
    /// The next batch of deletions, `Broken`, or `Closed` once the backend
    /// shuts down.
    ///
    /// # Cancellation safety
    /// Safe: a message is either returned or stays queued.
    pub(super) async fn next(&mut self) -> DelMsg {
        tokio::select! {
            biased;
            msg = self.rx.recv() => msg.unwrap_or(DelMsg::Closed),
            () = self.closed.cancelled() => DelMsg::Closed,
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let Some(owner) = self.owner.upgrade() else {
            return;
        };
        let mut subs = lock(&owner.subs);
        if let Some(list) = subs.1.get_mut(&self.dir) {
            list.retain(|(id, _)| *id != self.id);
            if list.is_empty() {
                subs.1.remove(&self.dir);
            }
        }
    }
}

impl Deletions {
    /// Starts the watch of deletions under `prefix` and waits until etcd
    /// made it.
    ///
    /// # Errors
    /// `Unavailable` if etcd cannot be reached.
    pub(super) async fn start(client: EtcdClient, prefix: String) -> Result<Arc<Deletions>, BackendError> {
        let deletions = Arc::new(Deletions {
            subs: Mutex::new((0, HashMap::new())),
            seen: AtomicI64::new(0),
            closed: CancellationToken::new(),
        });
        let (stream, created) = open(&client, &prefix, 0).await?;
        deletions.seen.store(created, Ordering::Release);
        let weak = Arc::downgrade(&deletions);
        let closed = deletions.closed.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = closed.cancelled() => {}
                () = pump(client, prefix, stream, weak) => {}
            }
        });
        Ok(deletions)
    }

    /// Stops the watch; subscribers hear `Closed`.
    pub(super) fn shutdown(&self) {
        self.closed.cancel();
    }

    /// Subscribes to the deletions of keys directly under `dir` (a lock's
    /// prefix, ending in `/`).
    pub(super) fn subscribe(self: &Arc<Self>, dir: &str) -> Subscription {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut subs = lock(&self.subs);
        subs.0 += 1;
        let id = subs.0;
        subs.1.entry(dir.to_owned()).or_default().push((id, tx));
        Subscription {
            id,
            dir: dir.to_owned(),
            rx,
            owner: Arc::downgrade(self),
            closed: self.closed.clone(),
        }
    }

    /// Routes the deletions of one response: one batch per revision and
    /// lock prefix. Returns the last revision delivered.
    fn route(&self, resp: &etcd_client::WatchResponse) -> Option<i64> {
        let mut batches: Vec<(i64, &str, Vec<Vec<u8>>)> = Vec::new();
        for e in resp.events() {
            if e.event_type() != EventType::Delete {
                continue;
            }
            let Some(kv) = e.kv() else { continue };
            let key = kv.key();
            let Some(slash) = key.iter().rposition(|b| *b == b'/') else {
                continue;
            };
            let Ok(dir) = std::str::from_utf8(&key[..=slash]) else {
                continue;
            };
            let revision = kv.mod_revision();
            match batches.iter_mut().find(|(r, d, _)| *r == revision && *d == dir) {
                Some((_, _, keys)) => keys.push(key.to_vec()),
                None => batches.push((revision, dir, vec![key.to_vec()])),
            }
        }
        let last = batches.iter().map(|(r, _, _)| *r).max();
        let subs = lock(&self.subs);
        for (revision, dir, keys) in batches {
            if let Some(list) = subs.1.get(dir) {
                for (_, tx) in list {
                    let _ = tx.send(DelMsg::Deleted {
                        keys: keys.clone(),
                        revision,
                    });
                }
            }
        }
        last
    }

    fn broken(&self) {
        let subs = lock(&self.subs);
        for (_, tx) in subs.1.values().flatten() {
            let _ = tx.send(DelMsg::Broken);
        }
    }
}

/// Opens the watch from `start` (0: now) and waits for etcd to create it;
/// the revision it was created at (the store's current revision, whatever
/// `start` was).
async fn open(client: &EtcdClient, prefix: &str, start: i64) -> Result<(WatchStream, i64), BackendError> {
    let options = WatchOptions::new()
        .with_prefix()
        .with_filters([WatchFilterType::NoPut])
        .with_progress_notify()
        .with_start_revision(start);
    let mut stream = error::once("watch deletions", async {
        client
            .watch_client()
            .watch(prefix.as_bytes().to_vec(), Some(options))
            .await
    })
    .await?;
    let created = error::once("watch deletions", stream.message()).await?;
    match created {
        Some(resp) if resp.created() && !resp.canceled() => Ok((stream, resp.header().map_or(0, |h| h.revision()))),
        Some(resp) => Err(BackendError::Unavailable(format!(
            "etcd refused the watch of deletions: {}",
            resp.cancel_reason()
        ))),
        None => Err(BackendError::Unavailable(
            "etcd did not create the watch of deletions".into(),
        )),
    }
}

/// Routes deletions until the backend is dropped. A broken stream is
/// reopened from the revision after the last one delivered; if etcd
/// compacted that away (it cancels the watch saying so), every subscriber
/// is told `Broken` once a watch from now runs.
async fn pump(client: EtcdClient, prefix: String, mut stream: WatchStream, owner: Weak<Deletions>) {
    loop {
        loop {
            let msg = stream.message().await;
            let Some(deletions) = owner.upgrade() else { return };
            match msg {
                Ok(Some(resp)) if resp.canceled() => {
                    if resp.compact_revision() > 0 {
                        warn!(
                            compact = resp.compact_revision(),
                            "the watch of deletions fell behind a compaction; watching from now"
                        );
                        deletions.seen.store(-1, Ordering::Release);
                    } else {
                        debug!(
                            reason = resp.cancel_reason(),
                            "etcd cancelled the watch of deletions; resuming"
                        );
                    }
                    break;
                }
                Ok(Some(resp)) if resp.events().is_empty() => {
                    // A progress notification: etcd sends them only to a
                    // watch that is caught up, so everything up to its
                    // revision was delivered.
                    if !resp.created()
                        && let Some(h) = resp.header()
                    {
                        deletions.seen.fetch_max(h.revision(), Ordering::AcqRel);
                    }
                }
                Ok(Some(resp)) => {
                    if let Some(last) = deletions.route(&resp) {
                        deletions.seen.fetch_max(last, Ordering::AcqRel);
                    }
                }
                Ok(None) | Err(_) => {
                    debug!("the watch of deletions broke; resuming");
                    break;
                }
            }
        }
        let mut pause = Backoff::new(Duration::from_millis(20), Duration::from_secs(1));
        stream = loop {
            let Some(deletions) = owner.upgrade() else { return };
            let seen = deletions.seen.load(Ordering::Acquire);
            let from = if seen < 0 { 0 } else { seen + 1 };
            match open(&client, &prefix, from).await {
                Ok((s, created)) => {
                    if seen < 0 {
                        // A watch from now: deletions were missed; now that
                        // it runs, every subscriber looks again.
                        deletions.seen.fetch_max(created, Ordering::AcqRel);
                        deletions.broken();
                    }
                    break s;
                }
                Err(e) => debug!(error = %e, "cannot reopen the watch of deletions yet"),
            }
            drop(deletions);
            pause.sleep().await;
        };
    }
}
