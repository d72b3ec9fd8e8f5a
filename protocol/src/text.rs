//! The line-based text form of the protocol, for netcat-style debugging.
//!
//! One command per line, words separated by spaces, command names
//! case-insensitive. Replies start with `+` (success) or `-` (error), pushed
//! events with `!`; multi-line replies end with a line holding only `.`.
//! Parsing yields the same [`Request`] values as the binary form, so both forms
//! share one dispatch path on the server and one grammar for tools.

use std::fmt::Write as _;

use thiserror::Error;

use crate::constants::MAX_TOKEN_LEN;
use crate::message::{Acquire, AuthToken, Event, HeldScope, KindLayout, LockMode, Request, Response, ResponseBody};
use crate::rotation::{Rotate, RotationProgress};
use crate::status::Status;

/// Longest accepted command line, in bytes (without the line ending).
pub const MAX_LINE_LEN: usize = 1024;

/// A parsed text command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// A protocol request.
    Request(Request),
    /// List the commands.
    Help,
    /// Close the connection.
    Quit,
    /// An empty line: ignored.
    Empty,
}

/// A line that is not a valid command.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{message}")]
pub struct ParseError {
    /// `BAD_REQUEST` or `UNKNOWN_OPCODE`.
    pub status: Status,
    /// What was wrong, with the usage line where it helps.
    pub message: String,
}

/// One line per command, as shown by `HELP`.
pub const USAGE: &[&str] = &[
    "PING",
    "AUTH <token>                               authenticate (when the server requires it)",
    "ACQUIRE <kind> <id> [wait_ms] [lease_ms] [trace_id]   wait_ms 0 (default) tries once; lease_ms 0 (default) = no lease",
    "ACQUIRE_SHARED <kind> <id> [wait_ms] [lease_ms] [trace_id]   the same, shared (a reader: many at a time, no writer)",
    "RELEASE <kind> <id> [token]                token: only that grant (default: whichever this connection holds)",
    "RENEW <kind> <id> <lease_ms> [token]",
    "HELD [ALL]                                 this connection's locks, or every lock of the server",
    "VERSION <kind>",
    "ROTATE <kind> <from> <to> [drain_timeout_ms] [mutex|read_write]   move kind to version <to> (and layout), draining <from> first",
    "ROTATE_ABORT <kind>                        abort a rotation: back to normal on the current version",
    "INFO",
    "HELP",
    "QUIT",
];

