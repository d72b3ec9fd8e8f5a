//! Security, on a real server in this process: authentication and per-kind
//! permissions on every port (binary, text, HTTP), bounded attempts, auth
//! file reloads, hostile `AUTH` bodies, TLS with a CA made in the test, and
//! mTLS identities.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clastor::EngineConfig;
use clastor::server::{AuthConfig, HttpConfig, ServerConfig, ServerHandle, TlsConfig, hash_token};
use clastor_client::{Client, Error, TlsConfig as ClientTls};
use clastor_protocol::{Acquire, AuthToken, Event, HeldScope, LockMode, Request, ResponseBody, Rotate, Status};
use support::tls::TestCa;
use support::{Incoming, Raw, Text, http};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const READER: &str = "reader-token-8c1f";
const WRITER: &str = "writer-token-51aa";
const SHARER: &str = "sharer-token-07be";
const OPS: &str = "ops-token-c3d9";

/// The auth file of these tests: `reader` reads everything, `writer` takes
/// exclusive locks of `transaction`, `sharer` shared ones, `ops` rotates
/// and administers (and is also the mTLS certificate `ops`).
fn policy(extra_writer_kinds: &str) -> String {
    format!(
        r#"
[[principal]]
name = "reader"
token_sha256 = "{}"
[principal.grants]
"*" = ["read"]

[[principal]]
name = "writer"
token_sha256 = "{}"
[principal.grants]
transaction = ["acquire", "read"]
{extra_writer_kinds}

[[principal]]
name = "sharer"
token_sha256 = "{}"
[principal.grants]
transaction = ["shared"]

[[principal]]
name = "ops"
token_sha256 = "{}"
cert = "ops"
[principal.grants]
"*" = ["rotate", "admin", "read"]
"#,
        hash_token(READER),
        hash_token(WRITER),
        hash_token(SHARER),
        hash_token(OPS)
    )
}

struct Secured {
    server: ServerHandle,
    file: PathBuf,
    _dir: tempfile::TempDir,
}

async fn start_secured(max_failures: u32, http: bool, tls: Option<TlsConfig>) -> Secured {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("auth.toml");
    std::fs::write(&file, policy("")).unwrap();
    let config = ServerConfig {
        auth: Some(AuthConfig {
            max_failures,
            ..AuthConfig::new(&file)
        }),
        http: http.then(|| HttpConfig::new("127.0.0.1:0".parse().unwrap())),
        tls,
        ..ServerConfig::default()
    };
    let (server, _) = support::start(config, EngineConfig::default()).await;
    Secured {
        server,
        file,
        _dir: dir,
    }
}

fn acquire(kind: &str, id: &str, mode: LockMode) -> Request {
    Request::Acquire(Acquire {
        kind: kind.into(),
        id: id.into(),
        wait_ms: 0,
        lease_ms: 0,
        mode,
        trace_id: None,
    })
}

fn auth(token: &str) -> Request {
    Request::Auth {
        token: AuthToken::new(token),
    }
}

fn status(resp: &clastor_protocol::Response) -> Status {
    resp.status()
}

fn message(resp: &clastor_protocol::Response) -> String {
    match &resp.result {
        Err(e) => e.message.clone(),
        Ok(body) => panic!("expected an error, got {body:?}"),
    }
}

