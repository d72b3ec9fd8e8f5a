//! The etcd v3 backend: locks as keys of etcd's `concurrency.Mutex` recipe,
//! fencing tokens from their create revision, a small pool of leases kept
//! alive.
//!
//! ```text
//! {prefix}/{kind}/version                        value: the kind's version record ("v1\nnormal")
//! {prefix}/{kind}/rotation                       a rotation's claim, on its driver's lease
//! {prefix}/{kind}/{version}/{id}/{lease:x}[_{n}] one contender: holder or waiter, on a pooled lease
//! ```
//!
//! **The recipe is etcd's own** (Go's `clientv3/concurrency.Mutex`, which
//! `etcdctl lock` uses): every contender puts a key under the lock's prefix
//! with its lease, the one with the lowest create revision holds, and a
//! waiter watches the deletion of the key created last before its own. So
//! `etcdctl lock {prefix}/{kind}/{version}/{id}` and a Go service's Mutex on
//! that name exclude Clastor holders, and the other way round. Keys are
//! named `{lease:x}` as Go names them, `{lease:x}_{n}` for a second
//! contender of one lock on one pooled lease (`names.rs`).
//!
//! **Fencing token = the key's create revision**: etcd's revision counter is
//! global to the cluster and never goes back, so a later grant of a lock —
//! by any server, after any restart, under any version — has a larger one.
//!
//! **One round trip, uncontended**: one transaction that checks the kind's
//! version record is still the one this server last saw (its mod revision),
//! puts the key and reads the lock's first contender. A rotation's mark
//! changes the record, so an acquire that raced it fails its compare and
//! creates nothing: the rotation race of the ZooKeeper recipe cannot happen
//! here at all (`rotation.rs`).
//!
//! **Safe-until**: a lease answered at send time `s` cannot expire before
//! `s + TTL` on the leader (`lease.rs` has the margins); holders are told
//! their locks are lost at 3/5 of the TTL after the last answered keepalive,
//! and never promised more.
//!
//! The files, from the bottom up (each imports only the ones above it):
//!
//! - `error.rs`: what an etcd error means, the bounded retry;
//! - `lease.rs`: the leases, their keepalives, contact, grants and losses;
//! - `watch.rs`: one watch stream per backend, multiplexed by watch id (the
//!   kinds' records, a rotation's drain);
//! - `deletions.rs`: one watch of every deletion under the prefix, routed
//!   to the waiters and holders of each lock;
//! - `names.rs`: our keys' names, reused once their keys are gone;
//! - `kinds.rs`: each kind's version record, its cache, waiting while it drains;
//! - `rotation.rs`: version rotation — claim, mark, drain, switch, clean up;
//! - `recipe.rs`: the [`Backend`](crate::backend::Backend) implementation.

mod deletions;
mod error;
mod kinds;
mod lease;
mod names;
mod recipe;
mod rotation;
mod watch;

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};

pub use self::recipe::EtcdGuard;

use self::deletions::Deletions;
use self::kinds::Kinds;
use self::lease::LeasePool;
use self::names::Names;
use self::watch::WatchHub;
use crate::backend::BackendError;

/// How to reach etcd and where the locks live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// Client endpoints (`host:port` or `http://host:port`), any members of
    /// one cluster.
    pub endpoints: Vec<String>,
    /// Key prefix of every key Clastor writes (`/clastor`), shared by every
    /// server of one deployment.
    pub prefix: String,
    /// Leases kept alive (2): every contender's key is put with one of them.
    pub leases: usize,
    /// Requested lease TTL (10 s); etcd may raise it to its minimum (1.5 ×
    /// its election timeout). Holders are told their locks are lost after
    /// 3/5 of it without an answered keepalive.
    pub lease_ttl: Duration,
    /// How long to wait for etcd when connecting (5 s).
    pub connect_timeout: Duration,
}

