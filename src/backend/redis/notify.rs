//! One pub/sub connection per backend, shared by every waiter: a channel is
//! subscribed while anyone waits on it, and one reader task turns each
//! message into a wake-up of that channel's waiters.
//!
//! A wake-up says "look again", and carries the message's payload: a
//! waiter that finds its own contender named there (`REMOVE` names the next
//! first contender, who stays first until removed) needs no look; any other
//! waiter reads the store, so a message lost, doubled, early or overwritten
//! by a later one costs a look, never a wrong grant. When the connection breaks (Redis restarted, cut off), every
//! channel is marked unsubscribed and every waiter woken; it subscribes
//! again (on the next connection) and looks. A frozen Redis sends nothing
//! and breaks nothing: waiters then rely on their own re-check timers and
//! on their session's contact deadline.
//!
//! Subscribing and unsubscribing go through one async lock on the sink, so
//! an `UNSUBSCRIBE` of a channel nobody wants any more can never overtake
//! the `SUBSCRIBE` of a waiter who just came for it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::StreamExt as _;
use redis::aio::PubSubSink;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::error;
use crate::backend::BackendError;
use crate::backoff::Backoff;

/// A channel's waiters.
#[derive(Debug)]
struct Route {
    refs: usize,
    /// Redis confirmed the subscription on the current connection.
    confirmed: bool,
    /// The last message's payload, sent on every message (`None` when the
    /// connection breaks).
    wake: watch::Sender<Option<Arc<str>>>,
}

/// The shared pub/sub connection.
#[derive(Debug)]
pub(super) struct Notify {
    client: redis::Client,
    /// The sink of the current connection (`None` while reconnecting).
    sink: tokio::sync::Mutex<Option<PubSubSink>>,
    /// Bumped whenever a connection is made.
    connected: watch::Sender<u64>,
    routes: Mutex<HashMap<String, Route>>,
    closed: CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A waiter's interest in one channel; dropping it unsubscribes once the
/// channel has no waiter left.
#[derive(Debug)]
pub(super) struct Subscription {
    hub: Arc<Notify>,
    channel: String,
    wake: watch::Receiver<Option<Arc<str>>>,
}

impl Subscription {
    /// Waits for the next wake-up (a message, or the connection broke), then
    /// makes sure the channel is subscribed again; returns the payload of
    /// the latest message (`None` after a break). Several messages between
    /// two calls are one wake-up, with the last one's payload.
    ///
    /// # Errors
    /// `Unavailable` if the channel cannot be subscribed again.
    ///
    /// # Cancellation safety
    /// Safe: a wake-up not yet seen stays pending.
    pub(super) async fn changed(&mut self) -> Result<Option<Arc<str>>, BackendError> {
        if self.wake.changed().await.is_err() {
            return Err(BackendError::Closed);
        }
        let payload = self.wake.borrow_and_update().clone();
        self.hub.ensure(&self.channel).await?;
        Ok(payload)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let last = {
            let mut routes = lock(&self.hub.routes);
            match routes.get_mut(&self.channel) {
                Some(r) => {
                    r.refs = r.refs.saturating_sub(1);
                    r.refs == 0
                }
                None => false,
            }
        };
        if last && let Ok(handle) = tokio::runtime::Handle::try_current() {
            let (hub, channel) = (self.hub.clone(), std::mem::take(&mut self.channel));
            handle.spawn(async move { hub.unsubscribe_if_unused(channel).await });
        }
    }
}

impl Notify {
    /// Starts the reader task; it connects (and reconnects) by itself.
    pub(super) fn start(client: redis::Client) -> Arc<Notify> {
        let hub = Arc::new(Notify {
            client,
            sink: tokio::sync::Mutex::new(None),
            connected: watch::Sender::new(0),
            routes: Mutex::new(HashMap::new()),
            closed: CancellationToken::new(),
        });
        let h = hub.clone();
        tokio::spawn(async move { h.run().await });
        hub
    }

    /// Subscribes to `channel` (at once if another waiter already has),
    /// returning once Redis confirmed it: every message published after
    /// this returns wakes the subscription.
    ///
    /// # Errors
    /// `Unavailable` if Redis cannot be reached.
    ///
    /// # Cancellation safety
    /// Safe: a subscription not returned is dropped, and unsubscribed if
    /// nobody else wants the channel.
    pub(super) async fn subscribe(self: &Arc<Self>, channel: &str) -> Result<Subscription, BackendError> {
        let wake = {
            let mut routes = lock(&self.routes);
            let route = routes.entry(channel.to_owned()).or_insert_with(|| Route {
                refs: 0,
                confirmed: false,
                wake: watch::Sender::new(None),
            });
            route.refs += 1;
            route.wake.subscribe()
        };
        let sub = Subscription {
            hub: self.clone(),
            channel: channel.to_owned(),
            wake,
        };
        self.ensure(channel).await?;
        Ok(sub)
    }

