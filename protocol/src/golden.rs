//! Golden bytes for every message, and the check that keeps the examples in
//! `PROTOCOL.md` identical to what this crate writes.
//!
//! Each binary example pins one message three ways:
//! 1. the literal bytes below: an encoder change fails here first;
//! 2. decoding those bytes gives the message back;
//! 3. `PROTOCOL.md` holds the same bytes as an annotated dump. The field notes
//!    in the dump come from [`annotate`], a second, deliberately naive reader
//!    written from the spec's tables rather than from the decoder, so the doc,
//!    the encoder and the decoder are checked against each other.
//!
//! The text-mode sample sessions in `PROTOCOL.md` are generated the same way,
//! from [`crate::text`]'s parser and formatters.
//!
//! After an intended change to the wire format or the text form, run
//! `CLASTOR_BLESS=1 cargo test -p clastor-protocol golden` to rewrite the
//! blocks in `PROTOCOL.md`, then review the diff (and update the literals
//! here by hand: they are the independent record).

use std::fmt::Write as _;

use bytes::BytesMut;
use tokio_util::codec::Decoder;

use crate::text::{self, Command};
use crate::{
    Acquire, AcquireOk, AuthToken, ClastorCodec, DrainState, Event, Flags, HeldLock, HeldScope, Hello, HelloOk,
    KindLayout, KindMode, LockMode, LostReason, Opcode, Request, Response, ResponseBody, Rotate, RotateOk,
    RotationHolder, RotationPhase, RotationProgress, Status, VersionInfo,
};

/// Any message, with what its encoder needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Msg {
    Request { request_id: u32, request: Request },
    Response(Response),
    Event(Event),
}

impl Msg {
    pub(crate) fn encode(&self) -> BytesMut {
        let mut buf = BytesMut::new();
        match self {
            Msg::Request { request_id, request } => request.encode(*request_id, &mut buf),
            Msg::Response(r) => r.encode(&mut buf),
            Msg::Event(e) => e.encode(&mut buf),
        }
        buf
    }

    /// Decodes exactly one whole frame the way a peer would: the codec, then
    /// the body decoder the header's flags call for.
    pub(crate) fn decode(bytes: &[u8]) -> Msg {
        let mut buf = BytesMut::from(bytes);
        let frame = ClastorCodec::default()
            .decode(&mut buf)
            .expect("frame error")
            .expect("incomplete frame");
        assert!(buf.is_empty(), "{} bytes after the frame", buf.len());
        let header = frame.header;
        match header.flags {
            Flags::REQUEST => Msg::Request {
                request_id: header.request_id,
                request: Request::decode(&header, frame.body).expect("request body"),
            },
            Flags::RESPONSE => Msg::Response(Response::decode(&header, frame.body).expect("response body")),
            Flags::EVENT => Msg::Event(Event::decode(&header, frame.body).expect("event body")),
            other => panic!("unexpected flags {other:?}"),
        }
    }
}

/// One named example: the message and its exact encoding.
#[derive(Debug)]
pub(crate) struct Example {
    /// Also the marker in PROTOCOL.md: `<!-- golden: NAME -->`.
    pub(crate) name: &'static str,
    pub(crate) msg: Msg,
    /// Hex digits; whitespace is ignored.
    pub(crate) golden: &'static str,
}

const SERVER: &str = "clastor 0.1.0 (memory)";

fn s(v: &str) -> String {
    v.to_owned()
}

fn req(request_id: u32, request: Request) -> Msg {
    Msg::Request { request_id, request }
}

fn ok(request_id: u32, body: ResponseBody) -> Msg {
    Msg::Response(Response::ok(request_id, body))
}

