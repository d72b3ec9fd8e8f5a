//! The text-form connection actor (netcat-style debugging): one command per
//! line, replies in command order, pushed events (`!LOST`) as they happen.
//!
//! Commands run concurrently up to the in-flight limit but are answered in the
//! order they were sent, since text replies carry no request id. Same
//! semantics, ownership and limits as the binary form.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use clastor_protocol::text::{self, Command, MAX_LINE_LEN};
use clastor_protocol::{Event, LostReason, Response, Status};
use futures_util::stream::FuturesOrdered;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::codec::{Framed, LinesCodec, LinesCodecError};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::Shared;
use super::dispatch::{Ctx, dispatch};
use crate::backend::Backend;
use crate::session::{LostEvent, LostEvents};

type Pending = Pin<Box<dyn Future<Output = Reply> + Send>>;

enum Reply {
    /// Text to send as is.
    Text(String),
    /// Send `+BYE` and close.
    Bye,
}

pub(super) async fn run<B: Backend>(
    stream: TcpStream,
    shared: &Arc<Shared<B>>,
    ctx: Ctx<B>,
    mut lost: LostEvents,
    shutdown: &CancellationToken,
) {
    let cfg = &shared.config;
    let mut framed = Framed::new(stream, LinesCodec::new_with_max_length(MAX_LINE_LEN));
    let mut inflight: FuturesOrdered<Pending> = FuturesOrdered::new();
    let mut reading = true;
    let mut last_activity = Instant::now();
    loop {
        let can_read = reading && inflight.len() < cfg.max_in_flight;
        let idle_at = cfg
            .idle_timeout
            .filter(|_| inflight.is_empty() && ctx.session.held_count() == 0)
            .map(|idle| last_activity + idle);
        let out: Option<String> = tokio::select! {
            biased;
            () = shutdown.cancelled() => {
                let mut out = String::new();
                for h in ctx.session.held() {
                    out.push_str(&lost_line(&LostEvent { key: h.key, token: h.token, reason: LostReason::Shutdown }));
                }
                out.push_str(&text::format_event(&Event::Closing { status: Status::ShuttingDown, message: "server shutting down".into() }));
                let _ = send(&mut framed, shared, out).await;
                break;
            }
            // Replies before events: a grant's reply precedes its `!LOST`.
            Some(reply) = inflight.next(), if !inflight.is_empty() => match reply {
                Reply::Text(t) => Some(t),
                Reply::Bye => {
                    let _ = send(&mut framed, shared, "+BYE\n".into()).await;
                    break;
                }
            },
            Some(ev) = lost.recv() => Some(lost_line(&ev)),
            line = framed.next(), if can_read => {
                last_activity = Instant::now();
                match line {
                    None => break,
                    Some(Ok(line)) => {
                        if let Some(fut) = command(&line, &ctx, shared, &mut reading) {
                            inflight.push_back(fut);
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
                        let _ = send(&mut framed, shared, format!("-ERR {} {msg}\n", Status::ProtocolError.name())).await;
                        break;
                    }
                }
            }
            () = tokio::time::sleep_until(idle_at.unwrap_or_else(Instant::now)), if idle_at.is_some() => {
                info!("idle timeout; closing connection");
                let _ = send(&mut framed, shared, "!CLOSING LIMIT_EXCEEDED idle timeout\n".into()).await;
                break;
            }
        };
        if let Some(out) = out
            && send(&mut framed, shared, out).await.is_err()
        {
            break;
        }
        if !reading && inflight.is_empty() {
            break;
        }
    }
}

fn lost_line(ev: &LostEvent) -> String {
    text::format_event(&Event::LockLost {
        kind: ev.key.kind().to_owned(),
        id: ev.key.id().to_owned(),
        token: ev.token,
        reason: ev.reason,
    })
}

/// Writes `out` (already newline-terminated) within the write timeout.
async fn send<B: Backend>(
    framed: &mut Framed<TcpStream, LinesCodec>,
    shared: &Shared<B>,
    out: String,
) -> Result<(), ()> {
    // LinesCodec appends a newline itself.
    let out = out.strip_suffix('\n').unwrap_or(&out).to_owned();
    match tokio::time::timeout(shared.config.write_timeout, framed.send(out)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            debug!(error = %e, "write failed");
            Err(())
        }
        Err(_) => {
            info!("client stopped reading; dropping connection");
            Err(())
        }
    }
}

/// Turns one line into the future of its reply. `QUIT` stops reading.
fn command<B: Backend>(line: &str, ctx: &Ctx<B>, shared: &Arc<Shared<B>>, reading: &mut bool) -> Option<Pending> {
    let ready = |reply: Reply| -> Option<Pending> { Some(Box::pin(async move { reply })) };
    let stats = &shared.stats;
    match text::parse(line) {
        Ok(Command::Empty) => None,
        Ok(Command::Quit) => {
            *reading = false;
            ready(Reply::Bye)
        }
        Ok(Command::Help) => ready(Reply::Text(text::format_help())),
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
