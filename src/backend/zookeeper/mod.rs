//! The ZooKeeper backend: locks as Curator-compatible ephemeral-sequential
//! znodes, fencing tokens from their `czxid`, a small pool of shared sessions.
//!
//! The files, from the bottom up (each imports only the ones above it):
//!
//! - `error.rs`: what a ZooKeeper error means (retry, give up, look for the node);
//! - `layout.rs`: paths, node names (Curator InterProcessMutex naming) and node types;
//! - `session.rs`: one pooled session — health, last contact, grant registry,
//!   the one retry policy;
//! - `pool.rs`: the sessions, picking one, the liveness supervisor;
//! - `nodes.rs`: lock nodes being created or waited on, recovery by uuid, the guard;
//! - `kinds.rs`: each kind's version node, parents and caches, and the wait
//!   of an acquire while its kind drains;
//! - `drain.rs`: a rotation's watched count of what is left under a version;
//! - `rotation.rs`: version rotation — claim, drain, switch, clean up;
//! - `recipe.rs`: the [`Backend`](crate::backend::Backend) implementation —
//!   the pipelined acquire, predecessor waits, release, read paths.
//!
//! See DESIGN.md, "ZooKeeper backend", for the decisions behind it.

mod drain;
mod error;
mod kinds;
mod layout;
mod nodes;
mod pool;
mod recipe;
mod rotation;
mod round;
mod session;
mod turn;
mod views;
mod watches;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

pub use self::layout::segment as path_segment;
pub use self::nodes::ZkGuard;

use self::kinds::Kinds;
use self::layout::Layout;
use self::pool::{Pool, PoolConfig};
use crate::backend::BackendError;
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
    /// are lost after 3/5 of it without an answer from the ZooKeeper leader.
    pub session_timeout: Duration,
    /// Lock directories each session keeps a live view of (1024): a
    /// persistent recursive watch that lets a repeat acquire there skip the
    /// listing (`views.rs`). 0 lists on every acquire.
    pub watched_dirs: usize,
    /// A view no acquire has used for this long, and that no holder
    /// watches through, is dropped (60 s), so a directory used a few times
    /// and abandoned stops costing a watch and its events. Zero keeps views
    /// until they are evicted.
    pub view_idle: Duration,
    /// ZooKeeper digest credentials (`user:password`): every session
    /// authenticates with them, and every node Clastor creates gets an ACL
    /// giving them all permissions and anyone else only reading — so only
    /// holders of the credentials (other Clastor servers, or Curator and
    /// kazoo clients given them) can create or delete lock nodes or change a
    /// kind's version. `None` (the default): nodes open to anyone, as
    /// Curator's and kazoo's are by default.
    pub digest: Option<ZkDigest>,
}

/// ZooKeeper digest credentials, `user:password`. Its `Debug` shows the
/// user only: configs are logged.
#[derive(Clone, PartialEq, Eq)]
pub struct ZkDigest(String);

impl ZkDigest {
    /// Checks the `user:password` form (both parts non-empty, no line
    /// breaks).
    ///
    /// # Errors
    /// A message naming what is wrong, never the password.
    pub fn new(credentials: impl Into<String>) -> Result<ZkDigest, String> {
        let credentials = credentials.into();
        let credentials = credentials.trim_end_matches(['\r', '\n']).to_owned();
        match credentials.split_once(':') {
            Some((user, password))
                if !user.is_empty() && !password.is_empty() && !credentials.contains(['\r', '\n']) =>
            {
                Ok(ZkDigest(credentials))
            }
            _ => Err("ZooKeeper digest credentials must be one line of the form user:password".into()),
        }
    }

    /// The user name.
    pub fn user(&self) -> &str {
        self.0.split_once(':').map_or("", |(user, _)| user)
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for ZkDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ZkDigest({}:<redacted>)", self.user())
    }
}

impl Default for ZkConfig {
    fn default() -> ZkConfig {
        ZkConfig {
            hosts: "127.0.0.1:2181".into(),
            root: "/locks".into(),
            provider: "zk-provider".into(),
            sessions: 4,
            session_timeout: Duration::from_secs(10),
            watched_dirs: views::DEFAULT_WATCHED_DIRS,
            view_idle: views::DEFAULT_VIEW_IDLE,
            digest: None,
        }
    }
}

/// The ZooKeeper backend. Cheap to share behind an `Arc`; all methods take `&self`.
#[derive(Debug)]
pub struct ZooKeeperBackend {
    pool: Arc<Pool>,
    kinds: Kinds,
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
        let layout = Layout::new(&cfg.root, &cfg.provider)
            .map_err(BackendError::Internal)?
            .secured(cfg.digest.is_some());
        if cfg.hosts.trim().is_empty() {
            return Err(BackendError::Internal("no ZooKeeper hosts given".into()));
        }
        if cfg.sessions == 0 {
            return Err(BackendError::Internal(
                "at least one ZooKeeper session is needed".into(),
            ));
        }
        if cfg.session_timeout.is_zero() {
            return Err(BackendError::Internal(
                "ZooKeeper session timeout must be positive".into(),
            ));
        }
        let pool = Pool::start(PoolConfig {
            hosts: cfg.hosts.clone(),
            sessions: cfg.sessions,
            session_timeout: cfg.session_timeout,
            connect_timeout,
            watched_dirs: cfg.watched_dirs,
            view_idle: cfg.view_idle,
            digest: cfg.digest.clone(),
        })
        .await?;
        let kinds = Kinds::new(layout);
        let session = pool.pick()?;
        if let Err(e) = kinds.ensure_base(&session).await {
            pool.shutdown().await;
            return Err(e);
        }
        kinds.warn_if_open(&session).await;
        tracing::info!(hosts = %cfg.hosts, base = kinds.layout().base(), "ZooKeeper backend ready");
        Ok(ZooKeeperBackend { pool, kinds })
    }

    /// The lock directory (`{root}/{provider}/{kind}/{version}/{id}`) of
    /// `key` under the kind's current version: where Curator clients must
    /// point their InterProcessMutex to exclude Clastor clients.
    ///
    /// # Errors
    /// [`BackendError::Unavailable`] if ZooKeeper cannot be reached.
    pub async fn lock_path(&self, key: &LockKey) -> Result<String, BackendError> {
        let session = self.pool.pick()?;
        let v = self.kinds.read_version(&session, key.kind_arc()).await?;
        Ok(self.kinds.layout().lock_dir(key.kind(), &v.version, key.id()))
    }

    /// `{root}/{provider}`.
    pub fn base_path(&self) -> &str {
        self.kinds.layout().base()
    }

    /// Path of a kind's version node.
    pub fn version_path(&self, kind: &str) -> String {
        self.kinds.layout().version_path(kind)
    }
}
