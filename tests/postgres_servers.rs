//! The PostgreSQL backend under faults, the way an operator meets them:
//! `clastor serve` processes on a real PostgreSQL 15 (Debian's package, via
//! the testkit), a frozen Clastor server, a frozen database (every one of
//! its processes), a lock row deleted by hand, a two-server hammer across a
//! database freeze, and a bad URL at startup.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use clastor_testkit::Postgres;
use support::hammer::{OnError, assert_no_overlap, hammer, hold_and_wait};
use support::process::{Server, free_port, load_harness_runs, send_signal};
use support::{Text, token_of};

/// Two `clastor serve` processes X and Y on `pg`, with server rows of `ttl`.
fn two_servers_on(pg: &Postgres, ttl: &str) -> (Server, Server) {
    let url = pg.url();
    let args = [
        "--backend",
        "postgres",
        "--pg",
        &url,
        "--pg-ttl",
        ttl,
        "--pg-connections",
        "2",
    ];
    (Server::start(&args), Server::start(&args))
}

fn start_postgres() -> Postgres {
    Postgres::start().expect("start PostgreSQL (apt-get install -y postgresql)")
}

/// A frozen Clastor server (a long pause, a hung host): its holder's
/// safe-until runs out on the client — jeopardy — before the server's row
/// expires in the database and the other server grants the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_server_s_holder_is_told_before_another_server_grants() {
    let pg = start_postgres();
    let (x, y) = two_servers_on(&pg, "3s");
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
    let granted = granted.unwrap().expect("Y grants once X's row expired");
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
    // X's own rows were not deleted by X: Y passed over them by the
    // database's clock (and reaped them).
    send_signal(x.child.id(), "CONT");
}

/// The whole database frozen (the postmaster and every backend): X stops
/// hearing heartbeat answers and tells its holder at 3/5 of the TTL; Y
/// grants only once the database runs again and X's row has expired by its
/// clock — after that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_database_s_holders_are_told_before_anyone_is_granted() {
    let mut pg = start_postgres();
    let (x, y) = two_servers_on(&pg, "3s");
    let (_holder, guard, wait) = hold_and_wait(x.addr, y.addr, "db-frozen").await;

    pg.freeze().unwrap();
    let frozen_at = tokio::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(30), guard.jeopardy())
        .await
        .expect("the holder is told");
    let told_at = tokio::time::Instant::now();
    // Past the TTL, so X's row has expired by the database's clock when it
    // runs again.
    tokio::time::sleep_until(frozen_at + Duration::from_secs(4)).await;
    pg.thaw().unwrap();
    let (granted_at, granted) = wait.await.unwrap();
    assert!(granted.token() > guard.token());
    println!(
        "PostgreSQL frozen at 0: holder told after {:?} ({}), Y granted after {:?}",
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

/// Two Clastor servers, four clients hammering one key; the database is
/// frozen for 2.5 s mid-way (past 3/5 of the TTL: every session is lost and
/// registered again). From the holders' own view no two ever overlap, and
/// tokens increase in grant order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_two_holders_overlap_in_a_two_server_hammer_across_a_database_freeze() {
    let mut pg = start_postgres();
    let (x, y) = two_servers_on(&pg, "3s");
    let stop = tokio_util::sync::CancellationToken::new();
    let workers = hammer(x.addr, y.addr, &stop, Duration::from_millis(5), OnError::Retry);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    pg.freeze().unwrap();
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    pg.thaw().unwrap();
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    stop.cancel();
    let grants = assert_no_overlap(workers, 50).await;
    println!(
        "{} grants across X and Y, the database frozen for 2.5 s: no overlap, tokens increasing",
        grants
    );
}

