//! The write side of a connection's socket: a plain TCP half the callers
//! write to inline (`try_write`), or, with TLS, only the socket itself (for
//! shutting it down) while the TLS write half lives in the writer task
//! (`conn.rs`, `tls_write_loop`): a TLS stream cannot be written without a
//! task context, and the records it buffers need a flush.

use std::io;
use std::net::Shutdown;

use tokio::net::tcp::OwnedWriteHalf;

/// A connection's write side, as [`Connection`](crate::conn::Connection) keeps it.
#[derive(Debug)]
pub(crate) enum Writer {
    /// Plain TCP: callers write inline.
    Tcp(OwnedWriteHalf),
    /// TLS: a duplicate of the socket's descriptor, for `shutdown` only.
    #[cfg(feature = "tls")]
    Tls(socket2::Socket),
}

impl Writer {
    /// The plain TCP half, which callers write to inline; `None` with TLS.
    pub(crate) fn tcp(&self) -> Option<&OwnedWriteHalf> {
        match self {
            Writer::Tcp(w) => Some(w),
            #[cfg(feature = "tls")]
            Writer::Tls(_) => None,
        }
    }

    /// Shuts the socket down (`Write`: tell the server we heard its
    /// goodbye; `Both`: make it see the end now).
    pub(crate) fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Writer::Tcp(w) => socket2::SockRef::from(w.as_ref()).shutdown(how),
            #[cfg(feature = "tls")]
            Writer::Tls(sock) => sock.shutdown(how),
        }
    }
}