#[tokio::test]
async fn the_binary_port_refuses_the_unauthenticated_and_the_unauthorised() {
    let s = start_secured(3, false, None).await;
    let (mut raw, _) = Raw::hello(s.server.local_addr()).await;
    // Before AUTH: PING works, everything else is UNAUTHENTICATED.
    assert_eq!(status(&raw.call(Request::Ping).await), Status::Ok);
    for req in [
        acquire("transaction", "tx-1", LockMode::Exclusive),
        Request::Version {
            kind: "transaction".into(),
        },
        Request::Info,
        Request::Held {
            scope: HeldScope::Connection,
        },
        Request::Release {
            kind: "transaction".into(),
            id: "tx-1".into(),
            token: 0,
        },
        Request::Rotate(Rotate {
            kind: "transaction".into(),
            from: "v1".into(),
            to: "v2".into(),
            drain_timeout_ms: 0,
            layout: None,
        }),
    ] {
        let resp = raw.call(req.clone()).await;
        assert_eq!(status(&resp), Status::Unauthenticated, "{req:?}");
        assert!(message(&resp).contains("AUTH"), "{resp:?}");
    }
    // A wrong token: a generic refusal.
    let resp = raw.call(auth("not-a-token")).await;
    assert_eq!(status(&resp), Status::Unauthenticated);
    assert_eq!(message(&resp), "authentication failed");
    // reader reads, and may not acquire.
    let resp = raw.call(auth(READER)).await;
    assert_eq!(
        resp.result,
        Ok(ResponseBody::Authenticated {
            principal: "reader".into()
        })
    );
    let resp = raw.call(acquire("transaction", "tx-1", LockMode::Exclusive)).await;
    assert_eq!(status(&resp), Status::Forbidden);
    assert_eq!(message(&resp), "principal reader may not acquire kind transaction");
    let resp = raw
        .call(Request::Version {
            kind: "transaction".into(),
        })
        .await;
    assert_eq!(status(&resp), Status::Ok);
    // Server-wide listings and INFO's details need admin.
    let resp = raw
        .call(Request::Held {
            scope: HeldScope::Server,
        })
        .await;
    assert_eq!(status(&resp), Status::Forbidden);
    match raw.call(Request::Info).await.result {
        Ok(ResponseBody::Info(pairs)) => {
            let names: Vec<&str> = pairs.iter().map(|(k, _)| k.as_str()).collect();
            assert_eq!(names, ["server", "principal"]);
            assert_eq!(pairs[1].1, "reader");
        }
        other => panic!("{other:?}"),
    }
    // Re-authenticating switches the principal.
    assert_eq!(status(&raw.call(auth(WRITER)).await), Status::Ok);
    let resp = raw.call(acquire("transaction", "tx-1", LockMode::Exclusive)).await;
    assert!(matches!(resp.result, Ok(ResponseBody::Acquired(_))), "{resp:?}");
    let resp = raw.call(acquire("user", "u-1", LockMode::Exclusive)).await;
    assert_eq!(status(&resp), Status::Forbidden);
    // Rotation needs `rotate`.
    let rotate = Request::Rotate(Rotate {
        kind: "transaction".into(),
        from: "v1".into(),
        to: "v2".into(),
        drain_timeout_ms: 0,
        layout: None,
    });
    assert_eq!(status(&raw.call(rotate).await), Status::Forbidden);
    assert_eq!(
        status(
            &raw.call(Request::RotateAbort {
                kind: "transaction".into()
            })
            .await
        ),
        Status::Forbidden
    );
    let (mut ops, _) = Raw::hello(s.server.local_addr()).await;
    assert_eq!(status(&ops.call(auth(OPS)).await), Status::Ok);
    // (A kind nobody holds: the rotation has nothing to drain.)
    ops.send(&Request::Rotate(Rotate {
        kind: "audit".into(),
        from: "v1".into(),
        to: "v2".into(),
        drain_timeout_ms: 1000,
        layout: None,
    }))
    .await;
    // Its progress first, then its answer.
    let resp = loop {
        match ops.next().await {
            Some(Incoming::Event(Event::RotateProgress { .. })) => {}
            Some(Incoming::Response(r)) => break r,
            other => panic!("{other:?}"),
        }
    };
    assert!(matches!(resp.result, Ok(ResponseBody::Rotated(_))), "{resp:?}");
    let resp = ops
        .call(Request::Held {
            scope: HeldScope::Server,
        })
        .await;
    assert!(matches!(resp.result, Ok(ResponseBody::Held(_))), "{resp:?}");
    match ops.call(Request::Info).await.result {
        Ok(ResponseBody::Info(pairs)) => assert!(pairs.iter().any(|(k, v)| k == "auth" && v == "on")),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn shared_without_acquire_is_forbidden_exclusive_locks() {
    let s = start_secured(3, false, None).await;
    let (mut raw, _) = Raw::hello(s.server.local_addr()).await;
    assert_eq!(status(&raw.call(auth(SHARER)).await), Status::Ok);
    let resp = raw.call(acquire("transaction", "tx-1", LockMode::Exclusive)).await;
    assert_eq!(status(&resp), Status::Forbidden);
    // A shared acquire passes the permission check (whatever the server
    // then makes of shared mode).
    let resp = raw.call(acquire("transaction", "tx-1", LockMode::Shared)).await;
    assert_ne!(status(&resp), Status::Forbidden, "{resp:?}");
    assert_eq!(
        status(&raw.call(acquire("user", "u-1", LockMode::Shared)).await),
        Status::Forbidden
    );
    // `acquire` includes shared mode.
    let (mut writer, _) = Raw::hello(s.server.local_addr()).await;
    assert_eq!(status(&writer.call(auth(WRITER)).await), Status::Ok);
    let resp = writer.call(acquire("transaction", "tx-2", LockMode::Shared)).await;
    assert_ne!(status(&resp), Status::Forbidden, "{resp:?}");
}

#[tokio::test]
async fn the_client_crate_authenticates_and_maps_the_new_statuses() {
    let s = start_secured(3, false, None).await;
    let addr = s.server.local_addr();
    // No token: connected, then refused.
    let anonymous = Client::connect(addr).await.unwrap();
    let err = anonymous.lock("transaction", "tx-1").acquire().await.unwrap_err();
    assert!(matches!(err, Error::Unauthenticated(_)), "{err:?}");
    // A wrong token: the connect fails.
    let err = Client::builder(addr).token("wrong").connect().await.unwrap_err();
    assert!(matches!(err, Error::Unauthenticated(_)), "{err:?}");
    assert!(!format!("{err:?}").contains("wrong"), "{err:?}");
    // The builder never shows its token.
    assert!(!format!("{:?}", Client::builder(addr).token(WRITER)).contains(WRITER));
    let reader = Client::builder(addr).token(READER).connect().await.unwrap();
    let err = reader.lock("transaction", "tx-1").acquire().await.unwrap_err();
    assert!(matches!(err, Error::Forbidden(_)), "{err:?}");
    assert_eq!(reader.version("transaction").await.unwrap().version, "v1");
    let writer = Client::builder(addr).token(WRITER).connect().await.unwrap();
    let guard = writer.lock("transaction", "tx-1").acquire().await.unwrap();
    assert!(guard.is_some());
}

#[tokio::test]
async fn the_text_form_refuses_until_auth_and_bounds_attempts() {
    let s = start_secured(2, false, None).await;
    let mut t = Text::connect(s.server.local_addr()).await;
    assert_eq!(t.cmd("PING").await, "+PONG");
    let line = t.cmd("ACQUIRE transaction tx-1").await;
    assert!(line.starts_with("-ERR UNAUTHENTICATED "), "{line}");
    assert!(t.cmd("HELD").await.starts_with("-ERR UNAUTHENTICATED "));
    assert_eq!(t.cmd("AUTH nope").await, "-ERR UNAUTHENTICATED authentication failed");
    assert_eq!(t.cmd(&format!("AUTH {WRITER}")).await, "+AUTH principal=writer");
    assert!(
        t.cmd("ACQUIRE transaction tx-1")
            .await
            .starts_with("+ACQUIRED transaction tx-1 ")
    );
    let line = t.cmd("ACQUIRE user u-1").await;
    assert_eq!(line, "-ERR FORBIDDEN principal writer may not acquire kind user");
    let line = t.cmd("ROTATE transaction v1 v2").await;
    assert!(line.starts_with("-ERR FORBIDDEN "), "{line}");

    // Two failures (this server's bound) close a connection.
    let mut t = Text::connect(s.server.local_addr()).await;
    assert_eq!(t.cmd("AUTH a").await, "-ERR UNAUTHENTICATED authentication failed");
    assert_eq!(t.cmd("AUTH b").await, "-ERR UNAUTHENTICATED authentication failed");
    assert_eq!(
        t.line().await.as_deref(),
        Some("!CLOSING UNAUTHENTICATED too many failed authentication attempts")
    );
    assert_eq!(t.line().await, None);
}

#[tokio::test]
async fn failed_attempts_are_bounded_per_connection_and_tell_nothing() {
    let s = start_secured(3, false, None).await;
    let addr = s.server.local_addr();
    let (mut raw, _) = Raw::hello(addr).await;
    // Near misses and far misses are refused alike.
    let guesses = [&WRITER[..WRITER.len() - 1], "x", "writer"];
    for (i, guess) in guesses.into_iter().enumerate() {
        let resp = raw.call(auth(guess)).await;
        assert_eq!(status(&resp), Status::Unauthenticated);
        assert_eq!(message(&resp), "authentication failed", "attempt {i}");
    }
    // The third was the last: CLOSING, then the end.
    assert_eq!(
        raw.until_closed().await,
        vec![Incoming::Event(Event::Closing {
            status: Status::Unauthenticated,
            message: "too many failed authentication attempts".into(),
        })]
    );
    // A new connection starts again: a wrong token still fails the same
    // way, a right one works.
    let (mut raw, _) = Raw::hello(addr).await;
    let resp = raw.call(auth("writer")).await;
    assert_eq!(message(&resp), "authentication failed");
    assert_eq!(status(&raw.call(auth(WRITER)).await), Status::Ok);
}

#[tokio::test]
async fn hostile_auth_bodies_get_bad_request_and_count_as_attempts() {
    let s = start_secured(3, false, None).await;
    let addr = s.server.local_addr();
    // Before HELLO, AUTH is refused like any request.
    let mut raw = Raw::connect(addr).await;
    assert_eq!(status(&raw.call(auth(WRITER)).await), Status::HandshakeRequired);

    let (mut raw, _) = Raw::hello(addr).await;
    let frame = |id: u32, body: &[u8]| {
        let mut b = Vec::new();
        b.extend_from_slice(&u32::try_from(8 + body.len()).unwrap().to_be_bytes());
        b.extend_from_slice(&[1, 0x19, 0, 0]);
        b.extend_from_slice(&id.to_be_bytes());
        b.extend_from_slice(body);
        b
    };
    // A length past the body, bad UTF-8, a token past its bound.
    let long = "t".repeat(clastor_protocol::MAX_TOKEN_LEN + 1);
    let mut too_long = u16::try_from(long.len()).unwrap().to_be_bytes().to_vec();
    too_long.extend_from_slice(long.as_bytes());
    for (id, body) in [
        (100, vec![0xff, 0xff, 1]),
        (101, vec![0, 2, 0xc3, 0x28]),
        (102, too_long),
    ] {
        raw.send_bytes(&frame(id, &body)).await;
        let resp = raw.response().await;
        assert_eq!(resp.request_id, id);
        assert_eq!(status(&resp), Status::BadRequest, "{resp:?}");
    }
    // Three malformed attempts used up the connection's bound.
    assert!(matches!(
        raw.until_closed().await.as_slice(),
        [Incoming::Event(Event::Closing {
            status: Status::Unauthenticated,
            ..
        })]
    ));
    // The server is fine.
    let (mut raw, _) = Raw::hello(addr).await;
    assert_eq!(status(&raw.call(auth(OPS)).await), Status::Ok);
    // A text line of garbage after AUTH: a usage error, the token never echoed.
    let mut t = Text::connect(addr).await;
    let line = t.cmd("AUTH s3cr3t-value extra").await;
    assert!(line.starts_with("-ERR BAD_REQUEST"), "{line}");
    assert!(!line.contains("s3cr3t"), "{line}");
}

#[tokio::test]
async fn a_reload_applies_to_established_connections_and_a_bad_one_is_refused() {
    let s = start_secured(3, false, None).await;
    let reloader = s.server.auth_reloader().expect("auth is on");
    let (mut raw, _) = Raw::hello(s.server.local_addr()).await;
    assert_eq!(status(&raw.call(auth(WRITER)).await), Status::Ok);
    assert_eq!(
        status(&raw.call(acquire("user", "u-1", LockMode::Exclusive)).await),
        Status::Forbidden
    );
    // Grant writer `user` too: the established connection gets it.
    std::fs::write(&s.file, policy("user = [\"acquire\"]")).unwrap();
    assert_eq!(reloader.reload().unwrap(), 4);
    let resp = raw.call(acquire("user", "u-1", LockMode::Exclusive)).await;
    assert!(matches!(resp.result, Ok(ResponseBody::Acquired(_))), "{resp:?}");
    // An invalid file is refused; the one in force stays.
    std::fs::write(&s.file, "[[principal]]\nname = \"writer\"\n").unwrap();
    let err = reloader.reload().unwrap_err().to_string();
    assert!(err.contains("token_sha256"), "{err}");
    let resp = raw.call(acquire("user", "u-2", LockMode::Exclusive)).await;
    assert!(matches!(resp.result, Ok(ResponseBody::Acquired(_))), "{resp:?}");
    // A principal removed from the file can do nothing more.
    std::fs::write(
        &s.file,
        format!(
            "[[principal]]\nname = \"other\"\ntoken_sha256 = \"{}\"\n",
            hash_token(OPS)
        ),
    )
    .unwrap();
    assert_eq!(reloader.reload().unwrap(), 1);
    let resp = raw.call(acquire("transaction", "tx-9", LockMode::Exclusive)).await;
    assert_eq!(status(&resp), Status::Forbidden);
    assert!(message(&resp).contains("no longer in the auth file"), "{resp:?}");
    // Giving back is always allowed.
    let resp = raw
        .call(Request::Release {
            kind: "user".into(),
            id: "u-1".into(),
            token: 0,
        })
        .await;
    assert_eq!(resp.result, Ok(ResponseBody::Released { released: true }));
}

#[tokio::test]
async fn the_http_port_wants_bearer_tokens_with_the_permissions() {
    let s = start_secured(3, true, None).await;
    let addr = s.server.http_addr().unwrap();
    let bearer = |t: &str| format!("Bearer {t}");
    // Probes stay open.
    assert_eq!(http::get(addr, "/healthz").await.status, 200);
    assert_eq!(http::get(addr, "/readyz").await.status, 200);
    // No credentials, malformed ones, a wrong token: 401 and the challenge.
    for headers in [
        vec![],
        vec![("Authorization", "Basic abc")],
        vec![("Authorization", "Bearer nope")],
    ] {
        for (method, target) in [
            ("GET", "/metrics"),
            ("GET", "/api/v1/locks/held"),
            ("POST", "/api/v1/locks/transaction/tx-1/acquire"),
            ("GET", "/api/v1/status"),
        ] {
            let r = http::request(addr, method, target, &headers, b"").await;
            assert_eq!(r.status, 401, "{method} {target} {headers:?}: {}", r.body);
            assert_eq!(r.header("www-authenticate"), Some("Bearer"));
            assert_eq!(r.json()["code"], "UNAUTHENTICATED");
        }
    }
    let reader = bearer(READER);
    let writer = bearer(WRITER);
    let ops = bearer(OPS);
    let post = |target: &'static str, token: String| async move {
        http::request(addr, "POST", target, &[("Authorization", &token)], b"").await
    };
    let r = post("/api/v1/locks/transaction/tx-1/acquire", reader.clone()).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.json()["code"], "FORBIDDEN");
    let r = post("/api/v1/locks/transaction/tx-1/acquire", writer.clone()).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = post("/api/v1/locks/user/u-1/acquire", writer.clone()).await;
    assert_eq!(r.status, 403, "{}", r.body);
    let r = post("/api/v1/locks/transaction/rotate?from=v1&to=v2", writer.clone()).await;
    assert_eq!(r.status, 403, "{}", r.body);
    let get = |target: &'static str, token: String| async move {
        http::request(addr, "GET", target, &[("Authorization", &token)], b"").await
    };
    assert_eq!(
        get("/api/v1/locks/transaction/version", reader.clone()).await.status,
        200
    );
    assert_eq!(get("/api/v1/locks/held", writer.clone()).await.status, 403);
    assert_eq!(get("/metrics", writer.clone()).await.status, 403);
    assert_eq!(get("/api/v1/locks/held", ops.clone()).await.status, 200);
    let metrics = get("/metrics", ops.clone()).await;
    assert_eq!(metrics.status, 200);
    // The four wrong bearer tokens above were counted; none is shown.
    assert!(http::metric(&metrics.body, "clastor_auth_failures_total", "port=\"http\"") >= 4.0);
    assert!(!metrics.body.contains("nope"));
}

