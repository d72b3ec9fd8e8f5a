//! The accept loop of the TCP port and the HTTP port: accept, set the
//! socket's options, serve each connection while it holds one of the
//! port's connection permits, refuse past the limit, stop on shutdown.
//!
//! A connection past the limit is accepted only to be told why, in the
//! port's own form, by a small, separately bounded set of refusal tasks;
//! past that bound, or with TLS on (a TLS client would read a plain refusal
//! as garbage), it is closed without a word. What serving and refusing
//! mean, and how long connections get to finish after shutdown, stay with
//! each port.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::FutureExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// The pause after a failed accept.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// One port's accept settings.
#[derive(Debug)]
pub(super) struct Port<'a> {
    /// The port's name in log lines.
    pub(super) name: &'static str,
    /// Connections served at once; past it a new one is refused.
    pub(super) max_connections: usize,
    /// Refusals answered at once; past it a refused connection is closed
    /// without a word.
    pub(super) max_refusals: usize,
    /// TLS is on: a refused connection is closed without a word.
    pub(super) tls: bool,
    /// Every accepted socket is [`tune`]d first: no Nagle delay, and
    /// keepalive probes after this idle time when it is `Some`.
    pub(super) keepalive: Option<Duration>,
    /// Counts refused connections.
    pub(super) refused: &'a AtomicU64,
}

/// Accepts connections on `listener` until `shutdown`, spawning each on
/// `tracker`: `serve(stream, peer)` under the connection limit, holding its
/// permit until it ends; past the limit `refuse(stream, peer)` (while a
/// refusal slot is free and TLS is off). Returns with the listener closed
/// and the tracker closed, for the caller to wait for the connections.
pub(super) async fn accept_loop<S, SF, R, RF>(
    listener: TcpListener,
    port: Port<'_>,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
    mut serve: S,
    mut refuse: R,
) where
    S: FnMut(TcpStream, SocketAddr) -> SF,
    SF: Future<Output = ()> + Send + 'static,
    R: FnMut(TcpStream, SocketAddr) -> RF,
    RF: Future<Output = ()> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(port.max_connections));
    let refusals = Arc::new(Semaphore::new(port.max_refusals));
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors or similar: back off instead of
                    // spinning, the condition usually clears as connections close.
                    warn!(port = port.name, error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        tune(&stream, port.keepalive);
        match permits.clone().try_acquire_owned() {
            Ok(permit) => {
                // `map`, not `async move { conn.await; .. }`: awaiting a
                // captured future moves it into a second slot of the task,
                // doubling every connection's task (~1.8 KB more per idle one).
                tracker.spawn(serve(stream, peer).map(move |()| drop(permit)));
            }
            Err(_) => {
                port.refused.fetch_add(1, Ordering::Relaxed);
                match refusals.clone().try_acquire_owned() {
                    Ok(_) if port.tls => {
                        debug!(port = port.name, %peer, "TLS connection over the limit: closed");
                    }
                    Ok(slot) => {
                        tracker.spawn(refuse(stream, peer).map(move |()| drop(slot)));
                    }
                    Err(_) => debug!(
                        port = port.name,
                        %peer,
                        "connection over the limit, refusals saturated: closed"
                    ),
                }
            }
        }
    }
    drop(listener);
    tracker.close();
}

/// Per-connection socket options: no Nagle delay, and keepalive so that a
/// client whose host vanished is noticed and its locks released.
pub(super) fn tune(stream: &TcpStream, keepalive: Option<Duration>) {
    let sock = socket2::SockRef::from(stream);
    if let Err(e) = sock.set_tcp_nodelay(true) {
        debug!(error = %e, "TCP_NODELAY not set");
    }
    let Some(idle) = keepalive else { return };
    let params = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval((idle / 3).max(Duration::from_secs(1)))
        .with_retries(3);
    if let Err(e) = sock.set_tcp_keepalive(&params) {
        debug!(error = %e, "TCP keepalive not set");
    }
    // Data the peer never acknowledges (a LOCK_LOST to a vanished host) ends
    // the connection in the same time.
    #[cfg(target_os = "linux")]
    if let Err(e) = sock.set_tcp_user_timeout(Some(idle.saturating_mul(2))) {
        debug!(error = %e, "TCP_USER_TIMEOUT not set");
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::mpsc;

    use super::*;

    /// What a client reads until the server closes the connection.
    async fn read_all(stream: &mut TcpStream) -> std::io::Result<String> {
        let mut out = String::new();
        stream.read_to_string(&mut out).await?;
        Ok(out)
    }

    #[tokio::test]
    async fn connections_past_the_limit_are_refused_until_a_permit_comes_back() -> std::io::Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (shutdown, tracker, refused) = (CancellationToken::new(), TaskTracker::new(), AtomicU64::new(0));
        let port = Port {
            name: "test",
            max_connections: 1,
            max_refusals: 1,
            tls: false,
            keepalive: None,
            refused: &refused,
        };
        let (ended_tx, mut ended) = mpsc::unbounded_channel();
        // Served: greets, then waits for the client to hang up.
        let serve = |mut stream: TcpStream, _| {
            let ended_tx = ended_tx.clone();
            async move {
                let _ = stream.write_all(b"served\n").await;
                let _ = stream.read(&mut [0; 1]).await;
                let _ = ended_tx.send(());
            }
        };
        let refuse = |mut stream: TcpStream, _| async move {
            let _ = stream.write_all(b"refused\n").await;
        };
        let clients = async {
            let mut first = TcpStream::connect(addr).await?;
            let mut greeting = [0; 7];
            first.read_exact(&mut greeting).await?;
            assert_eq!(&greeting, b"served\n");
            let mut second = TcpStream::connect(addr).await?;
            assert_eq!(read_all(&mut second).await?, "refused\n", "told why, then closed");
            drop(first);
            ended.recv().await;
            let mut third = TcpStream::connect(addr).await?;
            third.read_exact(&mut greeting).await?;
            assert_eq!(&greeting, b"served\n", "the first one's permit came back");
            shutdown.cancel();
            std::io::Result::Ok(third)
        };
        let (third, ()) = tokio::join!(clients, accept_loop(listener, port, &shutdown, &tracker, serve, refuse));
        assert!(tracker.is_closed());
        drop(third?);
        tracker.wait().await;
        assert_eq!(refused.load(Ordering::Relaxed), 1);
        assert!(TcpStream::connect(addr).await.is_err(), "the listener is closed");
        Ok(())
    }

    #[tokio::test]
    async fn accepted_connections_get_keepalive() -> std::io::Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let _client = TcpStream::connect(listener.local_addr()?).await?;
        let (accepted, _) = listener.accept().await?;
        tune(&accepted, Some(Duration::from_secs(30)));
        let sock = socket2::SockRef::from(&accepted);
        assert!(sock.keepalive()?);
        assert!(sock.tcp_nodelay()?);
        assert_eq!(sock.tcp_keepalive_time()?, Duration::from_secs(30));
        assert_eq!(sock.tcp_keepalive_interval()?, Duration::from_secs(10));
        #[cfg(target_os = "linux")]
        assert_eq!(sock.tcp_user_timeout()?, Some(Duration::from_secs(60)));
        Ok(())
    }
}
