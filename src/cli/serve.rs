//! `clastor serve`: run a server.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use clastor::backend::Backend;
use clastor::backend::etcd::{EtcdBackend, EtcdConfig};
use clastor::backend::memory::MemoryBackend;
use clastor::backend::postgres::{PgConfig, PostgresBackend};
use clastor::backend::redis::{RedisBackend, RedisConfig};
use clastor::backend::zookeeper::{ZkConfig, ZkDigest, ZooKeeperBackend};
use clastor::server::{self, AuthConfig, ServerConfig, TlsConfig};
use clastor::{Engine, EngineConfig};
use tracing::{error, info};
use tracing_subscriber::EnvFilter;

/// Which coordination backend holds the locks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum BackendKind {
    /// In this process only: for development, tests and a single server.
    Memory,
    /// An Apache ZooKeeper ensemble, shared by many Clastor servers.
    Zookeeper,
    /// An etcd v3 cluster, shared by many Clastor servers.
    Etcd,
    /// A PostgreSQL database (one primary), shared by many Clastor servers.
    Postgres,
    /// One Redis instance, shared by many Clastor servers (no replication safety: see
    /// the README's "Redis backend").
    Redis,
}

/// Run a Clastor server.
#[derive(Debug, Args)]
#[command(long_about = "Run a Clastor server.\n\n\
The server speaks the binary protocol (see protocol/PROTOCOL.md) and, on the same port, a \
line-based text form for debugging: `nc 127.0.0.1 7070`, then `HELP`.\n\n\
Every flag can also be set from the environment variable shown. Durations take units: \
`500ms`, `10s`, `2m`.\n\n\
The server refuses to start with limits that cannot work: --max-in-flight below \
--max-waits + 16, --max-frame outside 311..=16777215, --max-connections or --max-held of 0, \
--zk-sessions, --etcd-leases or --pg-connections of 0, a --redis-session-ttl below 200ms, a zero \
--handshake-timeout or --write-timeout.\n\n\
With --backend postgres, the server creates its tables in --pg-schema if they are absent and \
fails at startup, naming the database (never its password), if it cannot reach it. One \
PostgreSQL primary is a single point of failure, and a failover to an asynchronous replica can \
lose a grant: see the README, \"PostgreSQL backend\".\n\n\
With --backend redis, fencing tokens are only as strong as Redis' durability: run Redis with \
`appendonly yes` and `appendfsync always`, and never fail over to an asynchronous replica \
(README, \"Redis backend\").\n\n\
Examples:\n  clastor serve\n  clastor serve --listen 0.0.0.0:7070 --backend zookeeper --zk zk1:2181,zk2:2181,zk3:2181\n  \
clastor serve --backend etcd --etcd etcd1:2379,etcd2:2379,etcd3:2379\n  \
clastor serve --backend postgres --pg postgres://clastor:secret@db1:5432/locks\n  \
clastor serve --backend redis --redis redis://redis1:6379\n\n\
Logs go to stderr; set RUST_LOG (e.g. `RUST_LOG=clastor=debug`) for more or less.")]
pub(crate) struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "CLASTOR_LISTEN", default_value_t = ServerConfig::default().listen)]
    listen: SocketAddr,

    /// Coordination backend.
    #[arg(long, env = "CLASTOR_BACKEND", value_enum, default_value_t = BackendKind::Memory)]
    backend: BackendKind,

    /// ZooKeeper connect string (`host:port[,host:port...]`); required with `--backend zookeeper`.
    #[arg(long, env = "CLASTOR_ZK", value_name = "HOST:PORT[,...]")]
    zk: Option<String>,

    /// Root znode under which all lock data lives.
    #[arg(long, env = "CLASTOR_ZK_ROOT", default_value_t = ZkConfig::default().root)]
    zk_root: String,

    /// Provider name: the path segment after the root (`/locks/{provider}/...`).
    #[arg(long, env = "CLASTOR_PROVIDER", default_value_t = ZkConfig::default().provider)]
    provider: String,

    /// ZooKeeper sessions shared by all connections (at least 1).
    #[arg(long, env = "CLASTOR_ZK_SESSIONS", default_value_t = super::zk_sessions_default())]
    zk_sessions: NonZeroUsize,

    /// ZooKeeper session timeout; holders are told their locks are lost well inside it.
    #[arg(long, env = "CLASTOR_ZK_SESSION_TIMEOUT", default_value_t = ZkConfig::default().session_timeout.into())]
    zk_session_timeout: humantime::Duration,

    /// Lock directories each ZooKeeper session keeps a live view of (a persistent recursive
    /// watch), so a repeat acquire there costs one create and no listing; 0 turns views off.
    #[arg(long, env = "CLASTOR_ZK_WATCHED_DIRS", default_value_t = ZkConfig::default().watched_dirs)]
    zk_watched_dirs: usize,

    /// A directory view no acquire has used for this long, and no holder watches through, is
    /// dropped (its watch removed); 0 keeps views until evicted.
    #[arg(long, env = "CLASTOR_ZK_VIEW_IDLE", default_value_t = ZkConfig::default().view_idle.into())]
    zk_view_idle: humantime::Duration,

    /// A file holding ZooKeeper digest credentials, one line `user:password`. Every session
    /// authenticates with them and every node Clastor creates gets an ACL giving them all
    /// permissions and anyone else reading only, so nobody without them can delete a lock
    /// node. Curator and kazoo clients sharing the locks need the same credentials. Nodes made
    /// before are left as they are (set their ACLs with zkCli's setAcl). Default: open nodes.
    #[arg(long, env = "CLASTOR_ZK_DIGEST_FILE", value_name = "PATH")]
    zk_digest_file: Option<std::path::PathBuf>,

    /// etcd client endpoints (`host:port[,host:port...]`, or `http://host:port`); required
    /// with `--backend etcd`.
    #[arg(long, env = "CLASTOR_ETCD", value_name = "HOST:PORT[,...]")]
    etcd: Option<String>,

    /// Key prefix of every key Clastor writes in etcd (`{prefix}/{kind}/{version}/{id}/...`).
    #[arg(long, env = "CLASTOR_ETCD_PREFIX", default_value_t = EtcdConfig::default().prefix)]
    etcd_prefix: String,

    /// etcd leases kept alive; every lock key is put with one of them (at least 1).
    #[arg(long, env = "CLASTOR_ETCD_LEASES", default_value_t = NonZeroUsize::new(EtcdConfig::default().leases).unwrap_or(NonZeroUsize::MIN))]
    etcd_leases: NonZeroUsize,

    /// etcd lease TTL (whole seconds, at least 1 s); holders are told their locks are lost at
    /// 3/5 of it without an answered keepalive.
    #[arg(long, env = "CLASTOR_ETCD_LEASE_TTL", default_value_t = EtcdConfig::default().lease_ttl.into())]
    etcd_lease_ttl: humantime::Duration,

    /// PostgreSQL URL (`postgres://user:password@host:5432/db`, or `host=... user=...`; no TLS);
    /// required with `--backend postgres`.
    #[arg(long, env = "CLASTOR_PG", value_name = "URL")]
    pg: Option<String>,

    /// Schema of Clastor's tables in PostgreSQL, created if absent; every server of one deployment
    /// uses the same.
    #[arg(long, env = "CLASTOR_PG_SCHEMA", default_value_t = PgConfig::default().schema)]
    pg_schema: String,

    /// Pooled PostgreSQL connections for lock statements (at least 1); heartbeats and LISTEN use
    /// one more each.
    #[arg(long, env = "CLASTOR_PG_CONNECTIONS", default_value_t = NonZeroUsize::new(PgConfig::default().connections).unwrap_or(NonZeroUsize::MIN))]
    pg_connections: NonZeroUsize,

    /// TTL of this server's row in PostgreSQL (at least 100ms): other servers pass over its locks
    /// once it has gone that long without a heartbeat; its holders are told their locks are lost
    /// at 3/5 of it without an answered heartbeat.
    #[arg(long, env = "CLASTOR_PG_TTL", default_value_t = PgConfig::default().ttl.into())]
    pg_ttl: humantime::Duration,

    /// Redis URL (`redis://HOST:PORT[/DB]`, `redis://:PASSWORD@HOST:PORT`); required with
    /// `--backend redis`. One Redis instance (not a cluster, not Sentinel).
    #[arg(long, env = "CLASTOR_REDIS", value_name = "redis://HOST:PORT")]
    redis: Option<String>,

    /// Prefix of every key Clastor writes in Redis (`{prefix}/{kind}/{version}/{id}`,
    /// `{prefix}:token`, `{prefix}:session:{id}`).
    #[arg(long, env = "CLASTOR_REDIS_PREFIX", default_value_t = RedisConfig::default().prefix)]
    redis_prefix: String,

    /// TTL of this server's session key in Redis (at least 200ms), refreshed every tenth of
    /// it; holders are told their locks are lost at 3/5 of it without an answered refresh, and
    /// a dead server's locks go to others once it has run out.
    #[arg(long, env = "CLASTOR_REDIS_SESSION_TTL", default_value_t = RedisConfig::default().session_ttl.into())]
    redis_session_ttl: humantime::Duration,

    /// Connections served at once; more are refused with LIMIT_EXCEEDED (at least 1).
    #[arg(long, env = "CLASTOR_MAX_CONNECTIONS", default_value_t = ServerConfig::default().max_connections)]
    max_connections: usize,

    /// Requests processed concurrently per connection (more wait in TCP buffers); at least
    /// --max-waits + 16, so a connection whose waits are all taken can still be read.
    #[arg(long, env = "CLASTOR_MAX_IN_FLIGHT", default_value_t = ServerConfig::default().max_in_flight)]
    max_in_flight: usize,

    /// Locks one connection may hold at once, waits included (at least 1).
    #[arg(long, env = "CLASTOR_MAX_HELD", default_value_t = EngineConfig::default().max_held_per_session)]
    max_held: usize,

    /// Acquires one connection may have waiting at once; at most --max-in-flight - 16. An acquire
    /// past it is still granted if the lock is free, and refused only if it would wait.
    #[arg(long, env = "CLASTOR_MAX_WAITS", default_value_t = EngineConfig::default().max_waits_per_session)]
    max_waits: usize,

    /// Largest frame accepted from a client, in bytes (between 311 and 16777215).
    #[arg(long, env = "CLASTOR_MAX_FRAME", default_value_t = ServerConfig::default().max_frame_len)]
    max_frame: usize,

    /// Time a new connection has to send its first byte and complete HELLO (more than 0).
    #[arg(long, env = "CLASTOR_HANDSHAKE_TIMEOUT", default_value_t = ServerConfig::default().handshake_timeout.into())]
    handshake_timeout: humantime::Duration,

    /// Close connections that hold no lock and sent nothing for this long (0 = never).
    #[arg(long, env = "CLASTOR_IDLE_TIMEOUT", default_value_t = or_zero(ServerConfig::default().idle_timeout))]
    idle_timeout: humantime::Duration,

    /// A client that stops reading while the server has replies for it is dropped (and its
    /// locks released) once a write has blocked this long (more than 0). It also bounds every
    /// safe-until the server promises (safe_ms).
    #[arg(long, env = "CLASTOR_WRITE_TIMEOUT", default_value_t = ServerConfig::default().write_timeout.into())]
    write_timeout: humantime::Duration,

    /// TCP keepalive idle time: a client whose host vanished is dropped (and its
    /// locks released) after about twice this (0 = off).
    #[arg(long, env = "CLASTOR_TCP_KEEPALIVE", default_value_t = or_zero(ServerConfig::default().tcp_keepalive))]
    tcp_keepalive: humantime::Duration,

    /// On SIGINT/SIGTERM, how long connections get to release their locks.
    #[arg(long, env = "CLASTOR_SHUTDOWN_GRACE", default_value_t = ServerConfig::default().shutdown_grace.into())]
    shutdown_grace: humantime::Duration,

    /// Serve the operators' HTTP port on this address: Prometheus metrics (/metrics), health
    /// checks (/healthz, /readyz), the REST API (/api/v1/...) and the live status page (/).
    /// Off unless given.
    #[cfg(feature = "http")]
    #[arg(long, env = "CLASTOR_HTTP", value_name = "ADDR")]
    http: Option<SocketAddr>,

    /// Lease of a lock taken over HTTP that asks for none (HTTP locks always have one).
    #[cfg(feature = "http")]
    #[arg(long, env = "CLASTOR_HTTP_DEFAULT_LEASE", default_value_t = http_defaults().default_lease.into())]
    http_default_lease: humantime::Duration,

    /// HTTP connections served at once; more are closed at once.
    #[cfg(feature = "http")]
    #[arg(long, env = "CLASTOR_HTTP_MAX_CONNECTIONS", default_value_t = http_defaults().max_connections)]
    http_max_connections: usize,

    /// HTTP lock requests (acquires, rotations) in progress at once; more get 429 at once.
    /// Below --http-max-connections, so health checks and metrics keep connections of their own.
    /// Default: three quarters of --http-max-connections (192 of 256).
    #[cfg(feature = "http")]
    #[arg(long, env = "CLASTOR_HTTP_MAX_LOCK_REQUESTS", value_name = "N")]
    http_max_lock_requests: Option<usize>,

    /// UNSAFE compatibility switch: honour a release on the original Clastor's path
    /// (/api/v1/locks/{resource}/release?resourceId=) that names no token. Anyone who can
    /// reach the HTTP port can then release anyone's HTTP lock.
    #[cfg(feature = "http")]
    #[arg(long, env = "CLASTOR_HTTP_COMPAT_TOKENLESS_RELEASE", default_value_t = http_defaults().compat_tokenless_release)]
    http_compat_tokenless_release: bool,

    /// Require clients to authenticate, on every port: a TOML file of principals, the SHA-256
    /// digests of their tokens (`clastor auth hash-token`), their mTLS certificate names, and
    /// their per-kind grants (acquire, shared, read, rotate, admin; README, "Security").
    /// Reloaded on SIGHUP; a file that does not load is refused and the one in force kept.
    /// Off unless given: anyone who can reach the ports may take, block or rotate any lock.
    #[arg(long, env = "CLASTOR_AUTH_FILE", value_name = "PATH")]
    auth_file: Option<PathBuf>,

    /// Failed AUTHs a connection gets before the server closes it.
    #[arg(long, env = "CLASTOR_AUTH_MAX_FAILURES", default_value_t = AuthConfig::new("").max_failures,
          value_parser = clap::value_parser!(u32).range(1..))]
    auth_max_failures: u32,

    /// Speak TLS only, on every port (TCP, HTTP, gRPC), with this certificate chain (PEM, leaf first).
    /// Needs --tls-key.
    #[arg(long, env = "CLASTOR_TLS_CERT", value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,

    /// The private key (PEM: PKCS#8, PKCS#1 or SEC1) of --tls-cert.
    #[arg(long, env = "CLASTOR_TLS_KEY", value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,

    /// Require every client, on every port, to present a certificate signed by a CA in this
    /// PEM file (mTLS). The certificate's subject CN (else its first DNS name) is the name of
    /// the principal with that `cert` in --auth-file. Needs --tls-cert.
    #[arg(long, env = "CLASTOR_TLS_CLIENT_CA", value_name = "PEM", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,

    /// With --auth-file, serve /metrics without credentials (a scraper on a trusted network).
    /// Off: /metrics needs a principal with the admin permission.
    #[cfg(feature = "http")]
    #[arg(long, env = "CLASTOR_METRICS_PUBLIC")]
    metrics_public: bool,
    /// Serve the gRPC API (proto/clastor/v1/lock.proto: a streaming Session that owns locks
    /// like a connection, and unary calls on sessions from OpenSession) on this address:
    /// HTTP/2, TLS only with --tls-cert, bearer tokens or client certificates with
    /// --auth-file (as the other ports). Off unless given.
    #[arg(long, env = "CLASTOR_GRPC_LISTEN", value_name = "ADDR")]
    grpc_listen: Option<SocketAddr>,

    /// gRPC sessions open at once (streams and OpenSession sessions); more get RESOURCE_EXHAUSTED.
    #[arg(long, env = "CLASTOR_GRPC_MAX_SESSIONS", default_value_t = grpc_defaults().max_sessions)]
    grpc_max_sessions: usize,

    /// gRPC connections served at once; more are closed at once.
    #[arg(long, env = "CLASTOR_GRPC_MAX_CONNECTIONS", default_value_t = grpc_defaults().max_connections)]
    grpc_max_connections: usize,

    /// A unary gRPC session (OpenSession) that no call names for this long is closed and its
    /// locks released. Also bounds its safe_ms.
    #[arg(long, env = "CLASTOR_GRPC_IDLE_EXPIRY", default_value_t = grpc_defaults().idle_expiry.into())]
    grpc_idle_expiry: humantime::Duration,

    /// Largest gRPC message accepted or sent, in bytes.
    #[arg(long, env = "CLASTOR_GRPC_MAX_MESSAGE", default_value_t = grpc_defaults().max_message)]
    grpc_max_message: usize,

    /// Log format on stderr: `text` for people, `json` (one object per line) for log pipelines.
    #[arg(long, env = "CLASTOR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    /// Threads serving connections [default: the CPUs this process may use, cgroup quota
    /// included]. Set it lower to leave cores to other work on a shared host (a ZooKeeper
    /// server beside this one).
    #[arg(long, env = "CLASTOR_WORKER_THREADS", value_name = "N")]
    worker_threads: Option<NonZeroUsize>,
}

