//! The lean driver (`--raw`): speaks the binary protocol straight over a
//! socket and keeps `--depth` requests in flight per connection, without
//! the client crate's per-request machinery (oneshots, guards, safe-until
//! bookkeeping). One task per connection reads every reply that has
//! arrived, queues the follow-up requests, and sends them in one write, so
//! the load process spends its time on the server's work, not its own.
//!
//! The same driver runs the echo floors: against an echo server every
//! frame comes back as it went, and only its request id is read; the
//! acquire+release floor sends an `ACQUIRE` frame, then on its echo a
//! `RELEASE` frame, as the driver does against the server.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::BytesMut;
use clastor_protocol::{Acquire, HIGHEST_VERSION, Hello, LockMode, Request, Response, ResponseBody, split_frame};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{Keys, micros, new_hist};

/// What each pipeline slot does over and over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RawOp {
    /// `PING`; a sample is one round trip.
    Ping,
    /// `ACQUIRE` (waiting up to 30 s) then `RELEASE`; a sample is the pair.
    AcquireRelease,
    /// Frames of `PING`'s size to an echo server; a sample is one round trip.
    Echo,
    /// An `ACQUIRE` frame then a `RELEASE` frame to an echo server, each
    /// sent when the previous one came back: the floor of an
    /// acquire+release sample, two round trips of its requests' sizes.
    EchoPair,
}

impl RawOp {
    fn is_echo(self) -> bool {
        matches!(self, RawOp::Echo | RawOp::EchoPair)
    }
}

/// Request id of the handshake; slot `j` uses id `FIRST_SLOT_ID + j`.
const HELLO_ID: u32 = 1;
const FIRST_SLOT_ID: u32 = 2;

/// How long a pipelined acquire waits for a contended lock.
const WAIT_MS: u32 = 30_000;

/// One pipeline slot: its key and where it is in its cycle.
struct Slot {
    id: String,
    /// Start of the current sample.
    started: Instant,
    /// `Some(token)` while the lock is held and the RELEASE is on its way.
    releasing: Option<u64>,
}

/// Samples of one connection, recorded between `record_from` and `until`.
pub(super) struct Window {
    pub(super) record_from: Instant,
    pub(super) until: Instant,
}

