//! Each kind's version record (`{prefix}/{kind}/version`): the cache an
//! acquire checks its compare against, reading it, and the wait of an
//! acquire while its kind drains.
//!
//! The cache may be stale: it is never the ground for a grant. Every
//! acquire's transaction compares the record's mod revision with the cached
//! one and creates nothing when they differ; the failed transaction returns
//! the record, which refreshes the cache (`recipe.rs`). A kind never seen is
//! taken to be `v1`, normal, never written (mod revision 0), which is what a
//! kind nobody rotated is — so even a first acquire is one round trip.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use clastor_protocol::KindMode;
use etcd_client::{Compare, CompareOp, EventType, KeyValue, PutOptions, Txn, TxnOp, TxnOpResponse};
use tokio::time::Instant;
use tracing::warn;

use super::EtcdClient;
use super::Keys;
use super::error;
use super::watch::{WatchHub, WatchMsg};
use crate::backend::version_record::{decode_previous, decode_version, encode_version, initial_version};
use crate::backend::{BackendError, KindVersion};

/// Kinds whose record is cached, at most; past it the cache starts over
/// (a stale or missing entry only costs one failed compare).
const MAX_CACHED_KINDS: usize = 4096;

/// A kind's record as read at some revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Seen {
    /// Version and mode.
    pub(super) version: KindVersion,
    /// The record's mod revision (0: never written).
    pub(super) mod_rev: i64,
    /// `prev=`: what the last completed rotation switched away from.
    pub(super) previous: Option<String>,
    /// The store's revision when it was read (0: not read, assumed): a
    /// watch for its next change starts after it, and of two reads the
    /// later one wins the cache.
    pub(super) at: i64,
}

impl Seen {
    fn initial() -> Seen {
        Seen {
            version: initial_version(),
            mod_rev: 0,
            previous: None,
            at: 0,
        }
    }

    /// The record from its key-value (absent: never written), read at
    /// revision `at`.
    ///
    /// # Errors
    /// `Internal` if the value is not a version record.
    pub(super) fn from_kv(kv: Option<&KeyValue>, at: i64) -> Result<Seen, BackendError> {
        let Some(kv) = kv else {
            return Ok(Seen { at, ..Seen::initial() });
        };
        let version = decode_version(kv.value())
            .map_err(|e| BackendError::Internal(format!("etcd key {:?}: {e}", String::from_utf8_lossy(kv.key()))))?;
        Ok(Seen {
            version,
            mod_rev: kv.mod_revision(),
            previous: decode_previous(kv.value()),
            at: at.max(kv.mod_revision()),
        })
    }
}

