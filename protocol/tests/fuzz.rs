//! Property tests for everything that reads bytes or lines from a peer.
//!
//! - Hostile input (random bytes, valid frames with bits flipped, cut short or
//!   with their length field edited, random text lines) never panics, and
//!   decoding is bounded: each frame consumes at least its header, and a frame
//!   error stops the stream.
//! - Delivery does not matter: the codec yields the same frames and the same
//!   error whether the bytes arrive at once or in arbitrary pieces.
//! - Round trips: any message encodes and decodes back to itself, and any body
//!   the decoders accept re-encodes to the same bytes.
//!
//! Case counts are kept small enough for the whole file to run in a few
//! seconds in a debug build; raise `PROPTEST_CASES` for a longer hunt
//! (`PROPTEST_CASES=400000 cargo test --release -p clastor-protocol --test
//! fuzz`). Strategies build valid input directly rather than filtering, so no
//! property runs out of local rejects at any case count.

use bytes::{BufMut, BytesMut};
use clastor_protocol::text::{self, Command};
use clastor_protocol::{
    Acquire, AcquireOk, ClastorCodec, DrainState, Event, Flags, Frame, HEADER_LEN, HeldLock, HeldScope, Hello, HelloOk,
    KindLayout, KindMode, LockMode, LostReason, Request, Response, ResponseBody, Rotate, RotateOk, RotationHolder,
    RotationPhase, RotationProgress, Status, VersionInfo,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::Config;
use tokio_util::codec::Decoder;

/// Frame limit for the fuzzed codec: small, so random lengths often fit.
const LIMIT: usize = 1024;

fn config() -> Config {
    Config {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(512),
        // Never write regression files into the shared checkout.
        failure_persistence: None,
        ..Config::default()
    }
}

// ---------------------------------------------------------------- strategies

/// Strings, often empty: the smallest encodings are where size arithmetic
/// goes wrong.
fn any_string() -> impl Strategy<Value = String> {
    prop_oneof![
        1 => Just(String::new()),
        1 => vec(any::<char>(), 0..24).prop_map(String::from_iter),
    ]
}

/// A word the text form can carry: non-empty, no space, no line break.
///
/// Built from allowed characters directly instead of filtering: a filter
/// rejects enough of `any::<char>()` (which favours ASCII and control
/// characters) to abort long runs with "Too many local rejects", so every
/// property here must hold at any `PROPTEST_CASES` without rejecting input.
fn word() -> impl Strategy<Value = String> {
    vec(any::<char>().prop_map(word_char), 1..16).prop_map(String::from_iter)
}

/// `c` if a text-form word may hold it; otherwise a printable ASCII
/// character (`!` to `~`) picked by `c`, so the mapping stays deterministic and
/// shrinks with its input.
fn word_char(c: char) -> char {
    if c.is_whitespace() || c.is_control() {
        char::from_u32(u32::from('!') + u32::from(c) % 94).unwrap_or('!')
    } else {
        c
    }
}

fn lock_mode() -> impl Strategy<Value = LockMode> {
    select(vec![LockMode::Exclusive, LockMode::Shared])
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        (any::<u8>(), any::<u8>(), any_string()).prop_map(|(min_version, max_version, client_name)| {
            Request::Hello(Hello {
                min_version,
                max_version,
                client_name,
            })
        }),
        Just(Request::Ping),
        (
            any_string(),
            any_string(),
            any::<u32>(),
            any::<u32>(),
            lock_mode(),
            trace_id()
        )
            .prop_map(
                |(kind, id, wait_ms, lease_ms, mode, trace_id)| Request::Acquire(Acquire {
                    kind,
                    id,
                    wait_ms,
                    lease_ms,
                    mode,
                    trace_id,
                })
            ),
        (any_string(), any_string(), any::<u64>()).prop_map(|(kind, id, token)| Request::Release { kind, id, token }),
        (any_string(), any_string(), any::<u32>(), any::<u64>()).prop_map(|(kind, id, lease_ms, token)| {
            Request::Renew {
                kind,
                id,
                lease_ms,
                token,
            }
        }),
        select(vec![HeldScope::Connection, HeldScope::Server]).prop_map(|scope| Request::Held { scope }),
        any_string().prop_map(|kind| Request::Version { kind }),
        Just(Request::Info),
        Just(Request::Confirm),
        (
            (any_string(), any_string(), any_string()),
            any::<u32>(),
            proptest::option::of(select(vec![KindLayout::Mutex, KindLayout::ReadWrite]))
        )
            .prop_map(|((kind, from, to), drain_timeout_ms, layout)| {
                Request::Rotate(Rotate {
                    kind,
                    from,
                    to,
                    drain_timeout_ms,
                    layout,
                })
            }),
        any_string().prop_map(|kind| Request::RotateAbort { kind }),
    ]
}

