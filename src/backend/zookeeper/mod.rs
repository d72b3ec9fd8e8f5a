//! The ZooKeeper backend: locks as Curator-compatible ephemeral-sequential
//! znodes, fencing tokens from their `czxid`, a small pool of shared sessions.
//!
//! - [`layout`]: paths and node names (Curator InterProcessMutex naming);
//! - [`pool`]: the session pool, health probing and lost-lock reporting;
//! - [`recipe`]: the pipelined acquire, predecessor waits and release.
//!
//! See DESIGN.md, "ZooKeeper backend", for the decisions behind it.

mod layout;
mod pool;
mod recipe;

use std::time::Duration;

pub use self::recipe::ZkGuard;

use self::layout::Layout;
use self::pool::{Pool, PoolConfig};
use self::recipe::Recipe;
use crate::backend::{AcquireRequest, Backend, BackendError, Grant, KindVersion};
use crate::key::LockKey;

/// How to reach ZooKeeper and where the locks live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZkConfig {
    /// Connect string, `host:port,host:port` (optionally with a chroot).
    pub hosts: String,
    /// Root of the lock tree (`/locks`).
    pub root: String,
    /// Provider segment under the root, shared by every server of one
    /// deployment (`zk-provider`).
    pub provider: String,
    /// Number of pooled ZooKeeper sessions (4).
    pub sessions: usize,
    /// Requested session timeout (10 s); the server may clamp it to its
    /// `minSessionTimeout`/`maxSessionTimeout`. Holders are told their locks
    /// are lost after 2/3 of it without an answer from ZooKeeper.
    pub session_timeout: Duration,
}

impl Default for ZkConfig {
    fn default() -> ZkConfig {
        ZkConfig {
            hosts: "127.0.0.1:2181".into(),
            root: "/locks".into(),
            provider: "zk-provider".into(),
            sessions: 4,
            session_timeout: Duration::from_secs(10),
        }
    }
}

/// The ZooKeeper backend. Cheap to share behind an `Arc`; all methods take `&self`.
#[derive(Debug)]
pub struct ZooKeeperBackend {
    recipe: Recipe,
}

impl ZooKeeperBackend {
    /// Connects every pooled session, waiting at most the session timeout
    /// (at least 2 s) for each.
    ///
    /// # Errors
    /// [`BackendError::Unavailable`] if ZooKeeper cannot be reached in time
    /// (the message names the hosts); [`BackendError::Internal`] for a bad
    /// root or provider.
    pub async fn connect(cfg: ZkConfig) -> Result<ZooKeeperBackend, BackendError> {
        let timeout = cfg.session_timeout.max(Duration::from_secs(2));
        ZooKeeperBackend::connect_with_timeout(cfg, timeout).await
    }

    /// As [`ZooKeeperBackend::connect`], with an explicit connect timeout.
    ///
    /// # Errors
    /// As [`ZooKeeperBackend::connect`].
    pub async fn connect_with_timeout(
        cfg: ZkConfig,
        connect_timeout: Duration,
    ) -> Result<ZooKeeperBackend, BackendError> {
        let layout = Layout::new(&cfg.root, &cfg.provider).map_err(BackendError::Internal)?;
        if cfg.hosts.trim().is_empty() {
            return Err(BackendError::Internal("no ZooKeeper hosts given".into()));
        }
        if cfg.session_timeout.is_zero() {
            return Err(BackendError::Internal(
                "ZooKeeper session timeout must be positive".into(),
            ));
        }
        let pool = Pool::start(PoolConfig {
            hosts: cfg.hosts.clone(),
            sessions: cfg.sessions.max(1),
            session_timeout: cfg.session_timeout,
            connect_timeout,
        })
        .await?;
        let recipe = Recipe::new(pool, layout);
        let session = recipe.pool.pick()?;
        if let Err(e) = recipe.ensure_base(&session).await {
            recipe.pool.shutdown().await;
            return Err(e);
        }
        tracing::info!(hosts = %cfg.hosts, base = recipe.layout.base(), "ZooKeeper backend ready");
        Ok(ZooKeeperBackend { recipe })
    }

    /// The lock directory (`{root}/{provider}/{kind}/{version}/{id}`) of
    /// `key` under the kind's current version: where Curator clients must
    /// point their InterProcessMutex to exclude Clastor clients.
    ///
    /// # Errors
    /// [`BackendError::Unavailable`] if ZooKeeper cannot be reached.
    pub async fn lock_path(&self, key: &LockKey) -> Result<String, BackendError> {
        self.recipe.lock_dir(key).await
    }

    /// `{root}/{provider}`.
    pub fn base_path(&self) -> &str {
        self.recipe.layout.base()
    }

    /// Path of a kind's version node.
    pub fn version_path(&self, kind: &str) -> String {
        self.recipe.layout.version_path(kind)
    }
}

impl Backend for ZooKeeperBackend {
    type Guard = ZkGuard;

    fn name(&self) -> &'static str {
        "zookeeper"
    }

    async fn acquire(&self, req: AcquireRequest<'_>) -> Result<Option<Grant<ZkGuard>>, BackendError> {
        self.recipe.acquire(req).await
    }

    async fn release(&self, guard: ZkGuard) -> Result<(), BackendError> {
        self.recipe.release(guard).await
    }

    async fn is_held(&self, key: &LockKey) -> Result<bool, BackendError> {
        self.recipe.is_held(key).await
    }

    async fn version(&self, kind: &str) -> Result<KindVersion, BackendError> {
        crate::key::validate_kind(kind).map_err(|e| BackendError::Internal(e.to_string()))?;
        self.recipe.version(kind).await
    }

    fn info(&self) -> Vec<(String, String)> {
        let mut info = self.recipe.pool.info();
        info.push(("zk.base".to_owned(), self.recipe.layout.base().to_owned()));
        info
    }

    async fn shutdown(&self) {
        self.recipe.pool.shutdown().await;
    }
}
