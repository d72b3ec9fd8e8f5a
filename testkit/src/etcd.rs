//! [`Etcd`]: one etcd member or a statically bootstrapped cluster on one host
//! (Debian's `etcd-server`), with the fault-injection controls tests need and
//! an `etcdctl` command aimed at it for interop tests.

mod member;
mod probe;

pub use probe::etcd_health;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::ports::free_ports;
use crate::{Error, Server};
use member::{ClusterState, Member, Ports, Settings};

/// How many times a start is retried on fresh ports after a port conflict.
const START_ATTEMPTS: usize = 4;
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
const POLL: Duration = Duration::from_millis(25);

/// Options for starting a test etcd; [`Etcd::start`] and [`Etcd::cluster`]
/// cover the usual cases.
#[derive(Debug, Clone)]
pub struct EtcdBuilder {
    members: usize,
    heartbeat_interval: Duration,
    election_timeout: Duration,
    unsafe_no_fsync: bool,
    startup_timeout: Duration,
}

impl Default for EtcdBuilder {
    fn default() -> EtcdBuilder {
        EtcdBuilder {
            members: 1,
            // etcd's own defaults.
            heartbeat_interval: Duration::from_millis(100),
            election_timeout: Duration::from_millis(1000),
            unsafe_no_fsync: true,
            startup_timeout: Duration::from_secs(30),
        }
    }
}

impl EtcdBuilder {
    /// Number of members: 1 or more.
    #[must_use]
    pub fn members(mut self, members: usize) -> EtcdBuilder {
        self.members = members.max(1);
        self
    }

    /// `--heartbeat-interval` (etcd's default: 100 ms).
    #[must_use]
    pub fn heartbeat_interval(mut self, every: Duration) -> EtcdBuilder {
        self.heartbeat_interval = every;
        self
    }

    /// `--election-timeout` (etcd's default: 1000 ms); etcd refuses to start
    /// unless it is at least 5 heartbeat intervals. 50/500 ms makes failover
    /// tests faster.
    #[must_use]
    pub fn election_timeout(mut self, timeout: Duration) -> EtcdBuilder {
        self.election_timeout = timeout;
        self
    }

    /// `--unsafe-no-fsync`: on by default for speed (a crash of the process
    /// loses nothing, only a crash of the machine would); off for realistic
    /// write latency in benches.
    #[must_use]
    pub fn unsafe_no_fsync(mut self, on: bool) -> EtcdBuilder {
        self.unsafe_no_fsync = on;
        self
    }

    /// How long to wait for every member to be healthy and a leader elected.
    #[must_use]
    pub fn startup_timeout(mut self, timeout: Duration) -> EtcdBuilder {
        self.startup_timeout = timeout;
        self
    }

    /// Starts the members and waits until every one is healthy and one leads.
    ///
    /// # Errors
    /// [`Error::NotInstalled`] without `etcd`; [`Error::Exited`] or
    /// [`Error::NotReady`] (with log tails) if the members do not come up;
    /// [`Error::Io`] for local file or process errors.
    pub fn start(self) -> Result<Etcd, Error> {
        member::check_installed()?;
        let mut last_err = None;
        for _ in 0..START_ATTEMPTS {
            let mut etcd = Etcd::prepare(&self)?;
            let deadline = Instant::now() + self.startup_timeout;
            let started = etcd
                .spawn_in_turn(deadline, self.startup_timeout)
                .and_then(|()| etcd.wait_ready_until(deadline, self.startup_timeout));
            match started {
                Ok(()) => return Ok(etcd),
                Err(err) => {
                    // A port taken by someone else between picking and
                    // binding: try again on fresh ports. Anything else is real.
                    if !etcd.members.iter().any(|m| m.process.port_conflict()) {
                        return Err(err);
                    }
                    last_err = Some(err);
                }
            }
        }
        Err(last_err.unwrap_or(Error::NotReady {
            server: Server::Etcd,
            timeout: self.startup_timeout,
            detail: "no start attempt made".into(),
            tails: String::new(),
        }))
    }
}

/// A running test etcd: one member or a cluster, each member on its own free
/// loopback client and peer ports with a data directory in a temp dir.
/// Dropping it kills every member it started and removes the directory.
#[derive(Debug)]
pub struct Etcd {
    // Declared before `dir` so the processes die before their files go.
    members: Vec<Member>,
    settings: Settings,
    startup_timeout: Duration,
    dir: TempDir,
}

impl Etcd {
    /// Starts one member with etcd's default timings.
    ///
    /// # Errors
    /// See [`EtcdBuilder::start`].
    pub fn start() -> Result<Etcd, Error> {
        EtcdBuilder::default().start()
    }

