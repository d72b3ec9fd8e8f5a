//! What the client tells observers about its connections: events pushed by
//! the server, and connections going down and coming back.
//!
//! Lock holders do not need this stream — a [`LockGuard`](crate::LockGuard)
//! learns of its own loss — it serves tools such as the `clastor shell` that
//! print everything as it happens.

use clastor_protocol::Event;
use tokio::sync::broadcast;

use crate::error::Error;

/// Something that happened on one of the client's connections.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientEvent {
    /// The server pushed an event (`LOCK_LOST`, `CLOSING`).
    Server {
        /// The server's id for the connection it came on.
        connection_id: u64,
        /// The event.
        event: Event,
    },
    /// A connection was (re)established. After a reconnect it holds no locks.
    Connected {
        /// The server's id for the new connection.
        connection_id: u64,
        /// The server's self-description from `HELLO`.
        server: String,
    },
    /// A connection broke; every lock held through it is lost.
    Disconnected {
        /// The server's id for the broken connection.
        connection_id: u64,
        /// Why.
        error: Error,
    },
    /// This subscriber fell behind and missed this many events.
    Lagged(u64),
}

/// A subscription to [`ClientEvent`]s, from [`Client::events`](crate::Client::events).
/// Sees only events that happen after it was created.
#[derive(Debug)]
pub struct EventStream {
    pub(crate) rx: broadcast::Receiver<ClientEvent>,
}

impl EventStream {
    /// The next event; `None` once the client and all its connections are gone.
    ///
    /// # Cancellation safety
    /// Safe: an event is only taken off the stream when this returns it.
    pub async fn recv(&mut self) -> Option<ClientEvent> {
        match self.rx.recv().await {
            Ok(ev) => Some(ev),
            Err(broadcast::error::RecvError::Lagged(n)) => Some(ClientEvent::Lagged(n)),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}
