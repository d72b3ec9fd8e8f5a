//! The binary-protocol connection actor.
//!
//! One task owns the framed socket, the set of in-flight requests and the
//! session. Its `select!` loop takes, in priority order: shutdown, a lost-lock
//! event, a finished request, the next frame (only while fewer than
//! `max_in_flight` requests run, so a flooding client is slowed by TCP
//! back-pressure, not by our memory), and the handshake or idle timer.
//! Responses go out in completion order, so a blocked `ACQUIRE` never holds
//! up a `PING`. Writes are batched: everything ready is encoded, then flushed
//! once. The socket's buffers are held only while they hold bytes
//! (`wire.rs`), so an idle connection costs little more than its task.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use clastor_protocol::{
    ClastorCodec, Event, Frame, FrameError, HIGHEST_VERSION, HelloOk, Opcode, Request, Response, ResponseBody, Status,
};
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::dispatch::{RequestContext, confirm_ms, dispatch, rotate};
use super::io::{goodbye, lost_event, sleep_until_or_never, write_within};
use super::state::ServerState;
use super::stream::Stream;
use super::wire::Wire;
use crate::backend::Backend;
use crate::engine::{LostEvent, LostEvents};

type Pending = Pin<Box<dyn Future<Output = Response> + Send>>;

/// Frames decoded from the read buffer in one go before responses are flushed.
const READ_BATCH: usize = 64;

/// Bytes of encoded responses after which no more frames are decoded before
/// a flush.
const WRITE_BUDGET: usize = 1 << 20;

enum Flow {
    Continue,
    Close,
}

struct Conn<B: Backend> {
    framed: Wire,
    shared: Arc<ServerState<B>>,
    ctx: RequestContext<B>,
    inflight: FuturesUnordered<Pending>,
    handshaken: bool,
    /// The protocol version the body decoder reads with: the negotiated one,
    /// or the highest before `HELLO` (only `HELLO` is run then anyway).
    version: u8,
    opened: Instant,
    last_activity: Instant,
    /// A frame arrived since `last_activity` was last set: it is set once
    /// per round, not per frame (the idle timer needs no finer grain, and
    /// a pipelined batch then costs one clock read).
    active: bool,
    /// The latest instant this connection was told its locks are safe until
    /// (version 2): on shutdown they are kept until then, unless the client
    /// goes first, so a client that did not hear the goodbye is never wrong.
    promised_until: Option<Instant>,
    /// `ROTATE_PROGRESS` events of this connection's running rotations;
    /// made by the first `ROTATE` (most connections never send one).
    progress: Option<(mpsc::UnboundedSender<Event>, mpsc::UnboundedReceiver<Event>)>,
    /// Failed `AUTH`s so far (`auth/`: bounded per connection).
    auth_failures: u32,
}

pub(super) async fn run<B: Backend>(
    stream: Stream,
    shared: &Arc<ServerState<B>>,
    ctx: RequestContext<B>,
    mut lost: LostEvents,
    shutdown: &CancellationToken,
) {
    let cfg = &shared.config;
    let mut c = Conn {
        framed: Wire::new(stream, ClastorCodec::new(cfg.max_frame_len)),
        shared: shared.clone(),
        ctx,
        inflight: FuturesUnordered::new(),
        handshaken: false,
        version: HIGHEST_VERSION,
        opened: Instant::now(),
        last_activity: Instant::now(),
        active: false,
        promised_until: None,
        progress: None,
        auth_failures: 0,
    };
    let mut shutting_down = false;
    // One registration with the shutdown token for the connection's life:
    // a fresh `cancelled()` per round would add and remove a waiter (a
    // mutex-guarded list) on every request batch.
    let cancelled = shutdown.cancelled();
    tokio::pin!(cancelled);
    loop {
        let can_read = c.inflight.len() < cfg.max_in_flight;
        let timer = c.timer();
        let flow = tokio::select! {
            biased;
            () = &mut cancelled => {
                for ev in goodbye(&c.ctx.session, &mut lost) {
                    ev.encode(c.framed.write_buffer_mut());
                }
                shutting_down = true;
                Flow::Close
            }
            // Finished requests before events: a grant's reply always goes
            // out before a LOCK_LOST of that grant.
            Some(resp) = c.inflight.next(), if !c.inflight.is_empty() => {
                c.answer(&resp, &mut lost);
                Flow::Continue
            }
            Some(ev) = lost.recv() => {
                c.push_lost(&ev);
                Flow::Continue
            }
            Some(ev) = recv_progress(&mut c.progress) => {
                ev.encode(c.framed.write_buffer_mut());
                Flow::Continue
            }
            frame = c.framed.next_frame(), if can_read => c.on_read(frame, &mut lost),
            () = sleep_until_or_never(timer.and_then(|(at, _)| at)), if timer.is_some() => {
                let what = timer.map_or("idle", |(_, what)| what);
                info!(timeout = what, "closing connection");
                c.push_closing(Status::LimitExceeded, format!("{what} timeout"));
                Flow::Close
            }
        };
        let flow = match flow {
            Flow::Continue => c.drain_ready(&mut lost),
            Flow::Close => Flow::Close,
        };
        if std::mem::take(&mut c.active) {
            c.last_activity = Instant::now();
        }
        if c.flush().await.is_err() {
            break;
        }
        if let Flow::Close = flow {
            break;
        }
    }
    if shutting_down {
        c.keep_promises().await;
    }
    // Dropping `c` cancels in-flight requests; the caller closes the session.
}

