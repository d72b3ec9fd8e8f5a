//! The Redis backend: one Redis instance, FIFO queues of contenders in
//! sorted sets, fencing tokens from one `INCR` counter, liveness from one
//! session key per Clastor server.
//!
//! ```text
//! {prefix}:token                        INCR counter: every contender's fencing token
//! {prefix}:session:{sid}                a Clastor server's session: value = its secret, PEXPIRE = TTL
//! {prefix}/{kind}/version               the kind's version record ("v1\nnormal"), as ZooKeeper and etcd store it
//! {prefix}/{kind}/rotation              a rotation's claim, naming its driver's session
//! {prefix}/{kind}/{version}             SET of the ids with contenders under that version (the drain's census)
//! {prefix}/{kind}/{version}/{id}        ZSET of contenders `{sid}:{n}` (readers `{sid}:{n}:r`), scored by their token: the first holds
//! ```
//!
//! Names come only from validated [`LockKey`](crate::key::LockKey) parts and
//! version names, none of which may contain `/`, so one `/`-separated name
//! is one lock (versions may not be called `version` or `rotation`). The
//! server's own keys use `:` after the prefix, so no kind can reach them.
//! Pub/sub channels carry the name of the key they are about: a lock's
//! queue (its head left), a version's index (a queue emptied: a drain
//! counts again), a kind's record (it changed).
//!
//! **Fencing token = `INCR {prefix}:token`**, taken inside the acquire
//! script as the contender is queued, so queue order is token order and a
//! later grant of a lock has a larger token — *while Redis keeps its data*.
//! A Redis restarted without persistence starts the counter at 0 again, and
//! a failover to a replica that had not received the last `INCR`s hands out
//! tokens already handed out: tokens are exactly as strong as Redis'
//! durability. For strong fencing run Redis with `appendonly yes` and
//! `appendfsync always` (every `INCR` on disk before it is answered), and no
//! failover to asynchronous replicas; with `appendfsync everysec` (Redis'
//! default when AOF is on) a crash may lose the last second of tokens, and
//! without persistence a restart loses them all — a downstream store that
//! remembers the highest token it saw then rejects the new, smaller tokens
//! (safe, but unavailable until the counter passes the old value), and
//! never accepts a stale holder's writes. Nothing here checks how Redis is
//! configured; the README's "Redis backend" says it to operators.
//!
//! **One round trip, uncontended**: one script (`scripts.rs`) checks that
//! the kind's record is the one this server last saw, checks this server's
//! session, takes the token, queues the contender, removes dead contenders
//! ahead of it, and says whether it is first. A rotation's mark changes the
//! record, so an acquire that raced it queues nothing (`rotation.rs`).
//! Release is one script: remove, and publish on the lock's channel if it
//! was first.
//!
//! **Waiting**: a waiter subscribes to its lock's channel, then looks once
//! (so a release between its acquire and its subscription is not missed),
//! then looks again on every message — and, as a safety net, when the
//! head's session key would expire (its `PTTL`, which Redis told it) and
//! at least once per TTL: a head whose server died wakes no one, and a
//! queue changed by hand publishes nothing.
//!
//! **Safe-until**: a session refreshed by a `PEXPIRE` sent at `s` and
//! answered cannot expire before `s + TTL` on Redis' clock (`session.rs`
//! has the margins); holders are told their locks are lost at 3/5 of the
//! TTL after the last answered refresh, and never promised more. A single
//! Redis has no replication safety: see the README's "Redis backend" for
//! what is and is not guaranteed (and why not RedLock).
//!
//! The files, from the bottom up (each imports only the ones above it):
//!
//! - `error.rs`: what a Redis error means, the bounded retry;
//! - `scripts.rs`: the Lua scripts;
//! - `session.rs`: this server's session key, its refreshes, contact,
//!   grants and their loss;
//! - `notify.rs`: one pub/sub connection per backend, channels multiplexed;
//! - `kinds.rs`: each kind's version record, its cache, waiting while it drains;
//! - `rotation.rs`: version rotation — claim, mark, drain, switch, clean up;
//! - `recipe.rs`: the [`Backend`](crate::backend::Backend) implementation.

mod error;
mod kinds;
mod notify;
mod recipe;
mod rotation;
mod scripts;
mod session;

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

pub use self::recipe::RedisGuard;

use self::kinds::Kinds;
use self::notify::Notify;
use self::scripts::Scripts;
use self::session::Sessions;
use crate::backend::BackendError;