    /// Whether the channel's subscription is confirmed on this connection.
    fn confirmed(&self, channel: &str) -> bool {
        lock(&self.routes).get(channel).is_some_and(|r| r.confirmed)
    }

    /// Makes sure `channel` is subscribed on the current connection,
    /// waiting (bounded) for one if Redis is being reconnected to.
    async fn ensure(&self, channel: &str) -> Result<(), BackendError> {
        if self.confirmed(channel) {
            return Ok(());
        }
        let mut connected = self.connected.subscribe();
        let deadline = tokio::time::Instant::now() + error::REQUEST_TIMEOUT;
        loop {
            {
                let mut sink = self.sink.lock().await;
                if self.confirmed(channel) {
                    return Ok(());
                }
                if let Some(s) = sink.as_mut() {
                    return match tokio::time::timeout(error::REQUEST_TIMEOUT, s.subscribe(channel)).await {
                        Ok(Ok(())) => {
                            if let Some(r) = lock(&self.routes).get_mut(channel) {
                                r.confirmed = true;
                            }
                            Ok(())
                        }
                        Ok(Err(e)) => Err(error::backend_error("subscribe to a lock's channel", &e)),
                        Err(_) => Err(BackendError::Unavailable(format!(
                            "redis: subscribe to a lock's channel: no answer within {:?}",
                            error::REQUEST_TIMEOUT
                        ))),
                    };
                }
            }
            if self.closed.is_cancelled() {
                return Err(BackendError::Closed);
            }
            // No connection: wait for the next one.
            tokio::select! {
                r = connected.changed() => if r.is_err() { return Err(BackendError::Closed) },
                () = tokio::time::sleep_until(deadline) => {
                    return Err(BackendError::Unavailable("redis: no pub/sub connection (Redis unreachable?)".into()));
                }
            }
        }
    }

    /// Unsubscribes from `channel` if nobody has come for it meanwhile.
    async fn unsubscribe_if_unused(&self, channel: String) {
        let mut sink = self.sink.lock().await;
        let unused = {
            let mut routes = lock(&self.routes);
            let unused = routes.get(&channel).is_some_and(|r| r.refs == 0);
            if unused {
                routes.remove(&channel);
            }
            unused
        };
        if unused && let Some(s) = sink.as_mut() {
            // On failure the connection is broken, and the subscription with it.
            let _ = tokio::time::timeout(error::REQUEST_TIMEOUT, s.unsubscribe(&channel)).await;
        }
    }

    /// Stops the reader task and closes the connection.
    pub(super) fn shutdown(&self) {
        self.closed.cancel();
    }

    /// Connects, reads messages and wakes their channels; reconnects when
    /// the connection breaks, until shutdown.
    async fn run(&self) {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
        while !self.closed.is_cancelled() {
            let pubsub = tokio::select! {
                () = self.closed.cancelled() => return,
                r = tokio::time::timeout(error::REQUEST_TIMEOUT, self.client.get_async_pubsub()) => r,
            };
            let (sink, mut stream) = match pubsub {
                Ok(Ok(p)) => p.split(),
                Ok(Err(e)) => {
                    debug!(error = %e, "cannot open the Redis pub/sub connection; retrying");
                    if !backoff.wait(&self.closed).await {
                        return;
                    }
                    continue;
                }
                Err(_) => continue,
            };
            backoff.reset();
            *self.sink.lock().await = Some(sink);
            self.connected.send_modify(|n| *n += 1);
            info!("Redis pub/sub connection open");
            loop {
                let msg = tokio::select! {
                    () = self.closed.cancelled() => return,
                    msg = stream.next() => msg,
                };
                let Some(msg) = msg else { break };
                if let Some(route) = lock(&self.routes).get(msg.get_channel_name()) {
                    let payload = String::from_utf8_lossy(msg.get_payload_bytes());
                    route.wake.send_replace(Some(Arc::from(payload.as_ref())));
                }
            }
            warn!("Redis pub/sub connection lost; reconnecting");
            // Under the sink's lock, so no subscription is confirmed on the
            // dead connection after this.
            let mut sink = self.sink.lock().await;
            *sink = None;
            for route in lock(&self.routes).values_mut() {
                route.confirmed = false;
                route.wake.send_replace(None);
            }
        }
    }
}
