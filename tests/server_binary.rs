//! The binary protocol against a real in-process server, through raw frames:
//! handshake, pipelining, malformed and hostile input, limits, lifecycle.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use clastor::EngineConfig;
use clastor::server::ServerConfig;
use clastor_protocol::{Acquire, Event, Hello, LockMode, LostReason, Opcode, Request, ResponseBody, Status};
use support::{Incoming, Raw, Text, start, start_default, try_acquire_request};

fn acquire(kind: &str, id: &str, wait_ms: u32, lease_ms: u32) -> Request {
    Request::Acquire(Acquire {
        kind: kind.into(),
        id: id.into(),
        wait_ms,
        lease_ms,
        mode: LockMode::Exclusive,
        trace_id: None,
    })
}

fn token(resp: &clastor_protocol::Response) -> u64 {
    match &resp.result {
        Ok(ResponseBody::Acquired(a)) => a.token,
        other => panic!("not a grant: {other:?}"),
    }
}

/// A frame with the given header fields and body, as bytes.
fn frame(version: u8, opcode: u8, flags: u16, request_id: u32, body: &[u8]) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u32(8 + body.len() as u32);
    b.put_u8(version);
    b.put_u8(opcode);
    b.put_u16(flags);
    b.put_u32(request_id);
    b.put_slice(body);
    b.to_vec()
}

/// A HELLO offering `min ..= max` gets VERSION_MISMATCH, then CLOSING and
/// the end of the connection.
async fn refused_as_version_mismatch(addr: std::net::SocketAddr, min_version: u8, max_version: u8) {
    let mut raw = Raw::connect(addr).await;
    let resp = raw
        .call(Request::Hello(Hello {
            min_version,
            max_version,
            client_name: "mismatch".into(),
        }))
        .await;
    assert_eq!(resp.status(), Status::VersionMismatch);
    let rest = raw.until_closed().await;
    assert!(
        matches!(
            rest.as_slice(),
            [Incoming::Event(Event::Closing {
                status: Status::VersionMismatch,
                ..
            })]
        ),
        "{rest:?}"
    );
}