/// How the server writes its logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, with the fields of the enclosing spans
    /// (connection, trace_id).
    Json,
}

/// The HTTP port's defaults (for the flags' defaults: one source).
#[cfg(feature = "http")]
fn http_defaults() -> clastor::server::HttpConfig {
    clastor::server::HttpConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)))
}

/// The gRPC port's defaults (for the flags' defaults: one source).
fn grpc_defaults() -> clastor::server::GrpcConfig {
    clastor::server::GrpcConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)))
}

/// A duration that may be off, as a flag value: 0 for off.
fn or_zero(d: Option<Duration>) -> humantime::Duration {
    d.unwrap_or_default().into()
}

/// A flag value of 0 turns the setting off.
fn zero_is_off(d: humantime::Duration) -> Option<Duration> {
    Some(*d).filter(|d| !d.is_zero())
}

/// Runs the server until SIGINT or SIGTERM.
pub(crate) fn run(args: ServeArgs) -> ExitCode {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour codes only for a person at a terminal, not in a log file or pipeline.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => logs.init(),
        // Span fields (trace_id, connection) go on every line, flattened in `spans`.
        LogFormat::Json => logs.json().with_current_span(true).with_span_list(true).init(),
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.worker_threads {
        builder.worker_threads(n.get());
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    info!(worker_threads = runtime.metrics().num_workers(), "runtime started");
    match runtime.block_on(serve(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("clastor serve: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let (engine_config, server_config) = configs(&args);
    // Before connecting to ZooKeeper; `server::spawn` checks the same again.
    server_config.validate(&engine_config)?;
    match args.backend {
        BackendKind::Memory => run_with(MemoryBackend::new(), engine_config, server_config).await,
        BackendKind::Zookeeper => {
            let backend = zookeeper(&args).await?;
            run_with(backend, engine_config, server_config).await
        }
        BackendKind::Etcd => {
            let backend = etcd(&args).await?;
            run_with(backend, engine_config, server_config).await
        }
        BackendKind::Postgres => {
            let backend = postgres(&args).await?;
            run_with(backend, engine_config, server_config).await
        }
        BackendKind::Redis => {
            let backend = redis(&args).await?;
            run_with(backend, engine_config, server_config).await
        }
    }
}

/// The engine's and the server's settings the flags give.
fn configs(args: &ServeArgs) -> (EngineConfig, ServerConfig) {
    let engine_config = EngineConfig {
        max_held_per_session: args.max_held,
        max_waits_per_session: args.max_waits,
        ..EngineConfig::default()
    };
    let server_config = ServerConfig {
        listen: args.listen,
        max_connections: args.max_connections,
        max_in_flight: args.max_in_flight,
        max_frame_len: args.max_frame,
        handshake_timeout: *args.handshake_timeout,
        idle_timeout: zero_is_off(args.idle_timeout),
        write_timeout: *args.write_timeout,
        shutdown_grace: *args.shutdown_grace,
        tcp_keepalive: zero_is_off(args.tcp_keepalive),
        #[cfg(feature = "http")]
        http: args.http.map(|listen| clastor::server::HttpConfig {
            default_lease: *args.http_default_lease,
            max_connections: args.http_max_connections,
            max_lock_requests: args
                .http_max_lock_requests
                .unwrap_or_else(|| clastor::server::HttpConfig::lock_requests_for(args.http_max_connections)),
            compat_tokenless_release: args.http_compat_tokenless_release,
            metrics_public: args.metrics_public,
            ..clastor::server::HttpConfig::new(listen)
        }),
        auth: args.auth_file.as_ref().map(|file| AuthConfig {
            max_failures: args.auth_max_failures,
            ..AuthConfig::new(file)
        }),
        tls: args
            .tls_cert
            .as_ref()
            .zip(args.tls_key.as_ref())
            .map(|(cert, key)| TlsConfig {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: args.tls_client_ca.clone(),
            }),
        grpc: args.grpc_listen.map(|listen| clastor::server::GrpcConfig {
            max_sessions: args.grpc_max_sessions,
            max_connections: args.grpc_max_connections,
            idle_expiry: *args.grpc_idle_expiry,
            max_message: args.grpc_max_message,
            ..clastor::server::GrpcConfig::new(listen)
        }),
    };
    (engine_config, server_config)
}

async fn zookeeper(args: &ServeArgs) -> anyhow::Result<ZooKeeperBackend> {
    let hosts = args
        .zk
        .clone()
        .context("--backend zookeeper needs --zk HOST:PORT[,HOST:PORT...] (or CLASTOR_ZK)")?;
    let config = ZkConfig {
        hosts: hosts.clone(),
        root: args.zk_root.clone(),
        provider: args.provider.clone(),
        sessions: args.zk_sessions.get(),
        session_timeout: *args.zk_session_timeout,
        watched_dirs: args.zk_watched_dirs,
        view_idle: *args.zk_view_idle,
        digest: match &args.zk_digest_file {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read --zk-digest-file {}", path.display()))?;
                Some(ZkDigest::new(text).map_err(|e| anyhow::anyhow!("--zk-digest-file {}: {e}", path.display()))?)
            }
        },
    };
    info!(
        zk = %hosts,
        sessions = config.sessions,
        acl_user = config.digest.as_ref().map(ZkDigest::user),
        "connecting to ZooKeeper"
    );
    ZooKeeperBackend::connect(config)
        .await
        .with_context(|| format!("cannot use ZooKeeper at {hosts}"))
}

async fn etcd(args: &ServeArgs) -> anyhow::Result<EtcdBackend> {
    let endpoints = args
        .etcd
        .clone()
        .context("--backend etcd needs --etcd HOST:PORT[,HOST:PORT...] (or CLASTOR_ETCD)")?;
    let config = EtcdConfig {
        endpoints: endpoints.split(',').map(str::to_owned).collect(),
        prefix: args.etcd_prefix.clone(),
        leases: args.etcd_leases.get(),
        lease_ttl: *args.etcd_lease_ttl,
        ..EtcdConfig::default()
    };
    info!(etcd = %endpoints, leases = config.leases, "connecting to etcd");
    EtcdBackend::connect(config)
        .await
        .with_context(|| format!("cannot use etcd at {endpoints}"))
}

async fn postgres(args: &ServeArgs) -> anyhow::Result<PostgresBackend> {
    let url = args
        .pg
        .clone()
        .context("--backend postgres needs --pg URL (or CLASTOR_PG)")?;
    let shown = clastor::backend::postgres::redact(&url);
    let config = PgConfig {
        url,
        schema: args.pg_schema.clone(),
        connections: args.pg_connections.get(),
        ttl: *args.pg_ttl,
        ..PgConfig::default()
    };
    info!(pg = %shown, schema = %config.schema, connections = config.connections, "connecting to PostgreSQL");
    PostgresBackend::connect(config)
        .await
        .with_context(|| format!("cannot use PostgreSQL at {shown}"))
}

async fn redis(args: &ServeArgs) -> anyhow::Result<RedisBackend> {
    let url = args
        .redis
        .clone()
        .context("--backend redis needs --redis redis://HOST:PORT (or CLASTOR_REDIS)")?;
    let config = RedisConfig {
        url,
        prefix: args.redis_prefix.clone(),
        session_ttl: *args.redis_session_ttl,
        ..RedisConfig::default()
    };
    info!(prefix = %config.prefix, ttl = ?config.session_ttl, "connecting to Redis");
    RedisBackend::connect(config)
        .await
        .context("cannot use Redis (see --redis)")
}

async fn run_with<B: Backend>(backend: B, engine_config: EngineConfig, config: ServerConfig) -> anyhow::Result<()> {
    let listen = config.listen;
    let engine = Engine::new(backend, engine_config);
    let handle = server::spawn(engine, config)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let token = handle.shutdown_token();
    tokio::spawn(async move {
        shutdown_signal().await;
        info!("signal received; shutting down gracefully");
        token.cancel();
    });
    #[cfg(unix)]
    if let Some(reloader) = handle.auth_reloader() {
        let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("cannot listen for SIGHUP (auth file reloads)")?;
        tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                match reloader.reload() {
                    Ok(principals) => info!(principals, "SIGHUP: auth file reloaded"),
                    Err(e) => error!(error = %e, "SIGHUP: auth file not reloaded; the one in force stays"),
                }
            }
        });
    }
    handle.wait().await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

#[cfg(test)]
mod tests {
    use clap::{Args as _, Command};
    use clastor::server::IN_FLIGHT_HEADROOM;
    use clastor_protocol::{MAX_FRAME_LEN_CEILING, MIN_FRAME_LEN};

    use super::{ServeArgs, configs};

    fn parse(args: &[&str]) -> ServeArgs {
        use clap::FromArgMatches as _;
        let cmd = ServeArgs::augment_args(Command::new("serve"));
        let matches = cmd
            .try_get_matches_from(std::iter::once("serve").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"));
        ServeArgs::from_arg_matches(&matches).unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    /// `--write-timeout` (`CLASTOR_WRITE_TIMEOUT`) reaches the server's
    /// settings, defaults to `ServerConfig`'s, and bounds the promises the
    /// server makes (`safe_horizon`); 0 is refused, not taken for "none".
    #[test]
    fn the_write_timeout_flag_sets_the_write_timeout_and_the_horizon() {
        use std::time::Duration;

        use clastor::server::ServerConfig;

        let (_, default) = configs(&parse(&[]));
        assert_eq!(default.write_timeout, ServerConfig::default().write_timeout);
        let flags = [
            "--write-timeout",
            "2m",
            "--tcp-keepalive",
            "0",
            "--shutdown-grace",
            "5m",
        ];
        let (engine, set) = configs(&parse(&flags));
        assert_eq!(set.write_timeout, Duration::from_secs(120));
        assert_eq!(set.safe_horizon(), Some(Duration::from_secs(120)));
        assert_eq!(set.validate(&engine), Ok(()));
        let (engine, zero) = configs(&parse(&["--write-timeout", "0"]));
        assert!(zero.validate(&engine).is_err(), "a zero write timeout was accepted");
        let cmd = ServeArgs::augment_args(Command::new("serve"));
        let arg = cmd.get_arguments().find(|a| a.get_id() == "write_timeout");
        assert_eq!(
            arg.and_then(|a| a.get_env()),
            Some(std::ffi::OsStr::new("CLASTOR_WRITE_TIMEOUT"))
        );
    }

    /// Lowering `--http-max-connections` alone keeps a valid configuration:
    /// the lock-request limit follows it unless set.
    #[cfg(feature = "http")]
    #[test]
    fn the_http_lock_request_limit_follows_the_connection_limit() {
        let http = |flags: &[&str]| {
            let (engine, config) = configs(&parse(flags));
            assert_eq!(config.validate(&engine), Ok(()), "{flags:?}");
            config.http.map(|h| (h.max_connections, h.max_lock_requests))
        };
        assert_eq!(http(&["--http", "127.0.0.1:0"]), Some((256, 192)));
        assert_eq!(
            http(&["--http", "127.0.0.1:0", "--http-max-connections", "100"]),
            Some((100, 75))
        );
        assert_eq!(
            http(&["--http", "127.0.0.1:0", "--http-max-lock-requests", "10"]),
            Some((256, 10))
        );
    }

    /// `--backend redis` takes its URL, prefix and session TTL from the
    /// flags, and the help warns that tokens are as durable as Redis.
    #[test]
    fn the_redis_flags_reach_the_backend_and_the_help_states_the_durability() {
        use std::time::Duration;

        let args = parse(&[
            "--backend",
            "redis",
            "--redis",
            "redis://h:6390",
            "--redis-prefix",
            "p",
            "--redis-session-ttl",
            "3s",
        ]);
        assert_eq!(args.backend, super::BackendKind::Redis);
        assert_eq!(args.redis.as_deref(), Some("redis://h:6390"));
        assert_eq!(args.redis_prefix, "p");
        assert_eq!(*args.redis_session_ttl, Duration::from_secs(3));
        let defaults = parse(&[]);
        assert_eq!(
            defaults.redis_prefix,
            clastor::backend::redis::RedisConfig::default().prefix
        );
        let mut cmd = ServeArgs::augment_args(Command::new("serve"));
        let help = cmd.render_long_help().to_string();
        assert!(help.contains("appendfsync always"), "{help}");
        assert!(help.contains("--backend redis --redis redis://"), "{help}");
    }

    /// The help states the rules `ServerConfig::validate` enforces, with the
    /// numbers it uses.
    #[test]
    fn the_help_states_the_rules_with_their_numbers() {
        let mut cmd = ServeArgs::augment_args(Command::new("serve"));
        let help = cmd.render_long_help().to_string();
        for needle in [
            format!("--max-waits + {IN_FLIGHT_HEADROOM}"),
            format!("--max-in-flight - {IN_FLIGHT_HEADROOM}"),
            format!("between {MIN_FRAME_LEN} and {MAX_FRAME_LEN_CEILING}"),
            format!("{MIN_FRAME_LEN}..={MAX_FRAME_LEN_CEILING}"),
        ] {
            assert!(help.contains(&needle), "no {needle:?} in:\n{help}");
        }
    }
}
