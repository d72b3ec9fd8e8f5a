//! The binary actor's socket and its two buffers, held only while they hold
//! something.
//!
//! `Framed` keeps an 8 KiB read buffer and an 8 KiB write buffer for the
//! life of a connection, and reserves read space *before* it waits, so an
//! idle connection pins both. Most connections of a lock service are idle
//! most of the time (a holder waiting out its critical section), so here the
//! read buffer is taken only once bytes have arrived (read to the stack
//! first, then kept at the size that came) and given back as soon as every
//! complete frame has been split off it, and the write buffer is given back
//! after each flush. An idle connection then holds no buffer at all; a busy
//! one pays one small allocation per read or flush.

use std::io;

use bytes::{Buf, BytesMut};
use clastor_protocol::{ClastorCodec, Frame, FrameError};
use futures_util::FutureExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::codec::Decoder;

use super::stream::Stream;

/// Read space taken when the socket becomes readable: enough for a burst of
/// pipelined requests (a typical ACQUIRE frame is 40–80 bytes).
const READ_CHUNK: usize = 4096;

/// The first read of a batch goes to the stack, this much at most.
const STACK_CHUNK: usize = 1024;

/// A framed binary connection with on-demand buffers.
#[derive(Debug)]
pub(super) struct Wire {
    stream: Stream,
    codec: ClastorCodec,
    /// Bytes read and not yet framed; zero capacity whenever empty.
    read: BytesMut,
    /// Encoded replies and events not yet written; zero capacity after a flush.
    write: BytesMut,
    /// The peer closed its side: no more frames.
    eof: bool,
}

impl Wire {
    pub(super) fn new(stream: Stream, codec: ClastorCodec) -> Wire {
        Wire {
            stream,
            codec,
            read: BytesMut::new(),
            write: BytesMut::new(),
            eof: false,
        }
    }

    pub(super) fn codec(&self) -> &ClastorCodec {
        &self.codec
    }

    /// Where replies and events are encoded; sent by [`Wire::flush`].
    pub(super) fn write_buffer_mut(&mut self) -> &mut BytesMut {
        &mut self.write
    }

    pub(super) fn write_buffer(&self) -> &BytesMut {
        &self.write
    }

    /// Bytes of buffer this connection holds right now (read and write
    /// capacity): zero when it is idle.
    #[cfg(test)]
    pub(super) fn buffered_capacity(&self) -> usize {
        self.read.capacity() + self.write.capacity()
    }

    /// The next frame: `None` at a clean end of stream, an error for a broken
    /// frame, a stream cut inside a frame, or a failed read.
    ///
    /// # Cancellation safety
    /// Cancel-safe: it waits only for readability; bytes read are kept in
    /// the buffer for the next call.
    pub(super) async fn next_frame(&mut self) -> Option<Result<Frame, FrameError>> {
        loop {
            if let Some(frame) = self.try_frame() {
                return Some(frame);
            }
            if self.eof {
                return None;
            }
            if let Err(e) = self.stream.readable().await {
                return Some(Err(e.into()));
            }
        }
    }

    /// What [`Wire::next_frame`] would return, if it can be had without
    /// waiting; `None` if it would wait.
    pub(super) fn ready_frame(&mut self) -> Option<Option<Result<Frame, FrameError>>> {
        match self.try_frame() {
            Some(frame) => Some(Some(frame)),
            None if self.eof => Some(None),
            None => None,
        }
    }

    /// Frames what is buffered, reading once (without waiting) if that is not
    /// a whole frame. `None`: nothing complete and nothing more to read now.
    fn try_frame(&mut self) -> Option<Result<Frame, FrameError>> {
        loop {
            match self.decode_buffered() {
                Ok(Some(frame)) => return Some(Ok(frame)),
                Ok(None) => {}
                Err(e) => return Some(Err(e)),
            }
            if self.eof {
                let cut = !self.read.is_empty();
                self.read = BytesMut::new();
                return cut.then(|| Err(eof_error()));
            }
            match self.read_some() {
                Some(Ok(0)) => self.eof = true,
                Some(Ok(_)) => {}
                None => {
                    self.shrink_read();
                    return None;
                }
                Some(Err(e)) => return Some(Err(e.into())),
            }
        }
    }

    /// Reads what the socket has, without waiting (`None`: nothing now).
    ///
    /// `poll_read`, not `try_read_buf`: a short read clears the socket's
    /// readiness there, which saves the `recv` that would otherwise only
    /// learn `WouldBlock` (one system call per request on a request-reply
    /// connection). With nothing buffered the read goes to the stack first
    /// and the buffer is allocated at the size that came: most reads find
    /// nothing (the actor looks once more after each batch) or one small
    /// request, and a `READ_CHUNK` allocation given back each time cost more
    /// than the request's own work.
    fn read_some(&mut self) -> Option<io::Result<usize>> {
        if !self.read.is_empty() {
            // The rest of a partial frame, or more of a burst.
            self.read.reserve(READ_CHUNK);
            return self.stream.read_buf(&mut self.read).now_or_never();
        }
        let mut chunk = [0u8; STACK_CHUNK];
        let read = self.stream.read(&mut chunk).now_or_never();
        if let Some(Ok(n)) = read {
            self.read.extend_from_slice(&chunk[..n]);
        }
        read
    }

