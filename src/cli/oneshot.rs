//! One-shot client commands: `ping`, `acquire`, `release`, `held`, `version`
//! and `info`. Each opens one connection, does one thing, prints it for
//! people (or as JSON with `--json`) and exits.
//!
//! Exit codes, shared by all of them: 0 success; 1 the server said no (lock
//! not acquired in time, an error status); 2 invalid command line; 3 cannot
//! connect or the connection was lost; 4 (`acquire --hold`) the lock was lost
//! while held.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use clastor_client::{Client, Error, HeldLock, HeldScope, KindLayout, KindMode, LockGuard, LockMode};
use serde_json::{Value, json};
use tokio::signal::unix::{Signal, SignalKind, signal};

use super::{ServerOpt, client_runtime};

const EXIT_REFUSED: u8 = 1;
const EXIT_CONNECTION: u8 = 3;
const EXIT_LOST: u8 = 4;

const EXIT_CODES: &str = "Exit status: 0 success; 1 the server said no (not acquired in time, an error \
status), or a --hold wait was interrupted; 2 invalid command line; 3 cannot connect or connection lost; 4 lock lost while held (--hold).";

/// Output format switch shared by the one-shot commands.
#[derive(Debug, Clone, Copy, Args)]
pub(crate) struct OutputOpt {
    /// Print JSON (one object per line) instead of text.
    #[arg(long)]
    pub(super) json: bool,
}

/// Measure round trips to a server.
#[derive(Debug, Args)]
#[command(after_long_help = EXIT_CODES)]
#[command(
    long_about = "Connect (with the HELLO handshake) and send PING COUNT times, printing \
each round-trip time.\n\nExamples:\n  clastor ping\n  clastor ping --server 10.0.0.5:7070 --count 5\n  \
CLASTOR_SERVER=lock-1:7070 clastor ping --json"
)]
pub(crate) struct PingArgs {
    #[command(flatten)]
    server: ServerOpt,
    #[command(flatten)]
    out: OutputOpt,
    /// How many pings to send.
    #[arg(long, short = 'c', default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    count: u32,
}

/// Take a lock (released when this process exits, unless --hold).
#[derive(Debug, Args)]
#[command(after_long_help = EXIT_CODES)]
#[command(long_about = "Acquire a lock and print its fencing token.\n\n\
Locks belong to the connection that took them, and this command's connection closes when it \
exits, so the lock is released right after it is printed. That makes a plain `clastor acquire` \
a test of whether a lock is free. With --hold the command keeps the lock (renewing its lease, if \
any) until Ctrl-C or SIGTERM, then releases it; it exits with 4 if the lock is lost meanwhile. \
To run a program under a lock, use `clastor lock` instead.\n\n\
Examples:\n  clastor acquire transaction tx-1                 # is it free? (try once)\n  \
clastor acquire transaction tx-1 --wait 10s --hold\n  \
clastor acquire transaction tx-1 --lease 30s --hold --json")]
pub(crate) struct AcquireArgs {
    /// Resource kind (namespace), e.g. `transaction`.
    kind: String,
    /// Resource id within the kind, e.g. `tx-1`.
    id: String,
    /// How long to wait for the lock; 0 tries once.
    #[arg(long, short = 'w', value_name = "DURATION", default_value = "0s", value_parser = humantime::parse_duration)]
    wait: Duration,
    /// Ask for a lease: the server releases the lock unless renewed in time
    /// (with --hold it is renewed automatically).
    #[arg(long, short = 'l', value_name = "DURATION", value_parser = humantime::parse_duration)]
    lease: Option<Duration>,
    /// Keep the lock until Ctrl-C or SIGTERM instead of exiting at once.
    #[arg(long)]
    hold: bool,
    /// Take a shared (read) lock: other shared holders may hold it at the
    /// same time, exclusive ones may not.
    #[arg(long)]
    shared: bool,
    /// Trace id for the server's logs and listings (1-32 of A-Z a-z 0-9 - _ . :).
    #[arg(long, value_name = "ID")]
    trace_id: Option<String>,
    #[command(flatten)]
    server: ServerOpt,
    #[command(flatten)]
    out: OutputOpt,
}

/// Release a lock from a fresh connection (which holds none: see --help).
#[derive(Debug, Args)]
#[command(after_long_help = EXIT_CODES)]
#[command(long_about = "Send RELEASE for a lock on a fresh connection.\n\n\
Locks belong to the connection that took them, so a new connection holds nothing and there is \
nothing for it to release: the answer is \"not held\" if the lock is free or held by nobody, and \
NOT_OWNER (exit 1) if another connection holds it. A lock taken by `clastor acquire --hold` is \
released by stopping that command; one taken in `clastor shell` by RELEASE in the same shell. This \
command is useful to check whether someone holds a lock without trying to take it.\n\n\
Examples:\n  clastor release transaction tx-1\n  clastor release transaction tx-1 --json")]
pub(crate) struct ReleaseArgs {
    /// Resource kind.
    kind: String,
    /// Resource id.
    id: String,
    #[command(flatten)]
    server: ServerOpt,
    #[command(flatten)]
    out: OutputOpt,
}

