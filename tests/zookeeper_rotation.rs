//! Version rotation under load, on a real ZooKeeper: clients acquire and
//! release random ids of one kind through two Clastor servers while the kind
//! is rotated `v1 → v2 → v3` through different servers.
//!
//! What must hold: no two holders of one id at once, across versions (the
//! overlap checker is keyed by id only); tokens per id strictly increase; no
//! acquire with enough wait time fails; every grant is under the current
//! version or the one being drained; and a completed rotation leaves no
//! subtree under the old version.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clastor::server::ServerHandle;
use clastor_client::{Client, RotationPhase};
use clastor_testkit::ZooKeeper;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const PROVIDER: &str = "rotation";
const KIND: &str = "ledger";
const IDS: u64 = 6;
const PATIENCE: Duration = Duration::from_secs(30);

async fn start_server(zk: &ZooKeeper) -> ServerHandle {
    start_server_with(zk, 2).await
}

async fn start_server_with(zk: &ZooKeeper, sessions: usize) -> ServerHandle {
    support::start_on_zookeeper(zk, PROVIDER, sessions).await
}

/// One grant as its holder saw it.
#[derive(Debug, Clone)]
struct Held {
    id: u64,
    token: u64,
    version: String,
    /// When the holder received the grant.
    at: Instant,
}

/// The overlap checker: who believes they hold each id, and every grant in
/// the order the holders of each id took it.
#[derive(Default)]
struct Ledger {
    holding: HashMap<u64, usize>,
    grants: Vec<Held>,
}

/// Acquires and releases random ids until `stop`, through `addr`.
async fn contend(addr: SocketAddr, me: usize, ledger: Arc<Mutex<Ledger>>, stop: CancellationToken) -> usize {
    let client = Client::connect(addr).await.unwrap();
    let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ (me as u64 + 1);
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut grants = 0;
    while !stop.is_cancelled() {
        let id = next() % IDS;
        let guard = client
            .lock(KIND, format!("acc-{id}"))
            .wait(PATIENCE)
            .acquire()
            .await
            .unwrap_or_else(|e| panic!("client {me}: acquire of acc-{id} failed: {e}"))
            .unwrap_or_else(|| panic!("client {me}: acc-{id} not granted within {PATIENCE:?}"));
        {
            let mut l = ledger.lock().unwrap();
            if let Some(other) = l.holding.insert(id, me) {
                panic!("acc-{id}: client {me} granted while client {other} holds it");
            }
            l.grants.push(Held {
                id,
                token: guard.token(),
                version: guard.version().to_owned(),
                at: Instant::now(),
            });
        }
        // Hold it for a moment (0–7 ms).
        tokio::time::sleep(Duration::from_millis(next() % 8)).await;
        ledger.lock().unwrap().holding.remove(&id);
        guard.release().await.unwrap();
        grants += 1;
    }
    grants
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_under_load_through_two_servers_never_double_grants() {
    let zk = ZooKeeper::start().expect("start ZooKeeper (apt-get install -y zookeeper)");
    let (s1, s2, s3) = (
        start_server(&zk).await,
        start_server(&zk).await,
        start_server(&zk).await,
    );
    // A third server that sees v1 once and then sits out both rotations: its
    // cache still says "v1, normal" when it is used again.
    let stale = Client::connect(s3.local_addr()).await.unwrap();
    for id in 0..IDS {
        let g = stale
            .lock(KIND, format!("acc-{id}"))
            .wait(PATIENCE)
            .acquire()
            .await
            .unwrap()
            .unwrap();
        assert_eq!(g.version(), "v1");
        g.release().await.unwrap();
    }
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = CancellationToken::new();
    let workers: Vec<_> = (0..8)
        .map(|i| {
            let addr = if i % 2 == 0 { s1.local_addr() } else { s2.local_addr() };
            tokio::spawn(contend(addr, i, ledger.clone(), stop.clone()))
        })
        .collect();
    let admin1 = Client::connect(s1.local_addr()).await.unwrap();
    let admin2 = Client::connect(s2.local_addr()).await.unwrap();
    // Let the load get going under v1.
    wait_for_grants(&ledger, 50).await;

    let mut progress = Vec::new();
    let r1 = admin1
        .rotate(KIND, "v1", "v2", Duration::from_secs(20), |p| progress.push(p.clone()))
        .await
        .expect("v1 -> v2 completed");
    let switched_to_v2 = Instant::now();
    assert_eq!(r1.version, "v2");
    assert!(
        progress.first().is_some_and(|p| p.phase == RotationPhase::Draining),
        "{progress:?}"
    );
    assert!(progress.last().is_some_and(|p| p.phase == RotationPhase::Switched));
    wait_for_grants(&ledger, 100).await;

    let r2 = admin2
        .rotate(KIND, "v2", "v3", Duration::from_secs(20), |_| {})
        .await
        .expect("v2 -> v3 completed");
    let switched_to_v3 = Instant::now();
    assert_eq!(r2.version, "v3");
    // The stale server joins in: it must follow the kind to v3, never grant
    // under the version it remembers.
    let late: Vec<_> = (8..10)
        .map(|i| tokio::spawn(contend(s3.local_addr(), i, ledger.clone(), stop.clone())))
        .collect();
    wait_for_grants(&ledger, 250).await;

    stop.cancel();
    let mut total = 0;
    for w in workers.into_iter().chain(late) {
        total += w.await.expect("a client failed");
    }
    let grants = std::mem::take(&mut ledger.lock().unwrap().grants);
    assert_eq!(total, grants.len());
    // Tokens per id strictly increase, in the order the holders took them.
    let mut last: HashMap<u64, u64> = HashMap::new();
    for g in &grants {
        if let Some(prev) = last.insert(g.id, g.token) {
            assert!(g.token > prev, "acc-{}: token {} after {prev}", g.id, g.token);
        }
        // Every grant is under the current version or the one being drained.
        let allowed: &[&str] = if g.at > switched_to_v3 {
            &["v3"]
        } else if g.at > switched_to_v2 {
            &["v2", "v3"]
        } else {
            &["v1", "v2"]
        };
        assert!(
            allowed.contains(&g.version.as_str()),
            "acc-{} granted under {} at a time only {allowed:?} were possible",
            g.id,
            g.version
        );
    }
    let versions: Vec<&str> = ["v1", "v2", "v3"]
        .into_iter()
        .filter(|v| grants.iter().any(|g| g.version == *v))
        .collect();
    assert_eq!(versions, ["v1", "v2", "v3"], "grants under every version");
    s1.shutdown().await;
    s2.shutdown().await;
    s3.shutdown().await;
}

/// Waits until at least `n` grants were made in all.
async fn wait_for_grants(ledger: &Mutex<Ledger>, n: usize) {
    let deadline = Instant::now() + PATIENCE;
    while ledger.lock().unwrap().grants.len() < n {
        assert!(Instant::now() < deadline, "fewer than {n} grants within {PATIENCE:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_rotation_leaves_no_old_subtree_and_an_aborted_one_leaves_everything() {
    let zk = ZooKeeper::start().expect("start ZooKeeper (apt-get install -y zookeeper)");
    let s1 = start_server(&zk).await;
    let c = Client::connect(s1.local_addr()).await.unwrap();
    for id in ["a", "b", "c"] {
        c.lock("tidy", id)
            .acquire()
            .await
            .unwrap()
            .unwrap()
            .release()
            .await
            .unwrap();
    }
    let held = c.lock("tidy", "d").acquire().await.unwrap().unwrap();
    let raw = zookeeper_client::Client::connect(&zk.connect_string()).await.unwrap();
    let base = format!("/locks/{PROVIDER}/tidy");
    assert!(raw.check_stat(&format!("{base}/v1/d")).await.unwrap().is_some());

    // A drain that cannot finish: aborted, nothing touched.
    let err = c
        .rotate("tidy", "v1", "v2", Duration::from_millis(300), |_| {})
        .await
        .unwrap_err();
    assert!(matches!(err, clastor_client::Error::RotationAborted(_)), "{err}");
    let (data, _) = raw.get_data(&format!("{base}/version")).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&data), "v1\nnormal");
    assert!(raw.check_stat(&format!("{base}/v1/d")).await.unwrap().is_some());
    assert!(
        raw.check_stat(&format!("{base}/rotation")).await.unwrap().is_none(),
        "claim left behind"
    );

    held.release().await.unwrap();
    let done = c
        .rotate("tidy", "v1", "v2", Duration::from_secs(10), |_| {})
        .await
        .unwrap();
    assert_eq!((done.version.as_str(), done.leftover), ("v2", 0));
    assert_eq!(
        raw.check_stat(&format!("{base}/v1")).await.unwrap(),
        None,
        "old subtree left"
    );
    let (data, _) = raw.get_data(&format!("{base}/version")).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&data), "v2\nnormal\nprev=v1");
    let g = c.lock("tidy", "a").acquire().await.unwrap().unwrap();
    assert_eq!(g.version(), "v2");
    assert!(raw.check_stat(&format!("{base}/v1")).await.unwrap().is_none());
    s1.shutdown().await;
}

