//! How the codec and the body decoders classify broken input: *incomplete*
//! (wait for more bytes), *fatal* ([`FrameError`]: the connection closes) or
//! *malformed* ([`BodyError`]: one error reply, the connection lives on).

use bytes::{BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::golden::{Msg, examples, hex};
use crate::name::MAX_NAME_LEN;
use crate::{
    Acquire, BodyError, ClastorCodec, DEFAULT_MAX_FRAME_LEN, Event, Frame, FrameError, HEADER_LEN, Header, HeldLock,
    HeldScope, Hello, KindMode, LENGTH_PREFIX_LEN, LockMode, LostReason, MAX_FRAME_LEN_CEILING, MIN_FRAME_LEN, Opcode,
    Request, Response, ResponseBody, Status, split_frame,
};

/// A raw frame: length prefix, header, body.
fn raw(version: u8, opcode: u8, flags: u16, request_id: u32, body: &[u8]) -> BytesMut {
    let mut b = BytesMut::new();
    b.put_u32(u32::try_from(HEADER_LEN + body.len()).expect("small"));
    b.put_u8(version);
    b.put_u8(opcode);
    b.put_u16(flags);
    b.put_u32(request_id);
    b.put_slice(body);
    b
}

/// Decodes one frame that must be complete and sound.
fn frame_of(bytes: &[u8]) -> Frame {
    let mut buf = BytesMut::from(bytes);
    let frame = ClastorCodec::default()
        .decode(&mut buf)
        .expect("no frame error")
        .expect("a whole frame");
    assert!(buf.is_empty());
    frame
}

/// Decodes a body with the decoder its header's flags call for.
fn decode_body(frame: Frame) -> Result<Msg, BodyError> {
    let h = frame.header;
    match h.flags.0 {
        0 => Request::decode(&h, frame.body).map(|request| Msg::Request {
            request_id: h.request_id,
            request,
        }),
        1 => Response::decode(&h, frame.body).map(Msg::Response),
        _ => Event::decode(&h, frame.body).map(Msg::Event),
    }
}

/// The example's frame with its body replaced (length prefix fixed up).
fn with_body(golden: &[u8], body: &[u8]) -> BytesMut {
    let h = &golden[4..4 + HEADER_LEN];
    raw(
        h[0],
        h[1],
        u16::from_be_bytes([h[2], h[3]]),
        u32::from_be_bytes([h[4], h[5], h[6], h[7]]),
        body,
    )
}

#[test]
fn every_proper_prefix_of_a_frame_is_incomplete() {
    for e in examples() {
        let bytes = hex(e.golden);
        for cut in 0..bytes.len() {
            let mut buf = BytesMut::from(&bytes[..cut]);
            let got = ClastorCodec::default().decode(&mut buf);
            assert!(matches!(got, Ok(None)), "{} cut at {cut}: {got:?}", e.name);
        }
    }
}

/// Regression: the inner codec consumes the length prefix as soon as it has
/// it, so re-reading "the length" on the next call read the header instead
/// (`01 ..` = 16 MiB) and failed every frame that arrived in two pieces.
#[test]
fn a_frame_arriving_in_pieces_decodes_once() {
    for e in examples() {
        let bytes = hex(e.golden);
        let whole = frame_of(&bytes);
        // One byte at a time, through one codec.
        let mut codec = ClastorCodec::default();
        let mut buf = BytesMut::new();
        for (i, b) in bytes.iter().enumerate() {
            buf.put_u8(*b);
            let got = codec.decode(&mut buf).expect("no frame error");
            if i + 1 < bytes.len() {
                assert!(got.is_none(), "{}: frame before its last byte", e.name);
            } else {
                assert_eq!(got.as_ref(), Some(&whole), "{}", e.name);
            }
        }
        // Two pieces, split anywhere, followed by a second frame.
        for cut in 1..bytes.len() {
            let mut codec = ClastorCodec::default();
            let mut buf = BytesMut::from(&bytes[..cut]);
            assert!(codec.decode(&mut buf).expect("no frame error").is_none());
            buf.put_slice(&bytes[cut..]);
            buf.put_slice(&bytes);
            assert_eq!(
                codec.decode(&mut buf).expect("first").as_ref(),
                Some(&whole),
                "{} cut {cut}",
                e.name
            );
            assert_eq!(
                codec.decode(&mut buf).expect("second").as_ref(),
                Some(&whole),
                "{} cut {cut}",
                e.name
            );
            assert!(buf.is_empty());
        }
    }
}

#[test]
fn a_length_over_the_limit_is_fatal_before_the_body_arrives() {
    for announced in [101u32, 65_537, 1 << 24, u32::MAX] {
        let mut codec = ClastorCodec::new(100);
        // Only the prefix has arrived: the error comes now, and nothing was
        // reserved for the announced body.
        let mut buf = BytesMut::with_capacity(4);
        buf.put_u32(announced);
        match codec.decode(&mut buf) {
            Err(FrameError::TooLarge { len, max: 100 }) => assert_eq!(len, announced as usize),
            other => panic!("{announced}: {other:?}"),
        }
        assert!(buf.capacity() < 1024, "reserved {} bytes", buf.capacity());
    }
    // The default limit is DEFAULT_MAX_FRAME_LEN.
    let mut buf = BytesMut::new();
    buf.put_u32(u32::try_from(DEFAULT_MAX_FRAME_LEN + 1).expect("small"));
    assert!(matches!(
        ClastorCodec::default().decode(&mut buf),
        Err(FrameError::TooLarge { .. })
    ));
}

#[test]
fn a_frame_exactly_at_the_limit_is_accepted() {
    let body = vec![0u8; 92];
    let mut buf = raw(1, Opcode::Ping as u8, 0, 1, &body);
    let frame = ClastorCodec::new(100)
        .decode(&mut buf)
        .expect("no error")
        .expect("whole");
    assert_eq!(frame.body.len(), 92);
    // ...and its body is then malformed, not fatal.
    assert_eq!(
        Request::decode(&frame.header, frame.body),
        Err(BodyError::TrailingBytes { len: 92 })
    );
}

#[test]
fn frame_limits_are_clamped() {
    assert_eq!(ClastorCodec::default().max_frame_len(), DEFAULT_MAX_FRAME_LEN);
    assert_eq!(ClastorCodec::new(0).max_frame_len(), HEADER_LEN);
    assert_eq!(ClastorCodec::new(usize::MAX).max_frame_len(), MAX_FRAME_LEN_CEILING);
    // Below 16 MiB, so a binary stream's first byte is always 0x00.
    assert_eq!(u32::try_from(MAX_FRAME_LEN_CEILING).expect("fits").to_be_bytes()[0], 0);
}

#[test]
fn a_frame_shorter_than_the_header_is_fatal() {
    for len in 0..HEADER_LEN {
        let mut buf = BytesMut::new();
        buf.put_u32(u32::try_from(len).expect("small"));
        buf.put_slice(&[1u8; HEADER_LEN][..len]);
        match ClastorCodec::default().decode(&mut buf) {
            Err(FrameError::TooShort(n)) => assert_eq!(n, len),
            other => panic!("length {len}: {other:?}"),
        }
    }
}

#[test]
fn a_wrong_version_is_fatal() {
    for version in [0u8, 2, 0x7f, 0xff] {
        let mut buf = raw(version, Opcode::Ping as u8, 0, 1, &[]);
        match ClastorCodec::default().decode(&mut buf) {
            Err(FrameError::UnsupportedVersion(v)) => assert_eq!(v, version),
            other => panic!("version {version}: {other:?}"),
        }
    }
}

#[test]
fn an_unknown_opcode_is_a_body_error_with_its_own_status() {
    let requests = [0x01, 0x02, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, 0x19];
    for op in (0..=u8::MAX).filter(|op| !requests.contains(op)) {
        // Event opcodes are unknown as requests too.
        let frame = frame_of(&raw(1, op, 0, 9, &[]));
        let err = Request::decode(&frame.header, frame.body).expect_err("unknown");
        assert_eq!(err, BodyError::UnknownOpcode(op));
        assert_eq!(err.status(), Status::UnknownOpcode);
    }
    // An OK response needs a known opcode to read its body...
    let frame = frame_of(&raw(1, 0x7f, 1, 9, &[0, 0]));
    assert_eq!(
        Response::decode(&frame.header, frame.body),
        Err(BodyError::UnknownOpcode(0x7f))
    );
    // ...but the error reply to an unknown opcode echoes it and decodes.
    let reply = Response::error(9, 0x7f, Status::UnknownOpcode, "unknown opcode 0x7f");
    let mut buf = BytesMut::new();
    reply.encode(&mut buf);
    let frame = frame_of(&buf);
    assert_eq!(Response::decode(&frame.header, frame.body), Ok(reply));
    // Events only under event opcodes.
    let frame = frame_of(&raw(1, Opcode::Ping as u8, 2, 0, &[]));
    assert_eq!(
        Event::decode(&frame.header, frame.body),
        Err(BodyError::UnknownOpcode(0x02))
    );
    // Any other body error is BAD_REQUEST.
    assert_eq!(BodyError::Truncated { field: "kind" }.status(), Status::BadRequest);
}

/// An event opcode sent as a request is unknown whatever its flags: the
/// opcode is checked before the flags (PROTOCOL.md §5, §12), as for any other
/// opcode that is not a request.
#[test]
fn an_event_opcode_as_a_request_is_unknown_whatever_its_flags() {
    for op in [Opcode::LockLost, Opcode::Closing] {
        for flags in [0u16, 1, 2, 3, 0x8000, u16::MAX] {
            let frame = frame_of(&raw(1, op as u8, flags, 9, &[]));
            let err = Request::decode(&frame.header, frame.body).expect_err("not a request");
            assert_eq!(err, BodyError::UnknownOpcode(op as u8), "{op} flags {flags:#x}");
            assert_eq!(err.status(), Status::UnknownOpcode);
        }
    }
    // Same for an opcode nobody defines; a request opcode with bad flags is
    // BAD_REQUEST.
    let frame = frame_of(&raw(1, 0x7f, 1, 9, &[]));
    assert_eq!(
        Request::decode(&frame.header, frame.body),
        Err(BodyError::UnknownOpcode(0x7f))
    );
    let frame = frame_of(&raw(1, Opcode::Ping as u8, 2, 9, &[]));
    assert_eq!(Request::decode(&frame.header, frame.body), Err(BodyError::BadFlags(2)));
}

/// An error reply with a status this version does not define decodes to its
/// code and message once the whole body is read; a broken one is still
/// malformed.
#[test]
fn an_unknown_status_keeps_its_code_and_message() {
    let body = [0xbe, 0xef, 0, 3, b'n', b'e', b'w'];
    let frame = frame_of(&raw(1, Opcode::Acquire as u8, 1, 7, &body));
    let err = Response::decode(&frame.header, frame.body).expect_err("unknown status");
    assert_eq!(
        err,
        BodyError::UnknownStatus {
            code: 0xbeef,
            message: "new".into()
        }
    );
    assert!(!err.is_malformed());
    assert!(err.is_error_reply());
    // Truncated message, trailing bytes, bad UTF-8: malformed as ever.
    for (body, want, error_reply) in [
        (
            &[0xbe, 0xef, 0, 3, b'n'][..],
            BodyError::Truncated { field: "message" },
            true,
        ),
        (&[0xbe, 0xef, 0, 0, 9][..], BodyError::TrailingBytes { len: 1 }, false),
        (
            &[0xbe, 0xef, 0, 1, 0xff][..],
            BodyError::NotUtf8 { field: "message" },
            true,
        ),
    ] {
        let frame = frame_of(&raw(1, Opcode::Acquire as u8, 1, 7, body));
        let err = Response::decode(&frame.header, frame.body).expect_err("malformed");
        assert!(err.is_malformed());
        assert_eq!(err, want);
        assert_eq!(err.is_error_reply(), error_reply, "{err}");
    }
    // An OK reply with a broken body is not recognisably an error reply: the
    // request may have succeeded.
    let frame = frame_of(&raw(1, Opcode::Acquire as u8, 1, 7, &[0, 0, 0, 0]));
    let err = Response::decode(&frame.header, frame.body).expect_err("short");
    assert_eq!(err, BodyError::Truncated { field: "token" });
    assert!(!err.is_error_reply());
    let frame = frame_of(&raw(1, Opcode::Acquire as u8, 1, 7, &[0]));
    assert!(
        !Response::decode(&frame.header, frame.body)
            .expect_err("no status")
            .is_error_reply()
    );
}

/// Every wire enum converts from its byte with `TryFrom<u8>`, failing with the
/// unknown value, and back with `as u8`.
#[test]
fn wire_enums_round_trip_and_reject_unknown_values() {
    fn check<T: TryFrom<u8, Error = u8> + Copy + PartialEq + std::fmt::Debug>(all: &[T], to_u8: fn(T) -> u8) {
        for (i, v) in all.iter().enumerate() {
            assert_eq!(usize::from(to_u8(*v)), i, "{v:?} is not in wire order");
            assert_eq!(T::try_from(to_u8(*v)), Ok(*v));
        }
        for unknown in u8::try_from(all.len()).expect("small")..=u8::MAX {
            assert_eq!(T::try_from(unknown), Err(unknown));
        }
    }
    check(&[LockMode::Exclusive, LockMode::Shared], |v| v as u8);
    check(&[HeldScope::Connection, HeldScope::Server], |v| v as u8);
    check(&[KindMode::Normal, KindMode::Draining], |v| v as u8);
    check(
        &[
            LostReason::Unknown,
            LostReason::LeaseExpired,
            LostReason::SessionExpired,
            LostReason::BackendUnreachable,
            LostReason::ServerShutdown,
            LostReason::BackendError,
            LostReason::NodeDeleted,
        ],
        |v| v as u8,
    );
}

/// `MIN_FRAME_LEN` is what it claims: every request with maximal names (and a
/// HELLO with a short client name) fits in it, and RENEW fills it exactly.
#[test]
fn every_request_with_maximal_names_fits_in_min_frame_len() {
    let name = "n".repeat(MAX_NAME_LEN);
    let requests = [
        Request::Hello(Hello {
            min_version: 1,
            max_version: 1,
            client_name: "app-7/clastor-client 0.1.0".into(),
        }),
        Request::Ping,
        Request::Acquire(Acquire {
            kind: name.clone(),
            id: name.clone(),
            wait_ms: u32::MAX,
            lease_ms: u32::MAX,
            mode: LockMode::Shared,
            trace_id: Some("t".repeat(crate::name::MAX_TRACE_ID_LEN)),
        }),
        Request::Release {
            kind: name.clone(),
            id: name.clone(),
            token: u64::MAX,
        },
        Request::Renew {
            kind: name.clone(),
            id: name.clone(),
            lease_ms: u32::MAX,
            token: u64::MAX,
        },
        Request::Held {
            scope: HeldScope::Server,
        },
        Request::Version { kind: name.clone() },
        Request::Info,
        Request::Auth {
            token: crate::AuthToken::new("t".repeat(crate::MAX_TOKEN_LEN)),
        },
    ];
    for request in &requests {
        let mut buf = BytesMut::new();
        request.encode(u32::MAX, &mut buf);
        let frame_len = buf.len() - LENGTH_PREFIX_LEN;
        assert!(
            frame_len <= MIN_FRAME_LEN,
            "{} is {frame_len} bytes, over MIN_FRAME_LEN ({MIN_FRAME_LEN})",
            request.opcode()
        );
        if request.opcode() == Opcode::Acquire {
            assert_eq!(
                frame_len, MIN_FRAME_LEN,
                "ACQUIRE with a trace id is the largest request"
            );
        }
        // And a codec at that limit takes it.
        let frame = ClastorCodec::new(MIN_FRAME_LEN)
            .decode(&mut buf)
            .expect("within the limit")
            .expect("whole");
        assert_eq!(Request::decode(&frame.header, frame.body).as_ref(), Ok(request));
    }
    assert_eq!(MIN_FRAME_LEN, 311);
}

/// The message without the optional trailing field protocol version 2 adds
/// to some bodies (`safe_ms`), if it has one.
fn without_optional(msg: &Msg) -> Option<Msg> {
    if let Msg::Request {
        request_id,
        request: Request::Acquire(a),
    } = msg
    {
        let mut a = a.clone();
        a.trace_id.take()?;
        return Some(Msg::Request {
            request_id: *request_id,
            request: Request::Acquire(a),
        });
    }
    if let Msg::Request {
        request_id,
        request: Request::Rotate(r),
    } = msg
    {
        let mut r = r.clone();
        r.layout.take()?;
        return Some(Msg::Request {
            request_id: *request_id,
            request: Request::Rotate(r),
        });
    }
    let Msg::Response(r) = msg else { return None };
    let mut r = r.clone();
    match &mut r.result {
        Ok(ResponseBody::Acquired(a)) => {
            a.safe_ms.take()?;
        }
        Ok(ResponseBody::Renewed { safe_ms, .. }) => {
            safe_ms.take()?;
        }
        Ok(ResponseBody::Version(v)) => {
            if v.layout.take().is_none() {
                v.drain.take()?;
            }
        }
        Ok(ResponseBody::Held(list)) if list.iter().any(|h| h.trace_id.is_some() || h.mode.is_some()) => {
            for h in list {
                h.trace_id = None;
                h.mode = None;
            }
        }
        _ => return None,
    }
    Some(Msg::Response(r))
}

/// A message whose optional tail is a structure: extra bytes after its body
/// start that structure, so they read as truncated rather than trailing.
fn has_structured_tail(msg: &Msg) -> bool {
    matches!(msg, Msg::Response(r) if matches!(r.result, Ok(ResponseBody::Version(_))))
}

#[test]
fn a_short_body_in_a_complete_frame_is_malformed_not_incomplete() {
    for e in examples() {
        let bytes = hex(e.golden);
        let body = &bytes[4 + HEADER_LEN..];
        // Where an optional trailing field starts, the body is whole without it.
        let shorter = without_optional(&e.msg);
        let mandatory = shorter.as_ref().map(|m| m.encode().len() - 4 - HEADER_LEN);
        // A draining `VERSION` reply cut one byte into its drain state reads
        // as the version 4 layout of a kind that does not drain: the one cut
        // the length rule (PROTOCOL.md, VERSION OK) cannot tell.
        let lone_layout_at = match &e.msg {
            Msg::Response(r) if matches!(&r.result, Ok(ResponseBody::Version(v)) if v.drain.is_some()) => {
                mandatory.map(|m| m + 1)
            }
            _ => None,
        };
        for cut in 0..body.len() {
            let frame = frame_of(&with_body(&bytes, &body[..cut]));
            let got = decode_body(frame);
            if Some(cut) == lone_layout_at {
                assert!(
                    matches!(&got, Ok(Msg::Response(r)) if matches!(&r.result, Ok(ResponseBody::Version(v)) if v.drain.is_none() && v.layout.is_some())),
                    "{} body cut at {cut}: {got:?}",
                    e.name
                );
                continue;
            }
            match mandatory {
                Some(end) if cut == end => assert_eq!(got.as_ref().ok(), shorter.as_ref(), "{}", e.name),
                // Inside an optional trailing `u32`: leftover bytes; inside
                // optional trailing strings or structures: truncated.
                // Where two optional sections nest (HELD's trace ids, then
                // its modes: version 4), a cut after the first reads as the
                // message without either.
                Some(end) if cut > end => assert!(
                    matches!(got, Err(BodyError::TrailingBytes { len }) if len == cut - end)
                        || matches!(got, Err(BodyError::Truncated { .. }))
                        || (e.name == "response/held-v4" && got.as_ref().ok() == shorter.as_ref()),
                    "{} body cut at {cut}: {got:?}",
                    e.name
                ),
                _ => assert!(
                    matches!(got, Err(BodyError::Truncated { .. })),
                    "{} body cut at {cut}: {got:?}",
                    e.name
                ),
            }
        }
    }
}

#[test]
fn trailing_bytes_are_malformed() {
    for e in examples() {
        let bytes = hex(e.golden);
        let mut body = bytes[4 + HEADER_LEN..].to_vec();
        body.extend_from_slice(&[0, 0, 0]);
        let got = decode_body(frame_of(&with_body(&bytes, &body)));
        let drained = matches!(&e.msg, Msg::Response(r) if matches!(&r.result, Ok(ResponseBody::Version(v)) if v.drain.is_some()));
        if has_structured_tail(&e.msg) && !drained {
            // Extra bytes after `mode` start a drain state, cut short.
            assert!(matches!(got, Err(BodyError::Truncated { .. })), "{}: {got:?}", e.name);
            continue;
        }
        // A version 1 `HELD` listing of one entry followed by three zeros
        // reads as one with the version 3 and 4 sections: an empty trace id
        // ("none") and mode 0 (exclusive).
        if e.name == "response/held" {
            assert!(
                matches!(&got, Ok(Msg::Response(r)) if matches!(&r.result, Ok(ResponseBody::Held(l)) if l.iter().all(|h| h.trace_id.is_none() && h.mode == Some(LockMode::Exclusive)))),
                "{}: {got:?}",
                e.name
            );
            continue;
        }
        // Where an optional trailing string may follow (version 3), two of
        // the zeros read as an empty one: "none"; where an optional layout
        // may (version 4), one of them reads as `mutex`; where modes may
        // follow trace ids (version 4), one zero per entry reads as one.
        let len = match e.name {
            "request/acquire" | "request/acquire-shared-v4" | "response/held-v3" => 1,
            "request/rotate" | "response/version-v2-draining" => 2,
            _ => 3,
        };
        assert_eq!(got, Err(BodyError::TrailingBytes { len }), "{}", e.name);
    }
}

#[test]
fn a_trace_id_is_trailing_bytes_before_version_3() {
    // ACQUIRE k/x, wait 0, lease 0, exclusive, then trace id "t" (or an
    // empty one): version 3 reads it; versions 1 and 2 have no such field.
    let base = [0, 1, b'k', 0, 1, b'x', 0, 0, 0, 0, 0, 0, 0, 0, 0];
    for (trace, len) in [(&[0, 1, b't'][..], 3), (&[0, 0][..], 2)] {
        let body = [&base[..], trace].concat();
        let frame = frame_of(&raw(1, Opcode::Acquire as u8, 0, 3, &body));
        for version in [1, 2] {
            assert_eq!(
                Request::decode_for(&frame.header, frame.body.clone(), version),
                Err(BodyError::TrailingBytes { len }),
                "version {version}"
            );
        }
        let Ok(Request::Acquire(a)) = Request::decode_for(&frame.header, frame.body, 3) else {
            panic!("version 3 reads a trace id");
        };
        assert_eq!(a.trace_id.as_deref(), (len == 3).then_some("t"));
    }
    // Without one, every version reads the same request.
    let frame = frame_of(&raw(1, Opcode::Acquire as u8, 0, 3, &base));
    for version in 1..=3 {
        assert!(Request::decode_for(&frame.header, frame.body.clone(), version).is_ok());
    }
}

#[test]
fn bad_utf8_is_malformed() {
    // ACQUIRE with kind = ff fe.
    let body = [0, 2, 0xff, 0xfe, 0, 1, b'x', 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let frame = frame_of(&raw(1, Opcode::Acquire as u8, 0, 3, &body));
    assert_eq!(
        Request::decode(&frame.header, frame.body),
        Err(BodyError::NotUtf8 { field: "kind" })
    );
    // An overlong encoding and a lone surrogate are not UTF-8 either.
    for bad in [&[0xc0, 0xaf][..], &[0xed, 0xa0, 0x80]] {
        let mut body = vec![0, u8::try_from(bad.len()).expect("small")];
        body.extend_from_slice(bad);
        let frame = frame_of(&raw(1, Opcode::Version as u8, 0, 3, &body));
        assert_eq!(
            Request::decode(&frame.header, frame.body),
            Err(BodyError::NotUtf8 { field: "kind" })
        );
    }
    // An error reply's message.
    let frame = frame_of(&raw(1, Opcode::Ping as u8, 1, 3, &[0, 100, 0, 1, 0x80]));
    assert_eq!(
        Response::decode(&frame.header, frame.body),
        Err(BodyError::NotUtf8 { field: "message" })
    );
}

#[test]
fn bad_enum_values_are_malformed() {
    let acquire = |mode: u8| [0, 1, b'k', 0, 1, b'i', 0, 0, 0, 0, 0, 0, 0, 0, mode];
    let frame = frame_of(&raw(1, Opcode::Acquire as u8, 0, 3, &acquire(2)));
    assert_eq!(
        Request::decode(&frame.header, frame.body),
        Err(BodyError::BadEnum {
            field: "mode",
            value: 2
        })
    );
    let frame = frame_of(&raw(1, Opcode::Held as u8, 0, 3, &[7]));
    assert_eq!(
        Request::decode(&frame.header, frame.body),
        Err(BodyError::BadEnum {
            field: "scope",
            value: 7
        })
    );
    let frame = frame_of(&raw(1, Opcode::Release as u8, 1, 3, &[0, 0, 2]));
    assert_eq!(
        Response::decode(&frame.header, frame.body),
        Err(BodyError::BadEnum {
            field: "released",
            value: 2
        })
    );
    let frame = frame_of(&raw(1, Opcode::Version as u8, 1, 3, &[0, 0, 0, 0, 9]));
    assert_eq!(
        Response::decode(&frame.header, frame.body),
        Err(BodyError::BadEnum {
            field: "mode",
            value: 9
        })
    );
    // An unknown status is not malformed: the reply keeps its code and
    // message (PROTOCOL.md §8).
    let frame = frame_of(&raw(1, Opcode::Ping as u8, 1, 3, &[0x03, 0xe7, 0, 0]));
    assert_eq!(
        Response::decode(&frame.header, frame.body),
        Err(BodyError::UnknownStatus {
            code: 999,
            message: String::new()
        })
    );
    // Events are lenient, so an older client still learns that it lost a lock
    // or is being closed.
    let frame = frame_of(&raw(
        1,
        Opcode::LockLost as u8,
        2,
        0,
        &[0, 1, b'k', 0, 1, b'i', 0, 0, 0, 0, 0, 0, 0, 5, 200],
    ));
    assert_eq!(
        Event::decode(&frame.header, frame.body),
        Ok(Event::LockLost {
            kind: "k".into(),
            id: "i".into(),
            token: 5,
            reason: LostReason::Unknown
        })
    );
    let frame = frame_of(&raw(1, Opcode::Closing as u8, 2, 0, &[0x03, 0xe7, 0, 0]));
    assert_eq!(
        Event::decode(&frame.header, frame.body),
        Ok(Event::Closing {
            status: Status::Internal,
            message: String::new()
        })
    );
}

#[test]
fn flags_must_match_the_message_kind() {
    let frame = frame_of(&raw(1, Opcode::Ping as u8, 1, 3, &[]));
    assert_eq!(Request::decode(&frame.header, frame.body), Err(BodyError::BadFlags(1)));
    let frame = frame_of(&raw(1, Opcode::Ping as u8, 0x8000, 3, &[]));
    assert_eq!(
        Request::decode(&frame.header, frame.body),
        Err(BodyError::BadFlags(0x8000))
    );
    let frame = frame_of(&raw(1, Opcode::Ping as u8, 0, 3, &[0, 0]));
    assert_eq!(Response::decode(&frame.header, frame.body), Err(BodyError::BadFlags(0)));
    let frame = frame_of(&raw(1, Opcode::Closing as u8, 3, 0, &[0, 0, 0, 0]));
    assert_eq!(Event::decode(&frame.header, frame.body), Err(BodyError::BadFlags(3)));
}

#[test]
fn forged_list_counts_are_refused_before_allocating() {
    // 65535 HELD entries announced, none present: refused at the count, before
    // any vector is sized from it.
    for op in [Opcode::Held, Opcode::Info] {
        let frame = frame_of(&raw(1, op as u8, 1, 3, &[0, 0, 0xff, 0xff]));
        assert_eq!(
            Response::decode(&frame.header, frame.body),
            Err(BodyError::Truncated { field: "count" })
        );
    }
    // A count that the bytes could hold by size but not by content.
    let frame = frame_of(&raw(
        1,
        Opcode::Info as u8,
        1,
        3,
        &[0, 0, 0, 2, 0, 1, b'a', 0, 1, b'b', 0, 0],
    ));
    assert_eq!(
        Response::decode(&frame.header, frame.body),
        Err(BodyError::Truncated { field: "value" })
    );
    // A string length past the end of the body.
    let frame = frame_of(&raw(1, Opcode::Version as u8, 0, 3, &[0xff, 0xff, b'k']));
    assert_eq!(
        Request::decode(&frame.header, frame.body),
        Err(BodyError::Truncated { field: "kind" })
    );
}

#[test]
fn many_frames_in_one_buffer_come_out_in_order() {
    let all = examples();
    let mut buf = BytesMut::new();
    for e in &all {
        buf.put_slice(&hex(e.golden));
    }
    let mut codec = ClastorCodec::default();
    for e in &all {
        let frame = codec.decode(&mut buf).expect("no error").expect("a frame");
        assert_eq!(decode_body(frame).as_ref(), Ok(&e.msg), "{}", e.name);
    }
    assert!(codec.decode(&mut buf).expect("no error").is_none());
    assert!(buf.is_empty());
}

#[test]
fn a_bad_body_does_not_disturb_the_frames_after_it() {
    let mut buf = raw(1, 0x7f, 0, 1, &[1, 2, 3]);
    buf.put_slice(&raw(1, Opcode::Held as u8, 0, 2, &[9]));
    buf.put_slice(&hex(examples()[1].golden));
    let mut codec = ClastorCodec::default();
    let mut results = Vec::new();
    while let Some(frame) = codec.decode(&mut buf).expect("no frame error") {
        results.push(decode_body(frame).map_err(|e| e.status()));
    }
    assert_eq!(
        results,
        [
            Err(Status::UnknownOpcode),
            Err(Status::BadRequest),
            Ok(Msg::Request {
                request_id: 2,
                request: Request::Ping
            })
        ]
    );
}

#[test]
fn codec_encoders_write_the_same_bytes_as_encode() {
    let mut codec = ClastorCodec::default();
    for e in examples() {
        let mut buf = BytesMut::new();
        match &e.msg {
            Msg::Request { request_id, request } => codec.encode((*request_id, request), &mut buf),
            Msg::Response(r) => codec.encode(r, &mut buf),
            Msg::Event(ev) => codec.encode(ev, &mut buf),
        }
        .expect("encode");
        assert_eq!(buf.as_ref(), hex(e.golden).as_slice(), "{}", e.name);
    }
}

#[test]
fn error_replies_never_claim_ok_and_messages_are_capped() {
    let r = Response::error(1, Opcode::Ping as u8, Status::Ok, "oops");
    assert_eq!(r.status(), Status::Internal);
    // 1023 ASCII bytes then a 3-byte char: cut before the char, not inside it.
    let long = format!("{}€€€", "x".repeat(1023));
    for msg in [
        Msg::Response(Response::error(
            1,
            Opcode::Acquire as u8,
            Status::Internal,
            long.clone(),
        )),
        Msg::Event(Event::Closing {
            status: Status::ProtocolError,
            message: long.clone(),
        }),
    ] {
        let decoded = Msg::decode(&msg.encode());
        let message = match decoded {
            Msg::Response(Response { result: Err(e), .. }) => e.message,
            Msg::Event(Event::Closing { message, .. }) => message,
            other => panic!("{other:?}"),
        };
        assert_eq!(message, "x".repeat(1023));
    }
}

/// Regression: a string over 65535 bytes is cut when written, and the length
/// prefix used to count it uncut, announcing bytes that never came and
/// swallowing the start of the next frame.
#[test]
fn oversized_strings_keep_the_length_prefix_honest() {
    let huge = "v".repeat(70_000);
    let info = Response::ok(1, ResponseBody::Info(vec![("k".into(), huge.clone())]));
    let acquire = Request::Acquire(crate::Acquire {
        kind: huge.clone(),
        id: "i".into(),
        wait_ms: 0,
        lease_ms: 0,
        mode: crate::LockMode::Exclusive,
        trace_id: None,
    });
    for msg in [
        Msg::Response(info),
        Msg::Request {
            request_id: 2,
            request: acquire,
        },
    ] {
        let mut buf = msg.encode();
        let announced = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        assert_eq!(announced + 4, buf.len());
        let frame = ClastorCodec::new(MAX_FRAME_LEN_CEILING)
            .decode(&mut buf)
            .expect("ok")
            .expect("whole");
        match decode_body(frame).expect("decodes") {
            Msg::Response(Response {
                result: Ok(ResponseBody::Info(pairs)),
                ..
            }) => {
                assert_eq!(pairs[0].1.len(), usize::from(u16::MAX));
            }
            Msg::Request {
                request: Request::Acquire(a),
                ..
            } => assert_eq!(a.kind.len(), usize::from(u16::MAX)),
            other => panic!("{other:?}"),
        }
    }
}

/// Same for lists: past 65535 entries the count is clamped and the rest left
/// off, and the length prefix counts only what is written.
#[test]
fn oversized_lists_keep_the_length_prefix_honest() {
    let entry = HeldLock {
        kind: String::new(),
        id: String::new(),
        token: 1,
        version: String::new(),
        lease_remaining_ms: 0,
        connection_id: 1,
        trace_id: None,
        mode: None,
    };
    let n = usize::from(u16::MAX) + 2;
    let held = Response::ok(1, ResponseBody::Held(vec![entry; n]));
    let info = Response::ok(2, ResponseBody::Info(vec![(String::new(), String::new()); n]));
    for resp in [held, info] {
        let mut buf = BytesMut::new();
        resp.encode(&mut buf);
        let announced = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        assert_eq!(announced + 4, buf.len());
        let frame = ClastorCodec::new(MAX_FRAME_LEN_CEILING)
            .decode(&mut buf)
            .expect("ok")
            .expect("whole");
        let len = match Response::decode(&frame.header, frame.body).expect("decodes").result {
            Ok(ResponseBody::Held(list)) => list.len(),
            Ok(ResponseBody::Info(pairs)) => pairs.len(),
            other => panic!("{other:?}"),
        };
        assert_eq!(len, usize::from(u16::MAX));
    }
}

#[test]
fn split_frame_takes_whole_frames_only() {
    let bytes = hex(examples()[0].golden);
    let mut buf = BytesMut::from(&bytes[..bytes.len() - 1]);
    assert!(split_frame(&mut buf).is_none());
    assert_eq!(buf.len(), bytes.len() - 1, "nothing consumed");
    buf.put_u8(*bytes.last().expect("non-empty"));
    let frame = split_frame(&mut buf).expect("whole");
    assert_eq!(frame, frame_of(&bytes));
    assert!(buf.is_empty());
}

#[test]
fn bodies_are_slices_of_the_read_buffer() {
    // Header is exposed as read; the body is the bytes after it, untouched.
    let bytes = hex(examples()[2].golden);
    let frame = frame_of(&bytes);
    assert_eq!(
        frame.header,
        Header {
            version: 1,
            opcode: Opcode::Acquire as u8,
            flags: crate::Flags::REQUEST,
            request_id: 3
        }
    );
    assert_eq!(frame.body, Bytes::copy_from_slice(&bytes[4 + HEADER_LEN..]));
}

#[test]
fn an_auth_token_past_its_bound_is_malformed_and_never_shown() {
    let mut body = Vec::new();
    let long = "x".repeat(crate::MAX_TOKEN_LEN + 1);
    body.put_u16(u16::try_from(long.len()).expect("small"));
    body.put_slice(long.as_bytes());
    let frame = frame_of(&raw(1, Opcode::Auth as u8, 0, 5, &body));
    let err = Request::decode(&frame.header, frame.body).expect_err("too long");
    assert_eq!(err.status(), Status::BadRequest);
    assert!(!err.to_string().contains("xxxx"), "{err}");
    // Garbage: a length past the body, then bad UTF-8.
    let frame = frame_of(&raw(1, Opcode::Auth as u8, 0, 5, &[0xff, 0xff, 1, 2]));
    assert_eq!(
        Request::decode(&frame.header, frame.body).map_err(|e| e.status()),
        Err(Status::BadRequest)
    );
    let frame = frame_of(&raw(1, Opcode::Auth as u8, 0, 5, &[0, 2, 0xc3, 0x28]));
    assert_eq!(
        Request::decode(&frame.header, frame.body).map_err(|e| e.status()),
        Err(Status::BadRequest)
    );
    // A request's Debug never shows its token.
    let req = Request::Auth {
        token: crate::AuthToken::new("hunter2"),
    };
    assert!(!format!("{req:?}").contains("hunter2"));
}
