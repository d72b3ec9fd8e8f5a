//! Status codes: the outcome of every request, one typed code per failure.

use std::fmt;

/// Outcome of a request, carried as a `u16` at the start of every response body.
///
/// Codes below 100 are outcomes a correct client meets in normal operation;
/// 100 and up mean the request was wrong; 200 and up mean the server or its
/// backend could not serve it.
#[repr(u16)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// Success.
    Ok = 0,
    /// The lock was not granted within the wait (also: try-once found it taken).
    Timeout = 1,
    /// `RENEW` of a lock this connection does not hold.
    NotHeld = 2,
    /// `RELEASE` of a lock another owner holds.
    NotOwner = 3,
    /// This connection already holds, or already waits for, this lock.
    AlreadyHeld = 4,
    /// `ROTATE` refused: the kind is not at `from`, or another rotation of it
    /// is in progress (or was left half-done with another target).
    RotationRefused = 5,
    /// `ROTATE` gave up: the drain did not finish within its timeout, or the
    /// rotation was aborted; the kind is back to normal on `from`.
    RotationAborted = 6,
    /// The body could not be decoded (short, trailing bytes, bad UTF-8, bad enum).
    BadRequest = 100,
    /// A kind or id breaks the naming rules.
    InvalidName = 101,
    /// The opcode is not one this server knows.
    UnknownOpcode = 102,
    /// Understood but not supported (e.g. shared mode, a lease on a backend without).
    Unsupported = 103,
    /// A request other than `HELLO` arrived before the handshake.
    HandshakeRequired = 104,
    /// No protocol version both sides speak.
    VersionMismatch = 105,
    /// A per-connection or per-server limit was reached.
    LimitExceeded = 106,
    /// A frame could not be parsed (fatal; sent in a `CLOSING` event).
    ProtocolError = 107,
    /// The server requires authentication and this connection has not
    /// authenticated (or an `AUTH` failed). Also `CLOSING`'s status after
    /// too many failed attempts.
    Unauthenticated = 108,
    /// The authenticated principal lacks the permission this request needs.
    Forbidden = 109,
    /// The backend cannot be reached or failed the operation; retry later.
    Unavailable = 200,
    /// The server is shutting down.
    ShuttingDown = 201,
    /// A bug or unexpected state on the server.
    Internal = 202,
}

impl Status {
    /// Every status, in wire order.
    pub const ALL: [Status; 20] = [
        Status::Ok,
        Status::Timeout,
        Status::NotHeld,
        Status::NotOwner,
        Status::AlreadyHeld,
        Status::RotationRefused,
        Status::RotationAborted,
        Status::BadRequest,
        Status::InvalidName,
        Status::UnknownOpcode,
        Status::Unsupported,
        Status::HandshakeRequired,
        Status::VersionMismatch,
        Status::LimitExceeded,
        Status::ProtocolError,
        Status::Unauthenticated,
        Status::Forbidden,
        Status::Unavailable,
        Status::ShuttingDown,
        Status::Internal,
    ];

    /// The upper-case name used in PROTOCOL.md and in text-mode `-ERR` lines.
    pub fn name(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::Timeout => "TIMEOUT",
            Status::NotHeld => "NOT_HELD",
            Status::NotOwner => "NOT_OWNER",
            Status::AlreadyHeld => "ALREADY_HELD",
            Status::RotationRefused => "ROTATION_REFUSED",
            Status::RotationAborted => "ROTATION_ABORTED",
            Status::BadRequest => "BAD_REQUEST",
            Status::InvalidName => "INVALID_NAME",
            Status::UnknownOpcode => "UNKNOWN_OPCODE",
            Status::Unsupported => "UNSUPPORTED",
            Status::HandshakeRequired => "HANDSHAKE_REQUIRED",
            Status::VersionMismatch => "VERSION_MISMATCH",
            Status::LimitExceeded => "LIMIT_EXCEEDED",
            Status::ProtocolError => "PROTOCOL_ERROR",
            Status::Unauthenticated => "UNAUTHENTICATED",
            Status::Forbidden => "FORBIDDEN",
            Status::Unavailable => "UNAVAILABLE",
            Status::ShuttingDown => "SHUTTING_DOWN",
            Status::Internal => "INTERNAL",
        }
    }

    /// Whether retrying the same request later may succeed.
    pub fn is_retryable(self) -> bool {
        matches!(self, Status::Timeout | Status::Unavailable | Status::LimitExceeded)
    }
}

impl TryFrom<u16> for Status {
    /// The unknown value.
    type Error = u16;

    fn try_from(v: u16) -> Result<Self, u16> {
        Status::ALL.into_iter().find(|s| *s as u16 == v).ok_or(v)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_unknown() {
        for s in Status::ALL {
            assert_eq!(Status::try_from(s as u16), Ok(s));
        }
        assert_eq!(Status::try_from(7), Err(7));
        assert_eq!(Status::try_from(u16::MAX), Err(u16::MAX));
    }
}
