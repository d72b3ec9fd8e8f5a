//! [`ZooKeeper`]: a standalone server or an ensemble on one host, with the
//! fault-injection controls tests need.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::node::{self, Node, Ports, Settings};
use crate::ports::free_ports;
use crate::probe::{Mode, srvr};
use crate::{Error, Server};

/// How many times a start is retried on fresh ports after a port conflict.
const START_ATTEMPTS: usize = 4;
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
const POLL: Duration = Duration::from_millis(50);

/// Options for starting a test ZooKeeper; [`ZooKeeper::start`] and
/// [`ZooKeeper::ensemble`] cover the usual cases.
#[derive(Debug, Clone)]
pub struct Builder {
    nodes: usize,
    tick: Duration,
    force_sync: bool,
    container_check: Duration,
    startup_timeout: Duration,
}

impl Default for Builder {
    fn default() -> Builder {
        Builder {
            nodes: 1,
            // 250 ms allows session timeouts down to 500 ms (2 × tickTime).
            tick: Duration::from_millis(250),
            force_sync: false,
            container_check: Duration::from_secs(1),
            startup_timeout: Duration::from_secs(60),
        }
    }
}

impl Builder {
    /// Number of servers: 1 is standalone, more is an ensemble.
    #[must_use]
    pub fn nodes(mut self, nodes: usize) -> Builder {
        self.nodes = nodes.max(1);
        self
    }

    /// ZooKeeper's `tickTime`; the smallest session timeout allowed is twice it.
    #[must_use]
    pub fn tick_time(mut self, tick: Duration) -> Builder {
        self.tick = tick;
        self
    }

    /// `forceSync` (fsync of the transaction log); off by default for speed,
    /// on for realistic latency in benches.
    #[must_use]
    pub fn force_sync(mut self, on: bool) -> Builder {
        self.force_sync = on;
        self
    }

    /// How often empty container nodes are reaped
    /// (`-Dznode.container.checkIntervalMs`).
    #[must_use]
    pub fn container_check_interval(mut self, every: Duration) -> Builder {
        self.container_check = every;
        self
    }

    /// How long to wait for the servers to serve (and elect a leader).
    #[must_use]
    pub fn startup_timeout(mut self, timeout: Duration) -> Builder {
        self.startup_timeout = timeout;
        self
    }

    /// Starts the servers and waits until they serve.
    ///
    /// # Errors
    /// [`Error::NotInstalled`] without `java` or the jars; [`Error::Exited`] or
    /// [`Error::NotReady`] (with log tails) if the servers do not come up;
    /// [`Error::Io`] for local file or process errors.
    pub fn start(self) -> Result<ZooKeeper, Error> {
        node::check_installed()?;
        let settings = Settings {
            tick: self.tick,
            force_sync: self.force_sync,
            container_check: self.container_check,
        };
        let mut last_err = None;
        for _ in 0..START_ATTEMPTS {
            let mut zk = ZooKeeper::launch(self.nodes, settings.clone(), self.startup_timeout)?;
            match zk.wait_ready(self.startup_timeout) {
                Ok(()) => return Ok(zk),
                Err(err) => {
                    // A port taken by someone else between picking and
                    // binding: try again on fresh ports. Anything else is real.
                    if !zk.nodes.iter().any(|n| n.process.port_conflict()) {
                        return Err(err);
                    }
                    last_err = Some(err);
                }
            }
        }
        Err(last_err.unwrap_or(Error::NotReady {
            server: Server::ZooKeeper,
            timeout: self.startup_timeout,
            detail: "no start attempt made".into(),
            tails: String::new(),
        }))
    }
}

/// A running test ZooKeeper: one standalone server or an ensemble, each node on
/// its own free loopback ports with a temporary data directory. Dropping it
/// kills every server it started and removes the directory.
#[derive(Debug)]
pub struct ZooKeeper {
    // Declared before `dir` so the processes die before their files go.
    nodes: Vec<Node>,
    settings: Settings,
    startup_timeout: Duration,
    dir: TempDir,
}

impl ZooKeeper {
    /// Starts a standalone server.
    ///
    /// # Errors
    /// See [`Builder::start`].
    pub fn start() -> Result<ZooKeeper, Error> {
        Builder::default().start()
    }

    /// Starts an ensemble of `n` servers on this host and waits until it has a
    /// leader and every node serves.
    ///
    /// # Errors
    /// See [`Builder::start`].
    pub fn ensemble(n: usize) -> Result<ZooKeeper, Error> {
        Builder::default().nodes(n).start()
    }

    /// Options beyond the defaults (tick time, forceSync, timeouts).
    pub fn builder() -> Builder {
        Builder::default()
    }

    fn launch(n: usize, settings: Settings, startup_timeout: Duration) -> Result<ZooKeeper, Error> {
        let dir = tempfile::Builder::new()
            .prefix("clastor-zk-")
            .tempdir()
            .map_err(|e| Error::io("creating a temp dir", e))?;
        let ports = free_ports(3 * n)?;
        let mut nodes = Vec::with_capacity(n);
        for (index, chunk) in ports.chunks_exact(3).enumerate() {
            let ports = Ports {
                client: chunk[0],
                quorum: chunk[1],
                election: chunk[2],
            };
            nodes.push(Node::new(dir.path(), index, ports)?);
        }
        let peers: Vec<(usize, Ports)> = if n > 1 {
            nodes.iter().map(|node| (node.sid(), node.ports)).collect()
        } else {
            Vec::new()
        };
        let mut zk = ZooKeeper {
            nodes,
            settings,
            startup_timeout,
            dir,
        };
        for node in &zk.nodes {
            node.write_config(&zk.settings, &peers)?;
        }
        for node in &mut zk.nodes {
            node.spawn(&zk.settings)?;
        }
        Ok(zk)
    }

