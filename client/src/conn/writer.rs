//! The connection's writer task: it finishes a batch an inline write could
//! not (`submit.rs`) — the socket was full, or, with TLS, rustls held
//! records back until a flush — waiting for the socket, and keeps sending
//! what callers append meanwhile until the buffer is empty, then gives the
//! writer role back.

use std::io;
use std::sync::Arc;

use bytes::Buf;
#[cfg(feature = "tls")]
use tokio::io::AsyncWriteExt;

use super::connection::Connection;
use crate::error::Error;
#[cfg(feature = "tls")]
use crate::transport::Writer;

/// The writer task of a plain TCP connection: finishes what an inline write
/// could not (a full socket), waiting for writability, batched the same way.
pub(super) async fn write_loop(shared: Arc<Connection>) {
    let Some(write) = shared.write.tcp() else {
        return;
    };
    loop {
        tokio::select! {
            () = shared.closed.cancelled() => return,
            () = shared.writer_wake.notified() => {}
        }
        let Some(mut chunk) = shared.state().out.stalled.take() else {
            continue;
        };
        loop {
            while !chunk.is_empty() {
                tokio::select! {
                    () = shared.closed.cancelled() => return,
                    ready = write.writable() => {
                        if let Err(e) = ready {
                            shared.fail(Error::ConnectionLost(format!("write failed: {e}")));
                            return;
                        }
                    }
                }
                match write.try_write(&chunk) {
                    Ok(0) => {
                        shared.fail(Error::ConnectionLost("write failed: socket closed".into()));
                        return;
                    }
                    Ok(n) => chunk.advance(n),
                    Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
                    Err(e) => {
                        shared.fail(Error::ConnectionLost(format!("write failed: {e}")));
                        return;
                    }
                }
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

/// The writer task of a TLS connection: finishes what an inline write
/// could not (a full socket, records held back until a flush), batched like
/// the plain writer's.
#[cfg(feature = "tls")]
pub(super) async fn tls_write_loop(shared: Arc<Connection>) {
    let Writer::Tls { half, .. } = &shared.write else {
        return;
    };
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
                r = async {
                    let mut half = half.lock().await;
                    half.write_all(&chunk).await?;
                    half.flush().await
                } => r,
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
