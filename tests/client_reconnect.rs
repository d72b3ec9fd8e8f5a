//! Connection loss and recovery: a broken connection marks every guard on it
//! lost at once and fails pending calls with a typed error; the client
//! reconnects in the background, including to a server restarted on the same
//! port.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clastor::backend::memory::MemoryBackend;
use clastor::server::{self, ServerConfig};
use clastor::{Engine, EngineConfig};
use clastor_client::{Client, ClientEvent, Error, LostReason, Released};
use support::PATIENCE;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// A TCP proxy whose connections can be cut at once, or frozen (bytes are
/// swallowed, sockets stay open: a peer gone silent), to break a client's
/// connection without the server's cooperation.
struct Proxy {
    addr: SocketAddr,
    frozen: Arc<AtomicBool>,
    tasks: JoinSet<()>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let frozen = Arc::new(AtomicBool::new(false));
        let mut tasks = JoinSet::new();
        let frozen2 = frozen.clone();
        tasks.spawn(async move {
            let mut conns = JoinSet::new();
            while let Ok((down, _)) = listener.accept().await {
                let Ok(up) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let (down_r, down_w) = down.into_split();
                let (up_r, up_w) = up.into_split();
                conns.spawn(pump(down_r, up_w, frozen2.clone()));
                conns.spawn(pump(up_r, down_w, frozen2.clone()));
            }
        });
        Proxy { addr, frozen, tasks }
    }

    /// Cuts every proxied connection (and stops accepting).
    fn cut(&mut self) {
        self.tasks.abort_all();
    }

    /// From now on, forwards nothing but end-of-stream.
    fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }
}

/// Copies one direction; passes on the end of the stream even when frozen.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, frozen: Arc<AtomicBool>) {
    let mut buf = [0u8; 4096];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if !frozen.load(Ordering::SeqCst) && to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

#[tokio::test]
async fn connection_loss_marks_every_guard_lost_and_fails_pending_calls() {
    let (server, _) = support::start_default().await;
    let mut proxy = Proxy::start(server.local_addr()).await;
    let client = Client::builder(proxy.addr).keepalive(None).connect().await.unwrap();
    let blocker = support::connect(&server).await;
    let mut events = client.events();

    let guards: Vec<_> = futures_util::future::join_all((0..5).map(|i| client.lock("k", format!("{i}")).try_acquire()))
        .await
        .into_iter()
        .map(|r| r.unwrap().unwrap())
        .collect();
    let _held = support::take_free(&blocker, "k", "busy").await;
    let pending = {
        let client = client.clone();
        tokio::spawn(async move { client.lock("k", "busy").wait(PATIENCE * 3).acquire().await })
    };
    // Make sure the blocked acquire is on the wire before cutting.
    client.ping().await.unwrap();

    proxy.cut();

    for g in &guards {
        let reason = tokio::time::timeout(PATIENCE, g.lost()).await.expect("lost in time");
        assert_eq!(reason, LostReason::ConnectionLost);
    }
    let err = tokio::time::timeout(PATIENCE, pending)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, Error::ConnectionLost(_)), "{err:?}");
    assert!(err.is_retryable() && err.is_connection_error());
    let ev = tokio::time::timeout(PATIENCE, events.recv()).await.unwrap().unwrap();
    assert!(matches!(ev, ClientEvent::Disconnected { .. }), "{ev:?}");
    for g in guards {
        assert_eq!(g.release().await, Ok(Released::AlreadyGone(LostReason::ConnectionLost)));
    }
    // The server released them with the connection.
    let other = support::connect(&server).await;
    for i in 0..5 {
        assert!(support::granted_in_time(&other, "k", format!("{i}")).await);
    }
    server.shutdown().await;
}

