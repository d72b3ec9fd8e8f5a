//! What a Redis error means, and the one retry policy of idempotent requests.
//!
//! **Retry policy.** A request that is safe to send twice (a read, a
//! session refresh, a script that removes our own contender, a conditional
//! write whose check makes a second success impossible) is retried after a
//! connection failure or a timeout, at most [`MAX_ATTEMPTS`] times in all,
//! with a short back-off, each attempt bounded by [`REQUEST_TIMEOUT`]: the
//! connection manager reconnects underneath. Anything else — an error
//! Redis answered (a script error, a wrong type) — is returned at once. The
//! acquire script is never re-sent ([`once`]): it increments the token
//! counter and queues a contender, and a lost answer leaves that contender
//! to its `PendingKey`, which removes it.

use std::future::Future;
use std::time::Duration;

use crate::backend::BackendError;
use crate::backoff::Backoff;

/// How many times one request is sent before its error is returned.
pub(super) const MAX_ATTEMPTS: u32 = 5;

/// How long one attempt may take. Redis answers in microseconds when it
/// answers at all; longer is a frozen or cut-off server, and the session's
/// contact deadline, not this, decides what holders are told.
pub(super) const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Pauses between two attempts: 25 ms, doubled each time, at most 400 ms.
const BACKOFF: Backoff = Backoff::new(Duration::from_millis(25), Duration::from_millis(400));

/// Whether a failed request may have failed for a passing reason (no
/// connection, a timeout, a Redis still loading its data), so the same
/// request may succeed.
pub(super) fn transient(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
        || matches!(e.code(), Some("LOADING" | "BUSY" | "TRYAGAIN" | "MASTERDOWN"))
}

/// A Redis error as a backend error, saying what was being done.
pub(super) fn backend_error(what: &str, e: &redis::RedisError) -> BackendError {
    if transient(e) {
        BackendError::Unavailable(format!("redis: {what}: {e}"))
    } else {
        BackendError::Internal(format!("redis: {what}: {e}"))
    }
}

/// Runs `op` under the retry policy (module docs). `what` names the request
/// in the error.
///
/// # Errors
/// The last attempt's error, as a [`BackendError`].
pub(super) async fn retry<T, F, Fut>(what: &str, mut op: F) -> Result<T, BackendError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = redis::RedisResult<T>>,
{
    let mut backoff = BACKOFF;
    let mut attempt = 1;
    loop {
        let error = match tokio::time::timeout(REQUEST_TIMEOUT, op()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) if transient(&e) && attempt < MAX_ATTEMPTS => e.to_string(),
            Ok(Err(e)) => return Err(backend_error(what, &e)),
            Err(_) if attempt < MAX_ATTEMPTS => format!("no answer within {REQUEST_TIMEOUT:?}"),
            Err(_) => {
                return Err(BackendError::Unavailable(format!(
                    "redis: {what}: no answer within {REQUEST_TIMEOUT:?}, {MAX_ATTEMPTS} times"
                )));
            }
        };
        tracing::debug!(what, attempt, %error, "redis request failed; retrying");
        backoff.sleep().await;
        attempt += 1;
    }
}

/// Runs `op` once, bounded by [`REQUEST_TIMEOUT`], for requests that must
/// not be blindly re-sent.
///
/// # Errors
/// Its error, or `Unavailable` on timeout.
pub(super) async fn once<T, Fut>(what: &str, op: Fut) -> Result<T, BackendError>
where
    Fut: Future<Output = redis::RedisResult<T>>,
{
    match tokio::time::timeout(REQUEST_TIMEOUT, op).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(backend_error(what, &e)),
        Err(_) => Err(BackendError::Unavailable(format!(
            "redis: {what}: no answer within {REQUEST_TIMEOUT:?}"
        ))),
    }
}
