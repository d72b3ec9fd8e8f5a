//! The confirm task (protocol version 2): `CONFIRM`s that keep the
//! safe-until of every lock held through the connection fresh.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clastor_protocol::{Request, ResponseBody};
use tokio::sync::oneshot;

use super::connection::Connection;
use super::grant::HeldGrant;
use super::pending::{HeldUpdate, Reply};

/// Most `CONFIRM`s a connection leaves unanswered before it stops sending more.
const MAX_CONFIRMS_OUT: usize = 4;

/// Keeps the safe-until of every lock held through this connection fresh
/// (protocol version 2): a `CONFIRM` every `interval` while locks are held,
/// pipelined with whatever else is in flight and never skipped. Its reply
/// moves forward the safe-until of each grant received before it was sent
/// (a later grant may postdate the server's answer). A reply that does not
/// come only lets the safe-until run out: the guards fall into jeopardy,
/// which is the point.
pub(super) async fn confirm_loop(shared: Arc<Connection>, interval: Duration) {
    loop {
        tokio::select! {
            () = shared.closed.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
            () = shared.confirm_now.notified() => {}
        }
        if shared.state().held.is_empty() {
            continue;
        }
        // A server that answers nothing must not make us pile up requests:
        // the safe-until simply runs out.
        if shared.confirms_out.load(Ordering::Relaxed) >= MAX_CONFIRMS_OUT {
            continue;
        }
        shared.confirms_out.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let sent = tokio::time::Instant::now();
        if shared
            .submit(&Request::Confirm, Some(tx), HeldUpdate::None, None)
            .is_err()
        {
            return;
        }
        let shared = shared.clone();
        // Await the reply beside the next ticks: a slow reply must not delay
        // the next CONFIRM.
        tokio::spawn(async move {
            let reply = tokio::select! {
                () = shared.closed.cancelled() => return,
                reply = rx => reply,
            };
            shared.confirms_out.fetch_sub(1, Ordering::Relaxed);
            let Ok(Ok(Reply { response, .. })) = reply else { return };
            if let Ok(ResponseBody::Confirmed { safe_ms }) = response.result {
                let held: Vec<Arc<HeldGrant>> = shared.state().held.grants();
                for lock in held.iter().filter(|l| l.received < sent) {
                    lock.confirm(sent, safe_ms);
                }
            }
        });
    }
}
