//! The keepalive task: a `PING` when the connection has been quiet, and the
//! connection declared lost when it goes unanswered.

use std::sync::Arc;
use std::time::Duration;

use clastor_protocol::Request;
use tokio::sync::oneshot;

use super::connection::Connection;
use super::pending::HeldUpdate;
use crate::error::Error;

/// Pings when the connection has been quiet for `interval`, and declares it
/// lost if the ping is not answered within another `interval`: a peer that
/// vanished without a FIN would otherwise leave guards believing they hold
/// locks the server has long released.
pub(super) async fn keepalive_loop(shared: Arc<Connection>, interval: Duration) {
    loop {
        let quiet = shared.since_last_rx();
        let wait = interval.saturating_sub(quiet).max(Duration::from_millis(10));
        tokio::select! {
            () = shared.closed.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        if shared.since_last_rx() < interval {
            continue;
        }
        // Never skipped, not even with the server's in-flight limit full of
        // background releases: those finish in a backend round trip, and a
        // server that cannot answer a PING within `interval` cannot confirm
        // anything else either, so the holder must not go on trusting it.
        let (tx, rx) = oneshot::channel();
        if shared.submit(&Request::Ping, Some(tx), HeldUpdate::None, None).is_err() {
            return;
        }
        tokio::select! {
            () = shared.closed.cancelled() => return,
            reply = tokio::time::timeout(interval, rx) => {
                if reply.is_err() {
                    shared.fail(Error::ConnectionLost(format!("no reply to a keepalive PING within {interval:?}")));
                    return;
                }
            }
        }
    }
}
