//! The write side of a connection's socket: a plain TCP half the callers
//! write to inline (`try_write`), or, with TLS, the TLS write half behind
//! an async mutex. Callers write TLS inline too, polling once with a no-op
//! waker ([`Writer::tls_write_now`]): what does not go out at once (the
//! socket is full, or rustls holds records back until a flush) is left to
//! the writer task (`conn/writer.rs`), which waits properly.

use std::io;
use std::net::Shutdown;

use tokio::net::tcp::OwnedWriteHalf;

/// The write half of a client TLS stream.
#[cfg(feature = "tls")]
pub(crate) type TlsWrite = tokio::io::WriteHalf<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// A connection's write side, as `Connection` (`conn/connection.rs`) keeps it.
#[derive(Debug)]
pub(crate) enum Writer {
    /// Plain TCP: callers write inline.
    Tcp(OwnedWriteHalf),
    /// TLS: the write half, and a duplicate of the socket's descriptor
    /// for `shutdown`.
    #[cfg(feature = "tls")]
    Tls {
        /// Locked by the one writer of the moment (the `writing` role).
        half: tokio::sync::Mutex<TlsWrite>,
        sock: socket2::Socket,
    },
}

impl Writer {
    /// The plain TCP half, which callers write to inline; `None` with TLS.
    pub(crate) fn tcp(&self) -> Option<&OwnedWriteHalf> {
        match self {
            Writer::Tcp(w) => Some(w),
            #[cfg(feature = "tls")]
            Writer::Tls { .. } => None,
        }
    }

    /// Shuts the socket down (`Write`: tell the server we heard its
    /// goodbye; `Both`: make it see the end now).
    pub(crate) fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Writer::Tcp(w) => socket2::SockRef::from(w.as_ref()).shutdown(how),
            #[cfg(feature = "tls")]
            Writer::Tls { sock, .. } => sock.shutdown(how),
        }
    }

    /// TLS: writes as much of `chunk` as goes without waiting, then
    /// flushes the same way. Returns the bytes taken and whether they are
    /// all on the socket (`false`: the writer task must finish the job).
    #[cfg(feature = "tls")]
    pub(crate) fn tls_write_now(&self, chunk: &[u8]) -> io::Result<(usize, bool)> {
        use std::pin::Pin;
        use std::task::{Context, Poll, Waker};

        use tokio::io::AsyncWrite;

        let Writer::Tls { half, .. } = self else {
            return Ok((0, false));
        };
        let Ok(mut half) = half.try_lock() else {
            return Ok((0, false));
        };
        let mut cx = Context::from_waker(Waker::noop());
        let mut taken = 0;
        while taken < chunk.len() {
            match Pin::new(&mut *half).poll_write(&mut cx, &chunk[taken..]) {
                Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => taken += n,
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => return Ok((taken, false)),
            }
        }
        match Pin::new(&mut *half).poll_flush(&mut cx) {
            Poll::Ready(Ok(())) => Ok((taken, true)),
            Poll::Ready(Err(e)) => Err(e),
            Poll::Pending => Ok((taken, false)),
        }
    }
}
