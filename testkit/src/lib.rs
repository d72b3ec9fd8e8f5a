//! Test support for Clastor: a real ZooKeeper, started from Debian's
//! `zookeeper` package on free loopback ports, for integration tests and
//! benches.
//!
//! Design choices:
//! - **Real servers, never mocks.** [`ZooKeeper::start`] launches one
//!   standalone server, [`ZooKeeper::ensemble`] a quorum on one host, each a
//!   `java … QuorumPeerMain zoo.cfg` child process with its own temporary data
//!   directory and log file.
//! - **Parallel-safe.** Every instance picks its own free ports and temp dir;
//!   a port stolen between picking and binding is detected (the JVM exits or
//!   never serves) and the start is retried on fresh ports.
//! - **Fault injection by pid**: [`ZooKeeper::freeze`]/[`ZooKeeper::thaw`]
//!   (SIGSTOP/SIGCONT), [`ZooKeeper::kill`]/[`ZooKeeper::restart`].
//! - **Nothing left behind.** `Drop` kills every process it started (by pid)
//!   and removes the temp dir; a watchdog per server also kills it if the test
//!   process itself dies without unwinding.
//! - Blocking `std` APIs only, so it works from sync tests, async tests
//!   (call it before entering the runtime or via `spawn_blocking`; it blocks
//!   for about a second) and benches alike.

mod node;
mod ports;
mod probe;
mod zookeeper;

pub use probe::{Mode, srvr};
pub use zookeeper::{Builder, ZooKeeper};

use std::path::PathBuf;

/// What starting or controlling a test ZooKeeper can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `java` or a ZooKeeper jar is missing.
    #[error("ZooKeeper is not installed: {0} (install with `apt-get install -y zookeeper`; Java 17 is required)")]
    NotInstalled(String),
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
    #[error("ZooKeeper node {node} exited during startup ({status}); log tail of {log}:\n{tail}")]
    Exited {
        /// Index of the node (0-based).
        node: usize,
        /// Exit status as text.
        status: String,
        /// The node's log file.
        log: PathBuf,
        /// The last lines of its log.
        tail: String,
    },
    /// The servers did not become ready in time.
    #[error("ZooKeeper did not become ready within {secs}s: {detail}; log tails:\n{tails}")]
    NotReady {
        /// The timeout, in seconds.
        secs: u64,
        /// What was still missing (e.g. "no leader").
        detail: String,
        /// The last lines of every node's log.
        tails: String,
    },
    /// A node index past the ensemble size.
    #[error("no ZooKeeper node {0} (ensemble has {1})")]
    NoSuchNode(usize, usize),
    /// A signal could not be delivered (`kill -STOP`, `kill -CONT`).
    #[error("could not signal ZooKeeper node {node} (pid {pid}) with {signal}: {detail}")]
    Signal {
        /// Index of the node.
        node: usize,
        /// Its process id.
        pid: u32,
        /// The signal name.
        signal: &'static str,
        /// What went wrong.
        detail: String,
    },
    /// The node is not running (killed, or never started).
    #[error("ZooKeeper node {0} is not running")]
    NotRunning(usize),
}

impl Error {
    fn io(what: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}
