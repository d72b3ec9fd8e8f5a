//! `clastor load`: a load harness. Runs closed-loop clients for a fixed time
//! and reports throughput and latency percentiles of each operation next to
//! floors measured in the same run on the same machine: a loopback TCP echo
//! of the same frame sizes and, with `--zk`, raw ZooKeeper `create`+`delete`
//! pairs issued directly with zookeeper-client over as many sessions as the
//! server uses; with `--etcd`, the etcd floors and etcd's own lock service
//! (`etcd.rs`); with `--pg`, the PostgreSQL floors and `pg_advisory_lock`
//! (`postgres.rs`); with `--redis`, the Redis floors and a plain Redis lock
//! (`redis.rs`). With a store, acquire+release also gets the floor through
//! a bare relay (`relay.rs`: floor + 2 hops) and the in-process server's
//! engine in library mode (sessions in this process, no server or client
//! hops): what the engine and its backend cost above the store's floor.
//!
//! By default each client is a `clastor-client` connection, measured as an
//! application would see it; `--depth` runs that many loops per connection
//! (the client pipelines them). `--raw` swaps the client crate for a lean
//! pipelined driver (`pipeline.rs`), so the load process costs little next to
//! the server. `--sweep` repeats everything over several connection counts;
//! `--op idle|hold` measure the server's memory instead (`footprint.rs`), and
//! `--chart-from` draws SVG charts from collected `--json` lines (`chart.rs`).

mod chart;
mod etcd;
mod footprint;
mod pipeline;
mod postgres;
mod redis;
mod relay;

use std::future::Future;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Args, ValueEnum};
use clastor::backend::Backend;
use clastor::backend::etcd::{EtcdBackend, EtcdConfig};
use clastor::backend::memory::MemoryBackend;
use clastor::backend::postgres::{PgConfig, PostgresBackend};
use clastor::backend::redis::{RedisBackend, RedisConfig};
use clastor::backend::zookeeper::{ZkConfig, ZooKeeperBackend};
use clastor::server::{self, ServerConfig, ServerHandle};
use clastor::{AcquireOptions, Engine, EngineConfig, LockKey, Session};
use clastor_client::Client;
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Which operations to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Op {
    /// `PING` round trips.
    Ping,
    /// Acquire then release of a lock, as one sample.
    AcquireRelease,
    /// Hand-over: from a holder's release to the next waiter's grant, in
    /// pairs of clients on one key (`--clients / 2` pairs).
    Handoff,
    /// Ping and acquire+release.
    All,
    /// Server memory per idle connection (`--count`, default 10,000), with
    /// a `clastor serve` child process (memory backend).
    Idle,
    /// Server memory per held lock (`--count`, default 100,000, on 100
    /// connections), with a `clastor serve` child process (memory backend).
    Hold,
}

/// How clients pick their keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Keys {
    /// Each client its own key: no contention (measures the service path).
    Distinct,
    /// All clients one key: full contention (measures hand-over).
    Shared,
    /// A new key for every operation (cold lock directories in ZooKeeper).
    Fresh,
}

/// Measure throughput and latency against a floor from the same run.
#[derive(Debug, Args)]
#[command(
    long_about = "Measure throughput and latency (p50/p90/p99) against floors measured in \
the same run: a loopback TCP echo of the same frame sizes, and with --zk raw ZooKeeper \
create+delete pairs over the same number of sessions; with --etcd and --pg, the store's own \
floors and lock (etcd v3lock, pg_advisory_lock).\n\n\
Without --server, an in-process server is started on 127.0.0.1 (memory backend, or ZooKeeper \
with --zk). Each client is its own connection and keeps one request outstanding (closed loop).\n\n\
Examples:\n  clastor load                                 # in-memory server, 1 client\n  \
clastor load --clients 64 --duration 10s\n  clastor load --zk 127.0.0.1:2181 --clients 64     # ZooKeeper backend vs raw ZooKeeper\n  \
clastor load --pg postgres://postgres@127.0.0.1/postgres --clients 16   # vs INSERT+DELETE, pg_advisory_lock\n  \
clastor load --server 10.0.0.5:7070 --op ping"
)]
pub(crate) struct LoadArgs {
    /// Server to load; without it, one is started in this process.
    #[arg(long, value_name = "HOST:PORT")]
    server: Option<String>,

    /// ZooKeeper connect string: backend of the in-process server, and target of the raw floor.
    #[arg(long, value_name = "HOST:PORT[,...]")]
    zk: Option<String>,

    /// ZooKeeper sessions (in-process server's pool and the raw floor alike; at least 1).
    #[arg(long, default_value_t = super::zk_sessions_default())]
    zk_sessions: NonZeroUsize,

    /// Lock directories each ZooKeeper session of the in-process server keeps a view of
    /// (0: list on every acquire, for an A/B)
    #[arg(long, default_value_t = ZkConfig::default().watched_dirs)]
    zk_watched_dirs: usize,

    /// etcd endpoints: backend of the in-process server, and target of the etcd floors and of
    /// the v3lock peer (instead of --zk).
    #[arg(long, value_name = "HOST:PORT[,...]", conflicts_with = "zk")]
    etcd: Option<String>,

    /// etcd leases of the in-process server, and channels of the raw floor (at least 1).
    #[arg(long, default_value_t = NonZeroUsize::new(EtcdConfig::default().leases).unwrap_or(NonZeroUsize::MIN))]
    etcd_leases: NonZeroUsize,

    /// PostgreSQL URL: backend of the in-process server, and target of the PostgreSQL floors
    /// and of the pg_advisory_lock peer (instead of --zk or --etcd).
    #[arg(long, value_name = "URL", conflicts_with_all = ["zk", "etcd", "redis"])]
    pg: Option<String>,

