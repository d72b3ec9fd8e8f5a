//! What a PostgreSQL error means, and the one retry policy of idempotent
//! statements.
//!
//! **Retry policy** (carried out by `Pool::retry`, `pool.rs`). A statement that is safe to send twice (a read, the
//! release of our own row — keyed by our server and tag, so a second
//! delete finds nothing —, a conditional write whose condition makes a
//! second success impossible) is retried after a transient failure — the
//! connection closed or broken, the server shutting down or not accepting
//! connections yet, a serialisation failure or a deadlock —, at most
//! [`MAX_ATTEMPTS`] times in all, with a short back-off, each attempt
//! bounded by [`REQUEST_TIMEOUT`] and on a connection the pool hands out
//! afresh (a closed one is replaced). Anything else is returned at once.

use std::time::Duration;

use tokio_postgres::error::SqlState;

use crate::backend::BackendError;
use crate::backoff::Backoff;

/// How many times one statement is sent before its error is returned.
pub(super) const MAX_ATTEMPTS: u32 = 5;

/// How long one attempt may take.
pub(super) const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// Pauses between two attempts: 25 ms, doubled each time, at most 400 ms.
pub(super) const BACKOFF: Backoff = Backoff::new(Duration::from_millis(25), Duration::from_millis(400));

/// The SQLSTATE `acquire` raises when the calling server's row is not live.
pub(super) const NOT_LIVE: &str = "CLS01";

/// Whether a failed statement may have failed for a passing reason, so the
/// same statement may succeed on a (new) connection.
pub(super) fn transient(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        // No database answer at all: an I/O error, a timeout.
        None => true,
        Some(code) => {
            *code == SqlState::T_R_SERIALIZATION_FAILURE
                || *code == SqlState::T_R_DEADLOCK_DETECTED
                || *code == SqlState::ADMIN_SHUTDOWN
                || *code == SqlState::CRASH_SHUTDOWN
                || *code == SqlState::CANNOT_CONNECT_NOW
                || *code == SqlState::TOO_MANY_CONNECTIONS
                || code.code().starts_with("08")
        }
    }
}

/// A PostgreSQL error as a backend error, saying what was being done.
pub(super) fn backend_error(what: &str, e: &tokio_postgres::Error) -> BackendError {
    let detail = e
        .as_db_error()
        .map_or_else(|| e.to_string(), |db| db.message().to_owned());
    if transient(e) || e.code().is_some_and(|c| c.code() == NOT_LIVE) {
        BackendError::Unavailable(format!("PostgreSQL: {what}: {detail}"))
    } else {
        BackendError::Internal(format!("PostgreSQL: {what}: {detail}"))
    }
}
