//! `clastor lock`: runs a command while holding a lock, like `flock(1)` for a
//! lock service. The command gets the fencing token in its environment; if the
//! lock is lost while it runs, it is stopped (SIGTERM, then SIGKILL after a
//! grace period), because it can no longer assume it is alone. So it is when
//! the lock falls into jeopardy (the server stopped confirming it, PROTOCOL.md
//! "Safe-until"): SIGTERM early enough that the SIGKILL after the grace lands
//! before the lock's safe-until, before anyone else can be granted it.
//!
//! The command runs in its own process group, and every signal goes to the
//! whole group, so whatever it started in the background stops with it. What
//! this cannot cover: if clastor itself is killed with SIGKILL, the command
//! keeps running (making the kernel kill it with its parent takes
//! `PR_SET_PDEATHSIG` in `pre_exec`, which needs `unsafe`). The server then
//! releases the lock as the connection closes, so only the fencing token still
//! keeps the orphaned command's writes out of the stores.

use std::ffi::OsString;
use std::io;
use std::os::unix::process::ExitStatusExt as _;
use std::process::{ExitCode, ExitStatus};
use std::time::Duration;

use clap::Args;
use clastor_client::{Error, LockGuard, LockMode, MultiLockGuard};
use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::signal::unix::{SignalKind, signal};

use super::{ServerOpt, client_runtime};

/// `--grace` when not given (or a third of the server's safe window, if shorter).
const DEFAULT_GRACE: Duration = Duration::from_secs(1);

/// Slack for timers and scheduling between the SIGKILL and the safe-until.
fn kill_margin(grace: Duration) -> Duration {
    (grace / 10).clamp(Duration::from_millis(20), Duration::from_millis(100))
}

/// The lock was not granted within --wait (as `timeout(1)` uses 124 for "timed out").
pub(crate) const EXIT_NOT_ACQUIRED: u8 = 124;
/// The lock was lost while the command ran (or before it could be released).
pub(crate) const EXIT_LOCK_LOST: u8 = 123;
/// Clastor itself failed: cannot connect, server error.
pub(crate) const EXIT_CLASTOR_ERROR: u8 = 125;
/// The command was found but could not be run.
pub(crate) const EXIT_CANNOT_RUN: u8 = 126;
/// The command was not found.
pub(crate) const EXIT_NOT_FOUND: u8 = 127;

