//! The `Session` stream: one task per stream owns an engine session, like
//! the binary connection actor (`server/binary.rs`) owns its connection's.
//! Its `select!` loop takes, in priority order: shutdown, the client gone,
//! a finished request, a lost-lock event, and the next request — the last
//! only while fewer than `max_in_flight` requests run, so a flooding client
//! is slowed by HTTP/2 flow control, not by the server's memory.
//!
//! Replies carrying `safe_ms` go out after every loss already queued (the
//! binary protocol's version 2 rule). Every event is handed to the response
//! stream within the write timeout, or the stream ends: a client that stops
//! reading cannot pin its locks. On shutdown the stream says goodbye (a
//! `lost` per held lock, then `closing`) and keeps its locks until the last
//! safe-until it promised or until the client goes, like a binary
//! connection. The stream's end — however it comes — closes the session
//! and so releases everything.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use clastor_protocol::{ErrorReply, Event, Status};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::proto::session_event::Event as Out;
use super::proto::session_request::Op;
use super::proto::{self, SessionEvent, SessionRequest};
use super::sessions::Entry;
use super::{GrpcPort, calls, lost_reason, status};
use crate::backend::Backend;
use crate::engine::{LostEvent, LostEvents};
use crate::server::io::goodbye;

/// What a request in flight returns: its request id and its answer.
type Pending = Pin<Box<dyn Future<Output = (u64, Out)> + Send>>;

/// The outbound half: what the response stream yields.
pub(super) type Outbound = mpsc::Sender<Result<SessionEvent, tonic::Status>>;

/// Events buffered for the response stream before the actor waits (within
/// the write timeout) for the client to read.
pub(super) const OUTBOUND_BUFFER: usize = 64;

struct Actor<B: Backend> {
    port: Arc<GrpcPort<B>>,
    entry: Arc<Entry<B>>,
    tx: Outbound,
    in_flight: FuturesUnordered<Pending>,
    /// The request ids in flight, with what cancels each.
    cancels: HashMap<u64, CancellationToken>,
    /// The latest safe-until promised (kept on shutdown, as binary.rs does).
    promised_until: Option<Instant>,
}

/// Runs a stream's session until the stream ends or the server shuts down;
/// then closes the session (releasing everything) and forgets it.
pub(super) async fn run<B: Backend>(
    port: Arc<GrpcPort<B>>,
    id: u64,
    entry: Arc<Entry<B>>,
    mut lost: LostEvents,
    mut inbound: tonic::Streaming<SessionRequest>,
    tx: Outbound,
) {
    let mut a = Actor {
        port: port.clone(),
        entry,
        tx,
        in_flight: FuturesUnordered::new(),
        cancels: HashMap::new(),
        promised_until: None,
    };
    let opened = Out::Opened(proto::SessionOpened {
        session_id: id,
        confirm_ms: crate::server::dispatch::confirm_ms(&port.shared),
        server: port.shared.server_name(),
    });
    if a.send(0, opened).await {
        a.serve(&mut lost, &mut inbound).await;
    }
    // In-flight acquires are withdrawn (cancel-safe), then everything held goes.
    drop(a.in_flight);
    port.sessions.close(id).await;
    debug!(
        session = a.entry.session.id(),
        "gRPC session stream ended; its locks are released"
    );
}

