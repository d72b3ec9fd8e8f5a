//! Security of `clastor serve` as an operator runs it: the auth file
//! reloaded on SIGHUP (an invalid one refused, the old one kept), the
//! client commands' `--token`, and no secret in the server's logs, read
//! whole after it stopped.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clastor::server::hash_token;
use clastor_client::{Client, Error};
use support::process::free_port;
use support::{Text, http};

const TOKEN: &str = "process-secret-7f3e1b2a";
const WRONG: &str = "wrong-secret-93ad55c1";

fn policy(kinds: &str) -> String {
    format!(
        "[[principal]]\nname = \"app\"\ntoken_sha256 = \"{}\"\n[principal.grants]\n{kinds}\n\"*\" = [\"admin\"]\n",
        hash_token(TOKEN)
    )
}

/// Waits (bounded) until the server's log file has `n` lines containing `needle`.
fn wait_for_log(path: &std::path::Path, needle: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        if log.matches(needle).count() >= n {
            return;
        }
        assert!(Instant::now() < deadline, "no {needle:?} in the log:\n{log}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_and_no_secret_reaches_the_logs() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("auth.toml");
    std::fs::write(&file, policy("transaction = [\"acquire\"]")).unwrap();
    let log_path = dir.path().join("server.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let addr = free_port();
    let http_addr = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_clastor"))
        .args(["serve", "--listen", &addr.to_string(), "--http", &http_addr.to_string()])
        .arg("--auth-file")
        .arg(&file)
        // Everything the server logs, down to debug.
        .env("RUST_LOG", "debug")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    wait_for_log(&log_path, "listening", 1);
    assert!(
        std::fs::read_to_string(&log_path)
            .unwrap()
            .contains("authentication on")
    );

    // Tokens on every port, right and wrong.
    let err = Client::builder(addr).token(WRONG).connect().await.unwrap_err();
    assert!(matches!(err, Error::Unauthenticated(_)), "{err:?}");
    let client = Client::builder(addr).token(TOKEN).connect().await.unwrap();
    assert!(client.lock("transaction", "tx-1").acquire().await.unwrap().is_some());
    let err = client.lock("user", "u-1").acquire().await.unwrap_err();
    assert!(matches!(err, Error::Forbidden(_)), "{err:?}");
    let mut text = Text::connect(addr).await;
    assert_eq!(
        text.cmd(&format!("AUTH {WRONG}")).await,
        "-ERR UNAUTHENTICATED authentication failed"
    );
    assert_eq!(text.cmd(&format!("AUTH {TOKEN}")).await, "+AUTH principal=app");
    let bad = format!("Bearer {WRONG}");
    let r = http::request(http_addr, "GET", "/api/v1/locks/held", &[("Authorization", &bad)], b"").await;
    assert_eq!(r.status, 401);
    let good = format!("Bearer {TOKEN}");
    let r = http::request(http_addr, "GET", "/api/v1/locks/held", &[("Authorization", &good)], b"").await;
    assert_eq!(r.status, 200, "{}", r.body);
    // The CLI's --token (from the environment, as documented).
    let out = Command::new(env!("CARGO_BIN_EXE_clastor"))
        .args(["acquire", "transaction", "tx-cli", "--server", &addr.to_string()])
        .env("CLASTOR_TOKEN", TOKEN)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // SIGHUP with a file that grants `user`: the open client gets it.
    std::fs::write(&file, policy("transaction = [\"acquire\"]\nuser = [\"acquire\"]")).unwrap();
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    wait_for_log(&log_path, "auth file reloaded", 1);
    assert!(client.lock("user", "u-1").acquire().await.unwrap().is_some());
    // SIGHUP with a broken file: refused, the old one stays.
    std::fs::write(
        &file,
        format!("[[principal]]\nname = \"app\"\ntoken_sha256 = \"{}", hash_token(TOKEN)),
    )
    .unwrap();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    wait_for_log(&log_path, "auth file not reloaded", 1);
    assert!(client.lock("user", "u-2").acquire().await.unwrap().is_some());

    drop(client);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "server did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut logged = String::new();
    std::fs::File::open(&log_path)
        .unwrap()
        .read_to_string(&mut logged)
        .unwrap();
    // Failures were logged, with the peer...
    assert!(logged.contains("authentication failed"), "{logged}");
    assert!(logged.contains("peer=127.0.0.1:"), "{logged}");
    // ...and no token, right or wrong, nor the file's digest, ever was.
    for secret in [TOKEN, WRONG, &hash_token(TOKEN)] {
        assert!(!logged.contains(secret), "{secret} in the log:\n{logged}");
    }
}
