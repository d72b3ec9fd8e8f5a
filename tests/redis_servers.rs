//! The Redis backend under faults, the way an operator meets them: `clastor
//! serve` processes on a real Redis (Debian's package, via the testkit), a
//! frozen Redis, a frozen Clastor server, a contender removed by hand with
//! `redis-cli`, two servers hammering one lock (also across a frozen Redis
//! and a frozen server), a Redis restarted without persistence or that
//! forgot its scripts, and readiness following the session's contact.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use clastor_testkit::Redis;
use support::hammer::{OnError, assert_no_overlap, hammer, no_overlap};
use support::process::{Server, load_harness_runs, send_signal};
use support::{Text, token_of};

/// Two `clastor serve` processes X and Y on `redis`, each with a session
/// TTL of `ttl`.
fn two_servers_on(redis: &Redis, ttl: &str) -> (Server, Server) {
    let url = redis.url();
    let args = ["--backend", "redis", "--redis", &url, "--redis-session-ttl", ttl];
    (Server::start(&args), Server::start(&args))
}

fn start_redis() -> Redis {
    Redis::start().expect("start Redis (apt-get install -y redis-server redis-tools)")
}

/// A frozen Clastor server (a long pause, a hung host): its holder's
/// safe-until runs out on the client — jeopardy — before Redis expires the
/// server's session key and the other server grants the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_server_s_holder_is_told_before_another_server_grants() {
    let redis = start_redis();
    let (x, y) = two_servers_on(&redis, "3s");
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
    let granted = granted.unwrap().expect("Y grants once X's session expired");
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

