//! The client's one error type, and why a held lock was lost.
//!
//! [`Error`] is `Clone` so one failure (a dropped connection) can be handed to
//! every caller that was waiting on it. Server statuses map onto it through a
//! single exhaustive `match` ([`Error::from_status`]), so a new status code
//! cannot be added to the protocol without deciding what the client makes of it.

use std::fmt;
use std::time::Duration;

use clastor_protocol::{BodyError, ErrorReply, Status};

/// Everything a client call can fail with.
///
/// Contention is not an error: an acquire that does not get the lock within
/// its wait returns `Ok(None)`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    // ----- statuses sent by the server -----
    /// `TIMEOUT` where the caller could not turn it into "not acquired".
    #[error("timed out: {0}")]
    Timeout(String),
    /// `NOT_HELD`: the lock is not held by this connection (e.g. renewing a
    /// lock whose lease already ran out).
    #[error("lock not held: {0}")]
    NotHeld(String),
    /// `NOT_OWNER`: another owner holds the lock.
    #[error("lock held by another owner: {0}")]
    NotOwner(String),
    /// `ALREADY_HELD`: this connection already holds, or already waits for,
    /// this lock.
    #[error("lock already held or waited for on this connection: {0}")]
    AlreadyHeld(String),
    /// `ROTATION_REFUSED`: a rotation was not started (the kind is not at
    /// `from`, or another rotation of it runs or was left half-done).
    #[error("rotation refused: {0}")]
    RotationRefused(String),
    /// `ROTATION_ABORTED`: a rotation gave up (drain timeout, or aborted); the
    /// kind is normal on `from`.
    #[error("rotation aborted: {0}")]
    RotationAborted(String),
    /// `BAD_REQUEST`: the server could not decode the request.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// `INVALID_NAME`: a kind or id breaks the naming rules (also raised
    /// client-side, before anything is sent).
    #[error("invalid name: {0}")]
    InvalidName(String),
    /// `UNKNOWN_OPCODE`: the server does not know the operation.
    #[error("unknown opcode: {0}")]
    UnknownOpcode(String),
    /// `UNSUPPORTED`: understood but not supported by this server or backend.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// `HANDSHAKE_REQUIRED`: a request arrived before the handshake (a client bug).
    #[error("handshake required: {0}")]
    HandshakeRequired(String),
    /// `VERSION_MISMATCH`: no protocol version both sides speak.
    #[error("protocol version mismatch: {0}")]
    VersionMismatch(String),
    /// `LIMIT_EXCEEDED`: a per-connection or per-server limit was reached.
    #[error("limit exceeded: {0}")]
    LimitExceeded(String),
    /// `PROTOCOL_ERROR`: the server could not parse a frame this client sent.
    #[error("server rejected a frame: {0}")]
    ProtocolError(String),
    /// `UNAUTHENTICATED`: the server requires authentication and this
    /// connection has none (no token configured, or the token was refused:
    /// [`ClientBuilder::token`](crate::ClientBuilder::token)).
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// `FORBIDDEN`: the authenticated principal lacks the permission (the
    /// server's auth file grants it per kind).
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// `UNAVAILABLE`: the server's backend cannot serve the request; retry later.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// `SHUTTING_DOWN`: the server is shutting down.
    #[error("server shutting down: {0}")]
    ShuttingDown(String),
    /// `INTERNAL`: a bug or unexpected state on the server.
    #[error("internal server error: {0}")]
    Internal(String),

    // ----- raised by the client -----
    /// No connection could be made (or none came back within the connect
    /// timeout after a loss).
    #[error("cannot connect to {addr}: {message}")]
    Connect {
        /// The server address as given.
        addr: String,
        /// What went wrong.
        message: String,
    },
    /// The connection broke while the request was pending, or broke before it
    /// could be sent. Locks held through it are gone; the client reconnects
    /// for new calls.
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    /// The server sent something this client cannot make sense of. If the
    /// frame itself was broken, or the reply contradicts the client's state (a
    /// reply to a request never sent, the wrong opcode), the connection is
    /// closed and every call on it fails with this. A reply whose body does not
    /// decode fails only its own request; the connection lives on.
    #[error("malformed reply from the server: {0}")]
    Malformed(String),
    /// The server answered with a status code this client does not know
    /// (a newer server). Not retryable; the connection lives on.
    #[error("unknown status {code} from the server: {message}")]
    UnknownStatus {
        /// The status code.
        code: u16,
        /// The server's message.
        message: String,
    },
    /// An argument was refused before anything was sent (a duration too long
    /// for the wire, a `HELLO` passed to [`Client::request`](crate::Client::request)).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The lock was lost before the operation (release, renew) could be done.
    #[error("lock lost: {0}")]
    LockLost(LostReason),
    /// No reply within the client's request timeout
    /// ([`ClientBuilder::request_timeout`](crate::ClientBuilder::request_timeout)).
    #[error("no reply within {0:?}")]
    RequestTimeout(Duration),
    /// The client was shut down.
    #[error("client closed")]
    Closed,
}

