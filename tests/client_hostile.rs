//! The client against a misbehaving server (a fake one, speaking raw
//! frames): refused handshakes, replies that do not decode, replies to
//! requests never sent, oversized frames, unknown events. A broken frame (or
//! a reply contradicting the client's state) ends in a typed error and a
//! closed connection; a reply whose body does not decode fails only its
//! request, and an unknown event is ignored. Never a panic or a hang.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use clastor_client::{Client, ClientEvent, Error, EventStream};
use clastor_protocol::{ClastorCodec, Frame, HelloOk, Response, ResponseBody, Status};
use futures_util::{FutureExt, StreamExt};
use support::PATIENCE;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::FramedRead;

/// What the fake server does after reading the client's first request.
#[derive(Clone, Copy)]
enum Misbehaviour {
    RefuseHandshake,
    /// Completes the handshake, then answers the next request with these bytes.
    AnswerWith(&'static [u8]),
    /// Completes the handshake, then answers the next request with a
    /// well-formed reply to another request id.
    WrongRequestId,
    /// Completes the handshake, then reads without ever answering, and
    /// reports on `eof` when the client closes the connection.
    Silent(&'static tokio::sync::Notify),
    /// Completes the handshake, answers the first request with these bytes,
    /// then every later request with a well-formed PONG.
    AnswerOnceThenPong(&'static [u8]),
}

async fn fake_server(how: Misbehaviour) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        serve(stream, how).await;
    });
    addr
}

async fn serve(stream: TcpStream, how: Misbehaviour) {
    let (read, mut write) = stream.into_split();
    let mut frames = FramedRead::new(read, ClastorCodec::default());
    let Some(Ok(Frame { header, .. })) = frames.next().await else {
        return;
    };
    let mut out = BytesMut::new();
    if let Misbehaviour::RefuseHandshake = how {
        Response::error(
            header.request_id,
            header.opcode,
            Status::VersionMismatch,
            "server speaks 9",
        )
        .encode(&mut out);
        write.write_all(&out).await.unwrap();
        return;
    }
    let hello = HelloOk {
        version: 1,
        connection_id: 99,
        max_frame_len: 65_536,
        max_in_flight: 16,
        server: "fake".into(),
        confirm_ms: None,
    };
    Response::ok(header.request_id, ResponseBody::Hello(hello)).encode(&mut out);
    write.write_all(&out).await.unwrap();
    if let Misbehaviour::Silent(eof) = how {
        while let Some(Ok(_)) = frames.next().await {}
        eof.notify_one();
        return;
    }
    let Some(Ok(Frame { header, .. })) = frames.next().await else {
        return;
    };
    out.clear();
    match how {
        Misbehaviour::AnswerWith(bytes) => out.extend_from_slice(bytes),
        Misbehaviour::AnswerOnceThenPong(bytes) => {
            out.extend_from_slice(bytes);
            write.write_all(&out).await.unwrap();
            while let Some(Ok(Frame { header, .. })) = frames.next().await {
                out.clear();
                Response::ok(header.request_id, ResponseBody::Pong).encode(&mut out);
                write.write_all(&out).await.unwrap();
            }
            return;
        }
        Misbehaviour::WrongRequestId => Response::ok(header.request_id + 1000, ResponseBody::Pong).encode(&mut out),
        Misbehaviour::RefuseHandshake | Misbehaviour::Silent(_) => {}
    }
    write.write_all(&out).await.unwrap();
    // Keep the socket open: the client must close it by itself.
    let _ = frames.next().await;
}

/// A client connected to a fake server that misbehaves `how`.
async fn connect(how: Misbehaviour, keepalive: Option<Duration>) -> Client {
    Client::builder(fake_server(how).await)
        .keepalive(keepalive)
        .connect()
        .await
        .unwrap()
}

/// Waits for the disconnect of a client whose keepalive went unanswered.
async fn disconnected_by_keepalive(events: &mut EventStream) {
    let ev = tokio::time::timeout(PATIENCE, events.recv()).await.unwrap().unwrap();
    match ev {
        ClientEvent::Disconnected {
            error: Error::ConnectionLost(m),
            ..
        } => assert!(m.contains("keepalive"), "{m}"),
        other => panic!("unexpected {other:?}"),
    }
}

async fn ping_fails(how: Misbehaviour) -> Error {
    let client = connect(how, None).await;
    let mut events = client.events();
    let err = tokio::time::timeout(PATIENCE, client.ping())
        .await
        .expect("no hang")
        .unwrap_err();
    let ev = tokio::time::timeout(PATIENCE, events.recv()).await.unwrap().unwrap();
    assert!(matches!(ev, ClientEvent::Disconnected { .. }), "{ev:?}");
    err
}

#[tokio::test]
async fn a_refused_handshake_is_a_typed_error() {
    let err = Client::connect(fake_server(Misbehaviour::RefuseHandshake).await)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::VersionMismatch(ref m) if m == "server speaks 9"),
        "{err:?}"
    );
}

