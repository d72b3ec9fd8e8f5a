//! The ZooKeeper backend against a real ZooKeeper (Debian's package, started
//! by `clastor-testkit`): grants, FIFO handoff, czxid tokens, Curator and
//! kazoo interop, cleanup after timeouts/cancellation/drops, and faults
//! (frozen server, killed leader). Conditions are awaited with deadlines,
//! never assumed after a fixed sleep.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clastor::LockKey;
use clastor::backend::zookeeper::{ZkConfig, ZkGuard, ZooKeeperBackend};
use clastor::backend::{AcquireRequest, Backend, BackendError, Grant, LostNotifier};
use clastor_protocol::{KindMode, LockMode, LostReason};
use clastor_testkit::{Mode, ZooKeeper};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use zookeeper_client::{Acls, Client, CreateMode};

const PATIENCE: Duration = Duration::from_secs(15);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

fn start_zk() -> ZooKeeper {
    init_tracing();
    ZooKeeper::start().expect("start ZooKeeper (apt-get install -y zookeeper)")
}

fn config(zk: &ZooKeeper, provider: &str) -> ZkConfig {
    ZkConfig {
        hosts: zk.connect_string(),
        provider: provider.to_owned(),
        sessions: 2,
        session_timeout: Duration::from_secs(4),
        ..ZkConfig::default()
    }
}

/// [`config`] with a single session of the given timeout.
fn one_session(zk: &ZooKeeper, provider: &str, session_timeout: Duration) -> ZkConfig {
    ZkConfig {
        sessions: 1,
        session_timeout,
        ..config(zk, provider)
    }
}

async fn backend(zk: &ZooKeeper, provider: &str) -> ZooKeeperBackend {
    backend_with(config(zk, provider)).await
}

async fn backend_with(cfg: ZkConfig) -> ZooKeeperBackend {
    ZooKeeperBackend::connect(cfg).await.expect("connect backend")
}

async fn raw(zk: &ZooKeeper) -> Client {
    Client::connector()
        .with_session_timeout(Duration::from_secs(10))
        .connect(&zk.connect_string())
        .await
        .expect("raw ZooKeeper client")
}

/// A fresh ZooKeeper, a backend on it (shared, so waits can be spawned) and
/// a raw client to look at its znodes.
async fn setup(provider: &str) -> (ZooKeeper, Arc<ZooKeeperBackend>, Client) {
    let zk = start_zk();
    let b = Arc::new(backend(&zk, provider).await);
    let inspect = raw(&zk).await;
    (zk, b, inspect)
}

fn key(kind: &str, id: &str) -> LockKey {
    LockKey::new(kind, id).unwrap()
}

fn req(key: &LockKey, wait: Duration) -> AcquireRequest<'_> {
    AcquireRequest {
        key,
        wait,
        mode: LockMode::Exclusive,
        owner: 1,
        on_lost: LostNotifier::noop(),
    }
}

/// A request whose lost notification arrives on the returned channel, with
/// the instant it fired.
fn req_watched(key: &LockKey, wait: Duration) -> (AcquireRequest<'_>, mpsc::UnboundedReceiver<(Instant, LostReason)>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let on_lost = LostNotifier::new(move |reason| {
        let _ = tx.send((Instant::now(), reason));
    });
    (
        AcquireRequest {
            key,
            wait,
            mode: LockMode::Exclusive,
            owner: 1,
            on_lost,
        },
        rx,
    )
}

/// An exclusive acquire of `key` waiting up to `wait`; `None` if not granted.
async fn acquire(b: &ZooKeeperBackend, key: &LockKey, wait: Duration) -> Option<Grant<ZkGuard>> {
    b.acquire(req(key, wait)).await.unwrap()
}

async fn must_acquire(b: &ZooKeeperBackend, key: &LockKey) -> Grant<ZkGuard> {
    acquire(b, key, PATIENCE)
        .await
        .unwrap_or_else(|| panic!("{key} not granted within {PATIENCE:?}"))
}

/// An exclusive acquire of `key` waiting up to `wait`, in its own task.
fn spawn_acquire(
    b: &Arc<ZooKeeperBackend>,
    key: &LockKey,
    wait: Duration,
) -> JoinHandle<Result<Option<Grant<ZkGuard>>, BackendError>> {
    let (b, key) = (Arc::clone(b), key.clone());
    tokio::spawn(async move { b.acquire(req(&key, wait)).await })
}

/// The backend's `INFO` pairs as a map.
fn info_map(b: &ZooKeeperBackend) -> HashMap<String, String> {
    b.info().into_iter().collect()
}

/// The czxid of the node at `path`, as a token.
async fn czxid(zk: &Client, path: &str) -> u64 {
    let stat = zk.check_stat(path).await.unwrap().unwrap();
    u64::try_from(stat.czxid).unwrap()
}