    /// PostgreSQL connections of the in-process server's pool, and of the raw floor (at least 1).
    #[arg(long, default_value_t = NonZeroUsize::new(PgConfig::default().connections).unwrap_or(NonZeroUsize::MIN))]
    pg_connections: NonZeroUsize,

    /// Redis URL: backend of the in-process server, and target of the Redis floors and of the
    /// plain Redis lock peer (instead of --zk or --etcd).
    #[arg(long, value_name = "redis://HOST:PORT", conflicts_with_all = ["zk", "etcd", "pg"])]
    redis: Option<String>,

    /// Concurrent clients, each with its own connection.
    #[arg(long, default_value_t = 1)]
    clients: usize,

    /// How long each measurement runs.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    duration: Duration,

    /// Unrecorded run before each measurement.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    warmup: Duration,

    /// What to measure.
    #[arg(long, value_enum, default_value_t = Op::All)]
    op: Op,

    /// Key choice for acquire+release.
    #[arg(long, value_enum, default_value_t = Keys::Distinct)]
    keys: Keys,

    /// Print one JSON object per result line instead of a table.
    #[arg(long)]
    json: bool,

    /// Requests in flight per connection: loops sharing each client
    /// connection, or with --raw, frames pipelined on it.
    #[arg(long, default_value_t = NonZeroUsize::MIN)]
    depth: NonZeroUsize,

    /// Drive the binary protocol directly with a lean pipelined driver
    /// instead of the client crate (ping and acquire+release only).
    #[arg(long)]
    raw: bool,

    /// Run every measurement at each of these connection counts (instead of --clients).
    #[arg(long, value_delimiter = ',', value_name = "N,N,...")]
    sweep: Vec<usize>,

    /// Hand-over: how long the waiter's acquire gets to queue before the
    /// holder releases. Too short a time for the backend's queueing (a
    /// busy ZooKeeper) adds the rest of the waiter's queueing to the sample.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5ms")]
    queue_time: Duration,

    /// With a store (--zk, --etcd, --pg, --redis): measure Clastor and the store's floor (with
    /// --pg and --redis also the floor through a bare relay) alternately, sample by sample in
    /// the same loops, instead of one after the other.
    #[arg(long)]
    interleave: bool,

    /// Speak TLS to the server, trusting the CA certificate(s) in this PEM file; with
    /// --tls-server, only to that one.
    #[arg(long, value_name = "PEM")]
    tls_ca: Option<PathBuf>,

    /// A second server, same settings but TLS (--tls-cert): acquire+release is measured on
    /// --server in plain TCP and on this one over TLS, as the "floor" pair (with --interleave,
    /// sample by sample in the same loops): the cost of TLS from one run.
    #[arg(long, value_name = "HOST:PORT", requires_all = ["tls_ca", "server"])]
    tls_server: Option<String>,

    /// Without --server: a second in-process server (memory backend) speaking TLS with this
    /// certificate chain (PEM; needs --tls-key and --tls-ca), measured against the plain
    /// in-process one as --tls-server is.
    #[arg(long, value_name = "PEM", requires_all = ["tls_key", "tls_ca"], conflicts_with_all = ["server", "tls_server"])]
    tls_cert: Option<PathBuf>,

    /// The private key (PEM) of --tls-cert.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,

    /// Authenticate every connection with this token (servers with --auth-file).
    #[arg(long, env = "CLASTOR_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    token: Option<String>,

    /// Skip the floors (for profiling the server alone).
    #[arg(long)]
    no_floor: bool,

    /// Scenario name written into each --json line (groups lines into tables and charts).
    #[arg(long, default_value = "")]
    scenario: String,

    /// With --op idle|hold: how many connections or locks.
    #[arg(long)]
    count: Option<usize>,

    /// With --op idle|hold: the `clastor` binary to start as the server
    /// (default: this one), to compare builds.
    #[arg(long, value_name = "PATH")]
    serve_bin: Option<PathBuf>,

    /// Draw SVG charts from this file of --json lines into --chart-dir, and
    /// measure nothing.
    #[arg(long, value_name = "FILE")]
    chart_from: Option<PathBuf>,

    /// Where --chart-from writes its SVG files.
    #[arg(long, value_name = "DIR", default_value = "docs/perf")]
    chart_dir: PathBuf,
}

/// One measured scenario.
struct Report {
    name: String,
    /// `clastor`, or which floor.
    series: &'static str,
    scenario: String,
    connections: usize,
    depth: usize,
    /// Requests each sample makes (2 for acquire+release).
    requests_per_op: u64,
    ops: u64,
    elapsed: Duration,
    hist: Histogram<u64>,
    errors: u64,
    /// What the process ran while this series was measured alone (not with
    /// `--interleave`, where series share the time).
    usage: Option<Usage>,
}

/// CPU time (user and system, every thread) and context switches of this
/// process, from `getrusage`: with an in-process server, the server's, its
/// clients' and the store drivers' together.
#[derive(Debug, Clone, Copy)]
struct Usage {
    cpu: Duration,
    switches: u64,
}

impl Usage {
    fn now() -> Option<Usage> {
        use nix::sys::resource::{UsageWho, getrusage};
        let u = getrusage(UsageWho::RUSAGE_SELF).ok()?;
        let time = |t: nix::sys::time::TimeVal| {
            Duration::from_secs(u64::try_from(t.tv_sec()).unwrap_or(0))
                + Duration::from_micros(u64::try_from(t.tv_usec()).unwrap_or(0))
        };
        Some(Usage {
            cpu: time(u.user_time()) + time(u.system_time()),
            switches: u64::try_from(u.voluntary_context_switches() + u.involuntary_context_switches()).unwrap_or(0),
        })
    }

    /// What ran between `before` and `self`.
    fn since(self, before: Usage) -> Usage {
        Usage {
            cpu: self.cpu.saturating_sub(before.cpu),
            switches: self.switches.saturating_sub(before.switches),
        }
    }
}

