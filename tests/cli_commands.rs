//! `clastor shell` and the one-shot commands as a user runs them: the real
//! binary against an in-process server, commands piped through stdin, JSON
//! output parsed, help texts present.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::process::{Output, Stdio};

use nix::sys::signal::Signal;
use serde_json::Value;
use support::PATIENCE;
use support::cli::{self, run};
use tokio::io::{AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

fn clastor(server: SocketAddr) -> Command {
    let mut cmd = cli::clastor(server);
    cmd.env("CLASTOR_HISTORY", "/dev/null");
    cmd
}

/// `clastor shell` with stdin, stdout and stderr piped.
fn shell(server: SocketAddr) -> Child {
    cli::spawn_piped(clastor(server).arg("shell").stdin(Stdio::piped()))
}

fn json(out: &Output) -> Value {
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"))
}

async fn line(lines: &mut Lines<BufReader<ChildStdout>>) -> String {
    cli::next_line(lines).await.expect("not EOF")
}

#[tokio::test]
async fn the_shell_shows_lost_when_a_leased_lock_expires() {
    let (server, _) = support::start_default().await;
    let mut child = shell(server.local_addr());
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = cli::stdout_lines(&mut child);

    stdin.write_all(b"ACQUIRE transaction tx-1 0 100\n").await.unwrap();
    let acquired = line(&mut lines).await;
    assert!(acquired.starts_with("+ACQUIRED transaction tx-1 token="), "{acquired}");
    let token = support::token_of(&acquired);
    // No further input: the event arrives on its own when the lease runs out.
    let lost = line(&mut lines).await;
    assert_eq!(
        lost,
        format!("!LOST transaction tx-1 token={token} reason=lease_expired")
    );

    stdin.write_all(b"QUIT\n").await.unwrap();
    let out = cli::output(child, "the shell exited in time").await;
    assert!(out.status.success());
    server.shutdown().await;
}

#[tokio::test]
async fn the_shell_speaks_the_text_grammar_over_binary_frames() {
    let (server, _) = support::start_default().await;
    let mut child = shell(server.local_addr());
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(
            b"PING\nFROB\nACQUIRE a b\nHELD\nRELEASE a b\nRELEASE a b\nVERSION transaction\nHELP\nACQUIRE a/b c\n",
        )
        .await
        .unwrap();
    // End of input ends the session like QUIT.
    drop(stdin);
    let out = cli::output(child, "the shell exited in time").await;
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "+PONG");
    assert!(lines[1].starts_with("-ERR UNKNOWN_OPCODE"), "{}", lines[1]);
    assert!(lines[2].starts_with("+ACQUIRED a b token="), "{}", lines[2]);
    assert_eq!(lines[3], "+HELD 1");
    assert!(lines[4].starts_with("a b token="), "{}", lines[4]);
    assert_eq!(lines[5], ".");
    assert_eq!(lines[6], "+RELEASED a b");
    assert!(lines[7].starts_with("+NOT_HELD a b"), "{}", lines[7]);
    assert!(lines[8].starts_with("+VERSION transaction version="), "{}", lines[8]);
    assert!(lines[9].starts_with("+HELP"), "{}", lines[9]);
    assert!(lines.iter().any(|l| l.starts_with("-ERR INVALID_NAME")), "{text}");
    server.shutdown().await;
}