/// Redis frozen: X stops hearing refresh answers and tells its holder at 3/5
/// of the TTL; Y grants only once Redis is back and has expired X's session
/// — after that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_s_holders_are_told_before_anyone_is_granted() {
    let mut redis = start_redis();
    let (x, y) = two_servers_on(&redis, "3s");
    let holder = clastor_client::Client::connect(x.addr).await.unwrap();
    let guard = holder
        .lock("tx", "redis-frozen")
        .try_acquire()
        .await
        .unwrap()
        .expect("free");
    let other = clastor_client::Client::connect(y.addr).await.unwrap();
    let wait = tokio::spawn(async move {
        loop {
            match other
                .lock("tx", "redis-frozen")
                .wait(Duration::from_secs(60))
                .acquire()
                .await
            {
                Ok(Some(g)) => return (tokio::time::Instant::now(), g),
                Ok(None) => panic!("not granted within a minute"),
                // Y's own session is lost while Redis is frozen: try again.
                Err(e) if e.is_retryable() => tokio::time::sleep(Duration::from_millis(100)).await,
                Err(e) => panic!("{e}"),
            }
        }
    });
    // Y's waiter is queued before the freeze.
    let queued = redis
        .cli()
        .args(["ZCARD", "clastor/tx/v1/redis-frozen"])
        .output()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut count = String::from_utf8_lossy(&queued.stdout).trim().to_owned();
    while count != "2" {
        assert!(std::time::Instant::now() < deadline, "Y's waiter never queued");
        tokio::time::sleep(Duration::from_millis(10)).await;
        let out = redis
            .cli()
            .args(["ZCARD", "clastor/tx/v1/redis-frozen"])
            .output()
            .unwrap();
        count = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    }

    redis.freeze().unwrap();
    let frozen_at = tokio::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(30), guard.jeopardy())
        .await
        .expect("the holder is told");
    let told_at = tokio::time::Instant::now();
    // Past the TTL, so X's session key has expired when Redis runs again:
    // the sleep is the fault under test.
    tokio::time::sleep_until(frozen_at + Duration::from_secs(4)).await;
    redis.thaw().unwrap();
    let (granted_at, granted) = wait.await.unwrap();
    assert!(granted.token() > guard.token());
    println!(
        "Redis frozen at 0: holder told after {:?} ({}), Y granted after {:?}",
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

/// Shared locks across two servers, and a reader queued behind a writer
/// whose server froze: readers on X and Y hold together; Y's writer queues
/// behind them, and a reader behind the writer waits for it; with Y frozen,
/// its writer's session expires and the reader behind it gets in (and no
/// sooner than that session could have expired).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_behind_a_frozen_server_s_writer_gets_in_when_its_session_expires() {
    let redis = start_redis();
    let (x, y) = two_servers_on(&redis, "2s");
    let queue = "clastor/tx/v1/rw";
    let zcard = || {
        let out = redis.cli().args(["ZCARD", queue]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse::<u32>().unwrap()
    };
    let until_queued = |n: u32| async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while zcard() != n {
            assert!(tokio::time::Instant::now() < deadline, "never {n} contenders");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let mut r1 = Text::connect(x.addr).await;
    let mut r2 = Text::connect(y.addr).await;
    assert!(r1.cmd("ACQUIRE_SHARED tx rw 0").await.starts_with("+ACQUIRED tx rw"));
    assert!(r2.cmd("ACQUIRE_SHARED tx rw 0").await.starts_with("+ACQUIRED tx rw"));
    let mut w = Text::connect(y.addr).await;
    w.send("ACQUIRE tx rw 60000").await;
    until_queued(3).await;
    let mut r3 = Text::connect(x.addr).await;
    r3.send("ACQUIRE_SHARED tx rw 60000").await;
    until_queued(4).await;
    // The readers ahead leave; the writer gets the lock, the reader behind
    // it still waits.
    assert!(r1.cmd("RELEASE tx rw").await.starts_with("+RELEASED"));
    assert!(r2.cmd("RELEASE tx rw").await.starts_with("+RELEASED"));
    let writer = w.line().await.unwrap();
    assert!(writer.starts_with("+ACQUIRED tx rw"), "{writer}");
    assert_eq!(zcard(), 2, "the reader behind the writer still waits");
    // Y freezes with its writer holding: the reader behind it is granted
    // only once Y's session key could have expired.
    send_signal(y.child.id(), "STOP");
    let frozen_at = tokio::time::Instant::now();
    let granted = tokio::time::timeout(Duration::from_secs(20), r3.line())
        .await
        .expect("the reader gets in after Y's session expires")
        .unwrap();
    let after = frozen_at.elapsed();
    assert!(granted.starts_with("+ACQUIRED tx rw"), "{granted}");
    assert!(token_of(&granted) > token_of(&writer), "tokens increase");
    println!("Y frozen at 0: the reader behind its writer granted after {after:?}");
    assert!(
        after >= Duration::from_millis(1500),
        "granted before Y's session could expire: {after:?}"
    );
    send_signal(y.child.id(), "CONT");
}

/// A contender removed by hand (`redis-cli ZREM`): its holder is told
/// `node_deleted` within a refresh interval (a tenth of the TTL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contender_removed_by_hand_is_reported_lost() {
    let redis = start_redis();
    let (x, _y) = two_servers_on(&redis, "2s");
    let mut a = Text::connect(x.addr).await;
    let granted = a.cmd("ACQUIRE tx removed 0").await;
    assert!(granted.starts_with("+ACQUIRED tx removed token="), "{granted}");
    let queue = clastor::backend::redis::queue_key("clastor", "tx", "v1", "removed");
    let out = redis.cli().args(["ZRANGE", &queue, "0", "-1"]).output().unwrap();
    let member = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        !member.is_empty() && !member.contains('\n'),
        "one contender: {member:?}"
    );
    let removed_at = tokio::time::Instant::now();
    let out = redis.cli().args(["ZREM", &queue, &member]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");
    let lost = tokio::time::timeout(Duration::from_secs(5), a.line())
        .await
        .expect("told within a few refresh intervals")
        .unwrap();
    assert_eq!(
        lost,
        format!("!LOST tx removed token={} reason=node_deleted", token_of(&granted))
    );
    println!("removed by hand at 0: holder told after {:?}", removed_at.elapsed());
}

/// Two Clastor servers on one Redis, four clients hammering one key: from
/// the holders' own view no two ever overlap, tokens increase in grant
/// order, and both servers get the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_two_holders_overlap_across_two_servers() {
    let redis = start_redis();
    let (x, y) = two_servers_on(&redis, "3s");
    let stop = tokio_util::sync::CancellationToken::new();
    let workers = hammer(x.addr, y.addr, &stop, Duration::from_millis(2), OnError::Fail);
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.cancel();
    let grants = assert_no_overlap(workers, 100).await;
    println!(
        "{} grants across X and Y on one Redis: no overlap, tokens increasing",
        grants
    );
    // Nothing left behind once everyone let go.
    let out = redis.cli().args(["EXISTS", "clastor/tx/v1/hammered"]).output().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut left = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    while left != "0" {
        assert!(std::time::Instant::now() < deadline, "the queue was left behind");
        tokio::time::sleep(Duration::from_millis(10)).await;
        let out = redis.cli().args(["EXISTS", "clastor/tx/v1/hammered"]).output().unwrap();
        left = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    }
}

