//! The client crate against an in-process server: handshake, low-level calls,
//! raw requests, client-side validation, and the shape of its errors.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use clastor_client::{Client, ClientEvent, Error, HeldScope, KindMode, Request, ResponseBody, Status};
use clastor_protocol::Event;

#[tokio::test]
async fn connects_pings_and_describes_the_connection() {
    let (server, client) = support::start_and_connect().await;
    let rtt = client.ping().await.unwrap();
    assert!(rtt < support::PATIENCE);
    let info = client.connection_info().expect("connected");
    assert_eq!(info.peer, server.local_addr());
    assert!(info.server.starts_with("clastor"), "{}", info.server);
    assert!(info.max_in_flight > 0);
    server.shutdown().await;
}

#[tokio::test]
async fn low_level_calls() {
    let (server, client) = support::start_and_connect().await;
    let v = client.version("transaction").await.unwrap();
    assert_eq!(v.mode, KindMode::Normal);
    assert!(!v.version.is_empty());
    let info = client.info().await.unwrap();
    assert!(info.iter().any(|(k, _)| k == "server"), "{info:?}");
    assert!(client.held(HeldScope::Connection).await.unwrap().is_empty());

    let guard = support::take_free(&client, "transaction", "tx-1").await;
    let mine = client.held(HeldScope::Connection).await.unwrap();
    assert_eq!(mine.len(), 1);
    assert_eq!(
        (mine[0].kind.as_str(), mine[0].id.as_str(), mine[0].token),
        ("transaction", "tx-1", guard.token())
    );
    assert_eq!(mine[0].connection_id, guard.connection_id());
    let other = support::connect(&server).await;
    assert!(other.held(HeldScope::Connection).await.unwrap().is_empty());
    assert_eq!(other.held(HeldScope::Server).await.unwrap().len(), 1);
    guard.release().await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn names_are_checked_before_sending() {
    let (server, client) = support::start_and_connect().await;
    for (kind, id) in [("transaction", "a/b"), ("", "x"), ("k", ".."), ("k", "a b")] {
        let got = client.lock(kind, id).try_acquire().await;
        assert!(matches!(got, Err(Error::InvalidName(_))), "{kind:?} {id:?}: {got:?}");
    }
    assert!(matches!(client.version("a/b").await, Err(Error::InvalidName(_))));
    let got = client.lock("k", "i").lease(Duration::ZERO).try_acquire().await;
    assert!(matches!(got, Err(Error::InvalidArgument(_))), "{got:?}");
    let got = client.lock("k", "i").auto_renew(true).try_acquire().await;
    assert!(matches!(got, Err(Error::InvalidArgument(_))), "{got:?}");
    // The connection is still fine.
    client.ping().await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn raw_requests_return_every_status() {
    let (server, client) = support::start_and_connect().await;
    let resp = client.request(Request::Ping).await.unwrap();
    assert_eq!(resp.result, Ok(ResponseBody::Pong));
    let resp = client
        .request(Request::Release {
            kind: "k".into(),
            id: "i".into(),
            token: 0,
        })
        .await
        .unwrap();
    assert_eq!(resp.result, Ok(ResponseBody::Released { released: false }));
    let resp = client
        .request(Request::Version {
            kind: "bad/kind".into(),
        })
        .await
        .unwrap();
    assert_eq!(resp.status(), Status::InvalidName);
    let err = client
        .request(Request::Hello(clastor_protocol::Hello {
            min_version: 1,
            max_version: 1,
            client_name: "again".into(),
        }))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn connect_fails_with_a_typed_error() {
    // A port nobody listens on: bind one, note it, close it.
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let err = Client::builder(addr)
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    assert!(err.is_retryable());
}

#[tokio::test]
async fn lease_expiry_shows_on_the_event_stream() {
    let (server, client) = support::start_and_connect().await;
    let mut events = client.events();
    let resp = client
        .request(support::try_acquire_request("k", "raw", 50))
        .await
        .unwrap();
    let Ok(ResponseBody::Acquired(grant)) = resp.result else {
        panic!("{resp:?}")
    };
    let ev = tokio::time::timeout(support::PATIENCE, events.recv())
        .await
        .unwrap()
        .unwrap();
    match ev {
        ClientEvent::Server {
            event:
                Event::LockLost {
                    kind,
                    id,
                    token,
                    reason,
                },
            ..
        } => {
            assert_eq!((kind.as_str(), id.as_str(), token), ("k", "raw", grant.token));
            assert_eq!(reason, clastor_protocol::LostReason::LeaseExpired);
        }
        other => panic!("unexpected {other:?}"),
    }
    server.shutdown().await;
}
