//! One watch stream per backend for the occasional watches — a kind's
//! version record while an acquire waits out a drain, a rotation's count of
//! what is left — created on it with ids we assign (etcd ≥ 3.4); one reader
//! task routes each response to its watch by id. (The hot path, waiters and
//! holders, shares one standing watch instead: `deletions.rs`.)
//!
//! A watch is always created from an explicit start revision, so nothing
//! that happened between a read and the watch is missed. When the stream
//! breaks (connection lost, no leader), every open watch is told
//! [`WatchMsg::Broken`] and its owner re-reads the store and watches again
//! from the revision it read at; the next watch opens a new stream.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use etcd_client::{Event, WatchFilterType, WatchOptions, WatchRequestSender};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::EtcdClient;
use super::error;
use crate::backend::BackendError;

/// What a watch hears.
#[derive(Debug)]
pub(super) enum WatchMsg {
    /// Changes, in revision order.
    Events(Vec<Event>),
    /// etcd cancelled the watch (its start revision was compacted away, or
    /// the range is not allowed): re-read and watch again.
    Cancelled(String),
    /// The stream broke: re-read and watch again.
    Broken,
}

/// Open watches: their id → their channel.
type Routes = HashMap<i64, mpsc::UnboundedSender<WatchMsg>>;

/// The shared stream.
#[derive(Debug)]
pub(super) struct WatchHub {
    client: EtcdClient,
    next_id: AtomicI64,
    /// The request side of the open stream (`None`: none open), behind an
    /// async lock because opening one is a round trip.
    sender: tokio::sync::Mutex<Option<(u64, WatchRequestSender)>>,
    /// Routes of watches on the stream of each generation.
    routes: Mutex<(u64, Routes)>,
    /// Ends the reader task when the backend goes.
    closed: CancellationToken,
}

impl Drop for WatchHub {
    fn drop(&mut self) {
        self.closed.cancel();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// An open watch; dropping it cancels it.
#[derive(Debug)]
pub(super) struct Watch {
    id: i64,
    generation: u64,
    hub: Arc<WatchHub>,
    rx: mpsc::UnboundedReceiver<WatchMsg>,
}

impl Watch {
    /// The next change (or trouble); `Broken` if the hub went away.
    ///
    /// # Cancellation safety
    /// Safe: a message is either returned or stays queued.
    pub(super) async fn next(&mut self) -> WatchMsg {
        self.rx.recv().await.unwrap_or(WatchMsg::Broken)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let removed = {
            let mut routes = lock(&self.hub.routes);
            routes.0 == self.generation && routes.1.remove(&self.id).is_some()
        };
        if removed {
            // Cancel on the stream, if it is still the one the watch is on.
            let hub = self.hub.clone();
            let (id, generation) = (self.id, self.generation);
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move {
                    let mut sender = hub.sender.lock().await;
                    if let Some((g, s)) = sender.as_mut()
                        && *g == generation
                        && s.cancel(id).await.is_err()
                    {
                        *sender = None;
                    }
                });
            }
        }
    }
}

impl WatchHub {
    pub(super) fn new(client: EtcdClient) -> Arc<WatchHub> {
        Arc::new(WatchHub {
            client,
            next_id: AtomicI64::new(1),
            sender: tokio::sync::Mutex::new(None),
            routes: Mutex::new((0, HashMap::new())),
            closed: CancellationToken::new(),
        })
    }

