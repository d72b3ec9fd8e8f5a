//! Each kind's version record (`{prefix}/{kind}/version`): the cache an
//! acquire's script compares against, reading it, and the wait of an
//! acquire while its kind drains.
//!
//! The cache may be stale: it is never the ground for a grant. The acquire
//! script compares the record's text with the cached one and queues
//! nothing when they differ, returning the record, which refreshes the
//! cache (`recipe.rs`). A kind never seen is taken to be `v1`, normal,
//! never written (no key), which is what a kind nobody rotated is — so even
//! a first acquire is one round trip. Every write of a record is a script
//! that compares the whole text it expects (`SET_RECORD`): a draining
//! record carries its deadline in milliseconds, so two marks are never the
//! same text.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use clastor_protocol::KindMode;
use redis::Value;
use tokio::time::Instant;
use tracing::warn;

use super::notify::Notify;
use super::scripts::Scripts;
use super::session::text;
use super::{Conn, Keys, error};
use crate::backend::version_record::{decode_previous, decode_version, encode_version, initial_version};
use crate::backend::{BackendError, KindVersion};

/// Kinds whose record is cached, at most; past it the cache starts over
/// (a stale or missing entry only costs one failed compare).
const MAX_CACHED_KINDS: usize = 4096;

/// How often a waiting acquire reads a draining kind's record even without
/// a message (the safety net of a lost one).
const RECHECK: Duration = Duration::from_secs(1);

/// A kind's record as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Seen {
    /// Version and mode.
    pub(super) version: KindVersion,
    /// The record's text as stored (empty: never written).
    pub(super) raw: String,
    /// `prev=`: what the last completed rotation switched away from.
    pub(super) previous: Option<String>,
}

impl Seen {
    fn initial() -> Seen {
        Seen {
            version: initial_version(),
            raw: String::new(),
            previous: None,
        }
    }

    /// The record from its text (empty: never written).
    ///
    /// # Errors
    /// `Internal` if the text is not a version record.
    pub(super) fn from_raw(raw: String) -> Result<Seen, BackendError> {
        if raw.is_empty() {
            return Ok(Seen::initial());
        }
        let version = decode_version(raw.as_bytes())
            .map_err(|e| BackendError::Internal(format!("redis: a kind's version record: {e}")))?;
        Ok(Seen {
            previous: decode_previous(raw.as_bytes()),
            version,
            raw,
        })
    }

    /// The record `version` would be written as.
    pub(super) fn of(version: KindVersion) -> Seen {
        Seen {
            raw: String::from_utf8_lossy(&encode_version(&version)).into_owned(),
            version,
            previous: None,
        }
    }
}

/// The kinds' records.
#[derive(Debug)]
pub(super) struct Kinds {
    conn: Conn,
    keys: Arc<Keys>,
    scripts: Arc<Scripts>,
    notify: Arc<Notify>,
    cache: Mutex<HashMap<Arc<str>, Seen>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Kinds {
    pub(super) fn new(conn: Conn, keys: Arc<Keys>, scripts: Arc<Scripts>, notify: Arc<Notify>) -> Kinds {
        Kinds {
            conn,
            keys,
            scripts,
            notify,
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

    /// Remembers a record just read (a stale one only costs a failed compare).
    pub(super) fn remember(&self, kind: &Arc<str>, seen: &Seen) {
        let mut cache = lock(&self.cache);
        if let Some(old) = cache.get_mut(&**kind) {
            *old = seen.clone();
            return;
        }
        if cache.len() >= MAX_CACHED_KINDS {
            cache.clear();
        }
        cache.insert(kind.clone(), seen.clone());
    }

    /// Reads the record now.
    ///
    /// # Errors
    /// `Unavailable` if Redis cannot be reached.
    pub(super) async fn read(&self, kind: &Arc<str>) -> Result<Seen, BackendError> {
        let key = self.keys.record(kind);
        let raw: Option<Vec<u8>> = error::retry("read a kind's version", || {
            let mut c = self.conn.get();
            let cmd = redis::cmd("GET").arg(&key).clone();
            async move { cmd.query_async(&mut c).await }
        })
        .await?;
        let seen = Seen::from_raw(
            raw.map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default(),
        )?;
        self.remember(kind, &seen);
        Ok(seen)
    }

    /// Waits while `kind` drains, until `deadline`: the record once it is
    /// normal again, or `None` if the deadline came first. An abandoned
    /// drain (past its deadline, no live claim on it) is aborted here.
    ///
    /// # Errors
    /// `Unavailable` if Redis cannot be reached.
    ///
    /// # Cancellation safety
    /// Safe: it only reads and subscribes (and an abort is one conditional write).
    pub(super) async fn wait_normal(
        &self,
        kind: &Arc<str>,
        seen: Seen,
        deadline: Instant,
    ) -> Result<Option<Seen>, BackendError> {
        if seen.version.mode == KindMode::Normal {
            return Ok(Some(seen));
        }
        // The deadline first: a try-once never waits, even for a drain
        // that has just ended.
        if Instant::now() >= deadline {
            return Ok(None);
        }
        let channel = self.keys.record(kind);
        let mut sub = tokio::select! {
            s = self.notify.subscribe(&channel) => s?,
            () = tokio::time::sleep_until(deadline) => return Ok(None),
        };
        loop {
            // Read after subscribing: no change is missed between the two.
            let seen = self.read(kind).await?;
            if seen.version.mode == KindMode::Normal {
                return Ok(Some(seen));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            let abandoned_at = seen.version.drain_left().map(|left| Instant::now() + left);
            tokio::select! {
                biased;
                r = sub.changed() => drop(r?),
                () = tokio::time::sleep_until(deadline) => return Ok(None),
                () = sleep_until_opt(abandoned_at) => {
                    if !self.abort_abandoned(kind, &seen).await? {
                        // Still claimed: its driver aborts it at the same
                        // deadline. Look again in a moment if it did not.
                        tokio::select! {
                            r = sub.changed() => drop(r?),
                            () = tokio::time::sleep_until(deadline) => return Ok(None),
                            () = tokio::time::sleep(Duration::from_millis(500)) => {}
                        }
                    }
                }
                () = tokio::time::sleep(RECHECK) => {}
            }
        }
    }

    /// Puts a drain nobody drives back to normal on its version: only if the
    /// record is still `seen` and no live session claims the rotation.
    /// Whether it did.
    async fn abort_abandoned(&self, kind: &Arc<str>, seen: &Seen) -> Result<bool, BackendError> {
        let normal = Seen::of(KindVersion::normal(seen.version.version.clone()));
        let (record, claim) = (self.keys.record(kind), self.keys.claim(kind));
        let answer: Vec<Value> = error::retry("abort an abandoned drain", || {
            let mut c = self.conn.get();
            let mut inv = self.scripts.abort_abandoned.key(&record);
            inv.key(&claim)
                .arg(&seen.raw)
                .arg(&normal.raw)
                .arg(self.keys.session_prefix());
            async move { inv.invoke_async(&mut c).await }
        })
        .await?;
        let done = matches!(answer.first(), Some(Value::Int(1)));
        if done {
            self.remember(kind, &normal);
            warn!(%kind, version = %normal.version.version, "drain deadline passed with no rotation driving it; aborted it");
        }
        Ok(done)
    }
}

/// The record a script returned at `i`, if it returned one.
pub(super) fn seen_at(values: &[Value], i: usize) -> Result<Seen, BackendError> {
    let raw = values
        .get(i)
        .and_then(text)
        .ok_or_else(|| BackendError::Internal("redis: a script answered without the version record".into()))?;
    Seen::from_raw(raw)
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
