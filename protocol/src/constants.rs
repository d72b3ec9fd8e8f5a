//! The protocol's fixed numbers: its version, header and prefix sizes, the
//! frame limits every peer agrees on, and the request id of events. A leaf,
//! so every other module can use them without importing the crate root.

use crate::name::{MAX_NAME_LEN, MAX_TRACE_ID_LEN};

/// The protocol version this crate speaks. It travels in every frame header.
pub const PROTOCOL_VERSION: u8 = 1;

/// The highest protocol version this crate speaks in `HELLO`. Version 2 adds
/// safe-until (`CONFIRM`, and `safe_ms`/`confirm_ms` at the end of three
/// bodies) and keeps the frame layout, so every frame's header still says 1.
/// Version 3 adds trace ids: an optional `trace_id` at the end of `ACQUIRE`,
/// and the grants' trace ids at the end of `HELD OK`. Version 4 adds shared
/// locks: `ACQUIRE`'s `mode = 1` is granted, `HELD OK` ends with the grants'
/// modes, `VERSION OK` with the kind's layout, and `ROTATE` may name the
/// layout of its target.
pub const HIGHEST_VERSION: u8 = 4;

/// Bytes of the fixed header that follows the length prefix.
pub const HEADER_LEN: usize = 8;

/// Bytes of the length prefix (`u32`, big-endian).
pub const LENGTH_PREFIX_LEN: usize = 4;

/// Default and recommended upper bound for a frame's length field (header plus
/// body, excluding the 4-byte prefix). Small on purpose: the largest message a
/// client sends is a few hundred bytes.
pub const DEFAULT_MAX_FRAME_LEN: usize = 64 * 1024;

/// Hard ceiling for any frame limit: keeping frames under 16 MiB guarantees
/// that the first byte of every binary connection is `0x00`, which is how the
/// server tells binary from text connections.
pub const MAX_FRAME_LEN_CEILING: usize = (1 << 24) - 1;

/// Request id reserved for frames the server pushes on its own (events).
pub const EVENT_REQUEST_ID: u32 = 0;

/// Smallest frame limit a peer may enforce: the largest request whose size is
/// fixed by the protocol's own limits must fit, or some valid request could
/// never be sent. That is `ACQUIRE` (version 3) with two names of
/// [`MAX_NAME_LEN`] bytes and a trace id of [`MAX_TRACE_ID_LEN`]: header, two
/// length-prefixed names, wait, lease, mode and the length-prefixed trace id
/// (`RENEW`, the largest before version 3, has 9 bytes fewer than it).
pub const MIN_FRAME_LEN: usize = HEADER_LEN + 2 * (2 + MAX_NAME_LEN) + 4 + 4 + 1 + 2 + MAX_TRACE_ID_LEN;

/// Longest token `AUTH` may carry, in bytes; a longer one is malformed
/// (`BAD_REQUEST`). Tokens are secrets of a few dozen bytes; the bound keeps
/// `AUTH` well inside [`MIN_FRAME_LEN`].
pub const MAX_TOKEN_LEN: usize = 256;

const _: () = assert!(HEADER_LEN + 2 + MAX_TOKEN_LEN <= MIN_FRAME_LEN);