/// List held locks.
#[derive(Debug, Args)]
#[command(after_long_help = EXIT_CODES)]
#[command(
    long_about = "List the locks held through the server, by any connection, with token, \
version, remaining lease and holding connection.\n\n\
Examples:\n  clastor held\n  clastor held --json | jq '.[] | select(.kind == \"transaction\")'"
)]
pub(crate) struct HeldArgs {
    #[command(flatten)]
    server: ServerOpt,
    #[command(flatten)]
    out: OutputOpt,
}

/// Show a kind's current version and mode.
#[derive(Debug, Args)]
#[command(after_long_help = EXIT_CODES)]
#[command(long_about = "Show the current version of a resource kind and whether a version \
rotation is draining it.\n\nExamples:\n  clastor version transaction\n  clastor version transaction --json")]
pub(crate) struct VersionArgs {
    /// Resource kind.
    kind: String,
    #[command(flatten)]
    server: ServerOpt,
    #[command(flatten)]
    out: OutputOpt,
}

/// Show server, backend and counters.
#[derive(Debug, Args)]
#[command(after_long_help = EXIT_CODES)]
#[command(long_about = "Show the server's name, backend, connection and lock counters as \
name=value lines.\n\nExamples:\n  clastor info\n  clastor info --json | jq .locks_held")]
pub(crate) struct InfoArgs {
    #[command(flatten)]
    server: ServerOpt,
    #[command(flatten)]
    out: OutputOpt,
}

/// Runs `body` on a fresh connection and turns its outcome into an exit code.
pub(super) fn run_with<F, Fut>(server: &ServerOpt, out: OutputOpt, body: F) -> ExitCode
where
    F: FnOnce(Client) -> Fut,
    Fut: Future<Output = Result<u8, Error>>,
{
    let runtime = match client_runtime(false) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("clastor: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_CONNECTION);
        }
    };
    let result = runtime.block_on(async {
        let client = server.connect().await?;
        body(client).await
    });
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            report_error(out, &e);
            ExitCode::from(if e.is_connection_error() {
                EXIT_CONNECTION
            } else {
                EXIT_REFUSED
            })
        }
    }
}

pub(super) fn report_error(out: OutputOpt, e: &Error) {
    if out.json {
        let status = e.status().map(|s| s.name());
        println!("{}", json!({ "error": { "status": status, "message": e.to_string() } }));
    } else {
        eprintln!("clastor: {e}");
    }
}

/// `clastor ping`.
pub(crate) fn ping(args: PingArgs) -> ExitCode {
    let PingArgs { server, out, count } = args;
    let addr = server.server.clone();
    run_with(&server, out, |client| async move {
        let info = client.connection_info();
        let mut rtts = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let rtt = client.ping().await?;
            if !out.json {
                println!("PONG from {addr}: time={}", fmt_duration(rtt));
            }
            rtts.push(rtt);
        }
        if out.json {
            let us: Vec<u128> = rtts.iter().map(Duration::as_micros).collect();
            println!(
                "{}",
                json!({
                    "server": addr,
                    "peer": info.as_ref().map(|i| i.peer.to_string()),
                    "server_name": info.as_ref().map(|i| i.server.clone()),
                    "connection_id": info.as_ref().map(|i| i.connection_id),
                    "rtt_us": us,
                })
            );
        } else if count > 1 {
            let min = rtts.iter().min().copied().unwrap_or_default();
            let max = rtts.iter().max().copied().unwrap_or_default();
            let avg = rtts.iter().sum::<Duration>() / count;
            println!(
                "{count} pings: min {} avg {} max {}",
                fmt_duration(min),
                fmt_duration(avg),
                fmt_duration(max)
            );
        }
        Ok(0)
    })
}

