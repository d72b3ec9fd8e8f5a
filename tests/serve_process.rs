//! `clastor serve` as a process, the way an operator runs it: on the memory
//! backend and on a real ZooKeeper, driven through the text form; graceful
//! shutdown on SIGTERM; a clear error when ZooKeeper cannot be reached.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clastor_testkit::ZooKeeper;
use support::process::{Server, free_port, send_signal, wall_ns};
use support::{Text, token_of};

/// Two connections: a grant, a refusal by timeout, a hand-over on close.
async fn exercise(addr: SocketAddr) {
    let mut a = Text::connect(addr).await;
    let mut b = Text::connect(addr).await;
    let granted = a.cmd("ACQUIRE transaction tx-1 1000").await;
    assert!(granted.starts_with("+ACQUIRED transaction tx-1 token="), "{granted}");
    let t0 = Instant::now();
    assert!(b.cmd("ACQUIRE transaction tx-1 200").await.starts_with("-TIMEOUT"));
    assert!(t0.elapsed() >= Duration::from_millis(200));
    b.send("ACQUIRE transaction tx-1 10000").await;
    drop(a);
    let handed = b.line().await.unwrap();
    assert!(handed.starts_with("+ACQUIRED transaction tx-1 token="), "{handed}");
    assert!(token_of(&handed) > token_of(&granted));
    assert_eq!(b.cmd("RELEASE transaction tx-1").await, "+RELEASED transaction tx-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_on_the_memory_backend_and_stops_on_sigterm() {
    // One worker thread: the whole server on one thread still serves and stops.
    let server = tokio::task::spawn_blocking(|| Server::start(&["--worker-threads", "1"]))
        .await
        .unwrap();
    exercise(server.addr).await;
    let mut holder = Text::connect(server.addr).await;
    assert!(holder.cmd("ACQUIRE k i").await.starts_with("+ACQUIRED"));
    tokio::task::spawn_blocking(move || server.terminate()).await.unwrap();
    assert!(holder.line().await.unwrap().starts_with("!LOST k i token="));
    assert!(holder.line().await.unwrap().starts_with("!CLOSING SHUTTING_DOWN"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_on_zookeeper() {
    let (zk, server) = tokio::task::spawn_blocking(|| {
        let zk = ZooKeeper::start().expect("start ZooKeeper (apt-get install -y zookeeper)");
        let server = Server::start(&[
            "--backend",
            "zookeeper",
            "--zk",
            &zk.connect_string(),
            "--zk-sessions",
            "2",
        ]);
        (zk, server)
    })
    .await
    .unwrap();
    exercise(server.addr).await;
    let mut c = Text::connect(server.addr).await;
    assert_eq!(
        c.cmd("VERSION transaction").await,
        "+VERSION transaction version=v1 mode=normal layout=mutex"
    );
    assert_eq!(c.cmd("INFO").await, "+INFO");
    assert!(c.block().await.iter().any(|l| l == "backend=zookeeper"));
    tokio::task::spawn_blocking(move || server.terminate()).await.unwrap();
    drop(zk);
}

#[test]
fn unreachable_zookeeper_is_a_clear_startup_error() {
    let dead = free_port();
    let out = Command::new(env!("CARGO_BIN_EXE_clastor"))
        .args(["serve", "--listen", &free_port().to_string(), "--backend", "zookeeper"])
        .args(["--zk", &dead.to_string(), "--zk-session-timeout", "2s"])
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot use ZooKeeper at"), "{stderr}");
}

#[test]
fn zookeeper_backend_needs_a_connect_string() {
    let out = Command::new(env!("CARGO_BIN_EXE_clastor"))
        .args(["serve", "--listen", &free_port().to_string(), "--backend", "zookeeper"])
        .env_remove("CLASTOR_ZK")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--zk"));
}

/// A ZooKeeper with a 500 ms tick, and two `clastor serve` processes X and Y
/// on it, each with one ZooKeeper session of `session_timeout`.
fn two_servers_on_zookeeper(session_timeout: &str) -> (ZooKeeper, Server, Server) {
    let zk = ZooKeeper::builder()
        .tick_time(Duration::from_millis(500))
        .start()
        .expect("start ZooKeeper (apt-get install -y zookeeper)");
    let connect = zk.connect_string();
    let args = [
        "--backend",
        "zookeeper",
        "--zk",
        &connect,
        "--zk-session-timeout",
        session_timeout,
        "--zk-sessions",
        "1",
    ];
    let (x, y) = (Server::start(&args), Server::start(&args));
    (zk, x, y)
}

/// A holder of `tx/{id}` through the server at `holder_at`, and a waiter for
/// it through `waiter_at` that tries again after failures that may pass (its
/// server losing its own ZooKeeper session). The waiter's task answers when,
/// and with what, it was granted. The holder's client must be kept alive.
async fn hold_and_wait(
    holder_at: SocketAddr,
    waiter_at: SocketAddr,
    id: &'static str,
) -> (
    clastor_client::Client,
    clastor_client::LockGuard,
    tokio::task::JoinHandle<(tokio::time::Instant, clastor_client::LockGuard)>,
) {
    let holder = clastor_client::Client::connect(holder_at).await.unwrap();
    let guard = holder.lock("tx", id).try_acquire().await.unwrap().expect("free");
    let other = clastor_client::Client::connect(waiter_at).await.unwrap();
    let wait = tokio::spawn(async move {
        loop {
            match other.lock("tx", id).wait(Duration::from_secs(60)).acquire().await {
                Ok(Some(g)) => return (tokio::time::Instant::now(), g),
                Ok(None) => panic!("not granted within a minute"),
                Err(e) if e.is_retryable() => tokio::time::sleep(Duration::from_millis(100)).await,
                Err(e) => panic!("{e}"),
            }
        }
    });
    (holder, guard, wait)
}

/// The safe-until promise, end to end, when a server freezes (what a long
/// pause, a hung host or a cut network to ZooKeeper look like): two servers
/// X and Y on one ZooKeeper; locks held through X by a Rust client and by
/// `clastor lock`; waiters on Y. X is frozen with SIGSTOP. ZooKeeper expires
/// X's session and Y grants, but only after the Rust holder's guard fell into
/// jeopardy and the command under `clastor lock` got its SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_server_s_holders_are_told_before_another_server_grants() {
    let (_zk, x, y) = two_servers_on_zookeeper("4s");

    // The Rust holder, without a keepalive: only safe-until speaks here.
    let holder = clastor_client::Client::builder(x.addr)
        .keepalive(None)
        .connect()
        .await
        .unwrap();
    let guard = holder
        .lock("tx", "frozen-a")
        .try_acquire()
        .await
        .unwrap()
        .expect("free");
    let window = guard.safe_until().expect("a version 2 server states safe-until");
    assert!(window > tokio::time::Instant::now());

    // The command under `clastor lock` notes when it gets SIGTERM.
    let dir = tempfile::tempdir().unwrap();
    let termed = dir.path().join("termed");
    let script = format!(
        "trap 'date +%s%N > {}; exit 0' TERM; echo running; while :; do sleep 0.02; done",
        termed.display()
    );
    let mut lock = tokio::process::Command::new(env!("CARGO_BIN_EXE_clastor"))
        .args([
            "lock",
            "tx",
            "frozen-b",
            "--server",
            &x.addr.to_string(),
            "--grace",
            "300ms",
        ])
        .args(["--", "sh", "-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = tokio::io::BufReader::new(lock.stdout.take().unwrap());
    let mut line = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut out, &mut line)
        .await
        .unwrap();
    assert_eq!(line.trim(), "running", "the command runs under the lock");

    let other = clastor_client::Client::connect(y.addr).await.unwrap();
    let wait_a = {
        let other = other.clone();
        tokio::spawn(async move {
            let g = other
                .lock("tx", "frozen-a")
                .wait(Duration::from_secs(60))
                .acquire()
                .await;
            (wall_ns(), tokio::time::Instant::now(), g)
        })
    };
    let wait_b = {
        let other = other.clone();
        tokio::spawn(async move {
            let g = other
                .lock("tx", "frozen-b")
                .wait(Duration::from_secs(60))
                .acquire()
                .await;
            (wall_ns(), g)
        })
    };

    send_signal(x.child.id(), "STOP");
    let frozen_at = tokio::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(30), guard.jeopardy())
        .await
        .expect("the holder falls into jeopardy");
    let jeopardy_at = tokio::time::Instant::now();
    assert!(!guard.is_safe());

    let (_, granted_at, granted) = wait_a.await.unwrap();
    let granted = granted.unwrap().expect("Y grants once X's session expired");
    assert!(granted.token() > guard.token());
    let (granted_b_wall, granted_b) = wait_b.await.unwrap();
    assert!(granted_b.unwrap().is_some());
    let termed_wall: u128 = std::fs::read_to_string(&termed)
        .expect("the command got SIGTERM")
        .trim()
        .parse()
        .unwrap();

    let margin = granted_at.saturating_duration_since(jeopardy_at);
    let margin_b = Duration::from_nanos(u64::try_from(granted_b_wall.saturating_sub(termed_wall)).unwrap());
    println!(
        "frozen at 0; jeopardy after {:?}, Y granted after {:?}: margin {margin:?}; \
         clastor lock's SIGTERM {margin_b:?} before Y's grant",
        jeopardy_at - frozen_at,
        granted_at - frozen_at
    );
    assert!(
        jeopardy_at < granted_at,
        "jeopardy came after another holder was granted"
    );
    assert!(
        termed_wall < granted_b_wall,
        "SIGTERM came after another holder was granted"
    );
    // SIGKILL after the grace would also have landed before: the grace fits.
    assert!(margin_b > Duration::from_millis(300), "{margin_b:?}");

    send_signal(x.child.id(), "CONT");
    drop(lock);
}

/// One holder's belief: from the grant's arrival to the moment it stopped
/// trusting the lock (it began to release, or fell into jeopardy first).
#[derive(Debug, Clone, Copy)]
struct Belief {
    token: u64,
    from: tokio::time::Instant,
    until: tokio::time::Instant,
    server: char,
}

/// Contends for one key through a client of `server` until `stop`,
/// recording every belief.
async fn contend(addr: SocketAddr, server: char, stop: tokio_util::sync::CancellationToken) -> Vec<Belief> {
    let client = clastor_client::Client::builder(addr)
        .keepalive(None)
        .connect_timeout(Duration::from_secs(1))
        .request_timeout(Some(Duration::from_secs(3)))
        .connect()
        .await
        .unwrap();
    let mut beliefs = Vec::new();
    while !stop.is_cancelled() {
        let guard = match client
            .lock("tx", "checked")
            .wait(Duration::from_secs(2))
            .acquire()
            .await
        {
            Ok(Some(guard)) => guard,
            Ok(None) => continue,
            // The server is frozen or between ZooKeeper sessions: try again.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let from = tokio::time::Instant::now();
        // Work for a while, unless the lock falls into jeopardy first. X's
        // holders work longer than X's session lives once frozen, so only
        // their jeopardy can end their belief in time.
        let work = if server == 'x' {
            Duration::from_secs(5)
        } else {
            Duration::from_millis(40)
        };
        let until = tokio::select! {
            () = tokio::time::sleep(work) => tokio::time::Instant::now(),
            () = guard.jeopardy() => tokio::time::Instant::now(),
        };
        beliefs.push(Belief {
            token: guard.token(),
            from,
            until,
            server,
        });
        let _ = tokio::time::timeout(Duration::from_secs(1), guard.release()).await;
    }
    beliefs
}

/// The overlap checker across two servers, one of them frozen and thawed
/// again and again: counted from the holders' own view (a belief ends at its
/// jeopardy signal), no two holders ever overlap, and tokens increase in
/// grant order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_two_holders_overlap_while_a_server_is_frozen_and_thawed() {
    let (_zk, x, y) = two_servers_on_zookeeper("3s");
    let stop = tokio_util::sync::CancellationToken::new();
    let workers: Vec<_> = [(x.addr, 'x'), (x.addr, 'x'), (y.addr, 'y'), (y.addr, 'y')]
        .into_iter()
        .map(|(addr, name)| tokio::spawn(contend(addr, name, stop.clone())))
        .collect();
    let pid = x.child.id();
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        send_signal(pid, "STOP");
        // Longer than the session timeout: ZooKeeper expires X's session.
        tokio::time::sleep(Duration::from_millis(4_000)).await;
        send_signal(pid, "CONT");
    }
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    stop.cancel();
    let mut beliefs = Vec::new();
    for w in workers {
        beliefs.extend(w.await.unwrap());
    }
    beliefs.sort_by_key(|b| b.from);
    let servers: std::collections::HashSet<char> = beliefs.iter().map(|b| b.server).collect();
    assert!(
        servers.len() == 2 && beliefs.len() > 10,
        "too little contention: {beliefs:?}"
    );
    for pair in beliefs.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        assert!(a.until <= b.from, "two holders at once: {a:?} and {b:?}");
        assert!(b.token > a.token, "tokens not increasing: {a:?} then {b:?}");
    }
    println!(
        "{} grants across X and Y, X frozen twice past its session timeout: no overlap",
        beliefs.len()
    );
}

/// The whole ZooKeeper frozen: X, alive, stops hearing from the leader and
/// tells its holder the lock is lost (at 3/5 of the session timeout); the
/// holder's guard knows before Y, once ZooKeeper is back and has expired X's
/// session, grants the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_zookeeper_s_holders_are_told_before_anyone_is_granted() {
    let (mut zk, x, y) = two_servers_on_zookeeper("4s");
    // Y's own session goes too while ZooKeeper is frozen: its wait fails
    // (retryably), and is tried again.
    let (_holder, guard, wait) = hold_and_wait(x.addr, y.addr, "zk-frozen").await;

    zk.freeze(0).unwrap();
    let frozen_at = tokio::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(30), guard.jeopardy())
        .await
        .expect("the holder is told");
    let told_at = tokio::time::Instant::now();
    // Keep ZooKeeper frozen past the session timeout, then let it expire X's session.
    tokio::time::sleep_until(frozen_at + Duration::from_secs(5)).await;
    zk.thaw(0).unwrap();
    let (granted_at, granted) = wait.await.unwrap();
    assert!(granted.token() > guard.token());
    println!(
        "ZooKeeper frozen at 0: holder told after {:?} ({}), Y granted after {:?}",
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
}