impl Default for EtcdConfig {
    fn default() -> EtcdConfig {
        EtcdConfig {
            endpoints: vec!["127.0.0.1:2379".into()],
            prefix: "/clastor".into(),
            leases: 2,
            lease_ttl: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// The etcd backend. Cheap to share behind an `Arc`; all methods take `&self`.
#[derive(Debug)]
pub struct EtcdBackend {
    client: EtcdClient,
    keys: Arc<Keys>,
    leases: Arc<LeasePool>,
    watches: Arc<WatchHub>,
    kinds: Kinds,
    names: Arc<Names>,
    deletions: Arc<Deletions>,
}

impl EtcdBackend {
    /// Connects to etcd and grants the pool's leases, waiting at most
    /// `connect_timeout` in all.
    ///
    /// # Errors
    /// [`BackendError::Unavailable`] if etcd cannot be reached in time (the
    /// message names the endpoints); [`BackendError::Internal`] for a bad
    /// prefix, no endpoints or no leases.
    pub async fn connect(cfg: EtcdConfig) -> Result<EtcdBackend, BackendError> {
        let keys = Arc::new(Keys::new(&cfg.prefix).map_err(BackendError::Internal)?);
        if cfg.endpoints.iter().all(|e| e.trim().is_empty()) {
            return Err(BackendError::Internal("no etcd endpoints given".into()));
        }
        if cfg.leases == 0 {
            return Err(BackendError::Internal("at least one etcd lease is needed".into()));
        }
        if cfg.lease_ttl < Duration::from_secs(1) {
            return Err(BackendError::Internal(
                "the etcd lease TTL must be at least 1 s (etcd counts it in seconds)".into(),
            ));
        }
        let endpoints: Vec<String> = cfg
            .endpoints
            .iter()
            .map(|e| e.trim())
            .filter(|e| !e.is_empty())
            .map(|e| {
                if e.contains("://") {
                    e.to_owned()
                } else {
                    format!("http://{e}")
                }
            })
            .collect();
        let named = endpoints.join(",");
        let options = ConnectOptions::new()
            .with_connect_timeout(cfg.connect_timeout)
            // A member cut off from its leader refuses instead of serving
            // stale reads or a watch that never fires.
            .with_require_leader(true)
            .with_keep_alive(cfg.lease_ttl / 10, cfg.lease_ttl / 5)
            .with_keep_alive_while_idle(true);
        let client = tokio::time::timeout(cfg.connect_timeout, Client::connect(&endpoints, Some(options)))
            .await
            .map_err(|_| {
                BackendError::Unavailable(format!(
                    "etcd at {named} did not answer within {:?}",
                    cfg.connect_timeout
                ))
            })?
            .map_err(|e| BackendError::Unavailable(format!("cannot connect to etcd at {named}: {e}")))?;
        let client = EtcdClient(Arc::new(client));
        let leases = LeasePool::start(client.clone(), cfg.leases, cfg.lease_ttl);
        if let Err(e) = leases.wait_all(cfg.connect_timeout).await {
            leases.shutdown().await;
            return Err(BackendError::Unavailable(format!("etcd at {named}: {e}")));
        }
        let watches = WatchHub::new(client.clone());
        let deletions = match Deletions::start(client.clone(), format!("{}/", keys.prefix)).await {
            Ok(d) => d,
            Err(e) => {
                leases.shutdown().await;
                return Err(BackendError::Unavailable(format!("etcd at {named}: {e}")));
            }
        };
        tracing::info!(endpoints = %named, prefix = %cfg.prefix, leases = cfg.leases, "connected to etcd");
        Ok(EtcdBackend {
            kinds: Kinds::new(client.clone(), keys.clone(), watches.clone()),
            client,
            keys,
            leases,
            watches,
            names: Arc::default(),
            deletions,
        })
    }
}

/// The gRPC client, shared: every held lock keeps one to delete its key,
/// and `etcd_client::Client` is several KiB (a client per service), which
/// each guard, and each future holding one, would otherwise carry.
/// With the `Debug` the house asks of every type.
#[derive(Clone)]
pub(super) struct EtcdClient(Arc<Client>);

impl EtcdClient {
    pub(super) fn kv_client(&self) -> etcd_client::KvClient {
        self.0.kv_client()
    }

    pub(super) fn lease_client(&self) -> etcd_client::LeaseClient {
        self.0.lease_client()
    }

    pub(super) fn watch_client(&self) -> etcd_client::WatchClient {
        self.0.watch_client()
    }
}

impl std::fmt::Debug for EtcdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EtcdClient")
    }
}

impl Drop for EtcdBackend {
    /// A backend dropped without [`Backend::shutdown`](crate::backend::Backend::shutdown)
    /// still stops its tasks: the leases are retired (their holders told)
    /// and revoked in the background, the watches end.
    fn drop(&mut self) {
        self.leases.close();
        self.deletions.shutdown();
    }
}

/// Where things live in etcd. Names come only from validated
/// [`LockKey`](crate::key::LockKey) parts and version names (no `/`, no NUL,
/// not `.`/`..`), so one name is one key segment and needs no encoding:
/// etcd keys are bytes.
#[derive(Debug)]
pub(super) struct Keys {
    prefix: String,
}

/// Name of the per-kind key holding the version record.
const VERSION_KEY: &str = "version";
/// Name of the per-kind key a rotation's driver holds (its claim).
const ROTATION_KEY: &str = "rotation";

impl Keys {
    fn new(prefix: &str) -> Result<Keys, String> {
        let prefix = prefix.trim_end_matches('/');
        if !prefix.starts_with('/') {
            return Err(format!("the etcd prefix must start with '/': {prefix:?}"));
        }
        if prefix.contains('\0') || prefix.split('/').skip(1).any(|s| s.is_empty() || s == "." || s == "..") {
            return Err(format!(
                "bad etcd prefix {prefix:?}: empty, '.' or '..' segments, or NUL"
            ));
        }
        Ok(Keys {
            prefix: prefix.to_owned(),
        })
    }