    /// Watches `key` (or every key with that prefix) from `start_revision`;
    /// with `deletes_only`, puts are filtered out by etcd.
    ///
    /// # Errors
    /// [`BackendError::Unavailable`] if no stream can be opened.
    ///
    /// # Cancellation safety
    /// Safe: a watch created and not returned is cancelled by its drop.
    pub(super) async fn watch(
        self: &Arc<Self>,
        key: &str,
        prefix: bool,
        start_revision: i64,
        deletes_only: bool,
    ) -> Result<Watch, BackendError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut options = WatchOptions::new()
            .with_start_revision(start_revision)
            .with_watch_id(id);
        if prefix {
            options = options.with_prefix();
        }
        if deletes_only {
            options = options.with_filters([WatchFilterType::NoPut]);
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let mut sender = self.sender.lock().await;
        if let Some((generation, s)) = sender.as_mut() {
            let generation = *generation;
            if lock(&self.routes).0 == generation {
                // If the stream died in between, its reader (or `route`)
                // tells the watch `Broken`.
                let watch = self.route(id, generation, tx, rx);
                if s.watch(key.as_bytes().to_vec(), Some(options)).await.is_err() {
                    *sender = None;
                }
                return Ok(watch);
            }
            *sender = None;
        }
        self.open(&mut sender, id, key, options, tx, rx).await
    }

    fn route(
        self: &Arc<Self>,
        id: i64,
        generation: u64,
        tx: mpsc::UnboundedSender<WatchMsg>,
        rx: mpsc::UnboundedReceiver<WatchMsg>,
    ) -> Watch {
        let mut routes = lock(&self.routes);
        if routes.0 == generation {
            routes.1.insert(id, tx);
        } else {
            // The stream broke in between: tell the watch at once.
            let _ = tx.send(WatchMsg::Broken);
        }
        Watch {
            id,
            generation,
            hub: self.clone(),
            rx,
        }
    }

    /// Opens a stream whose first watch is `id`, and its reader task.
    async fn open(
        self: &Arc<Self>,
        sender: &mut Option<(u64, WatchRequestSender)>,
        id: i64,
        key: &str,
        options: WatchOptions,
        tx: mpsc::UnboundedSender<WatchMsg>,
        rx: mpsc::UnboundedReceiver<WatchMsg>,
    ) -> Result<Watch, BackendError> {
        let generation = {
            let mut routes = lock(&self.routes);
            // A new generation: whatever was routed on the old one was (or
            // is about to be) told `Broken` by its reader.
            let old = std::mem::take(&mut routes.1);
            routes.0 += 1;
            for (_, tx) in old {
                let _ = tx.send(WatchMsg::Broken);
            }
            routes.1.insert(id, tx);
            routes.0
        };
        let watch = Watch {
            id,
            generation,
            hub: self.clone(),
            rx,
        };
        let stream = error::once("open a watch stream", async {
            self.client
                .watch_client()
                .watch(key.as_bytes().to_vec(), Some(options))
                .await
        })
        .await?;
        let (s, mut responses) = stream.split();
        *sender = Some((generation, s));
        let hub = Arc::downgrade(self);
        let closed = self.closed.clone();
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    msg = responses.message() => msg,
                    () = closed.cancelled() => return,
                };
                let Some(hub) = hub.upgrade() else { return };
                match msg {
                    Ok(Some(resp)) => {
                        let routes = lock(&hub.routes);
                        if routes.0 != generation {
                            return;
                        }
                        let Some(tx) = routes.1.get(&resp.watch_id()) else {
                            continue;
                        };
                        if resp.canceled() {
                            let why = if resp.compact_revision() > 0 {
                                format!("compacted at revision {}", resp.compact_revision())
                            } else {
                                resp.cancel_reason().to_owned()
                            };
                            let _ = tx.send(WatchMsg::Cancelled(why));
                        } else if !resp.events().is_empty() {
                            let _ = tx.send(WatchMsg::Events(resp.events().to_vec()));
                        }
                    }
                    Ok(None) | Err(_) => {
                        let old = {
                            let mut routes = lock(&hub.routes);
                            if routes.0 != generation {
                                return;
                            }
                            routes.0 += 1;
                            std::mem::take(&mut routes.1)
                        };
                        for (_, tx) in old {
                            let _ = tx.send(WatchMsg::Broken);
                        }
                        let mut sender = hub.sender.lock().await;
                        if sender.as_ref().is_some_and(|(g, _)| *g == generation) {
                            *sender = None;
                        }
                        return;
                    }
                }
            }
        });
        Ok(watch)
    }
}