#[tokio::test]
async fn metrics_can_be_public() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("auth.toml");
    std::fs::write(&file, policy("")).unwrap();
    let config = ServerConfig {
        auth: Some(AuthConfig::new(&file)),
        http: Some(HttpConfig {
            metrics_public: true,
            ..HttpConfig::new("127.0.0.1:0".parse().unwrap())
        }),
        ..ServerConfig::default()
    };
    let (server, _) = support::start(config, EngineConfig::default()).await;
    let addr = server.http_addr().unwrap();
    assert_eq!(http::get(addr, "/metrics").await.status, 200);
    assert_eq!(http::get(addr, "/api/v1/locks/held").await.status, 401);
}

// ----- TLS -----

fn tls_config(ca: &TestCa, client_ca: Option<&Path>) -> TlsConfig {
    let server = ca.server();
    TlsConfig {
        cert: server.cert,
        key: server.key,
        client_ca: client_ca.map(Path::to_owned),
    }
}

#[tokio::test]
async fn tls_works_with_the_right_ca_and_not_with_another() {
    let ca = TestCa::new("clastor test CA");
    let other = TestCa::new("another CA");
    let s = start_secured(3, true, Some(tls_config(&ca, None))).await;
    let addr = s.server.local_addr();
    let client = Client::builder(addr)
        .tls(ClientTls::from_pem_files(&ca.ca_file(), None).unwrap())
        .token(WRITER)
        .connect()
        .await
        .unwrap();
    let guard = client.lock("transaction", "tx-1").acquire().await.unwrap();
    assert!(guard.is_some());
    drop(guard);
    // A burst bigger than one write: the writer task finishes what the
    // inline writes cannot.
    let pings: Vec<_> = (0..500).map(|_| client.ping()).collect();
    for ping in futures_util::future::join_all(pings).await {
        ping.unwrap();
    }
    // The certificate is for 127.0.0.1 and localhost, not another name.
    let err = Client::builder(addr)
        .tls(
            ClientTls::from_pem_files(&ca.ca_file(), None)
                .unwrap()
                .server_name("locks.example"),
        )
        .connect()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    // A client that trusts another CA refuses the server.
    let err = Client::builder(addr)
        .tls(ClientTls::from_pem_files(&other.ca_file(), None).unwrap())
        .connect()
        .await
        .unwrap_err();
    match &err {
        Error::Connect { message, .. } => assert!(message.contains("TLS"), "{message}"),
        other => panic!("{other:?} ({})", other),
    }
    // A plain client gets nowhere (the port speaks only TLS), and is told why.
    let err = Client::builder(addr)
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect()
        .await
        .unwrap_err();
    match &err {
        Error::Connect { message, .. } => assert!(message.contains("answered with TLS"), "{message}"),
        other => panic!("{other:?}"),
    }
    // The text form inside TLS, as `openssl s_client` would use it.
    let mut lines = tls_text(addr, &ca, None).await;
    assert_eq!(lines.cmd("PING").await, "+PONG");
    assert_eq!(lines.cmd(&format!("AUTH {OPS}")).await, "+AUTH principal=ops");
    // The HTTP port speaks TLS too.
    let reply = tls_http_get(s.server.http_addr().unwrap(), &ca, "/healthz").await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    let reply = tls_http_get(s.server.http_addr().unwrap(), &ca, "/api/v1/locks/held").await;
    assert!(reply.starts_with("HTTP/1.1 401"), "{reply}");
}