/// The next progress event, or never if no rotation ever ran here.
async fn recv_progress(
    progress: &mut Option<(mpsc::UnboundedSender<Event>, mpsc::UnboundedReceiver<Event>)>,
) -> Option<Event> {
    match progress {
        Some((_, rx)) => rx.recv().await,
        None => std::future::pending().await,
    }
}

impl<B: Backend> Conn<B> {
    /// The deadline that applies now (`None` inside: too far to represent),
    /// and its name.
    fn timer(&self) -> Option<(Option<Instant>, &'static str)> {
        let cfg = &self.shared.config;
        if !self.handshaken {
            return Some((self.opened.checked_add(cfg.handshake_timeout), "handshake"));
        }
        let idle = cfg.idle_timeout?;
        (self.inflight.is_empty() && self.ctx.session.held_count() == 0)
            .then_some((self.last_activity.checked_add(idle), "idle"))
    }

    /// Writes a reply, remembering any safe-until it promises. A reply that
    /// promises goes out after every loss already queued: the engine queues a
    /// loss before the lock leaves the table the promise was computed from,
    /// so the client always hears of a loss before a promise that no longer
    /// covers that lock (and would otherwise extend it).
    fn answer(&mut self, resp: &Response, lost: &mut LostEvents) {
        let safe_ms = match &resp.result {
            Ok(ResponseBody::Acquired(a)) => a.safe_ms,
            Ok(ResponseBody::Renewed { safe_ms, .. }) => *safe_ms,
            Ok(ResponseBody::Confirmed { safe_ms }) => Some(*safe_ms),
            _ => None,
        };
        if safe_ms.is_some() {
            while let Some(ev) = lost.try_recv() {
                self.push_lost(&ev);
            }
        }
        // A rotation's progress goes out before its answer (PROTOCOL.md §2.4).
        if resp.opcode == Opcode::Rotate as u8
            && let Some((_, rx)) = &mut self.progress
        {
            while let Ok(ev) = rx.try_recv() {
                ev.encode(self.framed.write_buffer_mut());
            }
        }
        if let Some(ms) = safe_ms.filter(|&ms| ms != u32::MAX) {
            let until = Instant::now() + std::time::Duration::from_millis(u64::from(ms));
            self.promised_until = Some(self.promised_until.map_or(until, |p| p.max(until)));
        }
        resp.encode(self.framed.write_buffer_mut());
    }

    /// After the shutdown goodbye: keeps the connection, and so its locks,
    /// until the last safe-until promised to it has passed or the client
    /// closed (it heard the goodbye), bounded by the server's hard stop.
    async fn keep_promises(&mut self) {
        let Some(until) = self.promised_until.filter(|&t| t > Instant::now()) else {
            return;
        };
        if self.ctx.session.held_count() == 0 {
            return;
        }
        debug!(until = ?until.saturating_duration_since(Instant::now()), "keeping locks until their promised safe-until");
        let closed = async {
            // Anything the client still sends is not served; EOF ends the wait.
            while let Some(Ok(_)) = self.framed.next_frame().await {}
        };
        tokio::select! {
            () = tokio::time::sleep_until(until) => {}
            () = closed => {}
            () = self.shared.hard_stop.cancelled() => {}
        }
    }