#[tokio::test]
async fn one_shot_json_output_parses() {
    let (server, _) = support::start_default().await;
    let addr = server.local_addr();

    let v = json(&run(clastor(addr).args(["ping", "--json", "--count", "3"])).await);
    assert_eq!(v["rtt_us"].as_array().unwrap().len(), 3, "{v}");
    assert!(v["server_name"].as_str().unwrap().starts_with("clastor"), "{v}");

    let out = run(clastor(addr).args(["acquire", "transaction", "tx-9", "--json"])).await;
    assert!(out.status.success());
    let v = json(&out);
    assert_eq!(v["acquired"], true, "{v}");
    assert!(v["token"].as_u64().unwrap() > 0, "{v}");

    let v = json(&run(clastor(addr).args(["version", "transaction", "--json"])).await);
    assert_eq!(v["kind"], "transaction");
    assert_eq!(v["mode"], "normal");

    let v = json(&run(clastor(addr).args(["info", "--json"])).await);
    assert!(v["server"].as_str().unwrap().starts_with("clastor"), "{v}");

    // Someone holds a lock: `held` lists it, `acquire` cannot get it (exit
    // 1), `release` from another connection is refused (exit 1).
    let holder = support::connect(&server).await;
    let guard = support::take_free(&holder, "transaction", "tx-held").await;
    let v = json(&run(clastor(addr).args(["held", "--json"])).await);
    let list = v.as_array().unwrap();
    assert_eq!(list.len(), 1, "{v}");
    assert_eq!(list[0]["token"].as_u64(), Some(guard.token()));
    assert_eq!(list[0]["connection_id"].as_u64(), Some(guard.connection_id()));

    let out = run(clastor(addr).args(["acquire", "transaction", "tx-held", "--json"])).await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(json(&out)["acquired"], false);

    let out = run(clastor(addr).args(["release", "transaction", "tx-held", "--json"])).await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(json(&out)["error"]["status"], "NOT_OWNER");

    let v = json(&run(clastor(addr).args(["release", "transaction", "tx-free", "--json"])).await);
    assert_eq!(v["released"], false);

    guard.release().await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn one_shot_text_output_and_connection_failure() {
    let (server, _) = support::start_default().await;
    let addr = server.local_addr();
    let out = run(clastor(addr).args(["ping"])).await;
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(&format!("PONG from {addr}: time=")));
    let out = run(clastor(addr).args(["acquire", "k", "i"])).await;
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("acquired k/i token="),
        "{out:?}"
    );
    let out = run(clastor(addr).args(["held"])).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "no locks held\n");
    server.shutdown().await;

    let out = run(clastor(addr).args(["ping", "--connect-timeout", "2s"])).await;
    assert_eq!(out.status.code(), Some(3));
    let out = run(clastor(addr).args(["shell"]).stdin(Stdio::null())).await;
    assert_eq!(out.status.code(), Some(3));
}

#[tokio::test]
async fn acquire_hold_keeps_the_lock_until_interrupted() {
    let (server, _) = support::start_default().await;
    let addr = server.local_addr();
    let mut child = cli::spawn_piped(clastor(addr).args(["acquire", "k", "held", "--hold", "--json"]));
    let mut lines = cli::stdout_lines(&mut child);
    let v: Value = serde_json::from_str(&line(&mut lines).await).unwrap();
    assert_eq!(v["holding"], true);
    let other = support::connect(&server).await;
    assert!(
        other.lock("k", "held").try_acquire().await.unwrap().is_none(),
        "still held"
    );
    cli::signal(&child, Signal::SIGTERM);
    let v: Value = serde_json::from_str(&line(&mut lines).await).unwrap();
    assert_eq!(v["released"], true);
    let status = tokio::time::timeout(PATIENCE, child.wait()).await.unwrap().unwrap();
    assert!(status.success());
    assert!(other.lock("k", "held").try_acquire().await.unwrap().is_some());
    server.shutdown().await;
}