/// Every message type, with realistic values. Request ids pair each response
/// with its request.
pub(crate) fn examples() -> Vec<Example> {
    vec![
        Example {
            name: "request/hello",
            msg: req(
                1,
                Request::Hello(Hello {
                    min_version: 1,
                    max_version: 1,
                    client_name: s("app-7"),
                }),
            ),
            golden: "00000011 01 01 0000 00000001  01 01 0005 6170702d37",
        },
        Example {
            name: "request/ping",
            msg: req(2, Request::Ping),
            golden: "00000008 01 02 0000 00000002",
        },
        Example {
            name: "request/acquire",
            msg: req(
                3,
                Request::Acquire(Acquire {
                    kind: s("transaction"),
                    id: s("tx-1"),
                    wait_ms: 5000,
                    lease_ms: 30000,
                    mode: LockMode::Exclusive,
                    trace_id: None,
                }),
            ),
            golden: "00000024 01 10 0000 00000003
                     000b 7472616e73616374696f6e 0004 74782d31 00001388 00007530 00",
        },
        Example {
            name: "request/release",
            msg: req(
                4,
                Request::Release {
                    kind: s("transaction"),
                    id: s("tx-1"),
                    token: 1234,
                },
            ),
            golden: "00000023 01 11 0000 00000004
                     000b 7472616e73616374696f6e 0004 74782d31 00000000000004d2",
        },
        Example {
            name: "request/renew",
            msg: req(
                5,
                Request::Renew {
                    kind: s("transaction"),
                    id: s("tx-1"),
                    lease_ms: 30000,
                    token: 1234,
                },
            ),
            golden: "00000027 01 12 0000 00000005
                     000b 7472616e73616374696f6e 0004 74782d31 00007530 00000000000004d2",
        },
        Example {
            name: "request/held",
            msg: req(
                6,
                Request::Held {
                    scope: HeldScope::Connection,
                },
            ),
            golden: "00000009 01 13 0000 00000006  00",
        },
        Example {
            name: "request/version",
            msg: req(7, Request::Version { kind: s("transaction") }),
            golden: "00000015 01 14 0000 00000007  000b 7472616e73616374696f6e",
        },
        Example {
            name: "request/info",
            msg: req(8, Request::Info),
            golden: "00000008 01 15 0000 00000008",
        },
        Example {
            name: "request/confirm",
            msg: req(9, Request::Confirm),
            golden: "00000008 01 16 0000 00000009",
        },
        Example {
            name: "request/rotate",
            msg: req(
                10,
                Request::Rotate(Rotate {
                    kind: s("transaction"),
                    from: s("v1"),
                    to: s("v2"),
                    drain_timeout_ms: 60000,
                    layout: None,
                }),
            ),
            golden: "00000021 01 17 0000 0000000a
                     000b 7472616e73616374696f6e 0002 7631 0002 7632 0000ea60",
        },
        Example {
            name: "request/rotate-abort",
            msg: req(11, Request::RotateAbort { kind: s("transaction") }),
            golden: "00000015 01 18 0000 0000000b  000b 7472616e73616374696f6e",
        },
        Example {
            name: "request/auth",
            msg: req(
                12,
                Request::Auth {
                    token: AuthToken::new("s3cret-token"),
                },
            ),
            golden: "00000016 01 19 0000 0000000c  000c 7333637265742d746f6b656e",
        },
        Example {
            name: "response/hello",
            msg: ok(
                1,
                ResponseBody::Hello(HelloOk {
                    version: 1,
                    connection_id: 42,
                    max_frame_len: 65536,
                    max_in_flight: 512,
                    server: s(SERVER),
                    confirm_ms: None,
                }),
            ),
            golden: "00000033 01 01 0001 00000001
                     0000 01 000000000000002a 00010000 00000200
                     0016 636c6173746f7220302e312e3020286d656d6f727929",
        },
        Example {
            name: "response/ping",
            msg: ok(2, ResponseBody::Pong),
            golden: "0000000a 01 02 0001 00000002  0000",
        },
        Example {
            name: "response/acquire",
            msg: ok(
                3,
                ResponseBody::Acquired(AcquireOk {
                    token: 1234,
                    lease_ms: 30000,
                    version: s("v1"),
                    safe_ms: None,
                }),
            ),
            golden: "0000001a 01 10 0001 00000003  0000 00000000000004d2 00007530 0002 7631",
        },
        Example {
            name: "response/release",
            msg: ok(4, ResponseBody::Released { released: true }),
            golden: "0000000b 01 11 0001 00000004  0000 01",
        },
        Example {
            name: "response/renew",
            msg: ok(
                5,
                ResponseBody::Renewed {
                    token: 1234,
                    lease_ms: 30000,
                    safe_ms: None,
                },
            ),
            golden: "00000016 01 12 0001 00000005  0000 00000000000004d2 00007530",
        },
        Example {
            name: "response/held",
            msg: ok(
                6,
                ResponseBody::Held(vec![HeldLock {
                    kind: s("transaction"),
                    id: s("tx-1"),
                    token: 1234,
                    version: s("v1"),
                    lease_remaining_ms: 29500,
                    connection_id: 42,
                    trace_id: None,
                    mode: None,
                }]),
            ),
            golden: "00000037 01 13 0001 00000006
                     0000 0001
                     000b 7472616e73616374696f6e 0004 74782d31 00000000000004d2
                     0002 7631 0000733c 000000000000002a",
        },
        Example {
            name: "response/version",
            msg: ok(
                7,
                ResponseBody::Version(VersionInfo {
                    version: s("v1"),
                    mode: KindMode::Normal,
                    drain: None,
                    layout: None,
                }),
            ),
            golden: "0000000f 01 14 0001 00000007  0000 0002 7631 00",
        },
        Example {
            name: "response/info",
            msg: ok(
                8,
                ResponseBody::Info(vec![(s("backend"), s("memory")), (s("locks_held"), s("1"))]),
            ),
            golden: "0000002c 01 15 0001 00000008
                     0000 0002
                     0007 6261636b656e64 0006 6d656d6f7279
                     000a 6c6f636b735f68656c64 0001 31",
        },
        Example {
            name: "response/confirm",
            msg: ok(9, ResponseBody::Confirmed { safe_ms: 5400 }),
            golden: "0000000e 01 16 0001 00000009  0000 00001518",
        },
        Example {
            name: "response/hello-v2",
            msg: ok(
                1,
                ResponseBody::Hello(HelloOk {
                    version: 2,
                    connection_id: 42,
                    max_frame_len: 65536,
                    max_in_flight: 512,
                    server: s(SERVER),
                    confirm_ms: Some(1000),
                }),
            ),
            golden: "00000037 01 01 0001 00000001
                     0000 02 000000000000002a 00010000 00000200
                     0016 636c6173746f7220302e312e3020286d656d6f727929 000003e8",
        },
        Example {
            name: "response/acquire-v2",
            msg: ok(
                3,
                ResponseBody::Acquired(AcquireOk {
                    token: 1234,
                    lease_ms: 30000,
                    version: s("v1"),
                    safe_ms: Some(5400),
                }),
            ),
            golden: "0000001e 01 10 0001 00000003  0000 00000000000004d2 00007530 0002 7631 00001518",
        },
        Example {
            name: "response/renew-v2",
            msg: ok(
                5,
                ResponseBody::Renewed {
                    token: 1234,
                    lease_ms: 30000,
                    safe_ms: Some(5400),
                },
            ),
            golden: "0000001a 01 12 0001 00000005  0000 00000000000004d2 00007530 00001518",
        },
        Example {
            name: "response/version-v2-draining",
            msg: ok(
                7,
                ResponseBody::Version(VersionInfo {
                    version: s("v1"),
                    mode: KindMode::Draining,
                    drain: Some(DrainState {
                        to: s("v2"),
                        remaining: 3,
                        left_ms: 58500,
                    }),
                    layout: None,
                }),
            ),
            golden: "0000001b 01 14 0001 00000007  0000 0002 7631 01 0002 7632 00000003 0000e484",
        },
        Example {
            name: "response/rotate",
            msg: ok(
                10,
                ResponseBody::Rotated(RotateOk {
                    version: s("v2"),
                    drain_ms: 1500,
                    leftover: 0,
                }),
            ),
            golden: "00000016 01 17 0001 0000000a  0000 0002 7632 000005dc 00000000",
        },
        Example {
            name: "response/rotate-abort",
            msg: ok(
                11,
                ResponseBody::RotateAborted {
                    version: s("v1"),
                    aborted: true,
                },
            ),
            golden: "0000000f 01 18 0001 0000000b  0000 0002 7631 01",
        },
        Example {
            name: "response/error-rotation-refused",
            msg: Msg::Response(Response::error(
                10,
                Opcode::Rotate as u8,
                Status::RotationRefused,
                "transaction is at version v2, not v1",
            )),
            golden: "00000030 01 17 0001 0000000a
                     0005 0024 7472616e73616374696f6e206973206174207665727369
                     6f6e2076322c206e6f74207631",
        },
        Example {
            name: "request/acquire-v3",
            msg: req(
                3,
                Request::Acquire(Acquire {
                    kind: s("transaction"),
                    id: s("tx-1"),
                    wait_ms: 5000,
                    lease_ms: 30000,
                    mode: LockMode::Exclusive,
                    trace_id: Some(s("4bf92f3577b34da6a3ce929d0e0e4736")),
                }),
            ),
            golden: "00000046 01 10 0000 00000003
                     000b 7472616e73616374696f6e 0004 74782d31 00001388 00007530 00
                     0020 3462663932663335373762333464613661336365393239643065306534373336",
        },
        Example {
            name: "response/held-v3",
            msg: ok(
                6,
                ResponseBody::Held(vec![
                    HeldLock {
                        kind: s("transaction"),
                        id: s("tx-1"),
                        token: 1234,
                        version: s("v1"),
                        lease_remaining_ms: 29500,
                        connection_id: 42,
                        trace_id: Some(s("4bf92f3577b34da6a3ce929d0e0e4736")),
                        mode: None,
                    },
                    HeldLock {
                        kind: s("transaction"),
                        id: s("tx-2"),
                        token: 1240,
                        version: s("v1"),
                        lease_remaining_ms: 0,
                        connection_id: 43,
                        trace_id: None,
                        mode: None,
                    },
                ]),
            ),
            golden: "00000086 01 13 0001 00000006
                     0000 0002
                     000b 7472616e73616374696f6e 0004 74782d31 00000000000004d2
                     0002 7631 0000733c 000000000000002a
                     000b 7472616e73616374696f6e 0004 74782d32 00000000000004d8
                     0002 7631 00000000 000000000000002b
                     0020 3462663932663335373762333464613661336365393239643065306534373336 0000",
        },
        Example {
            name: "request/acquire-shared-v4",
            msg: req(
                12,
                Request::Acquire(Acquire {
                    kind: s("transaction"),
                    id: s("tx-1"),
                    wait_ms: 5000,
                    lease_ms: 30000,
                    mode: LockMode::Shared,
                    trace_id: None,
                }),
            ),
            golden: "00000024 01 10 0000 0000000c
                     000b 7472616e73616374696f6e 0004 74782d31 00001388 00007530 01",
        },
        Example {
            name: "request/rotate-layout-v4",
            msg: req(
                13,
                Request::Rotate(Rotate {
                    kind: s("transaction"),
                    from: s("v1"),
                    to: s("v2"),
                    drain_timeout_ms: 60000,
                    layout: Some(KindLayout::ReadWrite),
                }),
            ),
            golden: "00000022 01 17 0000 0000000d
                     000b 7472616e73616374696f6e 0002 7631 0002 7632 0000ea60 01",
        },
        Example {
            name: "response/held-v4",
            msg: ok(
                6,
                ResponseBody::Held(vec![HeldLock {
                    kind: s("transaction"),
                    id: s("tx-1"),
                    token: 1234,
                    version: s("v2"),
                    lease_remaining_ms: 29500,
                    connection_id: 42,
                    trace_id: None,
                    mode: Some(LockMode::Shared),
                }]),
            ),
            golden: "0000003a 01 13 0001 00000006
                     0000 0001
                     000b 7472616e73616374696f6e 0004 74782d31 00000000000004d2
                     0002 7632 0000733c 000000000000002a
                     0000 01",
        },
        Example {
            name: "response/version-v4",
            msg: ok(
                7,
                ResponseBody::Version(VersionInfo {
                    version: s("v2"),
                    mode: KindMode::Normal,
                    drain: None,
                    layout: Some(KindLayout::ReadWrite),
                }),
            ),
            golden: "00000010 01 14 0001 00000007  0000 0002 7632 00 01",
        },
        Example {
            name: "response/error-timeout",
            msg: Msg::Response(Response::error(
                9,
                Opcode::Acquire as u8,
                Status::Timeout,
                "not acquired within 5000 ms",
            )),
            golden: "00000027 01 10 0001 00000009
                     0001 001b 6e6f742061637175697265642077697468696e2035303030206d73",
        },
        Example {
            name: "response/error-unknown-opcode",
            msg: Msg::Response(Response::error(10, 0x7f, Status::UnknownOpcode, "unknown opcode 0x7f")),
            golden: "0000001f 01 7f 0001 0000000a
                     0066 0013 756e6b6e6f776e206f70636f64652030783766",
        },
        Example {
            name: "response/auth",
            msg: ok(
                12,
                ResponseBody::Authenticated {
                    principal: s("billing"),
                },
            ),
            golden: "00000013 01 19 0001 0000000c  0000 0007 62696c6c696e67",
        },
        Example {
            name: "response/error-unauthenticated",
            msg: Msg::Response(Response::error(
                13,
                Opcode::Acquire as u8,
                Status::Unauthenticated,
                "authenticate first: send AUTH with a token",
            )),
            golden: "00000036 01 10 0001 0000000d
                     006c 002a 61757468656e7469636174652066697273743a2073656e6420415554482077697468206120746f6b656e",
        },
        Example {
            name: "response/error-forbidden",
            msg: Msg::Response(Response::error(
                14,
                Opcode::Acquire as u8,
                Status::Forbidden,
                "principal billing may not acquire kind user",
            )),
            golden: "00000037 01 10 0001 0000000e
                     006d 002b 7072696e636970616c2062696c6c696e67206d6179206e6f742061637175697265206b696e642075736572",
        },
        Example {
            name: "event/closing-unauthenticated",
            msg: Msg::Event(Event::Closing {
                status: Status::Unauthenticated,
                message: s("too many failed authentication attempts"),
            }),
            golden: "00000033 01 81 0002 00000000
                     006c 0027 746f6f206d616e79206661696c65642061757468656e7469636174696f6e20617474656d707473",
        },
        Example {
            name: "event/lock-lost",
            msg: Msg::Event(Event::LockLost {
                kind: s("transaction"),
                id: s("tx-1"),
                token: 1234,
                reason: LostReason::LeaseExpired,
            }),
            golden: "00000024 01 80 0002 00000000
                     000b 7472616e73616374696f6e 0004 74782d31 00000000000004d2 01",
        },
        Example {
            name: "event/closing",
            msg: Msg::Event(Event::Closing {
                status: Status::ShuttingDown,
                message: s("server shutting down"),
            }),
            golden: "00000020 01 81 0002 00000000
                     00c9 0014 736572766572207368757474696e6720646f776e",
        },
        Example {
            name: "event/rotate-progress",
            msg: Msg::Event(Event::RotateProgress {
                request_id: 10,
                progress: RotationProgress {
                    kind: s("transaction"),
                    from: s("v1"),
                    to: s("v2"),
                    phase: RotationPhase::Draining,
                    remaining: 2,
                    elapsed_ms: 1500,
                    left_ms: 58500,
                    holders: vec![RotationHolder {
                        id: s("tx-1"),
                        holder: s("clastor owner=17"),
                    }],
                },
            }),
            golden: "00000044 01 82 0002 0000000a
                     000b 7472616e73616374696f6e 0002 7631 0002 7632 00
                     00000002 000005dc 0000e484
                     0001 0004 74782d31 0010 636c6173746f72206f776e65723d3137",
        },
    ]
}

