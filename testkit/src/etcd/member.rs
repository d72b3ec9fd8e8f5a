//! One etcd member: its directory (data dir and log file) and its `etcd`
//! command line; running it (watchdog, signals, log tail) is
//! [`ServerProcess`]'s job.

use std::ffi::OsStr;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::process::ServerProcess;
use crate::{Error, Server};

const ETCD: &str = "etcd";

/// Cluster-wide settings shared by every member of an instance.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub heartbeat_interval: Duration,
    pub election_timeout: Duration,
    pub unsafe_no_fsync: bool,
    /// `--initial-cluster-token`: unique per instance, so members of two
    /// instances can never join each other's cluster.
    pub token: String,
    /// `--initial-cluster`: `member0=http://127.0.0.1:P0,…`.
    pub initial_cluster: String,
}

/// Ports of one member.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ports {
    pub client: u16,
    pub peer: u16,
}

/// `--initial-cluster-state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClusterState {
    /// Bootstrapping: the first start of every member.
    New,
    /// Rejoining with an existing data dir: a restart.
    Existing,
}

/// One member.
#[derive(Debug)]
pub(crate) struct Member {
    pub index: usize,
    pub ports: Ports,
    /// The `etcd` process; dropping it kills the process.
    pub process: ServerProcess,
    dir: PathBuf,
}

/// Checks that `etcd` runs, with an error saying how to install it.
pub(crate) fn check_installed() -> Result<(), Error> {
    let not_installed = |detail: String| Error::NotInstalled {
        server: Server::Etcd,
        detail,
    };
    match Command::new(ETCD)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => Err(not_installed(format!("`etcd --version` failed: {status}"))),
        Err(e) => Err(not_installed(format!("cannot run `etcd`: {e}"))),
    }
}

/// The member's name in `--initial-cluster`.
pub(crate) fn name(index: usize) -> String {
    format!("member{index}")
}

/// `http://127.0.0.1:<port>`.
pub(crate) fn url(port: u16) -> String {
    format!("http://{}", SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
}

/// Removes the variables a program reads as flags (`ETCD_*` for etcd,
/// `ETCDCTL_*` for etcdctl) from its environment: an `ETCD_CONFIG_FILE` or
/// `ETCD_LISTEN_METRICS_URLS` of the developer's shell must not reach a test
/// server. `ETCD_UNSUPPORTED_ARCH` stays: it only lets etcd run at all on
/// platforms it does not support officially.
pub(crate) fn clear_env(command: &mut Command, prefix: &str) {
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if key.starts_with(prefix) && key != "ETCD_UNSUPPORTED_ARCH" {
            command.env_remove(OsStr::new(key));
        }
    }
}

impl Member {
    /// Creates the member's directory (`<root>/member<index>`) without starting it.
    pub(crate) fn new(root: &Path, index: usize, ports: Ports) -> Result<Member, Error> {
        let dir = root.join(name(index));
        fs::create_dir_all(&dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let process = ServerProcess::new(Server::Etcd, index, dir.join("etcd.log"));
        Ok(Member {
            index,
            ports,
            process,
            dir,
        })
    }

    /// The client address.
    pub(crate) fn client_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.ports.client))
    }

    /// The peer address.
    pub(crate) fn peer_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.ports.peer))
    }

    /// `name=peer URL`, this member's entry in `--initial-cluster`.
    pub(crate) fn initial_cluster_entry(&self) -> String {
        format!("{}={}", name(self.index), url(self.ports.peer))
    }

    /// Starts `etcd` (and its watchdog). Every listener is on 127.0.0.1: the
    /// client and peer URLs are, and `--listen-metrics-urls` is left unset
    /// (its default, none), so nothing binds another interface.
    pub(crate) fn spawn(&mut self, settings: &Settings, state: ClusterState) -> Result<(), Error> {
        let client = url(self.ports.client);
        let peer = url(self.ports.peer);
        let mut etcd = Command::new(ETCD);
        clear_env(&mut etcd, "ETCD_");
        etcd.arg("--name")
            .arg(name(self.index))
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &settings.initial_cluster])
            .args(["--initial-cluster-token", &settings.token])
            .arg("--initial-cluster-state")
            .arg(match state {
                ClusterState::New => "new",
                ClusterState::Existing => "existing",
            })
            .arg("--heartbeat-interval")
            .arg(millis(settings.heartbeat_interval))
            .arg("--election-timeout")
            .arg(millis(settings.election_timeout))
            // zap, not 3.4's default capnslog (deprecated, and it warns so at
            // every start); stderr goes to the log file.
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .current_dir(&self.dir);
        if settings.unsafe_no_fsync {
            // In etcd since 3.4.10, though 3.4's `etcd --help` does not list it.
            etcd.arg("--unsafe-no-fsync");
        }
        self.process.spawn(etcd)
    }
}

/// A duration as etcd's whole milliseconds, at least 1.
fn millis(d: Duration) -> String {
    d.as_millis().max(1).to_string()
}