impl Error {
    /// The error for a status the server sent, with its message.
    ///
    /// `Status::Ok` is not an error; receiving it where an error was expected
    /// is a malformed reply.
    pub fn from_status(status: Status, message: impl Into<String>) -> Error {
        let m = message.into();
        match status {
            Status::Ok => Error::Malformed(format!("status OK where an error was expected: {m}")),
            Status::Timeout => Error::Timeout(m),
            Status::NotHeld => Error::NotHeld(m),
            Status::NotOwner => Error::NotOwner(m),
            Status::AlreadyHeld => Error::AlreadyHeld(m),
            Status::RotationRefused => Error::RotationRefused(m),
            Status::RotationAborted => Error::RotationAborted(m),
            Status::BadRequest => Error::BadRequest(m),
            Status::InvalidName => Error::InvalidName(m),
            Status::UnknownOpcode => Error::UnknownOpcode(m),
            Status::Unsupported => Error::Unsupported(m),
            Status::HandshakeRequired => Error::HandshakeRequired(m),
            Status::VersionMismatch => Error::VersionMismatch(m),
            Status::LimitExceeded => Error::LimitExceeded(m),
            Status::ProtocolError => Error::ProtocolError(m),
            Status::Unauthenticated => Error::Unauthenticated(m),
            Status::Forbidden => Error::Forbidden(m),
            Status::Unavailable => Error::Unavailable(m),
            Status::ShuttingDown => Error::ShuttingDown(m),
            Status::Internal => Error::Internal(m),
        }
    }

    /// The server status this error carries, if it came from the server.
    pub fn status(&self) -> Option<Status> {
        Some(match self {
            Error::Timeout(_) => Status::Timeout,
            Error::NotHeld(_) => Status::NotHeld,
            Error::NotOwner(_) => Status::NotOwner,
            Error::AlreadyHeld(_) => Status::AlreadyHeld,
            Error::RotationRefused(_) => Status::RotationRefused,
            Error::RotationAborted(_) => Status::RotationAborted,
            Error::BadRequest(_) => Status::BadRequest,
            Error::InvalidName(_) => Status::InvalidName,
            Error::UnknownOpcode(_) => Status::UnknownOpcode,
            Error::Unsupported(_) => Status::Unsupported,
            Error::HandshakeRequired(_) => Status::HandshakeRequired,
            Error::VersionMismatch(_) => Status::VersionMismatch,
            Error::LimitExceeded(_) => Status::LimitExceeded,
            Error::ProtocolError(_) => Status::ProtocolError,
            Error::Unauthenticated(_) => Status::Unauthenticated,
            Error::Forbidden(_) => Status::Forbidden,
            Error::Unavailable(_) => Status::Unavailable,
            Error::ShuttingDown(_) => Status::ShuttingDown,
            Error::Internal(_) => Status::Internal,
            Error::Connect { .. }
            | Error::ConnectionLost(_)
            | Error::Malformed(_)
            | Error::UnknownStatus { .. }
            | Error::InvalidArgument(_)
            | Error::LockLost(_)
            | Error::RequestTimeout(_)
            | Error::Closed => return None,
        })
    }

    /// Whether the same call may succeed if retried later (possibly on a new
    /// connection). A lost lock is not retryable: it must be acquired again.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Connect { .. } | Error::ConnectionLost(_) | Error::RequestTimeout(_) | Error::ShuttingDown(_) => {
                true
            }
            other => other.status().is_some_and(Status::is_retryable),
        }
    }

    /// Whether the error means the connection (and every lock held through it)
    /// is, or may be, gone. [`Error::Malformed`] counts: when it fails a single
    /// request the connection lives, but the request's effect is unknown.
    pub fn is_connection_error(&self) -> bool {
        matches!(
            self,
            Error::Connect { .. } | Error::ConnectionLost(_) | Error::Malformed(_)
        )
    }

    /// The error for a reply body the protocol crate could not decode, with
    /// `context` saying which reply: a status this client does not know keeps
    /// its code and message ([`Error::UnknownStatus`]); anything else is
    /// [`Error::Malformed`].
    pub(crate) fn from_body_error(e: BodyError, context: impl fmt::Display) -> Error {
        match e {
            BodyError::UnknownStatus { code, message } => Error::UnknownStatus { code, message },
            other => Error::Malformed(format!("{context}: {other}")),
        }
    }
}

