//! The PostgreSQL backend: locks as rows of a contenders table, FIFO by a
//! global sequence that is also the fencing token, held through a server
//! row kept alive by heartbeats on the database's clock.
//!
//! ```text
//! {schema}.servers     id, expires_at          one row per live Clastor server (session.rs)
//! {schema}.contenders  (server, tag) → seq, kind, version, id, owner, shared
//!                                              holder = the lock's live row with the lowest seq
//! {schema}.kinds       kind → record, rev      the version record (version_record.rs)
//! {schema}.rotations   kind → server, claim    a rotation's claim, on its driver's server row
//! {schema}.tokens      sequence                every token and every record revision
//! ```
//!
//! **Why rows and not advisory locks.** `pg_advisory_lock` is held by a
//! database connection: it vanishes with the connection without anyone
//! being told, gives no safe-until (nobody knows when the database will
//! notice a half-open connection), no FIFO, no fencing token and no
//! waiting across servers with a timeout. A row outlives connections, is
//! ordered by its `seq`, and is only passed over once its server's row has
//! expired by the database's clock — strictly after its holder was told.
//!
//! **Fencing token = the row's `seq`** (`nextval` of one sequence): larger
//! for every later grant of any lock, across servers, restarts and
//! versions. (A sequence is not rolled back, and never goes back on a
//! restart; it can on a failover to an asynchronous replica — README.)
//!
//! **One round trip, uncontended**: one prepared statement calling a
//! PL/pgSQL function that compares the kind's revision, inserts the row
//! and reads the lock's first live contender (`schema.rs` has the function
//! and the two advisory locks that make its answer exact, `recipe.rs` the
//! rest). Waiters wake on LISTEN/NOTIFY (`listen.rs`) and look again at
//! least every second.
//!
//! **Safe-until**: a heartbeat answered at send time `s` keeps our row
//! alive until at least `s + TTL` on the database's clock; holders are
//! told their locks are lost at 3/5 of the TTL after the last answered
//! heartbeat, and never promised more (`session.rs`).
//!
//! **What it does not give**: one PostgreSQL primary is a single point of
//! failure for every lock; a failover to an asynchronously replicated
//! standby can lose committed rows — a grant, or a release — and reissue
//! tokens (README, "PostgreSQL backend").
//!
//! The files, from the bottom up (each imports only the ones above it):
//!
//! - `schema.rs`: the DDL, the functions, the statements' SQL;
//! - `error.rs`: what an error means, the retry policy's bounds;
//! - `pool.rs`: connections, prepared statements, the pool and its bounded retry;
//! - `session.rs`: this server's row, heartbeats, grants and their loss, the reaper;
//! - `listen.rs`: LISTEN/NOTIFY, waking waiters;
//! - `kinds.rs`: each kind's version record, its cache, waiting while it drains;
//! - `rotation.rs`: version rotation — claim, mark, drain, switch, clean up;
//! - `recipe.rs`: the [`Backend`](crate::backend::Backend) implementation.

mod error;
mod kinds;
mod listen;
mod pool;
mod recipe;
mod rotation;
mod schema;
mod session;

use std::sync::Arc;
use std::time::Duration;

pub use self::recipe::PgGuard;
pub use self::schema::SESSION_SETTINGS;

use self::kinds::Kinds;
use self::listen::Listener;
use self::pool::{Pool, Target};
use self::schema::{INSTALL_LOCK, SCHEMA_VERSION, Schema};
use self::session::Sessions;
use crate::backend::BackendError;