#[tokio::test]
async fn handshake_is_required_and_negotiated() {
    let (server, _) = start_default().await;
    let addr = server.local_addr();
    let mut raw = Raw::connect(addr).await;
    assert_eq!(raw.call(Request::Ping).await.status(), Status::HandshakeRequired);
    let hello = raw
        .call(Request::Hello(Hello {
            min_version: 1,
            max_version: 4,
            client_name: "t".into(),
        }))
        .await;
    match hello.result {
        Ok(ResponseBody::Hello(h)) => {
            // The highest version both speak: this server speaks 1 to 4.
            assert_eq!(h.version, 4);
            assert!(
                h.confirm_ms.is_some_and(|ms| ms > 0),
                "version 2 and later announce confirm_ms"
            );
            assert!(h.connection_id > 0);
            assert!(h.server.starts_with("clastor "));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(raw.call(Request::Ping).await.result, Ok(ResponseBody::Pong));
    let again = raw
        .call(Request::Hello(Hello {
            min_version: 1,
            max_version: 1,
            client_name: "t".into(),
        }))
        .await;
    assert_eq!(again.status(), Status::BadRequest);

    refused_as_version_mismatch(addr, 5, 9).await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_blocked_acquire_does_not_hold_up_a_ping() {
    let (server, _) = start_default().await;
    let addr = server.local_addr();
    let (mut a, _) = Raw::hello(addr).await;
    let (mut b, _) = Raw::hello(addr).await;
    let ta = token(&a.call(acquire("k", "i", 0, 0)).await);
    let acq_id = b.send(&acquire("k", "i", 10_000, 0)).await;
    let ping_id = b.send(&Request::Ping).await;
    let first = b.response().await;
    assert_eq!((first.request_id, first.result), (ping_id, Ok(ResponseBody::Pong)));
    assert_eq!(
        a.call(Request::Release {
            kind: "k".into(),
            id: "i".into(),
            token: 0,
        })
        .await
        .result,
        Ok(ResponseBody::Released { released: true })
    );
    let second = b.response().await;
    assert_eq!(second.request_id, acq_id);
    assert!(token(&second) > ta);
    server.shutdown().await;
}

#[tokio::test]
async fn hundreds_of_pipelined_requests_on_one_connection() {
    let (server, _) = start_default().await;
    let (mut c, _) = Raw::hello(server.local_addr()).await;
    let mut ids = std::collections::HashSet::new();
    for i in 0..300 {
        ids.insert(c.send(&acquire("pipe", &format!("id-{i}"), 1000, 0)).await);
    }
    for _ in 0..300 {
        let r = c.response().await;
        assert!(ids.remove(&r.request_id), "unexpected or duplicate id {}", r.request_id);
        token(&r);
    }
    let held = c
        .call(Request::Held {
            scope: clastor_protocol::HeldScope::Connection,
        })
        .await;
    assert!(matches!(held.result, Ok(ResponseBody::Held(ref l)) if l.len() == 300));
    server.shutdown().await;
}

#[tokio::test]
async fn malformed_bodies_get_an_error_and_the_connection_lives() {
    let (server, _) = start_default().await;
    let (mut c, _) = Raw::hello(server.local_addr()).await;
    // ACQUIRE whose body stops inside the id string.
    c.send_bytes(&frame(1, Opcode::Acquire as u8, 0, 77, &[0, 1, b'k', 0, 9, b'x']))
        .await;
    let r = c.response().await;
    assert_eq!((r.request_id, r.status()), (77, Status::BadRequest));
    // Trailing bytes after a PING.
    c.send_bytes(&frame(1, Opcode::Ping as u8, 0, 78, &[1, 2, 3])).await;
    assert_eq!(c.response().await.status(), Status::BadRequest);
    // Bad UTF-8 in a name.
    c.send_bytes(&frame(1, Opcode::Version as u8, 0, 79, &[0, 2, 0xff, 0xfe]))
        .await;
    assert_eq!(c.response().await.status(), Status::BadRequest);
    // Reserved mode value.
    let mut body = vec![0, 1, b'k', 0, 1, b'i'];
    body.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 9]);
    c.send_bytes(&frame(1, Opcode::Acquire as u8, 0, 80, &body)).await;
    assert_eq!(c.response().await.status(), Status::BadRequest);
    // Unknown opcode, and an event opcode sent by a client.
    c.send_bytes(&frame(1, 0x42, 0, 81, &[])).await;
    let r = c.response().await;
    assert_eq!((r.request_id, r.opcode, r.status()), (81, 0x42, Status::UnknownOpcode));
    c.send_bytes(&frame(1, Opcode::LockLost as u8, 0, 82, &[])).await;
    assert_eq!(c.response().await.status(), Status::UnknownOpcode);
    // Response flag on a request; request id 0.
    c.send_bytes(&frame(1, Opcode::Ping as u8, 1, 83, &[])).await;
    assert_eq!(c.response().await.status(), Status::BadRequest);
    c.send_bytes(&frame(1, Opcode::Ping as u8, 0, 0, &[])).await;
    assert_eq!(c.response().await.status(), Status::BadRequest);
    // Shared mode is reserved: a clear refusal.
    let shared = Request::Acquire(Acquire {
        kind: "k".into(),
        id: "i".into(),
        wait_ms: 0,
        lease_ms: 0,
        mode: LockMode::Shared,
        trace_id: None,
    });
    assert_eq!(c.call(shared).await.status(), Status::Unsupported);
    assert_eq!(c.call(Request::Ping).await.result, Ok(ResponseBody::Pong));
    server.shutdown().await;
}

#[tokio::test]
async fn hostile_names_are_refused() {
    let (server, backend) = start_default().await;
    let (mut c, _) = Raw::hello(server.local_addr()).await;
    let long = "x".repeat(129);
    for (kind, id) in [
        ("..", "x"),
        ("k", "."),
        ("k", ".."),
        ("k", "../../etc/passwd"),
        ("a/b", "x"),
        ("k", "/"),
        ("k", "a\0b"),
        ("", "x"),
        ("k", ""),
        ("k", long.as_str()),
        ("k", "a b"),
        ("k", "\u{202e}x"),
    ] {
        let r = c.call(acquire(kind, id, 0, 0)).await;
        assert_eq!(r.status(), Status::InvalidName, "{kind:?}/{id:?}");
        let r = c
            .call(Request::Release {
                kind: kind.into(),
                id: id.into(),
                token: 0,
            })
            .await;
        assert_eq!(r.status(), Status::InvalidName, "{kind:?}/{id:?}");
    }
    assert_eq!(
        c.call(Request::Version { kind: "../x".into() }).await.status(),
        Status::InvalidName
    );
    assert_eq!(backend.active_keys(), 0);
    server.shutdown().await;
}

#[tokio::test]
async fn broken_frames_close_the_connection_after_an_error_frame() {
    let (server, _) = start_default().await;
    let addr = server.local_addr();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("shorter than a header", vec![0, 0, 0, 3, 1, 2, 3]),
        ("wrong version", frame(9, Opcode::Ping as u8, 0, 1, &[])),
        // Announces 1 MiB; the server must not wait for (or buffer) the body.
        ("oversize", vec![0, 0x10, 0, 0, 1, 2, 0, 0]),
    ];
    for (what, bytes) in cases {
        let (mut c, _) = Raw::hello(addr).await;
        c.send_bytes(&bytes).await;
        let got = c.until_closed().await;
        assert!(
            matches!(
                got.as_slice(),
                [Incoming::Event(Event::Closing {
                    status: Status::ProtocolError,
                    ..
                })]
            ),
            "{what}: {got:?}"
        );
    }
    let (mut ok, _) = Raw::hello(addr).await;
    assert_eq!(ok.call(Request::Ping).await.result, Ok(ResponseBody::Pong));
    server.shutdown().await;
}