    /// Encodes whatever else is ready without waiting: finished requests,
    /// pending events and frames already buffered.
    fn drain_ready(&mut self, lost: &mut LostEvents) -> Flow {
        // Replies first, then events (see the select loop), then new frames,
        // whose grants' events can only come in a later round.
        while let Some(Some(resp)) = self.inflight.next().now_or_never() {
            self.answer(&resp, lost);
        }
        while let Some(ev) = lost.try_recv() {
            self.push_lost(&ev);
        }
        for _ in 0..READ_BATCH {
            // A client that pipelines big requests (HELD ALL) without reading
            // is held to one write budget per round, then to TCP back-pressure.
            if self.inflight.len() >= self.shared.config.max_in_flight
                || self.framed.write_buffer().len() >= WRITE_BUDGET
            {
                break;
            }
            match self.framed.ready_frame() {
                Some(frame) => {
                    if let Flow::Close = self.on_read(frame, lost) {
                        return Flow::Close;
                    }
                }
                None => break,
            }
        }
        Flow::Continue
    }

    async fn flush(&mut self) -> Result<(), ()> {
        if self.framed.write_buffer().is_empty() {
            return Ok(());
        }
        write_within(&self.shared, self.framed.flush()).await
    }

    fn push_lost(&mut self, ev: &LostEvent) {
        lost_event(ev).encode(self.framed.write_buffer_mut());
    }

    fn push_closing(&mut self, status: Status, message: impl Into<String>) {
        Event::Closing {
            status,
            message: message.into(),
        }
        .encode(self.framed.write_buffer_mut());
    }

    fn on_read(&mut self, frame: Option<Result<Frame, FrameError>>, lost: &mut LostEvents) -> Flow {
        match frame {
            None => Flow::Close,
            Some(Ok(frame)) => {
                self.active = true;
                self.on_frame(frame, lost)
            }
            Some(Err(FrameError::Io(e))) => {
                debug!(error = %e, "read failed");
                Flow::Close
            }
            Some(Err(e)) => {
                self.shared.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                info!(error = %e, "protocol error; closing connection");
                self.push_closing(Status::ProtocolError, e.to_string());
                Flow::Close
            }
        }
    }

