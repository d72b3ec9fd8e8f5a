//! The testkit against the real Redis from Debian's `redis-server` and
//! `redis-tools`: start, redis-cli, freeze and thaw, kill and restart (empty:
//! no persistence), and cleanup.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use clastor_testkit::Redis;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Runs a redis-cli command and returns its stdout, trimmed.
fn run(mut cli: Command) -> Result<String, Box<dyn std::error::Error>> {
    let Output { status, stdout, stderr } = cli.output()?;
    if !status.success() {
        return Err(format!("{cli:?} failed ({status}): {}", String::from_utf8_lossy(&stderr)).into());
    }
    Ok(String::from_utf8_lossy(&stdout).trim().to_owned())
}

fn cli(redis: &Redis, args: &[&str]) -> Result<String, Box<dyn std::error::Error>> {
    let mut c = redis.cli();
    c.args(args);
    run(c)
}

/// Whether an inline PING is answered within `timeout`.
fn answers(redis: &Redis, timeout: Duration) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&redis.addr(), timeout) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(timeout));
    let mut buf = [0u8; 16];
    s.write_all(b"PING\r\n").is_ok() && s.read(&mut buf).is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
}

#[test]
fn starts_serves_freezes_restarts_and_cleans_up() -> TestResult {
    let mut redis = Redis::start()?;
    assert!(redis.url().starts_with("redis://127.0.0.1:"));
    assert_eq!(cli(&redis, &["SET", "k", "v"])?, "OK");
    assert_eq!(cli(&redis, &["GET", "k"])?, "v");
    // No persistence: nothing is saved, ever.
    assert_eq!(cli(&redis, &["CONFIG", "GET", "appendonly"])?, "appendonly\nno");

    redis.freeze()?;
    assert!(!answers(&redis, Duration::from_millis(200)), "a frozen Redis answered");
    redis.thaw()?;
    assert!(answers(&redis, Duration::from_secs(2)));

    let pid = redis.pid().ok_or("no pid")?;
    redis.kill();
    assert!(!Path::new(&format!("/proc/{pid}")).exists() || redis.pid().is_none());
    redis.restart()?;
    assert_eq!(
        cli(&redis, &["EXISTS", "k"])?,
        "0",
        "a restarted Redis without persistence is empty"
    );

    let (dir, pid) = (redis.dir().to_path_buf(), redis.pid().ok_or("no pid")?);
    drop(redis);
    assert!(!dir.exists(), "temp dir left behind");
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "redis-server left running"
    );
    Ok(())
}