/// Run a command while holding a lock.
#[derive(Debug, Args)]
#[command(
    long_about = "Take a lock, run COMMAND while holding it, release it when COMMAND exits, \
and exit with COMMAND's status.\n\n\
COMMAND runs with these environment variables:\n  \
CLASTOR_FENCING_TOKEN  the grant's fencing token; pass it to every store you write to\n  \
CLASTOR_LOCK_KIND      the kind\n  \
CLASTOR_LOCK_ID        the id\n  \
CLASTOR_LOCK_VERSION   the kind's version the lock was taken under\n  \
CLASTOR_FENCING_TOKEN_<n>  with --and: the token of the n-th key (0: KIND ID, then each --and in order)\n  \
CLASTOR_LOCKS          every lock as JSON: [{\"kind\",\"id\",\"token\" (a decimal string),\"version\"}]\n\n\
With --and KIND/ID (repeatable) clastor takes several locks, all or none, in one global order (so \
two runs naming the same keys in different orders cannot deadlock); a loss of any stops COMMAND.\n\n\
The lock belongs to this process's connection to the server. COMMAND runs in its own process \
group. If the lock is lost while COMMAND runs (lease not renewed, server or connection gone), that \
whole group (COMMAND and whatever it started) gets SIGTERM, then SIGKILL after --grace, and \
clastor exits with 123. The same happens, in time, when the server stops confirming the lock \
(a frozen server, a cut network): the server states with every grant and confirmation until when \
nobody else can be granted the lock (its safe-until), and COMMAND gets SIGTERM --grace before \
that instant, so the SIGKILL lands before anyone else can hold the lock. --grace must therefore \
be shorter than the server's safe window (seconds; clastor refuses to start COMMAND otherwise). With --lease, the lease is renewed automatically while COMMAND runs. \
SIGINT, SIGHUP and SIGTERM sent to clastor (Ctrl-C included) are passed on to COMMAND's group, and \
clastor keeps waiting for COMMAND to exit before releasing the lock; a signal during that release \
makes it stop waiting (the server releases the lock when the connection closes). If clastor itself \
is killed with SIGKILL, COMMAND keeps running unsupervised: the server releases the lock when the \
connection closes (at once, or when a lease runs out if the host vanished), and only the fencing \
token still protects the stores COMMAND writes to. Since COMMAND is not in the terminal's \
foreground process group, a COMMAND that reads from the terminal is stopped (SIGTTIN); give it \
its input another way.\n\n\
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
clastor lock transaction tx-1 --retry-connect 30s -- ./settle.sh tx-1   # ride out a server restart\n  \
clastor lock account alice --and account/bob -- ./transfer.sh alice bob\n  \
clastor lock nightly report --wait 10m --lease 30s -- make report\n  \
clastor lock transaction tx-1 -- sh -c 'echo \"token $CLASTOR_FENCING_TOKEN\"'"
)]
pub(crate) struct LockArgs {
    /// Resource kind (namespace), e.g. `transaction`.
    kind: String,
    /// Resource id within the kind, e.g. `tx-1`.
    id: String,
    /// More locks to hold with the first, as KIND/ID (repeatable): all are
    /// taken, in one global order so that no two `clastor lock` runs can
    /// deadlock, or none.
    #[arg(long = "and", value_name = "KIND/ID", value_parser = parse_key)]
    and: Vec<(String, String)>,
    /// How long to wait for the lock; 0 tries once (like `flock -n`).
    #[arg(long, short = 'w', value_name = "DURATION", default_value = "0s", value_parser = humantime::parse_duration)]
    wait: Duration,
    /// Take shared (read) locks: other shared holders may hold them at the
    /// same time, exclusive ones may not. Needs a kind in the read-write
    /// layout on ZooKeeper (`clastor rotate --layout read_write`).
    #[arg(long)]
    shared: bool,
    /// Hold the lock with a lease, renewed automatically while COMMAND runs.
    #[arg(long, short = 'l', value_name = "DURATION", value_parser = humantime::parse_duration)]
    lease: Option<Duration>,
    /// After the lock is lost, or before its safe-until runs out unconfirmed,
    /// how long COMMAND has between SIGTERM and SIGKILL. Must be shorter than
    /// the server's safe window (a ZooKeeper-backed server guarantees about
    /// half its session timeout; a lease bounds it too). Default: 1s, or a
    /// third of the window if that is shorter (a short lease).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    grace: Option<Duration>,
    /// Keep trying to reach the server and take the lock this long when it is
    /// down or restarting (connection errors, unavailable backend); contention
    /// is still governed by --wait alone.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    retry_connect: Option<Duration>,
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
pub(crate) fn run(args: LockArgs) -> ExitCode {
    let runtime = match client_runtime(args.quiet) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("clastor lock: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_CLASTOR_ERROR);
        }
    };
    ExitCode::from(runtime.block_on(lock_and_run(args)))
}

/// `KIND/ID`, for `--and`.
fn parse_key(s: &str) -> Result<(String, String), String> {
    match s.split_once('/') {
        Some((kind, id)) if !kind.is_empty() && !id.is_empty() => Ok((kind.to_owned(), id.to_owned())),
        _ => Err(format!("{s:?} is not KIND/ID")),
    }
}

