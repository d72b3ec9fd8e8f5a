//! Opening a connection: TCP (and TLS), `HELLO` and `AUTH` pipelined, the
//! checks of their replies, socket options; then the [`Connection`] is built
//! and its reader, writer, keepalive and confirm tasks are spawned.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use clastor_protocol::{
    ClastorCodec, EVENT_REQUEST_ID, Event, Frame, FrameError, HIGHEST_VERSION, Hello, HelloOk, Opcode,
    PROTOCOL_VERSION, Request, Response, ResponseBody,
};
use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, Semaphore, broadcast};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use super::confirm::confirm_loop;
use super::connection::{Conn, Connection, State};
use super::held::HeldLocks;
use super::keepalive::keepalive_loop;
use super::outbound::Outbound;
use super::pending::{AUTH_ID, HELLO_ID, PendingRequests};
use super::reader::{FrameSource, read_loop};
use super::turn::LocalTurns;
use super::writer::write_loop;
use crate::config::ClientBuilder;
use crate::error::Error;
use crate::event::ClientEvent;
use crate::transport::Writer;

/// Opens a connection and performs the handshake (and `AUTH`, with a token).
pub(crate) async fn connect(cfg: &ClientBuilder, events: broadcast::Sender<ClientEvent>) -> Result<Conn, Error> {
    let addr = cfg.addr.as_str();
    let connect_err = |message: String| Error::Connect {
        addr: addr.to_owned(),
        message,
    };
    let handshake = async {
        let stream = TcpStream::connect(addr).await.map_err(|e| connect_err(e.to_string()))?;
        // Requests are small and latency-bound: never let Nagle hold one back.
        stream
            .set_nodelay(true)
            .map_err(|e| connect_err(format!("setting TCP_NODELAY: {e}")))?;
        set_keepalive(&stream, cfg.keepalive);
        let peer = stream.peer_addr().map_err(|e| connect_err(e.to_string()))?;
        // HELLO and AUTH go out together: the server reads AUTH only after
        // it has answered HELLO, so the pipelining costs no round trip.
        let mut buf = BytesMut::new();
        Request::Hello(Hello {
            min_version: PROTOCOL_VERSION,
            max_version: HIGHEST_VERSION,
            client_name: cfg.client_name.clone(),
        })
        .encode(HELLO_ID, &mut buf);
        if let Some(token) = &cfg.token {
            Request::Auth { token: token.clone() }.encode(AUTH_ID, &mut buf);
        }
        #[cfg(feature = "tls")]
        if let Some(tls) = &cfg.tls {
            let sock = socket2::SockRef::from(&stream)
                .try_clone()
                .map_err(|e| connect_err(format!("duplicating the socket: {e}")))?;
            let mut stream = tls.connect(addr, stream).await.map_err(connect_err)?;
            stream
                .write_all(&buf)
                .await
                .map_err(|e| connect_err(format!("sending HELLO: {e}")))?;
            stream
                .flush()
                .await
                .map_err(|e| connect_err(format!("sending HELLO: {e}")))?;
            let (read, write) = tokio::io::split(stream);
            let mut frames = FramedRead::new(read, ClastorCodec::new(cfg.max_frame_len));
            let hello = read_handshake(&mut frames, cfg.token.is_some(), &connect_err).await?;
            return Ok::<Opened, Error>(Opened {
                peer,
                hello,
                frames: Box::new(frames) as Box<dyn FrameSource>,
                write: Writer::Tls {
                    half: tokio::sync::Mutex::new(write),
                    sock,
                },
            });
        }
        let (read, mut write) = stream.into_split();
        write
            .write_all(&buf)
            .await
            .map_err(|e| connect_err(format!("sending HELLO: {e}")))?;
        let mut frames = FramedRead::new(read, ClastorCodec::new(cfg.max_frame_len));
        let hello = read_handshake(&mut frames, cfg.token.is_some(), &connect_err).await?;
        Ok::<Opened, Error>(Opened {
            peer,
            hello,
            frames: Box::new(frames) as Box<dyn FrameSource>,
            write: Writer::Tcp(write),
        })
    };
    let opened = tokio::time::timeout(cfg.connect_timeout, handshake)
        .await
        .map_err(|_| connect_err(format!("no handshake within {:?}", cfg.connect_timeout)))??;
    let Opened {
        peer,
        hello,
        frames,
        write,
    } = opened;
    tracing::debug!(%peer, connection_id = hello.connection_id, server = %hello.server, "connected");
    // One slot below the server's limit stays free, so the server always reads
    // the next frame, a keepalive PING included, however many acquires block.
    let in_flight = cfg
        .max_in_flight
        .min(usize::try_from(hello.max_in_flight).unwrap_or(usize::MAX))
        .saturating_sub(1)
        .max(1);
    let shared = Arc::new_cyclic(|me| Connection {
        me: me.clone(),
        hello,
        peer,
        write,
        turns: Arc::new(LocalTurns::default()),
        state: Mutex::new(State {
            // Without a token no AUTH went out: ids go on right after HELLO.
            requests: PendingRequests::new(if cfg.token.is_some() { AUTH_ID + 1 } else { AUTH_ID }),
            out: Outbound::new(),
            held: HeldLocks::default(),
            dead: None,
            closing: None,
        }),
        writer_wake: Notify::new(),
        closed: CancellationToken::new(),
        permits: Arc::new(Semaphore::new(in_flight)),
        events,
        born: Instant::now(),
        last_rx_ms: AtomicU64::new(0),
        confirm_now: Notify::new(),
        confirms_out: AtomicUsize::new(0),
    });
    tokio::spawn(read_loop(shared.clone(), frames));
    tokio::spawn(write_loop(shared.clone()));
    if let Some(interval) = cfg.keepalive {
        tokio::spawn(keepalive_loop(shared.clone(), interval));
    }
    if let Some(ms) = shared.hello.confirm_ms {
        // A server that names no pace (0) gets a second.
        let ms = if ms == 0 { 1_000 } else { ms };
        tokio::spawn(confirm_loop(shared.clone(), Duration::from_millis(u64::from(ms))));
    }
    Ok(Conn::new(shared))
}

