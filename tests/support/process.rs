//! `clastor serve` as a child process, the way an operator runs it, for
//! tests that freeze, signal or kill a server; and `clastor load` as
//! `scripts/perf.sh` runs it.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free loopback port (bound, then released for the server to take).
pub(crate) fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// A `clastor serve` child, killed on drop if still running.
pub(crate) struct Server {
    pub(crate) child: Child,
    pub(crate) addr: SocketAddr,
}

impl Server {
    /// Starts the server and waits until it logs that it listens.
    pub(crate) fn start(extra: &[&str]) -> Server {
        let addr = free_port();
        let mut child = Command::new(env!("CARGO_BIN_EXE_clastor"))
            .args(["serve", "--listen", &addr.to_string()])
            .args(extra)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let line = lines.next().expect("server exited before listening").unwrap();
            if line.contains("listening") {
                break;
            }
            assert!(Instant::now() < deadline, "server did not start");
        }
        // Keep draining stderr so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Server { child, addr }
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub(crate) fn terminate(mut self) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "server exited with {status}");
                return;
            }
            assert!(Instant::now() < deadline, "server did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `signal` (`STOP`, `CONT`) to a process.
pub(crate) fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

/// Nanoseconds since the Unix epoch: the one clock a child shell and this
/// test share.
pub(crate) fn wall_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// `clastor load {store} {url}` for acquire+release pairs, one client,
/// interleaved, as `scripts/perf.sh` runs it but for one second: asserts it
/// succeeds, that every one of `series` is in its output, and that no row
/// counted an error (a failing operation still prints its row).
pub(crate) fn load_harness_runs(store: &str, url: &str, series: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_clastor"))
        .args([
            "load",
            store,
            url,
            "--op",
            "acquire-release",
            "--clients",
            "1",
            "--interleave",
            "--duration",
            "1s",
            "--warmup",
            "0s",
        ])
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "clastor load failed:\n{stdout}\n{stderr}");
    for s in series {
        assert!(stdout.contains(s), "no {s} series in:\n{stdout}");
    }
    // Rows (`… [1x1]  ops/s … errors`) end with their errors column; one
    // row at least per series asked for, so the check cannot pass on no row.
    let rows: Vec<&str> = stdout.lines().filter(|l| l.contains("[1x1] ")).collect();
    assert!(rows.len() >= series.len(), "fewer rows than series in:\n{stdout}");
    for row in rows {
        assert_eq!(row.split_whitespace().last(), Some("0"), "errors in {row:?}:\n{stdout}");
    }
}
