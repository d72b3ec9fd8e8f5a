//! Round trips through the client against an in-process server (memory
//! backend, loopback TCP), next to their floor: a raw tokio TCP echo of a
//! frame of the same size, measured in the same process and runtime.
//!
//! One criterion group, `roundtrip`, holds the three. Before criterion runs, a
//! fixed number of sequential round trips of each is recorded in an
//! HDR histogram and p50/p99 are printed, so figures can be quoted:
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

/// Records `$n` sequential round trips of `$once` (after `$n / 10` of
/// warm-up), prints p50/p99 and evaluates to p50 in µs. A macro so the
/// round trip may borrow anything mutably.
macro_rules! percentiles {
    ($name:expr, $n:expr, $once:expr) => {{
        for _ in 0..$n / 10 {
            $once.await;
        }
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).unwrap();
        for _ in 0..$n {
            let start = Instant::now();
            $once.await;
            h.saturating_record(u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX).max(1));
        }
        let us = |q: f64| h.value_at_quantile(q) as f64 / 1e3;
        println!(
            "{:<24} n={:<7} p50 {:>7.1} µs   p99 {:>7.1} µs   max {:>8.1} µs",
            $name,
            $n,
            us(0.5),
            us(0.99),
            h.max() as f64 / 1e3
        );
        us(0.5)
    }};
}

fn print_percentiles(rt: &Runtime, env: &Env, n: u64) {
    rt.block_on(async {
        println!("roundtrip percentiles ({n} sequential round trips each, in-process server, memory backend):");
        let echo = {
            let mut stream = env.echo.lock().await;
            percentiles!("echo_floor", n, echo_once(&mut stream))
        };
        let ping = percentiles!("client_ping", n, ping_once(&env.client));
        let acq = percentiles!("client_acquire_release", n, acquire_release_once(&env.client));
        println!(
            "ratios to the echo floor (p50): ping {:.2}x (goal 1.3x), acquire+release {:.2}x (goal 2.5x)",
            ping / echo,
            acq / echo
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