/// How to reach PostgreSQL and where the locks live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgConfig {
    /// A libpq-style URL (`postgres://user:password@host:5432/db`) or
    /// key-value string (`host=… user=… dbname=…`). No TLS.
    pub url: String,
    /// The schema of Clastor's tables (`clastor`), created if absent and
    /// shared by every server of one deployment.
    pub schema: String,
    /// Pooled connections for lock statements (4); each pipelines what is
    /// sent to it. Heartbeats and LISTEN have a connection each besides.
    pub connections: usize,
    /// TTL of this server's row (10 s): another server may pass over its
    /// locks once the row has gone that long without a heartbeat. Holders
    /// are told their locks are lost after 3/5 of it without an answered
    /// heartbeat.
    pub ttl: Duration,
    /// How long to wait for PostgreSQL when connecting (5 s).
    pub connect_timeout: Duration,
}

impl Default for PgConfig {
    fn default() -> PgConfig {
        PgConfig {
            url: "postgres://postgres@127.0.0.1:5432/postgres".into(),
            schema: "clastor".into(),
            connections: 4,
            ttl: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// The PostgreSQL backend. Cheap to share behind an `Arc`; all methods take
/// `&self`.
#[derive(Debug)]
pub struct PostgresBackend {
    pool: Arc<Pool>,
    sessions: Arc<Sessions>,
    listener: Arc<Listener>,
    kinds: Kinds,
}

impl PostgresBackend {
    /// Connects, creates the schema if absent, opens the pool, listens for
    /// notifications and registers this server, waiting at most
    /// `connect_timeout` for each step.
    ///
    /// # Errors
    /// [`BackendError::Unavailable`] if PostgreSQL cannot be reached or
    /// refuses us (the message names the URL without its password);
    /// [`BackendError::Internal`] for a bad URL or schema name, a TTL under
    /// 100 ms, no connections, a database not in UTF-8, or a schema another
    /// version of Clastor made that this one cannot use.
    pub async fn connect(cfg: PgConfig) -> Result<PostgresBackend, BackendError> {
        let schema = Schema::new(&cfg.schema).map_err(BackendError::Internal)?;
        let shown = redact(&cfg.url);
        let mut config: tokio_postgres::Config = cfg
            .url
            .parse()
            .map_err(|e| BackendError::Internal(format!("bad PostgreSQL URL {shown}: {e}")))?;
        if cfg.connections == 0 {
            return Err(BackendError::Internal(
                "at least one PostgreSQL connection is needed".into(),
            ));
        }
        if cfg.ttl < Duration::from_millis(100) {
            return Err(BackendError::Internal(
                "the PostgreSQL server row TTL must be at least 100 ms".into(),
            ));
        }
        config
            .connect_timeout(cfg.connect_timeout)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10));
        if config.get_application_name().is_none() {
            config.application_name("clastor");
        }
        let target = Target {
            config,
            shown: shown.clone(),
            schema,
            connect_timeout: cfg.connect_timeout,
        };
        install(&target).await?;
        let pool = Arc::new(Pool::open(target.clone(), cfg.connections).await?);
        let listener = Listener::start(target).await?;
        let name = format!(
            "clastor {} pid {} on {}",
            env!("CARGO_PKG_VERSION"),
            std::process::id(),
            std::env::var("HOSTNAME").unwrap_or_default()
        );
        let sessions = Sessions::start(pool.clone(), cfg.ttl, name);
        if let Err(e) = sessions.wait_ready(cfg.connect_timeout).await {
            sessions.shutdown().await;
            listener.close();
            pool.close();
            return Err(BackendError::Unavailable(format!("PostgreSQL at {shown}: {e}")));
        }
        tracing::info!(db = %shown, schema = %cfg.schema, connections = cfg.connections, ttl = ?cfg.ttl, "connected to PostgreSQL");
        Ok(PostgresBackend {
            kinds: Kinds::new(pool.clone(), listener.clone()),
            pool,
            sessions,
            listener,
        })
    }
}

/// Creates the schema, its tables and functions if this version's are not
/// there: one transaction under an advisory lock, so servers starting at
/// once do not race their `CREATE … IF NOT EXISTS`.
async fn install(target: &Target) -> Result<(), BackendError> {
    let (mut client, connection) = pool::open(target).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let fail = |what: &str, e: tokio_postgres::Error| {
        let detail = e
            .as_db_error()
            .map_or_else(|| e.to_string(), |d| d.message().to_owned());
        if error::transient(&e) {
            BackendError::Unavailable(format!("PostgreSQL at {}: {what}: {detail}", target.shown))
        } else {
            BackendError::Internal(format!("PostgreSQL at {}: {what}: {detail}", target.shown))
        }
    };
    let work = async {
        let encoding = client
            .query_one("SHOW server_encoding", &[])
            .await
            .map_err(|e| fail("read the encoding", e))?;
        let encoding: String = encoding.try_get(0).map_err(|e| fail("read the encoding", e))?;
        if !encoding.eq_ignore_ascii_case("UTF8") {
            return Err(BackendError::Internal(format!(
                "PostgreSQL at {}: the database's encoding is {encoding}; Clastor needs UTF8 (lock names are Unicode)",
                target.shown
            )));
        }
        let tx = client
            .transaction()
            .await
            .map_err(|e| fail("begin the schema install", e))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&INSTALL_LOCK])
            .await
            .map_err(|e| fail("lock the schema install", e))?;
        tx.batch_execute(&target.schema.bootstrap())
            .await
            .map_err(|e| fail(&format!("create schema {}", target.schema.name), e))?;
        let installed: Option<String> = tx
            .query_opt(&target.schema.read_version(), &[])
            .await
            .map_err(|e| fail("read the schema version", e))?
            .map(|r| r.try_get(0))
            .transpose()
            .map_err(|e| fail("read the schema version", e))?;
        if installed.as_deref() != Some(SCHEMA_VERSION) {
            tx.batch_execute(&target.schema.ddl())
                .await
                .map_err(|e| fail(&format!("create Clastor's tables in schema {}", target.schema.name), e))?;
            tx.batch_execute(&target.schema.write_version())
                .await
                .map_err(|e| fail("record the schema version", e))?;
            tracing::info!(schema = %target.schema.name, version = SCHEMA_VERSION, "PostgreSQL schema installed");
        }
        tx.commit().await.map_err(|e| fail("commit the schema install", e))
    };
    match tokio::time::timeout(target.connect_timeout * 2, work).await {
        Ok(r) => r,
        Err(_) => Err(BackendError::Unavailable(format!(
            "PostgreSQL at {}: the schema install did not finish within {:?}",
            target.shown,
            target.connect_timeout * 2
        ))),
    }
}