    /// Starts a cluster of `n` members on this host and waits until every
    /// member is healthy and one leads.
    ///
    /// # Errors
    /// See [`EtcdBuilder::start`].
    pub fn cluster(n: usize) -> Result<Etcd, Error> {
        EtcdBuilder::default().members(n).start()
    }

    /// Options beyond the defaults (timings, fsync, startup timeout).
    pub fn builder() -> EtcdBuilder {
        EtcdBuilder::default()
    }

    /// Picks ports and creates the directories; starts nothing.
    fn prepare(options: &EtcdBuilder) -> Result<Etcd, Error> {
        let dir = tempfile::Builder::new()
            .prefix("clastor-etcd-")
            .tempdir()
            .map_err(|e| Error::io("creating a temp dir", e))?;
        let ports = free_ports(2 * options.members)?;
        let mut members = Vec::with_capacity(options.members);
        for (index, pair) in ports.chunks_exact(2).enumerate() {
            let ports = Ports {
                client: pair[0],
                peer: pair[1],
            };
            members.push(Member::new(dir.path(), index, ports)?);
        }
        let settings = Settings {
            heartbeat_interval: options.heartbeat_interval,
            election_timeout: options.election_timeout,
            unsafe_no_fsync: options.unsafe_no_fsync,
            // The temp dir's name is unique on this host.
            token: dir.path().file_name().map_or_else(
                || String::from("clastor-etcd"),
                |name| name.to_string_lossy().into_owned(),
            ),
            initial_cluster: members
                .iter()
                .map(Member::initial_cluster_entry)
                .collect::<Vec<_>>()
                .join(","),
        };
        Ok(Etcd {
            members,
            settings,
            startup_timeout: options.startup_timeout,
            dir,
        })
    }

    /// Starts the members one after another, each once the one before serves
    /// its peer port. Started all at once, a new member asks every peer whose
    /// port is bound whether it is already in the cluster, and one that is
    /// bound but not yet serving (it is asking the same question) costs a
    /// one-second timeout per peer: two seconds of a three-member start.
    /// A peer that serves answers at once, one that is not bound yet refuses
    /// at once.
    fn spawn_in_turn(&mut self, deadline: Instant, timeout: Duration) -> Result<(), Error> {
        let last = self.members.len().saturating_sub(1);
        for member in &mut self.members {
            member.spawn(&self.settings, ClusterState::New)?;
            if member.index == last {
                break;
            }
            let peer = member.peer_addr();
            while !probe::answers_http(peer, PROBE_TIMEOUT) {
                if let Some(err) = member.process.exit_error() {
                    return Err(err);
                }
                if Instant::now() >= deadline {
                    return Err(Error::NotReady {
                        server: Server::Etcd,
                        timeout,
                        detail: format!("member {} does not serve its peer port {peer}", member.index),
                        tails: member.process.tail_section(),
                    });
                }
                thread::sleep(POLL);
            }
        }
        Ok(())
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Always false (there is at least one member); for clippy's `len` rule.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Client URLs of every member, `http://127.0.0.1:PORT`, in member order.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| member::url(m.ports.client)).collect()
    }

    /// Client URL of member `i`.
    ///
    /// # Panics
    /// If `i` is not a member index (a bug in the test).
    pub fn endpoint(&self, i: usize) -> String {
        member::url(self.member(i).ports.client)
    }

    /// Client address of member `i`.
    ///
    /// # Panics
    /// If `i` is not a member index (a bug in the test).
    pub fn client_addr(&self, i: usize) -> SocketAddr {
        self.member(i).client_addr()
    }

    fn member(&self, i: usize) -> &Member {
        match self.members.get(i) {
            Some(member) => member,
            None => panic!("no etcd member {i} (the cluster has {})", self.members.len()),
        }
    }

    fn member_mut(&mut self, i: usize) -> Result<&mut Member, Error> {
        let len = self.members.len();
        self.members.get_mut(i).ok_or(Error::NoSuchNode {
            server: Server::Etcd,
            index: i,
            len,
        })
    }

