//! Lease renewal: one renewal's call and how its reply changes the grant,
//! and the background task that renews every third of the lease for
//! [`LockRequest::auto_renew`](crate::LockRequest::auto_renew).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clastor_protocol::{Request, ResponseBody, Status};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::millis::lease_millis_or_max;
use crate::conn::{Conn, HeldGrant, HeldUpdate, Reply};
use crate::error::{Error, LostReason};
use crate::reply::{body, unexpected};

/// Sends a renewal and waits for its reply, bounded by `limit`.
pub(super) async fn renew_call(conn: &Conn, req: &Request, deadline: Option<Instant>) -> Result<Reply, Error> {
    match deadline {
        None => conn.call(req, HeldUpdate::None).await,
        Some(deadline) => {
            let limit = deadline.saturating_duration_since(Instant::now());
            tokio::time::timeout_at(deadline, conn.call(req, HeldUpdate::None))
                .await
                .unwrap_or(Err(Error::RequestTimeout(limit)))
        }
    }
}

/// Records a renewal's outcome on the lock.
pub(super) fn apply_renewal(
    conn: &Conn,
    lock: &HeldGrant,
    sent: Instant,
    result: Result<ResponseBody, Error>,
) -> Result<(), Error> {
    match result {
        Ok(ResponseBody::Renewed {
            token,
            lease_ms,
            safe_ms,
        }) if token == lock.token => {
            lock.lease_ms.store(lease_ms, Ordering::Relaxed);
            if let Some(safe_ms) = safe_ms {
                lock.renewed(sent, safe_ms, lease_ms);
            }
            Ok(())
        }
        // The renewal names its grant's token, so a server answering for
        // another grant is broken.
        Ok(ResponseBody::Renewed { token, .. }) => Err(Error::Malformed(format!(
            "renewal of {} answered with token {token}, the grant has {}",
            lock.key, lock.token
        ))),
        Ok(other) => Err(unexpected(&other)),
        // This grant is gone on the server (a newer grant of the key, if any,
        // is untouched: it has another token).
        Err(e) if e.status() == Some(Status::NotHeld) => {
            lock.mark_lost(LostReason::Unknown);
            conn.forget(lock);
            Err(Error::LockLost(lock.lost_reason().unwrap_or(LostReason::Unknown)))
        }
        Err(e) => Err(e),
    }
}

/// Renews `lock` every third of its lease until stopped or lost. A renewal
/// that fails for good, or cannot succeed before the lease runs out, marks the
/// lock lost and releases it, so the holder never believes in a lease the
/// server may already have ended.
pub(super) async fn renew_loop(
    request_timeout: Option<Duration>,
    conn: Conn,
    lock: Arc<HeldGrant>,
    lease: Duration,
    sent_at: Instant,
    stop: CancellationToken,
) {
    let period = (lease / 3).max(Duration::from_millis(1));
    let received = lock.received.max(sent_at);
    // The server started the lease between sending the ACQUIRE and receiving
    // the grant. After a quick grant, count from the send (the safe end).
    // After a queue wait, the send says nothing (the lease may have started
    // long after it, a count from it could even be past), so count from the
    // receipt and renew at once, which re-anchors the lease on the renewal's
    // own send time.
    let (mut expires, mut next) = if received.saturating_duration_since(sent_at) < period {
        (later(sent_at, lease), later(sent_at, period))
    } else {
        (later(received, lease), received)
    };
    let mut lost = lock.lost.subscribe();
    let req = Request::Renew {
        kind: lock.kind().to_owned(),
        id: lock.id().to_owned(),
        lease_ms: lease_millis_or_max(lease),
        token: lock.token,
    };
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = lost.wait_for(Option::is_some) => return,
            () = tokio::time::sleep_until(next) => {}
        }
        let sent = Instant::now();
        let limit = request_timeout.map_or(expires, |t| expires.min(later(sent, t)));
        let result = renew_call(&conn, &req, Some(limit))
            .await
            .and_then(|reply| apply_renewal(&conn, &lock, sent, body(reply)));
        let error = match result {
            Ok(()) => {
                expires = later(sent, lease);
                next = later(sent, period);
                continue;
            }
            Err(e) => e,
        };
        if lock.lost_reason().is_some() {
            return;
        }
        let retry_at = later(Instant::now(), period / 4);
        if error.is_retryable() && !error.is_connection_error() && retry_at < expires {
            tracing::debug!(key = %lock.key, %error, "lease renewal failed; retrying");
            next = retry_at;
            continue;
        }
        tracing::warn!(key = %lock.key, token = lock.token, %error, "lease renewal failed; lock lost");
        if lock.mark_lost(LostReason::RenewFailed(error.to_string())) {
            conn.release_in_background(&lock);
        }
        return;
    }
}

/// `t + d`, saturating far in the future instead of panicking on a huge
/// (configured) duration.
fn later(t: Instant, d: Duration) -> Instant {
    t.checked_add(d)
        .or_else(|| t.checked_add(Duration::from_secs(100 * 365 * 86_400)))
        .unwrap_or(t)
}
