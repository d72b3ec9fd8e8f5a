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
//! - **Closed enums, one way to decode them.** Opcodes, statuses and the wire
//!   enums have a `TryFrom` that fails with the unknown value; a body decoder
//!   turns that into [`BodyError::BadEnum`]. The exceptions are the ones the
//!   spec makes for forward compatibility: an unknown `LostReason` reads as
//!   `Unknown`, and an error reply with an unknown status code comes back as
//!   [`BodyError::UnknownStatus`] with the code and message, since [`Status`]
//!   only holds the codes this version defines.
//! - **No I/O.** Nothing here touches a socket; the codec works on `BytesMut`.
//! - **No panics on input.** Every read is bounds-checked; allocation is bounded
//!   by the frame limit, never by a length field read off the wire.

mod body_error;
mod codec;
#[cfg(test)]
mod codec_tests;
mod constants;
#[cfg(test)]
mod golden;
mod header;
mod message;
pub mod name;
mod opcode;
mod rotation;
mod status;
pub mod text;
mod wire;

pub use body_error::BodyError;
pub use codec::{ClastorCodec, Frame, FrameError, split_frame};
pub use constants::{
    DEFAULT_MAX_FRAME_LEN, EVENT_REQUEST_ID, HEADER_LEN, HIGHEST_VERSION, LENGTH_PREFIX_LEN, MAX_FRAME_LEN_CEILING,
    MAX_TOKEN_LEN, MIN_FRAME_LEN, PROTOCOL_VERSION,
};
pub use header::{Flags, Header};
pub use message::{
    Acquire, AcquireOk, AuthToken, ErrorReply, Event, HeldLock, HeldScope, Hello, HelloOk, KindLayout, KindMode,
    LockMode, LostReason, MAX_MESSAGE_LEN, Request, Response, ResponseBody, VersionInfo,
};
pub use opcode::Opcode;
pub use rotation::{
    DrainState, MAX_PROGRESS_HOLDERS, Rotate, RotateOk, RotationHolder, RotationPhase, RotationProgress,
};
pub use status::Status;
