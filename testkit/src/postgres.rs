//! [`Postgres`]: one PostgreSQL 15 instance from Debian's `postgresql`
//! package, in a temp dir, on a free loopback port, with the freeze/thaw
//! tests need.
//!
//! - `initdb` then `postgres -D … -p PORT -k SOCKDIR -c
//!   listen_addresses=127.0.0.1 -c fsync=off`, run straight from
//!   `/usr/lib/postgresql/15/bin` (no cluster of Debian's `pg_ctlcluster`,
//!   no service). PostgreSQL refuses to run as root: as root, both run as
//!   the `postgres` user (`setpriv`, which execs, so the pid we hold is the
//!   postmaster's), with the temp dir given to that user.
//! - Authentication is `trust` for the `postgres` user on loopback: the
//!   URL is `postgres://postgres@127.0.0.1:PORT/postgres`.
//! - **Freeze means every process of the instance.** A SIGSTOPped
//!   postmaster alone still lets its backends answer queries on open
//!   connections, so [`Postgres::freeze`] stops the postmaster first (it
//!   forks nothing more), then every child of it; [`Postgres::thaw`]
//!   resumes them all.
//! - Dropping it thaws and kills the instance (SIGQUIT: an immediate
//!   shutdown that ends the backends too, then SIGKILL) and removes the
//!   directory; a watchdog kills the postmaster if the test process dies
//!   without unwinding (its backends then exit on their own).

use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::ports::free_ports;
use crate::process::{ServerProcess, process_stopped};
use crate::{Error, Server};

/// Where Debian's `postgresql-15` puts the server's programs.
pub const BIN_DIR: &str = "/usr/lib/postgresql/15/bin";
const START_ATTEMPTS: usize = 4;
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(25);
const SIGNAL_SETTLE: Duration = Duration::from_secs(2);

/// A running test PostgreSQL (module docs).
#[derive(Debug)]
pub struct Postgres {
    // Declared before `dir` so the process dies before its files go.
    process: ServerProcess,
    port: u16,
    frozen: Vec<u32>,
    dir: TempDir,
}

fn bin(name: &str) -> PathBuf {
    Path::new(BIN_DIR).join(name)
}

fn as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A command running `program` as the `postgres` user when we are root.
fn command(program: &Path) -> Command {
    if as_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=postgres", "--regid=postgres", "--init-groups", "--"])
            .arg(program);
        c
    } else {
        Command::new(program)
    }
}

