//! The one mapping from Clastor's status codes to gRPC's. Every error a
//! gRPC caller sees goes through here, with the Clastor status name in the
//! `clastor-status` metadata (unary) or `Error.status` (stream).
//!
//! `TIMEOUT` never reaches here from an acquire: not being granted is an
//! outcome (`granted = false`), as on the binary protocol.

use clastor_protocol::{ErrorReply, Status};
use tonic::Code;
use tonic::metadata::MetadataValue;

use super::proto;

/// The response metadata key naming the Clastor status of a failed call.
pub(super) const STATUS_KEY: &str = "clastor-status";

/// The gRPC code for a Clastor status.
pub(super) fn code(status: Status) -> Code {
    match status {
        Status::Ok => Code::Ok,
        Status::Timeout => Code::DeadlineExceeded,
        Status::NotHeld | Status::RotationRefused | Status::Unsupported => Code::FailedPrecondition,
        Status::NotOwner | Status::Forbidden => Code::PermissionDenied,
        Status::Unauthenticated => Code::Unauthenticated,
        Status::AlreadyHeld => Code::AlreadyExists,
        Status::RotationAborted => Code::Aborted,
        Status::BadRequest
        | Status::InvalidName
        | Status::HandshakeRequired
        | Status::VersionMismatch
        | Status::ProtocolError => Code::InvalidArgument,
        Status::UnknownOpcode => Code::Unimplemented,
        Status::LimitExceeded => Code::ResourceExhausted,
        Status::Unavailable | Status::ShuttingDown => Code::Unavailable,
        Status::Internal => Code::Internal,
    }
}

/// A failed unary call: the gRPC code, the message prefixed with the
/// Clastor status name, and that name in the metadata.
pub(super) fn to_status(e: ErrorReply) -> tonic::Status {
    let mut s = tonic::Status::new(code(e.status), format!("{}: {}", e.status.name(), e.message));
    s.metadata_mut()
        .insert(STATUS_KEY, MetadataValue::from_static(e.status.name()));
    s
}

/// A failed request on the stream.
pub(super) fn to_error(e: ErrorReply) -> proto::Error {
    proto::Error {
        status: e.status.name().to_owned(),
        code: u32::from(e.status as u16),
        message: e.message,
    }
}

/// `NOT_FOUND` for a unary call naming a session that does not exist (never
/// opened, closed, or expired).
pub(super) fn no_session(id: u64) -> tonic::Status {
    tonic::Status::not_found(format!(
        "no session {id} (never opened, closed, or expired after its idle time)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_maps_and_names_itself() {
        for status in Status::ALL {
            let s = to_status(ErrorReply {
                status,
                message: "m".into(),
            });
            assert_eq!(s.code(), code(status));
            assert_eq!(
                s.metadata().get(STATUS_KEY).and_then(|v| v.to_str().ok()),
                Some(status.name())
            );
            assert!(s.message().starts_with(status.name()), "{}", s.message());
        }
        assert_eq!(code(Status::LimitExceeded), Code::ResourceExhausted);
        assert_eq!(code(Status::ShuttingDown), Code::Unavailable);
        assert_eq!(code(Status::InvalidName), Code::InvalidArgument);
    }
}