/// Parses hex digits, ignoring whitespace.
pub(crate) fn hex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    assert!(digits.len().is_multiple_of(2), "odd number of hex digits in {s:?}");
    digits
        .chunks(2)
        .map(|pair| {
            let pair = std::str::from_utf8(pair).expect("ascii");
            u8::from_str_radix(pair, 16).unwrap_or_else(|_| panic!("bad hex {pair:?}"))
        })
        .collect()
}

fn hex_line(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
}

/// Bytes per dump line; a longer field continues on the next lines.
const DUMP_WIDTH: usize = 8;

/// A naive field-by-field reader that writes one dump line per field. It
/// follows PROTOCOL.md's tables, not `message.rs`, and panics on anything
/// unexpected: it only ever reads the examples above.
struct Walker<'a> {
    bytes: &'a [u8],
    pos: usize,
    out: String,
}

impl Walker<'_> {
    fn take(&mut self, n: usize, note: &str) -> &[u8] {
        let field = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        for (i, chunk) in field.chunks(DUMP_WIDTH).enumerate() {
            if i == 0 {
                let _ = writeln!(
                    self.out,
                    "{:<width$}  # {note}",
                    hex_line(chunk),
                    width = DUMP_WIDTH * 3 - 1
                );
            } else {
                let _ = writeln!(self.out, "{}", hex_line(chunk));
            }
        }
        field
    }

    fn note(&mut self, note: &str) {
        let _ = writeln!(self.out, "{:<width$}  # {note}", "", width = DUMP_WIDTH * 3 - 1);
    }

    fn uint(&mut self, n: usize, name: &str, describe: impl Fn(u64) -> String) -> u64 {
        let peek = self.bytes[self.pos..self.pos + n]
            .iter()
            .fold(0u64, |acc, b| acc << 8 | u64::from(*b));
        self.take(n, &format!("{name} = {}", describe(peek)));
        peek
    }

    fn u8(&mut self, name: &str) -> u64 {
        self.uint(1, name, |v| v.to_string())
    }

    fn u16(&mut self, name: &str) -> u64 {
        self.uint(2, name, |v| v.to_string())
    }

    fn u32(&mut self, name: &str) -> u64 {
        self.uint(4, name, |v| v.to_string())
    }

    fn u64(&mut self, name: &str) -> u64 {
        self.uint(8, name, |v| v.to_string())
    }

    fn enum8(&mut self, name: &str, names: &[&str]) -> u64 {
        self.uint(1, name, |v| {
            format!("{v} ({})", names.get(v as usize).copied().unwrap_or("?"))
        })
    }

    fn status(&mut self, name: &str) -> u64 {
        self.uint(2, name, |v| {
            let status = u16::try_from(v).ok().and_then(|v| Status::try_from(v).ok());
            format!("{v} ({})", status.map_or("?", Status::name))
        })
    }

    fn string(&mut self, name: &str) {
        let len = self.bytes[self.pos..self.pos + 2]
            .iter()
            .fold(0usize, |acc, b| acc << 8 | usize::from(*b));
        self.take(2, &format!("{name}: length {len}"));
        if len > 0 {
            let text = std::str::from_utf8(&self.bytes[self.pos..self.pos + len]).expect("utf-8");
            self.take(len, &format!("{name} = {text:?}"));
        }
    }
}

