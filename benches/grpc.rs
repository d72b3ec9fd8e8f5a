//! gRPC next to the binary protocol: acquire+release round trips against
//! one in-process server (memory backend, loopback), through the binary
//! client crate, a gRPC `Session` stream and unary gRPC calls on an
//! `OpenSession` session (a tonic client generated from the `.proto`).
//!
//! The three are interleaved (one of each per round, in the same task on
//! the same runtime), so a noisy moment slows all three alike. Figures
//! (p50, p99) are printed from HDR histograms, for PERFORMANCE.md:
//!
//! ```text
//! cargo bench --bench grpc
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use clastor::EngineConfig;
use clastor::server::grpc_proto as pb;
use clastor::server::{GrpcConfig, ServerConfig};
use hdrhistogram::Histogram;
use pb::session_event::Event as Out;
use pb::session_request::Op;
use support::grpc::{Stream, acquire, connect};

const ROUNDS: u64 = 20_000;
const WARMUP: u64 = 2_000;

fn micros(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let config = ServerConfig {
            grpc: Some(GrpcConfig::new("127.0.0.1:0".parse().unwrap())),
            ..ServerConfig::default()
        };
        let (server, _backend) = support::start(config, EngineConfig::default()).await;
        let binary = clastor_client::Client::connect(server.local_addr()).await.unwrap();
        let mut grpc = connect(server.grpc_addr().unwrap()).await;
        let mut stream = Stream::open(&mut grpc).await;
        let sid = grpc
            .open_session(pb::OpenSessionRequest::default())
            .await
            .unwrap()
            .into_inner()
            .session_id;
        let mut hists = [(); 3].map(|()| Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3).unwrap());
        let mut rid = 0u64;
        for round in 0..ROUNDS + WARMUP {
            let t = Instant::now();
            let g = binary.lock("bench", "binary").try_acquire().await.unwrap().unwrap();
            g.release().await.unwrap();
            let binary_ns = t.elapsed();

            let t = Instant::now();
            rid += 1;
            let Out::Acquired(a) = stream.call(rid, Op::Acquire(acquire("bench", "stream", 0))).await else {
                panic!("not an acquire reply")
            };
            assert!(a.granted);
            rid += 1;
            let released = stream
                .call(
                    rid,
                    Op::Release(pb::ReleaseRequest {
                        kind: "bench".into(),
                        id: "stream".into(),
                        token: a.token,
                        ..Default::default()
                    }),
                )
                .await;
            assert!(matches!(released, Out::Released(pb::ReleaseReply { released: true })));
            let stream_ns = t.elapsed();

            let t = Instant::now();
            let a = grpc
                .acquire(pb::AcquireRequest {
                    session_id: sid,
                    ..acquire("bench", "unary", 0)
                })
                .await
                .unwrap()
                .into_inner();
            assert!(a.granted);
            grpc.release(pb::ReleaseRequest {
                session_id: sid,
                kind: "bench".into(),
                id: "unary".into(),
                token: a.token,
            })
            .await
            .unwrap();
            let unary_ns = t.elapsed();

            if round >= WARMUP {
                for (h, d) in hists.iter_mut().zip([binary_ns, stream_ns, unary_ns]) {
                    h.record(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)).unwrap();
                }
            }
        }
        println!("acquire+release, memory backend, loopback, {ROUNDS} sequential rounds (interleaved):");
        for (name, h) in ["binary client", "gRPC stream", "gRPC unary"].iter().zip(&hists) {
            println!(
                "  {name:<14} p50 {:>7.1} µs   p99 {:>7.1} µs",
                micros(h, 0.5),
                micros(h, 0.99)
            );
        }
        drop(stream);
        server.shutdown().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    });
}