/// A version 3 trace id: absent, or a non-empty string (an empty one is
/// "none" on the wire).
fn trace_id() -> impl Strategy<Value = Option<String>> {
    proptest::option::of("[0-9a-z:._-]{1,32}")
}

fn held_lock() -> impl Strategy<Value = HeldLock> {
    (
        (any_string(), any_string(), any::<u64>(), any_string()),
        (any::<u32>(), any::<u64>(), trace_id()),
    )
        .prop_map(
            |((kind, id, token, version), (lease_remaining_ms, connection_id, trace_id))| HeldLock {
                kind,
                id,
                token,
                version,
                lease_remaining_ms,
                connection_id,
                trace_id,
                mode: None,
            },
        )
}

/// A `HELD` listing: without modes (versions 1 to 3), or with one per entry
/// (version 4).
fn held_list() -> impl Strategy<Value = Vec<HeldLock>> {
    (
        vec((held_lock(), select(vec![LockMode::Exclusive, LockMode::Shared])), 0..4),
        any::<bool>(),
    )
        .prop_map(|(entries, v4)| {
            entries
                .into_iter()
                .map(|(mut h, mode)| {
                    h.mode = v4.then_some(mode);
                    h
                })
                .collect()
        })
}

fn response_body() -> impl Strategy<Value = ResponseBody> {
    prop_oneof![
        (
            any::<u8>(),
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
            any_string(),
            any::<u32>()
        )
            .prop_map(
                |(version, connection_id, max_frame_len, max_in_flight, server, confirm_ms)| {
                    ResponseBody::Hello(HelloOk {
                        version,
                        connection_id,
                        max_frame_len,
                        max_in_flight,
                        server,
                        // On the wire exactly from version 2 on.
                        confirm_ms: (version >= 2).then_some(confirm_ms),
                    })
                }
            ),
        Just(ResponseBody::Pong),
        (any::<u64>(), any::<u32>(), any_string(), any::<Option<u32>>()).prop_map(
            |(token, lease_ms, version, safe_ms)| {
                ResponseBody::Acquired(AcquireOk {
                    token,
                    lease_ms,
                    version,
                    safe_ms,
                })
            }
        ),
        any::<bool>().prop_map(|released| ResponseBody::Released { released }),
        (any::<u64>(), any::<u32>(), any::<Option<u32>>()).prop_map(|(token, lease_ms, safe_ms)| {
            ResponseBody::Renewed {
                token,
                lease_ms,
                safe_ms,
            }
        }),
        any::<u32>().prop_map(|safe_ms| ResponseBody::Confirmed { safe_ms }),
        held_list().prop_map(ResponseBody::Held),
        (
            any_string(),
            select(vec![KindMode::Normal, KindMode::Draining]),
            proptest::option::of((any_string(), any::<u32>(), any::<u32>())),
            proptest::option::of(select(vec![KindLayout::Mutex, KindLayout::ReadWrite]))
        )
            .prop_map(|(version, mode, drain, layout)| ResponseBody::Version(VersionInfo {
                version,
                mode,
                drain: drain.map(|(to, remaining, left_ms)| DrainState { to, remaining, left_ms }),
                layout,
            })),
        (any_string(), any::<u32>(), any::<u32>()).prop_map(|(version, drain_ms, leftover)| ResponseBody::Rotated(
            RotateOk {
                version,
                drain_ms,
                leftover
            }
        )),
        (any_string(), any::<bool>()).prop_map(|(version, aborted)| ResponseBody::RotateAborted { version, aborted }),
        vec((any_string(), any_string()), 0..4).prop_map(ResponseBody::Info),
    ]
}

fn error_status() -> impl Strategy<Value = Status> {
    select(Status::ALL.into_iter().filter(|s| *s != Status::Ok).collect::<Vec<_>>())
}

fn response() -> impl Strategy<Value = Response> {
    prop_oneof![
        (any::<u32>(), response_body()).prop_map(|(id, body)| Response::ok(id, body)),
        (any::<u32>(), any::<u8>(), error_status(), any_string())
            .prop_map(|(id, opcode, status, message)| Response::error(id, opcode, status, message)),
    ]
}