/// Runs one connection with `depth` requests in flight until `window.until`;
/// returns its histogram (µs) and error count.
pub(super) async fn run_connection(
    addr: &str,
    op: RawOp,
    keys: Keys,
    conn: usize,
    depth: usize,
    window: &Window,
) -> anyhow::Result<(Histogram<u64>, u64)> {
    let mut stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect to {addr}"))?;
    stream.set_nodelay(true)?;
    let mut out = BytesMut::with_capacity(64 * depth.max(1));
    let mut inbuf = BytesMut::with_capacity(16 * 1024);
    if !op.is_echo() {
        handshake(&mut stream, &mut out, &mut inbuf).await?;
    }
    let run = std::process::id();
    let mut slots: Vec<Slot> = (0..depth)
        .map(|j| Slot {
            id: match keys {
                Keys::Distinct => format!("r{run}-c{conn}-s{j}"),
                // Slot j of every connection shares key j: each key is
                // contended by all connections, never twice by one.
                Keys::Shared => format!("shared-s{j}"),
                Keys::Fresh => format!("f{run}-c{conn}-s{j}-0"),
            },
            started: Instant::now(),
            releasing: None,
        })
        .collect();
    let (mut hist, mut errors) = (new_hist(), 0u64);
    let mut fresh = 0u64;
    for (j, slot) in slots.iter_mut().enumerate() {
        slot.started = Instant::now();
        send_first(op, slot_id(j), &slot.id, &mut out);
    }
    let mut live = depth;
    while live > 0 {
        if !out.is_empty() {
            stream.write_all_buf(&mut out).await?;
        }
        if stream.read_buf(&mut inbuf).await? == 0 {
            bail!("server closed the connection");
        }
        let now = Instant::now();
        while let Some(frame) = split_frame(&mut inbuf) {
            let Some(j) = frame
                .header
                .request_id
                .checked_sub(FIRST_SLOT_ID)
                .map(|j| j as usize)
                .filter(|&j| j < depth)
            else {
                // An event (request id 0) or a stray reply: not ours to time.
                continue;
            };
            let slot = &mut slots[j];
            let done = match op {
                RawOp::Echo | RawOp::Ping => true,
                // The acquire's echo is back: send the release's (a token
                // of 0 encodes to the same size as any other).
                RawOp::EchoPair if slot.releasing.is_none() => {
                    slot.releasing = Some(0);
                    encode_release(&slot.id, 0, slot_id(j), &mut out);
                    false
                }
                RawOp::EchoPair => {
                    slot.releasing = None;
                    true
                }
                RawOp::AcquireRelease => match Response::decode(&frame.header, frame.body) {
                    Ok(Response {
                        result: Ok(ResponseBody::Acquired(a)),
                        ..
                    }) => {
                        slot.releasing = Some(a.token);
                        encode_release(&slot.id, a.token, slot_id(j), &mut out);
                        false
                    }
                    Ok(Response {
                        result: Ok(ResponseBody::Released { .. }),
                        ..
                    }) => {
                        slot.releasing = None;
                        true
                    }
                    _ => {
                        errors += 1;
                        slot.releasing = None;
                        true
                    }
                },
            };
            if !done {
                continue;
            }
            if slot.started >= window.record_from && now <= window.until {
                let _ = hist.record(micros(now - slot.started));
            }
            if now >= window.until {
                live -= 1;
                continue;
            }
            if keys == Keys::Fresh {
                fresh += 1;
                slot.id = format!("f{run}-c{conn}-s{j}-{fresh}");
            }
            slot.started = now;
            send_first(op, slot_id(j), &slot.id, &mut out);
        }
    }
    Ok((hist, errors))
}

/// Kind of the locks the driver takes.
const KIND: &str = "load";

fn slot_id(j: usize) -> u32 {
    FIRST_SLOT_ID + u32::try_from(j).unwrap_or(u32::MAX - FIRST_SLOT_ID)
}

/// Encodes the request that starts a sample.
fn send_first(op: RawOp, request_id: u32, id: &str, out: &mut BytesMut) {
    match op {
        RawOp::Ping | RawOp::Echo => Request::Ping.encode(request_id, out),
        RawOp::AcquireRelease | RawOp::EchoPair => Request::Acquire(Acquire {
            kind: KIND.to_owned(),
            id: id.to_owned(),
            wait_ms: WAIT_MS,
            lease_ms: 0,
            mode: LockMode::Exclusive,
            trace_id: None,
        })
        .encode(request_id, out),
    }
}

fn encode_release(id: &str, token: u64, request_id: u32, out: &mut BytesMut) {
    Request::Release {
        kind: KIND.to_owned(),
        id: id.to_owned(),
        token,
    }
    .encode(request_id, out);
}

/// `HELLO` for the highest version, as the client crate does (so grants
/// carry safe-until, and the server pays for computing it).
async fn handshake(stream: &mut TcpStream, out: &mut BytesMut, inbuf: &mut BytesMut) -> anyhow::Result<()> {
    Request::Hello(Hello {
        min_version: 1,
        max_version: HIGHEST_VERSION,
        client_name: "clastor-load/raw".into(),
    })
    .encode(HELLO_ID, out);
    stream.write_all_buf(out).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(frame) = split_frame(inbuf) {
            let resp = Response::decode(&frame.header, frame.body).context("HELLO reply")?;
            return match resp.result {
                Ok(ResponseBody::Hello(_)) => Ok(()),
                other => bail!("HELLO refused: {other:?}"),
            };
        }
        let n = tokio::time::timeout_at(deadline.into(), stream.read_buf(inbuf))
            .await
            .context("no HELLO reply within 10 s")??;
        if n == 0 {
            bail!("server closed the connection during HELLO");
        }
    }
}
