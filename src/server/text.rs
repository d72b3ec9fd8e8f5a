//! The text-form connection actor (netcat-style debugging): one command per
//! line, replies in command order, pushed events (`!LOST`) as they happen.
//!
//! Commands run one at a time, in the order they were sent: text replies
//! carry no request id, and one running command bounds what a connection
//! can make the server hold (one reply at a time, never a backlog of
//! finished ones). Lines typed meanwhile wait in a queue; the socket is read
//! all the while, so a client that goes away is noticed at once and its wait
//! withdrawn, even behind a blocked `ACQUIRE`. A client that queues more than
//! [`MAX_QUEUED_BYTES`] behind a running command is told so and closed. Same
//! semantics, ownership and limits as the binary form.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use clastor_protocol::text::{self, Command, MAX_LINE_LEN};
use clastor_protocol::{Event, Request, Response, RotationProgress, Status};
use futures_util::stream::FuturesOrdered;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::codec::{Framed, LinesCodec, LinesCodecError};
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::auth::TOO_MANY_FAILURES;
use super::dispatch::{RequestContext, dispatch, rotate};
use super::io::{goodbye, lost_event, sleep_until_or_never, write_within};
use super::state::ServerState;
use super::stream::Stream;
use crate::backend::Backend;
use crate::engine::LostEvents;

type Pending = Pin<Box<dyn Future<Output = Reply> + Send>>;

/// Bytes of command lines that may wait behind a running command.
const MAX_QUEUED_BYTES: usize = 64 * 1024;

enum Reply {
    /// Text to send as is.
    Text(String),
    /// Send `+BYE` and close.
    Bye,
    /// Send this text and close.
    Close(String),
    /// The end of a `ROTATE`, whose progress lines may have gone out.
    Rotation { req: Request, resp: Response },
}

/// A running `ROTATE`'s progress, and whether its reply has been opened.
struct RotationLines {
    rx: mpsc::UnboundedReceiver<RotationProgress>,
    started: bool,
}

impl RotationLines {
    fn format(&mut self, p: &RotationProgress) -> String {
        let out = text::format_rotation_progress(p, !self.started);
        self.started = true;
        out
    }
}

/// The next progress of the running rotation, or never.
async fn next_progress(rotation: &mut Option<RotationLines>) -> Option<RotationProgress> {
    match rotation {
        Some(r) => r.rx.recv().await,
        None => std::future::pending().await,
    }
}

pub(super) async fn run<B: Backend>(
    stream: Stream,
    shared: &Arc<ServerState<B>>,
    mut ctx: RequestContext<B>,
    mut lost: LostEvents,
    shutdown: &CancellationToken,
) {
    let cfg = &shared.config;
    let mut framed = Framed::new(stream, LinesCodec::new_with_max_length(MAX_LINE_LEN));
    let mut queued: VecDeque<String> = VecDeque::new();
    let mut queued_bytes = 0usize;
    // The running command: at most one (a set only so it can sit in `select!`).
    let mut running: FuturesOrdered<Pending> = FuturesOrdered::new();
    let mut last_activity = Instant::now();
    // The running command's progress lines, while it is a `ROTATE`.
    let mut rotation: Option<RotationLines> = None;
    let mut auth_failures = 0u32;
    loop {
        while running.is_empty() {
            let Some(line) = queued.pop_front() else { break };
            queued_bytes -= line.len();
            if let Some(fut) = command(&line, &mut ctx, shared, &mut rotation, &mut auth_failures) {
                running.push_back(fut);
            }
        }
        let idle_at = cfg
            .idle_timeout
            .filter(|_| running.is_empty() && queued.is_empty() && ctx.session.held_count() == 0)
            .map(|idle| last_activity.checked_add(idle));
        let out: Option<String> = tokio::select! {
            biased;
            () = shutdown.cancelled() => {
                let out: String = goodbye(&ctx.session, &mut lost).iter().map(text::format_event).collect();
                let _ = send(&mut framed, shared, out).await;
                break;
            }
            // Replies before events: a grant's reply precedes its `!LOST`.
            Some(reply) = running.next(), if !running.is_empty() => match reply {
                Reply::Text(t) => Some(t),
                Reply::Bye => {
                    let _ = send(&mut framed, shared, text::format_bye()).await;
                    break;
                }
                Reply::Close(out) => {
                    let _ = send(&mut framed, shared, out).await;
                    break;
                }
                Reply::Rotation { req, resp } => {
                    let mut out = String::new();
                    let mut lines = rotation.take();
                    if let Some(r) = &mut lines {
                        while let Ok(p) = r.rx.try_recv() {
                            out.push_str(&r.format(&p));
                        }
                    }
                    let started = lines.is_some_and(|r| r.started);
                    out.push_str(&text::format_rotation_end(&req, &resp, started));
                    Some(out)
                }
            },
            Some(p) = next_progress(&mut rotation) => rotation.as_mut().map(|r| r.format(&p)),
            // Between replies, or between a ROTATE's progress lines (which
            // never start with `!`): a loss is never held back.
            Some(ev) = lost.recv() => Some(text::format_event(&lost_event(&ev))),
            line = framed.next() => {
                last_activity = Instant::now();
                match line {
                    // The client is gone: drop what runs (withdrawing a wait).
                    None => break,
                    Some(Ok(line)) => {
                        queued_bytes += line.len();
                        queued.push_back(line);
                        if queued_bytes > MAX_QUEUED_BYTES {
                            shared.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                            info!(queued = queued.len(), "too many commands queued; closing connection");
                            let msg = text::format_error(
                                Status::LimitExceeded,
                                &format!("more than {MAX_QUEUED_BYTES} bytes of commands queued behind a running one"),
                            );
                            let _ = send(&mut framed, shared, msg).await;
                            break;
                        }
                        None
                    }
                    Some(Err(e)) => {
                        shared.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                        let msg = match e {
                            LinesCodecError::MaxLineLengthExceeded => format!("line longer than {MAX_LINE_LEN} bytes"),
                            LinesCodecError::Io(e) => format!("unreadable input: {e}"),
                        };
                        info!(error = %msg, "protocol error; closing connection");
                        let _ = send(&mut framed, shared, text::format_error(Status::ProtocolError, &msg)).await;
                        break;
                    }
                }
            }
            () = sleep_until_or_never(idle_at.flatten()), if idle_at.is_some() => {
                info!("idle timeout; closing connection");
                let closing = Event::Closing {
                    status: Status::LimitExceeded,
                    message: "idle timeout".into(),
                };
                let _ = send(&mut framed, shared, text::format_event(&closing)).await;
                break;
            }
        };
        if let Some(out) = out
            && send(&mut framed, shared, out).await.is_err()
        {
            break;
        }
    }
}

