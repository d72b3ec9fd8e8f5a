//! `clastor rotate`: move a resource kind to a new version, draining the old
//! one first (PROTOCOL.md, "Version rotation"), or abort a rotation.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use clastor_client::{Error, KindLayout, RotationPhase, RotationProgress};
use serde_json::json;
use tokio::signal::unix::{SignalKind, signal};

use super::ServerOpt;
use super::oneshot::{OutputOpt, fmt_duration, report_error, run_with};

/// The rotation was refused or aborted: the kind is as it was.
const EXIT_REFUSED: u8 = 1;
/// The request itself was invalid.
const EXIT_USAGE: u8 = 2;
/// The connection failed.
const EXIT_CONNECTION: u8 = 3;
/// The rotation failed mid-way, or its answer did not come: the kind may be
/// left draining (or switched, not yet cleaned up).
const EXIT_UNKNOWN: u8 = 5;

/// The exit status for a failed rotation, with advice where the kind's
/// state is not known.
fn exit_code(e: &Error, kind: &str) -> u8 {
    match e {
        Error::RotationRefused(_) | Error::RotationAborted(_) => EXIT_REFUSED,
        Error::BadRequest(_) | Error::InvalidName(_) | Error::InvalidArgument(_) => EXIT_USAGE,
        Error::Connect { .. } => EXIT_CONNECTION,
        _ => {
            eprintln!(
                "clastor: the rotation of {kind} may be left half-done: check `clastor version {kind}`, then run the \
same command again to resume it, or `clastor rotate --abort {kind}`"
            );
            EXIT_UNKNOWN
        }
    }
}

const ROTATE_EXIT_CODES: &str = "Exit status: 0 the rotation completed (or, with --abort, the kind is normal); \
1 refused (the kind is not at <FROM>, or another rotation of it runs) or aborted (the drain timed out, \
someone aborted it, or you pressed Ctrl-C): the kind is normal on <FROM>, nothing was lost; \
2 invalid command line or arguments (bad names, FROM = TO); 3 cannot connect; \
5 the rotation failed mid-way, the connection was lost, or you pressed Ctrl-C twice: the kind may be \
left draining — check `clastor version KIND`, then run the same command again to resume it, or --abort.";

/// Move a kind to a new version (or abort a rotation).
#[derive(Debug, Args)]
#[command(after_long_help = ROTATE_EXIT_CODES)]
#[command(long_about = "Rotate a resource kind from version FROM to version TO without ever \
letting two owners hold one id, one under each version.\n\n\
The server checks that FROM is current and marks the kind draining: new acquires of the kind \
wait (within their own wait time) instead of taking locks under FROM, while locks already held \
or queued under FROM carry on and are never revoked. Progress is printed while locks remain. When \
none is left, the kind switches to TO (the waiting acquires proceed there at once) and the old \
subtree is deleted. If the drain does not finish within --drain-timeout, the rotation is aborted: \
the kind goes back to normal on FROM and nothing is lost.\n\n\
If this command is killed, the server stops driving the rotation and leaves the kind draining: \
run the same command again to resume it, or `clastor rotate --abort KIND` to return the kind to \
normal (an abandoned drain also aborts itself once its timeout has passed). Ctrl-C aborts the \
rotation cleanly.\n\n\
Examples:\n  clastor rotate transaction v1 v2\n  \
clastor rotate transaction v1 v2 --drain-timeout 5m --server lock-1:7070\n  \
clastor rotate transaction v1 v2 --json\n  clastor rotate --abort transaction")]
pub(crate) struct RotateArgs {
    /// Resource kind.
    kind: String,
    /// The version the kind is at now.
    #[arg(required_unless_present = "abort")]
    from: Option<String>,
    /// The version to move it to.
    #[arg(required_unless_present = "abort")]
    to: Option<String>,
    /// How long the locks under FROM may take to go before the rotation is
    /// aborted [default: the server's, 60s].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    drain_timeout: Option<Duration>,
    /// The layout TO gets: `mutex` (exclusive locks only; on ZooKeeper
    /// Curator's InterProcessMutex) or `read_write` (shared locks too;
    /// Curator's InterProcessReadWriteLock) [default: FROM's]. Only
    /// ZooKeeper kinds have a choice; move one to read_write only once every
    /// server runs a Clastor that knows layouts.
    #[arg(long, value_name = "LAYOUT", value_parser = parse_layout)]
    layout: Option<KindLayout>,
    /// Abort KIND's rotation instead: back to normal on its current version.
    #[arg(long, conflicts_with_all = ["from", "to"])]
    abort: bool,
    #[command(flatten)]
    server: ServerOpt,
    #[command(flatten)]
    out: OutputOpt,
}