/// Lock-node children of a directory (Curator or kazoo names).
async fn contenders(zk: &Client, dir: &str) -> Vec<String> {
    match zk.list_children(dir).await {
        Ok(children) => children
            .into_iter()
            .filter(|c| c.contains("lock-") || c.contains("__lock__") || c.contains("__rlock__"))
            .collect(),
        Err(zookeeper_client::Error::NoNode) => Vec::new(),
        Err(e) => panic!("list {dir}: {e}"),
    }
}

/// Curator's reading of a lock directory: `StandardLockInternalsDriver.fixForSorting`
/// (the text after the last `lock-`) compared as strings.
fn curator_sorted(mut children: Vec<String>) -> Vec<String> {
    fn fix(name: &str) -> &str {
        match name.rfind("lock-") {
            Some(i) => &name[i + "lock-".len()..],
            None => name,
        }
    }
    children.sort_by(|a, b| fix(a).cmp(fix(b)));
    children
}

/// Polls `cond` until it holds or `PATIENCE` runs out.
async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + PATIENCE;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn await_contenders(zk: &Client, dir: &str, n: usize) {
    eventually(&format!("{dir} has {n} contenders"), || async {
        contenders(zk, dir).await.len() == n
    })
    .await;
}

/// Creates a node the way Curator's InterProcessMutex does (protected mode,
/// ephemeral-sequential, parents as containers).
async fn create_curator_node(zk: &Client, dir: &str) -> String {
    let _ = zk
        .mkdir(dir, &CreateMode::Container.with_acls(Acls::anyone_all()))
        .await;
    let prefix = format!("{dir}/_c_{}-lock-", uuid::Uuid::new_v4());
    create_sequential(zk, &prefix, b"10.0.0.1").await
}

/// Creates a node the way kazoo's Lock (`marker` `__lock__`) or ReadLock
/// (`__rlock__`) does: `<32 hex><marker><seq>`, parents as containers.
async fn create_kazoo_node(zk: &Client, dir: &str, marker: &str) -> String {
    zk.mkdir(dir, &CreateMode::Container.with_acls(Acls::anyone_all()))
        .await
        .unwrap();
    let prefix = format!("{dir}/{}{marker}", uuid::Uuid::new_v4().simple());
    create_sequential(zk, &prefix, b"").await
}