/// How to reach Redis and where the locks live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// The Redis URL (`redis://host:port[/db]`, `redis://:password@host:port`).
    pub url: String,
    /// Prefix of every key Clastor writes (`clastor`), shared by every
    /// server of one deployment.
    pub prefix: String,
    /// TTL of this server's session key (10 s): a server that stops
    /// refreshing it (dead, frozen, cut off) has its contenders treated as
    /// gone that long after its last refresh. Holders are told their locks
    /// are lost after 3/5 of it without an answered refresh.
    pub session_ttl: Duration,
    /// How long to wait for Redis when connecting (5 s).
    pub connect_timeout: Duration,
}

impl Default for RedisConfig {
    fn default() -> RedisConfig {
        RedisConfig {
            url: "redis://127.0.0.1:6379".into(),
            prefix: "clastor".into(),
            session_ttl: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// Shortest session TTL accepted: its refreshes go out every tenth of it.
pub const MIN_SESSION_TTL: Duration = Duration::from_millis(200);

/// The Redis backend. Cheap to share behind an `Arc`; all methods take `&self`.
#[derive(Debug)]
pub struct RedisBackend {
    conn: Conn,
    keys: Arc<Keys>,
    scripts: Arc<Scripts>,
    sessions: Arc<Sessions>,
    notify: Arc<Notify>,
    kinds: Kinds,
}

impl RedisBackend {
    /// Connects to Redis, loads the scripts and opens this server's
    /// session, waiting at most `connect_timeout` in all.
    ///
    /// # Errors
    /// [`BackendError::Unavailable`] if Redis cannot be reached in time (the
    /// message names the URL); [`BackendError::Internal`] for a bad URL,
    /// prefix or TTL.
    pub async fn connect(cfg: RedisConfig) -> Result<RedisBackend, BackendError> {
        let keys = Arc::new(Keys::new(&cfg.prefix).map_err(BackendError::Internal)?);
        if cfg.session_ttl < MIN_SESSION_TTL {
            return Err(BackendError::Internal(format!(
                "the Redis session TTL must be at least {MIN_SESSION_TTL:?}"
            )));
        }
        let client = redis::Client::open(cfg.url.as_str())
            .map_err(|e| BackendError::Internal(format!("bad Redis URL {:?}: {e}", cfg.url)))?;
        let named = redacted(&cfg.url);
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(cfg.connect_timeout.min(error::REQUEST_TIMEOUT)))
            .set_response_timeout(Some(error::REQUEST_TIMEOUT))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let manager = tokio::time::timeout(
            cfg.connect_timeout,
            ConnectionManager::new_with_config(client.clone(), config),
        )
        .await
        .map_err(|_| {
            BackendError::Unavailable(format!(
                "Redis at {named} did not answer within {:?}",
                cfg.connect_timeout
            ))
        })?
        .map_err(|e| BackendError::Unavailable(format!("cannot connect to Redis at {named}: {e}")))?;
        let conn = Conn(manager);
        let scripts = Arc::new(Scripts::new());
        for script in scripts.all() {
            let mut c = conn.get();
            error::once("load a script", script.load_async(&mut c))
                .await
                .map_err(|e| BackendError::Unavailable(format!("Redis at {named}: {e}")))?;
        }
        let sessions = Sessions::start(conn.clone(), keys.clone(), scripts.clone(), cfg.session_ttl);
        if let Err(e) = sessions.wait_open(cfg.connect_timeout).await {
            sessions.shutdown().await;
            return Err(BackendError::Unavailable(format!("Redis at {named}: {e}")));
        }
        let notify = Notify::start(client);
        tracing::info!(redis = %named, prefix = %cfg.prefix, ttl = ?cfg.session_ttl, "connected to Redis");
        Ok(RedisBackend {
            kinds: Kinds::new(conn.clone(), keys.clone(), scripts.clone(), notify.clone()),
            conn,
            keys,
            scripts,
            sessions,
            notify,
        })
    }
}

/// The URL without a password, for messages and logs.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}://…@{}", &url[..scheme], &url[at + 1..]),
        _ => url.to_owned(),
    }
}

/// The multiplexed, reconnecting connection (cheap to clone: one pipelined
/// TCP connection underneath), with the `Debug` the house asks of every type.
#[derive(Clone)]
pub(super) struct Conn(ConnectionManager);