fn parse_layout(s: &str) -> Result<KindLayout, String> {
    KindLayout::from_name(s).ok_or_else(|| format!("{s:?} is neither mutex nor read_write"))
}

/// `clastor rotate`.
pub(crate) fn run(args: RotateArgs) -> ExitCode {
    let RotateArgs {
        kind,
        from,
        to,
        drain_timeout,
        layout,
        abort,
        server,
        out,
    } = args;
    run_with(&server, out, |client| async move {
        if abort {
            let (version, aborted) = client.rotate_abort(&kind).await?;
            if out.json {
                println!("{}", json!({ "kind": kind, "version": version, "aborted": aborted }));
            } else if aborted {
                println!("aborted the rotation of {kind}: normal on {version}");
            } else {
                println!("{kind} is not rotating (normal on {version}); nothing to abort");
            }
            return Ok(0);
        }
        let (Some(from), Some(to)) = (from, to) else {
            return Err(Error::InvalidArgument("FROM and TO are required".into()));
        };
        if !out.json {
            let shown = drain_timeout.map_or_else(
                || {
                    format!(
                        "{} (the server's default)",
                        fmt_duration(clastor::DEFAULT_DRAIN_TIMEOUT)
                    )
                },
                fmt_duration,
            );
            println!("rotating {kind} {from} -> {to} (drain timeout {shown})");
        }
        // Zero asks for the server's default.
        let drain_timeout = drain_timeout.unwrap_or(Duration::ZERO);
        let show = |p: &RotationProgress| print_progress(out.json, p);
        let rotation = client.rotate_to_layout(&kind, &from, &to, layout, drain_timeout, show);
        tokio::pin!(rotation);
        let mut interrupt = signal(SignalKind::interrupt()).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let result = tokio::select! {
            r = &mut rotation => r,
            _ = interrupt.recv() => {
                eprintln!("clastor: interrupted; aborting the rotation of {kind} (Ctrl-C again to leave it as it is)");
                // On the same client, while the rotation waits for its
                // answer (which then says it was aborted). Before the kind
                // is marked there is nothing to abort yet: ask again.
                let aborting = async {
                    loop {
                        match client.rotate_abort(&kind).await {
                            Ok((_, true)) => return,
                            Ok((_, false)) => tokio::time::sleep(Duration::from_millis(100)).await,
                            Err(e) => {
                                eprintln!("clastor: could not abort: {e}");
                                return std::future::pending().await;
                            }
                        }
                    }
                };
                let rotating = async {
                    tokio::join!(aborting, &mut rotation).1
                };
                tokio::select! {
                    r = rotating => r,
                    _ = interrupt.recv() => {
                        eprintln!("clastor: interrupted again; leaving {kind} as it is (check `clastor version {kind}`)");
                        return Ok(EXIT_UNKNOWN);
                    }
                }
            }
        };
        let done = match result {
            Ok(done) => done,
            Err(e) => {
                report_error(out, &e);
                return Ok(exit_code(&e, &kind));
            }
        };
        if out.json {
            println!(
                "{}",
                json!({
                    "status": "ROTATED",
                    "kind": kind,
                    "from": from,
                    "to": done.version,
                    "drain_ms": done.drain_ms,
                    "leftover": done.leftover,
                })
            );
        } else {
            println!(
                "rotated {kind} {from} -> {} (drained in {})",
                done.version,
                fmt_duration(Duration::from_millis(done.drain_ms.into()))
            );
            if done.leftover > 0 {
                println!(
                    "warning: {} node(s) could not be deleted under {from} (a foreign client still using the old path?)",
                    done.leftover
                );
            }
        }
        Ok(0)
    })
}

fn print_progress(json: bool, p: &RotationProgress) {
    if json {
        let holders: Vec<_> = p
            .holders
            .iter()
            .map(|h| json!({ "id": h.id, "holder": h.holder }))
            .collect();
        println!(
            "{}",
            json!({
                "status": "PROGRESS",
                "phase": p.phase.name(),
                "kind": p.kind,
                "from": p.from,
                "to": p.to,
                "remaining": p.remaining,
                "elapsed_ms": p.elapsed_ms,
                "left_ms": p.left_ms,
                "holders": holders,
            })
        );
        return;
    }
    match p.phase {
        RotationPhase::Draining if p.remaining == 0 => println!("draining: no lock left under {}", p.from),
        RotationPhase::Draining => {
            println!(
                "draining: {} lock node(s) left under {}, {} before the drain timeout",
                p.remaining,
                p.from,
                fmt_duration(Duration::from_millis(p.left_ms.into()))
            );
            for h in &p.holders {
                println!("  {} held by {}", h.id, h.holder);
            }
        }
        RotationPhase::Switched => println!("switched {} to {}; deleting {}", p.kind, p.to, p.from),
    }
}