/// A lock row deleted by hand (`DELETE FROM clastor.contenders …`): its
/// holder is told `node_deleted` at the server's next heartbeat. Then a
/// clean shutdown leaves nothing of the server behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_deleted_by_hand_is_reported_lost() {
    let pg = start_postgres();
    let (x, _y) = two_servers_on(&pg, "3s");
    let mut a = Text::connect(x.addr).await;
    let granted = a.cmd("ACQUIRE tx deleted 0").await;
    assert!(granted.starts_with("+ACQUIRED tx deleted token="), "{granted}");
    let out = pg
        .psql()
        .args([
            "-c",
            "DELETE FROM clastor.contenders WHERE kind = 'tx' AND id = 'deleted'",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let deleted_at = tokio::time::Instant::now();
    let lost = tokio::time::timeout(Duration::from_secs(5), a.line())
        .await
        .expect("told within a few heartbeats")
        .unwrap();
    assert_eq!(
        lost,
        format!("!LOST tx deleted token={} reason=node_deleted", token_of(&granted))
    );
    println!("row deleted at 0: holder told after {:?}", deleted_at.elapsed());
    // The lock is free for others at once.
    let mut b = Text::connect(x.addr).await;
    assert!(b.cmd("ACQUIRE tx deleted 0").await.starts_with("+ACQUIRED"));
    // A clean shutdown (SIGTERM) leaves neither X's row nor its locks.
    x.terminate();
    let count = |sql: &str| {
        let out = pg.psql().args(["-c", sql]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(count("SELECT count(*) FROM clastor.contenders"), "0");
    assert_eq!(
        count("SELECT count(*) FROM clastor.servers"),
        "1",
        "only Y's row is left"
    );
}

/// A schema of version 1 (before shared locks: no `contenders.shared`, the
/// 8-argument `acquire`) is brought up to version 2 by the next server to
/// start, and shared locks work across servers on it: readers on X and Y
/// hold together, a writer waits for both, and a reader queued behind the
/// writer waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_schema_is_upgraded_and_readers_share_across_servers() {
    let pg = start_postgres();
    let psql = |sql: &str| {
        let out = pg.psql().args(["-c", sql]).output().unwrap();
        assert!(out.status.success(), "{sql}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let (x, y) = two_servers_on(&pg, "3s");
    x.terminate();
    y.terminate();
    psql(
        "DROP FUNCTION clastor.acquire(text, text, text, bigint, bigint, text, bigint, boolean, boolean);
         ALTER TABLE clastor.contenders DROP COLUMN shared;
         UPDATE clastor.meta SET value = '1' WHERE key = 'schema';",
    );
    let (x, y) = two_servers_on(&pg, "3s");
    assert_eq!(psql("SELECT value FROM clastor.meta WHERE key = 'schema'"), "2");
    let mut r1 = Text::connect(x.addr).await;
    let mut r2 = Text::connect(y.addr).await;
    let mut w = Text::connect(x.addr).await;
    let mut r3 = Text::connect(y.addr).await;
    assert!(r1.cmd("ACQUIRE_SHARED tx rw 0").await.starts_with("+ACQUIRED tx rw"));
    assert!(r2.cmd("ACQUIRE_SHARED tx rw 0").await.starts_with("+ACQUIRED tx rw"));
    assert_eq!(
        psql("SELECT count(*) FROM clastor.contenders WHERE id = 'rw' AND shared"),
        "2"
    );
    let refused = w.cmd("ACQUIRE tx rw 0").await;
    assert!(
        refused.starts_with("-TIMEOUT tx rw"),
        "a writer is refused while readers hold: {refused}"
    );
    // A writer in the queue, then a reader behind it: the reader waits too.
    w.send("ACQUIRE tx rw 20000").await;
    wait_for_rows(&psql, "SELECT count(*) FROM clastor.contenders WHERE id = 'rw'", "3").await;
    r3.send("ACQUIRE_SHARED tx rw 20000").await;
    wait_for_rows(&psql, "SELECT count(*) FROM clastor.contenders WHERE id = 'rw'", "4").await;
    assert!(r1.cmd("RELEASE tx rw").await.starts_with("+RELEASED"));
    assert!(r2.cmd("RELEASE tx rw").await.starts_with("+RELEASED"));
    let granted = w.line().await.unwrap();
    assert!(granted.starts_with("+ACQUIRED tx rw"), "{granted}");
    assert_eq!(
        psql("SELECT count(*) FROM clastor.contenders WHERE id = 'rw'"),
        "2",
        "the reader behind the writer still waits"
    );
    assert!(w.cmd("RELEASE tx rw").await.starts_with("+RELEASED"));
    let granted = r3.line().await.unwrap();
    assert!(granted.starts_with("+ACQUIRED tx rw"), "{granted}");
}

/// Polls `sql` until it prints `want` (rows the servers insert).
async fn wait_for_rows(psql: &impl Fn(&str) -> String, sql: &str, want: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if psql(sql) == want {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{sql} never gave {want}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `clastor load --pg` as `scripts/perf.sh` runs it (short): Clastor, the
/// raw SQL floor, the bare relay, Clastor's own SQL functions called
/// directly, Clastor in library mode and `pg_advisory_lock` all run against
/// the current schema.
#[test]
fn the_load_harness_runs_every_postgres_series() {
    let pg = start_postgres();
    load_harness_runs(
        "--pg",
        &pg.url(),
        &[
            "clastor",
            "floor",
            "SQL alone",
            "relay",
            "library mode",
            "pg_advisory_lock",
        ],
    );
}

/// `serve` with a database it cannot reach fails at startup, naming the
/// URL without its password.
#[test]
fn serve_fails_at_startup_naming_the_database_without_its_password() {
    let closed = free_port();
    let url = format!("postgres://clastor:hunter2@{closed}/locks");
    let out = Command::new(env!("CARGO_BIN_EXE_clastor"))
        .args([
            "serve",
            "--listen",
            &free_port().to_string(),
            "--backend",
            "postgres",
            "--pg",
            &url,
        ])
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "serve started without its database: {stderr}");
    assert!(
        stderr.contains(&format!("postgres://clastor:***@{closed}/locks")),
        "the database is not named: {stderr}"
    );
    assert!(!stderr.contains("hunter2"), "the password is shown: {stderr}");
    // Without --pg at all: a message saying what is missing.
    let out = Command::new(env!("CARGO_BIN_EXE_clastor"))
        .args(["serve", "--listen", &free_port().to_string(), "--backend", "postgres"])
        .env_remove("CLASTOR_PG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--backend postgres needs --pg URL"));
}

/// The plans PostgreSQL makes for Clastor's `acquire()` and `release()`,
/// nested statements included (auto_explain, sent to the client as
/// notices), on a fresh connection set up with `settings`.
async fn lock_path_plans(url: &str, server: i64, settings: &str) -> String {
    use futures_util::StreamExt as _;
    let (db, mut connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notice(n) = m {
                let _ = tx.send(n.message().to_owned());
            }
        }
    });
    db.batch_execute(settings).await.unwrap();
    db.batch_execute(
        "LOAD 'auto_explain';
         SET auto_explain.log_min_duration = 0;
         SET auto_explain.log_nested_statements = on;
         SET client_min_messages = log;",
    )
    .await
    .unwrap();
    let row = db
        .query_one(
            "SELECT seq, head FROM clastor.acquire('tx', 'v1', 'bloat', $1, 1, 'test', 0, false, false)",
            &[&server],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<i64>>(0), row.get::<_, Option<i64>>(1), "granted");
    let released: bool = db
        .query_one("SELECT clastor.release($1, 1)", &[&server])
        .await
        .unwrap()
        .get(0);
    assert!(released);
    drop(db);
    driver.await.unwrap();
    let mut plans = String::new();
    while let Ok(p) = rx.try_recv() {
        plans.push_str(&p);
        plans.push('\n');
    }
    assert!(plans.contains("contenders"), "auto_explain sent the plans: {plans}");
    plans
}

/// A lock table bloated by bursts (thousands of rows gone, one left,
/// vacuumed, then a bigger burst gone) has statistics saying "a row or two
/// in a thousand pages", and the planner then prices an index scan by the
/// index's pages per row: the lock path's statements on `contenders` would
/// read the whole table on every acquire and release. Clastor's
/// connections turn sequential scans off (`SESSION_SETTINGS`): the plans of
/// the very functions a lock goes through then use the indexes, and a
/// backend's pool does run them so (each plan auto_explain logs for its
/// acquire and release names the setting).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bloated_lock_table_is_still_read_through_its_indexes() {
    use clastor::backend::Backend as _;
    use clastor::backend::postgres::{PgConfig, PostgresBackend, SESSION_SETTINGS};
    let pg = start_postgres();
    let url = pg.url();
    // Installs the schema; its shutdown deletes its own server row.
    let backend = PostgresBackend::connect(PgConfig {
        url: url.clone(),
        ..PgConfig::default()
    })
    .await
    .unwrap();
    backend.shutdown().await;
    let (db, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let server: i64 = db
        .query_one(
            "INSERT INTO clastor.servers (name, ttl_ms, expires_at)
             VALUES ('bloat test', 86400000, now() + interval '1 day') RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    // The statistics are this test's to set: no autovacuum in between.
    db.batch_execute("ALTER TABLE clastor.contenders SET (autovacuum_enabled = false)")
        .await
        .unwrap();
    db.batch_execute(&format!(
        "INSERT INTO clastor.contenders (server, tag, kind, version, id, owner)
           SELECT {server}, g, 'burst', 'v1', 'k' || g, 'a burst of contenders' FROM generate_series(2, 50001) g;
         DELETE FROM clastor.contenders;
         INSERT INTO clastor.contenders (server, tag, kind, version, id, owner)
           VALUES ({server}, 50002, 'other', 'v1', 'live', 'the one left');"
    ))
    .await
    .unwrap();
    db.batch_execute("VACUUM clastor.contenders").await.unwrap();
    // A second, bigger burst grows the table past what VACUUM counted.
    db.batch_execute(&format!(
        "INSERT INTO clastor.contenders (server, tag, kind, version, id, owner)
           SELECT {server}, g, 'burst', 'v1', 'k' || g, 'a burst of contenders' FROM generate_series(100000, 200000) g;
         DELETE FROM clastor.contenders WHERE kind = 'burst';"
    ))
    .await
    .unwrap();

    // The hazard is real: with PostgreSQL's defaults, a sequential scan.
    let default_plans = lock_path_plans(&url, server, "RESET enable_seqscan").await;
    assert!(
        default_plans.contains("Seq Scan on contenders"),
        "with the defaults the planner picks a sequential scan here: {default_plans}"
    );
    // With Clastor's settings, the indexes.
    let plans = lock_path_plans(&url, server, SESSION_SETTINGS).await;
    assert!(!plans.contains("Seq Scan on contenders"), "{plans}");
    assert!(plans.contains("Index Scan using contenders_pkey"), "{plans}");

    // And a backend's own connections run with them: auto_explain in every
    // new session of this database logs each plan with the planner
    // settings it ran under, and the lock path's name ours.
    db.batch_execute(
        "DO $$ BEGIN
           EXECUTE format('ALTER DATABASE %I SET session_preload_libraries = auto_explain', current_database());
           EXECUTE format('ALTER DATABASE %I SET auto_explain.log_min_duration = 0', current_database());
           EXECUTE format('ALTER DATABASE %I SET auto_explain.log_nested_statements = on', current_database());
           EXECUTE format('ALTER DATABASE %I SET auto_explain.log_settings = on', current_database());
           EXECUTE format('ALTER DATABASE %I SET auto_explain.log_level = warning', current_database());
         END $$",
    )
    .await
    .unwrap();
    let log_path = pg.dir().join("postgres.log");
    let logged_before = std::fs::read(&log_path).unwrap().len();
    let engine = clastor::Engine::new(
        PostgresBackend::connect(PgConfig {
            url: url.clone(),
            ..PgConfig::default()
        })
        .await
        .unwrap(),
        clastor::EngineConfig::default(),
    );
    let (session, _) = engine.open_session("bloat test");
    let key = clastor::LockKey::new("tx", "through-the-pool").unwrap();
    let granted = session
        .acquire(&key, clastor::AcquireOptions::try_once())
        .await
        .unwrap();
    assert!(granted.is_some());
    assert!(session.release(&key).await.unwrap());
    drop(session);
    engine.shutdown().await;
    // auto_explain writes a statement's plan before the statement answers.
    let log = std::fs::read(&log_path).unwrap();
    let log = String::from_utf8_lossy(&log[logged_before..]);
    let lock_path: Vec<&str> = log
        .split("duration: ")
        .filter(|entry| entry.contains("clastor.acquire(") || entry.contains("clastor.release("))
        .collect();
    assert!(
        lock_path.iter().any(|e| e.contains("INSERT INTO clastor.contenders")),
        "the acquire's plans are in the log: {}",
        pg.log_tail(60)
    );
    for entry in lock_path {
        assert!(
            entry.contains("enable_seqscan = 'off'"),
            "planned with sequential scans on: {entry}"
        );
    }
}
