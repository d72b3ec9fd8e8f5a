//! The gRPC API against an in-process server (memory backend), through a
//! tonic client generated from the same `.proto`: the stream as an owner
//! (grants, contention, cancel, losses, close releases, shutdown), unary
//! sessions (idempotent acquire, deadlines, idle expiry, errors).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use clastor::backend::memory::MemoryBackend;
use clastor::server::grpc_proto as pb;
use clastor::server::{self, GrpcConfig, ServerConfig, ServerHandle};
use clastor::{Engine, EngineConfig};
use pb::session_event::Event as Out;
use pb::session_request::Op;
use support::PATIENCE;
use support::grpc::{Stream, acquire, connect};
use tonic::Code;

async fn start_with(grpc: GrpcConfig) -> (ServerHandle, Engine<MemoryBackend>, SocketAddr) {
    let engine = Engine::new(MemoryBackend::new(), EngineConfig::default());
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        grpc: Some(grpc),
        ..ServerConfig::default()
    };
    let handle = server::spawn(engine.clone(), config).await.unwrap();
    let addr = handle.grpc_addr().unwrap();
    (handle, engine, addr)
}

async fn start() -> (ServerHandle, Engine<MemoryBackend>, SocketAddr) {
    start_with(GrpcConfig::new("127.0.0.1:0".parse().unwrap())).await
}

/// Waits until the engine holds nothing and nobody waits.
async fn until_empty(engine: &Engine<MemoryBackend>) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if engine.held_all(100).is_empty() && engine.waiting_all(100).is_empty() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still held: {:?}",
            engine.held_all(100)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn granted(out: &Out) -> &pb::AcquireReply {
    match out {
        Out::Acquired(a) => a,
        other => panic!("not an acquire reply: {other:?}"),
    }
}

#[tokio::test]
async fn a_stream_owns_locks_and_closing_it_releases_them() {
    let (handle, engine, addr) = start().await;
    let mut client = connect(addr).await;
    let mut a = Stream::open(&mut client).await;
    let mut b = Stream::open(&mut client).await;
    assert_ne!(a.session_id, b.session_id);
    assert!(a.confirm_ms > 0);

    let out = a.call(1, Op::Acquire(acquire("job", "x", 0))).await;
    let g = granted(&out);
    assert!(g.granted && g.token > 0, "{g:?}");
    assert!(g.safe_ms > 0 && g.safe_ms < u32::MAX, "{g:?}");
    assert_eq!(engine.held_all(10).len(), 1);

    // Contention is an outcome, not an error.
    let out = b.call(1, Op::Acquire(acquire("job", "x", 0))).await;
    assert!(!granted(&out).granted);
    assert!(!granted(&out).reason.is_empty());

    // b waits; a's stream ends; b is granted with a higher token.
    b.send(2, Op::Acquire(acquire("job", "x", 10_000))).await;
    let mut rest = a.close();
    assert!(rest.message().await.map(|m| m.is_none()).unwrap_or(true));
    let (id, out) = b.next().await.unwrap();
    assert_eq!(id, 2);
    assert!(granted(&out).granted && granted(&out).token > g.token);

    let out = b.call(3, Op::Confirm(pb::Empty {})).await;
    let Out::Confirmed(c) = out else { panic!("{out:?}") };
    assert!(c.safe_ms > 0);
    let out = b.call(4, Op::Held(pb::HeldRequest::default())).await;
    let Out::Held(h) = out else { panic!("{out:?}") };
    assert_eq!(h.locks.len(), 1);
    assert_eq!((h.locks[0].kind.as_str(), h.locks[0].id.as_str()), ("job", "x"));

    drop(b.close());
    until_empty(&engine).await;
    handle.shutdown().await;
}

