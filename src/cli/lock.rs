//! `clastor lock`: runs a command while holding a lock, like `flock(1)` for a
//! lock service. The command gets the fencing token in its environment; if the
//! lock is lost while it runs, it is stopped (SIGTERM, then SIGKILL after a
//! grace period), because it can no longer assume it is alone.

use std::ffi::OsString;
use std::io;
use std::os::unix::process::ExitStatusExt as _;
use std::process::{ExitCode, ExitStatus};
use std::time::Duration;

use clap::Args;
use clastor_client::{Error, LockGuard};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::signal::unix::{SignalKind, signal};

use super::{ServerOpt, client_runtime};

/// The lock was not granted within --wait (as `timeout(1)` uses 124 for "timed out").
pub const EXIT_NOT_ACQUIRED: u8 = 124;
/// The lock was lost while the command ran (or before it could be released).
pub const EXIT_LOCK_LOST: u8 = 123;
/// Clastor itself failed: cannot connect, server error.
pub const EXIT_CLASTOR_ERROR: u8 = 125;
/// The command was found but could not be run.
pub const EXIT_CANNOT_RUN: u8 = 126;
/// The command was not found.
pub const EXIT_NOT_FOUND: u8 = 127;

/// Run a command while holding a lock.
#[derive(Debug, Args)]
#[command(
    long_about = "Take a lock, run COMMAND while holding it, release it when COMMAND exits, \
and exit with COMMAND's status.\n\n\
COMMAND runs with these environment variables:\n  \
CLASTOR_FENCING_TOKEN  the grant's fencing token; pass it to every store you write to\n  \
CLASTOR_LOCK_KIND      the kind\n  \
CLASTOR_LOCK_ID        the id\n  \
CLASTOR_LOCK_VERSION   the kind's version the lock was taken under\n\n\
The lock belongs to this process's connection to the server. If it is lost while COMMAND runs \
(lease not renewed, server or connection gone), COMMAND gets SIGTERM, then SIGKILL after --grace, \
and clastor exits with 123. With --lease, the lease is renewed automatically while COMMAND runs, \
so the lock outlives a crash of this process by at most one lease. SIGTERM sent to clastor is \
passed on to COMMAND; SIGINT and SIGHUP from a terminal reach COMMAND through its process group, \
and clastor keeps waiting for COMMAND to exit before releasing the lock.\n\n\
Exit status:\n  \
COMMAND's status    COMMAND ran under the lock (128+N if it was killed by signal N)\n  \
123                 the lock was lost while COMMAND ran\n  \
124                 the lock was not acquired within --wait\n  \
125                 clastor failed: cannot connect, server error\n  \
126                 COMMAND could not be run\n  \
127                 COMMAND was not found\n  \
2                   invalid command line\n\n\
Examples:\n  \
clastor lock transaction tx-1 -- ./settle.sh tx-1\n  \
clastor lock nightly report --wait 10m --lease 30s -- make report\n  \
clastor lock transaction tx-1 -- sh -c 'echo \"token $CLASTOR_FENCING_TOKEN\"'"
)]
pub struct LockArgs {
    /// Resource kind (namespace), e.g. `transaction`.
    kind: String,
    /// Resource id within the kind, e.g. `tx-1`.
    id: String,
    /// How long to wait for the lock; 0 tries once (like `flock -n`).
    #[arg(long, short = 'w', value_name = "DURATION", default_value = "0s", value_parser = humantime::parse_duration)]
    wait: Duration,
    /// Hold the lock with a lease, renewed automatically while COMMAND runs.
    #[arg(long, short = 'l', value_name = "DURATION", value_parser = humantime::parse_duration)]
    lease: Option<Duration>,
    /// After the lock is lost, how long COMMAND has between SIGTERM and SIGKILL.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    grace: Duration,
    /// Say nothing but errors.
    #[arg(long, short = 'q')]
    quiet: bool,
    #[command(flatten)]
    server: ServerOpt,
    /// The command to run, and its arguments (after `--`).
    #[arg(required = true, last = true, value_name = "COMMAND")]
    command: Vec<OsString>,
}

/// `clastor lock`.
pub fn run(args: LockArgs) -> ExitCode {
    let runtime = match client_runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("clastor lock: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_CLASTOR_ERROR);
        }
    };
    ExitCode::from(runtime.block_on(lock_and_run(args)))
}