/// Parses one line (without its line ending; a trailing `\r` is ignored).
pub fn parse(line: &str) -> Result<Command, ParseError> {
    let line = line.strip_suffix('\r').unwrap_or(line);
    let mut words = line.split(' ').filter(|w| !w.is_empty());
    let Some(cmd) = words.next() else {
        return Ok(Command::Empty);
    };
    let args: Vec<&str> = words.collect();
    let arity = |min: usize, max: usize, usage: &str| {
        if (min..=max).contains(&args.len()) {
            Ok(())
        } else {
            Err(bad(format!("wrong number of arguments; usage: {usage}")))
        }
    };
    let owned = |i: usize| args[i].to_owned();
    let request = match cmd.to_ascii_uppercase().as_str() {
        "QUIT" => return arity(0, 0, "QUIT").map(|()| Command::Quit),
        "HELP" => return arity(0, 0, "HELP").map(|()| Command::Help),
        "PING" => arity(0, 0, "PING").map(|()| Request::Ping)?,
        "INFO" => arity(0, 0, "INFO").map(|()| Request::Info)?,
        "CONFIRM" => arity(0, 0, "CONFIRM").map(|()| Request::Confirm)?,
        // The usage line never echoes the token.
        "AUTH" => {
            arity(1, 1, "AUTH <token>")?;
            if args[0].len() > MAX_TOKEN_LEN {
                return Err(bad(format!("token longer than {MAX_TOKEN_LEN} bytes")));
            }
            Request::Auth {
                token: AuthToken::new(owned(0)),
            }
        }
        name @ ("ACQUIRE" | "ACQUIRE_SHARED") => {
            let mode = if name == "ACQUIRE" {
                LockMode::Exclusive
            } else {
                LockMode::Shared
            };
            arity(2, 5, &format!("{name} <kind> <id> [wait_ms] [lease_ms] [trace_id]"))?;
            Request::Acquire(Acquire {
                kind: owned(0),
                id: owned(1),
                wait_ms: args.get(2).map(|w| number("wait_ms", w)).transpose()?.unwrap_or(0),
                lease_ms: args.get(3).map(|w| number("lease_ms", w)).transpose()?.unwrap_or(0),
                mode,
                trace_id: args.get(4).map(|w| (*w).to_owned()),
            })
        }
        "RELEASE" => {
            arity(2, 3, "RELEASE <kind> <id> [token]")?;
            Request::Release {
                kind: owned(0),
                id: owned(1),
                token: args.get(2).map(|w| token(w)).transpose()?.unwrap_or(0),
            }
        }
        "RENEW" => {
            arity(3, 4, "RENEW <kind> <id> <lease_ms> [token]")?;
            Request::Renew {
                kind: owned(0),
                id: owned(1),
                lease_ms: number("lease_ms", args[2])?,
                token: args.get(3).map(|w| token(w)).transpose()?.unwrap_or(0),
            }
        }
        "HELD" => {
            arity(0, 1, "HELD [ALL]")?;
            match args.first() {
                None => Request::Held {
                    scope: HeldScope::Connection,
                },
                Some(a) if a.eq_ignore_ascii_case("ALL") => Request::Held {
                    scope: HeldScope::Server,
                },
                Some(_) => return Err(bad("usage: HELD [ALL]".to_owned())),
            }
        }
        "VERSION" => {
            arity(1, 1, "VERSION <kind>")?;
            Request::Version { kind: owned(0) }
        }
        "ROTATE" => {
            const USAGE: &str = "ROTATE <kind> <from> <to> [drain_timeout_ms] [mutex|read_write]";
            arity(3, 5, USAGE)?;
            // The layout is a word, the drain timeout a number: either may
            // come alone, in that order.
            let (mut drain, mut layout) = (None, None);
            for (i, word) in args.iter().enumerate().skip(3) {
                match KindLayout::from_name(word) {
                    Some(l) if layout.is_none() => layout = Some(l),
                    None if i == 3 => drain = Some(number("drain_timeout_ms", word)?),
                    _ => return Err(bad(format!("usage: {USAGE}"))),
                }
            }
            Request::Rotate(Rotate {
                kind: owned(0),
                from: owned(1),
                to: owned(2),
                drain_timeout_ms: drain.unwrap_or(0),
                layout,
            })
        }
        "ROTATE_ABORT" => {
            arity(1, 1, "ROTATE_ABORT <kind>")?;
            Request::RotateAbort { kind: owned(0) }
        }
        _ => {
            return Err(ParseError {
                status: Status::UnknownOpcode,
                message: format!("unknown command {:?} (try HELP)", truncate_chars(cmd, 32)),
            });
        }
    };
    Ok(Command::Request(request))
}

fn bad(message: String) -> ParseError {
    ParseError {
        status: Status::BadRequest,
        message,
    }
}

fn token(word: &str) -> Result<u64, ParseError> {
    word.parse::<u64>().map_err(|_| {
        bad(format!(
            "token must be a fencing token (a whole number), got {:?}",
            truncate_chars(word, 32)
        ))
    })
}

fn number(field: &str, word: &str) -> Result<u32, ParseError> {
    word.parse::<u32>().map_err(|_| {
        bad(format!(
            "{field} must be a whole number of milliseconds up to {}, got {:?}",
            u32::MAX,
            truncate_chars(word, 32)
        ))
    })
}

