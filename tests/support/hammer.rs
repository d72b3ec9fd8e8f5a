//! The overlap checker of the fault tests, shared by every backend's: clients
//! hammering one key through two `clastor serve` processes, each recording
//! its *belief* — from the grant's arrival until it stopped trusting the
//! lock (it began to release, or fell into jeopardy first) — and a check
//! that no two beliefs overlap and tokens increase in grant order. Also the
//! holder-and-waiter pair of the freeze tests.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// One holder's belief.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Belief {
    pub(crate) token: u64,
    pub(crate) from: Instant,
    pub(crate) until: Instant,
    pub(crate) server: char,
    /// `from` and `until` on the wall clock (ns since the epoch), the one
    /// clock shared with clients in other processes.
    pub(crate) from_ns: u128,
    pub(crate) until_ns: u128,
}

/// What an acquire that fails means to a hammering client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnError {
    /// Expected while a fault is injected (no leader, a server between
    /// sessions): try again shortly.
    Retry,
    /// No fault is injected: the test fails.
    Fail,
}

/// Contends for `tx/hammered` through `addr` until `stop`, holding each grant
/// for `work` (or until jeopardy), recording every belief.
pub(crate) async fn contend(
    addr: SocketAddr,
    server: char,
    stop: CancellationToken,
    work: Duration,
    on_error: OnError,
) -> Vec<Belief> {
    contend_counted(addr, server, stop, work, on_error, Arc::default()).await
}

/// [`contend`], adding each grant to `grants` as it comes.
pub(crate) async fn contend_counted(
    addr: SocketAddr,
    server: char,
    stop: CancellationToken,
    work: Duration,
    on_error: OnError,
    grants: Arc<AtomicUsize>,
) -> Vec<Belief> {
    let client = clastor_client::Client::builder(addr)
        .keepalive(None)
        .connect_timeout(Duration::from_secs(1))
        .request_timeout(Some(Duration::from_secs(5)))
        .connect()
        .await
        .unwrap();
    let mut beliefs = Vec::new();
    while !stop.is_cancelled() {
        let guard = match client
            .lock("tx", "hammered")
            .wait(Duration::from_secs(2))
            .acquire()
            .await
        {
            Ok(Some(guard)) => guard,
            Ok(None) => continue,
            Err(e) if on_error == OnError::Fail => panic!("{e}"),
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let from = Instant::now();
        let from_ns = super::process::wall_ns();
        let until = tokio::select! {
            () = tokio::time::sleep(work) => Instant::now(),
            () = guard.jeopardy() => Instant::now(),
        };
        beliefs.push(Belief {
            token: guard.token(),
            from,
            until,
            server,
            from_ns,
            until_ns: super::process::wall_ns(),
        });
        grants.fetch_add(1, Ordering::Relaxed);
        let _ = tokio::time::timeout(Duration::from_secs(2), guard.release()).await;
    }
    beliefs
}

/// Two clients through `x` and two through `y`, until `stop`.
pub(crate) fn hammer(
    x: SocketAddr,
    y: SocketAddr,
    stop: &CancellationToken,
    work: Duration,
    on_error: OnError,
) -> Vec<tokio::task::JoinHandle<Vec<Belief>>> {
    [(x, 'x'), (x, 'x'), (y, 'y'), (y, 'y')]
        .into_iter()
        .map(|(addr, name)| tokio::spawn(contend(addr, name, stop.clone(), work, on_error)))
        .collect()
}

/// Collects the workers' beliefs and asserts: both servers granted, at least
/// `min_grants` grants, no two beliefs overlap, tokens increase in grant
/// order. Returns the number of grants.
pub(crate) async fn assert_no_overlap(workers: Vec<tokio::task::JoinHandle<Vec<Belief>>>, min_grants: usize) -> usize {
    no_overlap(workers, min_grants).await.len()
}

/// [`assert_no_overlap`], returning the beliefs in grant order.
pub(crate) async fn no_overlap(workers: Vec<tokio::task::JoinHandle<Vec<Belief>>>, min_grants: usize) -> Vec<Belief> {
    let mut beliefs = Vec::new();
    for w in workers {
        beliefs.extend(w.await.unwrap());
    }
    beliefs.sort_by_key(|b| b.from);
    let servers: HashSet<char> = beliefs.iter().map(|b| b.server).collect();
    assert!(
        servers.len() == 2 && beliefs.len() > min_grants,
        "too little contention: {} grants",
        beliefs.len()
    );
    for pair in beliefs.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        assert!(a.until <= b.from, "two holders at once: {a:?} and {b:?}");
        assert!(b.token > a.token, "tokens not increasing: {a:?} then {b:?}");
    }
    beliefs
}

/// A holder of `tx/{id}` through `holder_at`, and a waiter for it through
/// `waiter_at` that tries again after failures that may pass. The waiter's
/// task answers when it was granted, and the guard. Keep the holder's
/// client alive.
pub(crate) async fn hold_and_wait(
    holder_at: SocketAddr,
    waiter_at: SocketAddr,
    id: &'static str,
) -> (
    clastor_client::Client,
    clastor_client::LockGuard,
    tokio::task::JoinHandle<(Instant, clastor_client::LockGuard)>,
) {
    let holder = clastor_client::Client::connect(holder_at).await.unwrap();
    let guard = holder.lock("tx", id).try_acquire().await.unwrap().expect("free");
    let other = clastor_client::Client::connect(waiter_at).await.unwrap();
    let wait = tokio::spawn(async move {
        loop {
            match other.lock("tx", id).wait(Duration::from_secs(60)).acquire().await {
                Ok(Some(g)) => return (Instant::now(), g),
                Ok(None) => panic!("not granted within a minute"),
                Err(e) if e.is_retryable() => tokio::time::sleep(Duration::from_millis(100)).await,
                Err(e) => panic!("{e}"),
            }
        }
    });
    (holder, guard, wait)
}