impl Conn {
    /// A handle to send requests on.
    pub(super) fn get(&self) -> ConnectionManager {
        self.0.clone()
    }
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Conn")
    }
}

/// Where things live in Redis (module docs).
#[derive(Debug)]
pub(super) struct Keys {
    prefix: String,
    session_prefix: String,
    token: String,
}

/// Name of the per-kind key holding the version record.
const VERSION_KEY: &str = "version";
/// Name of the per-kind key a rotation's driver holds (its claim).
const ROTATION_KEY: &str = "rotation";

impl Keys {
    fn new(prefix: &str) -> Result<Keys, String> {
        if prefix.is_empty() || prefix.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "bad Redis key prefix {prefix:?}: empty, or with spaces or control characters"
            ));
        }
        Ok(Keys {
            prefix: prefix.to_owned(),
            session_prefix: format!("{prefix}:session:"),
            token: format!("{prefix}:token"),
        })
    }

    /// `{prefix}:token`.
    pub(super) fn token(&self) -> &str {
        &self.token
    }

    /// `{prefix}:session:`: a session's key is this and its id.
    pub(super) fn session_prefix(&self) -> &str {
        &self.session_prefix
    }

    /// `{prefix}/{kind}/version`, also the channel its changes go out on.
    pub(super) fn record(&self, kind: &str) -> String {
        concat(&[&self.prefix, "/", kind, "/", VERSION_KEY])
    }

    /// `{prefix}/{kind}/rotation`.
    pub(super) fn claim(&self, kind: &str) -> String {
        format!("{}/{kind}/{ROTATION_KEY}", self.prefix)
    }

    /// `{prefix}/{kind}/{version}`: the ids with contenders, also the
    /// channel emptied queues are announced on.
    pub(super) fn index(&self, kind: &str, version: &str) -> String {
        concat(&[&self.prefix, "/", kind, "/", version])
    }

    /// `{prefix}/{kind}/{version}/`: the queue of id `x` is this and `x`.
    pub(super) fn queue_prefix(&self, kind: &str, version: &str) -> String {
        format!("{}/{kind}/{version}/", self.prefix)
    }

    /// `{prefix}/{kind}/{version}/{id}`: the lock's queue and its channel.
    pub(super) fn queue(&self, kind: &str, version: &str, id: &str) -> String {
        concat(&[&self.prefix, "/", kind, "/", version, "/", id])
    }
}

/// `parts` joined: the keys of every acquire are built this way, one
/// allocation of the right size, where `format!` costs several times more
/// (measured with callgrind on the acquire path).
pub(super) fn concat(parts: &[&str]) -> String {
    let mut s = String::with_capacity(parts.iter().map(|p| p.len()).sum());
    for p in parts {
        s.push_str(p);
    }
    s
}

/// The queue (a sorted set) of `(kind, id)` under `version`, for a backend
/// using `prefix`: what `redis-cli ZRANGE … 0 -1 WITHSCORES` shows.
pub fn queue_key(prefix: &str, kind: &str, version: &str, id: &str) -> String {
    format!("{prefix}/{kind}/{version}/{id}")
}

/// The Lua source of the two scripts an uncontended acquire and release
/// run, `(acquire, remove)`, with their arguments as `scripts.rs` lists
/// them: for measuring Clastor's Redis work without its server (`clastor
/// load --redis`, "Clastor's scripts alone").
pub fn lock_scripts() -> (String, String) {
    scripts::lock_sources()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() -> Result<(), String> {
        let k = Keys::new("clastor")?;
        assert_eq!(k.token(), "clastor:token");
        assert_eq!(k.session_prefix(), "clastor:session:");
        assert_eq!(k.record("tx"), "clastor/tx/version");
        assert_eq!(k.claim("tx"), "clastor/tx/rotation");
        assert_eq!(k.index("tx", "v1"), "clastor/tx/v1");
        assert_eq!(k.queue("tx", "v1", "a"), "clastor/tx/v1/a");
        assert_eq!(k.queue_prefix("tx", "v1"), "clastor/tx/v1/");
        assert_eq!(queue_key("clastor", "tx", "v1", "a"), "clastor/tx/v1/a");
        assert!(Keys::new("").is_err());
        assert!(Keys::new("a b").is_err());
        assert_eq!(redacted("redis://:secret@h:1/0"), "redis://…@h:1/0");
        assert_eq!(redacted("redis://h:1"), "redis://h:1");
        Ok(())
    }
}
