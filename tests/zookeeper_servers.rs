//! Two Clastor servers sharing one ZooKeeper, driven through the client
//! crate: a lock taken through one server excludes clients of the other,
//! hand-offs cross servers with increasing tokens, a closed connection frees
//! its locks for the other server, and concurrent holders never overlap.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use clastor::server::ServerHandle;
use clastor_client::Client;
use clastor_testkit::ZooKeeper;

const PATIENCE: Duration = Duration::from_secs(15);

async fn start_server(zk: &ZooKeeper) -> ServerHandle {
    support::start_on_zookeeper(zk, "two-servers", 2).await
}

async fn two_servers() -> (ZooKeeper, ServerHandle, ServerHandle) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let zk = ZooKeeper::start().expect("start ZooKeeper (apt-get install -y zookeeper)");
    let s1 = start_server(&zk).await;
    let s2 = start_server(&zk).await;
    (zk, s1, s2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_held_through_one_server_excludes_the_other() {
    let (_zk, s1, s2) = two_servers().await;
    let a = Client::connect(s1.local_addr()).await.unwrap();
    let b = Client::connect(s2.local_addr()).await.unwrap();

    let held = a
        .lock("transaction", "tx-1")
        .try_acquire()
        .await
        .unwrap()
        .expect("free lock");
    assert!(
        b.lock("transaction", "tx-1").try_acquire().await.unwrap().is_none(),
        "other server must refuse"
    );
    assert!(
        b.lock("transaction", "tx-1")
            .wait(Duration::from_millis(200))
            .acquire()
            .await
            .unwrap()
            .is_none(),
        "other server must time out"
    );
    let waiter = {
        let b = b.clone();
        tokio::spawn(async move { b.lock("transaction", "tx-1").wait(PATIENCE).acquire().await })
    };
    let first = held.token();
    held.release().await.unwrap();
    let second = tokio::time::timeout(PATIENCE, waiter)
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .expect("handed over");
    assert!(second.token() > first, "token {} after {first}", second.token());
    assert!(
        a.lock("transaction", "tx-1").try_acquire().await.unwrap().is_none(),
        "and back: s1 refuses now"
    );
    second.release().await.unwrap();
    s1.shutdown().await;
    s2.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_connection_frees_its_locks_for_the_other_server() {
    let (_zk, s1, s2) = two_servers().await;
    let a = Client::connect(s1.local_addr()).await.unwrap();
    let b = Client::connect(s2.local_addr()).await.unwrap();
    let held = a.lock("user", "u-7").try_acquire().await.unwrap().expect("free lock");
    let token = held.token();
    let waiter = tokio::spawn(async move { b.lock("user", "u-7").wait(PATIENCE).acquire().await });
    drop(held);
    drop(a);
    let granted = tokio::time::timeout(PATIENCE, waiter)
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .expect("granted");
    assert!(granted.token() > token);
    s1.shutdown().await;
    s2.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_holders_across_servers_never_overlap() {
    let (_zk, s1, s2) = two_servers().await;
    let inside = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..6 {
        let addr = if i % 2 == 0 { s1.local_addr() } else { s2.local_addr() };
        let inside = Arc::clone(&inside);
        tasks.push(tokio::spawn(async move {
            let c = Client::connect(addr).await.unwrap();
            let mut tokens = Vec::new();
            for _ in 0..5 {
                let g = c
                    .lock("account", "acc-1")
                    .wait(PATIENCE)
                    .acquire()
                    .await
                    .unwrap()
                    .expect("granted");
                assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two holders at once");
                tokio::task::yield_now().await;
                inside.fetch_sub(1, Ordering::SeqCst);
                tokens.push(g.token());
                g.release().await.unwrap();
            }
            tokens
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        let tokens = t.await.unwrap();
        assert!(
            tokens.windows(2).all(|w| w[0] < w[1]),
            "one client's tokens increase: {tokens:?}"
        );
        all.extend(tokens);
    }
    let n = all.len();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), n, "every grant has its own token");
    s1.shutdown().await;
    s2.shutdown().await;
}

/// `clastor load --zk` as `scripts/perf.sh` runs it (short): Clastor, the
/// raw create+delete floor, the bare relay and Clastor in library mode all
/// run.
#[test]
fn the_load_harness_runs_every_zookeeper_series() {
    let zk = ZooKeeper::start().expect("start ZooKeeper (apt-get install -y zookeeper)");
    support::process::load_harness_runs(
        "--zk",
        &zk.connect_string(),
        &["clastor", "floor", "relay", "library mode"],
    );
}