/// Creates an ephemeral-sequential node; returns its path.
async fn create_sequential(zk: &Client, prefix: &str, data: &[u8]) -> String {
    let (_, seq) = zk
        .create(
            prefix,
            data,
            &CreateMode::EphemeralSequential.with_acls(Acls::anyone_all()),
        )
        .await
        .unwrap();
    format!("{prefix}{seq}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncontended_grant_is_one_curator_node_with_czxid_token() {
    let (_zk, b, inspect) = setup("grant").await;
    let k = key("tx", "a-1");
    let g = must_acquire(&b, &k).await;
    assert_eq!(&*g.version, "v1");
    let dir = b.lock_path(&k).await.unwrap();
    assert_eq!(dir, "/locks/grant/tx/v1/a-1");
    let path = g.guard.path().to_owned();
    let name = path.strip_prefix(&format!("{dir}/")).expect("node under the lock dir");
    // _c_<36-char uuid>-lock-<10 digits>
    assert!(name.starts_with("_c_") && name.len() == 3 + 36 + 6 + 10, "{name}");
    assert!(uuid::Uuid::parse_str(&name[3..39]).is_ok(), "{name}");
    assert_eq!(&name[39..45], "-lock-");
    let stat = inspect.check_stat(&path).await.unwrap().expect("lock node exists");
    assert_eq!(g.token, u64::try_from(stat.czxid).unwrap(), "token is the node's czxid");
    assert_eq!(
        stat.ephemeral_owner,
        g.guard.session_id(),
        "node is ephemeral, owned by the pool session"
    );
    let (data, _) = inspect.get_data(&b.version_path("tx")).await.unwrap();
    assert_eq!(data, b"v1\nnormal");
    assert!(b.is_held(&k).await.unwrap());

    b.release(g.guard).await.unwrap();
    assert!(
        inspect.check_stat(&path).await.unwrap().is_none(),
        "release deleted the node"
    );
    assert!(!b.is_held(&k).await.unwrap());
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_granted_in_fifo_order_with_increasing_tokens() {
    let (_zk, b, inspect) = setup("fifo").await;
    let k = key("tx", "fifo");
    let holder = must_acquire(&b, &k).await;
    let dir = b.lock_path(&k).await.unwrap();
    let (tx, mut order) = mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for i in 0..4 {
        let (b, k, tx) = (Arc::clone(&b), k.clone(), tx.clone());
        tasks.push(tokio::spawn(async move {
            let g = must_acquire(&b, &k).await;
            tx.send((i, g.token)).unwrap();
            b.release(g.guard).await.unwrap();
        }));
        await_contenders(&inspect, &dir, i + 2).await;
    }
    let first = holder.token;
    b.release(holder.guard).await.unwrap();
    let mut last = first;
    for expected in 0..4 {
        let (i, token) = tokio::time::timeout(PATIENCE, order.recv()).await.unwrap().unwrap();
        assert_eq!(i, expected, "FIFO order");
        assert!(token > last, "token {token} after {last}");
        last = token;
    }
    for t in tasks {
        t.await.unwrap();
    }
    await_contenders(&inspect, &dir, 0).await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_increases_after_the_parent_container_is_reaped_and_recreated() {
    let (_zk, b, inspect) = setup("reap").await;
    let k = key("tx", "reaped");
    let g1 = must_acquire(&b, &k).await;
    let dir = b.lock_path(&k).await.unwrap();
    // Make the per-parent sequence advance so a restart at 0 is visible.
    b.release(g1.guard).await.unwrap();
    let g2 = must_acquire(&b, &k).await;
    assert!(g2.token > g1.token);
    assert!(g2.guard.path().ends_with("0000000001"), "{}", g2.guard.path());
    b.release(g2.guard).await.unwrap();
    eventually("the empty lock container is reaped", || async {
        inspect.check_stat(&dir).await.unwrap().is_none()
    })
    .await;

    let g3 = must_acquire(&b, &k).await;
    assert!(
        g3.guard.path().ends_with("0000000000"),
        "sequence restarted: {}",
        g3.guard.path()
    );
    assert!(
        g3.token > g2.token,
        "czxid token {} must exceed {} after re-creation",
        g3.token,
        g2.token
    );
    assert_eq!(g3.token, czxid(&inspect, g3.guard.path()).await);
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curator_named_foreign_node_blocks_until_deleted() {
    let (_zk, b, curator) = setup("curator").await;
    let k = key("tx", "shared-with-java");
    let dir = b.lock_path(&k).await.unwrap();
    let foreign = create_curator_node(&curator, &dir).await;

    assert!(
        acquire(&b, &k, Duration::ZERO).await.is_none(),
        "try-once must fail while Curator holds"
    );
    assert!(acquire(&b, &k, Duration::from_millis(200)).await.is_none());
    assert!(b.is_held(&k).await.unwrap());
    await_contenders(&curator, &dir, 1).await;

    let waiter = spawn_acquire(&b, &k, PATIENCE);
    await_contenders(&curator, &dir, 2).await;
    assert!(!waiter.is_finished());
    let foreign_czxid = czxid(&curator, &foreign).await;
    curator.delete(&foreign, None).await.unwrap();
    let g = waiter
        .await
        .unwrap()
        .unwrap()
        .expect("granted once the Curator node is gone");
    assert!(g.token > foreign_czxid);
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curator_ordered_reading_sees_the_clastor_holder_first() {
    let (_zk, b, curator) = setup("curator-read").await;
    let k = key("tx", "java-waits");
    let g = must_acquire(&b, &k).await;
    let dir = b.lock_path(&k).await.unwrap();
    // A Curator client queues behind us, as its InterProcessMutex would.
    let theirs = create_curator_node(&curator, &dir).await;
    let sorted = curator_sorted(curator.list_children(&dir).await.unwrap());
    assert_eq!(sorted.len(), 2);
    assert_eq!(
        format!("{dir}/{}", sorted[0]),
        g.guard.path(),
        "Curator sees Clastor as the holder"
    );
    assert_eq!(format!("{dir}/{}", sorted[1]), theirs);
    assert_eq!(
        g.token,
        czxid(&curator, &format!("{dir}/{}", sorted[0])).await,
        "token equals the node's czxid"
    );
    b.release(g.guard).await.unwrap();
    let sorted = curator_sorted(curator.list_children(&dir).await.unwrap());
    assert_eq!(sorted.len(), 1);
    assert_eq!(
        format!("{dir}/{}", sorted[0]),
        theirs,
        "Curator's node is now first: it holds"
    );
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kazoo_named_node_is_counted_as_a_contender() {
    let (_zk, b, kazoo) = setup("kazoo").await;
    let k = key("tx", "python");
    let dir = b.lock_path(&k).await.unwrap();
    let node = create_kazoo_node(&kazoo, &dir, "__lock__").await;

    assert!(b.is_held(&k).await.unwrap());
    assert!(acquire(&b, &k, Duration::ZERO).await.is_none());
    let waiter = spawn_acquire(&b, &k, PATIENCE);
    await_contenders(&kazoo, &dir, 2).await;
    kazoo.delete(&node, None).await.unwrap();
    assert!(waiter.await.unwrap().unwrap().is_some());
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timed_out_and_cancelled_waits_and_dropped_guards_delete_their_nodes() {
    let (_zk, b, inspect) = setup("cleanup").await;
    let k = key("tx", "cleanup");
    let holder = must_acquire(&b, &k).await;
    let dir = b.lock_path(&k).await.unwrap();

    // Timed out: the node is gone by the time acquire returns.
    let t0 = Instant::now();
    assert!(acquire(&b, &k, Duration::from_millis(300)).await.is_none());
    assert!(t0.elapsed() >= Duration::from_millis(300));
    assert_eq!(
        contenders(&inspect, &dir).await.len(),
        1,
        "timed-out waiter left its node"
    );
    // Try-once on a held lock: likewise.
    assert!(acquire(&b, &k, Duration::ZERO).await.is_none());
    assert_eq!(contenders(&inspect, &dir).await.len(), 1, "failed try left its node");

    // Cancelled while waiting: the dropped future withdraws in the background.
    let waiter = spawn_acquire(&b, &k, PATIENCE);
    await_contenders(&inspect, &dir, 2).await;
    waiter.abort();
    assert!(waiter.await.unwrap_err().is_cancelled());
    await_contenders(&inspect, &dir, 1).await;

    // Cancelled right after the create was sent, before its reply: found by
    // uuid and deleted.
    for _ in 0..20 {
        let fut = b.acquire(req(&k, PATIENCE));
        let _ = tokio::time::timeout(Duration::from_micros(50), fut).await;
    }
    await_contenders(&inspect, &dir, 1).await;

    // A dropped guard releases in the background.
    let path = holder.guard.path().to_owned();
    drop(holder);
    eventually("the dropped guard's node is deleted", || async {
        inspect.check_stat(&path).await.unwrap().is_none()
    })
    .await;
    assert!(!b.is_held(&k).await.unwrap());
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_znodes_are_left_behind() {
    let (_zk, b, inspect) = setup("tidy").await;
    let mut tasks = Vec::new();
    for i in 0..6 {
        let b = Arc::clone(&b);
        tasks.push(tokio::spawn(async move {
            let k = key("tidy", &format!("id-{}", i % 3));
            for round in 0..5 {
                match round % 3 {
                    0 => {
                        if let Some(g) = acquire(&b, &k, Duration::from_millis(50)).await {
                            b.release(g.guard).await.unwrap();
                        }
                    }
                    1 => {
                        let _ = tokio::time::timeout(Duration::from_millis(5), b.acquire(req(&k, PATIENCE))).await;
                    }
                    _ => {
                        if let Some(g) = acquire(&b, &k, Duration::from_millis(20)).await {
                            drop(g);
                        }
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let base = b.base_path().to_owned();
    eventually(
        "no ephemeral node is left and every lock container is reaped",
        || async {
            let ephemerals = inspect.list_ephemerals(&base).await.unwrap();
            let v1 = format!("{base}/tidy/v1");
            let dirs = match inspect.list_children(&v1).await {
                Ok(d) => d.len(),
                Err(zookeeper_client::Error::NoNode) => 0,
                Err(e) => panic!("{e}"),
            };
            ephemerals.is_empty() && dirs == 0
        },
    )
    .await;
    let kind_children = inspect.list_children(&format!("{base}/tidy")).await.unwrap();
    assert!(
        kind_children.iter().all(|c| c == "version" || c == "v1"),
        "only the version node (and an empty or reaped v1 container) remain: {kind_children:?}"
    );
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_node_is_created_as_v1_normal_and_draining_holds_acquires() {
    let (_zk, b, admin) = setup("drain").await;
    let v = b.version("orders").await.unwrap();
    assert_eq!((&*v.version, v.mode), ("v1", KindMode::Normal));
    let k = key("orders", "o-1");
    let g = must_acquire(&b, &k).await;
    b.release(g.guard).await.unwrap();

    // Mark draining (as a rotation would): acquires wait instead of creating.
    let vpath = b.version_path("orders");
    admin.set_data(&vpath, b"v1\ndraining", None).await.unwrap();
    assert!(
        acquire(&b, &k, Duration::from_millis(300)).await.is_none(),
        "draining: not granted"
    );
    let dir = b.lock_path(&k).await.unwrap();
    assert!(
        contenders(&admin, &dir).await.is_empty(),
        "a draining kind gets no new nodes"
    );
    let waiter = spawn_acquire(&b, &k, PATIENCE);
    // Switch to v2, normal: the waiter proceeds under v2.
    admin.set_data(&vpath, b"v2\nnormal", None).await.unwrap();
    let g = waiter.await.unwrap().unwrap().expect("granted after the rotation");
    assert_eq!(&*g.version, "v2");
    assert!(g.guard.path().contains("/orders/v2/o-1/"), "{}", g.guard.path());
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_zookeeper_is_a_clear_error() {
    init_tracing();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = ZkConfig {
        hosts: format!("127.0.0.1:{port}"),
        sessions: 1,
        ..ZkConfig::default()
    };
    let t0 = Instant::now();
    let err = ZooKeeperBackend::connect_with_timeout(cfg, Duration::from_millis(500))
        .await
        .unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(matches!(err, BackendError::Unavailable(_)), "{err:?}");
    assert!(err.to_string().contains(&format!("127.0.0.1:{port}")), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_zookeeper_reports_lost_before_anyone_else_is_granted() {
    let mut zk = start_zk();
    let timeout = Duration::from_secs(3);
    // Two "servers" (separate backends, one session each) sharing the locks.
    let cfg = one_session(&zk, "freeze", timeout);
    let a = backend_with(cfg.clone()).await;
    let b = Arc::new(backend_with(cfg).await);
    let k = key("tx", "frozen");
    let (r, mut lost) = req_watched(&k, Duration::ZERO);
    let held = a.acquire(r).await.unwrap().expect("a holds");
    // b queues behind a.
    let waiter = spawn_acquire(&b, &k, Duration::from_secs(60));
    let inspect = raw(&zk).await;
    let dir = a.lock_path(&k).await.unwrap();
    await_contenders(&inspect, &dir, 2).await;
    drop(inspect);

    let frozen_at = Instant::now();
    zk.freeze(0).unwrap();
    let (lost_at, reason) = tokio::time::timeout(timeout + Duration::from_secs(2), lost.recv())
        .await
        .expect("lost within timeout + 2 s")
        .unwrap();
    assert_eq!(reason, LostReason::BackendUnreachable);
    let after = lost_at - frozen_at;
    assert!(
        after < timeout,
        "lost reported {after:?} after the freeze, not inside the session timeout {timeout:?}"
    );
    // Stay frozen past the session timeout, so the server expires the sessions.
    tokio::time::sleep_until((frozen_at + timeout + Duration::from_millis(1500)).into()).await;
    zk.thaw(0).unwrap();

    // b's wait failed with its session; it retries until granted.
    let first = waiter.await.unwrap();
    assert!(matches!(first, Err(BackendError::Unavailable(_))), "{first:?}");
    let granted = loop {
        match b.acquire(req(&k, PATIENCE)).await {
            Ok(Some(g)) => break g,
            Ok(None) => panic!("not granted within {PATIENCE:?} after the freeze"),
            Err(BackendError::Unavailable(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => panic!("{e}"),
        }
    };
    let granted_at = Instant::now();
    assert!(granted_at > lost_at, "b was granted before a heard it lost the lock");
    assert!(granted.token > held.token);
    // a's release of its lost grant is harmless; a can lock other keys again.
    a.release(held.guard).await.unwrap();
    // Its session may still be being replaced (b's came back first): retry.
    let other = key("tx", "after-freeze");
    let deadline = Instant::now() + PATIENCE;
    loop {
        match a.acquire(req(&other, PATIENCE)).await {
            Ok(Some(_)) => break,
            Ok(None) => panic!("a not granted a free lock after the freeze"),
            Err(BackendError::Unavailable(e)) if Instant::now() < deadline => {
                tracing::debug!("a not back yet: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("new acquires must succeed after the freeze: {e}"),
        }
    }
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kill_keeps_held_locks_and_never_double_grants() {
    init_tracing();
    let mut zk = ZooKeeper::ensemble(3).expect("start a 3-node ensemble");
    let cfg = ZkConfig {
        session_timeout: Duration::from_secs(8),
        ..config(&zk, "leader")
    };
    let a = backend_with(cfg.clone()).await;
    let b = Arc::new(backend_with(cfg).await);
    let k = key("tx", "survivor");
    let (r, mut lost) = req_watched(&k, Duration::ZERO);
    let held = a.acquire(r).await.unwrap().expect("a holds");
    let path = held.guard.path().to_owned();
    let waiter = spawn_acquire(&b, &k, Duration::from_secs(60));
    let inspect = raw(&zk).await;
    let dir = a.lock_path(&k).await.unwrap();
    await_contenders(&inspect, &dir, 2).await;

    let leader = zk.leader().expect("a leader");
    zk.kill(leader).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while zk.leader().is_none_or(|l| l == leader) {
        assert!(Instant::now() < deadline, "no new leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The node survives (its session moved to a live server) and b still waits.
    eventually("the holder's node is visible after the election", || async {
        matches!(inspect.check_stat(&path).await, Ok(Some(_)))
    })
    .await;
    let stat = inspect.check_stat(&path).await.unwrap().unwrap();
    assert_eq!(stat.ephemeral_owner, held.guard.session_id());
    assert!(a.is_held(&k).await.unwrap());
    assert!(!waiter.is_finished(), "b must not be granted while a holds");
    assert!(
        lost.try_recv().is_err(),
        "a's lock was reported lost although it survived"
    );

    a.release(held.guard).await.unwrap();
    let g = tokio::time::timeout(PATIENCE, waiter)
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .expect("b granted after release");
    assert!(g.token > held.token);
    assert!(lost.try_recv().is_err());
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_whose_reply_was_lost_is_recovered_without_an_orphan() {
    let mut zk = start_zk();
    // The client declares connection loss after 2/5 of the timeout (4 s); the
    // pool gives the session up after 3/5 of it without contact (>= 5 s
    // after the freeze, given one probe interval of lag). Thaw in between.
    let timeout = Duration::from_secs(10);
    let b = backend_with(one_session(&zk, "lost-reply", timeout)).await;
    let inspect = raw(&zk).await;
    let k = key("tx", "lost-reply");
    let dir = b.lock_path(&k).await.unwrap();
    // Make sure the lock directory exists, so the frozen create is the only
    // request that can create something.
    let g = must_acquire(&b, &k).await;
    b.release(g.guard).await.unwrap();

    zk.freeze(0).unwrap();
    let thaw_at = Instant::now() + Duration::from_millis(4_400);
    let acquire = b.acquire(req(&k, PATIENCE));
    let thaw = async {
        tokio::time::sleep_until(thaw_at.into()).await;
        zk.thaw(0).unwrap();
    };
    let (granted, ()) = tokio::join!(acquire, thaw);
    let g = granted.expect("acquire survives the lost reply").expect("granted");
    let nodes = contenders(&inspect, &dir).await;
    assert_eq!(
        nodes.len(),
        1,
        "exactly one node: no orphan from the lost create: {nodes:?}"
    );
    assert_eq!(format!("{dir}/{}", nodes[0]), g.guard.path());
    assert_eq!(g.token, czxid(&inspect, g.guard.path()).await);
    b.release(g.guard).await.unwrap();
    await_contenders(&inspect, &dir, 0).await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_reports_every_session_and_its_state() {
    let zk = start_zk();
    let b = backend(&zk, "info").await;
    let info = info_map(&b);
    assert_eq!(info.get("zk.sessions").map(String::as_str), Some("2"));
    assert_eq!(info.get("zk.sessions_healthy").map(String::as_str), Some("2"));
    for i in 0..2 {
        let s = info.get(&format!("zk.session.{i}")).unwrap();
        assert!(s.contains("state=connected") && s.contains("id=0x"), "{s}");
    }
    b.shutdown().await;
    assert!(matches!(
        b.acquire(req(&key("tx", "late"), Duration::ZERO)).await,
        Err(BackendError::Closed)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kazoo_read_lock_node_excludes_a_clastor_writer() {
    let (_zk, b, kazoo) = setup("kazoo-read").await;
    let k = key("tx", "reader");
    let dir = b.lock_path(&k).await.unwrap();
    // kazoo's ReadLock: `<32 hex>__rlock__<seq>`.
    let reader = create_kazoo_node(&kazoo, &dir, "__rlock__").await;

    assert!(b.is_held(&k).await.unwrap(), "a kazoo reader holds the lock");
    assert!(
        acquire(&b, &k, Duration::ZERO).await.is_none(),
        "a Clastor writer must not be granted while a kazoo reader holds"
    );
    let waiter = spawn_acquire(&b, &k, PATIENCE);
    await_contenders(&kazoo, &dir, 2).await;
    assert!(!waiter.is_finished());
    kazoo.delete(&reader, None).await.unwrap();
    assert!(
        waiter.await.unwrap().unwrap().is_some(),
        "granted once the reader is gone"
    );
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_paths_of_never_used_kinds_write_nothing() {
    let (_zk, b, inspect) = setup("read-only").await;
    let base = b.base_path().to_owned();
    assert!(inspect.list_children(&base).await.unwrap().is_empty());

    let v = b.version("never-used").await.unwrap();
    assert_eq!((&*v.version, v.mode), ("v1", KindMode::Normal), "VERSION of a new kind");
    assert!(!b.is_held(&key("never-held", "x")).await.unwrap());
    assert!(!b.is_held(&key("never-used", "y")).await.unwrap());
    assert_eq!(
        b.lock_path(&key("never-pathed", "z")).await.unwrap(),
        format!("{base}/never-pathed/v1/z")
    );
    assert!(
        inspect.list_children(&base).await.unwrap().is_empty(),
        "read paths created znodes: {:?}",
        inspect.list_children(&base).await.unwrap()
    );

    // Only acquire creates the kind's nodes.
    let k = key("never-used", "y");
    let g = must_acquire(&b, &k).await;
    assert!(b.is_held(&k).await.unwrap());
    let (data, _) = inspect.get_data(&b.version_path("never-used")).await.unwrap();
    assert_eq!(data, b"v1\nnormal");
    b.release(g.guard).await.unwrap();
    assert_eq!(
        inspect.list_children(&base).await.unwrap(),
        vec!["never-used".to_owned()]
    );
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_is_bounded_by_its_wait_while_zookeeper_does_not_answer() {
    let mut zk = start_zk();
    // Long enough that the session outlives the acquires below: the client
    // notices the silence after 2/5 of it (4 s), the pool retires the session
    // after 3/5 (6 s); grace is min(timeout / 3, 2 s) = 2 s.
    let timeout = Duration::from_secs(10);
    let b = backend_with(one_session(&zk, "bounded", timeout)).await;
    let warm = must_acquire(&b, &key("tx", "warm")).await;
    b.release(warm.guard).await.unwrap();

    zk.freeze(0).unwrap();
    let wait = Duration::from_millis(300);
    let t0 = Instant::now();
    let r = b.acquire(req(&key("tx", "frozen"), wait)).await;
    let took = t0.elapsed();
    assert!(matches!(r, Err(BackendError::Unavailable(_))), "{r:?}");
    assert!(
        took < wait + Duration::from_secs(2) + Duration::from_millis(1500),
        "acquire with a {wait:?} wait took {took:?} while ZooKeeper was frozen"
    );

    // Once the session is known to be disconnected, a try-once answers at
    // once instead of queueing behind the reconnect.
    eventually("the session is seen disconnected", || async {
        info_map(&b)
            .get("zk.session.0")
            .is_some_and(|s| s.contains("state=disconnected"))
    })
    .await;
    let t0 = Instant::now();
    let r = b.acquire(req(&key("tx", "try-once"), Duration::ZERO)).await;
    let took = t0.elapsed();
    assert!(matches!(r, Err(BackendError::Unavailable(_))), "{r:?}");
    assert!(
        took < Duration::from_millis(500),
        "try-once took {took:?} without a connected session"
    );

    zk.thaw(0).unwrap();
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holder_on_a_follower_cut_off_from_the_leader_hears_of_the_loss_in_time() {
    init_tracing();
    // A follower notices a silent leader only after syncLimit (10) ticks, 10 s
    // here, and answers reads and pings from its own copy until then; only
    // the leader can vouch for the session.
    let mut zk = ZooKeeper::builder()
        .nodes(3)
        .tick_time(Duration::from_secs(1))
        .start()
        .expect("start a 3-node ensemble");
    let leader = zk.leader().expect("a leader");
    let follower = (0..3).find(|&i| i != leader).unwrap();
    assert_eq!(zk.mode(follower), Some(Mode::Follower));
    let timeout = Duration::from_secs(4);
    let a = backend_with(ZkConfig {
        hosts: zk.addr(follower).to_string(),
        provider: "cut-off".into(),
        sessions: 1,
        session_timeout: timeout,
        ..ZkConfig::default()
    })
    .await;
    let k = key("tx", "cut-off");
    let (r, mut lost) = req_watched(&k, Duration::ZERO);
    let held = a.acquire(r).await.unwrap().expect("a holds");

    let frozen_at = Instant::now();
    zk.freeze(leader).unwrap();
    let (lost_at, reason) = tokio::time::timeout(timeout + Duration::from_secs(2), lost.recv())
        .await
        .expect("lost not reported: the follower kept answering reads")
        .unwrap();
    assert_eq!(reason, LostReason::BackendUnreachable);
    let after = lost_at - frozen_at;
    assert!(
        after < timeout,
        "lost reported {after:?} after the leader froze, not inside the session timeout {timeout:?}"
    );
    zk.thaw(leader).unwrap();
    a.release(held.guard).await.unwrap();
    a.shutdown().await;
}

/// As [`spawn_acquire`], with the grant's lost notifications on the returned channel.
#[allow(clippy::type_complexity)]
fn spawn_acquire_watched(
    b: &Arc<ZooKeeperBackend>,
    key: &LockKey,
    wait: Duration,
) -> (
    JoinHandle<Result<Option<Grant<ZkGuard>>, BackendError>>,
    mpsc::UnboundedReceiver<(Instant, LostReason)>,
) {
    let (b, key) = (Arc::clone(b), key.clone());
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let (mut req, _) = req_watched(&key, wait);
        req.on_lost = LostNotifier::new(move |reason| {
            let _ = tx.send((Instant::now(), reason));
        });
        b.acquire(req).await
    });
    (task, rx)
}

/// Two backends ("servers") on one ZooKeeper and provider, and a raw client.
async fn two_servers(provider: &str) -> (ZooKeeper, Arc<ZooKeeperBackend>, Arc<ZooKeeperBackend>, Client) {
    let zk = start_zk();
    let x = Arc::new(backend(&zk, provider).await);
    let y = Arc::new(backend(&zk, provider).await);
    let inspect = raw(&zk).await;
    (zk, x, y, inspect)
}

async fn node_exists(zk: &Client, path: &str) -> bool {
    zk.check_stat(path).await.unwrap().is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_node_deleted_from_outside_is_reported_lost_and_handed_on_once() {
    let (_zk, x, y, inspect) = two_servers("deleted-held").await;
    let k = key("tx", "deleted-held");
    let (req_a, mut lost_a) = req_watched(&k, PATIENCE);
    let a = x.acquire(req_a).await.unwrap().expect("a is granted");
    let dir = x.lock_path(&k).await.unwrap();
    let b = spawn_acquire(&y, &k, PATIENCE);
    await_contenders(&inspect, &dir, 2).await;
    let c = spawn_acquire(&x, &k, Duration::from_secs(1));
    await_contenders(&inspect, &dir, 3).await;

    // An operator "unsticks" the lock.
    inspect.delete(a.guard.path(), None).await.unwrap();
    let (_, reason) = tokio::time::timeout(PATIENCE, lost_a.recv())
        .await
        .expect("the holder is told")
        .expect("lost notification");
    assert_eq!(reason, LostReason::NodeDeleted);
    let b = b.await.unwrap().unwrap().expect("the next waiter is granted");
    assert!(b.token > a.token);
    // The waiter behind it still waits: one holder, not two.
    assert!(c.await.unwrap().unwrap().is_none(), "c was granted while b holds");
    assert!(node_exists(&inspect, b.guard.path()).await);
    y.release(b.guard).await.unwrap();
    drop(a);
    await_contenders(&inspect, &dir, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_node_deleted_from_outside_queues_again_and_is_never_granted() {
    let (_zk, x, y, inspect) = two_servers("deleted-waiting").await;
    let k = key("tx", "deleted-waiting");
    let a = must_acquire(&x, &k).await;
    let dir = x.lock_path(&k).await.unwrap();
    let b = spawn_acquire(&y, &k, PATIENCE);
    await_contenders(&inspect, &dir, 2).await;
    let old_b = contenders(&inspect, &dir)
        .await
        .into_iter()
        .map(|name| format!("{dir}/{name}"))
        .find(|path| path != a.guard.path())
        .unwrap();

    inspect.delete(&old_b, None).await.unwrap();
    // It queues again behind the holder, with a new node.
    eventually("the waiter queued again", || async {
        let now = contenders(&inspect, &dir).await;
        now.len() == 2 && !now.iter().any(|name| old_b.ends_with(name.as_str()))
    })
    .await;
    x.release(a.guard).await.unwrap();
    let b = b.await.unwrap().unwrap().expect("granted on its new node");
    assert_ne!(b.guard.path(), old_b, "granted on a node that was deleted");
    assert!(node_exists(&inspect, b.guard.path()).await);
    y.release(b.guard).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_directory_deleted_from_outside_leaves_nobody_holding_a_gone_node() {
    let (_zk, x, y, inspect) = two_servers("deleted-dir").await;
    let k = key("tx", "deleted-dir");
    let (req_a, mut lost_a) = req_watched(&k, PATIENCE);
    let a = x.acquire(req_a).await.unwrap().expect("a is granted");
    let dir = x.lock_path(&k).await.unwrap();
    let (b, mut lost_b) = spawn_acquire_watched(&y, &k, PATIENCE);
    await_contenders(&inspect, &dir, 2).await;

    // `deleteall`: the children in order, then the directory.
    for name in curator_sorted(contenders(&inspect, &dir).await) {
        inspect.delete(&format!("{dir}/{name}"), None).await.unwrap();
    }
    let _ = inspect.delete(&dir, None).await;

    tokio::time::timeout(PATIENCE, lost_a.recv())
        .await
        .expect("the holder is told")
        .expect("lost notification");
    // The waiter either queued again and holds a live node, or was granted
    // on its old node in the instant between the two deletions and is then
    // told it lost it: never a holder of a node that is gone.
    let b = b.await.unwrap().unwrap().expect("b is granted");
    let path = b.guard.path().to_owned();
    eventually("b holds a live node or was told it lost it", || async {
        node_exists(&inspect, &path).await || !lost_b.is_empty()
    })
    .await;
    if node_exists(&inspect, &path).await {
        assert!(lost_b.try_recv().is_err(), "b was told lost but its node exists");
        assert!(b.token > a.token);
    }
    y.release(b.guard).await.unwrap();
}
