//! The connection's writer task: it finishes a batch an inline write could
//! not (`submit.rs`) — the socket was full, or, with TLS, rustls held
//! records back until a flush — waiting for the socket, and keeps sending
//! what callers append meanwhile until the buffer is empty, then gives the
//! writer role back.

use std::io;
use std::sync::Arc;

use bytes::{Buf, BytesMut};
#[cfg(feature = "tls")]
use tokio::io::AsyncWriteExt;

use super::connection::Connection;
use crate::error::Error;
use crate::transport::Writer;

/// The writer task, for either transport: woken with a stalled batch, it
/// writes it whole ([`write_chunk`]), then whatever callers appended
/// meanwhile, until the buffer is empty. A write error fails the
/// connection; closing it stops the task, mid-write included.
pub(super) async fn write_loop(shared: Arc<Connection>) {
    loop {
        tokio::select! {
            () = shared.closed.cancelled() => return,
            () = shared.writer_wake.notified() => {}
        }
        let Some(mut chunk) = shared.state().out.stalled.take() else {
            continue;
        };
        loop {
            let written = tokio::select! {
                () = shared.closed.cancelled() => return,
                r = write_chunk(&shared.write, &mut chunk) => r,
            };
            if let Err(e) = written {
                shared.fail(Error::ConnectionLost(format!("write failed: {e}")));
                return;
            }
            let mut st = shared.state();
            let dead = st.dead.is_some();
            match st.out.next_batch(chunk, dead) {
                Some(next) => chunk = next,
                None => break,
            }
        }
    }
}

/// Writes all of `chunk`. Plain TCP: waits for writability and writes what
/// the socket takes, as the inline write does. TLS: through the stream's
/// write half, flushed, so rustls sends every record.
async fn write_chunk(write: &Writer, chunk: &mut BytesMut) -> io::Result<()> {
    match write {
        Writer::Tcp(tcp) => {
            while !chunk.is_empty() {
                tcp.writable().await?;
                match tcp.try_write(chunk) {
                    Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "socket closed")),
                    Ok(n) => chunk.advance(n),
                    Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        }
        #[cfg(feature = "tls")]
        Writer::Tls { half, .. } => {
            let mut half = half.lock().await;
            half.write_all(chunk).await?;
            chunk.clear();
            half.flush().await
        }
    }
}
