//! The lock API against an in-process server: grants and tokens, contention,
//! pipelining on one connection, release on drop, cancelled acquires, leases,
//! renewal and lost-lock notification.
//!
//! Nothing here sleeps to synchronise: tests await the event they expect
//! (a grant, a loss) under a generous timeout.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use clastor_client::{Client, Error, HeldScope, LostReason, Released};
use futures_util::FutureExt;
use futures_util::future::join_all;
use support::PATIENCE;

#[tokio::test]
async fn grant_release_and_increasing_tokens() {
    let (server, client) = support::start_and_connect().await;
    let mut last = 0;
    for _ in 0..5 {
        let guard = support::take_free(&client, "transaction", "tx-1").await;
        assert_eq!((guard.kind(), guard.id()), ("transaction", "tx-1"));
        assert!(guard.token() > last, "token {} after {last}", guard.token());
        assert!(!guard.version().is_empty());
        assert_eq!(guard.lease(), None);
        assert!(!guard.is_lost());
        last = guard.token();
        guard.release().await.unwrap();
    }
    server.shutdown().await;
}

#[tokio::test]
async fn contention_is_an_outcome_and_waiters_are_served() {
    let (server, a) = support::start_and_connect().await;
    let b = support::connect(&server).await;
    let held = support::take_free(&a, "k", "x").await;
    assert!(b.lock("k", "x").try_acquire().await.unwrap().is_none());
    assert!(
        b.lock("k", "x")
            .wait(Duration::from_millis(20))
            .acquire()
            .await
            .unwrap()
            .is_none()
    );
    // Same connection: another task waits its turn like anyone else (tried
    // once here: not acquired).
    assert!(a.lock("k", "x").try_acquire().await.unwrap().is_none());
    let waiter = tokio::spawn(async move { b.lock("k", "x").wait(PATIENCE).acquire().await });
    let first = held.token();
    held.release().await.unwrap();
    let got = waiter.await.unwrap().unwrap().expect("granted after release");
    assert!(got.token() > first);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_acquires_pipelined_on_one_connection() {
    let (server, client) = support::start_and_connect().await;
    let n = 500;
    let guards: Vec<_> = join_all((0..n).map(|i| {
        let client = client.clone();
        async move { client.lock("pipelined", format!("id-{i}")).try_acquire().await }
    }))
    .await
    .into_iter()
    .map(|r| r.unwrap().expect("distinct keys are free"))
    .collect();
    let conns: HashSet<u64> = guards.iter().map(|g| g.connection_id()).collect();
    assert_eq!(conns.len(), 1, "all on one connection");
    let tokens: HashSet<u64> = guards.iter().map(|g| g.token()).collect();
    assert_eq!(tokens.len(), n);
    assert_eq!(client.held(HeldScope::Connection).await.unwrap().len(), n);
    for r in join_all(guards.into_iter().map(|g| g.release())).await {
        r.unwrap();
    }
    assert!(client.held(HeldScope::Connection).await.unwrap().is_empty());
    server.shutdown().await;
}

#[tokio::test]
async fn a_blocked_acquire_does_not_hold_up_other_requests() {
    let (server, holder) = support::start_and_connect().await;
    let client = support::connect(&server).await;
    let held = support::take_free(&holder, "k", "busy").await;
    let blocked = {
        let client = client.clone();
        tokio::spawn(async move { client.lock("k", "busy").wait(PATIENCE).acquire().await })
    };
    // Replies come back out of order: these complete while the acquire waits.
    for _ in 0..10 {
        client.ping().await.unwrap();
    }
    let other = support::take_free(&client, "k", "free").await;
    assert!(!blocked.is_finished());
    held.release().await.unwrap();
    let got = blocked.await.unwrap().unwrap().expect("granted");
    assert_eq!(got.connection_id(), other.connection_id());
    server.shutdown().await;
}

#[tokio::test]
async fn dropping_a_guard_releases_the_lock() {
    let (server, a) = support::start_and_connect().await;
    let b = support::connect(&server).await;
    let guard = support::take_free(&a, "k", "dropped").await;
    let waiter = tokio::spawn(async move { b.lock("k", "dropped").wait(PATIENCE).acquire().await });
    drop(guard);
    assert!(
        waiter.await.unwrap().unwrap().is_some(),
        "granted once the drop's release landed"
    );
    // The same connection can take the key again at once after a drop: the
    // client orders the acquire after the background release.
    let c = support::connect(&server).await;
    for _ in 0..20 {
        let g = c
            .lock("k", "again")
            .try_acquire()
            .await
            .unwrap()
            .expect("released by the previous drop");
        drop(g);
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_grant_nobody_waits_for_is_given_back() {
    let (server, holder) = support::start_and_connect().await;
    let quitter = support::connect(&server).await;
    let third = support::connect(&server).await;
    let held = support::take_free(&holder, "k", "cancelled").await;
    {
        // Queue a wait on the server, then stop waiting for it client-side.
        let acquire = quitter.lock("k", "cancelled").wait(PATIENCE).acquire();
        let mut acquire = std::pin::pin!(acquire);
        assert!(acquire.as_mut().now_or_never().is_none(), "sent, not yet answered");
        // One round trip on the same connection proves the ACQUIRE reached the server first.
        quitter.ping().await.unwrap();
    }
    held.release().await.unwrap();
    // The server grants the queued wait to `quitter`, whose client gives it back.
    assert!(support::granted_in_time(&third, "k", "cancelled").await);
    server.shutdown().await;
}

#[tokio::test]
async fn an_expired_lease_is_reported_lost() {
    let (server, client) = support::start_and_connect().await;
    let guard = client
        .lock("k", "leased")
        .lease(Duration::from_millis(50))
        .try_acquire()
        .await
        .unwrap()
        .expect("free");
    assert_eq!(guard.lease(), Some(Duration::from_millis(50)));
    let mut watch = guard.lost_watch();
    let reason = tokio::time::timeout(PATIENCE, guard.lost())
        .await
        .expect("lost in time");
    assert_eq!(reason, LostReason::LeaseExpired);
    assert!(guard.is_lost());
    assert_eq!(watch.wait().await, Some(LostReason::LeaseExpired));
    assert!(matches!(
        guard.renew(Duration::from_secs(1)).await,
        Err(Error::LockLost(LostReason::LeaseExpired))
    ));
    assert_eq!(
        guard.release().await,
        Ok(Released::AlreadyGone(LostReason::LeaseExpired)),
        "an outcome, not an error"
    );
    // And the key is free again.
    assert!(client.lock("k", "leased").try_acquire().await.unwrap().is_some());
    server.shutdown().await;
}

#[tokio::test]
async fn explicit_renewal_extends_the_lease() {
    let (server, client) = support::start_and_connect().await;
    let guard = client
        .lock("k", "renewed")
        .lease(Duration::from_millis(200))
        .try_acquire()
        .await
        .unwrap()
        .expect("free");
    guard.renew(Duration::from_secs(60)).await.unwrap();
    assert_eq!(guard.lease(), Some(Duration::from_secs(60)));
    let held = client.held(HeldScope::Connection).await.unwrap();
    assert!(held[0].lease_remaining_ms > 200, "{held:?}");
    guard.release().await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn auto_renewal_keeps_a_short_lease_alive() {
    let (server, client) = support::start_and_connect().await;
    let other = support::connect(&server).await;
    // Generous against a loaded CI machine: a renewal is due every 100 ms.
    let lease = Duration::from_millis(300);
    let guard = client
        .lock("k", "auto")
        .lease(lease)
        .auto_renew(true)
        .try_acquire()
        .await
        .unwrap()
        .expect("free");
    // Someone else waits for several leases' worth of time and must not get it.
    let got = other.lock("k", "auto").wait(lease * 3).acquire().await.unwrap();
    assert!(got.is_none(), "lock changed hands while auto-renewed");
    assert!(!guard.is_lost(), "{:?}", guard.lost_reason());
    // Dropping the guard stops renewal and releases.
    drop(guard);
    assert!(support::granted_in_time(&other, "k", "auto").await);
    server.shutdown().await;
}

#[tokio::test]
async fn a_pool_spreads_locks_and_each_guard_keeps_its_connection() {
    let (server, _) = support::start_default().await;
    let client = Client::builder(server.local_addr())
        .connections(3)
        .connect()
        .await
        .unwrap();
    let guards: Vec<_> = join_all((0..9).map(|i| client.lock("pool", format!("{i}")).try_acquire()))
        .await
        .into_iter()
        .map(|r| r.unwrap().unwrap())
        .collect();
    let conns: HashSet<u64> = guards.iter().map(|g| g.connection_id()).collect();
    assert_eq!(conns.len(), 3);
    assert_eq!(client.held(HeldScope::Connection).await.unwrap().len(), 9);
    for g in guards {
        g.release().await.unwrap();
    }
    assert!(client.held(HeldScope::Connection).await.unwrap().is_empty());
    server.shutdown().await;
}

/// A TCP proxy in front of the server that can hold back the server's events
/// (`LOCK_LOST`) while letting responses through: it opens, on demand, the
/// window in which the client has not yet learnt that a grant was lost.
mod gate {
    use std::net::SocketAddr;

    use bytes::{BufMut, BytesMut};
    use clastor_protocol::{ClastorCodec, Flags, Frame, MAX_FRAME_LEN_CEILING};
    use futures_util::StreamExt;
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::watch;
    use tokio_util::codec::FramedRead;

    /// Starts the proxy for one connection; `true` on the returned sender holds events back.
    pub(crate) async fn start(upstream: SocketAddr) -> (SocketAddr, watch::Sender<bool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (hold, mut held) = watch::channel(false);
        tokio::spawn(async move {
            let (client, _) = listener.accept().await.unwrap();
            let server = TcpStream::connect(upstream).await.unwrap();
            client.set_nodelay(true).unwrap();
            server.set_nodelay(true).unwrap();
            let (mut client_read, mut client_write) = client.into_split();
            let (server_read, mut server_write) = server.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
            });
            let mut frames = FramedRead::new(server_read, ClastorCodec::new(MAX_FRAME_LEN_CEILING));
            let mut queued: Vec<Frame> = Vec::new();
            loop {
                tokio::select! {
                    frame = frames.next() => {
                        let Some(Ok(frame)) = frame else { return };
                        if frame.header.flags == Flags::EVENT && *held.borrow() {
                            queued.push(frame);
                        } else if client_write.write_all(&encode(&frame)).await.is_err() {
                            return;
                        }
                    }
                    changed = held.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        if !*held.borrow_and_update() {
                            for frame in queued.drain(..) {
                                if client_write.write_all(&encode(&frame)).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                }
            }
        });
        (addr, hold)
    }

    fn encode(frame: &Frame) -> BytesMut {
        let mut out = BytesMut::new();
        out.put_u32(u32::try_from(8 + frame.body.len()).unwrap());
        out.put_u8(frame.header.version);
        out.put_u8(frame.header.opcode);
        out.put_u16(frame.header.flags.0);
        out.put_u32(frame.header.request_id);
        out.put_slice(&frame.body);
        out
    }
}

/// The reviewer's scenario: grant A's lease runs out and the key is granted
/// again on the same connection (grant B) before the client has read A's
/// `LOCK_LOST`; a late release or renewal through A's guard then reaches the
/// server. It names A's token, so B survives, and A's guard reports the loss.
#[tokio::test]
async fn a_stale_release_or_renew_never_touches_a_newer_grant() {
    use clastor_client::{Request, ResponseBody};

    let (server, other) = support::start_and_connect().await;
    let (addr, hold_events) = gate::start(server.local_addr()).await;
    let client = Client::builder(addr).keepalive(None).connect().await.unwrap();
    let lease = Duration::from_millis(300);

    for stale_renew in [false, true] {
        let a = client
            .lock("k", "stale")
            .lease(lease)
            .try_acquire()
            .await
            .unwrap()
            .expect("free");
        hold_events.send_replace(true);
        // Once someone else got the key, A's lease has run out on the server.
        let between = other.lock("k", "stale").wait(PATIENCE).acquire().await.unwrap();
        between.expect("granted when A expired").release().await.unwrap();
        assert!(!a.is_lost(), "the LOCK_LOST is held back");
        // The lock API does not ask the server for a key another task of the
        // connection still holds: it waits its turn (tried once: no)...
        assert!(client.lock("k", "stale").try_acquire().await.unwrap().is_none());
        // ...so take grant B the raw way, on the same connection.
        let b = client
            .request(support::try_acquire_request("k", "stale", 0))
            .await
            .unwrap();
        let Ok(ResponseBody::Acquired(b)) = b.result else {
            panic!("B not granted: {b:?}")
        };
        assert!(b.token > a.token());
        if stale_renew {
            assert!(matches!(a.renew(lease).await, Err(Error::LockLost(_))));
            assert!(a.is_lost());
            drop(a);
        } else {
            assert!(matches!(a.release().await, Ok(Released::AlreadyGone(_))));
        }
        hold_events.send_replace(false);
        // B is still held by the client's connection, and only by it.
        let held = client.held(HeldScope::Connection).await.unwrap();
        assert_eq!(held.iter().map(|h| h.token).collect::<Vec<_>>(), [b.token], "{held:?}");
        assert!(other.lock("k", "stale").try_acquire().await.unwrap().is_none());
        let released = client
            .request(Request::Release {
                kind: "k".into(),
                id: "stale".into(),
                token: b.token,
            })
            .await
            .unwrap();
        assert_eq!(released.result, Ok(ResponseBody::Released { released: true }));
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_grant_delivered_to_a_dropped_acquire_is_given_back() {
    let (server, client) = support::start_and_connect().await;
    let other = support::connect(&server).await;
    {
        let acquire = client.lock("k", "delivered").try_acquire();
        let mut acquire = std::pin::pin!(acquire);
        assert!(acquire.as_mut().now_or_never().is_none(), "sent, not yet answered");
        // The server answers a grant of a free key before a PING read after
        // it, so once the pong is in, the grant sits in the acquire's channel.
        client.ping().await.unwrap();
        assert_eq!(client.held(HeldScope::Connection).await.unwrap().len(), 1);
    }
    assert!(
        support::granted_in_time(&other, "k", "delivered").await,
        "the dropped acquire's grant was given back"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn auto_renewal_survives_a_wait_longer_than_the_lease() {
    let (server, holder) = support::start_and_connect().await;
    let client = support::connect(&server).await;
    let other = support::connect(&server).await;
    let lease = Duration::from_millis(300);
    // The holder's own lease frees the key after twice the waiter's lease:
    // the waiter's grant comes long after it sent its ACQUIRE.
    let _held = holder
        .lock("k", "queued")
        .lease(lease * 2)
        .try_acquire()
        .await
        .unwrap()
        .expect("free");
    let guard = client
        .lock("k", "queued")
        .lease(lease)
        .auto_renew(true)
        .wait(PATIENCE)
        .acquire()
        .await
        .unwrap()
        .expect("granted when the holder's lease ran out");
    let got = other.lock("k", "queued").wait(lease * 3).acquire().await.unwrap();
    assert!(got.is_none(), "lock changed hands while auto-renewed");
    assert!(!guard.is_lost(), "{:?}", guard.lost_reason());
    guard.release().await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn huge_configured_durations_do_not_panic() {
    let (server, _) = support::start_default().await;
    let client = Client::builder(server.local_addr())
        .request_timeout(Some(Duration::MAX))
        .connect_timeout(Duration::MAX)
        .reconnect_backoff(Duration::MAX, Duration::MAX)
        .keepalive(Some(Duration::MAX))
        .connect()
        .await
        .unwrap();
    let guard = client
        .lock("k", "huge")
        .lease(Duration::from_millis(60))
        .auto_renew(true)
        .wait(Duration::from_secs(1))
        .acquire()
        .await
        .unwrap()
        .expect("free");
    guard.renew(Duration::from_secs(30)).await.unwrap();
    client.ping().await.unwrap();
    guard.release().await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn a_guard_knows_until_when_it_is_safe_and_keeps_it_fresh() {
    // A server horizon of 800 ms: the client confirms every 200 ms.
    let config = clastor::server::ServerConfig {
        shutdown_grace: Duration::from_millis(800),
        ..clastor::server::ServerConfig::default()
    };
    let (server, _) = support::start(config, clastor::EngineConfig::default()).await;
    let client = support::connect(&server).await;
    let guard = support::take_free(&client, "tx", "safe").await;
    let first = guard.safe_until().expect("a version 2 server states safe-until");
    let now = tokio::time::Instant::now();
    assert!(
        first > now && first <= now + Duration::from_millis(800),
        "{:?}",
        first - now
    );
    assert!(guard.is_safe());
    // Confirmations move it forward while the lock is held.
    let moved = tokio::time::timeout(PATIENCE, async {
        loop {
            match guard.confirmation().await {
                Some(t) if t > first => return t,
                Some(_) => {}
                None => panic!("lock state gone"),
            }
        }
    })
    .await
    .expect("a confirmation");
    assert!(moved > first);
    assert!(guard.jeopardy().now_or_never().is_none(), "in jeopardy while confirmed");

    // A renewal that shortens the lease shortens the promise at once.
    let leased = client
        .lock("tx", "leased")
        .lease(Duration::from_secs(60))
        .try_acquire()
        .await
        .unwrap()
        .expect("free");
    leased.renew(Duration::from_millis(300)).await.unwrap();
    let until = leased.safe_until().unwrap();
    assert!(until <= tokio::time::Instant::now() + Duration::from_millis(300));
    // Unrenewed, the lease runs out: jeopardy first, then the loss.
    tokio::time::timeout(PATIENCE, leased.jeopardy())
        .await
        .expect("jeopardy");
    assert_eq!(
        tokio::time::timeout(PATIENCE, leased.lost()).await.expect("lost"),
        LostReason::LeaseExpired
    );
    // The short lease on the same connection did not cut the other lock's
    // promise: it is still confirmed.
    let before = guard.safe_until().unwrap();
    let after = tokio::time::timeout(PATIENCE, guard.confirmation())
        .await
        .expect("confirmed")
        .unwrap();
    assert!(after > before && guard.is_safe());
    server.shutdown().await;
}

#[tokio::test]
async fn close_lets_go_of_every_lock_and_refuses_later_calls() {
    let (server, client) = support::start_and_connect().await;
    let clone = client.clone();
    let guard = support::take_free(&client, "tx", "closed").await;
    client.close();
    assert!(clone.is_closed(), "every clone is closed");
    assert_eq!(
        tokio::time::timeout(PATIENCE, guard.lost()).await.expect("told"),
        LostReason::ConnectionLost
    );
    assert_eq!(clone.ping().await, Err(Error::Closed));
    assert!(matches!(
        clone.lock("tx", "other").try_acquire().await,
        Err(Error::Closed)
    ));
    // The server let go of the lock with the connection.
    let other = support::connect(&server).await;
    assert!(support::granted_in_time(&other, "tx", "closed").await);
    assert_eq!(
        guard.release().await,
        Ok(Released::AlreadyGone(LostReason::ConnectionLost))
    );
    server.shutdown().await;
}

/// The overlap checker: `(id, token, from, until)` spans of grants; per id,
/// no two overlap and tokens strictly increase in grant order.
fn assert_one_holder_at_a_time(spans: &mut [(String, u64, tokio::time::Instant, tokio::time::Instant)]) {
    spans.sort_by_key(|s| (s.0.clone(), s.2));
    for pair in spans.windows(2).filter(|p| p[0].0 == p[1].0) {
        let (a, b) = (&pair[0], &pair[1]);
        assert!(a.3 <= b.2, "two holders of {} at once: {a:?} {b:?}", a.0);
        assert!(b.1 > a.1, "tokens of {} not increasing: {a:?} {b:?}", a.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_sharing_a_handle_queue_for_a_key_like_everyone_else() {
    let (server, _) = support::start_default().await;
    // Two "processes", each one handle shared by many tasks (one connection
    // each), contending on a few keys.
    let handles = [support::connect(&server).await, support::connect(&server).await];
    let spans = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (p, handle) in handles.iter().enumerate() {
        for t in 0..6 {
            let (handle, spans) = (handle.clone(), Arc::clone(&spans));
            tasks.push(tokio::spawn(async move {
                for round in 0..10 {
                    let key = format!("k{}", (p + t + round) % 3);
                    let guard = handle
                        .lock("shared", key.clone())
                        .wait(PATIENCE)
                        .acquire()
                        .await
                        .expect("no error: tasks of one handle wait for each other")
                        .expect("granted");
                    let from = tokio::time::Instant::now();
                    // Work under the lock, long enough for the others to
                    // pile up behind it.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    let until = tokio::time::Instant::now();
                    spans.lock().unwrap().push((key, guard.token(), from, until));
                    guard.release().await.unwrap();
                }
            }));
        }
    }
    for task in join_all(tasks).await {
        task.unwrap();
    }
    let mut spans = spans.lock().unwrap().clone();
    assert_eq!(spans.len(), 2 * 6 * 10);
    assert_one_holder_at_a_time(&mut spans);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_many_over_overlapping_keys_never_deadlocks_nor_overlaps() {
    let (server, _) = support::start_default().await;
    let handles = [support::connect(&server).await, support::connect(&server).await];
    let accounts = ["a", "b", "c", "d"];
    let spans = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (p, handle) in handles.iter().enumerate() {
        for t in 0..4 {
            let (handle, spans) = (handle.clone(), Arc::clone(&spans));
            tasks.push(tokio::spawn(async move {
                for round in 0..15 {
                    // A transfer between two accounts, named in either order:
                    // the global order is the client's business.
                    let from = accounts[(p + t + round) % 4];
                    let to = accounts[(p * 3 + t + 2 * round + 1) % 4];
                    let both = handle
                        .lock_many([("account", from), ("account", to)])
                        .wait(PATIENCE)
                        .acquire()
                        .await
                        .unwrap()
                        .expect("granted");
                    let start = tokio::time::Instant::now();
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    let end = tokio::time::Instant::now();
                    for g in both.guards() {
                        spans.lock().unwrap().push((g.id().to_owned(), g.token(), start, end));
                    }
                    assert_eq!(both.release().await, Ok(Released::Released));
                }
            }));
        }
    }
    tokio::time::timeout(Duration::from_secs(60), join_all(tasks))
        .await
        .expect("no deadlock")
        .into_iter()
        .for_each(|t| t.unwrap());
    let mut spans = spans.lock().unwrap().clone();
    assert_one_holder_at_a_time(&mut spans);
    server.shutdown().await;
}

#[tokio::test]
async fn lock_many_is_all_or_nothing() {
    let (server, client) = support::start_and_connect().await;
    let other = support::connect(&server).await;
    let y = support::take_free(&other, "k", "y").await;
    // y is taken: x is not kept either.
    assert!(
        client
            .lock_many([("k", "x"), ("k", "y")])
            .try_acquire()
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        client
            .lock_many([("k", "x"), ("k", "y")])
            .wait(Duration::from_millis(50))
            .acquire()
            .await
            .unwrap()
            .is_none()
    );
    let x = support::take_free(&other, "k", "x").await;
    drop((x, y));
    // Free: both, each with its own token, and lost when either is.
    let both = client
        .lock_many([("k", "y"), ("k", "x"), ("k", "x")])
        .lease(Duration::from_secs(60))
        .wait(PATIENCE)
        .acquire()
        .await
        .unwrap()
        .expect("both free");
    assert_eq!(both.guards().len(), 2, "duplicates count once");
    assert_eq!(both.guards()[0].id(), "x", "the global order");
    assert!(both.token("k", "x").is_some() && both.token("k", "y").is_some());
    assert!(both.lost().now_or_never().is_none());
    both.guards()[1].renew(Duration::from_millis(100)).await.unwrap();
    assert_eq!(
        tokio::time::timeout(PATIENCE, both.lost()).await.expect("lost"),
        LostReason::LeaseExpired
    );
    assert!(matches!(
        both.release().await,
        Ok(Released::AlreadyGone(LostReason::LeaseExpired))
    ));
    server.shutdown().await;
}

#[tokio::test]
async fn release_all_gives_back_every_lock_of_the_handle() {
    let (server, client) = support::start_and_connect().await;
    let a = support::take_free(&client, "k", "a").await;
    let b = support::take_free(&client.clone(), "k", "b").await;
    assert_eq!(client.release_all().await, Ok(2));
    for guard in [&a, &b] {
        assert_eq!(guard.lost().now_or_never(), Some(LostReason::ReleasedAll));
    }
    let other = support::connect(&server).await;
    assert!(
        other
            .lock_many([("k", "a"), ("k", "b")])
            .try_acquire()
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(a.release().await, Ok(Released::AlreadyGone(LostReason::ReleasedAll)));
    assert_eq!(client.release_all().await, Ok(0), "nothing left");
    server.shutdown().await;
}

/// Arrival order at one key, pinned down: tasks of one handle wait for each
/// other on the client and join the server's queue on their turn (so a
/// process that queued meanwhile goes first); tasks that take their own
/// owner ([`Client::new_owner`]) queue at the server at once, in strict
/// arrival order with everyone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_owners_keep_strict_arrival_order_with_other_processes() {
    let (server, backend) = support::start_default().await;
    let app = support::connect(&server).await;
    let other_process = support::connect(&server).await;
    let key = clastor::LockKey::new("fifo", "k").unwrap();
    let queued = |n: usize| {
        let (backend, key) = (backend.clone(), key.clone());
        async move {
            let deadline = tokio::time::Instant::now() + PATIENCE;
            while backend.contenders(&key) != n {
                assert!(tokio::time::Instant::now() < deadline, "never {n} contenders");
                tokio::task::yield_now().await;
            }
        }
    };
    let (order_tx, mut order) = tokio::sync::mpsc::unbounded_channel();
    let waiter = |client: Client, name: &'static str| {
        let tx = order_tx.clone();
        tokio::spawn(async move {
            let g = client
                .lock("fifo", "k")
                .wait(PATIENCE)
                .acquire()
                .await
                .unwrap()
                .unwrap();
            tx.send(name).unwrap();
            g.release().await.unwrap();
        })
    };

    // Own owners: o1, then the other process, then o2 — served in that order.
    let holder = app.lock("fifo", "k").acquire().await.unwrap().unwrap();
    let o1 = waiter(app.new_owner().await.unwrap(), "o1");
    queued(2).await;
    let r = waiter(other_process.clone(), "other");
    queued(3).await;
    let o2 = waiter(app.new_owner().await.unwrap(), "o2");
    queued(4).await;
    holder.release().await.unwrap();
    for t in [o1, r, o2] {
        t.await.unwrap();
    }
    let got: Vec<_> = std::iter::from_fn(|| order.try_recv().ok()).collect();
    assert_eq!(got, ["o1", "other", "o2"]);

    // One shared handle: its second task waits on the client, so the other
    // process, which queued at the server meanwhile, goes first.
    let holder = app.lock("fifo", "k").acquire().await.unwrap().unwrap();
    let sibling = waiter(app.clone(), "sibling");
    // The sibling is parked on the client: still one contender at the server.
    tokio::task::yield_now().await;
    assert_eq!(backend.contenders(&key), 1);
    let r = waiter(other_process, "other");
    queued(2).await;
    holder.release().await.unwrap();
    for t in [sibling, r] {
        t.await.unwrap();
    }
    let got: Vec<_> = std::iter::from_fn(|| order.try_recv().ok()).collect();
    assert_eq!(got, ["other", "sibling"]);
    server.shutdown().await;
}

/// Protocol version 4 through the client: readers on two connections hold
/// together, a writer waits for both, `HELD` names the modes, and the
/// kind's layout says it takes shared locks.
#[tokio::test]
async fn shared_locks_hold_together_and_a_writer_waits_for_them() {
    let (server, a) = support::start_and_connect().await;
    let b = support::connect(&server).await;
    let w = support::connect(&server).await;
    let ra = a
        .lock_shared("report", "r-1")
        .try_acquire()
        .await
        .unwrap()
        .expect("a free key");
    let rb = b
        .lock_shared("report", "r-1")
        .try_acquire()
        .await
        .unwrap()
        .expect("readers share");
    assert_ne!(ra.token(), rb.token());
    assert!(w.lock("report", "r-1").try_acquire().await.unwrap().is_none());
    let held = a.held(HeldScope::Server).await.unwrap();
    assert_eq!(held.len(), 2, "{held:?}");
    assert!(
        held.iter().all(|h| h.mode == Some(clastor_client::LockMode::Shared)),
        "{held:?}"
    );
    let v = a.version("report").await.unwrap();
    assert_eq!(v.layout, Some(clastor_client::KindLayout::ReadWrite));
    let writer = tokio::spawn(async move { w.lock("report", "r-1").wait(PATIENCE).acquire().await });
    let last = ra.token().max(rb.token());
    ra.release().await.unwrap();
    rb.release().await.unwrap();
    let wg = writer
        .await
        .unwrap()
        .unwrap()
        .expect("the writer, once both readers left");
    assert!(wg.token() > last);
    wg.release().await.unwrap();
    server.shutdown().await;
}
