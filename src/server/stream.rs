//! A connection's byte stream: plain TCP, or (feature `tls`) TLS over it.
//! The actors read and write it the same way; the binary actor's fast
//! paths (`readable`, `try_write`) go straight to the socket with plain
//! TCP and through rustls' buffers with TLS.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// One accepted connection's stream.
#[derive(Debug)]
pub(super) enum Stream {
    /// Plain TCP.
    Tcp(TcpStream),
    /// TLS, after the handshake, with the first byte already read (it told
    /// binary from text) put back in front.
    #[cfg(feature = "tls")]
    Tls(Box<PutBack>),
}

/// A TLS stream and the byte read ahead of it.
#[cfg(feature = "tls")]
#[derive(Debug)]
pub(super) struct PutBack {
    pub(super) stream: tokio_rustls::server::TlsStream<TcpStream>,
    pub(super) first: Option<u8>,
}

impl Stream {
    /// The plain socket, if this is plain TCP (for `try_write`).
    pub(super) fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Stream::Tcp(s) => Some(s),
            #[cfg(feature = "tls")]
            Stream::Tls(_) => None,
        }
    }

    /// Waits until a read may make progress. With TLS, a read returning
    /// `Pending` means rustls holds no plaintext and the socket none, so
    /// the socket's readiness is the right thing to wait for.
    ///
    /// # Cancellation safety
    /// Safe: it only waits.
    pub(super) async fn readable(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.readable().await,
            #[cfg(feature = "tls")]
            Stream::Tls(t) if t.first.is_some() => Ok(()),
            #[cfg(feature = "tls")]
            Stream::Tls(t) => t.stream.get_ref().0.readable().await,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            #[cfg(feature = "tls")]
            Stream::Tls(t) => {
                if buf.remaining() > 0
                    && let Some(b) = t.first.take()
                {
                    buf.put_slice(&[b]);
                    return Poll::Ready(Ok(()));
                }
                Pin::new(&mut t.stream).poll_read(cx, buf)
            }
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            #[cfg(feature = "tls")]
            Stream::Tls(t) => Pin::new(&mut t.stream).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            #[cfg(feature = "tls")]
            Stream::Tls(t) => Pin::new(&mut t.stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            #[cfg(feature = "tls")]
            Stream::Tls(t) => Pin::new(&mut t.stream).poll_shutdown(cx),
        }
    }
}