#[tokio::test]
async fn mtls_refuses_strangers_and_names_the_principal() {
    let ca = TestCa::new("clastor test CA");
    let stranger_ca = TestCa::new("stranger CA");
    let s = start_secured(3, false, Some(tls_config(&ca, Some(&ca.ca_file())))).await;
    let addr = s.server.local_addr();
    let trust = |identity: Option<&support::tls::Pem>| {
        let id = identity.map(|p| (p.cert.as_path(), p.key.as_path()));
        ClientTls::from_pem_files(&ca.ca_file(), id).unwrap()
    };
    // No client certificate: refused.
    let err = Client::builder(addr).tls(trust(None)).connect().await.unwrap_err();
    assert!(
        matches!(err, Error::Connect { .. } | Error::ConnectionLost(_)),
        "{err:?}"
    );
    // A certificate from another CA, even with a known name: refused.
    let stranger = stranger_ca.client("ops");
    let err = Client::builder(addr)
        .tls(trust(Some(&stranger)))
        .connect()
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Connect { .. } | Error::ConnectionLost(_)),
        "{err:?}"
    );
    // `ops`'s certificate: authenticated as ops without a token.
    let ops = ca.client("ops");
    let client = Client::builder(addr).tls(trust(Some(&ops))).connect().await.unwrap();
    let info = client.info().await.unwrap();
    assert!(info.iter().any(|(k, v)| k == "auth" && v == "on"), "{info:?}");
    assert!(client.held(HeldScope::Server).await.is_ok());
    let err = client.lock("transaction", "tx-1").acquire().await.unwrap_err();
    assert!(matches!(err, Error::Forbidden(_)), "{err:?}");
    // A certificate of this CA whose name the auth file does not know:
    // connected, but not authenticated until AUTH.
    let nobody = ca.client("nobody");
    let client = Client::builder(addr).tls(trust(Some(&nobody))).connect().await.unwrap();
    let err = client.version("transaction").await.unwrap_err();
    assert!(matches!(err, Error::Unauthenticated(_)), "{err:?}");
    let client = Client::builder(addr)
        .tls(trust(Some(&nobody)))
        .token(WRITER)
        .connect()
        .await
        .unwrap();
    assert!(client.lock("transaction", "tx-1").acquire().await.unwrap().is_some());
    assert!(stranger_ca.name() != ca.name());
}

