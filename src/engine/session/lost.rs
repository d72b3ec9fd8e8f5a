//! Lost events: how a loss reaches the owner. A grant is lost when its lease
//! runs out (`lease.rs`) or the backend gives it up (the [`LostNotifier`]
//! handed to the backend with each acquire); either way it is removed from
//! the table and its [`LostEvent`] queued under the table lock, before the
//! backend is told to release, so the holder hears of the loss no later
//! than anyone else can be granted the lock.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use clastor_protocol::LostReason;
use tokio::sync::Notify;
use tracing::warn;

use super::{Session, SessionState};
use crate::backend::{Backend, LostNotifier};
use crate::engine::HoldEnd;
use crate::key::LockKey;

/// A lock the session no longer holds, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LostEvent {
    /// The lock.
    pub key: LockKey,
    /// The lost grant's token.
    pub token: u64,
    /// Why.
    pub reason: LostReason,
}

/// The stream of a session's lost-lock events.
///
/// Unbounded, but each event stands for a grant removed from the session's
/// table, so it grows only as fast as the owner acquires and loses locks.
#[derive(Debug)]
pub struct LostEvents {
    pub(super) queue: Arc<LostQueue>,
}

/// What a session and its [`LostEvents`] share. A queue that allocates only
/// when there is an event, unlike an mpsc channel, whose first block (32
/// slots, about 1.6 KiB here) every idle connection would otherwise carry.
#[derive(Debug, Default)]
pub(super) struct LostQueue {
    state: Mutex<LostQueueState>,
    ready: Notify,
}

#[derive(Debug, Default)]
struct LostQueueState {
    events: VecDeque<LostEvent>,
    /// The session is gone: nothing more will be queued.
    closed: bool,
    /// The receiver is gone: events are dropped, not queued.
    deaf: bool,
}

impl LostQueue {
    fn lock(&self) -> MutexGuard<'_, LostQueueState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn push(&self, ev: LostEvent) {
        {
            let mut q = self.lock();
            if q.deaf {
                return;
            }
            q.events.push_back(ev);
        }
        // Stores a permit if the receiver is not waiting yet: no lost wake-up.
        self.ready.notify_one();
    }

    pub(super) fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_one();
    }

    /// The next event, or `Err(closed)` when there is none.
    fn pop(&self) -> Result<LostEvent, bool> {
        let mut q = self.lock();
        match q.events.pop_front() {
            Some(ev) => {
                if q.events.is_empty() {
                    // Losses are rare: give the space back.
                    q.events = VecDeque::new();
                }
                Ok(ev)
            }
            None => Err(q.closed),
        }
    }
}

impl LostEvents {
    /// The next event; `None` once the session is gone and all were read.
    ///
    /// # Cancellation safety
    /// Cancel-safe: an event is never lost by dropping the future.
    pub async fn recv(&mut self) -> Option<LostEvent> {
        loop {
            match self.queue.pop() {
                Ok(ev) => return Some(ev),
                Err(true) => return None,
                Err(false) => self.queue.ready.notified().await,
            }
        }
    }

    /// An event if one is ready.
    pub fn try_recv(&mut self) -> Option<LostEvent> {
        self.queue.pop().ok()
    }
}

impl Drop for LostEvents {
    fn drop(&mut self) {
        let mut q = self.queue.lock();
        q.deaf = true;
        q.events.clear();
    }
}

impl<B: Backend> Session<B> {
    /// The backend's handle for telling this session that the grant
    /// `grant_id` on `key` is lost ([`SessionState::on_lost`]); it holds the
    /// session weakly.
    pub(super) fn notifier(&self, key: &LockKey, grant_id: u64) -> LostNotifier {
        let weak = Arc::downgrade(&self.state);
        let key = key.clone();
        LostNotifier::new(move |reason| {
            if let Some(s) = weak.upgrade() {
                s.on_lost(&key, grant_id, reason);
            }
        })
    }
}

impl<B: Backend> SessionState<B> {
    /// Counts a loss and queues its event for the owner.
    pub(super) fn report_lost(&self, key: &LockKey, token: u64, reason: LostReason) {
        self.engine.stats.lost.fetch_add(1, Ordering::Relaxed);
        // The receiver is gone only if the owner stopped listening, in which
        // case it is closing the session anyway.
        self.events.push(LostEvent {
            key: key.clone(),
            token,
            reason,
        });
    }

    /// Backend callback: the grant `grant_id` on `key` is lost.
    ///
    /// The loss is queued while the table lock is held, so whoever sees the
    /// lock gone from the table (a `CONFIRM` computing what it still covers)
    /// finds its event already in the channel, to be written first.
    fn on_lost(&self, key: &LockKey, grant_id: u64, reason: LostReason) {
        let removed = {
            let mut st = self.lock();
            if st.held.get(key).is_some_and(|h| h.grant_id == grant_id) {
                let held = st.held.remove(key);
                if let Some(h) = &held {
                    self.report_lost(key, h.token, reason);
                }
                held
            } else {
                if let Some(p) = st.pending.get_mut(key).filter(|p| p.grant_id == grant_id) {
                    p.lost = Some(reason);
                }
                None
            }
        };
        if let Some(held) = removed {
            self.observe_end(key, &held, HoldEnd::Lost(reason));
            warn!(session = self.id, %key, token = held.token, trace_id = held.trace_id.as_deref(), reason = reason.name(), "lock lost");
            // Dropping the guard asks the backend to clean up in the background.
            drop(held.disarm());
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn event(id: &str) -> LostEvent {
        LostEvent {
            key: LockKey::new("k", id).unwrap(),
            token: 1,
            reason: LostReason::LeaseExpired,
        }
    }

    #[tokio::test]
    async fn lost_events_arrive_in_order_then_end_with_the_session() {
        let queue = Arc::new(LostQueue::default());
        let mut rx = LostEvents { queue: queue.clone() };
        assert!(rx.try_recv().is_none());
        let waiting = tokio::spawn(async move {
            let first = rx.recv().await.unwrap();
            let second = rx.recv().await.unwrap();
            (
                first.key.id().to_owned(),
                second.key.id().to_owned(),
                rx.recv().await.is_none(),
            )
        });
        tokio::task::yield_now().await;
        queue.push(event("a"));
        queue.push(event("b"));
        queue.close();
        assert_eq!(waiting.await.unwrap(), ("a".into(), "b".into(), true));
    }

    #[test]
    fn an_idle_queue_holds_no_memory_and_a_deaf_one_queues_nothing() {
        let queue = Arc::new(LostQueue::default());
        let mut rx = LostEvents { queue: queue.clone() };
        queue.push(event("a"));
        assert!(rx.try_recv().is_some());
        assert_eq!(queue.lock().events.capacity(), 0, "space given back once drained");
        drop(rx);
        queue.push(event("b"));
        assert!(queue.lock().events.is_empty(), "nobody listens: nothing is kept");
    }
}
