//! The reader task: decodes frames, completes the matching pending request
//! (a oneshot per request), registers grants in the table of held locks
//! *before* handing them to the caller, routes events to lock guards and the
//! client's event channel, and tears the connection down when it stops.
//!
//! Only a broken frame is fatal. A reply whose body does not decode (or
//! carries a status this client does not know) fails its own request; an
//! event with an unknown opcode is logged and ignored. The connection, and
//! every lock held through it, lives on. A reply that contradicts the
//! client's state (an unknown request id, the wrong opcode) or a `LOCK_LOST`
//! that cannot be read still closes the connection: the server then releases
//! everything, which is safer than guessing which lock it meant.
//!
//! Teardown happens in one place: when the reader stops (socket error,
//! malformed frame, keepalive timeout, or the last handle dropped), every
//! pending request fails with the same [`Error`], and every lock held through
//! the connection is marked lost at once.

use std::sync::Arc;

use clastor_protocol::{BodyError, EVENT_REQUEST_ID, Event, Flags, Frame, FrameError, Request, Response, ResponseBody};
use futures_util::StreamExt;

use super::connection::Connection;
use super::grant::HeldGrant;
use super::key::key;
use super::pending::{HeldUpdate, PendingGrant, Reply};
use crate::error::{Error, LostReason};
use crate::event::ClientEvent;

/// Where the reader task takes frames from: the read half of a TCP or a TLS
/// stream, boxed so one reader serves both.
pub(super) trait FrameSource: futures_util::Stream<Item = Result<Frame, FrameError>> + Send + Unpin {}

impl<S: futures_util::Stream<Item = Result<Frame, FrameError>> + Send + Unpin> FrameSource for S {}

pub(super) async fn read_loop(shared: Arc<Connection>, mut frames: Box<dyn FrameSource>) {
    let error = loop {
        let next = tokio::select! {
            biased;
            () = shared.closed.cancelled() => break None,
            next = frames.next() => next,
        };
        shared.touch();
        match next {
            None => {
                let why = shared.state().closing.take();
                break Some(Error::ConnectionLost(
                    why.unwrap_or_else(|| "server closed the connection".into()),
                ));
            }
            Some(Err(FrameError::Io(e))) => break Some(Error::ConnectionLost(format!("read failed: {e}"))),
            Some(Err(e)) => break Some(Error::Malformed(e.to_string())),
            Some(Ok(frame)) => {
                if let Err(e) = shared.on_frame(frame) {
                    tracing::warn!(peer = %shared.peer, error = %e, "closing the connection");
                    break Some(e);
                }
            }
        }
    };
    shared.teardown(error);
}

impl Connection {
    /// Handles one frame from the server. An error is fatal to the connection.
    fn on_frame(&self, frame: Frame) -> Result<(), Error> {
        let Frame { header, body } = frame;
        if header.flags == Flags::EVENT || header.request_id == EVENT_REQUEST_ID {
            match Event::decode(&header, body) {
                Ok(event) => self.on_event(event),
                // New event kinds may come with newer servers.
                Err(BodyError::UnknownOpcode(op)) => {
                    tracing::warn!(opcode = op, "ignoring an event with an unknown opcode");
                }
                // A garbled LOCK_LOST could hide the loss of any lock: only
                // closing the connection (the server then releases them all)
                // keeps every guard truthful.
                Err(e) => return Err(Error::Malformed(format!("event: {e}"))),
            }
            return Ok(());
        }
        let request_id = header.request_id;
        let pending = self
            .state()
            .requests
            .remove(request_id)
            .ok_or_else(|| Error::Malformed(format!("reply to request {request_id}, which is not pending")))?;
        if header.opcode != pending.opcode as u8 {
            return Err(Error::Malformed(format!(
                "reply to {} request {request_id} carries opcode 0x{:02x}",
                pending.opcode, header.opcode
            )));
        }
        let mut response = match Response::decode(&header, body) {
            Ok(response) => response,
            Err(e) => {
                // An acquire may have been granted unless the reply was
                // recognisably a refusal (a status this client does not know,
                // or a known error whose message is broken).
                let maybe_granted = !e.is_error_reply();
                let error = Error::from_body_error(e, format_args!("reply to {} request {request_id}", pending.opcode));
                tracing::warn!(peer = %self.peer, %error, "undecodable reply; failing its request only");
                self.on_bad_reply(pending.update, maybe_granted);
                if let Some(tx) = pending.tx {
                    let _ = tx.send(Err(error));
                }
                return Ok(());
            }
        };
        let mut grant = None;
        match (pending.update, &mut response.result) {
            (HeldUpdate::Acquire { key, kind_len }, Ok(ResponseBody::Acquired(ok))) => {
                let shared = Arc::new(HeldGrant::new(key, kind_len, ok));
                if let Some(prev) = self.state().held.insert(shared.clone()) {
                    // The server granted a key this connection already held:
                    // it cannot vouch for the old grant any more.
                    prev.mark_lost(LostReason::Unknown);
                }
                grant = Some(PendingGrant::new(shared, self.me.clone()));
            }
            (HeldUpdate::Release { key, token }, _) => self.state().held.finish_release(&key, token),
            _ => {}
        }
        if let Some(tx) = pending.tx {
            // If the caller stopped waiting, the reply is dropped here, and a
            // grant in it is given back by `PendingGrant`'s `Drop`.
            let _ = tx.send(Ok(Reply { response, grant }));
        }
        Ok(())
    }