#[tokio::test]
async fn random_garbage_never_hurts_the_server() {
    let (server, backend) = start_default().await;
    let addr = server.local_addr();
    // A small deterministic generator: the same inputs every run.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let valid = {
        let mut b = BytesMut::new();
        acquire("k", "i", 0, 0).encode(5, &mut b);
        b.to_vec()
    };
    for round in 0..150 {
        let mut bytes: Vec<u8> = if round % 2 == 0 {
            (0..(next() % 64)).map(|_| next() as u8).collect()
        } else {
            let mut v = valid.clone();
            for _ in 0..(1 + next() % 3) {
                let i = (next() as usize) % v.len();
                v[i] ^= 1 << (next() % 8);
            }
            v.truncate(4 + (next() as usize) % (v.len() - 3));
            v
        };
        // Start in binary mode half of the time, after a proper handshake.
        let (mut c, _) = if round % 3 == 0 {
            (Raw::connect(addr).await, 0)
        } else {
            Raw::hello(addr).await
        };
        if bytes.is_empty() {
            bytes.push(0);
        }
        c.send_bytes(&bytes).await;
        drop(c);
    }
    let (mut c, _) = Raw::hello(addr).await;
    assert_eq!(c.call(Request::Ping).await.result, Ok(ResponseBody::Pong));
    // Every garbage connection ended (a panicking connection task would not
    // have: its count would stay up), and none left a lock behind.
    let deadline = std::time::Instant::now() + support::PATIENCE;
    loop {
        let info = match c.call(Request::Info).await.result {
            Ok(ResponseBody::Info(pairs)) => pairs,
            other => panic!("{other:?}"),
        };
        if info.iter().any(|(k, v)| k == "connections_open" && v == "1") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "garbage connections still open: {info:?}"
        );
        tokio::task::yield_now().await;
    }
    assert_eq!(backend.active_keys(), 0, "garbage left locks behind");
    drop(c);
    server.shutdown().await;
}

#[tokio::test]
async fn disconnect_releases_locks_and_hands_over() {
    let (server, backend) = start_default().await;
    let addr = server.local_addr();
    let (mut a, _) = Raw::hello(addr).await;
    let (mut b, _) = Raw::hello(addr).await;
    let ta = token(&a.call(acquire("transaction", "tx-1", 0, 0)).await);
    a.call(acquire("transaction", "tx-2", 0, 0)).await;
    b.send(&acquire("transaction", "tx-1", 10_000, 0)).await;
    while backend.queued_waiters() == 0 {
        tokio::task::yield_now().await;
    }
    drop(a);
    let tb = token(&b.response().await);
    assert!(tb > ta);
    let (mut c, _) = Raw::hello(addr).await;
    assert!(matches!(
        c.call(acquire("transaction", "tx-2", 1000, 0)).await.result,
        Ok(ResponseBody::Acquired(_))
    ));
    server.shutdown().await;
}

#[tokio::test]
async fn lease_expiry_pushes_lock_lost() {
    let (server, _) = start_default().await;
    let (mut c, _) = Raw::hello(server.local_addr()).await;
    let t = token(&c.call(acquire("k", "leased", 0, 100)).await);
    match c.next().await {
        Some(Incoming::Event(Event::LockLost {
            kind,
            id,
            token,
            reason,
        })) => {
            assert_eq!(
                (kind.as_str(), id.as_str(), token, reason),
                ("k", "leased", t, LostReason::LeaseExpired)
            );
        }
        other => panic!("{other:?}"),
    }
    let held = c
        .call(Request::Held {
            scope: clastor_protocol::HeldScope::Connection,
        })
        .await;
    assert_eq!(held.result, Ok(ResponseBody::Held(vec![])));
    server.shutdown().await;
}