fn lost_reason() -> impl Strategy<Value = LostReason> {
    select(vec![
        LostReason::Unknown,
        LostReason::LeaseExpired,
        LostReason::SessionExpired,
        LostReason::BackendUnreachable,
        LostReason::ServerShutdown,
        LostReason::BackendError,
        LostReason::NodeDeleted,
    ])
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        (any_string(), any_string(), any::<u64>(), lost_reason()).prop_map(|(kind, id, token, reason)| {
            Event::LockLost {
                kind,
                id,
                token,
                reason,
            }
        }),
        (select(Status::ALL.to_vec()), any_string()).prop_map(|(status, message)| Event::Closing { status, message }),
        (
            1..=u32::MAX,
            (any_string(), any_string(), any_string()),
            select(vec![RotationPhase::Draining, RotationPhase::Switched]),
            (any::<u32>(), any::<u32>(), any::<u32>()),
            vec((any_string(), any_string()), 0..4),
        )
            .prop_map(
                |(request_id, (kind, from, to), phase, (remaining, elapsed_ms, left_ms), holders)| {
                    Event::RotateProgress {
                        request_id,
                        progress: RotationProgress {
                            kind,
                            from,
                            to,
                            phase,
                            remaining,
                            elapsed_ms,
                            left_ms,
                            holders: holders
                                .into_iter()
                                .map(|(id, holder)| RotationHolder { id, holder })
                                .collect(),
                        },
                    }
                }
            ),
    ]
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Msg {
    Request(u32, Request),
    Response(Response),
    Event(Event),
}

fn msg() -> impl Strategy<Value = Msg> {
    prop_oneof![
        (any::<u32>(), request()).prop_map(|(id, r)| Msg::Request(id, r)),
        response().prop_map(Msg::Response),
        event().prop_map(Msg::Event),
    ]
}

fn encode(m: &Msg, buf: &mut BytesMut) {
    match m {
        Msg::Request(id, r) => r.encode(*id, buf),
        Msg::Response(r) => r.encode(buf),
        Msg::Event(e) => e.encode(buf),
    }
}

/// Edits applied to valid frames; positions are taken modulo the length.
#[derive(Debug, Clone)]
enum Mutation {
    FlipBit(usize, u8),
    SetByte(usize, u8),
    Insert(usize, u8),
    Remove(usize),
    Truncate(usize),
    /// Overwrite the first frame's length field.
    SetLength(u32),
    /// Nudge the first frame's length field by a small amount.
    NudgeLength(i8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, v)| Mutation::SetByte(i, v)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, v)| Mutation::Insert(i, v)),
        any::<usize>().prop_map(Mutation::Remove),
        any::<usize>().prop_map(Mutation::Truncate),
        any::<u32>().prop_map(Mutation::SetLength),
        any::<i8>().prop_map(Mutation::NudgeLength),
    ]
}

fn mutate(bytes: &mut Vec<u8>, m: &Mutation) {
    if bytes.is_empty() {
        return;
    }
    let n = bytes.len();
    match *m {
        Mutation::FlipBit(i, b) => bytes[i % n] ^= 1 << b,
        Mutation::SetByte(i, v) => bytes[i % n] = v,
        Mutation::Insert(i, v) => bytes.insert(i % (n + 1), v),
        Mutation::Remove(i) => {
            bytes.remove(i % n);
        }
        Mutation::Truncate(i) => bytes.truncate(i % n),
        Mutation::SetLength(v) if n >= 4 => bytes[..4].copy_from_slice(&v.to_be_bytes()),
        Mutation::NudgeLength(d) if n >= 4 => {
            let v = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]).wrapping_add_signed(i32::from(d));
            bytes[..4].copy_from_slice(&v.to_be_bytes());
        }
        Mutation::SetLength(_) | Mutation::NudgeLength(_) => {}
    }
}

// ---------------------------------------------------------------- helpers

/// What a decoder run produced: the frames, then how it stopped (`None`:
/// waiting for more bytes; `Some`: the fatal error's text).
type Outcome = (Vec<Frame>, Option<String>);

/// Feeds `input` to a fresh codec in the given pieces, decoding everything
/// available after each piece, until the first error.
fn decode_in_pieces(input: &[u8], cuts: &[usize]) -> Outcome {
    let mut codec = ClastorCodec::new(LIMIT);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    cuts.push(input.len());
    cuts.sort_unstable();
    let mut fed = 0;
    for cut in cuts {
        buf.put_slice(&input[fed..cut]);
        fed = cut;
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => {
                    assert!(frame.body.len() + HEADER_LEN <= LIMIT, "frame over the limit");
                    frames.push(frame);
                }
                Ok(None) => break,
                Err(e) => return (frames, Some(e.to_string())),
            }
        }
    }
    (frames, None)
}

