//! The lock API against an in-process server: grants and tokens, contention,
//! pipelining on one connection, release on drop, cancelled acquires, leases,
//! renewal and lost-lock notification.
//!
//! Nothing here sleeps to synchronise: tests await the event they expect
//! (a grant, a loss) under a generous timeout.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashSet;
use std::time::Duration;

use clastor_client::{Client, Error, HeldScope, LostReason};
use futures_util::FutureExt;
use futures_util::future::join_all;
use support::PATIENCE;

#[tokio::test]
async fn grant_release_and_increasing_tokens() {
    let (server, _) = support::start_default().await;
    let client = Client::connect(server.local_addr()).await.unwrap();
    let mut last = 0;
    for _ in 0..5 {
        let guard = client
            .lock("transaction", "tx-1")
            .try_acquire()
            .await
            .unwrap()
            .expect("free");
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
    let (server, _) = support::start_default().await;
    let a = Client::connect(server.local_addr()).await.unwrap();
    let b = Client::connect(server.local_addr()).await.unwrap();
    let held = a.lock("k", "x").try_acquire().await.unwrap().expect("free");
    assert!(b.lock("k", "x").try_acquire().await.unwrap().is_none());
    assert!(
        b.lock("k", "x")
            .wait(Duration::from_millis(20))
            .acquire()
            .await
            .unwrap()
            .is_none()
    );
    // Same connection: the server refuses a second grant of a held key.
    assert!(matches!(
        a.lock("k", "x").try_acquire().await,
        Err(Error::AlreadyHeld(_))
    ));
    let waiter = tokio::spawn(async move { b.lock("k", "x").wait(PATIENCE).acquire().await });
    let first = held.token();
    held.release().await.unwrap();
    let got = waiter.await.unwrap().unwrap().expect("granted after release");
    assert!(got.token() > first);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_acquires_pipelined_on_one_connection() {
    let (server, _) = support::start_default().await;
    let client = Client::connect(server.local_addr()).await.unwrap();
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
    let (server, _) = support::start_default().await;
    let holder = Client::connect(server.local_addr()).await.unwrap();
    let client = Client::connect(server.local_addr()).await.unwrap();
    let held = holder.lock("k", "busy").try_acquire().await.unwrap().expect("free");
    let blocked = {
        let client = client.clone();
        tokio::spawn(async move { client.lock("k", "busy").wait(PATIENCE).acquire().await })
    };
    // Replies come back out of order: these complete while the acquire waits.
    for _ in 0..10 {
        client.ping().await.unwrap();
    }
    let other = client.lock("k", "free").try_acquire().await.unwrap().expect("free");
    assert!(!blocked.is_finished());
    held.release().await.unwrap();
    let got = blocked.await.unwrap().unwrap().expect("granted");
    assert_eq!(got.connection_id(), other.connection_id());
    server.shutdown().await;
}

#[tokio::test]
async fn dropping_a_guard_releases_the_lock() {
    let (server, _) = support::start_default().await;
    let a = Client::connect(server.local_addr()).await.unwrap();
    let b = Client::connect(server.local_addr()).await.unwrap();
    let guard = a.lock("k", "dropped").try_acquire().await.unwrap().expect("free");
    let waiter = tokio::spawn(async move { b.lock("k", "dropped").wait(PATIENCE).acquire().await });
    drop(guard);
    assert!(
        waiter.await.unwrap().unwrap().is_some(),
        "granted once the drop's release landed"
    );
    // The same connection can take the key again at once after a drop: the
    // client orders the acquire after the background release.
    let c = Client::connect(server.local_addr()).await.unwrap();
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
    let (server, _) = support::start_default().await;
    let holder = Client::connect(server.local_addr()).await.unwrap();
    let quitter = Client::connect(server.local_addr()).await.unwrap();
    let third = Client::connect(server.local_addr()).await.unwrap();
    let held = holder
        .lock("k", "cancelled")
        .try_acquire()
        .await
        .unwrap()
        .expect("free");
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
    let got = third.lock("k", "cancelled").wait(PATIENCE).acquire().await.unwrap();
    assert!(got.is_some());
    server.shutdown().await;
}

#[tokio::test]
async fn an_expired_lease_is_reported_lost() {
    let (server, _) = support::start_default().await;
    let client = Client::connect(server.local_addr()).await.unwrap();
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
    assert_eq!(guard.release().await, Err(Error::LockLost(LostReason::LeaseExpired)));
    // And the key is free again.
    assert!(client.lock("k", "leased").try_acquire().await.unwrap().is_some());
    server.shutdown().await;
}

#[tokio::test]
async fn explicit_renewal_extends_the_lease() {
    let (server, _) = support::start_default().await;
    let client = Client::connect(server.local_addr()).await.unwrap();
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
    let (server, _) = support::start_default().await;
    let client = Client::connect(server.local_addr()).await.unwrap();
    let other = Client::connect(server.local_addr()).await.unwrap();
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
    assert!(
        other
            .lock("k", "auto")
            .wait(PATIENCE)
            .acquire()
            .await
            .unwrap()
            .is_some()
    );
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