#[test]
fn every_subcommand_explains_itself() {
    for sub in ["shell", "lock", "ping", "acquire", "release", "held", "version", "info"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_clastor"))
            .args([sub, "--help"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{sub}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Examples:"), "{sub} --help has examples:\n{text}");
        assert!(text.contains("--server"), "{sub} --help documents --server:\n{text}");
        assert!(
            text.contains("CLASTOR_SERVER"),
            "{sub} --help names the env var:\n{text}"
        );
        assert!(
            text.contains("Exit status"),
            "{sub} --help documents exit codes:\n{text}"
        );
    }
}

/// Waits until the server has `n` acquires queued (the CLI under test is
/// then blocked in its wait, with its signal handlers installed).
async fn until_queued(backend: &clastor::backend::memory::MemoryBackend, n: usize) {
    tokio::time::timeout(PATIENCE, async {
        while backend.queued_waiters() != n {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the acquire queued in time");
}

#[tokio::test]
async fn acquire_hold_stops_waiting_on_sigterm() {
    let (server, backend) = support::start_default().await;
    let holder = support::connect(&server).await;
    let _held = support::take_free(&holder, "k", "waited").await;
    let child =
        cli::spawn_piped(clastor(server.local_addr()).args(["acquire", "k", "waited", "--wait", "10m", "--hold"]));
    until_queued(&backend, 1).await;
    cli::signal(&child, Signal::SIGTERM);
    let out = cli::output(child, "SIGTERM ended the wait").await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("interrupted"), "{out:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn the_shell_prints_a_late_reply_after_ctrl_c() {
    let (server, backend) = support::start_default().await;
    let holder = support::connect(&server).await;
    let held = support::take_free(&holder, "k", "late").await;
    let mut child = shell(server.local_addr());
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = cli::stdout_lines(&mut child);
    stdin.write_all(b"ACQUIRE k late 60000\n").await.unwrap();
    until_queued(&backend, 1).await;
    cli::signal(&child, Signal::SIGINT);
    let interrupted = line(&mut lines).await;
    assert!(interrupted.starts_with("-ERR INTERRUPTED"), "{interrupted}");
    // The shell is usable again, and the wait still runs on the server.
    stdin.write_all(b"PING\n").await.unwrap();
    assert_eq!(line(&mut lines).await, "+PONG");
    held.release().await.unwrap();
    assert_eq!(line(&mut lines).await, "!LATE ACQUIRE k late 60000");
    let granted = line(&mut lines).await;
    assert!(granted.starts_with("+ACQUIRED k late token="), "{granted}");
    stdin.write_all(b"HELD\nQUIT\n").await.unwrap();
    assert_eq!(line(&mut lines).await, "+HELD 1");
    let out = cli::output(child, "the shell exited in time").await;
    assert!(out.status.success());
    server.shutdown().await;
}

#[tokio::test]
async fn json_tokens_also_come_as_decimal_strings() {
    let (server, _) = support::start_default().await;
    let addr = server.local_addr();
    let out = run(clastor(addr).args(["acquire", "transaction", "tx-str", "--json"])).await;
    assert!(out.status.success(), "{out:?}");
    let v = json(&out);
    let token = v["token"].as_u64().unwrap();
    assert_eq!(v["token_str"], token.to_string(), "{v}");

    let holder = support::connect(&server).await;
    let guard = support::take_free(&holder, "transaction", "tx-held-str").await;
    let v = json(&run(clastor(addr).args(["held", "--json"])).await);
    let list = v.as_array().unwrap();
    assert_eq!(list.len(), 1, "{v}");
    assert_eq!(list[0]["token_str"], guard.token().to_string(), "{v}");
    guard.release().await.unwrap();
    server.shutdown().await;
}

/// `clastor serve` with `extra`: it must refuse to start, exit non-zero, and
/// say why on stderr.
async fn serve_refused(extra: &[&str]) -> String {
    let unused: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let out = run(clastor(unused).args(["serve", "--listen", "127.0.0.1:0"]).args(extra)).await;
    assert!(!out.status.success(), "serve {extra:?} started: {out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn serve_refuses_limits_that_cannot_work() {
    let err = serve_refused(&["--max-in-flight", "2"]).await;
    assert!(
        err.contains("--max-in-flight") && err.contains("--max-waits") && err.contains("272"),
        "{err}"
    );
    let err = serve_refused(&["--max-in-flight", "20", "--max-waits", "5"]).await;
    assert!(err.contains("21"), "{err}");
    let err = serve_refused(&["--max-frame", "8"]).await;
    assert!(err.contains("--max-frame") && err.contains("311"), "{err}");
    let err = serve_refused(&["--max-frame", "16777216"]).await;
    assert!(err.contains("--max-frame"), "{err}");
    let err = serve_refused(&["--max-connections", "0"]).await;
    assert!(err.contains("--max-connections"), "{err}");
    let err = serve_refused(&["--max-held", "0"]).await;
    assert!(err.contains("--max-held"), "{err}");
    let err = serve_refused(&["--zk-sessions", "0"]).await;
    assert!(err.contains("--zk-sessions"), "{err}");
}

#[tokio::test]
async fn serve_help_states_the_rules_and_defaults() {
    let unused: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let out = run(clastor(unused).args(["serve", "--help"])).await;
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "--max-waits + 16",
        "311",
        "16777215",
        "[default: 512]",
        "[default: 256]",
        "[default: 65536]",
        "[default: 10m]",
        "[default: 127.0.0.1:7070]",
    ] {
        assert!(help.contains(needle), "no {needle:?} in:\n{help}");
    }
}

/// `clastor load --json` on the in-process memory server, series measured
/// one after the other: Clastor's row, measured alone, carries the
/// process's CPU time and context switches per sample.
#[test]
fn the_load_harness_reports_cpu_per_sample_for_series_measured_alone() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_clastor"))
        .args([
            "load",
            "--op",
            "acquire-release",
            "--duration",
            "1s",
            "--warmup",
            "0s",
            "--json",
        ])
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let clastor = lines
        .iter()
        .find(|v| v["series"] == "clastor")
        .unwrap_or_else(|| panic!("no clastor line in {stdout}"));
    assert!(clastor["ops"].as_u64().unwrap() > 0, "{clastor}");
    assert_eq!(clastor["errors"], 0, "{clastor}");
    // A pair through the client and the server costs some CPU, and not a
    // second of it.
    let cpu = clastor["cpu_us_per_op"]
        .as_f64()
        .unwrap_or_else(|| panic!("no CPU in {clastor}"));
    assert!(cpu > 0.0 && cpu < 1e6, "{clastor}");
    assert!(clastor["switches_per_op"].as_f64().is_some(), "{clastor}");
}