/// Runs every body decoder over a frame, whatever its flags say, and checks
/// what a successful decode promises.
fn decode_bodies(frame: &Frame) {
    let header = frame.header;
    if let Ok(request) = Request::decode(&header, frame.body.clone()) {
        assert_eq!(header.flags, Flags::REQUEST);
        // The request encoding is canonical: it re-encodes to the same frame.
        let mut again = BytesMut::new();
        request.encode(header.request_id, &mut again);
        assert_eq!(&again[4 + HEADER_LEN..], &frame.body[..]);
        assert_eq!(again[5], header.opcode);
    }
    if let Ok(response) = Response::decode(&header, frame.body.clone()) {
        assert_eq!(header.flags, Flags::RESPONSE);
        assert_eq!(response.request_id, header.request_id);
        let mut again = BytesMut::new();
        response.encode(&mut again);
        // Canonical too, except an error message over the cap is cut.
        let long_message = matches!(&response.result, Err(e) if e.message.len() > 1024);
        if !long_message {
            assert_eq!(&again[4 + HEADER_LEN..], &frame.body[..]);
        }
    }
    if let Ok(event) = Event::decode(&header, frame.body.clone()) {
        assert_eq!(header.flags, Flags::EVENT);
        // Events decode leniently (unknown reasons and statuses are mapped),
        // so only the decoded value is stable.
        let mut again = BytesMut::new();
        event.encode(&mut again);
        let mut codec = ClastorCodec::new(clastor_protocol::MAX_FRAME_LEN_CEILING);
        let f = codec.decode(&mut again).expect("own encoding").expect("whole");
        assert_eq!(Event::decode(&f.header, f.body), Ok(event));
    }
}

fn check_stream(input: &[u8], cuts: &[usize]) {
    let (frames, error) = decode_in_pieces(input, &[]);
    // Bounded: every frame consumed at least its prefix and header.
    assert!(frames.len() <= input.len() / (4 + HEADER_LEN));
    for f in &frames {
        decode_bodies(f);
    }
    // The same frames and the same outcome, however the bytes arrive.
    let (frames2, error2) = decode_in_pieces(input, cuts);
    assert_eq!(frames, frames2);
    assert_eq!(error, error2);
}

// ---------------------------------------------------------------- properties

