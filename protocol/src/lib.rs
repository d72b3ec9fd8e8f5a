//! The Clastor wire protocol, sans-I/O: frames, opcodes, status codes, message
//! types, their encoding, a tokio-util codec and the line-based text form.
//!
//! `PROTOCOL.md` beside this crate is the normative specification; this crate is
//! its reference implementation, shared by the server and the client so the two
//! can never disagree on a byte.
//!
//! Design choices:
//! - **Two error layers.** [`FrameError`] is fatal: the byte stream can no longer
//!   be trusted (bad length, frame over the limit, wrong protocol version), and
//!   the connection closes. [`BodyError`] is per request: the frame was sound but
//!   its body was not, so the peer gets an error reply with the request id and the
//!   connection lives on.
//! - **No I/O.** Nothing here touches a socket; the codec works on `BytesMut`.
//! - **No panics on input.** Every read is bounds-checked; allocation is bounded
//!   by the frame limit, never by a length field read off the wire.

mod codec;
#[cfg(test)]
mod codec_tests;
#[cfg(test)]
mod golden;
mod header;
mod message;
pub mod name;
mod opcode;
mod status;
pub mod text;
mod wire;

pub use codec::{ClastorCodec, Frame, FrameError, split_frame};
pub use header::{Flags, Header};
pub use message::{
    Acquire, AcquireOk, BodyError, ErrorReply, Event, HeldLock, HeldScope, Hello, HelloOk, KindMode, LockMode,
    LostReason, Request, Response, ResponseBody, VersionInfo,
};
pub use opcode::Opcode;
pub use status::Status;

/// The protocol version this crate speaks. It travels in every frame header.
pub const PROTOCOL_VERSION: u8 = 1;

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
/// fixed by the protocol's own limits (`RENEW` with two names of
/// [`name::MAX_NAME_LEN`] bytes: header, two length-prefixed names, lease and
/// token) must fit, or some valid request could never be sent.
pub const MIN_FRAME_LEN: usize = HEADER_LEN + 2 * (2 + name::MAX_NAME_LEN) + 4 + 8;