/// Renders a frame as the annotated dump used in PROTOCOL.md.
pub(crate) fn annotate(bytes: &[u8]) -> String {
    let mut w = Walker {
        bytes,
        pos: 0,
        out: String::new(),
    };
    let len = w.uint(4, "length", |v| format!("{v} (8-byte header + {}-byte body)", v - 8));
    assert_eq!(len as usize, bytes.len() - 4, "length prefix");
    w.u8("version");
    let opcode = w.uint(1, "opcode", |v| {
        let op = u8::try_from(v).ok().and_then(|v| Opcode::try_from(v).ok());
        format!("0x{v:02x} ({})", op.map_or("not an opcode", Opcode::name))
    });
    let flags = w.uint(2, "flags", |v| {
        let what = match v {
            0 => "request",
            1 => "response",
            2 => "event",
            _ => "?",
        };
        format!("0x{v:04x} ({what})")
    });
    w.uint(4, "request_id", |v| {
        if v == 0 { "0 (event)".to_owned() } else { v.to_string() }
    });
    let body_start = w.pos;
    match (flags, opcode) {
        // Requests.
        (0, 0x01) => {
            w.u8("min_version");
            w.u8("max_version");
            w.string("client_name");
        }
        (0, 0x02 | 0x15 | 0x16) => {}
        (0, 0x10) => {
            w.string("kind");
            w.string("id");
            w.u32("wait_ms");
            w.u32("lease_ms");
            w.enum8("mode", &["exclusive", "shared"]);
            if w.pos < w.bytes.len() {
                w.string("trace_id");
            }
        }
        (0, 0x11) => {
            w.string("kind");
            w.string("id");
            w.u64("token");
        }
        (0, 0x12) => {
            w.string("kind");
            w.string("id");
            w.u32("lease_ms");
            w.u64("token");
        }
        (0, 0x13) => {
            w.enum8("scope", &["connection", "server"]);
        }
        (0, 0x14 | 0x18) => w.string("kind"),
        (0, 0x19) => w.string("token"),
        (0, 0x17) => {
            w.string("kind");
            w.string("from");
            w.string("to");
            w.u32("drain_timeout_ms");
            if w.pos < w.bytes.len() {
                w.enum8("layout", &["mutex", "read_write"]);
            }
        }
        // Responses: a status, then the opcode's body on OK, else a message.
        (1, _) => {
            if w.status("status") != 0 {
                w.string("message");
            } else {
                match opcode {
                    0x01 => {
                        w.u8("version");
                        w.u64("connection_id");
                        w.u32("max_frame_len");
                        w.u32("max_in_flight");
                        w.string("server");
                        if w.bytes[body_start + 2] >= 2 {
                            w.u32("confirm_ms");
                        }
                    }
                    0x02 => {}
                    0x10 => {
                        w.u64("token");
                        w.u32("lease_ms");
                        w.string("version");
                        if w.pos < w.bytes.len() {
                            w.u32("safe_ms");
                        }
                    }
                    0x11 => {
                        w.enum8("released", &["false", "true"]);
                    }
                    0x12 => {
                        w.u64("token");
                        w.u32("lease_ms");
                        if w.pos < w.bytes.len() {
                            w.u32("safe_ms");
                        }
                    }
                    0x13 => {
                        let n = w.u16("count");
                        for i in 0..n {
                            w.string(&format!("[{i}].kind"));
                            w.string(&format!("[{i}].id"));
                            w.u64(&format!("[{i}].token"));
                            w.string(&format!("[{i}].version"));
                            w.u32(&format!("[{i}].lease_remaining_ms"));
                            w.u64(&format!("[{i}].connection_id"));
                        }
                        if w.pos < w.bytes.len() {
                            for i in 0..n {
                                w.string(&format!("[{i}].trace_id"));
                            }
                        }
                        if w.pos < w.bytes.len() {
                            for i in 0..n {
                                w.enum8(&format!("[{i}].mode"), &["exclusive", "shared"]);
                            }
                        }
                    }
                    0x14 => {
                        w.string("version");
                        w.enum8("mode", &["normal", "draining"]);
                        if w.bytes.len() - w.pos > 1 {
                            w.string("drain.to");
                            w.u32("drain.remaining");
                            w.u32("drain.left_ms");
                        }
                        if w.pos < w.bytes.len() {
                            w.enum8("layout", &["mutex", "read_write"]);
                        }
                    }
                    0x17 => {
                        w.string("version");
                        w.u32("drain_ms");
                        w.u32("leftover");
                    }
                    0x18 => {
                        w.string("version");
                        w.enum8("aborted", &["false", "true"]);
                    }
                    0x15 => {
                        let n = w.u16("count");
                        for i in 0..n {
                            w.string(&format!("[{i}].name"));
                            w.string(&format!("[{i}].value"));
                        }
                    }
                    0x16 => {
                        w.u32("safe_ms");
                    }
                    0x19 => w.string("principal"),
                    other => panic!("no OK body for opcode {other:#x}"),
                }
            }
        }
        // Events.
        (2, 0x80) => {
            w.string("kind");
            w.string("id");
            w.u64("token");
            w.enum8(
                "reason",
                &[
                    "unknown",
                    "lease_expired",
                    "session_expired",
                    "backend_unreachable",
                    "shutdown",
                    "backend_error",
                    "node_deleted",
                ],
            );
        }
        (2, 0x81) => {
            w.status("status");
            w.string("message");
        }
        (2, 0x82) => {
            w.string("kind");
            w.string("from");
            w.string("to");
            w.enum8("phase", &["draining", "switched"]);
            w.u32("remaining");
            w.u32("elapsed_ms");
            w.u32("left_ms");
            let n = w.u16("count");
            for i in 0..n {
                w.string(&format!("[{i}].id"));
                w.string(&format!("[{i}].holder"));
            }
        }
        other => panic!("no layout for {other:?}"),
    }
    if w.pos == body_start {
        w.note("(empty body)");
    }
    assert_eq!(w.pos, bytes.len(), "annotate did not read the whole frame");
    w.out
}

