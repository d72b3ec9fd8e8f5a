//! `--op idle` and `--op hold`: what connections and held locks cost a
//! server in memory, as its operator would see it. A `clastor serve`
//! (memory backend) is started as a child process — this binary, or
//! `--serve-bin` to compare builds — and its resident set (`VmRSS` in
//! `/proc/<pid>/status`, Linux only) is read before and after the load
//! process opens idle connections (handshake done, nothing else) or takes
//! locks on many connections. The difference over the count is the cost of
//! one; allocator slack is included, as it is in a real server.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::BytesMut;
use clastor_protocol::{Acquire, HIGHEST_VERSION, Hello, LockMode, Request, Response, split_frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// Connections opened at once while filling the server.
const OPEN_BATCH: usize = 256;

/// Let the server settle (freed memory returned, tasks parked) before a reading.
const SETTLE: Duration = Duration::from_millis(700);

/// A measured footprint.
#[derive(Debug)]
pub(super) struct Footprint {
    pub(super) what: String,
    pub(super) count: usize,
    pub(super) rss_before: u64,
    pub(super) rss_after: u64,
}

impl Footprint {
    pub(super) fn per_item(&self) -> f64 {
        self.rss_after.saturating_sub(self.rss_before) as f64 / self.count.max(1) as f64
    }

    pub(super) fn print(&self, json: bool, scenario: &str) {
        if json {
            let v = serde_json::json!({
                "scenario": scenario, "series": "clastor", "what": self.what, "count": self.count,
                "rss_before_kib": self.rss_before / 1024, "rss_after_kib": self.rss_after / 1024,
                "bytes_each": self.per_item().round(),
            });
            println!("{v}");
        } else {
            println!(
                "{}: {} -> {} KiB resident for {}: {:.0} bytes each",
                self.what,
                self.rss_before / 1024,
                self.rss_after / 1024,
                self.count,
                self.per_item()
            );
        }
    }
}

/// A `clastor serve` child, killed when dropped.
struct Server {
    child: Child,
    pid: u32,
    addr: String,
}

impl Server {
    async fn start(bin: &Path, connections: usize) -> anyhow::Result<Server> {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            l.local_addr()?.port()
        };
        let addr = format!("127.0.0.1:{port}");
        let child = Command::new(bin)
            .args(["serve", "--listen", &addr, "--max-connections"])
            .arg((connections + 16).to_string())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {} serve", bin.display()))?;
        let pid = child.id().context("server exited at once")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(&addr).await.is_err() {
            if Instant::now() > deadline {
                bail!("server at {addr} not listening after 10 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Server { child, pid, addr })
    }

    fn rss(&self) -> anyhow::Result<u64> {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid)).context("read /proc (Linux only)")?;
        let kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .context("no VmRSS in /proc/<pid>/status")?;
        Ok(kib * 1024)
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// A connection that completed `HELLO`.
async fn open(addr: &str) -> anyhow::Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let mut buf = BytesMut::new();
    Request::Hello(Hello {
        min_version: 1,
        max_version: HIGHEST_VERSION,
        client_name: "clastor-load/footprint".into(),
    })
    .encode(1, &mut buf);
    s.write_all_buf(&mut buf).await?;
    expect_replies(&mut s, 1).await?;
    Ok(s)
}

/// Reads `n` replies, failing on the first error reply.
async fn expect_replies(s: &mut TcpStream, n: usize) -> anyhow::Result<()> {
    let mut buf = BytesMut::with_capacity(4096);
    let mut seen = 0;
    while seen < n {
        while let Some(frame) = split_frame(&mut buf) {
            let resp = Response::decode(&frame.header, frame.body)?;
            if let Err(e) = resp.result {
                bail!("refused: {} {}", e.status, e.message);
            }
            seen += 1;
        }
        if seen < n && s.read_buf(&mut buf).await? == 0 {
            bail!("server closed the connection");
        }
    }
    Ok(())
}

async fn open_many(addr: &str, n: usize) -> anyhow::Result<Vec<TcpStream>> {
    let mut conns = Vec::with_capacity(n);
    while conns.len() < n {
        let batch = OPEN_BATCH.min(n - conns.len());
        let opened = futures_util::future::join_all((0..batch).map(|_| open(addr))).await;
        for c in opened {
            conns.push(c?);
        }
    }
    Ok(conns)
}

/// The resident memory `n` idle connections cost the server.
pub(super) async fn idle_connections(bin: &Path, n: usize) -> anyhow::Result<Footprint> {
    let server = Server::start(bin, n).await?;
    // One connection first, so the runtime's one-off allocations are in the baseline.
    let warm = open(&server.addr).await?;
    tokio::time::sleep(SETTLE).await;
    let rss_before = server.rss()?;
    let conns = open_many(&server.addr, n).await?;
    tokio::time::sleep(SETTLE).await;
    let rss_after = server.rss()?;
    drop((conns, warm));
    server.stop().await;
    Ok(Footprint {
        what: "idle connection".into(),
        count: n,
        rss_before,
        rss_after,
    })
}

/// Connections the held locks are spread over (each under the default
/// per-session limit of 1,024).
const HOLDERS: usize = 100;

/// The resident memory `n` held locks cost the server (memory backend),
/// beyond the connections holding them.
pub(super) async fn held_locks(bin: &Path, n: usize) -> anyhow::Result<Footprint> {
    let server = Server::start(bin, HOLDERS).await?;
    let mut conns = open_many(&server.addr, HOLDERS).await?;
    // The tables the locks grow (session maps, backend shards) count: a
    // server holding them pays for them.
    tokio::time::sleep(SETTLE).await;
    let rss_before = server.rss()?;
    let per_conn = n.div_ceil(HOLDERS);
    let run = std::process::id();
    let acquires = conns.iter_mut().enumerate().map(|(c, s)| async move {
        let mut buf = BytesMut::new();
        let count = per_conn.min(n.saturating_sub(c * per_conn));
        for j in 0..count {
            Request::Acquire(Acquire {
                kind: "hold".into(),
                id: format!("h{run}-c{c}-{j}"),
                wait_ms: 0,
                lease_ms: 0,
                mode: LockMode::Exclusive,
                trace_id: None,
            })
            .encode(2 + j as u32, &mut buf);
        }
        s.write_all_buf(&mut buf).await?;
        expect_replies(s, count).await
    });
    for r in futures_util::future::join_all(acquires).await {
        r?;
    }
    tokio::time::sleep(SETTLE).await;
    let rss_after = server.rss()?;
    drop(conns);
    server.stop().await;
    Ok(Footprint {
        what: "held lock".into(),
        count: n,
        rss_before,
        rss_after,
    })
}