impl Report {
    fn new(name: &str, elapsed: Duration) -> Report {
        Report {
            name: name.to_owned(),
            series: "clastor",
            scenario: String::new(),
            connections: 1,
            depth: 1,
            requests_per_op: 1,
            ops: 0,
            elapsed,
            hist: new_hist(),
            errors: 0,
            usage: None,
        }
    }

    fn print(&self, json: bool) {
        let q = |p: f64| self.hist.value_at_quantile(p);
        let rate = self.ops as f64 / self.elapsed.as_secs_f64();
        if json {
            let mut v = serde_json::json!({
                "name": self.name, "series": self.series, "scenario": self.scenario,
                "connections": self.connections, "depth": self.depth,
                "ops": self.ops, "ops_per_s": rate.round(),
                "requests_per_s": (rate * self.requests_per_op as f64).round(), "errors": self.errors,
                "p50_us": q(0.5), "p90_us": q(0.9), "p99_us": q(0.99), "p999_us": q(0.999), "max_us": self.hist.max(),
            });
            // Per sample: the process's CPU and context switches while the
            // series ran alone.
            if let Some(u) = self.usage.filter(|_| self.ops > 0) {
                v["cpu_us_per_op"] = serde_json::json!((u.cpu.as_secs_f64() * 1e6 / self.ops as f64).round());
                v["switches_per_op"] =
                    serde_json::json!(((u.switches as f64 / self.ops as f64) * 100.0).round() / 100.0);
            }
            println!("{v}");
        } else {
            println!(
                "{:<50} {:>10.0} {:>9} {:>9} {:>9} {:>9} {:>7}",
                self.name,
                rate,
                q(0.5),
                q(0.9),
                q(0.99),
                self.hist.max(),
                self.errors
            );
        }
    }
}

impl LoadArgs {
    /// `--etcd`, split into endpoints.
    fn etcd_endpoints(&self) -> Vec<String> {
        self.etcd
            .as_deref()
            .unwrap_or_default()
            .split(',')
            .map(|e| e.trim().to_owned())
            .filter(|e| !e.is_empty())
            .collect()
    }

    /// The series name of the backend's floor.
    fn floor_series(&self) -> &'static str {
        if self.tls_server.is_some() || self.tls_cert.is_some() {
            "clastor over TLS"
        } else if self.pg.is_some() {
            "floor: PostgreSQL"
        } else if self.etcd.is_some() {
            "floor: etcd"
        } else if self.redis.is_some() {
            "floor: Redis"
        } else {
            "floor: ZooKeeper"
        }
    }
}