/// A step of a text-mode session: what the client types and what the server
/// answers, produced by the real parser and formatters.
enum Step {
    /// A command line and the response the server's engine produced for it.
    Cmd(&'static str, Result<ResponseBody, (Status, &'static str)>),
    /// A command line the parser itself answers (errors, HELP), or `QUIT`.
    Local(&'static str),
    /// A pushed event.
    Event(Event),
    /// A `ROTATE` line, the progress it streams, then how it ended.
    Rotate(
        &'static str,
        Vec<RotationProgress>,
        Result<ResponseBody, (Status, &'static str)>,
    ),
}

fn transcript(steps: &[Step]) -> String {
    let mut out = String::new();
    for step in steps {
        match step {
            Step::Cmd(line, result) => {
                let Ok(Command::Request(request)) = text::parse(line) else {
                    panic!("{line:?} is not a request");
                };
                let response = match result {
                    Ok(body) => Response::ok(0, body.clone()),
                    Err((status, message)) => Response::error(0, request.opcode() as u8, *status, *message),
                };
                let _ = writeln!(out, "{line}");
                out.push_str(&text::format_response(&request, &response));
            }
            Step::Local(line) => {
                let _ = writeln!(out, "{line}");
                match text::parse(line) {
                    Ok(Command::Help) => out.push_str(&text::format_help()),
                    // The server's reply to QUIT, before it closes.
                    Ok(Command::Quit) => out.push_str("+BYE\n"),
                    Ok(Command::Empty) => {}
                    Ok(Command::Request(_)) => panic!("{line:?} needs a response"),
                    Err(e) => out.push_str(&text::format_parse_error(&e)),
                }
            }
            Step::Event(ev) => out.push_str(&text::format_event(ev)),
            Step::Rotate(line, progress, result) => {
                let Ok(Command::Request(request)) = text::parse(line) else {
                    panic!("{line:?} is not a request");
                };
                let _ = writeln!(out, "{line}");
                for (i, p) in progress.iter().enumerate() {
                    out.push_str(&text::format_rotation_progress(p, i == 0));
                }
                let response = match result {
                    Ok(body) => Response::ok(0, body.clone()),
                    Err((status, message)) => Response::error(0, request.opcode() as u8, *status, *message),
                };
                out.push_str(&text::format_rotation_end(&request, &response, !progress.is_empty()));
            }
        }
    }
    out
}

fn acquired(token: u64, lease_ms: u32) -> Result<ResponseBody, (Status, &'static str)> {
    Ok(ResponseBody::Acquired(AcquireOk {
        token,
        lease_ms,
        version: s("v1"),
        safe_ms: None,
    }))
}

/// The text-mode sample sessions of PROTOCOL.md, by marker name.
///
/// The main session runs on a memory-backend server where another client,
/// on a second connection, holds `transaction/tx-9` throughout: the replies
/// (and the `INFO` counters) must be what that server would answer.
fn text_sessions() -> Vec<(&'static str, String)> {
    let session = [
        Step::Cmd("PING", Ok(ResponseBody::Pong)),
        Step::Cmd("ACQUIRE transaction tx-1", acquired(1234, 0)),
        Step::Cmd(
            "acquire transaction tx-1 5000",
            Err((
                Status::AlreadyHeld,
                "transaction/tx-1 is already held or awaited by this session",
            )),
        ),
        Step::Cmd("ACQUIRE transaction tx-2 0 2000", acquired(1235, 2000)),
        Step::Cmd(
            "HELD",
            Ok(ResponseBody::Held(vec![
                HeldLock {
                    kind: s("transaction"),
                    id: s("tx-1"),
                    token: 1234,
                    version: s("v1"),
                    lease_remaining_ms: 0,
                    connection_id: 7,
                    trace_id: None,
                    mode: Some(LockMode::Exclusive),
                },
                HeldLock {
                    kind: s("transaction"),
                    id: s("tx-2"),
                    token: 1235,
                    version: s("v1"),
                    lease_remaining_ms: 1874,
                    connection_id: 7,
                    trace_id: None,
                    mode: Some(LockMode::Exclusive),
                },
            ])),
        ),
        Step::Event(Event::LockLost {
            kind: s("transaction"),
            id: s("tx-2"),
            token: 1235,
            reason: LostReason::LeaseExpired,
        }),
        Step::Cmd(
            "RENEW transaction tx-1 30000",
            Ok(ResponseBody::Renewed {
                token: 1234,
                lease_ms: 30000,
                safe_ms: None,
            }),
        ),
        Step::Cmd(
            "RENEW transaction tx-2 30000",
            Err((Status::NotHeld, "transaction/tx-2 is not held by this session")),
        ),
        Step::Cmd(
            "ACQUIRE transaction tx-9",
            Err((Status::Timeout, "held by another owner (tried once)")),
        ),
        Step::Cmd(
            "ACQUIRE transaction tx-9 200",
            Err((Status::Timeout, "not acquired within 200 ms")),
        ),
        Step::Cmd(
            "RELEASE transaction tx-9",
            Err((Status::NotOwner, "transaction/tx-9 is held by another owner")),
        ),
        Step::Cmd(
            "ACQUIRE transaction a/b",
            Err((Status::InvalidName, "id contains forbidden character '/' at byte 1")),
        ),
        Step::Local("ACQUIRE transaction tx-3 soon"),
        Step::Local("FROB x"),
        Step::Cmd(
            "VERSION transaction",
            Ok(ResponseBody::Version(VersionInfo {
                version: s("v1"),
                mode: KindMode::Normal,
                drain: None,
                layout: Some(KindLayout::ReadWrite),
            })),
        ),
        // This connection holds tx-1 (tx-2 was lost); the other client's
        // connection holds tx-9 on the same memory server.
        Step::Cmd(
            "INFO",
            Ok(ResponseBody::Info(vec![
                (s("server"), s(SERVER)),
                (s("connections_open"), s("2")),
                (s("backend"), s("memory")),
                (s("locks_held"), s("2")),
            ])),
        ),
        Step::Cmd(
            "RELEASE transaction tx-1",
            Ok(ResponseBody::Released { released: true }),
        ),
        Step::Cmd(
            "RELEASE transaction tx-1",
            Ok(ResponseBody::Released { released: false }),
        ),
        Step::Local("HELP"),
        Step::Local("QUIT"),
    ];
    let shutdown = [
        Step::Cmd("ACQUIRE transaction tx-1", acquired(1240, 0)),
        Step::Event(Event::LockLost {
            kind: s("transaction"),
            id: s("tx-1"),
            token: 1240,
            reason: LostReason::ServerShutdown,
        }),
        Step::Event(Event::Closing {
            status: Status::ShuttingDown,
            message: s("server shutting down"),
        }),
    ];
    vec![
        ("session", transcript(&session)),
        ("shutdown", transcript(&shutdown)),
        ("rotate", transcript(&rotate_session())),
        ("rotate-aborted", transcript(&rotate_aborted_session())),
        ("rotate-other", transcript(&rotate_other_session())),
    ]
}

/// A progress report of a `transaction` rotation from `from` to `to` with a
/// 60 s drain timeout, `elapsed_ms` into it.
fn progress(
    from: &str,
    to: &str,
    phase: RotationPhase,
    remaining: u32,
    elapsed_ms: u32,
    holders: &[(&str, &str)],
) -> RotationProgress {
    RotationProgress {
        kind: s("transaction"),
        from: s(from),
        to: s(to),
        phase,
        remaining,
        elapsed_ms,
        left_ms: 60_000 - elapsed_ms,
        holders: holders
            .iter()
            .map(|(id, holder)| RotationHolder {
                id: s(id),
                holder: s(holder),
            })
            .collect(),
    }
}

/// A rotation that completes, on a memory-backend server where other
/// connections hold `tx-1` (one more waiting for it) and `tx-2`; then the
/// same `ROTATE` sent again, which finds its switch done.
fn rotate_session() -> Vec<Step> {
    vec![
        Step::Rotate(
            "ROTATE transaction v1 v2 60000",
            vec![
                progress(
                    "v1",
                    "v2",
                    RotationPhase::Draining,
                    3,
                    0,
                    &[("tx-1", "this server (+1 waiting)"), ("tx-2", "this server")],
                ),
                progress("v1", "v2", RotationPhase::Draining, 1, 1250, &[("tx-1", "this server")]),
                progress("v1", "v2", RotationPhase::Switched, 0, 2480, &[]),
            ],
            Ok(ResponseBody::Rotated(RotateOk {
                version: s("v2"),
                drain_ms: 2480,
                leftover: 0,
            })),
        ),
        Step::Rotate(
            "ROTATE transaction v1 v2",
            Vec::new(),
            Ok(ResponseBody::Rotated(RotateOk {
                version: s("v2"),
                drain_ms: 0,
                leftover: 0,
            })),
        ),
    ]
}

/// A rotation another connection aborts (see [`rotate_other_session`]).
fn rotate_aborted_session() -> Vec<Step> {
    vec![Step::Rotate(
        "ROTATE transaction v2 v3",
        vec![
            progress("v2", "v3", RotationPhase::Draining, 1, 0, &[("tx-7", "this server")]),
            progress("v2", "v3", RotationPhase::Draining, 1, 1000, &[("tx-7", "this server")]),
        ],
        Err((
            Status::RotationAborted,
            "the rotation of transaction was aborted (ROTATE_ABORT); transaction is normal on v2",
        )),
    )]
}

/// A second connection while that rotation drains.
fn rotate_other_session() -> Vec<Step> {
    vec![
        Step::Cmd(
            "VERSION transaction",
            Ok(ResponseBody::Version(VersionInfo {
                version: s("v2"),
                mode: KindMode::Draining,
                drain: Some(DrainState {
                    to: s("v3"),
                    remaining: 1,
                    left_ms: 58_900,
                }),
                layout: Some(KindLayout::ReadWrite),
            })),
        ),
        Step::Cmd(
            "ROTATE transaction v2 v4",
            Err((
                Status::RotationRefused,
                "another rotation of transaction is in progress (v2 -> v3)",
            )),
        ),
        Step::Cmd(
            "ROTATE_ABORT transaction",
            Ok(ResponseBody::RotateAborted {
                version: s("v2"),
                aborted: true,
            }),
        ),
        Step::Cmd(
            "ROTATE_ABORT transaction",
            Ok(ResponseBody::RotateAborted {
                version: s("v2"),
                aborted: false,
            }),
        ),
    ]
}

fn protocol_md_path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("PROTOCOL.md")
}

