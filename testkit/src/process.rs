//! One server child process under test, whatever the server: spawned with
//! stdout and stderr appended to its log file, a watchdog that kills it if the
//! test process dies without running `Drop` (a CI timeout, `SIGKILL`),
//! SIGSTOP/SIGCONT and SIGKILL by pid, and its log's tail for error messages.
//! The ZooKeeper, etcd and PostgreSQL launchers differ only in how they build
//! the command.

use std::fs::{File, OpenOptions};
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::{Error, Server};

/// How long [`ServerProcess::signal`] waits for the kernel to report the
/// process stopped or running again.
const SIGNAL_SETTLE: Duration = Duration::from_secs(2);
/// Lines of log quoted in startup errors.
pub(crate) const LOG_TAIL_LINES: usize = 30;

/// A server process (member `index` of its cluster) and its log file; not
/// running until [`ServerProcess::spawn`].
#[derive(Debug)]
pub(crate) struct ServerProcess {
    server: Server,
    index: usize,
    log: PathBuf,
    child: Option<Child>,
    watchdog: Option<Child>,
    stopped: bool,
}

impl ServerProcess {
    pub(crate) fn new(server: Server, index: usize, log: PathBuf) -> ServerProcess {
        ServerProcess {
            server,
            index,
            log,
            child: None,
            watchdog: None,
            stopped: false,
        }
    }

    /// Runs `command` (unless it already runs) with stdin closed and stdout and
    /// stderr appended to the log, and starts its watchdog.
    pub(crate) fn spawn(&mut self, mut command: Command) -> Result<(), Error> {
        if self.child.is_some() {
            return Ok(());
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| Error::io(format!("opening {}", self.log.display()), e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| Error::io("duplicating the log file handle", e))?;
        let program = command.get_program().to_string_lossy().into_owned();
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .spawn()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Error::NotInstalled {
                    server: self.server,
                    detail: format!("cannot run `{program}`: {e}"),
                },
                _ => Error::io(format!("spawning {program}"), e),
            })?;
        let pid = child.id();
        self.child = Some(child);
        self.stopped = false;
        // The watchdog polls both pids; it ends by itself when the server exits.
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

    /// The pid while the process runs.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process runs and is not frozen, so it may answer.
    pub(crate) fn is_live(&self) -> bool {
        self.child.is_some() && !self.stopped
    }

    /// If the process exited, its status (and it is marked not running).
    pub(crate) fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())?;
        self.child = None;
        self.reap_watchdog();
        Some(status)
    }

    /// [`Error::Exited`] with the log tail if the process exited.
    pub(crate) fn exit_error(&mut self) -> Option<Error> {
        let status = self.exited()?;
        Some(Error::Exited {
            server: self.server,
            index: self.index,
            status: status.to_string(),
            log: self.log.clone(),
            tail: self.log_tail(LOG_TAIL_LINES),
        })
    }

    /// Sends SIGSTOP or SIGCONT (`kill -STOP <pid>`, without `unsafe`) and
    /// returns once the kernel reports the process stopped or running.
    pub(crate) fn signal(&mut self, signal: &'static str) -> Result<(), Error> {
        let pid = self.pid().ok_or(Error::NotRunning {
            server: self.server,
            index: self.index,
        })?;
        let fail = |detail: String| Error::Signal {
            server: self.server,
            index: self.index,
            pid,
            signal,
            detail,
        };
        let out = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .output()
            .map_err(|e| fail(format!("cannot run `kill`: {e}")))?;
        if !out.status.success() {
            return Err(fail(String::from_utf8_lossy(&out.stderr).trim().to_owned()));
        }
        self.stopped = signal == "STOP";
        // `kill` returns once the signal is queued; the server's threads stop a
        // moment later. Wait until the kernel says so, or a request sent right
        // after a freeze could still be answered.
        let deadline = Instant::now() + SIGNAL_SETTLE;
        while process_stopped(pid) != Some(self.stopped) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// SIGKILLs the process (frozen or not) and waits for it.
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

    /// The log file (appended across restarts).
    pub(crate) fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last `lines` lines of the log.
    pub(crate) fn log_tail(&self, lines: usize) -> String {
        let Ok(mut file) = File::open(&self.log) else {
            return String::from("(no log)");
        };
        let mut bytes = Vec::new();
        if file.read_to_end(&mut bytes).is_err() {
            return String::from("(unreadable log)");
        }
        let text = String::from_utf8_lossy(&bytes);
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The log tail under a header naming the process, for [`Error::NotReady`].
    pub(crate) fn tail_section(&self) -> String {
        format!(
            "--- {} {} {} ({}) ---\n{}",
            self.server,
            self.server.member_word(),
            self.index,
            self.log.display(),
            self.log_tail(LOG_TAIL_LINES)
        )
    }

    /// Whether the log says a port could not be bound (a port stolen between
    /// picking and binding): Java's `BindException: Address already in use`,
    /// Go's `bind: address already in use`, PostgreSQL's `could not bind
    /// IPv4 address …: Address already in use`.
    pub(crate) fn port_conflict(&self) -> bool {
        let tail = self.log_tail(200).to_ascii_lowercase();
        tail.contains("address already in use") || tail.contains("bindexception")
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether process `pid` is stopped (state `T` in `/proc/<pid>/stat`); `None`
/// where that cannot be read (not Linux, or the process is gone).
pub(crate) fn process_stopped(pid: u32) -> Option<bool> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The state follows the command name, which is in parentheses.
    let state = stat.rsplit_once(')')?.1.split_whitespace().next()?;
    Some(state == "T" || state == "t")
}