/// Redis killed and restarted empty (no persistence, as the testkit runs
/// it): the holder's server finds its session key gone and tells it
/// `session_expired`; the server opens a new session, reloads its scripts
/// (`NOSCRIPT`) and grants again — with a token from a counter that started
/// over, which is why the README asks for `appendfsync always` when tokens
/// must fence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restarted_without_persistence_tells_holders_and_restarts_tokens() {
    let mut redis = start_redis();
    let (x, _y) = two_servers_on(&redis, "2s");
    let mut a = Text::connect(x.addr).await;
    let mut last = 0;
    for _ in 0..3 {
        let granted = a.cmd("ACQUIRE tx restarted 0").await;
        assert!(granted.starts_with("+ACQUIRED tx restarted token="), "{granted}");
        last = token_of(&granted);
        assert_eq!(a.cmd("RELEASE tx restarted").await, "+RELEASED tx restarted");
    }
    let granted = a.cmd("ACQUIRE tx restarted 0").await;
    let before = token_of(&granted);
    assert!(before > last);

    redis.kill();
    redis.restart().unwrap();
    let lost = tokio::time::timeout(Duration::from_secs(10), a.line())
        .await
        .expect("the holder is told")
        .unwrap();
    assert!(
        lost == format!("!LOST tx restarted token={before} reason=session_expired")
            || lost == format!("!LOST tx restarted token={before} reason=backend_unreachable"),
        "{lost}"
    );
    // A new session, scripts loaded again: granted, with a token from the
    // new, empty Redis.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let after = loop {
        let reply = a.cmd("ACQUIRE tx restarted 0").await;
        if reply.starts_with("+ACQUIRED") {
            break token_of(&reply);
        }
        assert!(std::time::Instant::now() < deadline, "never granted again: {reply}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(after <= before, "the counter started over: {after} after {before}");
    println!("token {before} before the restart, {after} after it");
}

/// Readiness follows the session's contact with Redis: `/readyz` answers
/// 200, then 503 once a frozen Redis has left the session unanswered past
/// 3/5 of its TTL, and 200 again after the thaw; `INFO` and `VERSION` go
/// through the same backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_session_s_contact_with_redis() {
    let mut redis = start_redis();
    let http = support::process::free_port();
    let url = redis.url();
    let x = Server::start(&[
        "--backend",
        "redis",
        "--redis",
        &url,
        "--redis-session-ttl",
        "2s",
        "--http",
        &http.to_string(),
    ]);
    let await_status = |want: u16| async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let got = support::http::get(http, "/readyz").await.status;
            if got == want {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "/readyz still {got}, not {want}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    await_status(200).await;
    let mut a = Text::connect(x.addr).await;
    assert_eq!(a.cmd("INFO").await, "+INFO");
    let info = a.block().await;
    assert!(
        info.iter().any(|l| l.contains("redis_ready") && l.contains("true")),
        "{info:?}"
    );
    let version = a.cmd("VERSION tx").await;
    assert!(version.contains("v1"), "{version}");

    redis.freeze().unwrap();
    let frozen_at = tokio::time::Instant::now();
    await_status(503).await;
    // Not before 3/5 of the TTL without an answer (less the last refresh's age).
    assert!(
        frozen_at.elapsed() >= Duration::from_millis(1_000),
        "not ready after {:?}",
        frozen_at.elapsed()
    );
    redis.thaw().unwrap();
    await_status(200).await;
}