impl From<Status> for Error {
    /// The error for a bare status, its name standing in for the message.
    fn from(status: Status) -> Error {
        Error::from_status(status, status.name())
    }
}

impl From<ErrorReply> for Error {
    fn from(reply: ErrorReply) -> Error {
        Error::from_status(reply.status, reply.message)
    }
}

/// Why a held lock was lost. Reported by [`LockGuard::lost`](crate::LockGuard::lost).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LostReason {
    /// The lease ran out without a renewal.
    LeaseExpired,
    /// The server's backend session that held the lock expired.
    SessionExpired,
    /// The server lost its backend for long enough that it can no longer
    /// guarantee the grant.
    BackendUnreachable,
    /// The server is shutting down and released the lock.
    ServerShutdown,
    /// The backend reported the lock gone for another reason.
    BackendError,
    /// The lock's record in the backend was deleted from outside Clastor (an
    /// operator removed the ZooKeeper lock node).
    NodeDeleted,
    /// The server reported a reason this client version does not know, or
    /// said the lock was not held without saying why.
    Unknown,
    /// The connection the lock was held through broke; the server releases a
    /// connection's locks when it goes away.
    ConnectionLost,
    /// Automatic renewal failed (the message says how), so the lease can no
    /// longer be trusted; the client released the lock.
    RenewFailed(String),
    /// [`Client::release_all`](crate::Client::release_all) gave it back.
    ReleasedAll,
}

impl From<clastor_protocol::LostReason> for LostReason {
    fn from(r: clastor_protocol::LostReason) -> LostReason {
        use clastor_protocol::LostReason as P;
        match r {
            P::Unknown => LostReason::Unknown,
            P::LeaseExpired => LostReason::LeaseExpired,
            P::SessionExpired => LostReason::SessionExpired,
            P::BackendUnreachable => LostReason::BackendUnreachable,
            P::ServerShutdown => LostReason::ServerShutdown,
            P::BackendError => LostReason::BackendError,
            P::NodeDeleted => LostReason::NodeDeleted,
        }
    }
}

impl fmt::Display for LostReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LostReason::LeaseExpired => f.write_str("lease expired"),
            LostReason::SessionExpired => f.write_str("backend session expired"),
            LostReason::BackendUnreachable => f.write_str("backend unreachable"),
            LostReason::ServerShutdown => f.write_str("server shutting down"),
            LostReason::BackendError => f.write_str("backend error"),
            LostReason::NodeDeleted => f.write_str("lock node deleted from outside"),
            LostReason::Unknown => f.write_str("unknown reason"),
            LostReason::ConnectionLost => f.write_str("connection to the server lost"),
            LostReason::RenewFailed(m) => write!(f, "lease renewal failed: {m}"),
            LostReason::ReleasedAll => f.write_str("released by release_all"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_maps_and_round_trips() {
        for status in Status::ALL {
            let e = Error::from(status);
            if status == Status::Ok {
                assert!(matches!(e, Error::Malformed(_)));
                assert_eq!(e.status(), None);
            } else {
                assert_eq!(e.status(), Some(status), "{status}");
            }
        }
    }

    #[test]
    fn retryable_and_connection_classes() {
        assert!(Error::ConnectionLost("x".into()).is_retryable());
        assert!(Error::ConnectionLost("x".into()).is_connection_error());
        assert!(Error::Unavailable("x".into()).is_retryable());
        assert!(!Error::NotOwner("x".into()).is_retryable());
        assert!(!Error::LockLost(LostReason::LeaseExpired).is_retryable());
    }

    #[test]
    fn an_unknown_status_keeps_code_and_message_and_is_not_retryable() {
        let e = Error::from_body_error(
            BodyError::UnknownStatus {
                code: 999,
                message: "new".into(),
            },
            "reply",
        );
        assert_eq!(
            e,
            Error::UnknownStatus {
                code: 999,
                message: "new".into()
            }
        );
        assert!(!e.is_retryable());
        assert!(!e.is_connection_error());
        assert_eq!(e.status(), None);
        let e = Error::from_body_error(BodyError::TrailingBytes { len: 1 }, "reply to PING request 2");
        assert_eq!(
            e,
            Error::Malformed("reply to PING request 2: 1 unexpected trailing byte(s) after the body".into())
        );
    }

    #[test]
    fn reply_message_is_kept() {
        let e = Error::from(ErrorReply {
            status: Status::InvalidName,
            message: "id is empty".into(),
        });
        assert_eq!(e, Error::InvalidName("id is empty".into()));
        assert_eq!(e.to_string(), "invalid name: id is empty");
    }
}