async fn lock_and_run(args: LockArgs) -> u8 {
    let what = format!("{}/{}", args.kind, args.id);
    let client = match args.server.connect().await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("clastor lock: {e}");
            return EXIT_CLASTOR_ERROR;
        }
    };
    let mut req = client.lock(args.kind.clone(), args.id.clone()).wait(args.wait);
    if let Some(lease) = args.lease {
        req = req.lease(lease).auto_renew(true);
    }
    let guard = match req.acquire().await {
        Ok(Some(guard)) => guard,
        Ok(None) => {
            eprintln!(
                "clastor lock: {what} not acquired within {}",
                humantime::format_duration(args.wait)
            );
            return EXIT_NOT_ACQUIRED;
        }
        Err(e) => {
            eprintln!("clastor lock: acquiring {what}: {e}");
            return EXIT_CLASTOR_ERROR;
        }
    };
    if !args.quiet {
        eprintln!("clastor lock: acquired {what} (token {})", guard.token());
    }
    let mut child = match spawn(&args.command, &guard) {
        Ok(child) => child,
        Err(e) => {
            let program = args.command.first().map(|p| p.to_string_lossy()).unwrap_or_default();
            eprintln!("clastor lock: cannot run {program}: {e}");
            let code = if e.kind() == io::ErrorKind::NotFound {
                EXIT_NOT_FOUND
            } else {
                EXIT_CANNOT_RUN
            };
            release(guard, &what).await;
            return code;
        }
    };
    match supervise(&mut child, &guard, args.grace).await {
        Outcome::Exited(status) => match release(guard, &what).await {
            Released::Yes => exit_code(status),
            Released::Lost => EXIT_LOCK_LOST,
        },
        Outcome::Lost => EXIT_LOCK_LOST,
        Outcome::WaitFailed(e) => {
            eprintln!("clastor lock: waiting for the command: {e}");
            release(guard, &what).await;
            EXIT_CLASTOR_ERROR
        }
    }
}

fn spawn(command: &[OsString], guard: &LockGuard) -> io::Result<Child> {
    let (program, args) = command
        .split_first()
        .ok_or_else(|| io::Error::other("no command given"))?;
    Command::new(program)
        .args(args)
        .env("CLASTOR_FENCING_TOKEN", guard.token().to_string())
        .env("CLASTOR_LOCK_KIND", guard.kind())
        .env("CLASTOR_LOCK_ID", guard.id())
        .env("CLASTOR_LOCK_VERSION", guard.version())
        // If this process dies abruptly, its lock goes with its connection:
        // the command must not keep running unprotected.
        .kill_on_drop(true)
        .spawn()
}

enum Outcome {
    Exited(ExitStatus),
    Lost,
    WaitFailed(io::Error),
}

/// Waits for the child, passing on SIGTERM, and stops it if the lock is lost.
async fn supervise(child: &mut Child, guard: &LockGuard, grace: Duration) -> Outcome {
    let mut term = signal(SignalKind::terminate()).ok();
    let mut int = signal(SignalKind::interrupt()).ok();
    let mut hup = signal(SignalKind::hangup()).ok();
    let lost = guard.lost();
    tokio::pin!(lost);
    loop {
        tokio::select! {
            status = child.wait() => {
                return match status {
                    Ok(status) => Outcome::Exited(status),
                    Err(e) => Outcome::WaitFailed(e),
                };
            }
            reason = &mut lost => {
                eprintln!(
                    "clastor lock: lost {}/{} (token {}): {reason}; stopping the command (SIGTERM, SIGKILL after {})",
                    guard.kind(),
                    guard.id(),
                    guard.token(),
                    humantime::format_duration(grace)
                );
                stop(child, grace).await;
                return Outcome::Lost;
            }
            Some(()) = recv(&mut term) => forward(child, Signal::SIGTERM),
            // A terminal sends these to the whole foreground process group,
            // so the command has them already; forwarding would double them.
            // Catching them keeps this process alive to release the lock.
            Some(()) = recv(&mut int) => {}
            Some(()) = recv(&mut hup) => {}
        }
    }
}

async fn recv(sig: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match sig {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

fn forward(child: &Child, sig: Signal) {
    if let Some(pid) = child.id().and_then(|id| i32::try_from(id).ok()) {
        // The child may have exited in between; its wait() arm reports that.
        let _ = kill(Pid::from_raw(pid), sig);
    }
}

/// SIGTERM, then SIGKILL if the child is still there after `grace`.
async fn stop(child: &mut Child, grace: Duration) {
    forward(child, Signal::SIGTERM);
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        eprintln!("clastor lock: the command did not exit within the grace period; sending SIGKILL");
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
}

enum Released {
    Yes,
    Lost,
}

/// Releases the lock after the command finished. A lock found lost at this
/// point may have been lost while the command ran, so it counts as lost.
async fn release(guard: LockGuard, what: &str) -> Released {
    match guard.release().await {
        Ok(()) => Released::Yes,
        Err(Error::LockLost(reason)) => {
            eprintln!("clastor lock: {what} was lost before it could be released ({reason})");
            Released::Lost
        }
        Err(e) if e.is_connection_error() => {
            eprintln!("clastor lock: {what}: connection lost before the release ({e}); the lock may have lapsed early");
            Released::Lost
        }
        Err(e) => {
            // The command ran under the lock; the server will release it when
            // this process's connection closes.
            eprintln!("clastor lock: releasing {what}: {e}");
            Released::Yes
        }
    }
}

/// The child's exit status as ours: its code, or 128+N if killed by signal N.
fn exit_code(status: ExitStatus) -> u8 {
    if let Some(code) = status.code() {
        return u8::try_from(code & 0xff).unwrap_or(1);
    }
    match status.signal() {
        Some(sig) => u8::try_from(128 + (sig & 0x7f)).unwrap_or(255),
        None => 1,
    }
}