    /// A reply to a tracked request could not be decoded: undo what the
    /// request may have done. An acquire that `maybe_granted` (answered `OK`
    /// with a broken body, or too short to tell) is released by "whichever
    /// grant this connection holds" (token 0; the client holds none of it, or
    /// it would not have sent the acquire). A release is treated as done: the
    /// guard is gone either way.
    fn on_bad_reply(&self, update: HeldUpdate, maybe_granted: bool) {
        match update {
            HeldUpdate::Acquire { key, kind_len } if maybe_granted => {
                let req = Request::Release {
                    kind: key[..kind_len].to_owned(),
                    id: key[kind_len + 1..].to_owned(),
                    token: 0,
                };
                let mut st = self.state();
                if st.dead.is_some() {
                    return;
                }
                st.held.start_release(&key);
                let update = HeldUpdate::Release { key, token: 0 };
                if let Err(e) = self.submit_locked(st, &req, None, update, None) {
                    tracing::debug!(error = %e, "release after an undecodable grant not sent");
                }
            }
            HeldUpdate::Release { key, token } => self.state().held.finish_release(&key, token),
            HeldUpdate::Acquire { .. } | HeldUpdate::None => {}
        }
    }

    fn on_event(&self, event: Event) {
        match &event {
            Event::LockLost {
                kind,
                id,
                token,
                reason,
            } => {
                let key = key(kind, id);
                let lock = self.state().held.remove_lost(&key, *token);
                match lock {
                    Some(lock) => {
                        tracing::warn!(%key, token, reason = reason.name(), "lock lost");
                        lock.mark_lost((*reason).into());
                    }
                    None => tracing::debug!(%key, token, "LOCK_LOST for a lock no guard holds"),
                }
            }
            // Delivered to `Client::rotate` through the event channel below.
            Event::RotateProgress { .. } => {}
            Event::Closing { status, message } => {
                tracing::info!(%status, %message, "server is closing the connection");
                self.state().closing = Some(format!("server closed the connection: {status} {message}"));
                // Heard: say so with a FIN, so a server keeping our locks
                // until their promised safe-until (on shutdown) need not.
                if let Err(e) = self.write.shutdown(std::net::Shutdown::Write) {
                    tracing::debug!(error = %e, "could not shut down the write side");
                }
            }
        }
        // Nobody listening is fine.
        let _ = self.events.send(ClientEvent::Server {
            connection_id: self.connection_id(),
            event,
        });
    }

    /// Fails everything still attached to the connection. Runs once, in the
    /// reader task, when it stops.
    fn teardown(&self, error: Option<Error>) {
        let (error, failure, pending, held) = {
            let mut st = self.state();
            let failure = error.is_some() || st.dead.is_some();
            let closing = st.closing.take();
            let error = st
                .dead
                .get_or_insert_with(|| {
                    error.unwrap_or_else(|| {
                        Error::ConnectionLost(closing.unwrap_or_else(|| "connection closed by the client".into()))
                    })
                })
                .clone();
            (error, failure, st.requests.take(), st.held.take())
        };
        self.closed.cancel();
        self.permits.close();
        if failure {
            // Handles (guards, the pool slot) may keep the socket open a while
            // longer; make sure the server sees the end now and releases what
            // this connection held, instead of keeping it for a client that has
            // already reported it lost.
            let _ = self.write.shutdown(std::net::Shutdown::Both);
        }
        for (_, p) in pending {
            if let Some(tx) = p.tx {
                let _ = tx.send(Err(error.clone()));
            }
        }
        let locks_lost = held.lose_all();
        if failure {
            tracing::warn!(peer = %self.peer, connection_id = self.connection_id(), %error, locks_lost, "connection lost");
            let _ = self.events.send(ClientEvent::Disconnected {
                connection_id: self.connection_id(),
                error,
            });
        } else {
            tracing::debug!(connection_id = self.connection_id(), "connection closed");
        }
    }
}
