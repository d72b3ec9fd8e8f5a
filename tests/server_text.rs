//! The text form on a plain `TcpStream`, as netcat would use it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use clastor::EngineConfig;
use clastor::server::ServerConfig;
use support::{Text, start, start_default, token_of};

#[tokio::test]
async fn netcat_session_acquire_timeout_and_handover() {
    let (server, _) = start_default().await;
    let addr = server.local_addr();
    let mut a = Text::connect(addr).await;
    let mut b = Text::connect(addr).await;

    let granted = a.cmd("ACQUIRE transaction tx-1 1000").await;
    assert!(granted.starts_with("+ACQUIRED transaction tx-1 token="), "{granted}");
    let ta = token_of(&granted);

    let t0 = Instant::now();
    let timed_out = b.cmd("ACQUIRE transaction tx-1 200").await;
    assert!(timed_out.starts_with("-TIMEOUT"), "{timed_out}");
    assert!(
        t0.elapsed() >= Duration::from_millis(200),
        "timed out early: {:?}",
        t0.elapsed()
    );

    // B waits; A's connection closes; B is granted, with a larger token.
    b.send("ACQUIRE transaction tx-1 10000").await;
    let waiting = tokio::spawn(async move {
        let line = b.line().await.unwrap();
        (line, Instant::now())
    });
    // Let B's wait reach the server before A leaves (observed via HELD ALL on a third connection).
    let mut c = Text::connect(addr).await;
    loop {
        let info = {
            c.send("INFO").await;
            assert_eq!(c.line().await.unwrap(), "+INFO");
            c.block().await
        };
        if info.iter().any(|l| l == "memory.queued_waiters=1") {
            break;
        }
        tokio::task::yield_now().await;
    }
    let closed_at = Instant::now();
    drop(a);
    let (line, granted_at) = waiting.await.unwrap();
    assert!(line.starts_with("+ACQUIRED transaction tx-1 token="), "{line}");
    assert!(token_of(&line) > ta);
    assert!(granted_at.duration_since(closed_at) < Duration::from_secs(2));
    server.shutdown().await;
}

#[tokio::test]
async fn every_command_answers() {
    let (server, _) = start_default().await;
    let mut c = Text::connect(server.local_addr()).await;
    assert_eq!(c.cmd("ping").await, "+PONG");
    assert_eq!(c.cmd("  PiNg  ").await, "+PONG");
    let acq = c.cmd("acquire user u-7 0 60000").await;
    assert!(
        acq.starts_with("+ACQUIRED user u-7 token=") && acq.ends_with("version=v1 lease_ms=60000"),
        "{acq}"
    );
    assert_eq!(c.cmd("HELD").await, "+HELD 1");
    let held = c.block().await;
    assert_eq!(held.len(), 1);
    assert!(
        held[0].starts_with(&format!("user u-7 token={} version=v1 lease_ms=", token_of(&acq))),
        "{held:?}"
    );
    assert_eq!(c.cmd("HELD ALL").await, "+HELD 1");
    c.block().await;
    let renewed = c.cmd("RENEW user u-7 5000").await;
    assert_eq!(
        renewed,
        format!("+RENEWED user u-7 token={} lease_ms=5000", token_of(&acq))
    );
    assert_eq!(
        c.cmd("VERSION user").await,
        "+VERSION user version=v1 mode=normal layout=read_write"
    );
    assert_eq!(c.cmd("INFO").await, "+INFO");
    let info = c.block().await;
    assert!(info.iter().any(|l| l == "backend=memory"), "{info:?}");
    assert_eq!(c.cmd("RELEASE user u-7").await, "+RELEASED user u-7");
    assert!(c.cmd("RELEASE user u-7").await.starts_with("+NOT_HELD user u-7"));
    assert!(c.cmd("HELP").await.starts_with("+HELP"));
    assert!(c.block().await.iter().any(|l| l.contains("ACQUIRE <kind> <id>")));
    assert_eq!(c.cmd("QUIT").await, "+BYE");
    assert_eq!(c.line().await, None, "QUIT closes the connection");
    server.shutdown().await;
}

