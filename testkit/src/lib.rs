//! Test support for Clastor: a real ZooKeeper (Debian's `zookeeper` package),
//! a real etcd (Debian's `etcd-server` and `etcd-client`), a real
//! PostgreSQL 15 (Debian's `postgresql`) or a real Redis (Debian's
//! `redis-server`), started on free loopback ports, for
//! integration tests and benches.
//!
//! Design choices:
//! - **Real servers, never mocks.** [`ZooKeeper::start`] launches one
//!   standalone server, [`ZooKeeper::ensemble`] a quorum on one host, each a
//!   `java … QuorumPeerMain zoo.cfg` child process; [`Etcd::start`] launches
//!   one etcd member, [`Etcd::cluster`] a statically bootstrapped cluster;
//!   [`Postgres::start`] one PostgreSQL instance (`initdb` into a temp dir);
//!   [`Redis::start`] one Redis without persistence.
//!   Every server has its own temporary data directory and log file.
//! - **Parallel-safe.** Every instance picks its own free ports and temp dir;
//!   a port stolen between picking and binding is detected (the server exits
//!   or never serves, and its log says so) and the start is retried on fresh
//!   ports.
//! - **Fault injection by pid**: `freeze`/`thaw` (SIGSTOP/SIGCONT),
//!   `kill` (SIGKILL, data kept — none for Redis, which persists nothing)
//!   and `restart` on the ZooKeeper, etcd and Redis launchers;
//!   `freeze`/`thaw` of every process of a PostgreSQL instance (a stopped
//!   postmaster alone leaves its backends answering).
//! - **Nothing left behind.** `Drop` kills every process it started (by pid)
//!   and removes the temp dir; a watchdog per server also kills it if the test
//!   process itself dies without unwinding.
//! - **One [`Error`] for every server**: each variant carries a [`Server`],
//!   so a message names ZooKeeper, etcd or PostgreSQL (and a ZooKeeper
//!   "node", an etcd "member") and says how to install what is missing.
//! - Blocking `std` APIs only (etcd is probed over plain HTTP/1.0 on a
//!   `TcpStream`, ZooKeeper with `srvr`, PostgreSQL with `pg_isready`), so it works from sync tests, async
//!   tests (call it before entering the runtime or via `spawn_blocking`; it
//!   blocks for about a second) and benches alike.

mod etcd;
mod node;
mod ports;
pub mod postgres;
mod probe;
mod process;
mod redis;
mod zookeeper;

pub use etcd::{Etcd, EtcdBuilder, etcd_health};
pub use postgres::Postgres;
pub use probe::{Mode, srvr};
pub use redis::Redis;
pub use zookeeper::{Builder, ZooKeeper};

use std::fmt;
use std::path::PathBuf;

/// Which server an [`Error`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Server {
    /// Apache ZooKeeper ([`ZooKeeper`]).
    ZooKeeper,
    /// etcd ([`Etcd`]).
    Etcd,
    /// PostgreSQL ([`Postgres`]).
    Postgres,
    /// Redis ([`Redis`]).
    Redis,
}

impl Server {
    /// What one server of a cluster is called: a ZooKeeper "node", an etcd "member".
    fn member_word(self) -> &'static str {
        match self {
            Server::ZooKeeper => "node",
            Server::Etcd => "member",
            Server::Postgres => "instance",
            Server::Redis => "member",
        }
    }

    /// How to install it on Debian.
    fn install_hint(self) -> &'static str {
        match self {
            Server::ZooKeeper => "install with `apt-get install -y zookeeper`; Java 17 is required",
            Server::Etcd => "install with `apt-get install -y etcd-server etcd-client`",
            Server::Postgres => "install with `apt-get install -y postgresql` (version 15, Debian 12's)",
            Server::Redis => "install with `apt-get install -y redis-server redis-tools`",
        }
    }
}

impl fmt::Display for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Server::ZooKeeper => "ZooKeeper",
            Server::Etcd => "etcd",
            Server::Postgres => "PostgreSQL",
            Server::Redis => "Redis",
        })
    }
}

/// What starting or controlling a test ZooKeeper or etcd can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The server's programs are missing (`java` or a ZooKeeper jar; `etcd`).
    #[error("{server} is not installed: {detail} ({})", .server.install_hint())]
    NotInstalled {
        /// Which server.
        server: Server,
        /// What is missing.
        detail: String,
    },
    /// A local I/O operation (temp dir, config file, process spawn) failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A server process exited during startup.
    #[error("{server} {} {index} exited during startup ({status}); log tail of {}:\n{tail}", .server.member_word(), .log.display())]
    Exited {
        /// Which server.
        server: Server,
        /// Index of the node or member (0-based).
        index: usize,
        /// Exit status as text.
        status: String,
        /// Its log file.
        log: PathBuf,
        /// The last lines of its log.
        tail: String,
    },
    /// The servers did not become ready in time.
    #[error("{server} did not become ready within {timeout:?}: {detail}; log tails:\n{tails}")]
    NotReady {
        /// Which server.
        server: Server,
        /// How long it waited.
        timeout: std::time::Duration,
        /// What was still missing (e.g. "no leader").
        detail: String,
        /// The last lines of every server's log.
        tails: String,
    },
    /// An index past the cluster size.
    #[error("no {server} {} {index} (the cluster has {len})", .server.member_word())]
    NoSuchNode {
        /// Which server.
        server: Server,
        /// The index asked for.
        index: usize,
        /// How many there are.
        len: usize,
    },
    /// A signal could not be delivered (`kill -STOP`, `kill -CONT`).
    #[error("could not signal {server} {} {index} (pid {pid}) with {signal}: {detail}", .server.member_word())]
    Signal {
        /// Which server.
        server: Server,
        /// Index of the node or member.
        index: usize,
        /// Its process id.
        pid: u32,
        /// The signal name.
        signal: &'static str,
        /// What went wrong.
        detail: String,
    },
    /// The node or member is not running (killed, or never started).
    #[error("{server} {} {index} is not running", .server.member_word())]
    NotRunning {
        /// Which server.
        server: Server,
        /// Index of the node or member.
        index: usize,
    },
}

impl Error {
    fn io(what: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}
