//! Directory views (`backend/zookeeper/views.rs`) against a real ZooKeeper:
//! a repeat acquire of a lock decides "am I first" from the session's
//! persistent recursive watch instead of a listing. These tests make the
//! view the only thing standing between two holders — contenders from other
//! servers, nodes deleted by hand, a restarted ZooKeeper, and a hammer of
//! one key from several servers and sessions — and check that it never lets
//! two through.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clastor::LockKey;
use clastor::backend::zookeeper::{ZkConfig, ZkGuard, ZooKeeperBackend};
use clastor::backend::{AcquireRequest, Backend, Grant, LostNotifier};
use clastor_protocol::{LockMode, LostReason};
use clastor_testkit::ZooKeeper;
use tokio::sync::mpsc;
use zookeeper_client::Client;

const PATIENCE: Duration = Duration::from_secs(15);

fn start_zk() -> ZooKeeper {
    start_zk_with(clastor_testkit::Builder::default())
}

fn start_zk_with(zk: clastor_testkit::Builder) -> ZooKeeper {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    zk.start().expect("start ZooKeeper (apt-get install -y zookeeper)")
}

async fn server(zk: &ZooKeeper, sessions: usize) -> Arc<ZooKeeperBackend> {
    server_with(zk, sessions, ZkConfig::default().watched_dirs).await
}

async fn server_with(zk: &ZooKeeper, sessions: usize, watched_dirs: usize) -> Arc<ZooKeeperBackend> {
    let cfg = ZkConfig {
        hosts: zk.connect_string(),
        provider: "views".to_owned(),
        sessions,
        session_timeout: Duration::from_secs(10),
        watched_dirs,
        ..ZkConfig::default()
    };
    Arc::new(ZooKeeperBackend::connect(cfg).await.expect("connect backend"))
}

fn key(id: &str) -> LockKey {
    LockKey::new("tx", id).unwrap()
}

/// An acquire whose lost notification arrives on the returned channel.
fn request(key: &LockKey, wait: Duration) -> (AcquireRequest<'_>, mpsc::UnboundedReceiver<LostReason>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let on_lost = LostNotifier::new(move |reason| {
        let _ = tx.send(reason);
    });
    let req = AcquireRequest {
        key,
        wait,
        mode: LockMode::Exclusive,
        owner: 1,
        on_lost,
    };
    (req, rx)
}

async fn acquire(b: &ZooKeeperBackend, key: &LockKey, wait: Duration) -> Option<Grant<ZkGuard>> {
    b.acquire(request(key, wait).0).await.unwrap()
}

/// Views held across the backend's sessions, from `INFO`.
fn views(b: &ZooKeeperBackend) -> usize {
    let info: HashMap<String, String> = b.info().into_iter().collect();
    info.iter()
        .filter(|(k, _)| k.starts_with("zk.session."))
        .filter_map(|(_, v)| v.split_whitespace().find_map(|f| f.strip_prefix("views=")))
        .map(|n| n.parse::<usize>().unwrap())
        .sum()
}

/// Takes and gives back `key` until the backend has `want` views, the
/// directory of `key` among them (no other is used meanwhile). A directory's
/// second acquire makes its view (the first lists, and finds the directory;
/// its holder's child watch ends with its release). A few more rounds are
/// allowed for the test ZooKeeper reaping the empty directory between two of
/// them (its container check runs every second), which makes the next
/// acquire a first one again.
async fn warm_up(b: &ZooKeeperBackend, key: &LockKey, want: usize) {
    for _ in 0..6 {
        let g = acquire(b, key, PATIENCE).await.expect("free lock granted");
        b.release(g.guard).await.unwrap();
        if views(b) >= want {
            return;
        }
    }
    panic!("not {want} views after repeat acquires of {key}: {:?}", b.info());
}

async fn raw(zk: &ZooKeeper) -> Client {
    Client::connect(&zk.connect_string()).await.expect("raw client")
}

/// The holder's lost notification arrives, saying its node was deleted.
async fn told_node_deleted(lost: &mut mpsc::UnboundedReceiver<LostReason>) {
    let reason = tokio::time::timeout(PATIENCE, lost.recv())
        .await
        .expect("the holder is told its node was deleted")
        .expect("lost notification");
    assert_eq!(reason, LostReason::NodeDeleted);
}