/// Two Clastor servers, four clients hammering one key (5 ms holds); Redis
/// is frozen for 2.5 s mid-way (past 3/5 of the 3 s TTL: every session is
/// lost and opened again), then one Clastor server is frozen for 4 s (past
/// its whole TTL: its session key expires while it sleeps, and it finds it
/// gone when it wakes). From the holders' own view no two ever overlap, and
/// tokens increase in grant order: the exclusion Redis keeps holds across
/// both faults and the sessions they cost. (A holder's own timing under a
/// freeze — told before anyone else is granted — is the subject of
/// `a_frozen_server_s_holder_…` and `a_frozen_redis_s_holders_…`: here a
/// hold ends 5 ms after its grant, whatever happens to its server.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_two_holders_overlap_in_a_two_server_hammer_across_freezes() {
    let mut redis = start_redis();
    let (x, y) = two_servers_on(&redis, "3s");
    let stop = tokio_util::sync::CancellationToken::new();
    let workers = hammer(x.addr, y.addr, &stop, Duration::from_millis(5), OnError::Retry);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    redis.freeze().unwrap();
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    redis.thaw().unwrap();
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    send_signal(x.child.id(), "STOP");
    tokio::time::sleep(Duration::from_millis(4_000)).await;
    send_signal(x.child.id(), "CONT");
    let woke = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    stop.cancel();
    let beliefs = no_overlap(workers, 50).await;
    // Both servers came back: each granted again after X woke.
    for server in ['x', 'y'] {
        assert!(
            beliefs.iter().any(|b| b.server == server && b.from > woke),
            "{server} granted nothing after X woke"
        );
    }
    println!(
        "{} grants across X and Y, Redis frozen for 2.5 s, then X for 4 s: no overlap, tokens increasing; both granted after",
        beliefs.len()
    );
}

/// `clastor load --redis` as `scripts/perf.sh` runs it (short): Clastor, the
/// `SET NX PX` + `DEL` floor, the bare relay, Clastor's own scripts sent
/// straight to Redis, the minimal fenced lock through the relay, Clastor in
/// library mode and the plain Redis lock all run.
#[test]
fn the_load_harness_runs_every_redis_series() {
    let redis = start_redis();
    load_harness_runs(
        "--redis",
        &redis.url(),
        &[
            "clastor",
            "floor",
            "scripts alone",
            "relay",
            "minimal fenced lock",
            "library mode",
            "plain Redis lock",
        ],
    );
}

/// A Redis that forgot Clastor's scripts (`SCRIPT FLUSH`, as after a restart
/// or a failover): the hot path's scripts (acquire, a waiter's look,
/// release) are loaded again on their `NOSCRIPT` and sent again, and the
/// lock works on — a waiter queued behind the holder is granted on release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_forgotten_by_redis_are_loaded_again() {
    let redis = start_redis();
    let (x, _y) = two_servers_on(&redis, "3s");
    let mut a = Text::connect(x.addr).await;
    let mut b = Text::connect(x.addr).await;
    let flush = || {
        let out = redis.cli().args(["SCRIPT", "FLUSH"]).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "OK");
    };
    flush();
    let first = a.cmd("ACQUIRE tx forgotten 0").await;
    assert!(first.starts_with("+ACQUIRED tx forgotten token="), "{first}");
    b.send("ACQUIRE tx forgotten 30000").await;
    // The waiter's first look may come before or after this flush; the
    // release after it meets a Redis without scripts either way.
    flush();
    assert_eq!(a.cmd("RELEASE tx forgotten").await, "+RELEASED tx forgotten");
    let second = tokio::time::timeout(Duration::from_secs(10), b.line())
        .await
        .expect("the waiter is granted on release")
        .unwrap();
    assert!(second.starts_with("+ACQUIRED tx forgotten token="), "{second}");
    assert!(token_of(&second) > token_of(&first));
    flush();
    assert_eq!(b.cmd("RELEASE tx forgotten").await, "+RELEASED tx forgotten");
    let out = redis
        .cli()
        .args(["EXISTS", "clastor/tx/v1/forgotten"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0", "nothing left behind");
}
