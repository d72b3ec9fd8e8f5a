//! Engine errors, and their single mapping to wire status codes.

use clastor_protocol::name::NameError;
use clastor_protocol::{LostReason, Status};
use thiserror::Error;

use crate::backend::BackendError;
use crate::key::LockKey;

/// Why a lock operation failed. Contention is not an error: an acquire that
/// does not get the lock in time returns `Ok(None)`.
#[derive(Debug, Clone, Error)]
#[non_exhaustive]
pub enum LockError {
    /// A kind or id breaks the naming rules.
    #[error("invalid name: {0}")]
    InvalidName(#[from] NameError),
    /// This session already holds, or is already waiting for, the lock.
    #[error("{0} is already held or awaited by this session")]
    AlreadyHeld(LockKey),
    /// `renew` of a lock this session does not hold.
    #[error("{0} is not held by this session")]
    NotHeld(LockKey),
    /// `release` of a lock held by another owner.
    #[error("{0} is held by another owner")]
    NotOwner(LockKey),
    /// A per-session limit was reached.
    #[error("limit exceeded: {0}")]
    LimitExceeded(String),
    /// An argument is out of range (e.g. a zero lease on renew).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The session was closed (connection gone, server shutting down).
    #[error("session is closed")]
    SessionClosed,
    /// The backend lost the grant before the acquire could complete.
    #[error("lock lost while being acquired ({})", .0.name())]
    LostDuringAcquire(LostReason),
    /// A rotation was not started (the message says why; the status names
    /// the outcome).
    #[error("{0}")]
    RotationRefused(String),
    /// A rotation gave up; the kind is normal on its old version.
    #[error("{0}")]
    RotationAborted(String),
    /// The backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

impl LockError {
    /// The status code that reports this error on the wire.
    pub fn status(&self) -> Status {
        match self {
            LockError::InvalidName(_) => Status::InvalidName,
            LockError::AlreadyHeld(_) => Status::AlreadyHeld,
            LockError::NotHeld(_) => Status::NotHeld,
            LockError::NotOwner(_) => Status::NotOwner,
            LockError::LimitExceeded(_) => Status::LimitExceeded,
            LockError::InvalidArgument(_) => Status::BadRequest,
            LockError::SessionClosed => Status::ShuttingDown,
            LockError::LostDuringAcquire(_) => Status::Unavailable,
            LockError::RotationRefused(_) => Status::RotationRefused,
            LockError::RotationAborted(_) => Status::RotationAborted,
            LockError::Backend(e) => e.status(),
        }
    }
}