/// The kinds' records.
#[derive(Debug)]
pub(super) struct Kinds {
    client: EtcdClient,
    keys: Arc<Keys>,
    watches: Arc<WatchHub>,
    cache: Mutex<HashMap<Arc<str>, Seen>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Kinds {
    pub(super) fn new(client: EtcdClient, keys: Arc<Keys>, watches: Arc<WatchHub>) -> Kinds {
        Kinds {
            client,
            keys,
            watches,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The record as last seen, or a never-rotated kind's.
    pub(super) fn cached(&self, kind: &str) -> Seen {
        lock(&self.cache).get(kind).cloned().unwrap_or_else(Seen::initial)
    }

    /// The record as last seen, if it was.
    pub(super) fn cached_version(&self, kind: &str) -> Option<KindVersion> {
        lock(&self.cache).get(kind).map(|s| s.version.clone())
    }

    /// Remembers a record read at a later revision than what is cached.
    pub(super) fn remember(&self, kind: &Arc<str>, seen: &Seen) {
        let mut cache = lock(&self.cache);
        if let Some(old) = cache.get_mut(&**kind) {
            if old.at <= seen.at {
                *old = seen.clone();
            }
            return;
        }
        if cache.len() >= MAX_CACHED_KINDS {
            cache.clear();
        }
        cache.insert(kind.clone(), seen.clone());
    }

    /// Reads the record now (a linearizable read).
    ///
    /// # Errors
    /// `Unavailable` if etcd cannot be reached.
    pub(super) async fn read(&self, kind: &Arc<str>) -> Result<Seen, BackendError> {
        let key = self.keys.version_key(kind);
        let resp = error::retry("read a kind's version", || {
            let mut kv = self.client.kv_client();
            let key = key.clone();
            async move { kv.get(key, None).await }
        })
        .await?;
        let seen = Seen::from_kv(resp.kvs().first(), resp.header().map_or(0, |h| h.revision()))?;
        self.remember(kind, &seen);
        Ok(seen)
    }

    /// Waits while `kind` drains, until `deadline`: the record once it is
    /// normal again, or `None` if the deadline came first. An abandoned
    /// drain (past its deadline, nobody's claim on it) is aborted here.
    ///
    /// # Errors
    /// `Unavailable` if etcd cannot be reached.
    ///
    /// # Cancellation safety
    /// Safe: it only reads and watches (and an abort is one conditional write).
    pub(super) async fn wait_normal(
        &self,
        kind: &Arc<str>,
        mut seen: Seen,
        deadline: Instant,
    ) -> Result<Option<Seen>, BackendError> {
        let key = self.keys.version_key(kind);
        'watch: loop {
            if seen.version.mode == KindMode::Normal {
                return Ok(Some(seen));
            }
            // The deadline first: a try-once never waits, even for a drain
            // that has just ended.
            if Instant::now() >= deadline {
                return Ok(None);
            }
            // After the read (not after the record's last change, which a
            // compaction may have passed during a long drain).
            let mut watch = self
                .watches
                .watch(&key, false, seen.at.max(seen.mod_rev) + 1, false)
                .await?;
            loop {
                let abandoned_at = seen.version.drain_left().map(|left| Instant::now() + left);
                let msg = tokio::select! {
                    biased;
                    msg = watch.next() => msg,
                    () = tokio::time::sleep_until(deadline) => return Ok(None),
                    () = sleep_until_opt(abandoned_at) => {
                        if self.abort_abandoned(kind, &seen).await? {
                            seen = self.read(kind).await?;
                            continue 'watch;
                        }
                        // Still claimed: its driver aborts it at the same
                        // deadline. Look again in a moment if it did not.
                        tokio::select! {
                            msg = watch.next() => msg,
                            () = tokio::time::sleep_until(deadline) => return Ok(None),
                            () = tokio::time::sleep(Duration::from_millis(500)) => {
                                seen = self.read(kind).await?;
                                continue 'watch;
                            }
                        }
                    }
                };
                match msg {
                    WatchMsg::Events(events) => {
                        for e in &events {
                            let at = e.kv().map_or(seen.at, KeyValue::mod_revision);
                            seen = match e.event_type() {
                                EventType::Put => Seen::from_kv(e.kv(), at)?,
                                // Deleted by hand: a never-rotated kind again
                                // (an absent key compares as mod revision 0).
                                EventType::Delete => Seen { at, ..Seen::initial() },
                            };
                        }
                        self.remember(kind, &seen);
                        if seen.version.mode == KindMode::Normal {
                            return Ok(Some(seen));
                        }
                    }
                    WatchMsg::Cancelled(why) => {
                        tracing::debug!(%kind, %why, "watch of a kind's version cancelled; reading it again");
                        seen = self.read(kind).await?;
                        continue 'watch;
                    }
                    WatchMsg::Broken => {
                        seen = self.read(kind).await?;
                        continue 'watch;
                    }
                }
            }
        }
    }

    /// Puts a drain nobody drives back to normal on its version: only if the
    /// record is still `seen` and no rotation claim exists. Whether it did.
    async fn abort_abandoned(&self, kind: &Arc<str>, seen: &Seen) -> Result<bool, BackendError> {
        let normal = KindVersion::normal(seen.version.version.clone());
        let txn = Txn::new()
            .when([
                Compare::mod_revision(self.keys.version_key(kind), CompareOp::Equal, seen.mod_rev),
                Compare::create_revision(self.keys.rotation_key(kind), CompareOp::Equal, 0),
            ])
            .and_then([TxnOp::put(
                self.keys.version_key(kind),
                encode_version(&normal),
                None::<PutOptions>,
            )]);
        let resp = error::retry("abort an abandoned drain", || {
            let mut kv = self.client.kv_client();
            let txn = txn.clone();
            async move { kv.txn(txn).await }
        })
        .await?;
        if resp.succeeded() {
            warn!(%kind, version = %normal.version, "drain deadline passed with no rotation driving it; aborted it");
        }
        Ok(resp.succeeded())
    }
}

/// The record a transaction's `Get` of it returned, if it was one; the
/// transaction's `header` says when.
pub(super) fn seen_in(
    resp: &TxnOpResponse,
    header: Option<&etcd_client::ResponseHeader>,
) -> Option<Result<Seen, BackendError>> {
    match resp {
        TxnOpResponse::Get(get) => Some(Seen::from_kv(get.kvs().first(), header.map_or(0, |h| h.revision()))),
        _ => None,
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