fn truncate_chars(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// Makes server-provided text safe for a single reply line.
fn one_line(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

/// Formats the reply to `req`, ending each line with `\n`.
pub fn format_response(req: &Request, resp: &Response) -> String {
    let mut out = String::new();
    let key = match req {
        Request::Acquire(a) => Some((a.kind.as_str(), a.id.as_str())),
        Request::Release { kind, id, .. } | Request::Renew { kind, id, .. } => Some((kind.as_str(), id.as_str())),
        _ => None,
    };
    let (kind, id) = key.unwrap_or(("", ""));
    match &resp.result {
        Err(e) if e.status == Status::Timeout => {
            let _ = writeln!(out, "-TIMEOUT {kind} {id} {}", one_line(&e.message));
        }
        Err(e) => {
            let _ = writeln!(out, "-ERR {} {}", e.status.name(), one_line(&e.message));
        }
        Ok(ResponseBody::Pong) => out.push_str("+PONG\n"),
        Ok(ResponseBody::Authenticated { principal }) => {
            let _ = writeln!(out, "+AUTH principal={}", one_line(principal));
        }
        Ok(ResponseBody::Hello(h)) => {
            let _ = writeln!(
                out,
                "+HELLO version={} connection={} server={}",
                h.version,
                h.connection_id,
                one_line(&h.server)
            );
        }
        Ok(ResponseBody::Acquired(a)) => {
            let _ = writeln!(
                out,
                "+ACQUIRED {kind} {id} token={} version={} lease_ms={}{}",
                a.token,
                one_line(&a.version),
                a.lease_ms,
                safe_suffix(a.safe_ms)
            );
        }
        Ok(ResponseBody::Released { released: true }) => {
            let _ = writeln!(out, "+RELEASED {kind} {id}");
        }
        Ok(ResponseBody::Released { released: false }) => {
            let _ = writeln!(out, "+NOT_HELD {kind} {id} (nothing to release)");
        }
        Ok(ResponseBody::Renewed {
            token,
            lease_ms,
            safe_ms,
        }) => {
            let _ = writeln!(
                out,
                "+RENEWED {kind} {id} token={token} lease_ms={lease_ms}{}",
                safe_suffix(*safe_ms)
            );
        }
        Ok(ResponseBody::Confirmed { safe_ms }) => {
            let _ = writeln!(out, "+CONFIRMED safe_ms={safe_ms}");
        }
        Ok(ResponseBody::Held(list)) => {
            let _ = writeln!(out, "+HELD {}", list.len());
            for h in list {
                let _ = write!(
                    out,
                    "{} {} token={} version={} lease_ms={} connection={}",
                    h.kind,
                    h.id,
                    h.token,
                    one_line(&h.version),
                    h.lease_remaining_ms,
                    h.connection_id
                );
                if let Some(trace_id) = &h.trace_id {
                    let _ = write!(out, " trace={}", one_line(trace_id));
                }
                // Version 4's field goes last: lines of earlier versions
                // keep their shape.
                if let Some(mode) = h.mode {
                    let _ = write!(out, " mode={}", mode.name());
                }
                out.push('\n');
            }
            out.push_str(".\n");
        }
        Ok(ResponseBody::Version(v)) => {
            let _ = write!(
                out,
                "+VERSION {} version={} mode={}",
                kind_of(req),
                one_line(&v.version),
                v.mode.name()
            );
            if let Some(d) = &v.drain {
                let _ = write!(
                    out,
                    " to={} remaining={} left_ms={}",
                    one_line(&d.to),
                    d.remaining,
                    d.left_ms
                );
            }
            if let Some(layout) = v.layout {
                let _ = write!(out, " layout={}", layout.name());
            }
            out.push('\n');
        }
        Ok(ResponseBody::Rotated(r)) => {
            let _ = writeln!(
                out,
                "+ROTATED {} version={} drain_ms={} leftover={}",
                kind_of(req),
                one_line(&r.version),
                r.drain_ms,
                r.leftover
            );
        }
        Ok(ResponseBody::RotateAborted { version, aborted: true }) => {
            let _ = writeln!(out, "+ROTATE_ABORTED {} version={}", kind_of(req), one_line(version));
        }
        Ok(ResponseBody::RotateAborted {
            version,
            aborted: false,
        }) => {
            let _ = writeln!(
                out,
                "+NOT_ROTATING {} version={} (nothing to abort)",
                kind_of(req),
                one_line(version)
            );
        }
        Ok(ResponseBody::Info(pairs)) => {
            out.push_str("+INFO\n");
            for (k, v) in pairs {
                let _ = writeln!(out, "{}={}", one_line(k), one_line(v));
            }
            out.push_str(".\n");
        }
    }
    out
}

/// The kind a kind-level request names.
fn kind_of(req: &Request) -> &str {
    match req {
        Request::Version { kind } | Request::RotateAbort { kind } => kind,
        Request::Rotate(r) => &r.kind,
        _ => "",
    }
}

/// The lines a `ROTATE` reply streams while it runs (section 14.2): the
/// first progress opens the multi-line reply with `+ROTATING`; each one
/// after it is a `draining`/`switched` line, then one line per named holder.
pub fn format_rotation_progress(p: &RotationProgress, first: bool) -> String {
    let mut out = String::new();
    if first {
        let _ = writeln!(
            out,
            "+ROTATING {} {} {} left_ms={}",
            p.kind,
            one_line(&p.from),
            one_line(&p.to),
            p.left_ms
        );
    }
    let _ = writeln!(
        out,
        "{} remaining={} elapsed_ms={} left_ms={}",
        p.phase.name(),
        p.remaining,
        p.elapsed_ms,
        p.left_ms
    );
    for h in &p.holders {
        let _ = writeln!(out, "  held {} by {}", h.id, one_line(&h.holder));
    }
    out
}

/// The end of a `ROTATE` reply: after progress lines were sent (`started`),
/// a `rotated ...` or `failed <STATUS> <message>` line and the closing `.`;
/// otherwise the one-line reply of [`format_response`].
pub fn format_rotation_end(req: &Request, resp: &Response, started: bool) -> String {
    if !started {
        return format_response(req, resp);
    }
    match &resp.result {
        Ok(ResponseBody::Rotated(r)) => format!(
            "rotated version={} drain_ms={} leftover={}\n.\n",
            one_line(&r.version),
            r.drain_ms,
            r.leftover
        ),
        Ok(_) => ".\n".to_owned(),
        Err(e) => format!("failed {} {}\n.\n", e.status.name(), one_line(&e.message)),
    }
}

/// ` safe_ms=<n>` when a (version 2) reply carries it.
fn safe_suffix(safe_ms: Option<u32>) -> String {
    safe_ms.map(|ms| format!(" safe_ms={ms}")).unwrap_or_default()
}

/// Formats a pushed event as one `!` line ending with `\n`.
pub fn format_event(ev: &Event) -> String {
    match ev {
        Event::LockLost {
            kind,
            id,
            token,
            reason,
        } => {
            format!("!LOST {kind} {id} token={token} reason={}\n", reason.name())
        }
        Event::Closing { status, message } => format!("!CLOSING {} {}\n", status.name(), one_line(message)),
        Event::RotateProgress { progress: p, .. } => format!(
            "!ROTATE_PROGRESS {} {} {} {} remaining={} elapsed_ms={} left_ms={}\n",
            p.kind,
            one_line(&p.from),
            one_line(&p.to),
            p.phase.name(),
            p.remaining,
            p.elapsed_ms,
            p.left_ms
        ),
    }
}

/// The reply to `HELP`.
pub fn format_help() -> String {
    let mut out = String::from("+HELP commands (case-insensitive, words separated by spaces):\n");
    for line in USAGE {
        out.push_str("  ");
        out.push_str(line);
        out.push('\n');
    }
    out.push_str(".\n");
    out
}

/// Formats a parse error as a reply line.
pub fn format_parse_error(e: &ParseError) -> String {
    format!("-ERR {} {}\n", e.status.name(), one_line(&e.message))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{AcquireOk, ErrorReply, LostReason};

    #[test]
    fn parses_auth_without_echoing_the_token() {
        assert_eq!(
            parse("AUTH s3cret"),
            Ok(Command::Request(Request::Auth {
                token: AuthToken::new("s3cret")
            }))
        );
        let e = parse("auth s3cret extra").expect_err("arity");
        assert!(!e.message.contains("s3cret"), "{}", e.message);
        let e = parse(&format!("AUTH {}", "y".repeat(MAX_TOKEN_LEN + 1))).expect_err("too long");
        assert_eq!(e.status, Status::BadRequest);
        let resp = Response::ok(
            0,
            ResponseBody::Authenticated {
                principal: "billing".into(),
            },
        );
        let req = Request::Auth {
            token: AuthToken::new("s3cret"),
        };
        assert_eq!(format_response(&req, &resp), "+AUTH principal=billing\n");
    }

    #[test]
    fn parses_the_grammar() {
        assert_eq!(parse("ping"), Ok(Command::Request(Request::Ping)));
        assert_eq!(parse("  PiNg  \r"), Ok(Command::Request(Request::Ping)));
        assert_eq!(parse(""), Ok(Command::Empty));
        assert_eq!(parse("quit"), Ok(Command::Quit));
        assert_eq!(
            parse("ACQUIRE transaction tx-1 5000"),
            Ok(Command::Request(Request::Acquire(Acquire {
                kind: "transaction".into(),
                id: "tx-1".into(),
                wait_ms: 5000,
                lease_ms: 0,
                mode: LockMode::Exclusive,
                trace_id: None,
            })))
        );
        assert!(matches!(
            parse("acquire a b 1 2"),
            Ok(Command::Request(Request::Acquire(Acquire {
                wait_ms: 1,
                lease_ms: 2,
                ..
            })))
        ));
        assert!(matches!(
            parse("acquire a b"),
            Ok(Command::Request(Request::Acquire(Acquire { wait_ms: 0, .. })))
        ));
        assert_eq!(
            parse("renew k i 300"),
            Ok(Command::Request(Request::Renew {
                kind: "k".into(),
                id: "i".into(),
                lease_ms: 300,
                token: 0
            }))
        );
        assert_eq!(
            parse("held all"),
            Ok(Command::Request(Request::Held {
                scope: HeldScope::Server
            }))
        );
        assert_eq!(
            parse("VERSION k"),
            Ok(Command::Request(Request::Version { kind: "k".into() }))
        );
    }

    #[test]
    fn parses_shared_acquires() {
        match parse("acquire_shared transaction tx-1 5000 0 trace-7") {
            Ok(Command::Request(Request::Acquire(a))) => {
                assert_eq!(a.mode, LockMode::Shared);
                assert_eq!(
                    (a.wait_ms, a.lease_ms, a.trace_id.as_deref()),
                    (5000, 0, Some("trace-7"))
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse("ACQUIRE transaction tx-1"),
            Ok(Command::Request(Request::Acquire(Acquire {
                mode: LockMode::Exclusive,
                ..
            })))
        ));
        assert!(parse("ACQUIRE_SHARED transaction").is_err());
    }

    #[test]
    fn parses_rotation_commands() {
        assert_eq!(
            parse("rotate transaction v1 v2 30000"),
            Ok(Command::Request(Request::Rotate(Rotate {
                kind: "transaction".into(),
                from: "v1".into(),
                to: "v2".into(),
                drain_timeout_ms: 30000,
                layout: None,
            })))
        );
        let layout = |line| match parse(line) {
            Ok(Command::Request(Request::Rotate(r))) => Ok((r.drain_timeout_ms, r.layout)),
            other => Err(format!("{other:?}")),
        };
        assert_eq!(
            layout("ROTATE k v1 v2 500 read_write"),
            Ok((500, Some(KindLayout::ReadWrite)))
        );
        assert_eq!(layout("ROTATE k v1 v2 rw"), Ok((0, Some(KindLayout::ReadWrite))));
        assert_eq!(layout("ROTATE k v1 v2 mutex"), Ok((0, Some(KindLayout::Mutex))));
        assert!(layout("ROTATE k v1 v2 mutex 500").is_err(), "the timeout comes first");
        assert!(layout("ROTATE k v1 v2 mutex rw").is_err());
        assert!(layout("ROTATE k v1 v2 500 600").is_err());
        assert!(matches!(
            parse("ROTATE transaction v1 v2"),
            Ok(Command::Request(Request::Rotate(Rotate {
                drain_timeout_ms: 0,
                ..
            })))
        ));
        assert_eq!(
            parse("ROTATE_ABORT transaction"),
            Ok(Command::Request(Request::RotateAbort {
                kind: "transaction".into()
            }))
        );
        assert!(parse("ROTATE transaction v1").is_err());
        assert!(parse("ROTATE transaction v1 v2 soon").is_err());
        assert!(parse("ROTATE_ABORT").is_err());
    }

    #[test]
    fn refuses_bad_lines() {
        assert_eq!(parse("FROB").map_err(|e| e.status), Err(Status::UnknownOpcode));
        assert_eq!(parse("ACQUIRE a").map_err(|e| e.status), Err(Status::BadRequest));
        assert_eq!(parse("ACQUIRE a b -1").map_err(|e| e.status), Err(Status::BadRequest));
        assert_eq!(
            parse("ACQUIRE a b 99999999999").map_err(|e| e.status),
            Err(Status::BadRequest)
        );
        assert_eq!(parse("RENEW a b").map_err(|e| e.status), Err(Status::BadRequest));
        assert_eq!(parse("HELD x").map_err(|e| e.status), Err(Status::BadRequest));
        assert_eq!(parse("PING x").map_err(|e| e.status), Err(Status::BadRequest));
    }

    #[test]
    fn formats_replies() {
        let req = Request::Acquire(Acquire {
            kind: "transaction".into(),
            id: "tx-1".into(),
            wait_ms: 0,
            lease_ms: 0,
            mode: LockMode::Exclusive,
            trace_id: None,
        });
        let ok = Response::ok(
            1,
            ResponseBody::Acquired(AcquireOk {
                token: 42,
                lease_ms: 0,
                version: "v1".into(),
                safe_ms: None,
            }),
        );
        assert_eq!(
            format_response(&req, &ok),
            "+ACQUIRED transaction tx-1 token=42 version=v1 lease_ms=0\n"
        );
        let to = Response::error(1, 0x10, Status::Timeout, "not acquired within 200 ms");
        assert_eq!(
            format_response(&req, &to),
            "-TIMEOUT transaction tx-1 not acquired within 200 ms\n"
        );
        let err = Response {
            request_id: 1,
            opcode: 0x10,
            result: Err(ErrorReply {
                status: Status::InvalidName,
                message: "id has\nnewline".into(),
            }),
        };
        assert_eq!(format_response(&req, &err), "-ERR INVALID_NAME id has newline\n");
        let ev = Event::LockLost {
            kind: "k".into(),
            id: "i".into(),
            token: 7,
            reason: LostReason::LeaseExpired,
        };
        assert_eq!(format_event(&ev), "!LOST k i token=7 reason=lease_expired\n");
    }
}

/// Formats an error line that answers no particular command (`-ERR STATUS
/// message`): a refused connection, a line too long, too much queued input.
pub fn format_error(status: Status, message: &str) -> String {
    format!("-ERR {} {}\n", status.name(), one_line(message))
}

/// The reply to `QUIT`, sent just before the server closes the connection.
pub fn format_bye() -> String {
    "+BYE\n".to_owned()
}

#[cfg(test)]
mod format_error_tests {
    use super::*;

    #[test]
    fn formats_connection_level_errors() {
        assert_eq!(
            format_error(Status::LimitExceeded, "too many connections (limit 4); try again later"),
            "-ERR LIMIT_EXCEEDED too many connections (limit 4); try again later\n"
        );
        assert_eq!(
            format_error(Status::ProtocolError, "line longer than\n1024 bytes"),
            "-ERR PROTOCOL_ERROR line longer than 1024 bytes\n"
        );
    }

    #[test]
    fn formats_the_goodbye() {
        assert_eq!(format_bye(), "+BYE\n");
    }

    #[test]
    fn closing_events_format_as_the_server_sends_them() {
        let ev = Event::Closing {
            status: Status::LimitExceeded,
            message: "idle timeout".into(),
        };
        assert_eq!(format_event(&ev), "!CLOSING LIMIT_EXCEEDED idle timeout\n");
    }
}
