//! One ZooKeeper server process: its `zoo.cfg`, data directory and log file,
//! the JVM child and a watchdog that kills the JVM if the test process dies
//! without running `Drop` (a CI timeout, `SIGKILL`).

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use crate::Error;

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
    dir: PathBuf,
    child: Option<Child>,
    watchdog: Option<Child>,
    stopped: bool,
}

/// Checks that `java` and the jars are there, with an error naming what is missing.
pub(crate) fn check_installed() -> Result<(), Error> {
    for jar in REQUIRED_JARS {
        let path = Path::new(JAVA_DIR).join(jar);
        if !path.exists() {
            return Err(Error::NotInstalled(format!("{} is missing", path.display())));
        }
    }
    match Command::new("java")
        .arg("-version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => Err(Error::NotInstalled(format!("`java -version` failed: {status}"))),
        Err(e) => Err(Error::NotInstalled(format!("cannot run `java`: {e}"))),
    }
}

impl Node {
    /// Creates the node's directory (`<root>/node<index>`) without starting it.
    pub(crate) fn new(root: &Path, index: usize, ports: Ports) -> Result<Node, Error> {
        let dir = root.join(format!("node{index}"));
        let node = Node {
            index,
            ports,
            dir,
            child: None,
            watchdog: None,
            stopped: false,
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

    /// The node's log file (stdout and stderr of the JVM, appended across restarts).
    pub(crate) fn log_path(&self) -> PathBuf {
        self.dir.join("zookeeper.log")
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
        if self.child.is_some() {
            return Ok(());
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| Error::io(format!("opening {}", self.log_path().display()), e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| Error::io("duplicating the log file handle", e))?;
        let classpath = format!("{JAVA_DIR}/zookeeper.jar:{JAVA_DIR}/slf4j-simple.jar");
        let child = Command::new("java")
            .arg(format!(
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
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .spawn()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Error::NotInstalled(format!("cannot run `java`: {e}")),
                _ => Error::io("spawning java", e),
            })?;
        let pid = child.id();
        self.child = Some(child);
        self.stopped = false;
        // The watchdog polls both pids; it ends by itself when the JVM exits.
        let watchdog = Command::new("sh")
            .arg("-c")
            .arg("while kill -0 \"$0\" 2>/dev/null && kill -0 \"$1\" 2>/dev/null; do sleep 1; done; kill -9 \"$1\" 2>/dev/null")
            .arg(std::process::id().to_string())
            .arg(pid.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        // A missing watchdog only matters if the test process dies without unwinding.
        self.watchdog = watchdog.ok();
        Ok(())
    }

    /// The JVM's pid while it runs.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// If the JVM exited, its status (and the node is marked not running).
    pub(crate) fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())?;
        self.child = None;
        self.reap_watchdog();
        Some(status)
    }

    /// Sends SIGSTOP/SIGCONT (`kill -STOP <pid>`), without `unsafe`.
    pub(crate) fn signal(&mut self, signal: &'static str) -> Result<(), Error> {
        let pid = self.pid().ok_or(Error::NotRunning(self.index))?;
        let out = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .output()
            .map_err(|e| Error::Signal {
                node: self.index,
                pid,
                signal,
                detail: format!("cannot run `kill`: {e}"),
            })?;
        if !out.status.success() {
            return Err(Error::Signal {
                node: self.index,
                pid,
                signal,
                detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        self.stopped = signal == "STOP";
        // `kill` returns once the signal is queued; the JVM's threads stop a
        // moment later. Wait until the kernel says so, or a request sent right
        // after a freeze could still be answered.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while process_stopped(pid) != Some(self.stopped) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Ok(())
    }

    /// Whether the node was frozen with SIGSTOP and not thawed.
    pub(crate) fn is_frozen(&self) -> bool {
        self.stopped
    }

    /// SIGKILLs the JVM (frozen or not) and waits for it.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.stopped = false;
        self.reap_watchdog();
    }

    fn reap_watchdog(&mut self) {
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
    }

    /// The last `lines` lines of the node's log.
    pub(crate) fn log_tail(&self, lines: usize) -> String {
        let Ok(mut file) = File::open(self.log_path()) else {
            return String::from("(no log)");
        };
        let mut text = String::new();
        if std::io::Read::read_to_string(&mut file, &mut text).is_err() {
            return String::from("(unreadable log)");
        }
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Whether the log says a port could not be bound (a port stolen between
    /// picking and binding).
    pub(crate) fn port_conflict(&self) -> bool {
        let tail = self.log_tail(200);
        tail.contains("Address already in use") || tail.contains("BindException")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether process `pid` is stopped (state `T` in `/proc/<pid>/stat`); `None`
/// where that cannot be read (not Linux, or the process is gone).
fn process_stopped(pid: u32) -> Option<bool> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The state follows the command name, which is in parentheses.
    let state = stat.rsplit_once(')')?.1.split_whitespace().next()?;
    Some(state == "T" || state == "t")
}
