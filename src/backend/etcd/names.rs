//! The names of our contender keys: `{lease:x}` as Go's `concurrency.Mutex`
//! names its key, and `{lease:x}_{n}` for a second contender of one lock on
//! one lease at once (two owners of this server waiting for one lock); a
//! shared (reader) contender's name ends in [`SHARED_SUFFIX`]. Go's Mutex
//! waits for every key before its own whatever the name, so it treats
//! readers as writers — safe; Clastor's readers skip the readers ahead.
//!
//! **Names are reused**, never minted per acquire. etcd keeps an index entry
//! for every key name ever written until a compaction, and a range read over
//! a lock's prefix — every acquire makes one — walks them all: with a fresh
//! name per acquire a hot lock's prefix grows by one entry per grant, and
//! every acquire gets slower until etcd compacts. With reused names it holds
//! a handful.
//!
//! **A name is free again only once its key is known to be gone** (deleted
//! and confirmed, or its lease retired, after which the lease names nothing
//! new): a delete still in flight could otherwise remove the next
//! contender's key of the same name.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// What ends a shared (reader) contender's key. No Go `concurrency.Mutex`
/// key (a hex lease id) ends so.
pub(super) const SHARED_SUFFIX: &str = ".shared";

/// Whether a contender key is a reader's.
pub(super) fn is_shared(key: &[u8]) -> bool {
    key.ends_with(SHARED_SUFFIX.as_bytes())
}

/// Names in use, per lease and lock prefix.
#[derive(Debug, Default)]
pub(super) struct Names {
    in_use: Mutex<HashMap<(i64, String), Vec<u32>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A name taken for one contender key; dropping it frees the name.
#[derive(Debug)]
pub(super) struct NameClaim {
    names: Arc<Names>,
    lease: i64,
    dir: String,
    n: u32,
    key: String,
}

impl NameClaim {
    /// The full key: `{dir}{lease:x}` or `{dir}{lease:x}_{n}`.
    pub(super) fn key(&self) -> &str {
        &self.key
    }
}

impl Drop for NameClaim {
    fn drop(&mut self) {
        let mut in_use = lock(&self.names.in_use);
        let slot = (self.lease, std::mem::take(&mut self.dir));
        if let Some(ns) = in_use.get_mut(&slot) {
            ns.retain(|&n| n != self.n);
            if ns.is_empty() {
                in_use.remove(&slot);
            }
        }
    }
}

impl Names {
    /// Takes the lowest free name for a contender of the lock at `dir`
    /// (ending in `/`) on `lease`, a reader's if `shared`.
    pub(super) fn take(self: &Arc<Self>, lease: i64, dir: &str, shared: bool) -> NameClaim {
        let n = {
            let mut in_use = lock(&self.in_use);
            let ns = in_use.entry((lease, dir.to_owned())).or_default();
            let n = (0..).find(|n| !ns.contains(n)).unwrap_or(u32::MAX);
            ns.push(n);
            n
        };
        let suffix = if shared { SHARED_SUFFIX } else { "" };
        let key = if n == 0 {
            format!("{dir}{lease:x}{suffix}")
        } else {
            format!("{dir}{lease:x}_{n}{suffix}")
        };
        NameClaim {
            names: self.clone(),
            lease,
            dir: dir.to_owned(),
            n,
            key,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_reused_only_once_free() {
        let names = Arc::new(Names::default());
        let a = names.take(0xab, "/c/k/v1/x/", false);
        assert_eq!(a.key(), "/c/k/v1/x/ab");
        let b = names.take(0xab, "/c/k/v1/x/", false);
        assert_eq!(b.key(), "/c/k/v1/x/ab_1");
        // Another lock, another lease: their own first names.
        assert_eq!(names.take(0xab, "/c/k/v1/y/", false).key(), "/c/k/v1/y/ab");
        assert_eq!(names.take(0xcd, "/c/k/v1/x/", false).key(), "/c/k/v1/x/cd");
        // A reader's name is marked, and never a writer's of the same lease.
        let r = names.take(0xab, "/c/k/v1/x/", true);
        assert_eq!(r.key(), "/c/k/v1/x/ab_2.shared");
        assert!(is_shared(r.key().as_bytes()) && !is_shared(b.key().as_bytes()));
        drop(r);
        drop(a);
        assert_eq!(names.take(0xab, "/c/k/v1/x/", false).key(), "/c/k/v1/x/ab");
        drop(b);
        assert!(lock(&names.in_use).is_empty());
    }
}
