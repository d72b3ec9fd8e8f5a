//! What an etcd error means, and the one retry policy of idempotent requests.
//!
//! **Retry policy.** A request that is safe to send twice (a read, a delete
//! of our own key, a conditional put whose compare makes a second success
//! impossible) is retried after a transport failure or an `Unavailable`
//! answer, at most [`MAX_ATTEMPTS`] times in all, with a short back-off,
//! each attempt bounded by [`REQUEST_TIMEOUT`]: the gRPC channel reconnects
//! (to another endpoint, when there are several) underneath. Anything else
//! is returned at once.

use std::future::Future;
use std::time::Duration;

use crate::backend::BackendError;
use crate::backoff::Backoff;

/// How many times one request is sent before its error is returned.
pub(super) const MAX_ATTEMPTS: u32 = 6;

/// How long one attempt may take: a leader election in a healthy cluster
/// takes about one election timeout (1 s by default).
pub(super) const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// Pauses between two attempts: 25 ms, doubled each time, at most 400 ms.
const BACKOFF: Backoff = Backoff::new(Duration::from_millis(25), Duration::from_millis(400));

/// Whether a failed request may have failed for a passing reason (no
/// connection, no leader yet, a timeout), so the same request may succeed.
pub(super) fn transient(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(s) => matches!(
            s.code(),
            tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Aborted
                | tonic::Code::Unknown
                | tonic::Code::Cancelled
                | tonic::Code::ResourceExhausted
        ),
        _ => false,
    }
}

/// An etcd error as a backend error, saying what was being done.
pub(super) fn backend_error(what: &str, e: &etcd_client::Error) -> BackendError {
    // A lease retired (revoked, expired) while a request with it was in
    // flight: the pool has another; the caller may retry.
    if transient(e) || e.to_string().contains("lease not found") {
        BackendError::Unavailable(format!("etcd: {what}: {e}"))
    } else {
        BackendError::Internal(format!("etcd: {what}: {e}"))
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
    Fut: Future<Output = Result<T, etcd_client::Error>>,
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
                    "etcd: {what}: no answer within {REQUEST_TIMEOUT:?}, {MAX_ATTEMPTS} times"
                )));
            }
        };
        tracing::debug!(what, attempt, %error, "etcd request failed; retrying");
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
    Fut: Future<Output = Result<T, etcd_client::Error>>,
{
    match tokio::time::timeout(REQUEST_TIMEOUT, op).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(backend_error(what, &e)),
        Err(_) => Err(BackendError::Unavailable(format!(
            "etcd: {what}: no answer within {REQUEST_TIMEOUT:?}"
        ))),
    }
}