impl Postgres {
    /// Creates a cluster in a temp dir and starts it; waits until it
    /// accepts connections.
    ///
    /// # Errors
    /// [`Error::NotInstalled`] without PostgreSQL 15; [`Error::Exited`] or
    /// [`Error::NotReady`] (with the log tail) if it does not come up;
    /// [`Error::Io`] for local file or process errors.
    pub fn start() -> Result<Postgres, Error> {
        if !bin("postgres").exists() || !bin("initdb").exists() {
            return Err(Error::NotInstalled {
                server: Server::Postgres,
                detail: format!("no {}", bin("postgres").display()),
            });
        }
        let dir = tempfile::Builder::new()
            .prefix("clastor-postgres-")
            .tempdir()
            .map_err(|e| Error::io("creating a temp dir", e))?;
        let data = dir.path().join("data");
        let sockets = dir.path().join("sockets");
        fs::create_dir_all(&sockets).map_err(|e| Error::io("creating the socket dir", e))?;
        if as_root() {
            let out = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .output()
                .map_err(|e| Error::io("running chown", e))?;
            if !out.status.success() {
                return Err(Error::io(
                    "giving the temp dir to the postgres user",
                    std::io::Error::other(String::from_utf8_lossy(&out.stderr).into_owned()),
                ));
            }
        }
        let out = command(&bin("initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| Error::io("running initdb", e))?;
        if !out.status.success() {
            return Err(Error::Exited {
                server: Server::Postgres,
                index: 0,
                status: format!("initdb: {}", out.status),
                log: data.clone(),
                tail: format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            });
        }
        let log = dir.path().join("postgres.log");
        let mut last_err = None;
        for _ in 0..START_ATTEMPTS {
            let port = free_ports(1)?[0];
            let mut process = ServerProcess::new(Server::Postgres, 0, log.clone());
            let mut postgres = command(&bin("postgres"));
            postgres
                .arg("-D")
                .arg(&data)
                .args(["-p", &port.to_string()])
                .arg("-k")
                .arg(&sockets)
                .args([
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "fsync=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "max_connections=200",
                    "-c",
                    "log_min_messages=warning",
                ]);
            process.spawn(postgres)?;
            match wait_ready(&mut process, port) {
                Ok(()) => {
                    return Ok(Postgres {
                        process,
                        port,
                        frozen: Vec::new(),
                        dir,
                    });
                }
                Err(e) => {
                    let conflict = process.port_conflict();
                    process.kill();
                    if !conflict {
                        return Err(e);
                    }
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or(Error::NotReady {
            server: Server::Postgres,
            timeout: STARTUP_TIMEOUT,
            detail: "no start attempt made".into(),
            tails: String::new(),
        }))
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// The postmaster's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// The temp directory (data dir, sockets, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The last `lines` lines of the server's log.
    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }

    /// A `psql` command aimed at it (`-X -q -v ON_ERROR_STOP=1`, no
    /// password); add `-c SQL`.
    pub fn psql(&self) -> Command {
        let mut psql = Command::new(bin("psql"));
        psql.env_remove("PGPASSWORD").env_remove("PGSERVICE").args([
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-At",
            "-d",
            &self.url(),
        ]);
        psql
    }

    /// The pids of the postmaster and every process it forked.
    fn pids(&self) -> Vec<u32> {
        let Some(pm) = self.pid() else { return Vec::new() };
        let mut pids = vec![pm];
        pids.extend(children(pm));
        pids
    }

    /// Freezes the whole instance with SIGSTOP (module docs) and returns
    /// once the kernel reports every process stopped.
    ///
    /// # Errors
    /// [`Error::NotRunning`], [`Error::Signal`].
    pub fn freeze(&mut self) -> Result<(), Error> {
        let pm = self.pid().ok_or(Error::NotRunning {
            server: Server::Postgres,
            index: 0,
        })?;
        // The postmaster first, so it forks nothing after the children are listed.
        signal(pm, "STOP")?;
        let mut all = vec![pm];
        for pid in children(pm) {
            // A child may exit between listing and signalling: not an error.
            if signal(pid, "STOP").is_ok() {
                all.push(pid);
            }
        }
        settle(&all, true);
        self.frozen = all;
        Ok(())
    }

    /// Resumes every process [`Postgres::freeze`] stopped.
    ///
    /// # Errors
    /// [`Error::Signal`] if the postmaster cannot be signalled.
    pub fn thaw(&mut self) -> Result<(), Error> {
        let all = std::mem::take(&mut self.frozen);
        for pid in all.iter().rev() {
            let _ = signal(*pid, "CONT");
        }
        settle(&all, false);
        Ok(())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.thaw();
        if let Some(pm) = self.pid() {
            let all = self.pids();
            // An immediate shutdown ends the backends with the postmaster.
            let _ = signal(pm, "QUIT");
            let deadline = Instant::now() + Duration::from_secs(5);
            while all.iter().any(|p| Path::new(&format!("/proc/{p}")).exists()) && Instant::now() < deadline {
                if self.process.exited().is_some() {
                    // Reaped the postmaster; wait for its children.
                }
                thread::sleep(POLL);
            }
            for p in all.iter().skip(1) {
                let _ = signal(*p, "KILL");
            }
        }
        self.process.kill();
    }
}

/// Waits until the instance accepts connections (`pg_isready`).
fn wait_ready(process: &mut ServerProcess, port: u16) -> Result<(), Error> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        if let Some(err) = process.exit_error() {
            return Err(err);
        }
        let ready = Command::new(bin("pg_isready"))
            .args([
                "-q",
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-U",
                "postgres",
                "-t",
                "1",
            ])
            .stdin(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ready {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::NotReady {
                server: Server::Postgres,
                timeout: STARTUP_TIMEOUT,
                detail: format!("127.0.0.1:{port} does not accept connections"),
                tails: process.tail_section(),
            });
        }
        thread::sleep(POLL);
    }
}

/// The pids whose parent is `parent` (from `/proc/*/stat`).
fn children(parent: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                // The parent is the second field after the command name, which is in parentheses.
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                    == Some(parent)
            })
        })
        .collect()
}

fn signal(pid: u32, signal: &'static str) -> Result<(), Error> {
    let fail = |detail: String| Error::Signal {
        server: Server::Postgres,
        index: 0,
        pid,
        signal,
        detail,
    };
    let out = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .output()
        .map_err(|e| fail(format!("cannot run `kill`: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(fail(String::from_utf8_lossy(&out.stderr).trim().to_owned()))
    }
}

/// Waits until the kernel reports every pid stopped (or running again).
fn settle(pids: &[u32], stopped: bool) {
    let deadline = Instant::now() + SIGNAL_SETTLE;
    while pids.iter().any(|p| process_stopped(*p).is_some_and(|s| s != stopped)) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(1));
    }
}