/// Runs `clastor load`.
pub(crate) fn run(args: LoadArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("clastor load: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(load(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("clastor load: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn load(args: LoadArgs) -> anyhow::Result<()> {
    if let Some(input) = &args.chart_from {
        for name in chart::draw(input, &args.chart_dir)? {
            println!("{}", args.chart_dir.join(name).display());
        }
        return Ok(());
    }
    if matches!(args.op, Op::Idle | Op::Hold) {
        let bin = match &args.serve_bin {
            Some(bin) => bin.clone(),
            None => std::env::current_exe().context("find this binary")?,
        };
        let footprint = if args.op == Op::Idle {
            footprint::idle_connections(&bin, args.count.unwrap_or(10_000)).await?
        } else {
            footprint::held_locks(&bin, args.count.unwrap_or(100_000)).await?
        };
        footprint.print(args.json, &args.scenario);
        return Ok(());
    }
    let counts = if args.sweep.is_empty() {
        vec![args.clients]
    } else {
        args.sweep.clone()
    };
    if counts.contains(&0) {
        bail!("--clients and --sweep counts must be at least 1");
    }
    if args.raw && args.op == Op::Handoff {
        bail!("--raw measures ping and acquire+release; hand-over goes through the client");
    }
    let (addr, local, embedded): (String, Option<ServerHandle>, Option<EmbeddedFn>) = match (&args.server, &args.zk) {
        (Some(addr), _) => (addr.clone(), None, None),
        (None, None) if args.pg.is_some() => {
            let url = args.pg.clone().unwrap_or_default();
            let cfg = PgConfig {
                url: url.clone(),
                connections: args.pg_connections.get(),
                ..PgConfig::default()
            };
            let backend = PostgresBackend::connect(cfg)
                .await
                .with_context(|| format!("PostgreSQL at {}", clastor::backend::postgres::redact(&url)))?;
            start(backend).await?
        }
        (None, None) if args.etcd.is_some() => {
            let cfg = EtcdConfig {
                endpoints: args.etcd_endpoints(),
                leases: args.etcd_leases.get(),
                ..EtcdConfig::default()
            };
            let backend = EtcdBackend::connect(cfg)
                .await
                .with_context(|| format!("etcd at {}", args.etcd_endpoints().join(",")))?;
            start(backend).await?
        }
        (None, None) if args.redis.is_some() => {
            let url = args.redis.clone().unwrap_or_default();
            let cfg = RedisConfig {
                url: url.clone(),
                ..RedisConfig::default()
            };
            let backend = RedisBackend::connect(cfg)
                .await
                .with_context(|| format!("Redis at {url}"))?;
            start(backend).await?
        }
        (None, None) => start(MemoryBackend::new()).await?,
        (None, Some(zk)) => {
            let cfg = ZkConfig {
                hosts: zk.clone(),
                sessions: args.zk_sessions.get(),
                watched_dirs: args.zk_watched_dirs,
                ..ZkConfig::default()
            };
            let backend = ZooKeeperBackend::connect(cfg)
                .await
                .with_context(|| format!("ZooKeeper at {zk}"))?;
            start(backend).await?
        }
    };
    // The TLS twin of the in-process server (--tls-cert), or a TLS server given.
    let tls_local = match args.tls_cert.as_ref().zip(args.tls_key.as_ref()) {
        Some((cert, key)) => {
            let config = ServerConfig {
                listen: SocketAddr::from(([127, 0, 0, 1], 0)),
                tls: Some(clastor::server::TlsConfig {
                    cert: cert.clone(),
                    key: key.clone(),
                    client_ca: None,
                }),
                ..ServerConfig::default()
            };
            let handle = server::spawn(Engine::new(MemoryBackend::new(), EngineConfig::default()), config).await?;
            Some(handle)
        }
        None => None,
    };
    let tls_addr = match &tls_local {
        Some(h) => Some(h.local_addr().to_string()),
        None => args.tls_server.clone(),
    };
    if !args.json {
        println!(
            "clastor load: {:?} connection(s), depth {}{}, {:?} per measurement, server {addr}{}",
            counts,
            args.depth,
            if args.raw { " (raw driver)" } else { "" },
            args.duration,
            if local.is_some() { " (in-process)" } else { "" }
        );
        println!(
            "{:<50} {:>10} {:>9} {:>9} {:>9} {:>9} {:>7}",
            "operation", "ops/s", "p50 µs", "p90 µs", "p99 µs", "max µs", "errors"
        );
    }
    for &n in &counts {
        run_at(&args, &addr, tls_addr.as_deref(), embedded.as_ref(), n).await?;
    }
    if let Some(server) = local {
        server.shutdown().await;
    }
    if let Some(server) = tls_local {
        server.shutdown().await;
    }
    Ok(())
}

/// Every measurement `args` asks for, with `n` connections.
async fn run_at(
    args: &LoadArgs,
    addr: &str,
    tls_addr: Option<&str>,
    embedded: Option<&EmbeddedFn>,
    n: usize,
) -> anyhow::Result<()> {
    let depth = args.depth.get();
    let workers = n * depth;
    let emit = |mut r: Report, series: &'static str, requests_per_op: u64| {
        r.series = series;
        r.scenario.clone_from(&args.scenario);
        r.connections = n;
        r.depth = depth;
        r.requests_per_op = requests_per_op;
        if !args.json {
            r.name = format!("{} [{n}x{depth}]", r.name);
        }
        r.print(args.json);
    };
    let keys_name = match args.keys {
        Keys::Shared => "shared keys",
        Keys::Distinct => "distinct keys",
        Keys::Fresh => "fresh keys",
    };
    let wants_ping = matches!(args.op, Op::Ping | Op::All);
    let wants_pairs = matches!(args.op, Op::AcquireRelease | Op::All);
    // The floors: echo of the PING frame sizes (12 bytes out, 14 back), or
    // pipelined PING frames echoed as they are; for acquire+release also
    // its shape, an ACQUIRE frame's round trip then a RELEASE frame's.
    if args.zk.is_some() || args.etcd.is_some() || args.pg.is_some() || args.redis.is_some() || args.no_floor {
        // The backend's floors below are the ones that matter.
    } else {
        if args.raw || depth > 1 {
            let r = raw_echo(args, n, pipeline::RawOp::Echo, "floor: loopback TCP echo").await?;
            emit(r, "floor: TCP echo", 1);
        } else {
            emit(echo_floor(args, n).await?, "floor: TCP echo", 1);
        }
        if wants_pairs {
            let name = "floor: TCP echo, acquire then release frame";
            emit(
                raw_echo(args, n, pipeline::RawOp::EchoPair, name).await?,
                "floor: TCP echo x2",
                2,
            );
        }
    }
    if args.raw {
        if wants_ping {
            let r = raw_measure(args, addr, n, pipeline::RawOp::Ping, args.keys, "clastor PING").await?;
            emit(r, "clastor", 1);
        }
        if wants_pairs {
            let name = format!("clastor acquire+release ({keys_name})");
            let r = raw_measure(args, addr, n, pipeline::RawOp::AcquireRelease, args.keys, &name).await?;
            emit(r, "clastor", 2);
        }
    } else {
        let tls_for_addr = args.tls_ca.as_deref().filter(|_| tls_addr.is_none());
        let clients = connect_all(addr, n, tls_for_addr, args.token.as_deref()).await?;
        if wants_ping {
            let c = clients.clone();
            let op = op_fn(move |i| {
                let c = c[i % c.len()].clone();
                async move { c.ping().await.map(drop).map_err(anyhow::Error::from) }
            });
            emit(measure_n(args, workers, "clastor PING", op).await, "clastor", 1);
        }
        if wants_pairs {
            let keys = args.keys;
            let op = pair_op(clients.clone(), keys);
            let name = format!("clastor acquire+release ({keys_name})");
            // Distinct paths: a floor for distinct keys only (a contended
            // lock's floor is the hand-over one, `--op handoff`).
            // Over TLS, the comparison is the plain server (the TLS twin's
            // twin): no store floor then.
            let floored = !args.no_floor && args.keys != Keys::Shared && tls_addr.is_none();
            let floor = if !floored {
                None
            } else if let Some(zk) = &args.zk {
                Some(zk_floor(args, zk).await?)
            } else if args.etcd.is_some() {
                Some(etcd::pair_steps(&args.etcd_endpoints(), args.etcd_leases.get()).await?)
            } else if let Some(url) = &args.pg {
                Some(postgres::pair_steps(url, args.pg_connections.get()).await?)
            } else if let Some(url) = &args.redis {
                Some(redis::pair_steps(url).await?)
            } else {
                None
            };
            if let Some((floor_name, steps)) = floor {
                // A store: the floor, the floor through a bare relay
                // (Clastor's two hops, none of its work), on PostgreSQL and
                // Redis Clastor's own statements or scripts sent straight to
                // the store (its store work, without its server) and on
                // Redis the least fenced lock through the relay; last, the
                // engine in library mode (no hops, no server).
                let mut refs = vec![(
                    RELAY_NAME.to_owned(),
                    "reference: floor + 2 hops",
                    relay::relayed(steps.clone(), workers).await?,
                )];
                if let Some(url) = &args.pg {
                    let (name, op) = postgres::clastor_sql(url, workers).await?;
                    refs.push((name, "reference: Clastor's SQL alone", op));
                }
                if let Some(url) = &args.redis {
                    let (name, op) = redis::clastor_scripts(url).await?;
                    refs.push((name, "reference: Clastor's scripts alone", op));
                    refs.push((
                        MINIMAL_FENCED_NAME.to_owned(),
                        "reference: minimal fenced lock + 2 hops",
                        relay::relayed(redis::minimal_fenced_steps(url).await?, workers).await?,
                    ));
                }
                if let Some(f) = embedded {
                    refs.push((
                        EMBEDDED_NAME.to_owned(),
                        "reference: Clastor in library mode",
                        f(n, args.keys),
                    ));
                }
                let floor = (floor_name, relay::pair(steps));
                compare_with_refs(args, workers, (name, op), floor, refs, &emit).await;
            } else if let Some(tls_addr) = tls_addr {
                let tls = connect_all(tls_addr, n, args.tls_ca.as_deref(), args.token.as_deref()).await?;
                let twin = (
                    format!("clastor acquire+release over TLS ({keys_name})"),
                    pair_op(tls, keys),
                );
                compare(args, workers, (&name, op), Some(twin), 2, &emit).await;
            } else {
                compare(args, workers, (&name, op), None, 2, &emit).await;
            }
            if args.etcd.is_some() && !args.no_floor && args.keys != Keys::Shared {
                let (name, op) = etcd::v3lock_peer(&args.etcd_endpoints(), workers).await?;
                emit(measure_n(args, workers, &name, op).await, "peer: etcd v3lock", 2);
            }
            if let Some(url) = args.pg.as_ref().filter(|_| !args.no_floor && args.keys != Keys::Shared) {
                let (name, op) = postgres::advisory_peer(url, workers).await?;
                emit(measure_n(args, workers, &name, op).await, "peer: pg_advisory_lock", 2);
            }
            if let Some(url) = args
                .redis
                .as_ref()
                .filter(|_| !args.no_floor && args.keys != Keys::Shared)
            {
                let (name, op) = redis::plain_lock_peer(url).await?;
                emit(measure_n(args, workers, &name, op).await, "peer: plain Redis lock", 2);
            }
        }
        if args.op == Op::Handoff {
            let (name, pairs, op) = handoff(args, &clients);
            let floor = if args.no_floor {
                None
            } else if let Some(zk) = &args.zk {
                Some(zk_handoff_floor(zk, args.queue_time).await?)
            } else if args.etcd.is_some() {
                Some(etcd::handoff_floor(&args.etcd_endpoints(), args.queue_time).await?)
            } else if let Some(url) = &args.pg {
                Some(postgres::handoff_floor(url, args.queue_time).await?)
            } else if let Some(url) = &args.redis {
                Some(redis::handoff_floor(url, args.queue_time).await?)
            } else {
                None
            };
            compare(args, pairs, (&name, op), floor, 1, &emit).await;
        }
    }
    if args.raw && !args.no_floor && wants_pairs && args.keys != Keys::Shared {
        let floor = if let Some(zk) = &args.zk {
            Some(zk_floor(args, zk).await?)
        } else if args.etcd.is_some() {
            Some(etcd::pair_steps(&args.etcd_endpoints(), args.etcd_leases.get()).await?)
        } else {
            None
        };
        if let Some((name, steps)) = floor {
            emit(
                measure_n(args, workers, &name, relay::pair(steps)).await,
                args.floor_series(),
                2,
            );
        }
    }
    Ok(())
}

/// Measures Clastor's `op` and, if given, its ZooKeeper floor: one after the
/// other, or with `--interleave` sample by sample in the same loops, so both
/// see the same machine (a busy second slows both instead of one).
async fn compare(
    args: &LoadArgs,
    workers: usize,
    (name, op): (&str, OpFn),
    floor: Option<(String, OpFn)>,
    requests_per_op: u64,
    emit: &impl Fn(Report, &'static str, u64),
) {
    match floor {
        Some((floor_name, floor_op)) if args.interleave => {
            let mut r = measure_alternating(args, workers, &[(name, op), (&floor_name, floor_op)]).await;
            let (b, a) = (r.pop(), r.pop());
            if let (Some(a), Some(b)) = (a, b) {
                emit(a, "clastor", requests_per_op);
                emit(b, args.floor_series(), requests_per_op);
            }
        }
        Some((floor_name, floor_op)) => {
            emit(measure_n(args, workers, name, op).await, "clastor", requests_per_op);
            emit(
                measure_n(args, workers, &floor_name, floor_op).await,
                args.floor_series(),
                requests_per_op,
            );
        }
        None => emit(measure_n(args, workers, name, op).await, "clastor", requests_per_op),
    }
}

/// Name of the relayed floor's row (`relay.rs`).
const RELAY_NAME: &str = "reference: floor through a bare relay (+2 hops)";

/// Name of the relayed minimal fenced Redis lock's row (`redis.rs`).
const MINIMAL_FENCED_NAME: &str = "reference: minimal fenced lock through a bare relay (+2 hops)";

/// [`compare`] with reference rows next to the floor (`(name, series, op)`):
/// Clastor, the floor and each reference, one after the other or with
/// `--interleave` sample by sample in the same loops.
async fn compare_with_refs(
    args: &LoadArgs,
    workers: usize,
    clastor: (String, OpFn),
    floor: (String, OpFn),
    refs: Vec<(String, &'static str, OpFn)>,
    emit: &impl Fn(Report, &'static str, u64),
) {
    let mut series = vec!["clastor", args.floor_series()];
    let mut ops = vec![clastor, floor];
    for (name, s, op) in refs {
        series.push(s);
        ops.push((name, op));
    }
    if args.interleave {
        let named: Vec<(&str, OpFn)> = ops.iter().map(|(n, op)| (n.as_str(), op.clone())).collect();
        for (r, s) in measure_alternating(args, workers, &named).await.into_iter().zip(series) {
            emit(r, s, 2);
        }
    } else {
        for ((name, op), s) in ops.into_iter().zip(series) {
            emit(measure_n(args, workers, &name, op).await, s, 2);
        }
    }
}

/// Operations alternating in each of `workers` loops (a warm-up, then
/// `--duration`); one report each. Throughput is each one's share of the
/// shared time.
async fn measure_alternating(args: &LoadArgs, workers: usize, ops: &[(&str, OpFn)]) -> Vec<Report> {
    let run = |length: Duration| {
        let deadline = Instant::now() + length;
        let tasks: Vec<_> = (0..workers)
            .map(|i| {
                let ops: Vec<OpFn> = ops.iter().map(|(_, op)| op.clone()).collect();
                tokio::spawn(async move {
                    let mut out: Vec<(Histogram<u64>, u64)> = ops.iter().map(|_| (new_hist(), 0u64)).collect();
                    while Instant::now() < deadline {
                        for (k, op) in ops.iter().enumerate() {
                            match op(i).await {
                                Ok(latency) => {
                                    let _ = out[k].0.record(micros(latency));
                                }
                                Err(_) => out[k].1 += 1,
                            }
                        }
                    }
                    out
                })
            })
            .collect();
        async move {
            let mut all = Vec::with_capacity(tasks.len());
            for t in tasks {
                if let Ok(r) = t.await {
                    all.push(r);
                }
            }
            all
        }
    };
    run(args.warmup).await;
    let started = Instant::now();
    let results = run(args.duration).await;
    let elapsed = started.elapsed();
    let mut reports: Vec<Report> = ops.iter().map(|(name, _)| Report::new(name, elapsed)).collect();
    for per_worker in results {
        for (r, (h, e)) in reports.iter_mut().zip(per_worker) {
            r.ops += h.len();
            let _ = r.hist.add(&h);
            r.errors += e;
        }
    }
    reports
}

/// A loopback server echoing whatever it reads, as it reads it: the floor
/// for pipelined frames.
struct EchoServer {
    addr: String,
    task: tokio::task::JoinHandle<()>,
}

impl EchoServer {
    async fn start() -> anyhow::Result<EchoServer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let _ = s.set_nodelay(true);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(k) => {
                                if s.write_all(&buf[..k]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        Ok(EchoServer { addr, task })
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An echo floor driven by the lean driver (`op` is one of its echo ops),
/// against an echo server started for it.
async fn raw_echo(args: &LoadArgs, n: usize, op: pipeline::RawOp, name: &str) -> anyhow::Result<Report> {
    let echo = EchoServer::start().await?;
    raw_measure(args, &echo.addr, n, op, args.keys, name).await
}

/// `n` connections of the lean driver, `--depth` in flight on each, for a
/// warm-up and then `--duration` of recorded samples.
async fn raw_measure(
    args: &LoadArgs,
    addr: &str,
    n: usize,
    op: pipeline::RawOp,
    keys: Keys,
    name: &str,
) -> anyhow::Result<Report> {
    let start = Instant::now();
    let window = Arc::new(pipeline::Window {
        record_from: start + args.warmup,
        until: start + args.warmup + args.duration,
    });
    let depth = args.depth.get();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (addr, window) = (addr.to_owned(), window.clone());
            tokio::spawn(async move { pipeline::run_connection(&addr, op, keys, i, depth, &window).await })
        })
        .collect();
    let mut report = Report::new(name, args.duration);
    for t in tasks {
        let (hist, errors) = t.await??;
        report.ops += hist.len();
        let _ = report.hist.add(&hist);
        report.errors += errors;
    }
    Ok(report)
}

/// Starts the in-process server on `backend`; with it, its engine in
/// library mode ([`embedded_pair_op`]).
async fn start<B: Backend>(backend: B) -> anyhow::Result<(String, Option<ServerHandle>, Option<EmbeddedFn>)> {
    let config = ServerConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        ..ServerConfig::default()
    };
    let engine = Engine::new(backend, EngineConfig::default());
    let handle = server::spawn(engine.clone(), config).await?;
    let embedded: EmbeddedFn = Arc::new(move |n, keys| embedded_pair_op(&engine, n, keys));
    Ok((handle.local_addr().to_string(), Some(handle), Some(embedded)))
}

/// The in-process server's engine in library mode, for `n` connections'
/// worth of workers and a key choice: an [`OpFn`] over `n` sessions of its
/// own.
type EmbeddedFn = Arc<dyn Fn(usize, Keys) -> OpFn + Send + Sync>;

/// Name of the library-mode row ([`embedded_pair_op`]).
const EMBEDDED_NAME: &str = "reference: Clastor in library mode (engine in-process, no hops)";

/// Acquire+release of worker `i`'s key through the engine itself, as an
/// application embedding Clastor does (README, "Library mode"): `n`
/// sessions, one per connection as the clients have, keys chosen as the
/// clients' are ([`pair_op`]) under names of their own (`e…` beside the
/// clients' `k…`), on the same engine and backend as the server. Clastor's
/// row minus this one is what the server, the protocol and the client
/// library add; this one minus the floor is what the engine and its
/// backend add.
fn embedded_pair_op<B: Backend>(engine: &Engine<B>, n: usize, keys: Keys) -> OpFn {
    let sessions: Arc<Vec<Session<B>>> = Arc::new(
        (0..n.max(1))
            .map(|_| engine.open_session("clastor-load-embedded").0)
            .collect(),
    );
    let ids = KeyIds::new(keys, "e");
    op_fn(move |i| {
        let session = sessions[i % sessions.len()].clone();
        let id = ids.id(i, sessions.len());
        async move {
            let key = LockKey::new("load", &id)?;
            match session
                .acquire(&key, AcquireOptions::wait(Duration::from_secs(30)))
                .await?
            {
                Some(_) if session.release(&key).await? => Ok(()),
                Some(_) => bail!("{key} was not held at its release"),
                None => bail!("not granted within 30 s"),
            }
        }
    })
}

async fn connect_all(
    addr: &str,
    n: usize,
    tls_ca: Option<&std::path::Path>,
    token: Option<&str>,
) -> anyhow::Result<Arc<Vec<Client>>> {
    let tls = tls_ca
        .map(|ca| clastor_client::TlsConfig::from_pem_files(ca, None))
        .transpose()?;
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        let mut builder = Client::builder(addr).client_name("clastor-load");
        if let Some(tls) = &tls {
            builder = builder.tls(tls.clone());
        }
        if let Some(token) = token {
            builder = builder.token(token);
        }
        clients.push(builder.connect().await.with_context(|| format!("connect to {addr}"))?);
    }
    Ok(Arc::new(clients))
}

/// Names the key of worker `i`'s next pair under `--keys`, each user of
/// it under its own `prefix`.
struct KeyIds {
    keys: Keys,
    prefix: &'static str,
    run: u32,
    fresh: std::sync::atomic::AtomicU64,
}

impl KeyIds {
    fn new(keys: Keys, prefix: &'static str) -> KeyIds {
        KeyIds {
            keys,
            prefix,
            run: std::process::id(),
            fresh: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The id for worker `i` of loops spread over `conns` connections.
    fn id(&self, i: usize, conns: usize) -> String {
        let p = self.prefix;
        match self.keys {
            // Loop j of every connection shares key j: contended by
            // every connection, never twice by one.
            Keys::Shared => format!("{p}shared-{}", i / conns),
            Keys::Distinct => format!("{p}{i}"),
            Keys::Fresh => format!(
                "{p}f{}-{}",
                self.run,
                self.fresh.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ),
        }
    }
}

/// Acquire+release of worker `i`'s key on its client.
fn pair_op(clients: Arc<Vec<Client>>, keys: Keys) -> OpFn {
    let ids = KeyIds::new(keys, "k");
    op_fn(move |i| {
        let c = clients[i % clients.len()].clone();
        let id = ids.id(i, clients.len());
        async move {
            let guard = c.lock("load", id).wait(Duration::from_secs(30)).acquire().await?;
            match guard {
                Some(g) => g.release().await.map(drop).map_err(anyhow::Error::from),
                None => bail!("not granted within 30 s"),
            }
        }
    })
}

/// One operation of worker `i`, as a future yielding the latency to record.
type OpFn = Arc<dyn Fn(usize) -> Pin<Box<dyn Future<Output = anyhow::Result<Duration>> + Send>> + Send + Sync>;

/// An operation timed from start to end.
fn op_fn<F, Fut>(f: F) -> OpFn
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let f = Arc::new(f);
    Arc::new(move |i| {
        let f = f.clone();
        Box::pin(async move {
            let t0 = Instant::now();
            f(i).await?;
            Ok(t0.elapsed())
        })
    })
}

/// An operation that times itself (only part of it is the latency of interest).
fn timed_op_fn<F, Fut>(f: F) -> OpFn
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<Duration>> + Send + 'static,
{
    Arc::new(move |i| Box::pin(f(i)))
}

fn new_hist() -> Histogram<u64> {
    // 1 µs .. 100 s at 3 significant digits; the bounds are constants.
    Histogram::new_with_bounds(1, 100_000_000, 3).expect("constant histogram bounds are valid")
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// Runs `op` in a closed loop on `workers` tasks: a warm-up, then
/// `args.duration` of recorded samples.
async fn measure_n(args: &LoadArgs, workers: usize, name: &str, op: OpFn) -> Report {
    phase(workers, args.warmup, op.clone()).await;
    let (started, before) = (Instant::now(), Usage::now());
    let results = phase(workers, args.duration, op).await;
    let mut report = Report::new(name, started.elapsed());
    report.usage = Usage::now().zip(before).map(|(after, before)| after.since(before));
    for (hist, errors) in results {
        report.ops += hist.len();
        let _ = report.hist.add(&hist);
        report.errors += errors;
    }
    report
}

async fn phase(clients: usize, length: Duration, op: OpFn) -> Vec<(Histogram<u64>, u64)> {
    let deadline = Instant::now() + length;
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let op = op.clone();
            tokio::spawn(async move {
                let (mut hist, mut errors) = (new_hist(), 0u64);
                while Instant::now() < deadline {
                    match op(i).await {
                        Ok(latency) => {
                            let _ = hist.record(micros(latency));
                        }
                        Err(_) => errors += 1,
                    }
                }
                (hist, errors)
            })
        })
        .collect();
    let mut out = Vec::with_capacity(clients);
    for t in tasks {
        if let Ok(r) = t.await {
            out.push(r);
        }
    }
    out
}

/// Bytes of a `PING` request frame and of its response.
const PING_FRAME: usize = 12;
const PONG_FRAME: usize = 14;

/// Loopback TCP echo with the `PING` frame sizes: the floor for one round trip.
async fn echo_floor(args: &LoadArgs, n: usize) -> anyhow::Result<Report> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let (mut req, resp) = ([0u8; PING_FRAME], [0u8; PONG_FRAME]);
                while s.read_exact(&mut req).await.is_ok() {
                    if s.write_all(&resp).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        conns.push(tokio::sync::Mutex::new(s));
    }
    let conns = Arc::new(conns);
    let report = measure_n(
        args,
        n,
        "floor: loopback TCP echo",
        op_fn(move |i| {
            let conns = conns.clone();
            async move {
                let mut s = conns[i].lock().await;
                s.write_all(&[0u8; PING_FRAME]).await?;
                let mut resp = [0u8; PONG_FRAME];
                s.read_exact(&mut resp).await?;
                Ok(())
            }
        }),
    )
    .await;
    server.abort();
    Ok(report)
}

/// The ZooKeeper floor: an ephemeral `create` then a `delete`, one path per
/// worker, over as many raw sessions as the server's pool, as its two
/// steps (`relay.rs`).
async fn zk_floor(args: &LoadArgs, hosts: &str) -> anyhow::Result<(String, relay::StepFn)> {
    use zookeeper_client::{Acls, CreateMode};
    let sessions = Arc::new(raw_sessions(hosts, args.zk_sessions.get()).await?);
    let root = FLOOR_ROOT;
    let run = std::process::id();
    let name = format!("floor: ZooKeeper create+delete ({} sessions)", sessions.len());
    Ok((
        name,
        relay::step_fn(move |i, step, _| {
            let sessions = sessions.clone();
            async move {
                let client = &sessions[i % sessions.len()];
                let path = format!("{root}/p{run}-c{i}");
                if step == 0 {
                    client
                        .create(&path, b"", &CreateMode::Ephemeral.with_acls(Acls::anyone_all()))
                        .await?;
                } else {
                    client.delete(&path, None).await?;
                }
                Ok(0)
            }
        }),
    ))
}

/// Two clients taking turns on one key.
struct Pair {
    clients: [Client; 2],
    /// Which of the two holds `held`.
    holder: usize,
    held: Option<clastor_client::LockGuard>,
}

/// From the holder's `release` call to the waiter's grant arriving.
fn handoff(args: &LoadArgs, clients: &Arc<Vec<Client>>) -> (String, usize, OpFn) {
    let pairs: Vec<_> = clients
        .chunks_exact(2)
        .map(|c| {
            tokio::sync::Mutex::new(Pair {
                clients: [c[0].clone(), c[1].clone()],
                holder: 0,
                held: None,
            })
        })
        .collect();
    let n = pairs.len().max(1);
    let pairs = Arc::new(pairs);
    let queue_time = args.queue_time;
    let op = timed_op_fn(move |i| {
        let pairs = pairs.clone();
        async move {
            let Some(pair) = pairs.get(i) else {
                bail!("--op handoff needs at least 2 clients")
            };
            let mut p = pair.lock().await;
            let key = format!("handoff-{i}");
            let wait = Duration::from_secs(30);
            if p.held.is_none() {
                let g = p.clients[p.holder]
                    .lock("load", key.clone())
                    .wait(wait)
                    .acquire()
                    .await?;
                p.held = Some(g.context("holder not granted")?);
            }
            let waiter = p.clients[1 - p.holder].clone();
            let waiting = tokio::spawn(async move {
                let g = waiter.lock("load", key).wait(wait).acquire().await;
                (g, Instant::now())
            });
            // Benchmark pacing only: the waiter's acquire is in flight, and a
            // round in which it had not queued yet only measures slower.
            tokio::time::sleep(queue_time).await;
            let t0 = Instant::now();
            if let Some(g) = p.held.take() {
                g.release().await?;
            }
            let (g, granted_at) = waiting.await?;
            p.held = Some(g?.context("waiter not granted")?);
            p.holder = 1 - p.holder;
            Ok(granted_at.duration_since(t0))
        }
    });
    (format!("clastor hand-over ({n} pair(s))"), n, op)
}

/// Raw ZooKeeper hand-over: one session deletes a node another session
/// watches; from the `delete` call to the watch notification. Like the
/// Clastor hand-over, the delete comes `queue_time` after the watch is set:
/// both start from the same idle process (threads parked, caches cold), so
/// the ratio compares paths, not wake-up conditions.
async fn zk_handoff_floor(hosts: &str, queue_time: Duration) -> anyhow::Result<(String, OpFn)> {
    use zookeeper_client::{Acls, CreateMode};
    let sessions = raw_sessions(hosts, 2).await?;
    let root = FLOOR_ROOT;
    let sessions = Arc::new(sessions);
    let run = std::process::id();
    let op = timed_op_fn(move |i| {
        let sessions = sessions.clone();
        async move {
            let path = format!("{root}/h{run}-{i}");
            sessions[0]
                .create(&path, b"", &CreateMode::Ephemeral.with_acls(Acls::anyone_all()))
                .await?;
            let (stat, watcher) = sessions[1].check_and_watch_stat(&path).await?;
            if stat.is_none() {
                bail!("node vanished before the watch was set");
            }
            tokio::time::sleep(queue_time).await;
            let t0 = Instant::now();
            // zookeeper-client sends a request when the method is called, so
            // the delete is on its way while we wait for the other session's event.
            let delete = sessions[0].delete(&path, None);
            watcher.changed().await;
            let latency = t0.elapsed();
            delete.await?;
            Ok(latency)
        }
    });
    Ok(("floor: ZooKeeper delete → watch event".to_owned(), op))
}

/// Parent of the raw floors' nodes.
const FLOOR_ROOT: &str = "/clastor-load-floor";

/// `n` plain zookeeper-client sessions, and [`FLOOR_ROOT`] created.
async fn raw_sessions(hosts: &str, n: usize) -> anyhow::Result<Vec<zookeeper_client::Client>> {
    use zookeeper_client::{Acls, CreateMode, Error as ZkError};
    let mut sessions = Vec::with_capacity(n);
    for _ in 0..n {
        let client = zookeeper_client::Client::connector()
            .with_session_timeout(Duration::from_secs(10))
            .connect(hosts)
            .await
            .with_context(|| format!("raw ZooKeeper session to {hosts}"))?;
        sessions.push(client);
    }
    match sessions[0]
        .create(FLOOR_ROOT, b"", &CreateMode::Persistent.with_acls(Acls::anyone_all()))
        .await
    {
        Ok(_) | Err(ZkError::NodeExists) => Ok(sessions),
        Err(e) => bail!("create {FLOOR_ROOT}: {e}"),
    }
}
