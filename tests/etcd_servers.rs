//! The etcd backend under faults, the way an operator meets them: `clastor
//! serve` processes on a real etcd (Debian's package, via the testkit), a
//! frozen Clastor server, a frozen etcd, a killed etcd leader under a
//! two-server hammer, a lock key deleted by hand, and `etcdctl lock` — Go's
//! `concurrency.Mutex` — contending with Clastor on the same lock.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Stdio;
use std::time::Duration;

use clastor_testkit::Etcd;
use support::hammer::{OnError, assert_no_overlap, hammer, hold_and_wait};
use support::process::{Server, load_harness_runs, send_signal, wall_ns};
use support::{Text, token_of};
use tokio::io::{AsyncBufReadExt, BufReader};

/// Two `clastor serve` processes X and Y on `etcd`, each with one lease of
/// `ttl`.
fn two_servers_on(etcd: &Etcd, ttl: &str) -> (Server, Server) {
    let endpoints = etcd.endpoints().join(",");
    let args = [
        "--backend",
        "etcd",
        "--etcd",
        &endpoints,
        "--etcd-lease-ttl",
        ttl,
        "--etcd-leases",
        "1",
    ];
    (Server::start(&args), Server::start(&args))
}

fn start_etcd(members: usize) -> Etcd {
    Etcd::builder()
        .members(members)
        .heartbeat_interval(Duration::from_millis(50))
        .election_timeout(Duration::from_millis(500))
        .start()
        .expect("start etcd (apt-get install -y etcd-server etcd-client)")
}

/// A frozen Clastor server (a long pause, a hung host): its holder's
/// safe-until runs out on the client — jeopardy — before etcd expires the
/// server's lease and the other server grants the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_server_s_holder_is_told_before_another_server_grants() {
    let etcd = start_etcd(1);
    let (x, y) = two_servers_on(&etcd, "3s");
    let holder = clastor_client::Client::builder(x.addr)
        .keepalive(None)
        .connect()
        .await
        .unwrap();
    let guard = holder.lock("tx", "frozen").try_acquire().await.unwrap().expect("free");
    assert!(guard.safe_until().expect("safe-until is stated") > tokio::time::Instant::now());
    let other = clastor_client::Client::connect(y.addr).await.unwrap();
    let wait = tokio::spawn(async move {
        let g = other.lock("tx", "frozen").wait(Duration::from_secs(60)).acquire().await;
        (tokio::time::Instant::now(), g)
    });

    send_signal(x.child.id(), "STOP");
    let frozen_at = tokio::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(30), guard.jeopardy())
        .await
        .expect("the holder falls into jeopardy");
    let jeopardy_at = tokio::time::Instant::now();
    let (granted_at, granted) = wait.await.unwrap();
    let granted = granted.unwrap().expect("Y grants once X's lease expired");
    assert!(granted.token() > guard.token());
    println!(
        "X frozen at 0: jeopardy after {:?}, Y granted after {:?}",
        jeopardy_at - frozen_at,
        granted_at - frozen_at
    );
    assert!(
        jeopardy_at < granted_at,
        "jeopardy came after another holder was granted"
    );
    send_signal(x.child.id(), "CONT");
}

/// The whole etcd frozen: X stops hearing keepalive answers and tells its
/// holder at 3/5 of the TTL; Y grants only once etcd is back and has expired
/// X's lease — after that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_etcd_s_holders_are_told_before_anyone_is_granted() {
    let mut etcd = start_etcd(1);
    let (x, y) = two_servers_on(&etcd, "3s");
    let (_holder, guard, wait) = hold_and_wait(x.addr, y.addr, "etcd-frozen").await;

    etcd.freeze(0).unwrap();
    let frozen_at = tokio::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(30), guard.jeopardy())
        .await
        .expect("the holder is told");
    let told_at = tokio::time::Instant::now();
    // Past the TTL, so etcd expires X's lease as soon as it runs again.
    tokio::time::sleep_until(frozen_at + Duration::from_secs(4)).await;
    etcd.thaw(0).unwrap();
    let (granted_at, granted) = wait.await.unwrap();
    assert!(granted.token() > guard.token());
    println!(
        "etcd frozen at 0: holder told after {:?} ({}), Y granted after {:?}",
        told_at - frozen_at,
        guard
            .lost_reason()
            .map_or_else(|| "jeopardy".to_owned(), |r| r.to_string()),
        granted_at - frozen_at
    );
    assert!(
        told_at < granted_at,
        "another holder was granted before the holder was told"
    );
    drop((x, y));
}

