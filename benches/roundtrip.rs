//! Round trips through the client against an in-process server (memory
//! backend, loopback TCP), next to their floor: a raw tokio TCP echo of a
//! frame of the same size, measured in the same process and runtime.
//!
//! One criterion group, `roundtrip`, holds them (and a two-lock transfer:
//! `lock_many` of two keys, then release). Before criterion runs, a
//! fixed number of sequential round trips of each is recorded in an HDR
//! histogram and p50/p99 are printed, so figures can be quoted. The three are
//! interleaved (one echo, one ping, one acquire+release per round, in the same
//! task on the same runtime), so the floor and the paths measured against it
//! see the same machine state: a noisy second slows all three alike instead of
//! skewing one ratio.
//!
//! ```text
//! cargo bench --bench roundtrip
//! ```
//!
//! Goals (reported, not asserted): client PING p50 within 1.3x of the echo
//! floor; acquire+release p50 within 2.5x.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clastor::server::ServerHandle;
use clastor_client::Client;
use criterion::Criterion;
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::sync::Mutex;

/// A PONG reply is the larger side of a ping: 4-byte length, 8-byte header,
/// 2-byte status. The echo sends and receives frames of this size.
const FRAME_LEN: usize = 14;

struct Env {
    _server: ServerHandle,
    client: Client,
    echo: Arc<Mutex<TcpStream>>,
}

async fn start_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            stream.set_nodelay(true).unwrap();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                loop {
                    let n = match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if stream.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

impl Env {
    async fn start() -> Env {
        let (server, _) = support::start_default().await;
        let client = Client::connect(server.local_addr()).await.unwrap();
        let echo = TcpStream::connect(start_echo().await).await.unwrap();
        echo.set_nodelay(true).unwrap();
        Env {
            _server: server,
            client,
            echo: Arc::new(Mutex::new(echo)),
        }
    }
}

async fn echo_once(stream: &mut TcpStream) {
    let frame = [0u8; FRAME_LEN];
    let mut back = [0u8; FRAME_LEN];
    stream.write_all(&frame).await.unwrap();
    stream.read_exact(&mut back).await.unwrap();
}

async fn ping_once(client: &Client) {
    client.ping().await.unwrap();
}

async fn acquire_release_once(client: &Client) {
    let guard = client
        .lock("bench", "roundtrip")
        .try_acquire()
        .await
        .unwrap()
        .expect("uncontended");
    guard.release().await.unwrap();
}

/// A two-lock transfer's locking, as an application does it: both accounts
/// in one `lock_many` (pipelined when the wait is zero), then released.
async fn two_locks_once(client: &Client) {
    let guard = client
        .lock_many([("account", "alice"), ("account", "bob")])
        .try_acquire()
        .await
        .unwrap()
        .expect("uncontended");
    guard.release().await.unwrap();
}

/// One latency histogram, in ns.
struct Latencies(Histogram<u64>);

impl Latencies {
    fn new() -> Latencies {
        Latencies(Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).unwrap())
    }

    fn record(&mut self, d: Duration) {
        self.0
            .saturating_record(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1));
    }

    /// Microseconds at quantile `q`.
    fn us(&self, q: f64) -> f64 {
        self.0.value_at_quantile(q) as f64 / 1e3
    }

    fn print(&self, name: &str) {
        println!(
            "{name:<24} n={:<7} p50 {:>7.1} µs   p99 {:>7.1} µs   max {:>8.1} µs",
            self.0.len(),
            self.us(0.5),
            self.us(0.99),
            self.0.max() as f64 / 1e3
        );
    }
}

fn print_percentiles(rt: &Runtime, env: &Env, n: u64) {
    rt.block_on(async {
        println!(
            "roundtrip percentiles ({n} rounds of echo, ping, acquire+release, interleaved; in-process server, memory backend):"
        );
        let mut stream = env.echo.lock().await;
        for _ in 0..n / 10 {
            echo_once(&mut stream).await;
            ping_once(&env.client).await;
            acquire_release_once(&env.client).await;
            two_locks_once(&env.client).await;
        }
        let (mut echo, mut ping, mut acq, mut two) =
            (Latencies::new(), Latencies::new(), Latencies::new(), Latencies::new());
        for _ in 0..n {
            let start = Instant::now();
            echo_once(&mut stream).await;
            echo.record(start.elapsed());
            let start = Instant::now();
            ping_once(&env.client).await;
            ping.record(start.elapsed());
            let start = Instant::now();
            acquire_release_once(&env.client).await;
            acq.record(start.elapsed());
            let start = Instant::now();
            two_locks_once(&env.client).await;
            two.record(start.elapsed());
        }
        echo.print("echo_floor");
        ping.print("client_ping");
        acq.print("client_acquire_release");
        two.print("client_two_lock_transfer");
        println!(
            "ratios to the echo floor: ping p50 {:.2}x p99 {:.2}x (goal p50 1.3x); \
             acquire+release p50 {:.2}x p99 {:.2}x (goal p50 2.5x)",
            ping.us(0.5) / echo.us(0.5),
            ping.us(0.99) / echo.us(0.99),
            acq.us(0.5) / echo.us(0.5),
            acq.us(0.99) / echo.us(0.99),
        );
    });
}

fn bench(c: &mut Criterion, rt: &Runtime, env: &Env) {
    let mut g = c.benchmark_group("roundtrip");
    g.measurement_time(Duration::from_secs(5));
    g.bench_function("echo_floor", |b| {
        b.to_async(rt).iter_custom(|iters| {
            let echo = env.echo.clone();
            async move {
                let mut stream = echo.lock().await;
                let start = Instant::now();
                for _ in 0..iters {
                    echo_once(&mut stream).await;
                }
                start.elapsed()
            }
        });
    });
    g.bench_function("client_ping", |b| {
        b.to_async(rt).iter(|| ping_once(&env.client));
    });
    g.bench_function("client_acquire_release", |b| {
        b.to_async(rt).iter(|| acquire_release_once(&env.client));
    });
    g.bench_function("client_two_lock_transfer", |b| {
        b.to_async(rt).iter(|| two_locks_once(&env.client));
    });
    g.finish();
}

fn main() {
    // Two workers for two cores: server, client and echo share the machine
    // the way they do in production on a small box.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let env = rt.block_on(Env::start());
    // `cargo test --benches` / `cargo bench -- --test` pass `--test`: keep it quick.
    let quick = std::env::args().any(|a| a == "--test");
    print_percentiles(&rt, &env, if quick { 200 } else { 20_000 });
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c, &rt, &env);
    c.final_summary();
}