    /// The pid of member `i` while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members.get(i).and_then(|m| m.process.pid())
    }

    /// The temp directory holding every member's data dir and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Member `i`'s log file (etcd's zap log, appended across restarts).
    pub fn log_path(&self, i: usize) -> Option<PathBuf> {
        self.members.get(i).map(|m| m.process.log_path().to_path_buf())
    }

    /// The last `lines` lines of member `i`'s log.
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        self.members
            .get(i)
            .map(|m| m.process.log_tail(lines))
            .unwrap_or_default()
    }

    /// An `etcdctl` command aimed at every member (`--endpoints`), with
    /// `ETCDCTL_API=3` and no other `ETCDCTL_*` variable of the caller's
    /// environment; add the subcommand: `etcd.etcdctl().args(["put", "k", "v"])`.
    pub fn etcdctl(&self) -> Command {
        let mut etcdctl = Command::new("etcdctl");
        member::clear_env(&mut etcdctl, "ETCDCTL_");
        etcdctl
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoints().join(",")));
        etcdctl
    }

    /// Index of the member that says it leads (its own id is the leader id in
    /// its `/v3/maintenance/status`); `None` while there is none, or none that
    /// answers. Frozen and killed members are not asked. Should two answer
    /// (an old leader that has not yet heard of the new term), the one with
    /// the higher term wins.
    pub fn leader(&self) -> Option<usize> {
        self.members
            .iter()
            .filter(|m| m.process.is_live())
            .filter_map(|m| {
                let status = probe::status(m.client_addr(), PROBE_TIMEOUT).ok()?;
                status.is_leader().then_some((status.raft_term, m.index))
            })
            .max()
            .map(|(_, index)| index)
    }

    /// Freezes member `i` with SIGSTOP: its sockets stay open but nothing is
    /// answered, like a long GC pause or a hung machine.
    ///
    /// # Errors
    /// [`Error::NoSuchNode`], [`Error::NotRunning`], [`Error::Signal`].
    pub fn freeze(&mut self, i: usize) -> Result<(), Error> {
        self.member_mut(i)?.process.signal("STOP")
    }

    /// Resumes a frozen member with SIGCONT.
    ///
    /// # Errors
    /// [`Error::NoSuchNode`], [`Error::NotRunning`], [`Error::Signal`].
    pub fn thaw(&mut self, i: usize) -> Result<(), Error> {
        self.member_mut(i)?.process.signal("CONT")
    }

    /// Kills member `i` with SIGKILL (a crash: no clean shutdown); its data
    /// dir stays for [`Etcd::restart`].
    ///
    /// # Errors
    /// [`Error::NoSuchNode`].
    pub fn kill(&mut self, i: usize) -> Result<(), Error> {
        self.member_mut(i)?.process.kill();
        Ok(())
    }

    /// Whether member `i`'s process is not running (killed, or exited by itself).
    ///
    /// # Errors
    /// [`Error::NoSuchNode`].
    pub fn is_down(&mut self, i: usize) -> Result<bool, Error> {
        let member = self.member_mut(i)?;
        let _ = member.process.exited();
        Ok(member.process.pid().is_none())
    }

    /// Starts member `i` again after [`Etcd::kill`] (killing it first if it
    /// runs) on the same ports and data dir, with
    /// `--initial-cluster-state existing`, and waits until it is healthy and
    /// the cluster has a leader.
    ///
    /// # Errors
    /// As [`EtcdBuilder::start`].
    pub fn restart(&mut self, i: usize) -> Result<(), Error> {
        let settings = self.settings.clone();
        let member = self.member_mut(i)?;
        member.process.kill();
        member.spawn(&settings, ClusterState::Existing)?;
        let timeout = self.startup_timeout;
        self.wait_ready(timeout)
    }

    /// Waits until every running, unfrozen member answers `/health` with
    /// `{"health":"true"}` and one of them leads.
    ///
    /// # Errors
    /// [`Error::Exited`] if a member died, [`Error::NotReady`] on timeout.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), Error> {
        self.wait_ready_until(Instant::now() + timeout, timeout)
    }

    /// [`Etcd::wait_ready`] with a deadline; `timeout` is for the error message.
    fn wait_ready_until(&mut self, deadline: Instant, timeout: Duration) -> Result<(), Error> {
        loop {
            // Exits first: a member that could not bind its client port must
            // not pass for ready because whoever took the port answers.
            if let Some(err) = self.members.iter_mut().find_map(|m| m.process.exit_error()) {
                return Err(err);
            }
            let detail = match self.readiness() {
                Ok(()) => return Ok(()),
                Err(detail) => detail,
            };
            if Instant::now() >= deadline {
                return Err(Error::NotReady {
                    server: Server::Etcd,
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
        let mut live = 0;
        for member in self.members.iter().filter(|m| m.process.is_live()) {
            live += 1;
            let addr = member.client_addr();
            match etcd_health(addr, PROBE_TIMEOUT) {
                Ok(true) => {}
                Ok(false) => return Err(format!("member {} ({addr}) reports unhealthy", member.index)),
                Err(e) => return Err(format!("member {} ({addr}) does not serve yet: {e}", member.index)),
            }
        }
        if live == 0 {
            return Err(String::from("no member is running"));
        }
        if self.leader().is_none() {
            return Err(String::from("no member says it leads"));
        }
        Ok(())
    }

    fn tails(&self) -> String {
        self.members
            .iter()
            .map(|m| m.process.tail_section())
            .collect::<Vec<_>>()
            .join("\n")
    }
}