/// The content of the fenced block right after `marker`, and where it sits.
fn block_after(doc: &str, marker: &str) -> Option<(std::ops::Range<usize>, String)> {
    let at = doc.find(marker)?;
    let after = at + marker.len();
    let open = doc[after..].find("```")? + after;
    let content_start = doc[open..].find('\n')? + open + 1;
    let close = doc[content_start..].find("```")? + content_start;
    Some((content_start..close, doc[content_start..close].to_owned()))
}

/// The blocks PROTOCOL.md must carry: marker → expected content.
fn expected_blocks() -> Vec<(String, String)> {
    let mut blocks: Vec<(String, String)> = examples()
        .iter()
        .map(|e| (format!("<!-- golden: {} -->", e.name), annotate(&e.msg.encode())))
        .collect();
    for (name, text) in text_sessions() {
        blocks.push((format!("<!-- golden-text: {name} -->"), text));
    }
    blocks
}

/// Strips `#` comments and reads the remaining hex bytes of a dump.
fn dump_bytes(block: &str) -> Vec<u8> {
    let digits: String = block
        .lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join(" ");
    hex(&digits)
}

#[test]
fn every_message_encodes_to_its_golden_bytes() {
    for e in examples() {
        let got = e.msg.encode();
        assert_eq!(hex_line(&got), hex_line(&hex(e.golden)), "{}: encoding changed", e.name);
    }
}