/// A text-form connection inside TLS.
struct TlsText {
    lines: tokio::io::Lines<BufReader<tokio::io::ReadHalf<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>>>,
    write: tokio::io::WriteHalf<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
}

impl TlsText {
    async fn cmd(&mut self, line: &str) -> String {
        self.write.write_all(format!("{line}\n").as_bytes()).await.unwrap();
        self.write.flush().await.unwrap();
        tokio::time::timeout(support::PATIENCE, self.lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
    }
}

#[allow(deprecated)]
fn rustls_client(ca: &TestCa) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca.ca_file()).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

async fn tls_connect(
    addr: std::net::SocketAddr,
    ca: &TestCa,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(rustls_client(ca))
        .connect(name, tcp)
        .await
        .unwrap()
}

async fn tls_text(addr: std::net::SocketAddr, ca: &TestCa, _: Option<()>) -> TlsText {
    let (r, w) = tokio::io::split(tls_connect(addr, ca).await);
    TlsText {
        lines: BufReader::new(r).lines(),
        write: w,
    }
}

async fn tls_http_get(addr: std::net::SocketAddr, ca: &TestCa, target: &str) -> String {
    use tokio::io::AsyncReadExt;
    let mut s = tls_connect(addr, ca).await;
    s.write_all(format!("GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(support::PATIENCE, s.read_to_end(&mut out))
        .await
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}