async fn lock_and_run(args: LockArgs) -> u8 {
    // The keys as given (the first is the positional one); the client takes
    // them in its global order.
    let keys: Vec<(String, String)> = std::iter::once((args.kind.clone(), args.id.clone()))
        .chain(args.and.iter().cloned())
        .collect();
    let what = keys
        .iter()
        .map(|(k, i)| format!("{k}/{i}"))
        .collect::<Vec<_>>()
        .join(" + ");
    let started = tokio::time::Instant::now();
    let retry_until = args.retry_connect.and_then(|d| started.checked_add(d));
    let client = loop {
        match args.server.connect().await {
            Ok(c) => break c,
            Err(e) if e.is_retryable() && retry_until.is_some_and(|t| tokio::time::Instant::now() < t) => {
                if !args.quiet {
                    eprintln!("clastor lock: {e}; retrying");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => {
                eprintln!("clastor lock: {e}");
                return EXIT_CLASTOR_ERROR;
            }
        }
    };
    let mut req = client
        .lock_many(keys.iter().cloned())
        .wait(args.wait)
        .mode(if args.shared {
            LockMode::Shared
        } else {
            LockMode::Exclusive
        });
    if let Some(until) = retry_until {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        req = req.retry(clastor_client::RetryPolicy::until(left));
    }
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
        eprintln!("clastor lock: acquired {what} (token {})", tokens(&guard, &keys));
    }
    let mut grace = args.grace.unwrap_or(DEFAULT_GRACE);
    if let Some(mut until) = guard.safe_until() {
        let window = |until: tokio::time::Instant| until.saturating_duration_since(tokio::time::Instant::now());
        if window(until) <= grace {
            // After a queue wait the grant's own count (from the send) may
            // leave little: the client confirms at once; judge by that.
            if let Ok(Some(confirmed)) = tokio::time::timeout(Duration::from_secs(2), guard.confirmation()).await {
                until = confirmed;
            }
        }
        let window = window(until);
        if args.grace.is_none() {
            grace = grace.min(window / 3);
        }
        if window <= grace + kill_margin(grace) {
            eprintln!(
                "clastor lock: --grace {} does not fit in the {} the server guarantees {what} for; \
                 choose a shorter --grace",
                humantime::format_duration(grace),
                humantime::format_duration(Duration::from_millis(window.as_millis().try_into().unwrap_or(u64::MAX)))
            );
            release(guard, &what, None, args.server.connect_timeout).await;
            return EXIT_CLASTOR_ERROR;
        }
    }
    // Before the spawn: from now on these signals are passed on, not fatal,
    // so none can end this process and leave the command unsupervised.
    let mut signals = match Signals::register() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("clastor lock: cannot handle signals: {e}");
            release(guard, &what, None, args.server.connect_timeout).await;
            return EXIT_CLASTOR_ERROR;
        }
    };
    let mut child = match spawn(&args.command, &guard, &keys) {
        Ok(child) => child,
        Err(e) => {
            let program = args.command.first().map(|p| p.to_string_lossy()).unwrap_or_default();
            eprintln!("clastor lock: cannot run {program}: {e}");
            let code = if e.kind() == io::ErrorKind::NotFound {
                EXIT_NOT_FOUND
            } else {
                EXIT_CANNOT_RUN
            };
            release(guard, &what, Some(&mut signals), args.server.connect_timeout).await;
            return code;
        }
    };
    let Some(group) = child.id().and_then(|id| i32::try_from(id).ok()).map(Pid::from_raw) else {
        // Only a child already reaped has no id; nothing was spawned here.
        eprintln!("clastor lock: the command has no process id");
        release(guard, &what, Some(&mut signals), args.server.connect_timeout).await;
        return EXIT_CLASTOR_ERROR;
    };
    let timeout = args.server.connect_timeout;
    match supervise(&mut child, group, &guard, &what, grace, &mut signals).await {
        Outcome::Exited(status) => match release(guard, &what, Some(&mut signals), timeout).await {
            Released::Yes => exit_code(status),
            Released::Lost => EXIT_LOCK_LOST,
        },
        Outcome::Lost => EXIT_LOCK_LOST,
        Outcome::WaitFailed(e) => {
            eprintln!("clastor lock: waiting for the command: {e}");
            release(guard, &what, Some(&mut signals), timeout).await;
            EXIT_CLASTOR_ERROR
        }
    }
}