/// Writes `out` (already newline-terminated) within the write timeout.
async fn send<B: Backend>(
    framed: &mut Framed<Stream, LinesCodec>,
    shared: &ServerState<B>,
    out: String,
) -> Result<(), ()> {
    // LinesCodec appends a newline itself.
    let out = out.strip_suffix('\n').unwrap_or(&out).to_owned();
    write_within(shared, framed.send(out)).await
}

/// Turns one line into the future of its reply; `None` for a blank line.
fn command<B: Backend>(
    line: &str,
    ctx: &mut RequestContext<B>,
    shared: &Arc<ServerState<B>>,
    rotation: &mut Option<RotationLines>,
    auth_failures: &mut u32,
) -> Option<Pending> {
    let ready = |reply: Reply| -> Option<Pending> { Some(Box::pin(async move { reply })) };
    let stats = &shared.stats;
    match text::parse(line) {
        Ok(Command::Empty) => None,
        Ok(Command::Quit) => ready(Reply::Bye),
        Ok(Command::Help) => ready(Reply::Text(text::format_help())),
        Ok(Command::Request(req @ Request::Auth { .. })) => {
            stats.requests.fetch_add(1, Ordering::Relaxed);
            stats.count_request(req.opcode());
            let Request::Auth { token } = &req else { return None };
            let peer = ctx.peer;
            let resp = match ctx
                .access
                .authenticate(token, auth_failures, peer, &stats.auth_failures)
            {
                Ok(body) => Response::ok(0, body),
                Err(refusal) => {
                    let resp = Response::error(0, req.opcode() as u8, refusal.reply.status, refusal.reply.message);
                    if refusal.close {
                        let closing = Event::Closing {
                            status: Status::Unauthenticated,
                            message: TOO_MANY_FAILURES.into(),
                        };
                        let out = text::format_response(&req, &resp) + &text::format_event(&closing);
                        return ready(Reply::Close(out));
                    }
                    resp
                }
            };
            ready(Reply::Text(text::format_response(&req, &resp)))
        }
        Ok(Command::Request(Request::Rotate(r))) => {
            stats.requests.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = mpsc::unbounded_channel();
            *rotation = Some(RotationLines { rx, started: false });
            let ctx = ctx.clone();
            Some(Box::pin(async move {
                let req = Request::Rotate(r.clone());
                let opcode = req.opcode() as u8;
                let progress = move |p| {
                    let _ = tx.send(p);
                };
                let resp = match rotate(&ctx, r, &progress).await {
                    Ok(body) => Response::ok(0, body),
                    Err(e) => Response::error(0, opcode, e.status, e.message),
                };
                Reply::Rotation { req, resp }
            }))
        }
        Ok(Command::Request(req)) => {
            stats.requests.fetch_add(1, Ordering::Relaxed);
            let ctx = ctx.clone();
            let shared = shared.clone();
            Some(Box::pin(async move {
                let opcode = req.opcode() as u8;
                let resp = match dispatch(&ctx, &shared, req.clone()).await {
                    Ok(body) => Response::ok(0, body),
                    Err(e) => Response::error(0, opcode, e.status, e.message),
                };
                Reply::Text(text::format_response(&req, &resp))
            }))
        }
        Err(e) => {
            stats.requests.fetch_add(1, Ordering::Relaxed);
            stats.bad_requests.fetch_add(1, Ordering::Relaxed);
            ready(Reply::Text(text::format_parse_error(&e)))
        }
    }
}