/// `clastor acquire`.
pub(crate) fn acquire(args: AcquireArgs) -> ExitCode {
    let AcquireArgs {
        kind,
        id,
        wait,
        lease,
        hold,
        shared,
        trace_id,
        server,
        out,
    } = args;
    let connect_timeout = server.connect_timeout;
    run_with(&server, out, |client| async move {
        let mut signals = if hold {
            Some(StopSignals::register().map_err(|e| Error::InvalidArgument(format!("cannot handle signals: {e}")))?)
        } else {
            None
        };
        let mut req = client.lock(kind.clone(), id.clone()).wait(wait);
        if shared {
            req = req.mode(LockMode::Shared);
        }
        if let Some(trace_id) = trace_id {
            req = req.trace_id(trace_id);
        }
        if let Some(lease) = lease {
            req = req.lease(lease).auto_renew(hold);
        }
        let acquired = match signals.as_mut() {
            // Handlers are installed, so a signal no longer ends the process:
            // it must end the wait. Dropping the acquire is safe (a grant that
            // arrives later is given back), and exiting closes the connection.
            Some(signals) => tokio::select! {
                r = req.acquire() => r?,
                () = signals.recv() => {
                    if out.json {
                        println!("{}", json!({ "acquired": false, "kind": kind, "id": id, "interrupted": true }));
                    } else {
                        eprintln!("clastor: interrupted while waiting for {kind}/{id}");
                    }
                    return Ok(EXIT_REFUSED);
                }
            },
            None => req.acquire().await?,
        };
        let Some(guard) = acquired else {
            if out.json {
                println!(
                    "{}",
                    json!({ "acquired": false, "kind": kind, "id": id, "wait_ms": wait.as_millis() })
                );
            } else {
                eprintln!(
                    "clastor: {kind}/{id} not acquired within {}",
                    humantime::format_duration(wait)
                );
            }
            return Ok(EXIT_REFUSED);
        };
        if out.json {
            println!("{}", guard_json(&guard, hold));
        } else {
            let lease = guard
                .lease()
                .map_or_else(|| "none".to_owned(), |l| humantime::format_duration(l).to_string());
            println!(
                "acquired {kind}/{id} token={} version={} lease={lease} connection={}",
                guard.token(),
                guard.version(),
                guard.connection_id()
            );
        }
        let Some(signals) = signals.as_mut() else {
            // Closing the connection would release it too; releasing first
            // reports any problem.
            guard.release().await?;
            return Ok(0);
        };
        if !out.json {
            eprintln!("holding {kind}/{id}; press Ctrl-C (or send SIGTERM) to release");
        }
        tokio::select! {
            reason = guard.lost() => {
                if out.json {
                    println!("{}", json!({ "lost": true, "kind": kind, "id": id, "reason": reason.to_string() }));
                } else {
                    eprintln!("clastor: lost {kind}/{id} (token {}): {reason}", guard.token());
                }
                Ok(EXIT_LOST)
            }
            () = signals.recv() => {
                // A second signal, or a server that does not answer, ends the
                // wait: closing the connection releases the lock as well.
                tokio::select! {
                    r = tokio::time::timeout(connect_timeout, guard.release()) => match r {
                        Ok(r) => drop(r?),
                        Err(_) => eprintln!("clastor: no answer to the release; closing the connection releases it"),
                    },
                    () = signals.recv() => {}
                }
                if out.json {
                    println!("{}", json!({ "released": true, "kind": kind, "id": id }));
                } else {
                    eprintln!("released {kind}/{id}");
                }
                Ok(0)
            }
        }
    })
}

fn guard_json(guard: &LockGuard, hold: bool) -> Value {
    json!({
        "acquired": true,
        "kind": guard.kind(),
        "id": guard.id(),
        "token": guard.token(),
        "token_str": guard.token().to_string(),
        "version": guard.version(),
        "lease_ms": guard.lease().map(|l| l.as_millis()),
        "connection_id": guard.connection_id(),
        "holding": hold,
    })
}

/// SIGINT (Ctrl-C) and SIGTERM, registered before the lock is taken so a
/// signal arriving right after the grant is not fatal to the process.
struct StopSignals {
    int: Signal,
    term: Signal,
}