/// In a three-node ensemble, the follower X's session goes through is
/// frozen: X (its only ZooKeeper address is that follower) stops hearing
/// from the leader and tells its holder; Y, on the leader, is granted the
/// lock only once the leader expired X's session, after that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_follower_s_holders_are_told_before_anyone_is_granted() {
    let mut zk = ZooKeeper::builder()
        .nodes(3)
        .tick_time(Duration::from_millis(500))
        .start()
        .expect("start a ZooKeeper ensemble (apt-get install -y zookeeper)");
    let leader = zk.leader().expect("a leader");
    let follower = (0..3).find(|&i| i != leader).unwrap();
    let server = |node: usize| {
        Server::start(&[
            "--backend",
            "zookeeper",
            "--zk",
            &zk.addr(node).to_string(),
            "--zk-session-timeout",
            "4s",
            "--zk-sessions",
            "1",
        ])
    };
    let (x, y) = (server(follower), server(leader));
    let (_holder, guard, wait) = hold_and_wait(x.addr, y.addr, "follower").await;

    zk.freeze(follower).unwrap();
    let frozen_at = tokio::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(30), guard.jeopardy())
        .await
        .expect("the holder is told");
    let told_at = tokio::time::Instant::now();
    let (granted_at, granted) = wait.await.unwrap();
    assert!(granted.token() > guard.token());
    println!(
        "follower frozen at 0: holder told after {:?}, Y granted after {:?}",
        told_at - frozen_at,
        granted_at - frozen_at
    );
    assert!(
        told_at < granted_at,
        "another holder was granted before the holder was told"
    );
    zk.thaw(follower).unwrap();
}