impl<B: Backend> Actor<B> {
    async fn serve(&mut self, lost: &mut LostEvents, inbound: &mut tonic::Streaming<SessionRequest>) {
        let max_in_flight = self.port.shared.config.max_in_flight;
        let shutdown = self.port.shutdown.clone();
        loop {
            let can_read = self.in_flight.len() < max_in_flight;
            let (request_id, out) = tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    for ev in goodbye(&self.entry.session, lost) {
                        if !self.send(0, event(ev)).await {
                            return;
                        }
                    }
                    self.keep_promises(inbound).await;
                    return;
                }
                () = self.tx.closed() => return,
                Some((id, out)) = self.in_flight.next(), if !self.in_flight.is_empty() => {
                    self.cancels.remove(&id);
                    (id, out)
                }
                Some(ev) = lost.recv() => (0, Out::Lost(lost_message(&ev))),
                msg = inbound.message(), if can_read => match msg {
                    Ok(Some(req)) => match self.start(req) {
                        Some(answer) => answer,
                        None => continue,
                    },
                    // The client closed its side, or the stream broke:
                    // the session ends either way.
                    Ok(None) => return,
                    Err(e) => {
                        debug!(error = %e, "gRPC session stream broke");
                        return;
                    }
                },
            };
            if self.carries_promise(&out) {
                while let Some(ev) = lost.try_recv() {
                    if !self.send(0, Out::Lost(lost_message(&ev))).await {
                        return;
                    }
                }
            }
            self.remember_promise(&out);
            if !self.send(request_id, out).await {
                return;
            }
        }
    }

    /// Starts a request; an answer now for what needs no waiting (a
    /// cancel, a refused request).
    fn start(&mut self, req: SessionRequest) -> Option<(u64, Out)> {
        let rid = req.request_id;
        let refuse = |status, message: &str| {
            Some((
                rid,
                Out::Error(status::to_error(ErrorReply {
                    status,
                    message: message.to_owned(),
                })),
            ))
        };
        let Some(op) = req.op else {
            return refuse(Status::BadRequest, "a request with no operation");
        };
        if let Op::Cancel(target) = op {
            if let Some(token) = self.cancels.get(&target) {
                token.cancel();
            }
            return Some((rid, Out::Cancelled(proto::Empty {})));
        }
        if rid != 0 && self.cancels.contains_key(&rid) {
            return refuse(Status::BadRequest, "this request id is already in flight on the stream");
        }
        let cancel = CancellationToken::new();
        if rid != 0 {
            self.cancels.insert(rid, cancel.clone());
        }
        let port = self.port.clone();
        let entry = self.entry.clone();
        let idle_ms = port.idle_ms();
        let work = async move {
            let shared = &port.shared;
            let out = match op {
                Op::Acquire(a) => calls::acquire(shared, &entry, idle_ms, rid, a).await.map(Out::Acquired),
                Op::Release(r) => calls::release(shared, &entry, r).await.map(Out::Released),
                Op::Renew(r) => calls::renew(shared, &entry, idle_ms, r).await.map(Out::Renewed),
                Op::Confirm(_) => calls::confirm(shared, &entry, idle_ms).await.map(Out::Confirmed),
                Op::Held(h) => calls::held(shared, &entry, h.all).await.map(Out::Held),
                Op::Cancel(_) => Ok(Out::Cancelled(proto::Empty {})),
            };
            out.unwrap_or_else(|e| Out::Error(status::to_error(e)))
        };
        self.in_flight.push(Box::pin(async move {
            tokio::select! {
                // A request that finished is answered as it finished, even
                // if its cancel came in the same moment.
                biased;
                out = work => (rid, out),
                // Dropping the work withdraws a waiting acquire: nothing is
                // left behind (the engine's acquire is cancel-safe).
                () = cancel.cancelled() => (rid, Out::Acquired(proto::AcquireReply {
                    granted: false,
                    reason: "cancelled".to_owned(),
                    ..proto::AcquireReply::default()
                })),
            }
        }));
        None
    }

    fn carries_promise(&self, out: &Out) -> bool {
        matches!(
            out,
            Out::Acquired(proto::AcquireReply { granted: true, .. }) | Out::Renewed(_) | Out::Confirmed(_)
        )
    }

    fn remember_promise(&mut self, out: &Out) {
        let safe_ms = match out {
            Out::Acquired(a) if a.granted => a.safe_ms,
            Out::Renewed(r) => r.safe_ms,
            Out::Confirmed(c) => c.safe_ms,
            _ => return,
        };
        if safe_ms != u32::MAX {
            let until = Instant::now() + Duration::from_millis(u64::from(safe_ms));
            self.promised_until = Some(self.promised_until.map_or(until, |p| p.max(until)));
        }
    }

    /// Hands one event to the response stream within the write timeout;
    /// false when the stream is done for.
    async fn send(&mut self, request_id: u64, out: Out) -> bool {
        let ev = SessionEvent {
            request_id,
            event: Some(out),
        };
        let shared = &self.port.shared;
        tokio::select! {
            r = tokio::time::timeout(shared.config.write_timeout, self.tx.send(Ok(ev))) => match r {
                Ok(Ok(())) => true,
                Ok(Err(_)) => false,
                Err(_) => {
                    tracing::info!("gRPC client stopped reading its session stream; ending it");
                    false
                }
            },
            () = shared.hard_stop.cancelled() => false,
        }
    }

    /// After the shutdown goodbye: keeps the session, and so its locks,
    /// until the last safe-until promised or until the client goes.
    async fn keep_promises(&mut self, inbound: &mut tonic::Streaming<SessionRequest>) {
        let Some(until) = self.promised_until.filter(|&t| t > Instant::now()) else {
            return;
        };
        if self.entry.session.held_count() == 0 {
            return;
        }
        let closed = async { while let Ok(Some(_)) = inbound.message().await {} };
        tokio::select! {
            () = tokio::time::sleep_until(until) => {}
            () = closed => {}
            () = self.tx.closed() => {}
            () = self.port.shared.hard_stop.cancelled() => {}
        }
    }
}

fn lost_message(ev: &LostEvent) -> proto::LockLost {
    proto::LockLost {
        kind: ev.key.kind().to_owned(),
        id: ev.key.id().to_owned(),
        token: ev.token,
        reason: lost_reason(ev.reason).into(),
    }
}

/// The goodbye's events (`server/io.rs`), in the stream's form.
fn event(ev: Event) -> Out {
    match ev {
        Event::LockLost {
            kind,
            id,
            token,
            reason,
        } => Out::Lost(proto::LockLost {
            kind,
            id,
            token,
            reason: lost_reason(reason).into(),
        }),
        Event::Closing { status, message } => Out::Closing(status::to_error(ErrorReply { status, message })),
        other => Out::Closing(status::to_error(ErrorReply {
            status: Status::ShuttingDown,
            message: format!("{other:?}"),
        })),
    }
}
