//! The per-message decode error: a frame whose header was sound but whose
//! body this version cannot turn into a message. A leaf, so the primitive
//! readers (`wire.rs`) and the message decoders (`message.rs`) both use it
//! without importing each other.

use thiserror::Error;

use crate::status::Status;

/// A frame whose header was sound but whose body could not be decoded. The
/// connection stays up: the server answers [`Status::BadRequest`] (or
/// [`Status::UnknownOpcode`]) with the frame's request id.
///
/// One variant is not malformed input: [`BodyError::UnknownStatus`] is a
/// well-formed error reply whose status code this version does not define
/// (a newer peer). It carries the code and the message so a receiver can keep
/// both (PROTOCOL.md §8).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum BodyError {
    /// The body ended inside a field.
    #[error("body truncated in field `{field}`")]
    Truncated {
        /// The field being read.
        field: &'static str,
    },
    /// Bytes were left after the last field.
    #[error("{len} unexpected trailing byte(s) after the body")]
    TrailingBytes {
        /// How many.
        len: usize,
    },
    /// A string field is not UTF-8.
    #[error("field `{field}` is not valid UTF-8")]
    NotUtf8 {
        /// The field.
        field: &'static str,
    },
    /// An enumerated field holds a value this version does not define.
    #[error("field `{field}` has unknown value {value}")]
    BadEnum {
        /// The field.
        field: &'static str,
        /// The value found.
        value: u32,
    },
    /// A field is longer than the protocol allows (an `AUTH` token past
    /// [`MAX_TOKEN_LEN`](crate::MAX_TOKEN_LEN)).
    #[error("field `{field}` is longer than {max} bytes")]
    TooLong {
        /// The field.
        field: &'static str,
        /// Its bound.
        max: usize,
    },
    /// The opcode is unknown, or not valid in this direction.
    #[error("unknown opcode 0x{0:02x}")]
    UnknownOpcode(u8),
    /// The header's flags do not fit the message kind.
    #[error("unexpected flags 0x{0:04x} for this message")]
    BadFlags(u16),
    /// A complete, well-formed error reply whose status code this version
    /// does not define. Not malformed: the reply answers its request, only
    /// its code is new. [`Status`] stays a closed enum of the codes this
    /// version knows, so the code travels here instead.
    #[error("unknown status {code}: {message}")]
    UnknownStatus {
        /// The status code as sent.
        code: u16,
        /// The reply's message.
        message: String,
    },
}

impl BodyError {
    /// The status an error reply to this body carries.
    pub fn status(&self) -> Status {
        match self {
            BodyError::UnknownOpcode(_) => Status::UnknownOpcode,
            _ => Status::BadRequest,
        }
    }

    /// Whether the body broke the wire format ([`BodyError::UnknownStatus`]
    /// is the one that did not).
    pub fn is_malformed(&self) -> bool {
        !matches!(self, BodyError::UnknownStatus { .. })
    }

    /// For an error from [`Response::decode`](crate::Response::decode):
    /// whether the response was recognisably an error reply (its status was
    /// read and is not `OK`: an unknown status, or a known one whose message
    /// is broken). A client uses it to tell a refused request from one that
    /// may have succeeded behind a broken body. Trailing bytes say nothing
    /// either way, so they count as not recognisable.
    pub fn is_error_reply(&self) -> bool {
        matches!(
            self,
            BodyError::UnknownStatus { .. }
                | BodyError::Truncated { field: "message" }
                | BodyError::NotUtf8 { field: "message" }
        )
    }
}
