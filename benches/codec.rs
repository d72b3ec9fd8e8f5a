//! Encode and decode cost of every message of the protocol, through the same
//! code paths the server and the client use: `encode` into a reused buffer,
//! and `ClastorCodec::decode` (framing and header) followed by the body decoder
//! (the input buffer is prepared outside the timed section).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use bytes::BytesMut;
use clastor_protocol::{
    Acquire, AcquireOk, ClastorCodec, Event, HeldLock, HeldScope, Hello, HelloOk, KindMode, LockMode, LostReason,
    Request, Response, ResponseBody, Status, VersionInfo,
};
use criterion::{BatchSize, Criterion, Throughput};
use tokio_util::codec::Decoder;

fn requests() -> Vec<(&'static str, Request)> {
    vec![
        (
            "hello",
            Request::Hello(Hello {
                min_version: 1,
                max_version: 1,
                client_name: "bench/clastor-client 0.1".into(),
            }),
        ),
        ("ping", Request::Ping),
        (
            "acquire",
            Request::Acquire(Acquire {
                kind: "transaction".into(),
                id: "tx-1234567".into(),
                wait_ms: 5000,
                lease_ms: 30_000,
                mode: LockMode::Exclusive,
                trace_id: None,
            }),
        ),
        (
            "release",
            Request::Release {
                kind: "transaction".into(),
                id: "tx-1234567".into(),
                token: 1_795_712_686_699_836_350,
            },
        ),
        (
            "renew",
            Request::Renew {
                kind: "transaction".into(),
                id: "tx-1234567".into(),
                lease_ms: 30_000,
                token: 1_795_712_686_699_836_350,
            },
        ),
        (
            "held",
            Request::Held {
                scope: HeldScope::Server,
            },
        ),
        (
            "version",
            Request::Version {
                kind: "transaction".into(),
            },
        ),
        ("info", Request::Info),
    ]
}

fn held_lock(i: u64) -> HeldLock {
    HeldLock {
        kind: "transaction".into(),
        id: format!("tx-{i:07}"),
        token: 1_000_000 + i,
        version: "v1".into(),
        lease_remaining_ms: 12_000,
        connection_id: 42,
        trace_id: None,
        mode: None,
    }
}

fn responses() -> Vec<(&'static str, Response)> {
    vec![
        (
            "hello",
            Response::ok(
                1,
                ResponseBody::Hello(HelloOk {
                    version: 1,
                    connection_id: 42,
                    max_frame_len: 65_536,
                    max_in_flight: 512,
                    server: "clastor 0.1.0 (memory)".into(),
                    confirm_ms: None,
                }),
            ),
        ),
        ("pong", Response::ok(7, ResponseBody::Pong)),
        (
            "acquired",
            Response::ok(
                7,
                ResponseBody::Acquired(AcquireOk {
                    token: 123_456_789,
                    lease_ms: 30_000,
                    version: "v1".into(),
                    safe_ms: None,
                }),
            ),
        ),
        ("released", Response::ok(7, ResponseBody::Released { released: true })),
        (
            "renewed",
            Response::ok(
                7,
                ResponseBody::Renewed {
                    token: 123_456_789,
                    lease_ms: 30_000,
                    safe_ms: None,
                },
            ),
        ),
        (
            "held_10",
            Response::ok(7, ResponseBody::Held((0..10).map(held_lock).collect())),
        ),
        (
            "version",
            Response::ok(
                7,
                ResponseBody::Version(VersionInfo {
                    version: "v1".into(),
                    mode: KindMode::Normal,
                    drain: None,
                    layout: None,
                }),
            ),
        ),
        (
            "info_10",
            Response::ok(
                7,
                ResponseBody::Info(
                    (0..10)
                        .map(|i| (format!("counter_{i}"), (i * 1000).to_string()))
                        .collect(),
                ),
            ),
        ),
        (
            "error_timeout",
            Response::error(7, 0x10, Status::Timeout, "not acquired within 5000 ms"),
        ),
    ]
}

fn events() -> Vec<(&'static str, Event)> {
    vec![
        (
            "lock_lost",
            Event::LockLost {
                kind: "transaction".into(),
                id: "tx-1234567".into(),
                token: 123_456_789,
                reason: LostReason::LeaseExpired,
            },
        ),
        (
            "closing",
            Event::Closing {
                status: Status::ShuttingDown,
                message: "server shutting down".into(),
            },
        ),
    ]
}

fn bench_encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode");
    let mut buf = BytesMut::with_capacity(4096);
    for (name, req) in requests() {
        g.bench_function(format!("request/{name}"), |b| {
            b.iter(|| {
                buf.clear();
                black_box(&req).encode(black_box(7), &mut buf);
                black_box(buf.len())
            });
        });
    }
    for (name, resp) in responses() {
        g.bench_function(format!("response/{name}"), |b| {
            b.iter(|| {
                buf.clear();
                black_box(&resp).encode(&mut buf);
                black_box(buf.len())
            });
        });
    }
    for (name, ev) in events() {
        g.bench_function(format!("event/{name}"), |b| {
            b.iter(|| {
                buf.clear();
                black_box(&ev).encode(&mut buf);
                black_box(buf.len())
            });
        });
    }
    g.finish();
}

/// Decodes one frame from `src` (framing, header, then the body with `body`).
fn decode_with<T>(
    codec: &mut ClastorCodec,
    mut src: BytesMut,
    body: impl Fn(&clastor_protocol::Header, bytes::Bytes) -> T,
) -> T {
    let frame = codec.decode(&mut src).unwrap().unwrap();
    body(&frame.header, frame.body)
}

fn bench_decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode");
    let mut codec = ClastorCodec::default();
    for (name, req) in requests() {
        let mut wire = BytesMut::new();
        req.encode(7, &mut wire);
        g.throughput(Throughput::Bytes(wire.len() as u64));
        g.bench_function(format!("request/{name}"), |b| {
            b.iter_batched(
                || wire.clone(),
                |src| decode_with(&mut codec, src, |h, body| Request::decode(h, body).unwrap()),
                BatchSize::SmallInput,
            );
        });
    }
    for (name, resp) in responses() {
        let mut wire = BytesMut::new();
        resp.encode(&mut wire);
        g.throughput(Throughput::Bytes(wire.len() as u64));
        g.bench_function(format!("response/{name}"), |b| {
            b.iter_batched(
                || wire.clone(),
                |src| decode_with(&mut codec, src, |h, body| Response::decode(h, body).unwrap()),
                BatchSize::SmallInput,
            );
        });
    }
    for (name, ev) in events() {
        let mut wire = BytesMut::new();
        ev.encode(&mut wire);
        g.throughput(Throughput::Bytes(wire.len() as u64));
        g.bench_function(format!("event/{name}"), |b| {
            b.iter_batched(
                || wire.clone(),
                |src| decode_with(&mut codec, src, |h, body| Event::decode(h, body).unwrap()),
                BatchSize::SmallInput,
            );
        });
    }
    g.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench_encode(&mut c);
    bench_decode(&mut c);
    c.final_summary();
}
