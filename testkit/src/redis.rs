//! [`Redis`]: one Redis server (Debian's `redis-server`) on a free loopback
//! port with a temporary working directory, no persistence (`--save ''
//! --appendonly no`: a test's data lives exactly as long as the process),
//! with the fault-injection controls tests need and a `redis-cli` command
//! aimed at it.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::ports::free_ports;
use crate::process::ServerProcess;
use crate::{Error, Server};

/// How many times a start is retried on a fresh port after a port conflict.
const START_ATTEMPTS: usize = 4;
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
const POLL: Duration = Duration::from_millis(10);

/// A running test Redis. Dropping it kills the server and removes its
/// directory.
#[derive(Debug)]
pub struct Redis {
    // Declared before `dir` so the process dies before its files go.
    process: ServerProcess,
    port: u16,
    dir: TempDir,
}

impl Redis {
    /// Starts one Redis on a free loopback port and waits until it answers
    /// `PING`.
    ///
    /// # Errors
    /// [`Error::NotInstalled`] without `redis-server`; [`Error::Exited`] or
    /// [`Error::NotReady`] (with the log tail) if it does not come up;
    /// [`Error::Io`] for local file or process errors.
    pub fn start() -> Result<Redis, Error> {
        check_installed()?;
        let mut last_err = None;
        for _ in 0..START_ATTEMPTS {
            let dir = tempfile::Builder::new()
                .prefix("clastor-redis-")
                .tempdir()
                .map_err(|e| Error::io("creating a temp dir", e))?;
            let port = free_ports(1)?[0];
            let log = dir.path().join("redis.log");
            let mut redis = Redis {
                process: ServerProcess::new(Server::Redis, 0, log),
                port,
                dir,
            };
            match redis.spawn_and_wait() {
                Ok(()) => return Ok(redis),
                Err(err) if redis.process.port_conflict() => last_err = Some(err),
                Err(err) => return Err(err),
            }
        }
        Err(last_err.unwrap_or(Error::NotReady {
            server: Server::Redis,
            timeout: STARTUP_TIMEOUT,
            detail: "no start attempt made".into(),
            tails: String::new(),
        }))
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new("redis-server");
        cmd.arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            // No protected-mode surprises, no background saves, no daemon.
            .args(["--daemonize", "no", "--protected-mode", "no"]);
        cmd
    }

    fn spawn_and_wait(&mut self) -> Result<(), Error> {
        let command = self.command();
        self.process.spawn(command)?;
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Some(err) = self.process.exit_error() {
                return Err(err);
            }
            match ping(self.addr()) {
                Ok(()) => return Ok(()),
                Err(detail) if Instant::now() >= deadline => {
                    return Err(Error::NotReady {
                        server: Server::Redis,
                        timeout: STARTUP_TIMEOUT,
                        detail,
                        tails: self.process.tail_section(),
                    });
                }
                Err(_) => thread::sleep(POLL),
            }
        }
    }

    /// Its address, `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Its URL, `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// The temp directory (its working directory and log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }

    /// A `redis-cli` command aimed at it; add the command:
    /// `redis.cli().args(["ZRANGE", "q", "0", "-1"])`.
    pub fn cli(&self) -> Command {
        let mut cli = Command::new("redis-cli");
        cli.args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .env_remove("REDISCLI_AUTH")
            .stdin(Stdio::null());
        cli
    }

    /// Freezes it with SIGSTOP: its socket stays open but nothing is
    /// answered, like a long pause or a hung machine.
    ///
    /// # Errors
    /// [`Error::NotRunning`], [`Error::Signal`].
    pub fn freeze(&mut self) -> Result<(), Error> {
        self.process.signal("STOP")
    }

    /// Resumes it with SIGCONT.
    ///
    /// # Errors
    /// [`Error::NotRunning`], [`Error::Signal`].
    pub fn thaw(&mut self) -> Result<(), Error> {
        self.process.signal("CONT")
    }

    /// Kills it with SIGKILL. Without persistence its data is gone: a
    /// [`Redis::restart`] starts empty (the fencing-token counter too).
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts it again (killing it first if it runs) on the same port and
    /// directory, and waits until it answers `PING`.
    ///
    /// # Errors
    /// As [`Redis::start`].
    pub fn restart(&mut self) -> Result<(), Error> {
        self.process.kill();
        self.spawn_and_wait()
    }
}

/// `redis-server --version` runs.
fn check_installed() -> Result<(), Error> {
    let not_installed = |detail: String| Error::NotInstalled {
        server: Server::Redis,
        detail,
    };
    match Command::new("redis-server")
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => Err(not_installed(format!("`redis-server --version` failed: {status}"))),
        Err(e) => Err(not_installed(format!("cannot run `redis-server`: {e}"))),
    }
}

/// One inline `PING`, answered `+PONG`.
fn ping(addr: SocketAddr) -> Result<(), String> {
    let mut s = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(PROBE_TIMEOUT)).map_err(|e| e.to_string())?;
    s.write_all(b"PING\r\n").map_err(|e| format!("write to {addr}: {e}"))?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).map_err(|e| format!("read from {addr}: {e}"))?;
    let reply = String::from_utf8_lossy(&buf[..n]);
    if reply.starts_with("+PONG") {
        Ok(())
    } else {
        Err(format!("{addr} answered {reply:?} (still loading?)"))
    }
}
