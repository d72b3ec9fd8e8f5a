//! Connection loss and recovery: a broken connection marks every guard on it
//! lost at once and fails pending calls with a typed error; the client
//! reconnects in the background, including to a server restarted on the same
//! port. And a connection that stalls without breaking: what the client
//! could not write while the server read nothing goes out, whole and in
//! order, once it reads again, plain or TLS.

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
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;

/// A TCP proxy whose connections can be cut at once, or frozen (bytes are
/// swallowed, sockets stay open: a peer gone silent), to break a client's
/// connection without the server's cooperation; or held (the client's bytes
/// are not read at all until let go: a server too busy to read, whose
/// socket fills up).
struct Proxy {
    addr: SocketAddr,
    frozen: Arc<AtomicBool>,
    held: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let frozen = Arc::new(AtomicBool::new(false));
        let (held, holding) = watch::channel(false);
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
                conns.spawn(pump(down_r, up_w, frozen2.clone(), Some(holding.clone())));
                conns.spawn(pump(up_r, down_w, frozen2.clone(), None));
            }
        });
        Proxy {
            addr,
            frozen,
            held,
            tasks,
        }
    }

    /// Reads nothing more from the clients until [`Proxy::let_go`].
    fn hold(&self) {
        self.held.send_replace(true);
    }

    fn let_go(&self) {
        self.held.send_replace(false);
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

/// Copies one direction; passes on the end of the stream even when frozen;
/// reads nothing while `held` says so.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
    mut held: Option<watch::Receiver<bool>>,
) {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(held) = &mut held
            && held.wait_for(|h| !h).await.is_err()
        {
            break;
        }
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

/// Lock requests (`n`, on distinct keys with the longest names, about
/// 300 bytes each) sent through `proxy` while it reads nothing: each is
/// polled once (handed to the connection) before the proxy lets go. `n` is
/// chosen so that they do not fit in the sockets' buffers, so the inline
/// writes stall and the writer task finishes the job. Every one must then
/// be granted, with a token of its own.
async fn burst_through_a_held_proxy(client: &Client, proxy: &Proxy, n: usize) {
    use std::future::Future;
    use std::task::Poll;

    proxy.hold();
    let (sent, all_sent) = (
        Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        Arc::new(Notify::new()),
    );
    let kind = "k".repeat(clastor_protocol::name::MAX_NAME_LEN);
    let mut requests = JoinSet::new();
    for i in 0..n {
        let (client, sent, all_sent) = (client.clone(), sent.clone(), all_sent.clone());
        let id = format!("{i:0>width$}", width = clastor_protocol::name::MAX_NAME_LEN);
        let kind = kind.clone();
        requests.spawn(async move {
            let mut acquire = std::pin::pin!(client.lock(&kind, &id).try_acquire());
            let first = std::future::poll_fn(|cx| Poll::Ready(acquire.as_mut().poll(cx))).await;
            if sent.fetch_add(1, Ordering::SeqCst) + 1 == n {
                all_sent.notify_one();
            }
            match first {
                Poll::Ready(r) => r,
                Poll::Pending => acquire.await,
            }
        });
    }
    tokio::time::timeout(PATIENCE, all_sent.notified())
        .await
        .expect("every request handed to the connection");
    proxy.let_go();
    let answered = async {
        let mut tokens = std::collections::HashSet::new();
        while let Some(granted) = requests.join_next().await {
            let guard = granted.unwrap().unwrap().expect("a free key is granted");
            assert!(tokens.insert(guard.token()), "token {} given twice", guard.token());
            guard.release().await.unwrap();
        }
        tokens.len()
    };
    // A writer that lost or never sent part of the burst leaves requests
    // unanswered: this fails instead of hanging.
    let answered = tokio::time::timeout(PATIENCE * 6, answered)
        .await
        .expect("every request answered");
    assert_eq!(answered, n);
    client.ping().await.unwrap();
}

/// About 9 MB of requests: more than the client's send buffer (4 MiB at
/// most, `tcp_wmem`) and the proxy's receive buffer (which does not grow
/// while nothing is read) hold together.
const STALLING_BURST: usize = 30_000;

/// [`burst_through_a_held_proxy`] against a server that takes the whole
/// burst in flight and held on one connection (the client sends no more
/// than the server's bound), plain or, with `ca`, over TLS.
async fn stalled_burst(ca: Option<&support::tls::TestCa>) {
    let tls = ca.map(|ca| {
        let pem = ca.server();
        server::TlsConfig {
            cert: pem.cert,
            key: pem.key,
            client_ca: None,
        }
    });
    let config = ServerConfig {
        max_in_flight: STALLING_BURST,
        tls,
        ..ServerConfig::default()
    };
    let engine = EngineConfig {
        max_held_per_session: STALLING_BURST,
        ..EngineConfig::default()
    };
    let (server, _) = support::start(config, engine).await;
    let proxy = Proxy::start(server.local_addr()).await;
    let mut builder = Client::builder(proxy.addr)
        .keepalive(None)
        .max_in_flight(STALLING_BURST);
    if let Some(ca) = ca {
        builder = builder.tls(clastor_client::TlsConfig::from_pem_files(&ca.ca_file(), None).unwrap());
    }
    let client = builder.connect().await.unwrap();
    burst_through_a_held_proxy(&client, &proxy, STALLING_BURST).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_the_socket_cannot_take_goes_out_whole_once_the_server_reads() {
    stalled_burst(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_burst_the_socket_cannot_take_goes_out_whole_once_the_server_reads() {
    stalled_burst(Some(&support::tls::TestCa::new("clastor test CA"))).await;
}