/// Runs `clastor rotate ARGS --server ADDR --json` to the end: its exit
/// status and the JSON lines it printed.
async fn rotate_cli(addr: SocketAddr, args: &[&str]) -> (std::process::ExitStatus, Vec<serde_json::Value>) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_clastor"))
        .arg("rotate")
        .args(args)
        .args(["--server", &addr.to_string(), "--json"])
        .stderr(Stdio::inherit())
        .output()
        .await
        .unwrap();
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    (out.status, lines)
}

/// Rotation as operators run it, with `clastor rotate`, through faults: a
/// rotation started while the server holding a lock of the kind is frozen
/// completes once ZooKeeper expires that server's session (its holder hears
/// of it first); a rotation tool killed mid-drain leaves the kind draining,
/// and running it again resumes and completes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_survives_a_frozen_server_and_a_killed_tool() {
    let (_zk, x, y) = two_servers_on_zookeeper("4s");

    // A lock of the kind held through X; then X freezes.
    let holder = clastor_client::Client::builder(x.addr)
        .keepalive(None)
        .connect()
        .await
        .unwrap();
    let frozen_guard = holder
        .lock("rot", "held-on-x")
        .try_acquire()
        .await
        .unwrap()
        .expect("free");
    send_signal(x.child.id(), "STOP");
    // Through Y: refused while X holds, as expected.
    let (status, lines) = rotate_cli(y.addr, &["rot", "v2", "v3"]).await;
    assert_eq!(status.code(), Some(1), "{lines:?}");
    assert!(lines[0]["error"]["status"] == "ROTATION_REFUSED", "{lines:?}");
    let started = tokio::time::Instant::now();
    let (status, lines) = rotate_cli(y.addr, &["rot", "v1", "v2", "--drain-timeout", "40s"]).await;
    assert!(status.success(), "rotation did not complete: {lines:?}");
    let first = &lines[0];
    assert_eq!(first["status"], "PROGRESS");
    assert_eq!(first["remaining"], 1, "the frozen server's lock is counted: {first}");
    assert!(
        first["holders"][0]["holder"]
            .as_str()
            .unwrap()
            .contains("clastor owner="),
        "its holder is named: {first}"
    );
    let last = lines.last().unwrap();
    assert_eq!(last["status"], "ROTATED");
    assert_eq!(last["to"], "v2");
    // It waited for ZooKeeper to expire X's session, and X's holder was in
    // jeopardy by then (its safe-until ran out).
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "switched before the session expired"
    );
    assert!(
        !frozen_guard.is_safe(),
        "the frozen server's holder still believes it is safe"
    );
    send_signal(x.child.id(), "CONT");

    // A tool killed mid-drain: the kind stays draining; a second run resumes.
    let c = clastor_client::Client::connect(y.addr).await.unwrap();
    let held = c.lock("rot", "held-on-y").try_acquire().await.unwrap().expect("free");
    assert_eq!(held.version(), "v2");
    let mut tool = tokio::process::Command::new(env!("CARGO_BIN_EXE_clastor"))
        .args(["rotate", "rot", "v2", "v3", "--drain-timeout", "30s", "--json"])
        .args(["--server", &y.addr.to_string()])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = tokio::io::BufReader::new(tool.stdout.take().unwrap());
    let mut line = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut out, &mut line)
        .await
        .unwrap();
    assert!(line.contains("\"PROGRESS\""), "{line}");
    tool.kill().await.unwrap();
    let v = c.version("rot").await.unwrap();
    assert_eq!((v.version.as_str(), v.mode), ("v2", clastor_client::KindMode::Draining));
    let drain = v.drain.expect("a version 2 VERSION reports the drain");
    assert_eq!((drain.to.as_str(), drain.remaining), ("v3", 1));
    // New acquires wait meanwhile; the holder still holds.
    let waiter = {
        let c = c.clone();
        tokio::spawn(async move { c.lock("rot", "new").wait(Duration::from_secs(60)).acquire().await })
    };
    let y_addr = y.addr;
    let resumed = tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (status, lines) = rotate_cli(y_addr, &["rot", "v2", "v3", "--drain-timeout", "60s"]).await;
            // The killed tool's server lets go of its claim a moment after.
            let in_progress = lines.first().is_some_and(|l| {
                l["error"]["status"] == "ROTATION_REFUSED"
                    && l["error"]["message"]
                        .as_str()
                        .unwrap_or_default()
                        .contains("in progress")
            });
            if !in_progress || tokio::time::Instant::now() > deadline {
                return (status, lines);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    // The resumed rotation set a new deadline (60 s, where the killed one's
    // was 30 s) and counts the same lock.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while c
        .version("rot")
        .await
        .unwrap()
        .drain
        .is_none_or(|d| d.remaining != 1 || d.left_ms < 31_000)
    {
        assert!(tokio::time::Instant::now() < deadline, "the rotation was not resumed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!waiter.is_finished(), "granted while draining");
    assert!(held.is_safe(), "the holder was never told to stop");
    held.release().await.unwrap();
    let (status, lines) = resumed.await.unwrap();
    assert!(status.success(), "resumed rotation: {lines:?}");
    assert_eq!(lines.last().unwrap()["to"], "v3");
    let g = waiter.await.unwrap().unwrap().expect("granted after the switch");
    assert_eq!(g.version(), "v3");
    drop(y);
    drop(x);
}
