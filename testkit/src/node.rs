//! One ZooKeeper server: its `zoo.cfg`, data directory and log file, and the
//! `java … QuorumPeerMain` command line; running it (watchdog, signals, log
//! tail) is [`ServerProcess`]'s job.

use std::fmt::Write as _;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::process::ServerProcess;
use crate::{Error, Server};

const JAVA_DIR: &str = "/usr/share/java";
/// Jars that must be present; `zookeeper.jar`'s manifest `Class-Path` pulls in
/// the rest (jute, netty, metrics, snappy, jline, commons, jackson, jetty).
const REQUIRED_JARS: [&str; 4] = [
    "zookeeper.jar",
    "zookeeper-jute.jar",
    "slf4j-api.jar",
    "slf4j-simple.jar",
];
const MAIN_CLASS: &str = "org.apache.zookeeper.server.quorum.QuorumPeerMain";

/// Server-wide settings shared by every node of an instance.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub tick: Duration,
    pub force_sync: bool,
    pub container_check: Duration,
}

/// Ports of one node.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ports {
    pub client: u16,
    pub quorum: u16,
    pub election: u16,
}

/// One server.
#[derive(Debug)]
pub(crate) struct Node {
    pub index: usize,
    pub ports: Ports,
    /// The JVM; dropping it kills the JVM.
    pub process: ServerProcess,
    dir: PathBuf,
}

/// Checks that `java` and the jars are there, with an error naming what is missing.
pub(crate) fn check_installed() -> Result<(), Error> {
    for jar in REQUIRED_JARS {
        let path = Path::new(JAVA_DIR).join(jar);
        if !path.exists() {
            return Err(not_installed(format!("{} is missing", path.display())));
        }
    }
    match Command::new("java")
        .arg("-version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => Err(not_installed(format!("`java -version` failed: {status}"))),
        Err(e) => Err(not_installed(format!("cannot run `java`: {e}"))),
    }
}

fn not_installed(detail: String) -> Error {
    Error::NotInstalled {
        server: Server::ZooKeeper,
        detail,
    }
}

impl Node {
    /// Creates the node's directory (`<root>/node<index>`) without starting it.
    pub(crate) fn new(root: &Path, index: usize, ports: Ports) -> Result<Node, Error> {
        let dir = root.join(format!("node{index}"));
        let process = ServerProcess::new(Server::ZooKeeper, index, dir.join("zookeeper.log"));
        let node = Node {
            index,
            ports,
            process,
            dir,
        };
        fs::create_dir_all(node.data_dir())
            .map_err(|e| Error::io(format!("creating {}", node.data_dir().display()), e))?;
        Ok(node)
    }

    /// ZooKeeper's server id (`myid`): 1-based.
    pub(crate) fn sid(&self) -> usize {
        self.index + 1
    }

    /// The client address.
    pub(crate) fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.ports.client))
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn config_path(&self) -> PathBuf {
        self.dir.join("zoo.cfg")
    }

    /// Writes `zoo.cfg` (and `myid` for an ensemble member). `peers` is empty
    /// for a standalone server.
    pub(crate) fn write_config(&self, settings: &Settings, peers: &[(usize, Ports)]) -> Result<(), Error> {
        let tick = settings.tick.as_millis().max(1);
        let mut cfg = String::new();
        // `writeln!` to a String cannot fail.
        let _ = writeln!(cfg, "tickTime={tick}");
        let _ = writeln!(cfg, "initLimit=20");
        let _ = writeln!(cfg, "syncLimit=10");
        let _ = writeln!(cfg, "dataDir={}", self.data_dir().display());
        let _ = writeln!(cfg, "clientPort={}", self.ports.client);
        let _ = writeln!(cfg, "clientPortAddress=127.0.0.1");
        let _ = writeln!(cfg, "admin.enableServer=false");
        let _ = writeln!(cfg, "4lw.commands.whitelist=*");
        let _ = writeln!(cfg, "forceSync={}", if settings.force_sync { "yes" } else { "no" });
        let _ = writeln!(cfg, "minSessionTimeout={}", 2 * tick);
        let _ = writeln!(cfg, "maxSessionTimeout=60000");
        let _ = writeln!(cfg, "maxClientCnxns=0");
        for (sid, ports) in peers {
            let _ = writeln!(cfg, "server.{sid}=127.0.0.1:{}:{}", ports.quorum, ports.election);
        }
        fs::write(self.config_path(), cfg)
            .map_err(|e| Error::io(format!("writing {}", self.config_path().display()), e))?;
        if !peers.is_empty() {
            let myid = self.data_dir().join("myid");
            fs::write(&myid, format!("{}\n", self.sid()))
                .map_err(|e| Error::io(format!("writing {}", myid.display()), e))?;
        }
        Ok(())
    }

    /// Starts the JVM (and its watchdog).
    pub(crate) fn spawn(&mut self, settings: &Settings) -> Result<(), Error> {
        let classpath = format!("{JAVA_DIR}/zookeeper.jar:{JAVA_DIR}/slf4j-simple.jar");
        let mut java = Command::new("java");
        java.arg(format!(
            "-Dznode.container.checkIntervalMs={}",
            settings.container_check.as_millis()
        ))
        .arg("-Dorg.slf4j.simpleLogger.showDateTime=true")
        .arg("-Dorg.slf4j.simpleLogger.dateTimeFormat=HH:mm:ss.SSS")
        .arg("-Dzookeeper.jmx.log4j.disable=true")
        .args([
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",
            "-Xms32m",
            "-Xmx256m",
            "-Xss512k",
        ])
        .arg("-cp")
        .arg(classpath)
        .arg(MAIN_CLASS)
        .arg(self.config_path())
        .current_dir(&self.dir);
        self.process.spawn(java)
    }
}
