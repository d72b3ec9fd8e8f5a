//! Sending a request: it is encoded into the combined buffer and its reply
//! registered (`pending.rs`) under the connection's lock, then written inline
//! by the caller that takes the writer role — a non-blocking write, keeping on
//! with whatever other callers appended meanwhile, so a burst of requests
//! leaves in one syscall. Only when the socket is full (for TLS, also when
//! rustls holds records back until a flush) does the writer task
//! (`writer.rs`) take over. Submission is synchronous, so it is cancel-safe
//! and usable from `Drop` (guards release in the background), and the common
//! case costs no task hop. Releases go out here too, as they leave the table
//! of held locks in the same step.

use std::io;
use std::sync::MutexGuard;

use bytes::{Buf, BytesMut};
use clastor_protocol::{LENGTH_PREFIX_LEN, Request};
use tokio::sync::{OwnedSemaphorePermit, oneshot};

use super::connection::{Connection, State};
use super::grant::HeldGrant;
use super::outbound::INLINE_ROUNDS;
use super::pending::{GiveBack, HeldUpdate, Pending, Reply, ReplyTx};
use crate::error::Error;

impl GiveBack for Connection {
    fn give_back(&self, lock: &HeldGrant) {
        self.release_in_background(lock);
    }
}

impl Connection {
    /// Sends `req` and waits for its reply, holding an in-flight permit.
    ///
    /// # Errors
    /// The connection's error if it is or becomes dead; [`Error::InvalidArgument`]
    /// if the request is larger than the server accepts.
    ///
    /// # Cancellation safety
    /// Safe: once submitted the request completes on the server regardless; its
    /// reply is dropped, except that a lock granted to a cancelled acquire is
    /// released in the background.
    pub(crate) async fn call(&self, req: &Request, update: HeldUpdate) -> Result<Reply, Error> {
        let permit = self.permit().await?;
        let (tx, rx) = oneshot::channel();
        self.submit(req, Some(tx), update, Some(permit))?;
        rx.await.unwrap_or_else(|_| Err(self.dead_error()))
    }

    /// Queues `req` for writing and registers its reply handler. Never blocks
    /// on the network.
    pub(crate) fn submit(
        &self,
        req: &Request,
        tx: Option<ReplyTx>,
        update: HeldUpdate,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Result<(), Error> {
        let st = self.state();
        self.submit_locked(st, req, tx, update, permit)
    }

    pub(super) fn submit_locked(
        &self,
        mut st: MutexGuard<'_, State>,
        req: &Request,
        tx: Option<ReplyTx>,
        update: HeldUpdate,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Result<(), Error> {
        if let Some(e) = &st.dead {
            return Err(e.clone());
        }
        let id = st.requests.alloc_id();
        let start = st.out.buf.len();
        req.encode(id, &mut st.out.buf);
        let frame_len = st.out.buf.len() - start - LENGTH_PREFIX_LEN;
        if frame_len > self.hello.max_frame_len as usize {
            st.out.buf.truncate(start);
            return Err(Error::InvalidArgument(format!(
                "request of {frame_len} bytes exceeds the server's frame limit of {}",
                self.hello.max_frame_len
            )));
        }
        st.requests.insert(
            id,
            Pending {
                tx,
                opcode: req.opcode(),
                update,
                _permit: permit,
            },
        );
        self.flush(st);
        Ok(())
    }

    /// Releases `lock` without waiting for the reply (guard drop, failed
    /// renewal, cancelled acquire). Nothing to do if the connection is dead:
    /// the server released everything it held.
    pub(crate) fn release_in_background(&self, lock: &HeldGrant) {
        if let Err(e) = self.send_release(lock, None) {
            tracing::debug!(key = %lock.key, error = %e, "background release not sent");
        }
    }

    /// Sends a RELEASE of `lock`'s grant (by token). From now until its reply,
    /// the key counts as "releasing" rather than held: an acquire of it on this
    /// connection waits for the reply instead of being refused.
    ///
    /// It takes no in-flight permit: with every permit held by acquires
    /// waiting for this very lock, waiting for one would deadlock.
    pub(crate) fn send_release(&self, lock: &HeldGrant, tx: Option<ReplyTx>) -> Result<(), Error> {
        let req = Request::Release {
            kind: lock.kind().to_owned(),
            id: lock.id().to_owned(),
            token: lock.token,
        };
        let mut st = self.state();
        if let Some(e) = &st.dead {
            return Err(e.clone());
        }
        st.held.forget(lock);
        st.held.start_release(&lock.key);
        let update = HeldUpdate::Release {
            key: lock.key.clone(),
            token: lock.token,
        };
        self.submit_locked(st, &req, tx, update, None)
    }

    /// Starts writing the buffer unless someone already is.
    fn flush(&self, mut st: MutexGuard<'_, State>) {
        let Some(chunk) = st.out.start_batch() else {
            return;
        };
        drop(st);
        self.write_inline(chunk);
    }

    /// Writes without waiting; hands over to the writer task when the socket
    /// is full. The caller holds the `writing` role.
    fn write_inline(&self, mut chunk: BytesMut) {
        let Some(write) = self.write.tcp() else {
            #[cfg(feature = "tls")]
            self.write_inline_tls(chunk);
            return;
        };
        for _ in 0..INLINE_ROUNDS {
            match write.try_write(&chunk) {
                Ok(n) if n == chunk.len() => {
                    let mut st = self.state();
                    let dead = st.dead.is_some();
                    match st.out.next_batch(chunk, dead) {
                        Some(next) => chunk = next,
                        None => return,
                    }
                }
                Ok(n) => {
                    chunk.advance(n);
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.fail(Error::ConnectionLost(format!("write failed: {e}")));
                    return;
                }
            }
        }
        self.state().out.stalled = Some(chunk);
        self.writer_wake.notify_one();
    }

    /// [`Connection::write_inline`] for TLS: writes and flushes without
    /// waiting as far as that goes, then hands the rest (or the flush) to
    /// the writer task.
    #[cfg(feature = "tls")]
    fn write_inline_tls(&self, mut chunk: BytesMut) {
        for _ in 0..INLINE_ROUNDS {
            match self.write.tls_write_now(&chunk) {
                Ok((n, true)) if n == chunk.len() => {
                    let mut st = self.state();
                    let dead = st.dead.is_some();
                    match st.out.next_batch(chunk, dead) {
                        Some(next) => chunk = next,
                        None => return,
                    }
                }
                Ok((n, _)) => {
                    chunk.advance(n);
                    break;
                }
                Err(e) => {
                    self.fail(Error::ConnectionLost(format!("write failed: {e}")));
                    return;
                }
            }
        }
        // Possibly empty: then only the flush is left.
        self.state().out.stalled = Some(chunk);
        self.writer_wake.notify_one();
    }
}