/// Polls until `dir` has `n` children, or `PATIENCE` runs out.
async fn await_children(inspect: &Client, dir: &str, n: usize) {
    let deadline = Instant::now() + PATIENCE;
    while inspect.list_children(dir).await.unwrap().len() != n {
        assert!(Instant::now() < deadline, "{dir} never had {n} children");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The second acquire of a directory makes its view, even when it follows
/// the first one's release at once: the first holder's child watch on the
/// directory (fired by its release's delete) stops counting once that delete
/// is confirmed, not when the task that awaited the watch next runs — which,
/// with this test's body on its own thread, may well be after the next
/// acquire. Many directories, to give that race many chances.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_second_acquire_makes_a_view_right_after_the_first_release() {
    // Empty directories are not reaped meanwhile: that would make a
    // second acquire a first one again.
    let zk = start_zk_with(clastor_testkit::Builder::default().container_check_interval(Duration::from_secs(3600)));
    let x = server(&zk, 1).await;
    for dir in 0..40 {
        let k = key(&format!("second-acquire-{dir}"));
        for round in 0..2 {
            let g = acquire(&x, &k, PATIENCE).await.expect("free lock granted");
            x.release(g.guard).await.unwrap();
            assert_eq!(views(&x), dir + round, "{k}, round {}: {:?}", round + 1, x.info());
        }
    }
    // A view serves the next acquire, and its holder watches through it.
    let k = key("second-acquire-0");
    let (req, mut lost) = request(&k, PATIENCE);
    let g = x.acquire(req).await.unwrap().expect("free lock granted");
    raw(&zk).await.delete(g.guard.path(), None).await.unwrap();
    told_node_deleted(&mut lost).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_acquire_sees_a_holder_on_another_server_and_waits_its_turn() {
    let zk = start_zk();
    let (x, y) = (server(&zk, 1).await, server(&zk, 1).await);
    let k = key("warm-contended");
    warm_up(&x, &k, 1).await;

    let held = acquire(&y, &k, PATIENCE).await.expect("y holds");
    // x's view must show y's node: a try-once is refused.
    assert!(
        acquire(&x, &k, Duration::ZERO).await.is_none(),
        "x granted while y holds"
    );
    let waiter = {
        let (x, k) = (Arc::clone(&x), k.clone());
        tokio::spawn(async move { acquire(&x, &k, PATIENCE).await })
    };
    let token = held.token;
    y.release(held.guard).await.unwrap();
    let next = waiter.await.unwrap().expect("x granted after y's release");
    assert!(next.token > token);
    x.release(next.guard).await.unwrap();
    assert!(views(&x) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_deleted_by_hand_under_a_view_is_reported_lost() {
    let zk = start_zk();
    let x = server(&zk, 1).await;
    let y = server(&zk, 1).await;
    let k = key("warm-deleted");
    warm_up(&x, &k, 1).await;
    let (req, mut lost) = request(&k, PATIENCE);
    let held = x.acquire(req).await.unwrap().expect("x holds");
    let inspect = raw(&zk).await;
    inspect.delete(held.guard.path(), None).await.unwrap();
    told_node_deleted(&mut lost).await;
    // The lock is free for others, and x's view knows it too.
    let other = acquire(&y, &k, PATIENCE).await.expect("y granted");
    assert!(other.token > held.token);
    assert!(
        acquire(&x, &k, Duration::ZERO).await.is_none(),
        "x granted while y holds"
    );
    y.release(other.guard).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_are_dropped_when_the_connection_breaks_and_made_again_after() {
    let mut zk = start_zk();
    let x = server(&zk, 1).await;
    let k = key("warm-restart");
    warm_up(&x, &k, 1).await;
    zk.kill(0).unwrap();
    eventually("the view is dropped on the disconnection", || views(&x) == 0).await;
    zk.restart(0).unwrap();
    zk.wait_ready(PATIENCE).unwrap();
    // Another server takes the lock first; x, once back, must see it.
    let y = server(&zk, 1).await;
    let held = acquire(&y, &k, PATIENCE).await.expect("y holds");
    let deadline = Instant::now() + PATIENCE;
    loop {
        match x.acquire(request(&k, Duration::ZERO).0).await {
            Ok(None) => break,
            Ok(Some(_)) => panic!("x granted while y holds, after a reconnection"),
            Err(e) => {
                assert!(Instant::now() < deadline, "x never came back: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    y.release(held.guard).await.unwrap();
    warm_up(&x, &k, 1).await;
}

/// Several servers, each with several sessions, take one key (and a few
/// others) in a loop with views on: never two holders of a key at once, and
/// tokens strictly increase per key in grant order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_hammered_from_several_servers_and_sessions_never_has_two_holders() {
    let zk = start_zk();
    let servers = [server(&zk, 2).await, server(&zk, 2).await, server(&zk, 2).await];
    let keys: Vec<LockKey> = ["hammer-0", "hammer-1", "hammer-2"].iter().map(|id| key(id)).collect();
    let holders: Arc<Vec<AtomicUsize>> = Arc::new(keys.iter().map(|_| AtomicUsize::new(0)).collect());
    let last_token: Arc<Vec<std::sync::Mutex<u64>>> = Arc::new(keys.iter().map(|_| std::sync::Mutex::new(0)).collect());
    let grants = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for (s, backend) in servers.iter().enumerate() {
        for worker in 0..4usize {
            let (backend, keys, holders, last_token, grants) = (
                Arc::clone(backend),
                keys.clone(),
                Arc::clone(&holders),
                Arc::clone(&last_token),
                Arc::clone(&grants),
            );
            tasks.push(tokio::spawn(async move {
                for round in 0..40usize {
                    // Mostly the first key: that one is contended hardest.
                    let i = if (round + worker + s) % 4 == 0 {
                        1 + round % 2
                    } else {
                        0
                    };
                    let k = &keys[i];
                    let g = acquire(&backend, k, PATIENCE)
                        .await
                        .unwrap_or_else(|| panic!("{k} not granted within {PATIENCE:?}"));
                    let before = holders[i].fetch_add(1, Ordering::SeqCst);
                    assert_eq!(before, 0, "{k}: two holders at once (server {s}, worker {worker})");
                    {
                        let mut last = last_token[i].lock().unwrap();
                        assert!(g.token > *last, "{k}: token {} after {}", g.token, *last);
                        *last = g.token;
                    }
                    tokio::task::yield_now().await;
                    holders[i].fetch_sub(1, Ordering::SeqCst);
                    backend.release(g.guard).await.unwrap();
                    grants.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(grants.load(Ordering::Relaxed), 3 * 4 * 40);
    for b in &servers {
        assert!(views(b) >= 1, "no views were used: {:?}", b.info());
    }
}

/// A waiter whose closest predecessor leaves the queue early (its wait ran
/// out) prunes the queue — from the view, or from a listing with views off:
/// the holder ahead is still there, so it waits on, granted only after the
/// holder's release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_whose_predecessor_leaves_early_still_waits_for_the_holder() {
    for watched_dirs in [ZkConfig::default().watched_dirs, 0] {
        predecessor_leaves_early(watched_dirs).await;
    }
}

async fn predecessor_leaves_early(watched_dirs: usize) {
    let zk = start_zk();
    let (x, y) = (server_with(&zk, 1, watched_dirs).await, server(&zk, 1).await);
    let k = key("warm-middle");
    for _ in 0..3 {
        let g = acquire(&x, &k, PATIENCE).await.expect("free lock granted");
        x.release(g.guard).await.unwrap();
    }
    assert_eq!(views(&x) >= 1, watched_dirs > 0, "{:?}", x.info());
    let inspect = raw(&zk).await;
    let held = acquire(&y, &k, PATIENCE).await.expect("y holds");
    let dir = held.guard.path().rsplit_once('/').unwrap().0.to_owned();
    let middle = {
        let (x, k) = (Arc::clone(&x), k.clone());
        tokio::spawn(async move { acquire(&x, &k, Duration::from_millis(500)).await })
    };
    await_children(&inspect, &dir, 2).await;
    let last = {
        let (x, k) = (Arc::clone(&x), k.clone());
        tokio::spawn(async move {
            let g = acquire(&x, &k, PATIENCE).await;
            (g, Instant::now())
        })
    };
    await_children(&inspect, &dir, 3).await;
    assert!(
        middle.await.unwrap().is_none(),
        "the middle waiter was granted while y holds"
    );
    await_children(&inspect, &dir, 2).await;
    // Asserting that something does not happen needs a window; this one is
    // far longer than a wrong grant takes (one event and one listing).
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!last.is_finished(), "the last waiter was granted while y holds");
    let released_at = Instant::now();
    y.release(held.guard).await.unwrap();
    let (g, granted_at) = last.await.unwrap();
    let g = g.expect("the last waiter is granted after the release");
    assert!(granted_at >= released_at, "granted before the holder released");
    assert!(g.token > held.token);
    x.release(g.guard).await.unwrap();
}

/// A first-time holder watches its node through the listing's one-shot
/// child watch; a second acquire of the same lock through the same session
/// must not put a recursive watch on the directory while that child watch is
/// pending (ZooKeeper 3.8 keeps one watch mode per path and session, and the
/// child watch would never fire): the holder still hears of its node's
/// deletion by hand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_time_holder_still_hears_of_its_deletion_when_a_second_acquire_follows() {
    let zk = start_zk();
    let x = server(&zk, 1).await;
    let k = key("fresh-then-hot");
    let (req, mut lost) = request(&k, PATIENCE);
    let held = x.acquire(req).await.unwrap().expect("granted");
    let waiter = {
        let (x, k) = (Arc::clone(&x), k.clone());
        tokio::spawn(async move { acquire(&x, &k, PATIENCE).await })
    };
    let inspect = raw(&zk).await;
    let dir = held.guard.path().rsplit_once('/').unwrap().0.to_owned();
    await_children(&inspect, &dir, 2).await;
    inspect.delete(held.guard.path(), None).await.unwrap();
    told_node_deleted(&mut lost).await;
    let next = waiter.await.unwrap().expect("the waiter is granted");
    assert!(next.token > held.token);
    x.release(next.guard).await.unwrap();
}

/// A warm acquire whose node is deleted from outside right after its create
/// (before the view has caught up with the create's reply) must not be
/// granted on the gone node: it queues again with a new one. Found by
/// review: the view once put our name back "either way", and the holder of
/// a node that no longer existed was never told. To make the window wide, a
/// task blocks this test's only runtime thread in 50 ms slices, so the
/// client reads the create's reply and the deletion event — made by another
/// thread's client as soon as it sees the node — in one go.
#[tokio::test(flavor = "current_thread")]
async fn a_warm_grant_is_never_made_on_a_node_deleted_right_after_its_create() {
    use std::sync::atomic::AtomicBool;
    use zookeeper_client::{AddWatchMode, EventType};

    let zk = start_zk();
    let x = server(&zk, 1).await;
    let k = key("deleted-at-birth");
    warm_up(&x, &k, 1).await;
    let g = acquire(&x, &k, PATIENCE).await.unwrap();
    let dir = g.guard.path().rsplit_once('/').unwrap().0.to_owned();
    x.release(g.guard).await.unwrap();
    let inspect = raw(&zk).await;

    // Another process's client deletes the next node created in the
    // directory, once per arming.
    let armed = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let deleter = {
        let (armed, stop, connect, dir) = (Arc::clone(&armed), Arc::clone(&stop), zk.connect_string(), dir.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let c = Client::connect(&connect).await.unwrap();
                let mut w = c.watch(&dir, AddWatchMode::PersistentRecursive).await.unwrap();
                ready_tx.send(()).unwrap();
                while !stop.load(Ordering::SeqCst) {
                    let Ok(ev) = tokio::time::timeout(Duration::from_millis(100), w.changed()).await else {
                        continue;
                    };
                    if ev.event_type == EventType::NodeCreated && ev.path != dir && armed.swap(false, Ordering::SeqCst)
                    {
                        let _ = c.delete(&ev.path, None).await;
                    }
                }
            });
        })
    };
    ready_rx.recv().unwrap();

    for attempt in 0..10 {
        let hog = tokio::spawn(async {
            loop {
                std::thread::sleep(Duration::from_millis(50));
                tokio::task::yield_now().await;
            }
        });
        armed.store(true, Ordering::SeqCst);
        let (req, mut lost) = request(&k, PATIENCE);
        let held = x.acquire(req).await.unwrap().expect("granted");
        hog.abort();
        let _ = hog.await;
        let path = held.guard.path().to_owned();
        if inspect.check_stat(&path).await.unwrap().is_none() {
            // Granted on a gone node: it must at least be told, at once.
            let told = tokio::time::timeout(Duration::from_secs(3), lost.recv()).await;
            assert!(
                told.is_ok(),
                "attempt {attempt}: granted on {path}, deleted before the grant, and never told"
            );
        }
        x.release(held.guard).await.ok();
    }
    stop.store(true, Ordering::SeqCst);
    deleter.join().unwrap();
}

/// A rotation drained through the same (single) session that holds a lock
/// through a view: the census suspends the session's views under the old
/// version (ZooKeeper 3.8 keeps one watch mode per path and session), the
/// holder falls back to watching its node itself and is still told of a
/// deletion, and the drain ends when the holder releases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_through_the_viewing_session_suspends_its_views_and_completes() {
    use clastor::backend::{RotateOutcome, RotateRequest};

    let zk = start_zk();
    let x = server(&zk, 1).await;
    let k = key("rotated");
    warm_up(&x, &k, 1).await;
    let (req, mut lost) = request(&k, PATIENCE);
    let held = x.acquire(req).await.unwrap().expect("x holds");
    assert!(views(&x) >= 1);
    let rotation = {
        let x = Arc::clone(&x);
        let kind: Arc<str> = Arc::from("tx");
        tokio::spawn(async move {
            let progress = |_| {};
            x.rotate(RotateRequest {
                kind: &kind,
                from: "v1",
                to: "v2",
                drain_timeout: PATIENCE,
                layout: None,
                progress: &progress,
            })
            .await
        })
    };
    eventually("the census suspended the session's views", || views(&x) == 0).await;
    assert!(!rotation.is_finished(), "the rotation ended while a lock was held");
    // The holder still hears of its node's deletion, now through its own watch.
    let inspect = raw(&zk).await;
    inspect.delete(held.guard.path(), None).await.unwrap();
    told_node_deleted(&mut lost).await;
    let outcome = rotation.await.unwrap().expect("rotation runs");
    assert!(matches!(outcome, RotateOutcome::Completed { .. }), "{outcome:?}");
    // The kind is on v2, and views come back there.
    let g = acquire(&x, &k, PATIENCE).await.expect("granted under v2");
    assert!(g.guard.path().contains("/v2/"), "{}", g.guard.path());
    x.release(g.guard).await.unwrap();
    warm_up(&x, &k, 1).await;
}

/// A view no acquire has used for `view_idle` is dropped on the session's
/// probe tick (its watch removed), unless a holder watches its node through
/// it; the directory gets a view again when it is used again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_view_is_dropped_but_not_one_a_holder_watches_through() {
    let zk = start_zk();
    let idle = Duration::from_millis(300);
    let cfg = ZkConfig {
        hosts: zk.connect_string(),
        provider: "views".to_owned(),
        sessions: 1,
        // Probes, and so idle checks, every tenth of it: 400 ms.
        session_timeout: Duration::from_secs(4),
        view_idle: idle,
        ..ZkConfig::default()
    };
    let x = ZooKeeperBackend::connect(cfg).await.expect("connect backend");
    let (unused, held) = (key("idle-unused"), key("idle-held"));
    // Each view is counted right after it is made, not after another
    // directory's warm-up: by then a view may already be idle.
    warm_up(&x, &held, 1).await;
    // A warm grant: the holder watches its node through the view.
    let (req, mut lost) = request(&held, PATIENCE);
    let g = x.acquire(req).await.unwrap().expect("free lock granted");
    warm_up(&x, &unused, 2).await;
    eventually("the unused view is dropped", || views(&x) == 1).await;
    // The held lock's view is as idle by now plus a few probe ticks, and
    // stays: a negative, so it is checked over a bounded time.
    tokio::time::sleep(idle + Duration::from_millis(1_000)).await;
    assert_eq!(views(&x), 1, "the holder's view was dropped: {:?}", x.info());
    assert!(lost.try_recv().is_err(), "the holder heard of a loss");
    x.release(g.guard).await.unwrap();
    eventually("the released lock's view is dropped once idle", || views(&x) == 0).await;
    // Used again, the directory gets its view back.
    warm_up(&x, &unused, 1).await;
}