/// The tokens of `keys`, in their order, for messages.
fn tokens(guard: &MultiLockGuard, keys: &[(String, String)]) -> String {
    keys.iter()
        .filter_map(|(k, i)| guard.token(k, i))
        .map(|t| t.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Runs the command with the locks in its environment: the first key's as
/// `CLASTOR_FENCING_TOKEN` and `CLASTOR_LOCK_*`, every key's token as
/// `CLASTOR_FENCING_TOKEN_<n>` in command-line order, and all of them as
/// JSON in `CLASTOR_LOCKS` (tokens as decimal strings).
fn spawn(command: &[OsString], guard: &MultiLockGuard, keys: &[(String, String)]) -> io::Result<Child> {
    let (program, args) = command
        .split_first()
        .ok_or_else(|| io::Error::other("no command given"))?;
    let held: Vec<&LockGuard> = keys
        .iter()
        .filter_map(|(k, i)| guard.guards().iter().find(|g| g.kind() == k && g.id() == i))
        .collect();
    let first = held.first().ok_or_else(|| io::Error::other("no lock held"))?;
    let json = serde_json::Value::Array(
        held.iter()
            .map(|g| {
                serde_json::json!({
                    "kind": g.kind(),
                    "id": g.id(),
                    "token": g.token().to_string(),
                    "version": g.version(),
                })
            })
            .collect(),
    );
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env("CLASTOR_FENCING_TOKEN", first.token().to_string())
        .env("CLASTOR_LOCK_KIND", first.kind())
        .env("CLASTOR_LOCK_ID", first.id())
        .env("CLASTOR_LOCK_VERSION", first.version())
        .env("CLASTOR_LOCKS", json.to_string())
        // The command gets its locks, not this client's credential.
        .env_remove("CLASTOR_TOKEN");
    for (n, g) in held.iter().enumerate() {
        cmd.env(format!("CLASTOR_FENCING_TOKEN_{n}"), g.token().to_string());
    }
    cmd
        // Its own group, so a loss stops everything it started, not just it.
        .process_group(0)
        // If this function's caller unwinds or returns early, the command must
        // not outlive its supervision. (This does nothing when the process is
        // killed outright; see the module comment.)
        .kill_on_drop(true)
        .spawn()
}

enum Outcome {
    Exited(ExitStatus),
    Lost,
    WaitFailed(io::Error),
}

/// Waits for the child, passing on SIGINT, SIGHUP and SIGTERM to its process
/// group, and stops the group if the lock is lost.
async fn supervise(
    child: &mut Child,
    group: Pid,
    guard: &MultiLockGuard,
    what: &str,
    grace: Duration,
    signals: &mut Signals,
) -> Outcome {
    let lost = guard.lost();
    tokio::pin!(lost);
    // SIGTERM this much more before the safe-until, so the SIGKILL lands
    // before it despite timer and scheduling lateness.
    let jeopardy = guard.jeopardy_within(grace + kill_margin(grace));
    tokio::pin!(jeopardy);
    loop {
        tokio::select! {
            // A loss also ends the jeopardy wait: report it as the loss.
            biased;
            status = child.wait() => {
                return match status {
                    Ok(status) => Outcome::Exited(status),
                    Err(e) => Outcome::WaitFailed(e),
                };
            }
            reason = &mut lost => {
                let lock = guard.guards().iter().find(|g| g.is_lost()).map_or_else(
                    || what.to_owned(),
                    |g| format!("{}/{} (token {})", g.kind(), g.id(), g.token()),
                );
                eprintln!(
                    "clastor lock: lost {lock}: {reason}; stopping the command (SIGTERM, SIGKILL after {})",
                    humantime::format_duration(grace)
                );
                stop(child, group, grace).await;
                return Outcome::Lost;
            }
            () = &mut jeopardy, if !guard.is_lost() => {
                let lock = guard.guards().iter().find(|g| !g.is_safe()).map_or_else(
                    || what.to_owned(),
                    |g| format!("{}/{} (token {})", g.kind(), g.id(), g.token()),
                );
                eprintln!(
                    "clastor lock: {lock} in jeopardy: the server has not confirmed it, and another \
                     holder may be granted it within {}; stopping the command (SIGTERM, SIGKILL after {})",
                    humantime::format_duration(grace),
                    humantime::format_duration(grace)
                );
                stop(child, group, grace).await;
                return Outcome::Lost;
            }
            // The command is in its own process group, out of the terminal's
            // reach: what clastor receives is meant for it.
            sig = signals.recv() => signal_group(group, sig),
        }
    }
}

/// SIGINT, SIGHUP and SIGTERM, caught from before the command starts until
/// clastor exits.
struct Signals {
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Signals {
    fn register() -> io::Result<Signals> {
        Ok(Signals {
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            term: signal(SignalKind::terminate())?,
        })
    }

    /// The next signal received.
    async fn recv(&mut self) -> Signal {
        tokio::select! {
            _ = self.int.recv() => Signal::SIGINT,
            _ = self.hup.recv() => Signal::SIGHUP,
            _ = self.term.recv() => Signal::SIGTERM,
        }
    }
}

fn signal_group(group: Pid, sig: Signal) {
    // The group may be gone already; the wait() arm reports the exit.
    let _ = killpg(group, sig);
}

/// Whether any process of the group is still alive (zombies not yet reaped
/// by their new parent count).
fn group_alive(group: Pid) -> bool {
    !matches!(killpg(group, None), Err(Errno::ESRCH))
}

/// SIGTERM to the whole group, then SIGKILL if the child, or anything else in
/// its group, is still there after `grace`.
async fn stop(child: &mut Child, group: Pid, grace: Duration) {
    signal_group(group, Signal::SIGTERM);
    let deadline = tokio::time::Instant::now().checked_add(grace);
    let until_deadline = async {
        if child.wait().await.is_err() {
            return;
        }
        // The child is reaped; what it left behind in its group (background
        // jobs) gets the rest of the grace period. Those processes are not
        // ours to wait for, so look now and then.
        while group_alive(group) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let finished = match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline, until_deadline).await.is_ok(),
        None => {
            until_deadline.await;
            true
        }
    };
    if !finished {
        eprintln!("clastor lock: the command did not exit within the grace period; sending SIGKILL");
        signal_group(group, Signal::SIGKILL);
        let _ = child.wait().await;
    }
}

enum Released {
    Yes,
    Lost,
}

/// Releases the lock after the command finished. A lock found lost at this
/// point may have been lost while the command ran, so it counts as lost.
///
/// Waits at most `timeout` for the server, and stops waiting on a signal: the
/// server releases the lock anyway when this process's connection closes.
async fn release(guard: MultiLockGuard, what: &str, signals: Option<&mut Signals>, timeout: Duration) -> Released {
    let interrupted = async {
        match signals {
            Some(s) => s.recv().await,
            None => std::future::pending().await,
        }
    };
    let result = tokio::select! {
        r = tokio::time::timeout(timeout, guard.release()) => r,
        sig = interrupted => {
            eprintln!("clastor lock: {sig} while releasing {what}; the server releases it as this process exits");
            return Released::Yes;
        }
    };
    match result {
        Ok(Ok(clastor_client::Released::AlreadyGone(reason)) | Err(Error::LockLost(reason))) => {
            eprintln!("clastor lock: {what} was lost before it could be released ({reason})");
            Released::Lost
        }
        Ok(Ok(_)) => Released::Yes,
        Ok(Err(e)) if e.is_connection_error() => {
            eprintln!("clastor lock: {what}: connection lost before the release ({e}); the lock may have lapsed early");
            Released::Lost
        }
        Ok(Err(e)) => {
            // The command ran under the lock; the server will release it when
            // this process's connection closes.
            eprintln!("clastor lock: releasing {what}: {e}");
            Released::Yes
        }
        Err(_) => {
            eprintln!(
                "clastor lock: no answer to the release of {what} within {}; the server releases it as this process exits",
                humantime::format_duration(timeout)
            );
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