/// A connection whose handshake is done.
struct Opened {
    peer: SocketAddr,
    hello: HelloOk,
    frames: Box<dyn FrameSource>,
    write: Writer,
}

/// Reads the replies to `HELLO` and, when one was sent, to `AUTH`.
async fn read_handshake<R: AsyncRead + Unpin>(
    frames: &mut FramedRead<R, ClastorCodec>,
    authenticating: bool,
    connect_err: &impl Fn(String) -> Error,
) -> Result<HelloOk, Error> {
    let mut next = async |what: &str| match frames.next().await {
        Some(Ok(frame)) => Ok(frame),
        // A TLS record's header (handshake 0x16, alert 0x15, version 3.x)
        // read as a length prefix: the server speaks TLS and this client not.
        Some(Err(FrameError::TooLarge { len, .. })) if matches!(len >> 16, 0x1503 | 0x1603) => Err(connect_err(
            "the server answered with TLS: connect with TLS (a CA file: ClientBuilder::tls, the CLI's --tls-ca)".into(),
        )),
        Some(Err(e)) => Err(connect_err(format!("reading the {what} reply: {e}"))),
        None => Err(connect_err(format!(
            "the server closed the connection during the handshake ({what})"
        ))),
    };
    let hello = handshake_reply(next("HELLO").await?)?;
    if authenticating {
        let principal = auth_reply(next("AUTH").await?)?;
        tracing::debug!(%principal, "authenticated");
    }
    Ok(hello)
}

/// Checks the reply to `AUTH`: the principal's name, or why not.
fn auth_reply(frame: Frame) -> Result<String, Error> {
    let Frame { header, body } = frame;
    if header.request_id == EVENT_REQUEST_ID {
        return match Event::decode(&header, body) {
            Ok(Event::Closing { status, message }) => Err(Error::from_status(status, message)),
            _ => Err(Error::Malformed("event during authentication".into())),
        };
    }
    let response = Response::decode(&header, body).map_err(|e| Error::from_body_error(e, "AUTH reply"))?;
    if response.request_id != AUTH_ID {
        return Err(Error::Malformed(format!(
            "expected the AUTH reply, got one for request {}",
            response.request_id
        )));
    }
    match response.result {
        Ok(ResponseBody::Authenticated { principal }) => Ok(principal),
        Ok(other) => Err(Error::Malformed(format!("{} body in the AUTH reply", other.opcode()))),
        Err(e) => Err(e.into()),
    }
}

/// Turns on TCP keepalive (probing after `interval` of silence, and giving up
/// on unacknowledged data after twice that on Linux), so a peer that vanished
/// is noticed even when the keepalive PING cannot be sent. Best effort: a
/// socket that refuses the options still works.
fn set_keepalive(stream: &TcpStream, interval: Option<Duration>) {
    let sock = socket2::SockRef::from(stream);
    let result = match interval {
        Some(interval) => {
            // The kernel counts in whole seconds, at least one.
            let interval = interval.max(Duration::from_secs(1));
            let params = socket2::TcpKeepalive::new().with_time(interval).with_interval(interval);
            sock.set_tcp_keepalive(&params)
        }
        None => sock.set_keepalive(true),
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "cannot set SO_KEEPALIVE");
    }
    #[cfg(target_os = "linux")]
    if let Some(interval) = interval
        && let Err(e) = sock.set_tcp_user_timeout(Some(interval.max(Duration::from_secs(1)).saturating_mul(2)))
    {
        tracing::debug!(error = %e, "cannot set TCP_USER_TIMEOUT");
    }
}

/// Checks the first frame the server sends: the reply to `HELLO`, or a
/// `CLOSING` event saying why it will not talk to us.
fn handshake_reply(frame: Frame) -> Result<HelloOk, Error> {
    let Frame { header, body } = frame;
    if header.request_id == EVENT_REQUEST_ID {
        return match Event::decode(&header, body) {
            Ok(Event::Closing { status, message }) => Err(Error::from_status(status, message)),
            Ok(other) => Err(Error::Malformed(format!(
                "{} event during the handshake",
                other.opcode()
            ))),
            Err(e) => Err(Error::Malformed(format!("event during the handshake: {e}"))),
        };
    }
    let response = Response::decode(&header, body).map_err(|e| Error::from_body_error(e, "HELLO reply"))?;
    if response.request_id != HELLO_ID || response.opcode != Opcode::Hello as u8 {
        return Err(Error::Malformed(format!(
            "expected the HELLO reply, got opcode 0x{:02x} for request {}",
            response.opcode, response.request_id
        )));
    }
    match response.result {
        Ok(ResponseBody::Hello(hello)) if (PROTOCOL_VERSION..=HIGHEST_VERSION).contains(&hello.version) => Ok(hello),
        Ok(ResponseBody::Hello(hello)) => Err(Error::VersionMismatch(format!(
            "server chose protocol version {}, this client speaks {PROTOCOL_VERSION}..={HIGHEST_VERSION}",
            hello.version
        ))),
        Ok(other) => Err(Error::Malformed(format!("{} body in the HELLO reply", other.opcode()))),
        Err(e) => Err(e.into()),
    }
}