    fn on_frame(&mut self, frame: Frame, lost: &mut LostEvents) -> Flow {
        let Frame { header, body } = frame;
        let stats = &self.shared.stats;
        stats.requests.fetch_add(1, Ordering::Relaxed);
        let reply_err = |status, message: String| Response::error(header.request_id, header.opcode, status, message);
        let req = match Request::decode_for(&header, body, self.version) {
            Ok(req) => req,
            Err(e) => {
                stats.bad_requests.fetch_add(1, Ordering::Relaxed);
                debug!(request_id = header.request_id, opcode = header.opcode, error = %e, "bad request");
                reply_err(e.status(), e.to_string()).encode(self.framed.write_buffer_mut());
                // A malformed AUTH is an attempt too: garbage cannot buy
                // more guesses than tokens can.
                if header.opcode == Opcode::Auth as u8
                    && self.handshaken
                    && self
                        .ctx
                        .access
                        .malformed_attempt(&mut self.auth_failures, self.ctx.peer, &stats.auth_failures)
                {
                    self.push_closing(Status::Unauthenticated, crate::server::auth::TOO_MANY_FAILURES);
                    return Flow::Close;
                }
                return Flow::Continue;
            }
        };
        if header.request_id == clastor_protocol::EVENT_REQUEST_ID {
            stats.bad_requests.fetch_add(1, Ordering::Relaxed);
            reply_err(Status::BadRequest, "request id 0 is reserved for events".into())
                .encode(self.framed.write_buffer_mut());
            return Flow::Continue;
        }
        match (self.handshaken, req) {
            (false, Request::Hello(h)) => {
                stats.count_request(clastor_protocol::Opcode::Hello);
                // The highest version both speak: this server speaks 1 ..= HIGHEST_VERSION.
                let version = h.max_version.min(HIGHEST_VERSION);
                if version < 1 || version < h.min_version {
                    let msg = format!(
                        "client speaks versions {}..={}, server speaks 1..={HIGHEST_VERSION}",
                        h.min_version, h.max_version
                    );
                    reply_err(Status::VersionMismatch, msg.clone()).encode(self.framed.write_buffer_mut());
                    self.push_closing(Status::VersionMismatch, msg);
                    return Flow::Close;
                }
                self.handshaken = true;
                // Once per connection: listings and later log lines (the
                // `conn` span) show the client's name, not only its address.
                if let Some(name) = self.ctx.session.set_client_name(&h.client_name) {
                    tracing::Span::current().record("client", &*name);
                }
                debug!(client = %h.client_name, "handshake done");
                let cfg = &self.shared.config;
                let body = ResponseBody::Hello(HelloOk {
                    version,
                    connection_id: self.ctx.session.id(),
                    // What the codec enforces, after clamping.
                    max_frame_len: u32::try_from(self.framed.codec().max_frame_len()).unwrap_or(u32::MAX),
                    max_in_flight: u32::try_from(cfg.max_in_flight).unwrap_or(u32::MAX),
                    server: self.shared.server_name(),
                    confirm_ms: (version >= 2).then(|| confirm_ms(&self.shared)),
                });
                self.ctx.reports_safe = version >= 2;
                self.ctx.reports_drain = version >= 2;
                self.ctx.reports_traces = version >= 3;
                self.ctx.speaks_modes = version >= 4;
                self.version = version;
                Response::ok(header.request_id, body).encode(self.framed.write_buffer_mut());
            }
            (false, _) => {
                reply_err(Status::HandshakeRequired, "send HELLO first".into()).encode(self.framed.write_buffer_mut())
            }
            (true, Request::Hello(_)) => {
                reply_err(Status::BadRequest, "HELLO was already done on this connection".into())
                    .encode(self.framed.write_buffer_mut())
            }
            (true, Request::Auth { token }) => {
                stats.count_request(Opcode::Auth);
                let outcome = self.ctx.access.authenticate(
                    &token,
                    &mut self.auth_failures,
                    self.ctx.peer,
                    &self.shared.stats.auth_failures,
                );
                match outcome {
                    Ok(body) => Response::ok(header.request_id, body).encode(self.framed.write_buffer_mut()),
                    Err(refusal) => {
                        reply_err(refusal.reply.status, refusal.reply.message).encode(self.framed.write_buffer_mut());
                        if refusal.close {
                            self.push_closing(Status::Unauthenticated, crate::server::auth::TOO_MANY_FAILURES);
                            return Flow::Close;
                        }
                    }
                }
            }
            (true, Request::Rotate(r)) => {
                let ctx = self.ctx.clone();
                let (request_id, opcode) = (header.request_id, header.opcode);
                let tx = self.progress.get_or_insert_with(mpsc::unbounded_channel).0.clone();
                let fut: Pending = Box::pin(async move {
                    let progress = move |progress| {
                        // The connection may be closing; progress is advisory.
                        let _ = tx.send(Event::RotateProgress { request_id, progress });
                    };
                    match rotate(&ctx, r, &progress).await {
                        Ok(body) => Response::ok(request_id, body),
                        Err(e) => Response::error(request_id, opcode, e.status, e.message),
                    }
                });
                self.inflight.push(fut);
            }
            (true, req) => {
                let ctx = self.ctx.clone();
                let shared = self.shared.clone();
                let (request_id, opcode) = (header.request_id, header.opcode);
                let mut fut: Pending = Box::pin(async move {
                    match dispatch(&ctx, &shared, req).await {
                        Ok(body) => Response::ok(request_id, body),
                        Err(e) => Response::error(request_id, opcode, e.status, e.message),
                    }
                });
                // Most requests finish on their first poll (a ping, an
                // uncontended in-memory acquire): answer those in this batch.
                match (&mut fut).now_or_never() {
                    Some(resp) => self.answer(&resp, lost),
                    None => self.inflight.push(fut),
                }
            }
        }
        Flow::Continue
    }
}