#[tokio::test]
async fn reconnects_after_the_server_restarts_on_the_same_port() {
    let (server, _) = support::start_default().await;
    let addr = server.local_addr();
    let client = Client::builder(addr)
        .reconnect_backoff(Duration::from_millis(10), Duration::from_millis(100))
        .connect_timeout(PATIENCE)
        .connect()
        .await
        .unwrap();
    let mut events = client.events();
    let guard = support::take_free(&client, "k", "survivor").await;

    server.shutdown().await;
    let reason = tokio::time::timeout(PATIENCE, guard.lost())
        .await
        .expect("lost in time");
    assert!(
        matches!(reason, LostReason::ServerShutdown | LostReason::ConnectionLost),
        "{reason:?}"
    );
    // While the server is down, calls wait for the reconnect (up to the
    // connect timeout) rather than failing at once.
    let ping = {
        let client = client.clone();
        tokio::spawn(async move { client.ping().await })
    };

    let engine = Engine::new(MemoryBackend::new(), EngineConfig::default());
    let server = server::spawn(
        engine,
        ServerConfig {
            listen: addr,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    tokio::time::timeout(PATIENCE, ping)
        .await
        .expect("reconnected in time")
        .unwrap()
        .unwrap();
    loop {
        let ev = tokio::time::timeout(PATIENCE, events.recv()).await.unwrap().unwrap();
        if matches!(ev, ClientEvent::Connected { .. }) {
            break;
        }
    }
    let again = client
        .lock("k", "survivor")
        .try_acquire()
        .await
        .unwrap()
        .expect("fresh server, free key");
    assert!(matches!(guard.release().await, Ok(Released::AlreadyGone(_))));
    again.release().await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn calls_fail_with_connect_error_while_the_server_stays_down() {
    let (server, _) = support::start_default().await;
    let client = Client::builder(server.local_addr())
        .reconnect_backoff(Duration::from_millis(5), Duration::from_millis(20))
        .connect_timeout(Duration::from_millis(300))
        .connect()
        .await
        .unwrap();
    server.shutdown().await;
    let err = tokio::time::timeout(PATIENCE, async {
        loop {
            // The first call may still race the teardown of the old connection.
            match client.ping().await {
                Err(e @ Error::Connect { .. }) => break e,
                Err(Error::ConnectionLost(_)) => continue,
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await
    .unwrap();
    assert!(err.is_retryable());
}

#[tokio::test]
async fn a_silent_connection_is_declared_lost_and_closed_so_the_server_releases() {
    let (server, _) = support::start_default().await;
    let proxy = Proxy::start(server.local_addr()).await;
    let client = Client::builder(proxy.addr)
        .keepalive(Some(Duration::from_millis(100)))
        .connect()
        .await
        .unwrap();
    let guard = support::take_free(&client, "k", "silent").await;
    proxy.freeze();
    let reason = tokio::time::timeout(PATIENCE, guard.lost())
        .await
        .expect("lost in time");
    assert_eq!(reason, LostReason::ConnectionLost);
    // The (lost) guard is still alive, holding its connection handle; the
    // client closed the socket anyway, so the server has released the lock.
    let other = support::connect(&server).await;
    assert!(support::granted_in_time(&other, "k", "silent").await);
    drop(guard);
    server.shutdown().await;
}

/// Starts a memory-backend server on `addr` (a port a previous one used).
async fn restart_on(addr: SocketAddr) -> server::ServerHandle {
    let engine = Engine::new(MemoryBackend::new(), EngineConfig::default());
    server::spawn(
        engine,
        ServerConfig {
            listen: addr,
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn a_lock_request_with_a_retry_policy_rides_out_a_restart() {
    let (server, _) = support::start_default().await;
    let addr = server.local_addr();
    // A short connect timeout: without a retry, an outage longer than it fails.
    let client = Client::builder(addr)
        .reconnect_backoff(Duration::from_millis(10), Duration::from_millis(50))
        .connect_timeout(Duration::from_millis(200))
        .connect()
        .await
        .unwrap();
    server.shutdown().await;
    let once = {
        let client = client.clone();
        tokio::spawn(async move { client.lock("k", "retried").try_acquire().await })
    };
    let retried = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .lock("k", "retried")
                .retry(clastor_client::RetryPolicy::until(PATIENCE))
                .try_acquire()
                .await
        })
    };
    // The outage outlasts the connect timeout: the plain request gives up.
    let failed = once.await.unwrap();
    assert!(matches!(&failed, Err(e) if e.is_retryable()), "{failed:?}");
    let server = restart_on(addr).await;
    let guard = tokio::time::timeout(PATIENCE, retried)
        .await
        .expect("retried in time")
        .unwrap()
        .unwrap()
        .expect("free on the fresh server");
    guard.release().await.unwrap();
    server.shutdown().await;
}