/// Two rotations of one kind through one server whose pool has a single
/// ZooKeeper session: the claim still admits only one, and neither deletes
/// the other's claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_rotations_on_one_session_one_wins_the_other_is_refused() {
    let zk = ZooKeeper::start().expect("start ZooKeeper (apt-get install -y zookeeper)");
    let s1 = start_server_with(&zk, 1).await;
    let c = Client::connect(s1.local_addr()).await.unwrap();
    let held = c.lock("duo", "x").acquire().await.unwrap().unwrap();
    let first = {
        let c = c.clone();
        tokio::spawn(async move { c.rotate("duo", "v1", "v2", Duration::from_secs(30), |_| {}).await })
    };
    let deadline = Instant::now() + PATIENCE;
    while c.version("duo").await.unwrap().mode != clastor_client::KindMode::Draining {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for to in ["v2", "v3"] {
        let second = c.rotate("duo", "v1", to, Duration::from_secs(30), |_| {}).await;
        assert!(
            matches!(&second, Err(clastor_client::Error::RotationRefused(m)) if m.contains("in progress")),
            "{second:?}"
        );
    }
    // The refused ones left the running rotation's claim alone.
    let raw = zookeeper_client::Client::connect(&zk.connect_string()).await.unwrap();
    let claim = format!("/locks/{PROVIDER}/duo/rotation");
    assert!(
        raw.check_stat(&claim).await.unwrap().is_some(),
        "the running rotation lost its claim"
    );
    held.release().await.unwrap();
    let done = first.await.unwrap().expect("the first rotation completed");
    assert_eq!(done.version, "v2");
    // Released before the answer: the next rotation is not refused.
    assert!(raw.check_stat(&claim).await.unwrap().is_none(), "claim left behind");
    c.rotate("duo", "v2", "v3", Duration::from_secs(10), |_| {})
        .await
        .unwrap();
    s1.shutdown().await;
}
