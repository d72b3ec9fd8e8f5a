//! LISTEN/NOTIFY: one connection per backend listens on the schema's
//! channel, and wakes the waiters of each lock (or kind) a notification
//! names.
//!
//! Notifications only say "look again": a waiter decides from what it
//! reads, never from a payload, so a lost, late or spurious notification
//! costs time, not safety. Payloads are `L{kind}/{version}/{id}` (a
//! contender of that lock went and others are left: `release` and `reap`
//! send them) and `K{kind}` (the kind's record changed: `set_record`).
//! Names have no `/`, so a payload names one lock.
//!
//! A waiter subscribes before it looks, so a notification sent after its
//! look wakes it. When the listening connection breaks, notifications may
//! have been missed: every subscriber is woken once the connection is
//! back, and looks again. Waiters also look again on a timer of their own
//! (`recipe.rs`), the bound when the database is reachable but
//! notifications are not coming.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::StreamExt as _;
use tokio::sync::watch;
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::pool::{self, Target};
use crate::backend::BackendError;
use crate::backoff::Backoff;

/// The subscriptions, by payload.
#[derive(Debug)]
pub(super) struct Listener {
    subs: Mutex<HashMap<String, watch::Sender<u64>>>,
    /// Whether the listening connection is up (for health).
    up: watch::Sender<bool>,
    closed: CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One waiter's subscription; dropping it unsubscribes.
#[derive(Debug)]
pub(super) struct Subscription {
    listener: Arc<Listener>,
    topic: String,
    rx: watch::Receiver<u64>,
}

impl Subscription {
    /// Resolves at the next notification of the topic after the
    /// subscription was made (or after the last call).
    pub(super) async fn changed(&mut self) {
        if self.rx.changed().await.is_err() {
            // The listener is gone (shutdown): never again.
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut subs = lock(&self.listener.subs);
        // Ours is the last receiver: the topic goes.
        if subs.get(&self.topic).is_some_and(|tx| tx.receiver_count() <= 1) {
            subs.remove(&self.topic);
        }
    }
}

/// The topic of a lock's waiters.
pub(super) fn lock_topic(kind: &str, version: &str, id: &str) -> String {
    format!("L{kind}/{version}/{id}")
}

/// The topic of a kind's record.
pub(super) fn kind_topic(kind: &str) -> String {
    format!("K{kind}")
}

impl Listener {
    /// Connects, listens, and keeps listening (reconnecting) until
    /// [`Listener::close`].
    ///
    /// # Errors
    /// As `pool::open`, or `Unavailable` if `LISTEN` fails.
    pub(super) async fn start(target: Target) -> Result<Arc<Listener>, BackendError> {
        let listener = Arc::new(Listener {
            subs: Mutex::new(HashMap::new()),
            up: watch::Sender::new(false),
            closed: CancellationToken::new(),
        });
        let first = listen_once(&target, &listener).await?;
        let l = listener.clone();
        tokio::spawn(async move { l.run(target, first).await });
        Ok(listener)
    }

    /// Subscribes to `topic`.
    pub(super) fn subscribe(self: &Arc<Self>, topic: String) -> Subscription {
        let rx = lock(&self.subs)
            .entry(topic.clone())
            .or_insert_with(|| watch::Sender::new(0))
            .subscribe();
        Subscription {
            listener: self.clone(),
            topic,
            rx,
        }
    }

    /// Whether the listening connection is up.
    pub(super) fn is_up(&self) -> bool {
        *self.up.borrow()
    }

    /// Stops listening.
    pub(super) fn close(&self) {
        self.closed.cancel();
    }

    fn wake(&self, topic: &str) {
        if let Some(tx) = lock(&self.subs).get(topic) {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    fn wake_all(&self) {
        for tx in lock(&self.subs).values() {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    async fn run(self: Arc<Self>, target: Target, mut stream: Notifications) {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
        loop {
            self.up.send_replace(true);
            loop {
                let msg = tokio::select! {
                    () = self.closed.cancelled() => return,
                    m = stream.next() => m,
                };
                match msg {
                    Some(Ok(AsyncMessage::Notification(n))) => self.wake(n.payload()),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        warn!(error = %e, "the PostgreSQL LISTEN connection failed; reconnecting");
                        break;
                    }
                    None => {
                        warn!("the PostgreSQL LISTEN connection closed; reconnecting");
                        break;
                    }
                }
            }
            self.up.send_replace(false);
            loop {
                if !backoff.wait(&self.closed).await {
                    return;
                }
                match listen_once(&target, &self).await {
                    Ok(s) => {
                        stream = s;
                        backoff.reset();
                        info!("listening to PostgreSQL notifications again");
                        // Whatever was sent meanwhile is lost: everyone looks again.
                        self.wake_all();
                        break;
                    }
                    Err(e) => debug!(error = %e, "LISTEN connection not reopened yet"),
                }
            }
        }
    }
}

/// A listening connection's messages.
type Notifications =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<AsyncMessage, tokio_postgres::Error>> + Send>>;

/// Opens a connection and `LISTEN`s on the channel; the stream of its
/// messages drives it (the client is kept alive inside the stream).
async fn listen_once(target: &Target, _listener: &Listener) -> Result<Notifications, BackendError> {
    let (client, mut connection) = pool::open(target).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    // The connection must be polled for the LISTEN to complete: forward
    // its messages from a task of its own until the client is dropped.
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(m) = messages.next().await {
            let end = m.is_err();
            if tx.send(m).is_err() || end {
                return;
            }
        }
    });
    let listen = format!("LISTEN \"{}\"", target.schema.channel);
    match tokio::time::timeout(target.connect_timeout, client.batch_execute(&listen)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(super::error::backend_error("LISTEN", &e)),
        Err(_) => {
            return Err(BackendError::Unavailable(format!(
                "PostgreSQL at {}: LISTEN not answered within {:?}",
                target.shown, target.connect_timeout
            )));
        }
    }
    Ok(Box::pin(futures_util::stream::poll_fn(move |cx| {
        let _keep = &client;
        rx.poll_recv(cx)
    })))
}