#[tokio::test]
async fn errors_keep_the_connection() {
    let (server, _) = start_default().await;
    let mut c = Text::connect(server.local_addr()).await;
    assert!(c.cmd("FROB x").await.starts_with("-ERR UNKNOWN_OPCODE"));
    assert!(c.cmd("ACQUIRE onlykind").await.starts_with("-ERR BAD_REQUEST"));
    assert!(c.cmd("ACQUIRE k i soon").await.starts_with("-ERR BAD_REQUEST"));
    assert!(c.cmd("ACQUIRE k ../etc").await.starts_with("-ERR INVALID_NAME"));
    assert!(c.cmd("ACQUIRE .. x").await.starts_with("-ERR INVALID_NAME"));
    assert!(
        c.cmd(&format!("ACQUIRE k {}", "x".repeat(200)))
            .await
            .starts_with("-ERR INVALID_NAME")
    );
    assert!(c.cmd("RENEW k i 1000").await.starts_with("-ERR NOT_HELD"));
    assert!(c.cmd("RENEW k i 0").await.starts_with("-ERR"));
    c.write_raw(b"ACQUIRE k a\0b\n").await;
    assert!(c.line().await.unwrap().starts_with("-ERR INVALID_NAME"));
    assert_eq!(c.cmd("PING").await, "+PONG", "connection still up");
    server.shutdown().await;
}

#[tokio::test]
async fn replies_come_in_command_order_and_events_are_pushed() {
    let (server, _) = start_default().await;
    let addr = server.local_addr();
    let mut a = Text::connect(addr).await;
    let mut b = Text::connect(addr).await;
    assert!(a.cmd("ACQUIRE k i 0 150").await.starts_with("+ACQUIRED"));
    // B pipelines a blocking acquire and a ping: the ping's reply follows the acquire's.
    b.send("ACQUIRE k i 10000").await;
    b.send("PING").await;
    let lost = a.line().await.unwrap();
    assert!(
        lost.starts_with("!LOST k i token=") && lost.ends_with("reason=lease_expired"),
        "{lost}"
    );
    assert!(b.line().await.unwrap().starts_with("+ACQUIRED k i"));
    assert_eq!(b.line().await.unwrap(), "+PONG");
    server.shutdown().await;
}

#[tokio::test]
async fn overlong_or_binary_garbage_lines_close_the_connection() {
    let (server, _) = start_default().await;
    let addr = server.local_addr();
    let mut c = Text::connect(addr).await;
    c.send(&"A".repeat(5000)).await;
    assert!(c.line().await.unwrap().starts_with("-ERR PROTOCOL_ERROR"));
    assert_eq!(c.line().await, None);
    let mut c = Text::connect(addr).await;
    c.write_raw(b"PING \xff\xfe\n").await;
    assert!(c.line().await.unwrap().starts_with("-ERR PROTOCOL_ERROR"));
    assert_eq!(c.line().await, None);
    let mut ok = Text::connect(addr).await;
    assert_eq!(ok.cmd("PING").await, "+PONG");
    server.shutdown().await;
}

#[tokio::test]
async fn shutdown_tells_holders_and_releases() {
    let (server, backend) = start(ServerConfig::default(), EngineConfig::default()).await;
    let mut c = Text::connect(server.local_addr()).await;
    let acq = c.cmd("ACQUIRE k i").await;
    server.shutdown().await;
    assert_eq!(
        c.line().await.unwrap(),
        format!("!LOST k i token={} reason=shutdown", token_of(&acq))
    );
    assert!(c.line().await.unwrap().starts_with("!CLOSING SHUTTING_DOWN"));
    assert_eq!(c.line().await, None);
    assert_eq!(backend.active_keys(), 0);
}

