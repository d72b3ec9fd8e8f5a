//! `clastor lock` as a user runs it: the real binary against an in-process
//! server. The command sees the fencing token, runs on the same key never
//! overlap, exit codes follow the documented table, and a lost lock stops
//! the command.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::{Output, Stdio};

use nix::sys::signal::Signal;
use support::PATIENCE;
use support::cli::{self, clastor, run};
use tokio::io::{BufReader, Lines};
use tokio::process::ChildStdout;

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn the_command_sees_the_fencing_token_and_the_key() {
    let (server, _) = support::start_default().await;
    let out = run(clastor(server.local_addr()).args([
        "lock",
        "transaction",
        "tx-1",
        "--",
        "sh",
        "-c",
        "echo $CLASTOR_FENCING_TOKEN $CLASTOR_LOCK_KIND $CLASTOR_LOCK_ID",
    ]))
    .await;
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    let words: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(words.len(), 3, "{text:?}");
    let token: u64 = words[0].parse().expect("a numeric token");
    assert!(token > 0);
    assert_eq!(&words[1..], ["transaction", "tx-1"]);
    // Released on exit: the key is free again.
    let client = support::connect(&server).await;
    assert!(
        client
            .lock("transaction", "tx-1")
            .try_acquire()
            .await
            .unwrap()
            .is_some()
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_on_the_same_key_never_overlap() {
    let (server, _) = support::start_default().await;
    let log = std::env::temp_dir().join(format!(
        "clastor-cli-lock-{}-{}",
        std::process::id(),
        server.local_addr().port()
    ));
    let _ = std::fs::remove_file(&log);
    let script = format!(
        "echo start $CLASTOR_FENCING_TOKEN >> {0}; sleep 0.02; echo end $CLASTOR_FENCING_TOKEN >> {0}",
        log.display()
    );
    let runs = 6;
    let children: Vec<_> = (0..runs)
        .map(|_| {
            clastor(server.local_addr())
                .args([
                    "lock",
                    "transaction",
                    "shared",
                    "--wait",
                    "30s",
                    "--quiet",
                    "--",
                    "sh",
                    "-c",
                    &script,
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = tokio::time::timeout(PATIENCE * 3, child.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), runs * 2, "{text}");
    let mut last_token = 0;
    for pair in lines.chunks(2) {
        let (start, end) = (
            pair[0].strip_prefix("start ").unwrap(),
            pair[1].strip_prefix("end ").unwrap(),
        );
        assert_eq!(start, end, "critical sections interleaved:\n{text}");
        let token: u64 = start.parse().unwrap();
        assert!(token > last_token, "tokens increase with each holder:\n{text}");
        last_token = token;
    }
    let _ = std::fs::remove_file(&log);
    server.shutdown().await;
}

#[tokio::test]
async fn exit_codes_follow_the_table() {
    let (server, _) = support::start_default().await;
    let addr = server.local_addr();

    let out = run(clastor(addr).args(["lock", "k", "code", "-q", "--", "sh", "-c", "exit 7"])).await;
    assert_eq!(out.status.code(), Some(7), "the command's own status");

    let holder = support::connect(&server).await;
    let held = support::take_free(&holder, "k", "busy").await;
    let out = run(clastor(addr).args(["lock", "k", "busy", "--wait", "50ms", "--", "true"])).await;
    assert_eq!(out.status.code(), Some(124), "not acquired in time: {}", stderr(&out));
    assert!(stderr(&out).contains("not acquired"), "{}", stderr(&out));
    drop(held);

    let out = run(clastor(addr).args(["lock", "k", "missing", "--", "/nonexistent/clastor-test-command"])).await;
    assert_eq!(out.status.code(), Some(127), "{}", stderr(&out));

    let out = run(clastor(addr).args(["lock", "k", "bad/name", "--", "true"])).await;
    assert_eq!(out.status.code(), Some(125), "{}", stderr(&out));

    let out = run(clastor(addr).args(["lock", "k", "x"])).await;
    assert_eq!(out.status.code(), Some(2), "usage error without a command");

    let out = run(clastor(addr).args(["lock", "k", "signalled", "-q", "--", "sh", "-c", "kill -TERM $$"])).await;
    assert_eq!(out.status.code(), Some(128 + 15), "killed by SIGTERM");

    server.shutdown().await;
    let out = run(clastor(addr).args(["lock", "--connect-timeout", "2s", "k", "x", "--", "true"])).await;
    assert_eq!(out.status.code(), Some(125), "cannot connect: {}", stderr(&out));
}

#[tokio::test]
async fn a_lost_lock_stops_the_command() {
    let (server, _) = support::start_default().await;
    let mut child = cli::spawn_piped(clastor(server.local_addr()).args([
        "lock",
        "k",
        "doomed",
        "--grace",
        "5s",
        "--",
        "sh",
        "-c",
        "echo running; exec sleep 60",
    ]));
    let mut lines = cli::stdout_lines(&mut child);
    let first = cli::next_line(&mut lines).await;
    assert_eq!(first.as_deref(), Some("running"));
    // The server going away takes the lock with it.
    server.shutdown().await;
    let out = cli::output(child, "stopped in time").await;
    assert_eq!(out.status.code(), Some(123), "{}", stderr(&out));
    assert!(stderr(&out).contains("lost k/doomed"), "{}", stderr(&out));
}

#[tokio::test]
async fn a_leased_lock_is_renewed_while_the_command_runs() {
    let (server, _) = support::start_default().await;
    let addr = server.local_addr();
    let mut child = cli::spawn_piped(
        clastor(addr)
            .args([
                "lock",
                "k",
                "leased",
                "--lease",
                "800ms",
                "--",
                "sh",
                "-c",
                "echo running; read line || true",
            ])
            .stdin(Stdio::piped()),
    );
    let mut lines = cli::stdout_lines(&mut child);
    let first = cli::next_line(&mut lines).await;
    assert_eq!(first.as_deref(), Some("running"));
    // Several leases long, someone else cannot get it: the lease is renewed.
    let other = support::connect(&server).await;
    let got = other
        .lock("k", "leased")
        .wait(std::time::Duration::from_millis(2500))
        .acquire()
        .await
        .unwrap();
    assert!(got.is_none(), "lock changed hands while the command ran");
    // Let the command finish: it exits 0 and the lock is released.
    drop(child.stdin.take());
    let out = cli::output(child, "the command finished in time").await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(support::granted_in_time(&other, "k", "leased").await);
    server.shutdown().await;
}

/// Whether process `pid` is gone (or a zombie: dead, not yet reaped by its
/// new parent).
fn process_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| matches!(rest.trim_start().chars().next(), Some('Z' | 'X'))),
    }
}

/// The pid of the background job a `sh -c "sleep 30 & echo $!; wait"` started.
async fn background_pid(lines: &mut Lines<BufReader<ChildStdout>>) -> i32 {
    let first = cli::next_line(lines).await.expect("the background job's pid");
    first.trim().parse().unwrap()
}

/// Waits until process `pid` is gone; fails with `what` after [`PATIENCE`].
async fn until_gone(pid: i32, what: &str) {
    let deadline = std::time::Instant::now() + PATIENCE;
    while !process_gone(pid) {
        assert!(std::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_lost_lock_stops_what_the_command_started_too() {
    let (server, _) = support::start_default().await;
    let mut child = cli::spawn_piped(clastor(server.local_addr()).args([
        "lock",
        "k",
        "group",
        "--grace",
        "2s",
        "--",
        "sh",
        "-c",
        "sleep 30 & echo $!; wait",
    ]));
    let mut lines = cli::stdout_lines(&mut child);
    let grandchild = background_pid(&mut lines).await;
    assert!(!process_gone(grandchild));
    server.shutdown().await;
    let out = cli::output(child, "stopped in time").await;
    assert_eq!(out.status.code(), Some(123), "{}", stderr(&out));
    // It was signalled before clastor exited; give the kernel a moment to
    // finish it off.
    until_gone(grandchild, "the background sleep survived the loss").await;
}

#[tokio::test]
async fn signals_to_clastor_reach_the_whole_command() {
    let (server, _) = support::start_default().await;
    let mut child = cli::spawn_piped(clastor(server.local_addr()).args([
        "lock",
        "k",
        "signalled",
        "--",
        "sh",
        "-c",
        "sleep 30 & echo $!; wait",
    ]));
    let mut lines = cli::stdout_lines(&mut child);
    let grandchild = background_pid(&mut lines).await;
    cli::signal(&child, Signal::SIGTERM);
    let out = cli::output(child, "exited in time").await;
    // `sh` dies of the forwarded SIGTERM: clastor reports it as 128+15.
    assert_eq!(out.status.code(), Some(128 + 15), "{}", stderr(&out));
    until_gone(grandchild, "the background sleep survived SIGTERM").await;
    // And the lock was released on the way out.
    let client = support::connect(&server).await;
    assert!(client.lock("k", "signalled").try_acquire().await.unwrap().is_some());
    server.shutdown().await;
}

#[tokio::test]
async fn retry_connect_waits_for_a_server_that_comes_up_late() {
    // A free port, with nobody on it yet.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut child = cli::spawn_piped(clastor(addr).args([
        "lock",
        "--connect-timeout",
        "200ms",
        "--retry-connect",
        "30s",
        "k",
        "late",
        "--",
        "sh",
        "-c",
        "echo running",
    ]));
    let mut lines = cli::stdout_lines(&mut child);
    // Without --retry-connect this would have failed by now (200 ms).
    let refused = tokio::time::timeout(std::time::Duration::from_millis(600), cli::next_line(&mut lines)).await;
    assert!(refused.is_err(), "ran without a server: {refused:?}");
    let engine = clastor::Engine::new(
        clastor::backend::memory::MemoryBackend::new(),
        clastor::EngineConfig::default(),
    );
    let server = clastor::server::spawn(
        engine,
        clastor::server::ServerConfig {
            listen: addr,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(cli::next_line(&mut lines).await.as_deref(), Some("running"));
    let out = cli::output(child, "ran once the server was up").await;
    assert!(out.status.success(), "{}", stderr(&out));
    server.shutdown().await;
}

#[tokio::test]
async fn several_keys_are_held_together_with_a_token_each() {
    let (server, _) = support::start_default().await;
    let addr = server.local_addr();
    let mut child = cli::spawn_piped(
        clastor(addr)
            .args([
                "lock",
                "account",
                "bob",
                "--and",
                "account/alice",
                "--",
                "sh",
                "-c",
                "echo $CLASTOR_FENCING_TOKEN_0 $CLASTOR_FENCING_TOKEN_1 $CLASTOR_FENCING_TOKEN; \
                 echo \"$CLASTOR_LOCKS\"; read line || true",
            ])
            .stdin(Stdio::piped()),
    );
    let mut lines = cli::stdout_lines(&mut child);
    let tokens = cli::next_line(&mut lines).await.expect("tokens");
    let tokens: Vec<u64> = tokens.split_whitespace().map(|t| t.parse().unwrap()).collect();
    assert_eq!(tokens.len(), 3);
    assert_eq!(
        tokens[0], tokens[2],
        "the first key's token is also CLASTOR_FENCING_TOKEN"
    );
    let json: serde_json::Value = serde_json::from_str(&cli::next_line(&mut lines).await.expect("json")).unwrap();
    let locks = json.as_array().expect("an array");
    assert_eq!(locks.len(), 2);
    assert_eq!(locks[0]["id"], "bob", "command-line order");
    assert_eq!(locks[1]["token"], tokens[1].to_string(), "tokens as decimal strings");
    // Both are held while the command runs.
    let other = support::connect(&server).await;
    for id in ["alice", "bob"] {
        assert!(
            other.lock("account", id).try_acquire().await.unwrap().is_none(),
            "{id} is free"
        );
    }
    drop(child.stdin.take());
    let out = cli::output(child, "the command finished").await;
    assert!(out.status.success(), "{}", stderr(&out));
    let both = other
        .lock_many([("account", "alice"), ("account", "bob")])
        .wait(PATIENCE)
        .acquire()
        .await
        .unwrap();
    assert!(both.is_some(), "both released on exit");
    server.shutdown().await;
}