    /// Number of servers.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Always false (there is at least one server); for clippy's `len` rule.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Connect string for clients: `127.0.0.1:p1,127.0.0.1:p2,…`.
    pub fn connect_string(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.addr().to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Client address of node `i`.
    ///
    /// # Panics
    /// If `i` is not a node index (a bug in the test).
    pub fn addr(&self, i: usize) -> SocketAddr {
        match self.nodes.get(i) {
            Some(node) => node.addr(),
            None => panic!("no ZooKeeper node {i} (ensemble has {})", self.nodes.len()),
        }
    }

    /// The JVM pid of node `i` while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes.get(i).and_then(|n| n.process.pid())
    }

    /// The temp directory holding every node's data, config and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Node `i`'s log file.
    pub fn log_path(&self, i: usize) -> Option<PathBuf> {
        self.nodes.get(i).map(|n| n.process.log_path().to_path_buf())
    }

    /// The last `lines` lines of node `i`'s log.
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        self.nodes.get(i).map(|n| n.process.log_tail(lines)).unwrap_or_default()
    }

    fn node_mut(&mut self, i: usize) -> Result<&mut Node, Error> {
        let len = self.nodes.len();
        self.nodes.get_mut(i).ok_or(Error::NoSuchNode {
            server: Server::ZooKeeper,
            index: i,
            len,
        })
    }

    /// Node `i`'s role per `srvr`; `None` if it does not answer or does not
    /// serve (starting, frozen, killed, no quorum).
    pub fn mode(&self, i: usize) -> Option<Mode> {
        let node = self.nodes.get(i)?;
        if !node.process.is_live() {
            return None;
        }
        srvr(node.addr(), PROBE_TIMEOUT)
            .ok()
            .as_deref()
            .and_then(Mode::from_srvr)
    }

    /// Index of the node that says `Mode: leader` (or the standalone server).
    pub fn leader(&self) -> Option<usize> {
        (0..self.nodes.len()).find(|&i| matches!(self.mode(i), Some(Mode::Leader | Mode::Standalone)))
    }

    /// Freezes node `i` with SIGSTOP: its sockets stay open but nothing is
    /// answered, like a long GC pause or a hung machine.
    ///
    /// # Errors
    /// [`Error::NoSuchNode`], [`Error::NotRunning`], [`Error::Signal`].
    pub fn freeze(&mut self, i: usize) -> Result<(), Error> {
        self.node_mut(i)?.process.signal("STOP")
    }

    /// Resumes a frozen node with SIGCONT.
    ///
    /// # Errors
    /// [`Error::NoSuchNode`], [`Error::NotRunning`], [`Error::Signal`].
    pub fn thaw(&mut self, i: usize) -> Result<(), Error> {
        self.node_mut(i)?.process.signal("CONT")
    }

    /// Kills node `i` with SIGKILL (a crash: no clean shutdown).
    ///
    /// # Errors
    /// [`Error::NoSuchNode`].
    pub fn kill(&mut self, i: usize) -> Result<(), Error> {
        self.node_mut(i)?.process.kill();
        Ok(())
    }

    /// Starts node `i` again after [`ZooKeeper::kill`] (same ports and data)
    /// and waits until it serves and the ensemble has a leader.
    ///
    /// # Errors
    /// As [`Builder::start`].
    pub fn restart(&mut self, i: usize) -> Result<(), Error> {
        let settings = self.settings.clone();
        let node = self.node_mut(i)?;
        node.process.kill();
        node.spawn(&settings)?;
        let timeout = self.startup_timeout;
        self.wait_ready(timeout)
    }

    /// Waits until every running node serves and, for an ensemble, one of them
    /// leads.
    ///
    /// # Errors
    /// [`Error::Exited`] if a node died, [`Error::NotReady`] on timeout.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        loop {
            let detail = match self.readiness() {
                Ok(()) => return Ok(()),
                Err(detail) => detail,
            };
            if let Some(err) = self.exit_error() {
                return Err(err);
            }
            if Instant::now() >= deadline {
                return Err(Error::NotReady {
                    server: Server::ZooKeeper,
                    timeout,
                    detail,
                    tails: self.tails(),
                });
            }
            thread::sleep(POLL);
        }
    }

    /// `Ok` when ready, else what is missing.
    fn readiness(&self) -> Result<(), String> {
        let standalone = self.nodes.len() == 1;
        let mut leaders = 0;
        for (i, node) in self.nodes.iter().enumerate() {
            if !node.process.is_live() {
                continue;
            }
            match self.mode(i) {
                Some(Mode::Standalone) if standalone => {}
                Some(Mode::Leader) => leaders += 1,
                Some(Mode::Follower | Mode::Observer) if !standalone => {}
                Some(mode) => return Err(format!("node {i} reports unexpected mode {mode:?}")),
                None => return Err(format!("node {i} ({}) does not serve yet", node.addr())),
            }
        }
        if !standalone && leaders != 1 {
            return Err(format!("{leaders} leaders"));
        }
        Ok(())
    }

    /// An error for the first node whose JVM exited, if any.
    fn exit_error(&mut self) -> Option<Error> {
        self.nodes.iter_mut().find_map(|n| n.process.exit_error())
    }

    fn tails(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.process.tail_section())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Whether node `i`'s JVM is not running (killed, or exited by itself).
    ///
    /// # Errors
    /// [`Error::NoSuchNode`].
    pub fn is_down(&mut self, i: usize) -> Result<bool, Error> {
        let node = self.node_mut(i)?;
        let _ = node.process.exited();
        Ok(node.process.pid().is_none())
    }
}