impl StopSignals {
    fn register() -> std::io::Result<StopSignals> {
        Ok(StopSignals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
    }
}

/// `clastor release`.
pub(crate) fn release(args: ReleaseArgs) -> ExitCode {
    let ReleaseArgs { kind, id, server, out } = args;
    run_with(&server, out, |client| async move {
        let req = clastor_client::Request::Release {
            kind: kind.clone(),
            id: id.clone(),
            token: 0,
        };
        let resp = client.request(req).await?;
        match resp.result {
            Ok(clastor_client::ResponseBody::Released { released }) => {
                if out.json {
                    println!("{}", json!({ "released": released, "kind": kind, "id": id }));
                } else if released {
                    println!("released {kind}/{id}");
                } else {
                    println!("{kind}/{id} is not held by this connection (nothing to release)");
                }
                Ok(0)
            }
            Ok(other) => Err(Error::Malformed(format!("unexpected {} reply", other.opcode()))),
            Err(e) => Err(e.into()),
        }
    })
}

/// `clastor held`.
pub(crate) fn held(args: HeldArgs) -> ExitCode {
    let HeldArgs { server, out } = args;
    run_with(&server, out, |client| async move {
        let list = client.held(HeldScope::Server).await?;
        if out.json {
            println!("{}", Value::Array(list.iter().map(held_json).collect()));
        } else if list.is_empty() {
            println!("no locks held");
        } else {
            print!("{}", held_table(&list));
        }
        Ok(0)
    })
}

fn held_json(h: &HeldLock) -> Value {
    json!({
        "kind": h.kind,
        "id": h.id,
        "token": h.token,
        "token_str": h.token.to_string(),
        "version": h.version,
        "mode": h.mode.map(LockMode::name),
        "lease_remaining_ms": (h.lease_remaining_ms > 0).then_some(h.lease_remaining_ms),
        "connection_id": h.connection_id,
    })
}

fn held_table(list: &[HeldLock]) -> String {
    let rows: Vec<[String; 6]> = list
        .iter()
        .map(|h| {
            let lease = if h.lease_remaining_ms == 0 {
                "-".to_owned()
            } else {
                format!("{}ms", h.lease_remaining_ms)
            };
            [
                h.kind.clone(),
                h.id.clone(),
                h.token.to_string(),
                h.version.clone(),
                lease,
                h.connection_id.to_string(),
            ]
        })
        .collect();
    let header = ["KIND", "ID", "TOKEN", "VERSION", "LEASE LEFT", "CONNECTION"];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: [&str; 6]| {
        let parts: Vec<String> = cells.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(parts.join("  ").trim_end());
        out.push('\n');
    };
    line(header);
    for row in &rows {
        line([&row[0], &row[1], &row[2], &row[3], &row[4], &row[5]]);
    }
    out
}

/// `clastor version`.
pub(crate) fn version(args: VersionArgs) -> ExitCode {
    let VersionArgs { kind, server, out } = args;
    run_with(&server, out, |client| async move {
        let v = client.version(&kind).await?;
        let mode = match v.mode {
            KindMode::Normal => "normal",
            KindMode::Draining => "draining",
        };
        let layout = v.layout.map(KindLayout::name);
        if out.json {
            let mut j = json!({ "kind": kind, "version": v.version, "mode": mode, "layout": layout });
            if let Some(d) = &v.drain {
                j["to"] = json!(d.to);
                j["remaining"] = json!(d.remaining);
                j["left_ms"] = json!(d.left_ms);
            }
            println!("{j}");
        } else {
            let mut line = format!("{kind} version={} mode={mode}", v.version);
            if let Some(d) = &v.drain {
                line.push_str(&format!(
                    " to={} remaining={} left={}",
                    d.to,
                    d.remaining,
                    fmt_duration(Duration::from_millis(d.left_ms.into()))
                ));
            }
            if let Some(layout) = layout {
                line.push_str(&format!(" layout={layout}"));
            }
            println!("{line}");
        }
        Ok(0)
    })
}

/// `clastor info`.
pub(crate) fn info(args: InfoArgs) -> ExitCode {
    let InfoArgs { server, out } = args;
    run_with(&server, out, |client| async move {
        let pairs = client.info().await?;
        if out.json {
            let map: serde_json::Map<String, Value> = pairs.into_iter().map(|(k, v)| (k, Value::String(v))).collect();
            println!("{}", Value::Object(map));
        } else {
            for (k, v) in pairs {
                println!("{k}={v}");
            }
        }
        Ok(0)
    })
}

/// `123µs`, `1.2ms`, `1.003s`.
pub(super) fn fmt_duration(d: Duration) -> String {
    let us = d.as_micros();
    if us < 1_000 {
        format!("{us}µs")
    } else if us < 1_000_000 {
        format!("{:.1}ms", d.as_secs_f64() * 1e3)
    } else {
        format!("{:.3}s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_durations_and_tables() {
        assert_eq!(fmt_duration(Duration::from_micros(42)), "42µs");
        assert_eq!(fmt_duration(Duration::from_micros(1_250)), "1.2ms");
        assert_eq!(fmt_duration(Duration::from_millis(1_003)), "1.003s");
        let list = [HeldLock {
            kind: "transaction".into(),
            id: "tx-1".into(),
            token: 42,
            version: "v1".into(),
            lease_remaining_ms: 0,
            connection_id: 7,
            trace_id: None,
            mode: None,
        }];
        let table = held_table(&list);
        let mut lines = table.lines();
        assert_eq!(
            lines.next(),
            Some("KIND         ID    TOKEN  VERSION  LEASE LEFT  CONNECTION")
        );
        assert_eq!(lines.next(), Some("transaction  tx-1  42     v1       -           7"));
    }
}