#[tokio::test]
async fn a_client_that_goes_away_mid_wait_withdraws_it() {
    let (server, backend) = start_default().await;
    let (mut a, mut b) = holder_and_blocked_waiter(server.local_addr()).await;
    // Plenty typed behind the blocked acquire, then the client leaves.
    for _ in 0..200 {
        b.send("PING").await;
    }
    while backend.queued_waiters() == 0 {
        tokio::task::yield_now().await;
    }
    drop(b);
    until_no_waiters(&backend, "the gone client's wait was not withdrawn").await;
    assert_eq!(a.cmd("RELEASE k i").await, "+RELEASED k i");
    server.shutdown().await;
}

#[tokio::test]
async fn a_flood_queued_behind_a_blocked_command_is_refused() {
    let (server, backend) = start_default().await;
    let (mut a, mut b) = holder_and_blocked_waiter(server.local_addr()).await;
    let flood = "PING\n".repeat(20_000);
    b.write_raw(flood.as_bytes()).await;
    let line = b.line().await.unwrap();
    assert!(line.starts_with("-ERR LIMIT_EXCEEDED"), "{line}");
    assert_eq!(b.line().await, None);
    until_no_waiters(&backend, "the refused client's wait was not withdrawn").await;
    assert_eq!(a.cmd("PING").await, "+PONG");
    server.shutdown().await;
}

/// Waits until the backend has no queued waiter, failing with `what` after
/// [`support::PATIENCE`].
async fn until_no_waiters(backend: &clastor::backend::memory::MemoryBackend, what: &str) {
    let deadline = std::time::Instant::now() + support::PATIENCE;
    while backend.queued_waiters() != 0 {
        assert!(std::time::Instant::now() < deadline, "{what}");
        tokio::task::yield_now().await;
    }
}

/// `a` holds `k i`; `b` has sent an acquire of it that waits for ten minutes.
async fn holder_and_blocked_waiter(addr: std::net::SocketAddr) -> (Text, Text) {
    let mut a = Text::connect(addr).await;
    assert!(a.cmd("ACQUIRE k i").await.starts_with("+ACQUIRED"));
    let mut b = Text::connect(addr).await;
    b.send("ACQUIRE k i 600000").await;
    (a, b)
}

#[tokio::test]
async fn past_the_wait_limit_an_acquire_is_tried_once() {
    // No waits allowed at all: acquires with a wait are tried once.
    let engine = EngineConfig {
        max_waits_per_session: 0,
        ..EngineConfig::default()
    };
    let (server, _) = start(ServerConfig::default(), engine).await;
    let addr = server.local_addr();
    let mut holder = Text::connect(addr).await;
    let held = holder.cmd("ACQUIRE k busy").await;
    assert!(held.starts_with("+ACQUIRED k busy token="), "{held}");

    let mut a = Text::connect(addr).await;
    let free = a.cmd("ACQUIRE k free 5000").await;
    assert!(free.starts_with("+ACQUIRED k free token="), "{free}");
    let busy = a.cmd("ACQUIRE k busy 5000").await;
    assert_eq!(
        busy,
        "-ERR LIMIT_EXCEEDED limit exceeded: this session has 0 acquires waiting, the most allowed"
    );
    let once = a.cmd("ACQUIRE k busy").await;
    assert!(once.starts_with("-TIMEOUT k busy"), "{once}");
    server.shutdown().await;
}