    /// `{prefix}/{kind}/`: everything of one kind.
    pub(super) fn kind_dir(&self, kind: &str) -> String {
        format!("{}/{kind}/", self.prefix)
    }

    /// `{prefix}/{kind}/version`.
    pub(super) fn version_key(&self, kind: &str) -> String {
        format!("{}/{kind}/{VERSION_KEY}", self.prefix)
    }

    /// `{prefix}/{kind}/rotation`.
    pub(super) fn rotation_key(&self, kind: &str) -> String {
        format!("{}/{kind}/{ROTATION_KEY}", self.prefix)
    }

    /// `{prefix}/{kind}/{version}/`: every lock of a kind under a version.
    pub(super) fn version_dir(&self, kind: &str, version: &str) -> String {
        format!("{}/{kind}/{version}/", self.prefix)
    }

    /// `{prefix}/{kind}/{version}/{id}/`: the lock's contenders (the name
    /// `etcdctl lock` takes is this without the last `/`).
    pub(super) fn lock_dir(&self, kind: &str, version: &str, id: &str) -> String {
        format!("{}/{kind}/{version}/{id}/", self.prefix)
    }
}

/// The lock name `etcdctl lock` (or Go's `concurrency.NewMutex`) takes to
/// contend with Clastor for `(kind, id)` under `version`, for a backend
/// using `prefix`.
pub fn mutex_name(prefix: &str, kind: &str, version: &str, id: &str) -> String {
    format!("{}/{kind}/{version}/{id}", prefix.trim_end_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() -> Result<(), String> {
        let k = Keys::new("/clastor/")?;
        assert_eq!(k.version_key("tx"), "/clastor/tx/version");
        assert_eq!(k.rotation_key("tx"), "/clastor/tx/rotation");
        assert_eq!(k.lock_dir("tx", "v1", "a"), "/clastor/tx/v1/a/");
        assert_eq!(k.version_dir("tx", "v1"), "/clastor/tx/v1/");
        assert_eq!(mutex_name("/clastor/", "tx", "v1", "a"), "/clastor/tx/v1/a");
        assert!(Keys::new("clastor").is_err());
        assert!(Keys::new("/a//b").is_err());
        assert!(Keys::new("/a/../b").is_err());
        Ok(())
    }
}