/// The first PING gets `bytes` for an answer and fails with the returned
/// error; the connection survives: the next PING is answered, and no
/// disconnect is reported.
async fn first_ping_fails_connection_survives(bytes: &'static [u8]) -> Option<Error> {
    let client = connect(Misbehaviour::AnswerOnceThenPong(bytes), None).await;
    let mut events = client.events();
    let first = tokio::time::timeout(PATIENCE, client.ping()).await.expect("no hang");
    tokio::time::timeout(PATIENCE, client.ping())
        .await
        .expect("no hang")
        .expect("the connection lives on");
    let info = client.connection_info().expect("still connected");
    assert_eq!(info.connection_id, 99);
    // Nothing was reported: no disconnect.
    assert!(events.recv().now_or_never().is_none());
    first.err()
}

#[tokio::test]
async fn an_unknown_status_fails_only_its_request() {
    // A PONG frame (opcode 0x02, response flag) with an unknown status 0xBEEF
    // and the message "new".
    const BAD_STATUS: &[u8] = &[
        0, 0, 0, 15, 1, 0x02, 0, 1, 0, 0, 0, 2, 0xBE, 0xEF, 0, 3, b'n', b'e', b'w',
    ];
    let err = first_ping_fails_connection_survives(BAD_STATUS).await;
    assert_eq!(
        err,
        Some(Error::UnknownStatus {
            code: 0xBEEF,
            message: "new".into()
        })
    );
}

#[tokio::test]
async fn a_reply_body_that_does_not_decode_fails_only_its_request() {
    // A PONG with a byte after the status.
    const TRAILING: &[u8] = &[0, 0, 0, 11, 1, 0x02, 0, 1, 0, 0, 0, 2, 0, 0, 7];
    let err = first_ping_fails_connection_survives(TRAILING).await;
    assert!(matches!(err, Some(Error::Malformed(_))), "{err:?}");
}

#[tokio::test]
async fn an_unknown_event_is_ignored() {
    // An event (flags 0x0002, request id 0) with opcode 0x90, then the PONG.
    const UNKNOWN_EVENT_THEN_PONG: &[u8] = &[
        0, 0, 0, 11, 1, 0x90, 0, 2, 0, 0, 0, 0, 1, 2, 3, //
        0, 0, 0, 10, 1, 0x02, 0, 1, 0, 0, 0, 2, 0, 0,
    ];
    let err = first_ping_fails_connection_survives(UNKNOWN_EVENT_THEN_PONG).await;
    assert_eq!(err, None);
}

#[tokio::test]
async fn an_oversized_frame_closes_the_connection() {
    // The client accepts frames up to 16 MiB - 1; this one claims 2 GiB.
    const HUGE: &[u8] = &[0x7f, 0xff, 0xff, 0xff, 1, 0x02, 0, 1];
    let err = ping_fails(Misbehaviour::AnswerWith(HUGE)).await;
    assert!(matches!(err, Error::Malformed(_)), "{err:?}");
}

#[tokio::test]
async fn a_frame_in_another_protocol_version_closes_the_connection() {
    const V9: &[u8] = &[0, 0, 0, 10, 9, 0x02, 0, 1, 0, 0, 0, 2, 0, 0];
    let err = ping_fails(Misbehaviour::AnswerWith(V9)).await;
    assert!(matches!(err, Error::Malformed(_)), "{err:?}");
}

#[tokio::test]
async fn a_reply_to_an_unknown_request_closes_the_connection() {
    let err = ping_fails(Misbehaviour::WrongRequestId).await;
    assert!(matches!(err, Error::Malformed(_)), "{err:?}");
}

#[tokio::test]
async fn a_reply_with_the_wrong_opcode_closes_the_connection() {
    // Request ids start at 2 (1 is the handshake): answer PING as if it were RELEASE.
    const RELEASED: &[u8] = &[0, 0, 0, 11, 1, 0x11, 0, 1, 0, 0, 0, 2, 0, 0, 1];
    let err = ping_fails(Misbehaviour::AnswerWith(RELEASED)).await;
    assert!(matches!(err, Error::Malformed(_)), "{err:?}");
}

/// With the server's in-flight limit (16 here) full of blocked acquires the
/// server reads nothing more, so the client keeps one slot free: its keepalive
/// PING is read, and a dead server is still detected.
#[tokio::test]
async fn keepalive_works_with_acquires_blocking_on_every_slot() {
    static EOF: tokio::sync::Notify = tokio::sync::Notify::const_new();
    let client = connect(Misbehaviour::Silent(&EOF), Some(Duration::from_millis(100))).await;
    let mut events = client.events();
    let blocked: Vec<_> = (0..20)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move { client.lock("k", format!("{i}")).wait(PATIENCE).acquire().await })
        })
        .collect();
    disconnected_by_keepalive(&mut events).await;
    for b in blocked {
        assert!(matches!(b.await.unwrap(), Err(Error::ConnectionLost(_))));
    }
}

#[tokio::test]
async fn keepalive_detects_a_silent_server_and_closes_the_socket() {
    static EOF: tokio::sync::Notify = tokio::sync::Notify::const_new();
    let client = connect(Misbehaviour::Silent(&EOF), Some(Duration::from_millis(100))).await;
    let mut events = client.events();
    disconnected_by_keepalive(&mut events).await;
    // The server sees the connection end, so it releases whatever it held.
    tokio::time::timeout(PATIENCE, EOF.notified())
        .await
        .expect("server saw EOF");
    drop(client);
}