/// `ROTATE` streams: `+ROTATING`, progress lines naming what is left, then
/// the end line and `.`; a refusal is one `-ERR` line; `VERSION` shows the
/// drain; a `!LOST` is not held back for the length of a drain.
#[tokio::test]
async fn rotate_streams_progress_and_ends_with_a_dot() {
    let (server, _) = start_default().await;
    let addr = server.local_addr();
    let mut holder = Text::connect(addr).await;
    let mut admin = Text::connect(addr).await;
    assert!(
        holder
            .cmd("ACQUIRE ledger acc-1")
            .await
            .starts_with("+ACQUIRED ledger acc-1")
    );
    let refused = admin.cmd("ROTATE ledger v7 v8").await;
    assert!(
        refused.starts_with("-ERR ROTATION_REFUSED ledger is at version v1"),
        "{refused}"
    );
    assert!(admin.cmd("ROTATE ledger v1 v1").await.starts_with("-ERR BAD_REQUEST"));
    assert!(admin.cmd("ROTATE ledger v1 a/b").await.starts_with("-ERR INVALID_NAME"));

    admin.send("ROTATE ledger v1 v2 30000").await;
    let header = admin.line().await.unwrap();
    assert!(header.starts_with("+ROTATING ledger v1 v2 left_ms="), "{header}");
    let progress = admin.line().await.unwrap();
    assert!(progress.starts_with("draining remaining=1 elapsed_ms="), "{progress}");
    assert_eq!(admin.line().await.unwrap(), "  held acc-1 by this server");
    let mut watcher = Text::connect(addr).await;
    let v = watcher.cmd("VERSION ledger").await;
    assert!(
        v.starts_with("+VERSION ledger version=v1 mode=draining to=v2 remaining=1 left_ms="),
        "{v}"
    );
    // A try-once of a free id of the draining kind says why it was not
    // granted (nobody holds acc-2).
    assert_eq!(
        watcher.cmd("ACQUIRE ledger acc-2 0").await,
        "-TIMEOUT ledger acc-2 kind ledger is draining (a rotation from v1 to v2); a try-once does not wait for it"
    );
    assert!(holder.cmd("RELEASE ledger acc-1").await.starts_with("+RELEASED"));
    let rest = admin.block().await;
    assert!(rest.iter().any(|l| l.starts_with("switched remaining=0")), "{rest:?}");
    assert!(
        rest.last().unwrap().starts_with("rotated version=v2 drain_ms="),
        "{rest:?}"
    );
    assert!(
        watcher.cmd("VERSION ledger").await == "+VERSION ledger version=v2 mode=normal layout=read_write",
        "switched"
    );
    assert!(holder.cmd("ACQUIRE ledger acc-1").await.contains("version=v2"));

    // A drain that times out ends with `failed ROTATION_ABORTED`; a lock the
    // rotating connection itself loses meanwhile is reported at once, inside
    // the reply.
    assert!(
        admin
            .cmd("ACQUIRE other k 0 100")
            .await
            .starts_with("+ACQUIRED other k")
    );
    admin.send("ROTATE ledger v2 v3 1500").await;
    assert!(admin.line().await.unwrap().starts_with("+ROTATING ledger v2 v3"));
    let rest = admin.block().await;
    assert!(
        rest.iter()
            .any(|l| l.starts_with("!LOST other k token=") && l.ends_with("reason=lease_expired")),
        "{rest:?}"
    );
    assert!(
        rest.last()
            .unwrap()
            .starts_with("failed ROTATION_ABORTED the drain did not finish"),
        "{rest:?}"
    );
    assert_eq!(
        admin.cmd("ROTATE_ABORT ledger").await,
        "+NOT_ROTATING ledger version=v2 (nothing to abort)"
    );
}

/// A fifth `ACQUIRE` argument is a trace id (protocol version 3): checked,
/// and listed by `HELD` as `trace=`.
#[tokio::test]
async fn acquire_takes_a_trace_id_and_held_lists_it() {
    let (server, _) = start_default().await;
    let mut c = Text::connect(server.local_addr()).await;
    assert!(
        c.cmd("ACQUIRE k traced 0 0 job-42:step.1")
            .await
            .starts_with("+ACQUIRED k traced ")
    );
    assert!(c.cmd("ACQUIRE k plain").await.starts_with("+ACQUIRED k plain "));
    assert!(
        c.cmd("ACQUIRE k bad 0 0 no/slash")
            .await
            .starts_with("-ERR BAD_REQUEST")
    );
    assert_eq!(c.cmd("HELD").await, "+HELD 2");
    let held = c.block().await;
    assert!(
        held[0].starts_with("k plain ") && !held[0].contains("trace="),
        "{held:?}"
    );
    assert!(
        held[1].starts_with("k traced ") && held[1].ends_with(" trace=job-42:step.1"),
        "{held:?}"
    );
    drop(c);
    server.shutdown().await;
}