    fn decode_buffered(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.read.is_empty() {
            return Ok(None);
        }
        let frame = self.codec.decode(&mut self.read)?;
        self.shrink_read();
        Ok(frame)
    }

    /// Gives the read buffer back once nothing is left in it. Frames split
    /// off it keep their own part of the allocation until they are dropped.
    fn shrink_read(&mut self) {
        if self.read.is_empty() && self.read.capacity() > 0 {
            self.read = BytesMut::new();
        }
    }

    /// Writes everything encoded so far, then gives the buffer back.
    ///
    /// # Cancellation safety
    /// Not cancel-safe as to what was written: callers drop the connection
    /// when a flush is cut short (timeout, hard stop).
    pub(super) async fn flush(&mut self) -> io::Result<()> {
        while self.write.has_remaining() {
            let Some(tcp) = self.stream.tcp() else {
                // TLS: records rustls keeps back go out with the flush.
                self.stream.write_all_buf(&mut self.write).await?;
                self.stream.flush().await?;
                break;
            };
            // Try first: the socket is almost always writable, and this saves
            // the readiness check `write_all_buf` would start with.
            match tcp.try_write(&self.write) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.write.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.stream.write_all_buf(&mut self.write).await?;
                }
                Err(e) => return Err(e),
            }
        }
        self.write = BytesMut::new();
        Ok(())
    }
}

fn eof_error() -> FrameError {
    FrameError::Io(io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "stream ended inside a frame",
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use clastor_protocol::{Request, Response, ResponseBody};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    async fn pair() -> (Wire, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (Wire::new(Stream::Tcp(server), ClastorCodec::default()), client)
    }

    fn ping(id: u32) -> BytesMut {
        let mut b = BytesMut::new();
        Request::Ping.encode(id, &mut b);
        b
    }

    #[tokio::test]
    async fn idle_connection_holds_no_buffer() {
        let (mut wire, mut client) = pair().await;
        assert_eq!(wire.buffered_capacity(), 0, "a new connection holds no buffer");
        client.write_all(&ping(7)).await.unwrap();
        let frame = wire.next_frame().await.unwrap().unwrap();
        assert_eq!(frame.header.request_id, 7);
        assert!(wire.ready_frame().is_none());
        assert_eq!(wire.buffered_capacity(), 0, "read buffer given back once drained");
        Response::ok(7, ResponseBody::Pong).encode(wire.write_buffer_mut());
        assert!(wire.buffered_capacity() > 0);
        wire.flush().await.unwrap();
        assert_eq!(wire.buffered_capacity(), 0, "write buffer given back after the flush");
        let mut reply = [0u8; 14];
        client.read_exact(&mut reply).await.unwrap();
    }

    #[tokio::test]
    async fn a_frame_split_across_reads_is_kept_until_whole() {
        let (mut wire, mut client) = pair().await;
        let mut bytes = ping(1);
        bytes.extend_from_slice(&ping(2));
        let rest = bytes.split_off(5);
        client.write_all(&bytes).await.unwrap();
        // Wait until the first bytes are in, then check nothing is framed yet.
        wire.stream.readable().await.unwrap();
        assert!(wire.ready_frame().is_none());
        assert_eq!(wire.read.len(), 1, "the length prefix is taken, one header byte waits");
        client.write_all(&rest).await.unwrap();
        assert_eq!(wire.next_frame().await.unwrap().unwrap().header.request_id, 1);
        assert_eq!(wire.next_frame().await.unwrap().unwrap().header.request_id, 2);
        drop(client);
        assert!(wire.next_frame().await.is_none(), "a clean end after whole frames");
        assert_eq!(wire.buffered_capacity(), 0);
    }

    #[tokio::test]
    async fn a_burst_bigger_than_the_stack_read_comes_out_whole_and_in_order() {
        let (mut wire, mut client) = pair().await;
        let mut burst = BytesMut::new();
        for id in 0..200 {
            Request::Ping.encode(id, &mut burst);
        }
        assert!(
            burst.len() > 2 * STACK_CHUNK,
            "the burst needs more than the stack read"
        );
        client.write_all(&burst).await.unwrap();
        for id in 0..200 {
            assert_eq!(wire.next_frame().await.unwrap().unwrap().header.request_id, id);
        }
        assert!(wire.ready_frame().is_none());
        assert_eq!(wire.buffered_capacity(), 0, "read buffer given back once drained");
    }

    #[tokio::test]
    async fn a_stream_cut_inside_a_frame_is_an_error() {
        let (mut wire, mut client) = pair().await;
        let mut bytes = ping(1);
        bytes.truncate(6);
        client.write_all(&bytes).await.unwrap();
        drop(client);
        assert!(matches!(wire.next_frame().await, Some(Err(FrameError::Io(_)))));
    }
}