proptest! {
    #![proptest_config(config())]

    #[test]
    fn random_bytes_never_panic(input in vec(any::<u8>(), 0..256), cuts in vec(any::<usize>(), 0..6)) {
        check_stream(&input, &cuts);
    }

    /// Random bytes behind a plausible prefix and header, so bodies, not only
    /// lengths, get exercised.
    #[test]
    fn random_bodies_never_panic(
        opcode in prop_oneof![any::<u8>(), select(vec![1u8, 2, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x80, 0x81])],
        flags in prop_oneof![0u16..4, any::<u16>()],
        request_id in any::<u32>(),
        body in vec(any::<u8>(), 0..96),
        cuts in vec(any::<usize>(), 0..6),
    ) {
        let mut input = BytesMut::new();
        input.put_u32(u32::try_from(HEADER_LEN + body.len()).expect("small"));
        input.put_u8(clastor_protocol::PROTOCOL_VERSION);
        input.put_u8(opcode);
        input.put_u16(flags);
        input.put_u32(request_id);
        input.put_slice(&body);
        check_stream(&input, &cuts);
    }

    #[test]
    fn mutated_frames_never_panic(
        msgs in vec(msg(), 1..4),
        mutations in vec(mutation(), 0..4),
        cuts in vec(any::<usize>(), 0..6),
    ) {
        let mut buf = BytesMut::new();
        for m in &msgs {
            encode(m, &mut buf);
        }
        let mut input = buf.to_vec();
        for m in &mutations {
            mutate(&mut input, m);
        }
        check_stream(&input, &cuts);
    }

    #[test]
    fn messages_round_trip(msgs in vec(msg(), 1..6), cuts in vec(any::<usize>(), 0..6)) {
        let mut buf = BytesMut::new();
        for m in &msgs {
            encode(m, &mut buf);
        }
        let (frames, error) = decode_in_pieces(&buf, &cuts);
        prop_assert_eq!(error, None);
        prop_assert_eq!(frames.len(), msgs.len());
        for (m, f) in msgs.iter().zip(frames) {
            let got = match m {
                Msg::Request(..) => Request::decode(&f.header, f.body).map(|r| Msg::Request(f.header.request_id, r)),
                Msg::Response(_) => Response::decode(&f.header, f.body).map(Msg::Response),
                Msg::Event(_) => Event::decode(&f.header, f.body).map(Msg::Event),
            };
            prop_assert_eq!(got.as_ref(), Ok(m));
        }
    }

    #[test]
    fn text_parse_never_panics(line in any::<String>()) {
        // Whatever it returns, an error names a request-level status.
        if let Err(e) = text::parse(&line) {
            prop_assert!(matches!(e.status, Status::BadRequest | Status::UnknownOpcode));
            prop_assert!(!text::format_parse_error(&e).trim_end_matches('\n').contains('\n'));
        }
    }

    #[test]
    fn mutated_command_lines_never_panic(
        cmd in select(vec!["PING", "ACQUIRE a b 10 20", "RELEASE a b", "RENEW a b 5", "HELD ALL", "VERSION a", "INFO", "HELP", "QUIT"]),
        mutations in vec(mutation(), 1..4),
    ) {
        let mut bytes = cmd.as_bytes().to_vec();
        for m in &mutations {
            mutate(&mut bytes, m);
        }
        let _ = text::parse(&String::from_utf8_lossy(&bytes));
    }

    /// Any well-formed command line parses to the request it spells, however
    /// the command is cased and spaced.
    #[test]
    fn text_commands_parse_to_their_request(
        kind in word(),
        id in word(),
        wait_ms in proptest::option::of(any::<u32>()),
        lease_ms in any::<u32>(),
        upper in vec(any::<bool>(), 8),
        gaps in vec(1usize..4, 6),
        cr in any::<bool>(),
    ) {
        let cased = |name: &str| -> String {
            name.chars().zip(upper.iter().cycle()).map(|(c, u)| if *u { c } else { c.to_ascii_lowercase() }).collect()
        };
        let join = |words: &[String]| -> String {
            let mut line = " ".repeat(gaps[0] - 1);
            for (i, w) in words.iter().enumerate() {
                if i > 0 {
                    line.push_str(&" ".repeat(gaps[i % gaps.len()]));
                }
                line.push_str(w);
            }
            if cr {
                line.push('\r');
            }
            line
        };
        let mut words = vec![cased("ACQUIRE"), kind.clone(), id.clone()];
        if let Some(w) = wait_ms {
            words.push(w.to_string());
            words.push(lease_ms.to_string());
        }
        let want = Request::Acquire(Acquire {
            kind: kind.clone(),
            id: id.clone(),
            wait_ms: wait_ms.unwrap_or(0),
            lease_ms: if wait_ms.is_some() { lease_ms } else { 0 },
            mode: LockMode::Exclusive,
            trace_id: None,
        });
        prop_assert_eq!(text::parse(&join(&words)), Ok(Command::Request(want)));
        let words = vec![cased("RENEW"), kind.clone(), id.clone(), lease_ms.to_string()];
        prop_assert_eq!(
            text::parse(&join(&words)),
            Ok(Command::Request(Request::Renew { kind: kind.clone(), id: id.clone(), lease_ms, token: 0 }))
        );
        let words = vec![cased("RELEASE"), kind.clone(), id.clone()];
        prop_assert_eq!(
            text::parse(&join(&words)),
            Ok(Command::Request(Request::Release { kind: kind.clone(), id: id.clone(), token: 0 }))
        );
        let words = vec![cased("RELEASE"), kind.clone(), id.clone(), "42".to_owned()];
        prop_assert_eq!(text::parse(&join(&words)), Ok(Command::Request(Request::Release { kind, id, token: 42 })));
    }

    /// Server text cannot break the line structure of a text reply.
    #[test]
    fn text_replies_stay_on_their_lines(
        status in error_status(),
        message in any_string(),
        version in any_string(),
        values in vec((any_string(), any_string()), 0..4),
    ) {
        let req = Request::Acquire(Acquire {
            kind: "k".into(), id: "i".into(), wait_ms: 0, lease_ms: 0, mode: LockMode::Exclusive, trace_id: None,
        });
        let one_line = |s: &str| s.ends_with('\n') && s.matches('\n').count() == 1;
        let err = text::format_response(&req, &Response::error(1, 0x10, status, message.clone()));
        prop_assert!(one_line(&err), "{:?}", err);
        let ok = text::format_response(
            &req,
            &Response::ok(1, ResponseBody::Acquired(AcquireOk { token: 1, lease_ms: 0, version, safe_ms: None })),
        );
        prop_assert!(one_line(&ok), "{:?}", ok);
        let closing = text::format_event(&Event::Closing { status, message });
        prop_assert!(one_line(&closing), "{:?}", closing);
        let n = values.len();
        let info = text::format_response(&Request::Info, &Response::ok(1, ResponseBody::Info(values)));
        // "+INFO", one line per pair, ".".
        prop_assert_eq!(info.matches('\n').count(), n + 2, "{:?}", info);
        prop_assert!(info.ends_with("\n.\n"));
    }
}