#[tokio::test]
async fn release_renew_cancel_and_errors_on_the_stream() {
    let (handle, engine, addr) = start().await;
    let mut client = connect(addr).await;
    let mut a = Stream::open(&mut client).await;
    let mut b = Stream::open(&mut client).await;
    let out = a.call(1, Op::Acquire(acquire("job", "y", 0))).await;
    let token = granted(&out).token;

    // A waiting acquire, cancelled: answered not granted, nothing left waiting.
    b.send(7, Op::Acquire(acquire("job", "y", 60_000))).await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while engine.waiting_all(10).is_empty() {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    b.send(8, Op::Cancel(7)).await;
    let mut answers = vec![b.next().await.unwrap(), b.next().await.unwrap()];
    answers.sort_by_key(|(id, _)| *id);
    assert!(!granted(&answers[0].1).granted, "{answers:?}");
    assert_eq!(granted(&answers[0].1).reason, "cancelled");
    assert!(matches!(answers[1], (8, Out::Cancelled(_))), "{answers:?}");
    assert!(engine.waiting_all(10).is_empty());

    // Someone else's lock: NOT_OWNER; a bad name: INVALID_NAME; the stream lives on.
    let out = b
        .call(
            9,
            Op::Release(pb::ReleaseRequest {
                kind: "job".into(),
                id: "y".into(),
                ..Default::default()
            }),
        )
        .await;
    let Out::Error(e) = out else { panic!("{out:?}") };
    assert_eq!(e.status, "NOT_OWNER");
    assert_eq!(e.code, 3);
    let out = b.call(10, Op::Acquire(acquire("job", "", 0))).await;
    let Out::Error(e) = out else { panic!("{out:?}") };
    assert_eq!(e.status, "INVALID_NAME");

    // Renew sets a lease; a release by token lets go.
    let out = a
        .call(
            2,
            Op::Renew(pb::RenewRequest {
                kind: "job".into(),
                id: "y".into(),
                lease_ms: 60_000,
                token,
                ..Default::default()
            }),
        )
        .await;
    let Out::Renewed(r) = out else { panic!("{out:?}") };
    assert_eq!((r.token, r.lease_ms), (token, 60_000));
    assert!(r.safe_ms > 0 && r.safe_ms < 60_000);
    let out = a
        .call(
            3,
            Op::Release(pb::ReleaseRequest {
                kind: "job".into(),
                id: "y".into(),
                token,
                ..Default::default()
            }),
        )
        .await;
    assert!(
        matches!(out, Out::Released(pb::ReleaseReply { released: true })),
        "{out:?}"
    );
    until_empty(&engine).await;
    handle.shutdown().await;
}

#[tokio::test]
async fn a_lost_lock_is_pushed_on_the_stream() {
    let (handle, _engine, addr) = start().await;
    let mut client = connect(addr).await;
    let mut a = Stream::open(&mut client).await;
    let mut req = acquire("job", "lease", 0);
    req.lease_ms = 50;
    let out = a.call(1, Op::Acquire(req)).await;
    let token = granted(&out).token;
    let (id, out) = a.next().await.unwrap();
    assert_eq!(id, 0);
    let Out::Lost(l) = out else { panic!("{out:?}") };
    assert_eq!((l.kind.as_str(), l.id.as_str(), l.token), ("job", "lease", token));
    assert_eq!(l.reason(), pb::LostReason::LeaseExpired);
    handle.shutdown().await;
}

#[tokio::test]
async fn shutdown_says_goodbye_on_the_stream() {
    let (handle, _engine, addr) = start().await;
    let mut client = connect(addr).await;
    let mut a = Stream::open(&mut client).await;
    let token = granted(&a.call(1, Op::Acquire(acquire("job", "z", 0))).await).token;
    let stop = tokio::spawn(handle.shutdown());
    let (_, out) = a.next().await.unwrap();
    let Out::Lost(l) = out else { panic!("{out:?}") };
    assert_eq!((l.token, l.reason()), (token, pb::LostReason::Shutdown));
    let (_, out) = a.next().await.unwrap();
    let Out::Closing(e) = out else { panic!("{out:?}") };
    assert_eq!(e.status, "SHUTTING_DOWN");
    // The client goes: the server need not keep the promise any longer.
    drop(a.close());
    tokio::time::timeout(PATIENCE, stop).await.unwrap().unwrap();
}

#[tokio::test]
async fn unary_sessions_acquire_idempotently_and_close() {
    let (handle, engine, addr) = start().await;
    let mut client = connect(addr).await;
    let open = client
        .open_session(pb::OpenSessionRequest {
            client_name: "unary-test".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(open.idle_expiry_ms, 30_000);
    let sid = open.session_id;
    let req = pb::AcquireRequest {
        session_id: sid,
        request_id: 42,
        ..acquire("job", "u", 0)
    };
    let first = client.acquire(req.clone()).await.unwrap().into_inner();
    assert!(first.granted);
    assert!(first.safe_ms > 0 && first.safe_ms <= 30_000, "{first:?}");
    // The retry (its answer lost, say) gets the same grant.
    let again = client.acquire(req.clone()).await.unwrap().into_inner();
    assert_eq!((again.granted, again.token), (true, first.token));
    assert_eq!(engine.held_all(10).len(), 1);
    // Another request id for the same lock: ALREADY_HELD.
    let other = client
        .acquire(pb::AcquireRequest {
            request_id: 43,
            ..req.clone()
        })
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::AlreadyExists);
    assert_eq!(other.metadata().get("clastor-status").unwrap(), "ALREADY_HELD");

    let held = client
        .held(pb::HeldRequest {
            session_id: 0,
            all: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(held.locks.len(), 1);
    let confirm = client
        .confirm(pb::ConfirmRequest { session_id: sid })
        .await
        .unwrap()
        .into_inner();
    assert!(confirm.safe_ms > 0);

    // Released, the retry no longer returns the old grant: a new one.
    let rel = client
        .release(pb::ReleaseRequest {
            session_id: sid,
            kind: "job".into(),
            id: "u".into(),
            token: first.token,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(rel.released);
    let fresh = client.acquire(req.clone()).await.unwrap().into_inner();
    assert!(fresh.granted && fresh.token > first.token);

    let closed = client
        .close_session(pb::CloseSessionRequest { session_id: sid })
        .await
        .unwrap()
        .into_inner();
    assert!(closed.closed);
    until_empty(&engine).await;
    let gone = client.acquire(req).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    handle.shutdown().await;
}

#[tokio::test]
async fn a_deadline_that_runs_out_leaves_nothing_behind() {
    let (handle, engine, addr) = start().await;
    let mut client = connect(addr).await;
    let holder = client
        .open_session(pb::OpenSessionRequest::default())
        .await
        .unwrap()
        .into_inner()
        .session_id;
    let waiter = client
        .open_session(pb::OpenSessionRequest::default())
        .await
        .unwrap()
        .into_inner()
        .session_id;
    let held = client
        .acquire(pb::AcquireRequest {
            session_id: holder,
            ..acquire("job", "d", 0)
        })
        .await
        .unwrap()
        .into_inner();
    assert!(held.granted);
    let mut req = tonic::Request::new(pb::AcquireRequest {
        session_id: waiter,
        ..acquire("job", "d", 60_000)
    });
    req.set_timeout(Duration::from_millis(200));
    let err = client.acquire(req).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
    // No waiter left behind, and the holder is the only holder.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !engine.waiting_all(10).is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "{:?}", engine.waiting_all(10));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let all = engine.held_all(10);
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].token, held.token);
    // Released by the holder, the lock is free: the withdrawn waiter took nothing.
    client
        .close_session(pb::CloseSessionRequest { session_id: holder })
        .await
        .unwrap();
    until_empty(&engine).await;
    handle.shutdown().await;
}

#[tokio::test]
async fn an_idle_unary_session_expires_and_releases() {
    let (handle, engine, addr) = start_with(GrpcConfig {
        idle_expiry: Duration::from_millis(300),
        ..GrpcConfig::new("127.0.0.1:0".parse().unwrap())
    })
    .await;
    let mut client = connect(addr).await;
    let open = client
        .open_session(pb::OpenSessionRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(open.idle_expiry_ms, 300);
    let g = client
        .acquire(pb::AcquireRequest {
            session_id: open.session_id,
            ..acquire("job", "idle", 0)
        })
        .await
        .unwrap()
        .into_inner();
    assert!(g.granted);
    // The promise never outlasts the idle expiry.
    assert!(g.safe_ms <= 300, "{g:?}");
    until_empty(&engine).await;
    let gone = client
        .confirm(pb::ConfirmRequest {
            session_id: open.session_id,
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    handle.shutdown().await;
}

#[tokio::test]
async fn limits_and_error_codes() {
    let (handle, _engine, addr) = start_with(GrpcConfig {
        max_sessions: 1,
        ..GrpcConfig::new("127.0.0.1:0".parse().unwrap())
    })
    .await;
    let mut client = connect(addr).await;
    let sid = client
        .open_session(pb::OpenSessionRequest::default())
        .await
        .unwrap()
        .into_inner()
        .session_id;
    let full = client
        .open_session(pb::OpenSessionRequest::default())
        .await
        .unwrap_err();
    assert_eq!(full.code(), Code::ResourceExhausted);
    assert_eq!(full.metadata().get("clastor-status").unwrap(), "LIMIT_EXCEEDED");
    let bad = client
        .acquire(pb::AcquireRequest {
            session_id: sid,
            ..acquire("bad name", "x", 0)
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert_eq!(bad.metadata().get("clastor-status").unwrap(), "INVALID_NAME");
    let not_held = client
        .renew(pb::RenewRequest {
            session_id: sid,
            kind: "job".into(),
            id: "x".into(),
            lease_ms: 1000,
            token: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(not_held.code(), Code::FailedPrecondition);
    let v = client
        .version(pb::VersionRequest { kind: "job".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(!v.version.is_empty() && !v.draining);
    handle.shutdown().await;
}

/// A call with `token` as its bearer token.
#[cfg(feature = "tls")]
fn with_token<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

/// With an auth file the gRPC port wants a bearer token per call, checks
/// every request's permission, and keeps each session to the principal
/// that opened it.
#[cfg(feature = "tls")]
#[tokio::test]
async fn the_grpc_port_wants_bearer_tokens_and_permissions() {
    use clastor::server::{AuthConfig, hash_token};
    const WRITER: &str = "grpc-writer-7f3a";
    const READER: &str = "grpc-reader-91c2";
    const OPS: &str = "grpc-ops-4be0";
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("auth.toml");
    std::fs::write(
        &file,
        format!(
            r#"
[[principal]]
name = "writer"
token_sha256 = "{}"
[principal.grants]
transaction = ["acquire", "read"]

[[principal]]
name = "reader"
token_sha256 = "{}"
[principal.grants]
"*" = ["read"]

[[principal]]
name = "ops"
token_sha256 = "{}"
[principal.grants]
"*" = ["rotate", "admin", "read"]
"#,
            hash_token(WRITER),
            hash_token(READER),
            hash_token(OPS)
        ),
    )
    .unwrap();
    let engine = Engine::new(MemoryBackend::new(), EngineConfig::default());
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        grpc: Some(GrpcConfig::new("127.0.0.1:0".parse().unwrap())),
        auth: Some(AuthConfig::new(&file)),
        ..ServerConfig::default()
    };
    let handle = server::spawn(engine.clone(), config).await.unwrap();
    let mut client = connect(handle.grpc_addr().unwrap()).await;
    let refused = |e: tonic::Status, code: Code, status: &str| {
        assert_eq!(e.code(), code, "{e:?}");
        assert_eq!(e.metadata().get("clastor-status").unwrap(), status, "{e:?}");
        e
    };

    // No credentials, malformed ones, a wrong token: UNAUTHENTICATED, on
    // every call and on the stream.
    let e = client
        .open_session(pb::OpenSessionRequest::default())
        .await
        .unwrap_err();
    refused(e, Code::Unauthenticated, "UNAUTHENTICATED");
    let e = client
        .version(pb::VersionRequest {
            kind: "transaction".into(),
        })
        .await
        .unwrap_err();
    refused(e, Code::Unauthenticated, "UNAUTHENTICATED");
    let (_tx, rx) = tokio::sync::mpsc::channel::<pb::SessionRequest>(1);
    let e = client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap_err();
    refused(e, Code::Unauthenticated, "UNAUTHENTICATED");
    let mut basic = tonic::Request::new(pb::OpenSessionRequest::default());
    basic
        .metadata_mut()
        .insert("authorization", "Basic d3JpdGVyOng=".parse().unwrap());
    let e = client.open_session(basic).await.unwrap_err();
    refused(e, Code::Unauthenticated, "UNAUTHENTICATED");
    let wrong = refused(
        client
            .open_session(with_token("grpc-writer-7f3b", pb::OpenSessionRequest::default()))
            .await
            .unwrap_err(),
        Code::Unauthenticated,
        "UNAUTHENTICATED",
    );
    assert!(!wrong.message().contains("grpc-writer"), "{wrong:?}");

    // The writer takes its kind, not another.
    let sid = client
        .open_session(with_token(WRITER, pb::OpenSessionRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .session_id;
    let got = client
        .acquire(with_token(
            WRITER,
            pb::AcquireRequest {
                session_id: sid,
                ..acquire("transaction", "tx-1", 0)
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(got.granted);
    let e = client
        .acquire(with_token(
            WRITER,
            pb::AcquireRequest {
                session_id: sid,
                ..acquire("billing", "b-1", 0)
            },
        ))
        .await
        .unwrap_err();
    refused(e, Code::PermissionDenied, "FORBIDDEN");
    // A call on the session without credentials, or from another
    // principal, is refused; the lock stays the writer's.
    let e = client
        .held(pb::HeldRequest {
            session_id: sid,
            all: false,
        })
        .await
        .unwrap_err();
    refused(e, Code::Unauthenticated, "UNAUTHENTICATED");
    for (token, what) in [(READER, "release"), (OPS, "close")] {
        let e = if what == "release" {
            client
                .release(with_token(
                    token,
                    pb::ReleaseRequest {
                        session_id: sid,
                        kind: "transaction".into(),
                        id: "tx-1".into(),
                        token: got.token,
                    },
                ))
                .await
                .unwrap_err()
        } else {
            client
                .close_session(with_token(token, pb::CloseSessionRequest { session_id: sid }))
                .await
                .unwrap_err()
        };
        let e = refused(e, Code::PermissionDenied, "FORBIDDEN");
        assert!(e.message().contains("another principal"), "{e:?}");
    }
    assert_eq!(engine.held_all(10).len(), 1);

    // Sessionless calls: Version needs read, Rotate rotate, Held all admin.
    let v = client
        .version(with_token(READER, pb::VersionRequest { kind: "billing".into() }))
        .await
        .unwrap()
        .into_inner()
        .version;
    assert!(!v.is_empty());
    let rotate = |token: &str| {
        with_token(
            token,
            pb::RotateRequest {
                kind: "billing".into(),
                from: v.clone(),
                to: "v-next".into(),
                drain_timeout_ms: 1000,
                ..Default::default()
            },
        )
    };
    let e = client.rotate(rotate(WRITER)).await.unwrap_err();
    refused(e, Code::PermissionDenied, "FORBIDDEN");
    client.rotate(rotate(OPS)).await.unwrap();
    let all = |token: &str| {
        with_token(
            token,
            pb::HeldRequest {
                session_id: 0,
                all: true,
            },
        )
    };
    let e = client.held(all(READER)).await.unwrap_err();
    refused(e, Code::PermissionDenied, "FORBIDDEN");
    let listed = client.held(all(OPS)).await.unwrap().into_inner();
    assert_eq!(listed.locks.len(), 1);

    // A stream opened with the writer's token is the writer's: each request
    // is checked against its permissions.
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::SessionRequest>(4);
    let mut events = client
        .session(with_token(WRITER, tokio_stream::wrappers::ReceiverStream::new(rx)))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        events.message().await.unwrap().unwrap().event,
        Some(Out::Opened(_))
    ));
    tx.send(pb::SessionRequest {
        request_id: 1,
        op: Some(Op::Acquire(acquire("billing", "b-1", 0))),
    })
    .await
    .unwrap();
    match events.message().await.unwrap().unwrap().event {
        Some(Out::Error(e)) => assert_eq!(e.status, "FORBIDDEN", "{e:?}"),
        other => panic!("{other:?}"),
    }
    tx.send(pb::SessionRequest {
        request_id: 2,
        op: Some(Op::Acquire(acquire("transaction", "tx-3", 0))),
    })
    .await
    .unwrap();
    match events.message().await.unwrap().unwrap().event {
        Some(Out::Acquired(a)) => assert!(a.granted),
        other => panic!("{other:?}"),
    }
    drop(tx);
    handle.shutdown().await;
}