/// A three-member etcd cluster, two Clastor servers each on all members,
/// four clients hammering one key; the etcd leader is killed (SIGKILL), a
/// new one is elected, the old one restarts and rejoins — twice. From the
/// holders' own view no two ever overlap, and tokens increase in grant order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_two_holders_overlap_while_the_etcd_leader_is_killed() {
    let mut etcd = start_etcd(3);
    let (x, y) = two_servers_on(&etcd, "3s");
    let stop = tokio_util::sync::CancellationToken::new();
    let workers = hammer(x.addr, y.addr, &stop, Duration::from_millis(5), OnError::Retry);
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let leader = etcd.leader().expect("a leader");
        etcd.kill(leader).unwrap();
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        etcd.restart(leader).unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    stop.cancel();
    let grants = assert_no_overlap(workers, 50).await;
    println!(
        "{} grants across X and Y, the etcd leader killed twice: no overlap, tokens increasing",
        grants
    );
}

/// A lock key deleted by hand (`etcdctl del`): its holder is told at once,
/// `node_deleted`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_deleted_from_outside_is_reported_lost() {
    let etcd = start_etcd(1);
    let (x, _y) = two_servers_on(&etcd, "5s");
    let mut a = Text::connect(x.addr).await;
    let granted = a.cmd("ACQUIRE tx deleted 0").await;
    assert!(granted.starts_with("+ACQUIRED tx deleted token="), "{granted}");
    let out = etcd
        .etcdctl()
        .args(["del", "--prefix", "/clastor/tx/v1/deleted/"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lost = a.line().await.unwrap();
    assert_eq!(
        lost,
        format!("!LOST tx deleted token={} reason=node_deleted", token_of(&granted))
    );
}

/// `etcdctl lock` (Go's `concurrency.Mutex`) and Clastor exclude each other
/// on `{prefix}/{kind}/{version}/{id}`, both ways, and hand over in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_lock_and_clastor_exclude_each_other() {
    etcdctl_lock_excludes("ACQUIRE").await;
}

/// The same with Clastor's shared locks: Go's Mutex waits for a reader's
/// key like any other, and a Clastor reader for Go's key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_lock_and_clastor_readers_exclude_each_other() {
    etcdctl_lock_excludes("ACQUIRE_SHARED").await;
}