/// The URL without its password, for messages and logs: `postgres://user:***@host/db`,
/// or `password=***` in the key-value form.
pub fn redact(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        // The userinfo ends at the last '@' before the first '/', '?' or '#'.
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        let authority = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:***@{hosts}"),
                None => format!("{userinfo}@{hosts}"),
            },
            None => authority.to_owned(),
        };
        // A password may also be a query parameter.
        let tail = tail
            .split('&')
            .map(|p| match p.split_once("password=") {
                Some((before, _)) => format!("{before}password=***"),
                None => p.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("&");
        return format!("{scheme}://{authority}{tail}");
    }
    url.split_whitespace()
        .map(|kv| {
            if kv.trim_start().starts_with("password=") {
                "password=***".to_owned()
            } else {
                kv.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A duration in whole milliseconds for progress messages.
fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_never_shown() {
        assert_eq!(redact("postgres://u:secret@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(redact("postgresql://u@h/db"), "postgresql://u@h/db");
        assert_eq!(
            redact("postgres://h/db?password=x&user=u"),
            "postgres://h/db?password=***&user=u"
        );
        assert_eq!(redact("postgres://u:p@ss@h/db"), "postgres://u:***@h/db");
        assert_eq!(
            redact("host=h user=u password=x dbname=d"),
            "host=h user=u password=*** dbname=d"
        );
        assert!(!redact("postgres://u:hunter2@h").contains("hunter2"));
    }
}