#[tokio::test]
async fn release_renew_and_ownership_rules() {
    let (server, _) = start_default().await;
    let addr = server.local_addr();
    let (mut a, a_id) = Raw::hello(addr).await;
    let (mut b, _) = Raw::hello(addr).await;
    let t = token(&a.call(acquire("k", "i", 0, 0)).await);
    let rel = |k: &str| Request::Release {
        kind: "k".into(),
        id: k.into(),
        token: 0,
    };
    assert_eq!(b.call(rel("i")).await.status(), Status::NotOwner);
    assert_eq!(
        b.call(Request::Renew {
            kind: "k".into(),
            id: "i".into(),
            lease_ms: 1000,
            token: 0,
        })
        .await
        .status(),
        Status::NotHeld
    );
    assert_eq!(a.call(acquire("k", "i", 0, 0)).await.status(), Status::AlreadyHeld);
    let renewed = a
        .call(Request::Renew {
            kind: "k".into(),
            id: "i".into(),
            lease_ms: 60_000,
            token: 0,
        })
        .await;
    assert_eq!(
        renewed.result,
        Ok(ResponseBody::Renewed {
            token: t,
            lease_ms: 60_000,
            safe_ms: None,
        })
    );
    match b
        .call(Request::Held {
            scope: clastor_protocol::HeldScope::Server,
        })
        .await
        .result
    {
        Ok(ResponseBody::Held(list)) => {
            assert_eq!(list.len(), 1);
            assert_eq!((list[0].token, list[0].connection_id), (t, a_id));
            assert!(list[0].lease_remaining_ms > 50_000);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        a.call(rel("i")).await.result,
        Ok(ResponseBody::Released { released: true })
    );
    assert_eq!(
        a.call(rel("i")).await.result,
        Ok(ResponseBody::Released { released: false })
    );
    assert_eq!(
        b.call(rel("i")).await.result,
        Ok(ResponseBody::Released { released: false })
    );
    server.shutdown().await;
}

#[tokio::test]
async fn per_connection_limits_refuse_clearly() {
    let engine = EngineConfig {
        max_held_per_session: 3,
        max_waits_per_session: 2,
        ..EngineConfig::default()
    };
    let (server, _) = start(ServerConfig::default(), engine).await;
    let addr = server.local_addr();
    let (mut a, _) = Raw::hello(addr).await;
    for i in 0..3 {
        token(&a.call(acquire("k", &format!("{i}"), 0, 0)).await);
    }
    assert_eq!(a.call(acquire("k", "3", 0, 0)).await.status(), Status::LimitExceeded);
    let (mut b, _) = Raw::hello(addr).await;
    b.send(&acquire("k", "0", 10_000, 0)).await;
    b.send(&acquire("k", "1", 10_000, 0)).await;
    assert_eq!(
        b.call(acquire("k", "2", 10_000, 0)).await.status(),
        Status::LimitExceeded
    );
    assert_eq!(b.call(Request::Ping).await.result, Ok(ResponseBody::Pong));
    // Waits count towards the held limit: each may turn into a lock.
    let (mut c, _) = Raw::hello(addr).await;
    token(&c.call(acquire("k", "x0", 0, 0)).await);
    token(&c.call(acquire("k", "x1", 0, 0)).await);
    c.send(&acquire("k", "0", 10_000, 0)).await;
    assert_eq!(c.call(acquire("k", "y", 0, 0)).await.status(), Status::LimitExceeded);
    server.shutdown().await;
}

#[tokio::test]
async fn connection_flood_past_the_limit_is_refused() {
    let config = ServerConfig {
        max_connections: 4,
        ..ServerConfig::default()
    };
    let (server, _) = start(config, EngineConfig::default()).await;
    let addr = server.local_addr();
    let mut open = Vec::new();
    for _ in 0..4 {
        open.push(Raw::hello(addr).await.0);
    }
    for _ in 0..10 {
        let mut extra = Raw::connect(addr).await;
        extra
            .send(&Request::Hello(Hello {
                min_version: 1,
                max_version: 1,
                client_name: "x".into(),
            }))
            .await;
        let got = extra.until_closed().await;
        assert!(
            matches!(
                got.as_slice(),
                [Incoming::Event(Event::Closing {
                    status: Status::LimitExceeded,
                    ..
                })]
            ),
            "{got:?}"
        );
    }
    let mut text = Text::connect(addr).await;
    text.send("PING").await;
    assert!(text.line().await.unwrap().starts_with("-ERR LIMIT_EXCEEDED"));
    // Existing connections are unaffected; a freed slot is usable again.
    assert_eq!(open[0].call(Request::Ping).await.result, Ok(ResponseBody::Pong));
    drop(open.pop());
    let mut again = loop {
        let mut c = Raw::connect(addr).await;
        let resp = c
            .send(&Request::Hello(Hello {
                min_version: 1,
                max_version: 1,
                client_name: "x".into(),
            }))
            .await;
        match c.next().await {
            Some(Incoming::Response(r)) if r.request_id == resp => break c,
            // The slot is freed once the server has noticed the close.
            _ => tokio::task::yield_now().await,
        }
    };
    assert_eq!(again.call(Request::Ping).await.result, Ok(ResponseBody::Pong));
    server.shutdown().await;
}

#[tokio::test]
async fn handshake_timeout_closes_silent_connections() {
    let config = ServerConfig {
        handshake_timeout: Duration::from_millis(100),
        ..ServerConfig::default()
    };
    let (server, _) = start(config, EngineConfig::default()).await;
    // Binary client that never says HELLO.
    let mut c = Raw::connect(server.local_addr()).await;
    c.send(&Request::Ping).await;
    let got = c.until_closed().await;
    assert!(
        matches!(got.last(), Some(Incoming::Event(Event::Closing { .. }))),
        "{got:?}"
    );
    // A connection that sends nothing at all is closed too.
    let mut silent = Raw::connect(server.local_addr()).await;
    assert!(silent.until_closed().await.is_empty());
    server.shutdown().await;
}

#[tokio::test]
async fn graceful_shutdown_reports_and_releases() {
    let (server, backend) = start_default().await;
    let (mut c, _) = Raw::hello(server.local_addr()).await;
    let t = token(&c.call(acquire("k", "i", 0, 0)).await);
    let (mut w, _) = Raw::hello(server.local_addr()).await;
    w.send(&acquire("k", "i", 60_000, 0)).await;
    while backend.queued_waiters() == 0 {
        tokio::task::yield_now().await;
    }
    server.shutdown().await;
    let got = c.until_closed().await;
    assert_eq!(
        got,
        vec![
            Incoming::Event(Event::LockLost {
                kind: "k".into(),
                id: "i".into(),
                token: t,
                reason: LostReason::ServerShutdown
            }),
            Incoming::Event(Event::Closing {
                status: Status::ShuttingDown,
                message: "server shutting down".into()
            }),
        ]
    );
    assert!(matches!(
        w.until_closed().await.as_slice(),
        [Incoming::Event(Event::Closing {
            status: Status::ShuttingDown,
            ..
        })]
    ));
    assert_eq!(backend.active_keys(), 0);
}

#[tokio::test]
async fn the_wait_limit_counts_only_acquires_that_would_wait() {
    let engine = EngineConfig {
        max_held_per_session: 3,
        max_waits_per_session: 2,
        ..EngineConfig::default()
    };
    let (server, _) = start(ServerConfig::default(), engine).await;
    let addr = server.local_addr();
    let (mut holder, _) = Raw::hello(addr).await;
    for id in ["busy-0", "busy-1", "busy-2"] {
        token(&holder.call(acquire("k", id, 0, 0)).await);
    }
    let (mut a, _) = Raw::hello(addr).await;
    a.send(&acquire("k", "busy-0", 10_000, 0)).await;
    a.send(&acquire("k", "busy-1", 10_000, 0)).await;
    let release = |id: &str| Request::Release {
        kind: "k".into(),
        id: id.into(),
        token: 0,
    };
    // Two waits queued, nothing held: a try-once never counts against the wait limit.
    token(&a.call(acquire("k", "free-0", 0, 0)).await);
    assert_eq!(
        a.call(release("free-0")).await.result,
        Ok(ResponseBody::Released { released: true })
    );
    // An acquire with a wait past the limit is tried once: granted if free...
    token(&a.call(acquire("k", "free-1", 10_000, 0)).await);
    assert_eq!(
        a.call(release("free-1")).await.result,
        Ok(ResponseBody::Released { released: true })
    );
    // ...refused only if it would have had to wait.
    let refused = a.call(acquire("k", "busy-2", 10_000, 0)).await;
    assert_eq!(refused.status(), Status::LimitExceeded);
    match &refused.result {
        Err(e) => assert!(e.message.contains("2 acquires waiting"), "{e:?}"),
        Ok(body) => panic!("{body:?}"),
    }
    assert_eq!(a.call(acquire("k", "busy-2", 0, 0)).await.status(), Status::Timeout);
    // The held limit is unchanged: two waits and one lock make three.
    token(&a.call(acquire("k", "free-2", 0, 0)).await);
    assert_eq!(
        a.call(acquire("k", "free-3", 0, 0)).await.status(),
        Status::LimitExceeded
    );
    server.shutdown().await;
}

#[tokio::test]
async fn hello_with_min_above_max_is_a_version_mismatch() {
    let (server, _) = start_default().await;
    refused_as_version_mismatch(server.local_addr(), 1, 0).await;
    server.shutdown().await;
}

#[tokio::test]
async fn release_naming_a_token_by_a_non_owner_is_refused() {
    let (server, _) = start_default().await;
    let addr = server.local_addr();
    let (mut a, _) = Raw::hello(addr).await;
    let (mut b, _) = Raw::hello(addr).await;
    let t = token(&a.call(acquire("k", "i", 0, 0)).await);
    for named in [t, t + 1] {
        let resp = b
            .call(Request::Release {
                kind: "k".into(),
                id: "i".into(),
                token: named,
            })
            .await;
        assert_eq!(resp.status(), Status::NotOwner, "token {named}");
    }
    let held = a
        .call(Request::Held {
            scope: clastor_protocol::HeldScope::Connection,
        })
        .await;
    assert!(
        matches!(&held.result, Ok(ResponseBody::Held(list)) if list.len() == 1),
        "{held:?}"
    );
    server.shutdown().await;
}

/// A raw connection that negotiated protocol version 2; its `confirm_ms`.
async fn hello_v2(addr: std::net::SocketAddr) -> (Raw, u32) {
    let mut raw = Raw::connect(addr).await;
    let hello = raw
        .call(Request::Hello(Hello {
            min_version: 1,
            max_version: 2,
            client_name: "v2".into(),
        }))
        .await;
    match hello.result {
        Ok(ResponseBody::Hello(h)) if h.version == 2 => (raw, h.confirm_ms.expect("confirm_ms in version 2")),
        other => panic!("{other:?}"),
    }
}

fn safe_ms(resp: &clastor_protocol::Response) -> u32 {
    match &resp.result {
        Ok(ResponseBody::Acquired(a)) => a.safe_ms.expect("safe_ms on a version 2 grant"),
        Ok(ResponseBody::Renewed { safe_ms, .. }) => safe_ms.expect("safe_ms on a version 2 renewal"),
        Ok(ResponseBody::Confirmed { safe_ms }) => *safe_ms,
        other => panic!("no safe_ms in {other:?}"),
    }
}

#[tokio::test]
async fn version_2_states_how_long_each_grant_is_safe() {
    let config = ServerConfig {
        shutdown_grace: Duration::from_secs(4),
        ..ServerConfig::default()
    };
    let horizon = config.safe_horizon().unwrap();
    assert_eq!(
        horizon,
        Duration::from_secs(4),
        "the shortest of keepalive, write timeout and shutdown grace"
    );
    let (server, _) = start(config, EngineConfig::default()).await;
    let (mut raw, confirm_ms) = hello_v2(server.local_addr()).await;
    // The memory backend sets no bound: the server's own horizon does, and
    // the client confirms four times within it.
    assert_eq!(u64::from(confirm_ms), 1_000);

    let plain = raw.call(acquire("tx", "plain", 0, 0)).await;
    let s = safe_ms(&plain);
    assert!(s > 3_000 && s <= 4_000, "{s}");
    // A lease bounds its grant.
    let leased = raw.call(acquire("tx", "leased", 0, 1_500)).await;
    assert!(safe_ms(&leased) <= 1_500);
    // CONFIRM answers for every lock of the connection, leases left out (the
    // client caps a leased lock by its own count of the lease).
    let confirmed = raw.call(Request::Confirm).await;
    assert!(safe_ms(&confirmed) > 3_000, "{confirmed:?}");
    // A renewal moves it: now the server's horizon bounds both.
    let renewed = raw
        .call(Request::Renew {
            kind: "tx".into(),
            id: "leased".into(),
            lease_ms: 60_000,
            token: 0,
        })
        .await;
    assert!(safe_ms(&renewed) > 3_000);
    assert!(safe_ms(&raw.call(Request::Confirm).await) > 3_000);
    // A renewal that shortens the lease shortens the promise.
    let shortened = raw
        .call(Request::Renew {
            kind: "tx".into(),
            id: "leased".into(),
            lease_ms: 800,
            token: 0,
        })
        .await;
    assert!(safe_ms(&shortened) <= 800);
    // Nothing held, nothing promised.
    for id in ["plain", "leased"] {
        raw.call(Request::Release {
            kind: "tx".into(),
            id: id.into(),
            token: 0,
        })
        .await;
    }
    assert_eq!(safe_ms(&raw.call(Request::Confirm).await), 0);

    // A version 1 connection gets none of it, and no CONFIRM.
    let (mut old, _) = Raw::hello(server.local_addr()).await;
    match old.call(acquire("tx", "old", 0, 0)).await.result {
        Ok(ResponseBody::Acquired(a)) => assert_eq!(a.safe_ms, None),
        other => panic!("{other:?}"),
    }
    assert_eq!(old.call(Request::Confirm).await.status(), Status::BadRequest);
    server.shutdown().await;
}

#[tokio::test]
async fn on_shutdown_a_holder_that_does_not_leave_keeps_its_locks_until_its_promise_runs_out() {
    let config = ServerConfig {
        shutdown_grace: Duration::from_secs(5),
        ..ServerConfig::default()
    };
    let (server, backend) = start(config, EngineConfig::default()).await;
    let (mut raw, _) = hello_v2(server.local_addr()).await;
    let promised = safe_ms(&raw.call(acquire("tx", "promised", 0, 0)).await);
    let t0 = std::time::Instant::now();
    // The holder never reads the goodbye nor closes: as if cut off.
    let shutdown = tokio::spawn(async move { server.shutdown().await });
    while backend.active_keys() > 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let kept = t0.elapsed();
    assert!(
        kept >= Duration::from_millis(u64::from(promised)),
        "released after {kept:?}, {promised} ms were promised"
    );
    shutdown.await.unwrap();
    drop(raw);
}

/// `ROTATE` over the binary form: `ROTATE_PROGRESS` events carry the
/// request's id and come before its response; `ROTATE_ABORT` ends it.
#[tokio::test]
async fn rotate_sends_progress_events_with_its_request_id_then_answers() {
    use clastor_protocol::{KindMode, Rotate, RotationPhase};
    let (server, _) = start_default().await;
    let addr = server.local_addr();
    let (mut holder, _) = Raw::hello(addr).await;
    let granted = holder.call(try_acquire_request("ledger", "acc-1", 0)).await;
    assert!(granted.result.is_ok(), "{granted:?}");
    let (mut admin, _) = Raw::hello(addr).await;
    let id = admin
        .send(&Request::Rotate(Rotate {
            kind: "ledger".into(),
            from: "v1".into(),
            to: "v2".into(),
            drain_timeout_ms: 30_000,
            layout: None,
        }))
        .await;
    match admin.next().await {
        Some(Incoming::Event(Event::RotateProgress { request_id, progress })) => {
            assert_eq!(request_id, id);
            assert_eq!((progress.phase, progress.remaining), (RotationPhase::Draining, 1));
            assert_eq!(progress.holders[0].id, "acc-1");
        }
        other => panic!("expected progress, got {other:?}"),
    }
    // Version 1 connections see only version and mode.
    let v = holder.call(Request::Version { kind: "ledger".into() }).await;
    match v.result {
        Ok(ResponseBody::Version(v)) => assert_eq!((v.mode, v.drain), (KindMode::Draining, None)),
        other => panic!("{other:?}"),
    }
    let (mut other, _) = Raw::hello(addr).await;
    let aborted = other.call(Request::RotateAbort { kind: "ledger".into() }).await;
    assert_eq!(
        aborted.result,
        Ok(ResponseBody::RotateAborted {
            version: "v1".into(),
            aborted: true
        })
    );
    loop {
        match admin.next().await {
            Some(Incoming::Event(Event::RotateProgress { request_id, .. })) => assert_eq!(request_id, id),
            Some(Incoming::Response(r)) => {
                assert_eq!(r.request_id, id);
                assert_eq!(r.status(), Status::RotationAborted, "{r:?}");
                break;
            }
            other => panic!("{other:?}"),
        }
    }
}

/// Protocol version 3: an ACQUIRE's trace id is checked, kept with the
/// grant and listed by `HELD` on version 3 connections (not on older ones).
#[tokio::test]
async fn trace_ids_are_checked_kept_and_listed_from_version_3() {
    let (server, _) = start_default().await;
    let addr = server.local_addr();
    let hello = |max_version| {
        Request::Hello(Hello {
            min_version: 1,
            max_version,
            client_name: "t".into(),
        })
    };
    let traced = |id: &str, trace_id: &str| {
        Request::Acquire(Acquire {
            kind: "k".into(),
            id: id.into(),
            wait_ms: 0,
            lease_ms: 0,
            mode: LockMode::Exclusive,
            trace_id: Some(trace_id.into()),
        })
    };
    let mut v3 = Raw::connect(addr).await;
    assert!(v3.call(hello(3)).await.result.is_ok());
    let granted = v3.call(traced("a", "4bf92f3577b34da6a3ce929d0e0e4736")).await;
    let a = token(&granted);
    for bad in ["has space", "a/b", &"x".repeat(33)] {
        let refused = v3.call(traced("b", bad)).await;
        assert_eq!(refused.status(), Status::BadRequest, "{bad:?}: {refused:?}");
    }
    // A bad name is still INVALID_NAME, whatever the trace id.
    assert_eq!(v3.call(traced("a/b", "bad trace")).await.status(), Status::InvalidName);
    assert!(v3.call(acquire("k", "c", 0, 0)).await.result.is_ok());
    let held = |resp: clastor_protocol::Response| match resp.result {
        Ok(ResponseBody::Held(list)) => list,
        other => panic!("{other:?}"),
    };
    let list = held(
        v3.call(Request::Held {
            scope: clastor_protocol::HeldScope::Server,
        })
        .await,
    );
    let find = |list: &[clastor_protocol::HeldLock], id: &str| list.iter().find(|h| h.id == id).cloned().unwrap();
    assert_eq!(find(&list, "a").token, a);
    assert_eq!(
        find(&list, "a").trace_id.as_deref(),
        Some("4bf92f3577b34da6a3ce929d0e0e4736")
    );
    assert_eq!(find(&list, "c").trace_id, None);
    assert!(list.iter().all(|h| h.id != "b"), "refused acquires took nothing");

    // A version 2 connection gets the listing without the trace section.
    let mut v2 = Raw::connect(addr).await;
    assert!(v2.call(hello(2)).await.result.is_ok());
    // ...and on version 1 and 2 a trace id is trailing bytes, a malformed
    // body (PROTOCOL.md §2.2), before any name check; an empty one too.
    let mut v1 = Raw::connect(addr).await;
    assert!(v1.call(hello(1)).await.result.is_ok());
    for conn in [&mut v1, &mut v2] {
        for (id, trace) in [("d", "4bf92f3577b34da6a3ce929d0e0e4736"), ("d", ""), ("a/b", "t")] {
            let refused = conn.call(traced(id, trace)).await;
            assert_eq!(refused.status(), Status::BadRequest, "{id:?} {trace:?}: {refused:?}");
        }
    }
    drop(v1);
    let list = held(
        v2.call(Request::Held {
            scope: clastor_protocol::HeldScope::Server,
        })
        .await,
    );
    assert!(list.iter().all(|h| h.trace_id.is_none()), "{list:?}");
    assert_eq!(list.len(), 2, "refused acquires on v1/v2 took nothing: {list:?}");
    drop((v3, v2));
    server.shutdown().await;
}

/// A raw connection that negotiated `version` (1 to 3).
async fn hello_version(addr: std::net::SocketAddr, version: u8) -> Raw {
    let mut raw = Raw::connect(addr).await;
    let hello = raw
        .call(Request::Hello(Hello {
            min_version: 1,
            max_version: version,
            client_name: format!("v{version}"),
        }))
        .await;
    match hello.result {
        Ok(ResponseBody::Hello(h)) if h.version == version => raw,
        other => panic!("{other:?}"),
    }
}

/// The header's version byte is `1` whatever protocol version the
/// connection negotiated (PROTOCOL.md §3.2): a frame carrying the negotiated
/// version there, 2 or 3, is fatal like any other value.
#[tokio::test]
async fn the_header_version_byte_stays_1_on_version_2_and_3_connections() {
    let (server, _) = start_default().await;
    let addr = server.local_addr();
    for version in [2, 3] {
        let mut raw = hello_version(addr, version).await;
        // Frames with 1 in the header are served on this connection.
        raw.send_bytes(&frame(1, Opcode::Ping as u8, 0, 7, &[])).await;
        match raw.next().await {
            Some(Incoming::Response(r)) => assert_eq!((r.request_id, r.result), (7, Ok(ResponseBody::Pong))),
            other => panic!("v{version}: {other:?}"),
        }
        raw.send_bytes(&frame(version, Opcode::Ping as u8, 0, 8, &[])).await;
        let got = raw.until_closed().await;
        assert!(
            matches!(
                got.as_slice(),
                [Incoming::Event(Event::Closing {
                    status: Status::ProtocolError,
                    ..
                })]
            ),
            "v{version}: {got:?}"
        );
    }
    server.shutdown().await;
}

/// Rotation is part of protocol version 1 (PROTOCOL.md, "Version rotation"):
/// a version 1 client can drive one, and one that does not know of a
/// rotation driven by someone else sees its acquires of the kind wait (and
/// time out) while it drains, `VERSION` say `draining` without the drain
/// state (that is version 2), and its waiting acquire granted under the new
/// version once the kind switches.
#[tokio::test]
async fn a_version_1_client_during_someone_elses_rotation() {
    use clastor_protocol::{KindMode, Rotate, RotationPhase};
    let (server, _) = start_default().await;
    let addr = server.local_addr();
    let (mut holder, _) = Raw::hello(addr).await;
    assert!(holder.call(acquire("ledger", "held", 0, 0)).await.result.is_ok());
    let (mut admin, _) = Raw::hello(addr).await;
    let rotate_id = admin
        .send(&Request::Rotate(Rotate {
            kind: "ledger".into(),
            from: "v1".into(),
            to: "v2".into(),
            drain_timeout_ms: 60_000,
            layout: None,
        }))
        .await;
    match admin.next().await {
        Some(Incoming::Event(Event::RotateProgress { request_id, progress })) => {
            assert_eq!((request_id, progress.phase), (rotate_id, RotationPhase::Draining));
        }
        other => panic!("expected progress on a version 1 connection, got {other:?}"),
    }
    let (mut old, _) = Raw::hello(addr).await;
    // A free id of the draining kind: a wait runs out, a try-once fails at once.
    let started = std::time::Instant::now();
    assert_eq!(
        old.call(acquire("ledger", "free", 300, 0)).await.status(),
        Status::Timeout
    );
    assert!(started.elapsed() >= Duration::from_millis(300), "did not wait");
    assert_eq!(
        old.call(acquire("ledger", "free", 0, 0)).await.status(),
        Status::Timeout
    );
    match old.call(Request::Version { kind: "ledger".into() }).await.result {
        Ok(ResponseBody::Version(v)) => {
            assert_eq!((v.version.as_str(), v.mode, v.drain), ("v1", KindMode::Draining, None));
        }
        other => panic!("{other:?}"),
    }
    // A long wait is granted under v2 once the holder lets go.
    let waiting = old.send(&acquire("ledger", "free", 30_000, 0)).await;
    holder
        .call(Request::Release {
            kind: "ledger".into(),
            id: "held".into(),
            token: 0,
        })
        .await;
    let granted = old.response().await;
    assert_eq!(granted.request_id, waiting);
    match granted.result {
        Ok(ResponseBody::Acquired(a)) => assert_eq!((a.version.as_str(), a.safe_ms), ("v2", None)),
        other => panic!("{other:?}"),
    }
    loop {
        match admin.next().await {
            Some(Incoming::Event(Event::RotateProgress { .. })) => {}
            Some(Incoming::Response(r)) => {
                assert!(matches!(r.result, Ok(ResponseBody::Rotated(_))), "{r:?}");
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    server.shutdown().await;
}

/// After `CLOSING` on shutdown, a version 2 holder with a promise still
/// running keeps the connection (and its locks) until the promise passes or
/// until it shuts down its write side: then the server closes at once
/// (PROTOCOL.md §2.6). The promise here is 30 s; the read gives up after 10.
#[tokio::test]
async fn after_closing_a_holder_that_shuts_its_write_side_is_let_go_at_once() {
    use tokio::io::AsyncWriteExt as _;
    let config = ServerConfig {
        shutdown_grace: Duration::from_secs(60),
        ..ServerConfig::default()
    };
    let (server, backend) = start(config, EngineConfig::default()).await;
    let (mut raw, _) = hello_v2(server.local_addr()).await;
    let promised = safe_ms(&raw.call(acquire("tx", "promised", 0, 0)).await);
    assert!(promised > 20_000, "{promised}");
    let shutdown = tokio::spawn(async move { server.shutdown().await });
    match raw.next().await {
        Some(Incoming::Event(Event::LockLost { reason, .. })) => assert_eq!(reason, LostReason::ServerShutdown),
        other => panic!("{other:?}"),
    }
    match raw.next().await {
        Some(Incoming::Event(Event::Closing { status, .. })) => assert_eq!(status, Status::ShuttingDown),
        other => panic!("{other:?}"),
    }
    assert_eq!(backend.active_keys(), 1, "the promised lock is kept after CLOSING");
    raw.framed.get_mut().shutdown().await.unwrap();
    assert_eq!(raw.until_closed().await, vec![], "nothing follows CLOSING");
    shutdown.await.unwrap();
    assert_eq!(backend.active_keys(), 0);
}

/// The server's own horizon bounds every `safe_ms`: the write timeout
/// (`--write-timeout`) and the shutdown grace always apply, so even with
/// keepalive off and the memory backend (no bound of its own) the server
/// never sends `u32::MAX` ("no bound", PROTOCOL.md "Safe-until").
#[tokio::test]
async fn the_write_timeout_and_the_shutdown_grace_bound_every_promise() {
    for (write, grace, want) in [(20, 60, 20_000), (90, 60, 60_000)] {
        let config = ServerConfig {
            tcp_keepalive: None,
            write_timeout: Duration::from_secs(write),
            shutdown_grace: Duration::from_secs(grace),
            ..ServerConfig::default()
        };
        let (server, _) = start(config, EngineConfig::default()).await;
        let (mut raw, _) = hello_v2(server.local_addr()).await;
        // No lease and the memory backend: the horizon alone, exactly.
        assert_eq!(safe_ms(&raw.call(acquire("tx", "a", 0, 0)).await), want);
        assert_eq!(safe_ms(&raw.call(Request::Confirm).await), want);
        drop(raw);
        server.shutdown().await;
    }
}

/// `safe_ms` is rounded down to whole milliseconds, never up: a grant whose
/// lease has less than 1 ms left by the time its reply is made (a 1 ms lease)
/// is promised 0, and a 1 s lease less than 1000.
#[tokio::test]
async fn safe_ms_rounds_down_so_a_1_ms_lease_is_promised_0() {
    let (server, _) = start_default().await;
    let (mut raw, _) = hello_v2(server.local_addr()).await;
    let id = raw.send(&acquire("tx", "short", 0, 1)).await;
    // Its LOCK_LOST (lease expired) may come before or after the grant.
    let mut granted = None;
    let mut lost = false;
    while granted.is_none() || !lost {
        match raw.next().await {
            Some(Incoming::Response(r)) if r.request_id == id => granted = Some(r),
            Some(Incoming::Event(Event::LockLost { reason, .. })) => {
                assert_eq!(reason, LostReason::LeaseExpired);
                lost = true;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(granted.map(|g| safe_ms(&g)), Some(0));
    let second = safe_ms(&raw.call(acquire("tx", "second", 0, 1_000)).await);
    assert!(second < 1_000, "{second}");
    server.shutdown().await;
}