async fn etcdctl_lock_excludes(verb: &str) {
    let etcd = start_etcd(1);
    let (x, _y) = two_servers_on(&etcd, "5s");
    let name = clastor::backend::etcd::mutex_name("/clastor", "tx", "v1", "shared");

    // 1. Clastor holds; `etcdctl lock` waits until Clastor releases.
    let mut a = Text::connect(x.addr).await;
    assert!(a.cmd(&format!("{verb} tx shared 0")).await.starts_with("+ACQUIRED"));
    // The command holds until the file `done` appears (etcdctl gives it no stdin).
    let dir = tempfile::tempdir().unwrap();
    let done = dir.path().join("done");
    let script = format!("echo held; while [ ! -e {} ]; do sleep 0.01; done", done.display());
    let mut ctl = tokio::process::Command::from(etcd.etcdctl())
        .args(["lock", &name, "--", "sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = BufReader::new(ctl.stdout.take().unwrap()).lines();
    // It queued behind Clastor's key (two contenders), and does not run.
    let count = || {
        // etcdctl 3.4 has no --count-only: count the keys it lists.
        let out = etcd
            .etcdctl()
            .args(["get", "--prefix", "--keys-only", &format!("{name}/")])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .count()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while count() < 2 {
        assert!(std::time::Instant::now() < deadline, "etcdctl lock never queued");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let early = tokio::time::timeout(Duration::from_millis(300), out.next_line()).await;
    assert!(early.is_err(), "etcdctl lock ran while Clastor held the lock");
    let released_wall = wall_ns();
    assert_eq!(a.cmd("RELEASE tx shared").await, "+RELEASED tx shared");
    let held = tokio::time::timeout(Duration::from_secs(10), out.next_line()).await;
    assert_eq!(held.unwrap().unwrap().as_deref(), Some("held"));
    assert!(wall_ns() > released_wall);

    // 2. `etcdctl lock` holds; Clastor cannot, then is granted when it lets go.
    let refused = a.cmd(&format!("{verb} tx shared 0")).await;
    assert!(refused.starts_with("-TIMEOUT"), "{refused}");
    a.send(&format!("{verb} tx shared 10000")).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while count() < 2 {
        assert!(std::time::Instant::now() < deadline, "Clastor's acquire never queued");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    std::fs::write(&done, b"").unwrap(); // the command exits, etcdctl unlocks
    let granted = tokio::time::timeout(Duration::from_secs(10), a.line())
        .await
        .unwrap()
        .unwrap();
    assert!(granted.starts_with("+ACQUIRED tx shared token="), "{granted}");
    assert!(ctl.wait().await.unwrap().success());
}

/// A lease revoked by hand (`etcdctl lease revoke`): etcd deletes its keys,
/// and the holder of a lock made with it is told at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_revoked_from_outside_is_reported_lost() {
    let etcd = start_etcd(1);
    let (x, _y) = two_servers_on(&etcd, "5s");
    let mut a = Text::connect(x.addr).await;
    let granted = a.cmd("ACQUIRE tx revoked 0").await;
    assert!(granted.starts_with("+ACQUIRED tx revoked token="), "{granted}");
    // The key's lease, from etcd itself.
    let out = etcd
        .etcdctl()
        .args(["get", "--prefix", "/clastor/tx/v1/revoked/", "-w", "json"])
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let lease = json["kvs"][0]["lease"].as_i64().expect("the key has a lease");
    let out = etcd
        .etcdctl()
        .args(["lease", "revoke", &format!("{lease:x}")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lost = a.line().await.unwrap();
    let token = token_of(&granted);
    assert!(
        lost == format!("!LOST tx revoked token={token} reason=node_deleted")
            || lost == format!("!LOST tx revoked token={token} reason=session_expired"),
        "{lost}"
    );
    // The server goes on with a new lease.
    let again = a.cmd("ACQUIRE tx revoked 5000").await;
    assert!(again.starts_with("+ACQUIRED tx revoked token="), "{again}");
    assert!(token_of(&again) > token);
}

/// A lock's whole prefix deleted by hand while one server has a holder and
/// a waiter on it (one lease: both keys go at one revision). The holder is
/// told; the waiter is not granted on its deleted key — it queues again and
/// is granted on a new key that etcd has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_whose_key_goes_with_its_predecessor_s_is_not_granted_on_it() {
    let etcd = start_etcd(1);
    let (x, _y) = two_servers_on(&etcd, "5s");
    let mut holder = Text::connect(x.addr).await;
    let mut waiter = Text::connect(x.addr).await;
    let granted = holder.cmd("ACQUIRE tx wiped 0").await;
    assert!(granted.starts_with("+ACQUIRED tx wiped token="), "{granted}");
    waiter.send("ACQUIRE tx wiped 10000").await;
    let keys = || {
        let out = etcd
            .etcdctl()
            .args(["get", "--prefix", "--keys-only", "/clastor/tx/v1/wiped/"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while keys().len() < 2 {
        assert!(std::time::Instant::now() < deadline, "the waiter never queued");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Both keys, one revision.
    let out = etcd
        .etcdctl()
        .args(["del", "--prefix", "/clastor/tx/v1/wiped/"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lost = holder.line().await.unwrap();
    assert!(
        lost.starts_with("!LOST tx wiped") && lost.ends_with("reason=node_deleted"),
        "{lost}"
    );
    let second = waiter.line().await.unwrap();
    assert!(second.starts_with("+ACQUIRED tx wiped token="), "{second}");
    assert!(token_of(&second) > token_of(&granted));
    // Granted on a key etcd has: the waiter's new one, and only that.
    assert_eq!(keys().len(), 1, "{:?}", keys());
    // And it is a real grant: nobody else gets the lock now.
    let mut other = Text::connect(x.addr).await;
    assert!(other.cmd("ACQUIRE tx wiped 0").await.starts_with("-TIMEOUT"));
}

/// `clastor load --etcd` as `scripts/perf.sh` runs it (short): Clastor, the
/// raw transaction floor, the bare relay, Clastor in library mode and etcd's
/// v3lock all run.
#[test]
fn the_load_harness_runs_every_etcd_series() {
    let etcd = start_etcd(1);
    load_harness_runs(
        "--etcd",
        &etcd.endpoints().join(","),
        &["clastor", "floor", "relay", "library mode", "v3lock"],
    );
}