#[test]
fn golden_bytes_decode_to_their_message() {
    for e in examples() {
        assert_eq!(Msg::decode(&hex(e.golden)), e.msg, "{}", e.name);
    }
}

#[test]
fn examples_cover_every_opcode_in_both_directions() {
    let examples = examples();
    let frames: Vec<(u16, u8)> = examples
        .iter()
        .map(|e| {
            let b = hex(e.golden);
            (u16::from_be_bytes([b[6], b[7]]), b[5])
        })
        .collect();
    for op in Opcode::ALL {
        if op.is_event() {
            assert!(
                frames.contains(&(Flags::EVENT.0, op as u8)),
                "no event example for {op}"
            );
        } else {
            assert!(
                frames.contains(&(Flags::REQUEST.0, op as u8)),
                "no request example for {op}"
            );
            assert!(
                frames.contains(&(Flags::RESPONSE.0, op as u8)),
                "no response example for {op}"
            );
        }
    }
    assert!(
        examples
            .iter()
            .any(|e| matches!(&e.msg, Msg::Response(r) if r.result.is_err())),
        "no error response example"
    );
}

/// PROTOCOL.md carries every example, byte for byte and note for note, and
/// its dumps decode to the example messages.
#[test]
fn protocol_md_matches_the_code() {
    let path = protocol_md_path();
    let mut doc = std::fs::read_to_string(&path).expect("read PROTOCOL.md");
    let bless = std::env::var_os("CLASTOR_BLESS").is_some();
    let mut stale = Vec::new();
    for (marker, want) in expected_blocks() {
        let Some((range, got)) = block_after(&doc, &marker) else {
            stale.push(format!("{marker} is missing; add it followed by a fenced block"));
            continue;
        };
        assert_eq!(doc.matches(&marker).count(), 1, "{marker} appears more than once");
        if got != want {
            if bless {
                doc.replace_range(range, &want);
            } else {
                stale.push(format!("{marker} is stale; it should read:\n{want}"));
            }
        }
    }
    if bless {
        std::fs::write(&path, &doc).expect("write PROTOCOL.md");
    }
    assert!(
        stale.is_empty(),
        "PROTOCOL.md differs from the code (CLASTOR_BLESS=1 rewrites it):\n{}",
        stale.join("\n")
    );

    // Independently of the notes: the bytes in each dump decode to the message.
    for e in examples() {
        let (_, block) = block_after(&doc, &format!("<!-- golden: {} -->", e.name)).expect("checked above");
        let bytes = dump_bytes(&block);
        assert_eq!(hex_line(&bytes), hex_line(&hex(e.golden)), "{}: dump bytes", e.name);
        assert_eq!(Msg::decode(&bytes), e.msg, "{}: dump decodes", e.name);
    }
    // No marker in the doc names an example that no longer exists.
    let known: Vec<String> = expected_blocks().into_iter().map(|(m, _)| m).collect();
    for line in doc.lines().filter(|l| l.starts_with("<!-- golden")) {
        assert!(
            known.iter().any(|k| k == line.trim()),
            "PROTOCOL.md has unknown marker {line}"
        );
    }
}
