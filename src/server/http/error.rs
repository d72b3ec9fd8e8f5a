//! Errors of the HTTP port as JSON `{"code","message"}`, with the lock
//! protocol's status names as codes and one mapping to HTTP statuses.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use clastor_protocol::Status;
use serde::Serialize;

use crate::error::LockError;

/// An error reply.
#[derive(Debug, Clone)]
pub(super) struct ApiError {
    http: StatusCode,
    code: &'static str,
    message: String,
}

#[derive(Serialize)]
struct Body<'a> {
    code: &'a str,
    message: &'a str,
}

impl ApiError {
    /// An error with a protocol status, at the HTTP status that status maps to.
    pub(super) fn status(status: Status, message: impl Into<String>) -> ApiError {
        ApiError {
            http: http_status(status),
            code: status.name(),
            message: message.into(),
        }
    }

    /// An error at an explicit HTTP status.
    pub(super) fn with_http(http: StatusCode, status: Status, message: impl Into<String>) -> ApiError {
        ApiError {
            http,
            code: status.name(),
            message: message.into(),
        }
    }

    /// The protocol status name it carries (`NOT_HELD`, ...).
    pub(super) fn code(&self) -> &'static str {
        self.code
    }

    /// The message.
    #[cfg(test)]
    pub(super) fn message(&self) -> &str {
        &self.message
    }

    /// `400 BAD_REQUEST`.
    pub(super) fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::status(Status::BadRequest, message)
    }
}

/// The one mapping from protocol statuses to HTTP statuses.
fn http_status(status: Status) -> StatusCode {
    match status {
        Status::Ok => StatusCode::OK,
        Status::Timeout
        | Status::AlreadyHeld
        | Status::NotHeld
        | Status::NotOwner
        | Status::RotationRefused
        | Status::RotationAborted => StatusCode::CONFLICT,
        Status::LimitExceeded => StatusCode::TOO_MANY_REQUESTS,
        Status::Unavailable | Status::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        Status::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        Status::UnknownOpcode => StatusCode::NOT_FOUND,
        Status::Unsupported => StatusCode::NOT_IMPLEMENTED,
        Status::Unauthenticated => StatusCode::UNAUTHORIZED,
        Status::Forbidden => StatusCode::FORBIDDEN,
        _ => StatusCode::BAD_REQUEST,
    }
}

impl From<LockError> for ApiError {
    fn from(e: LockError) -> ApiError {
        ApiError::status(e.status(), e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Body {
            code: self.code,
            message: &self.message,
        };
        (self.http, Json(body)).into_response()
    }
}
