//! Each kind's version record (a row of `{schema}.kinds`): the cache an
//! acquire's comparison is made against, reading it, and the wait of an
//! acquire while its kind drains.
//!
//! The cache may be stale: it is never the ground for a grant. Every
//! acquire compares the row's revision with the cached one inside the
//! acquire function (under the shared kind lock, `schema.rs`) and inserts
//! nothing when they differ; it then returns the record, which refreshes
//! the cache (`recipe.rs`). A kind never seen is taken to be `v1`, normal,
//! without a row (revision 0), which is what a kind nobody rotated is — so
//! even a first acquire is one round trip.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use clastor_protocol::KindMode;
use tokio::time::Instant;
use tracing::warn;

use super::listen::{Listener, kind_topic};
use super::pool::Pool;
use crate::backend::version_record::{decode_previous, decode_version, encode_version, initial_version};
use crate::backend::{BackendError, KindVersion};

/// Kinds whose record is cached, at most; past it the cache starts over.
const MAX_CACHED_KINDS: usize = 4096;

/// How often a waiting acquire reads the record even without a
/// notification.
const RECHECK: Duration = Duration::from_secs(1);

/// A kind's record as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Seen {
    /// Version and mode.
    pub(super) version: KindVersion,
    /// The row's revision (0: no row).
    pub(super) rev: i64,
    /// `prev=`: what the last completed rotation switched away from.
    pub(super) previous: Option<String>,
}

impl Seen {
    pub(super) fn initial() -> Seen {
        Seen {
            version: initial_version(),
            rev: 0,
            previous: None,
        }
    }

    /// The record from a row's `record` and `rev` (no record: no row).
    ///
    /// # Errors
    /// `Internal` if the text is not a version record.
    pub(super) fn from_parts(kind: &str, record: Option<&str>, rev: i64) -> Result<Seen, BackendError> {
        let Some(record) = record else {
            return Ok(Seen::initial());
        };
        let version = decode_version(record.as_bytes())
            .map_err(|e| BackendError::Internal(format!("PostgreSQL kinds row {kind:?}: {e}")))?;
        Ok(Seen {
            version,
            rev,
            previous: decode_previous(record.as_bytes()),
        })
    }
}

/// The kinds' records.
#[derive(Debug)]
pub(super) struct Kinds {
    pool: Arc<Pool>,
    listener: Arc<Listener>,
    cache: Mutex<HashMap<Arc<str>, Seen>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Kinds {
    pub(super) fn new(pool: Arc<Pool>, listener: Arc<Listener>) -> Kinds {
        Kinds {
            pool,
            listener,
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

    /// Remembers a record as read now. Revisions come from one sequence,
    /// so a larger one is newer; a row deleted by hand reads as 0 and is
    /// taken as it is (a wrong guess costs one failed comparison).
    pub(super) fn remember(&self, kind: &Arc<str>, seen: &Seen) {
        let mut cache = lock(&self.cache);
        if let Some(old) = cache.get_mut(&**kind) {
            if old.rev <= seen.rev || seen.rev == 0 {
                *old = seen.clone();
            }
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
    /// `Unavailable` if the database cannot be reached.
    pub(super) async fn read(&self, kind: &Arc<str>) -> Result<Seen, BackendError> {
        let k: &str = kind;
        let row = self
            .pool
            .retry("read a kind's version", |c| async move {
                c.client.query_opt(&c.st.read_kind, &[&k]).await
            })
            .await?;
        let seen = match row {
            Some(row) => {
                let record: String = row.try_get(0).map_err(|e| internal("kinds.record", &e))?;
                let rev: i64 = row.try_get(1).map_err(|e| internal("kinds.rev", &e))?;
                Seen::from_parts(kind, Some(&record), rev)?
            }
            None => Seen::initial(),
        };
        self.remember(kind, &seen);
        Ok(seen)
    }

    /// A conditional write of the record (`set_record` in `schema.rs`):
    /// the new revision, or `None` if the row was not at `expected` (or,
    /// with `unclaimed`, a live server claims the kind's rotation).
    ///
    /// # Errors
    /// `Unavailable` if the database cannot be reached.
    pub(super) async fn set(
        &self,
        kind: &str,
        expected: i64,
        record: &[u8],
        unclaimed: bool,
    ) -> Result<Option<i64>, BackendError> {
        let text = String::from_utf8_lossy(record).into_owned();
        let text = text.as_str();
        let row = self
            .pool
            .retry("write a kind's version", |c| async move {
                c.client
                    .query_one(&c.st.set_record, &[&kind, &expected, &text, &unclaimed])
                    .await
            })
            .await?;
        row.try_get(0).map_err(|e| internal("set_record", &e))
    }

    /// Waits while `kind` drains, until `deadline`: the record once it is
    /// normal again, or `None` if the deadline came first. An abandoned
    /// drain (past its deadline, nobody's live claim on it) is aborted here.
    ///
    /// # Errors
    /// `Unavailable` if the database cannot be reached.
    ///
    /// # Cancellation safety
    /// Safe: it only reads (and an abort is one conditional write).
    pub(super) async fn wait_normal(
        &self,
        kind: &Arc<str>,
        mut seen: Seen,
        deadline: Instant,
    ) -> Result<Option<Seen>, BackendError> {
        if seen.version.mode != KindMode::Normal && Instant::now() >= deadline {
            return Ok(None);
        }
        let mut changes = self.listener.subscribe(kind_topic(kind));
        // The record handed in may be the cache's: look at the row once
        // the subscription would catch a change after the look.
        if seen.version.mode != KindMode::Normal {
            seen = self.read(kind).await?;
        }
        loop {
            if seen.version.mode == KindMode::Normal {
                return Ok(Some(seen));
            }
            // The deadline first: a try-once never waits, even for a drain
            // that has just ended.
            if Instant::now() >= deadline {
                return Ok(None);
            }
            let abandoned_at = seen.version.drain_left().map(|left| Instant::now() + left);
            tokio::select! {
                biased;
                () = changes.changed() => {}
                () = tokio::time::sleep_until(deadline) => return Ok(None),
                () = sleep_until_opt(abandoned_at) => {
                    if self.abort_abandoned(kind, &seen).await? {
                        seen = self.read(kind).await?;
                        continue;
                    }
                    // Still claimed: its driver aborts it at the same
                    // deadline. Look again in a moment if it did not.
                    tokio::select! {
                        () = changes.changed() => {}
                        () = tokio::time::sleep_until(deadline) => return Ok(None),
                        () = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
                () = tokio::time::sleep(RECHECK) => {}
            }
            seen = self.read(kind).await?;
        }
    }

    /// Puts a drain nobody drives back to normal on its version: only if
    /// the record is still `seen` and no live server claims the rotation.
    /// Whether it did.
    async fn abort_abandoned(&self, kind: &Arc<str>, seen: &Seen) -> Result<bool, BackendError> {
        let normal = KindVersion::normal(seen.version.version.clone());
        let done = self
            .set(kind, seen.rev, &encode_version(&normal), true)
            .await?
            .is_some();
        if done {
            warn!(%kind, version = %normal.version, "drain deadline passed with no rotation driving it; aborted it");
        }
        Ok(done)
    }
}

/// A row that does not have the shape this version expects.
pub(super) fn internal(what: &str, e: &tokio_postgres::Error) -> BackendError {
    BackendError::Internal(format!("PostgreSQL answered an unexpected {what}: {e}"))
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
