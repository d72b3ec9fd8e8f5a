//! The [`Client`] handle: a small pool of connections, each kept up by a
//! supervisor task that reconnects with backoff, and the low-level calls.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clastor_protocol::{HeldLock, HeldScope, Request, Response, ResponseBody, VersionInfo, name};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::{CancellationToken, DropGuard};

mod rotate;

use crate::backoff::Backoff;
use crate::config::{ClientBuilder, ServerAddr};
use crate::conn::{self, Conn, HeldUpdate, Reply};
use crate::error::Error;
use crate::event::{ClientEvent, EventStream};
use crate::reply::{body, unexpected};

/// A handle on a Clastor server: cheap to clone, `Send + Sync`, and meant to
/// be shared by every task of an application. Requests from all clones are
/// pipelined over the same connection(s).
///
/// The connections close when the last clone and the last
/// [`LockGuard`](crate::LockGuard) are dropped.
#[derive(Debug, Clone)]
pub struct Client {
    pool: Arc<ClientPool>,
}

#[derive(Debug)]
struct ClientPool {
    cfg: ClientBuilder,
    slots: Vec<watch::Receiver<Slot>>,
    next: AtomicUsize,
    events: broadcast::Sender<ClientEvent>,
    /// Stops the supervisors: by [`Client::close`], or when the last clone goes.
    stop: CancellationToken,
    _stop: DropGuard,
}

/// What a pool slot has right now.
#[derive(Debug, Clone)]
enum Slot {
    Up(Conn),
    /// Reconnecting; the last error seen.
    Down(Error),
}

/// Facts about one connection, from its handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectionInfo {
    /// The server's id for the connection (as in `HELD` listings and logs).
    pub connection_id: u64,
    /// The server's self-description (`clastor 0.1.0 (memory)`).
    pub server: String,
    /// The address connected to.
    pub peer: SocketAddr,
    /// Requests the server processes at once on the connection.
    pub max_in_flight: u32,
    /// Largest frame the server accepts.
    pub max_frame_len: u32,
}

impl Client {
    /// Connects to `addr` with default settings (one connection).
    ///
    /// # Errors
    /// See [`ClientBuilder::connect`].
    ///
    /// # Cancellation safety
    /// Safe: dropping the future closes any connection made so far.
    pub async fn connect(addr: impl Into<ServerAddr>) -> Result<Client, Error> {
        ClientBuilder::new(addr).connect().await
    }

    /// A builder for non-default settings.
    pub fn builder(addr: impl Into<ServerAddr>) -> ClientBuilder {
        ClientBuilder::new(addr)
    }

    /// A new, separate **owner**: a client with the same settings and its own
    /// connection(s), so its locks and waits are its own on the server.
    ///
    /// Tasks sharing one handle share its connection: when one of them holds
    /// or is acquiring a key, another that asks for the same key waits on the
    /// client, in arrival order among those tasks, and joins the server's
    /// queue only when its turn comes — behind any process that queued at the
    /// server meanwhile. That is what most applications want (no
    /// `ALREADY_HELD`, one connection). A task that must be served in strict
    /// arrival order with every other process, or that wants its locks to
    /// survive the handle's other tasks' connection trouble, takes its own
    /// owner: its acquires then queue at the server the moment they are made.
    ///
    /// # Errors
    /// As [`ClientBuilder::connect`].
    ///
    /// # Cancellation safety
    /// Safe: dropping the future closes any connection made so far.
    pub async fn new_owner(&self) -> Result<Client, Error> {
        self.pool.cfg.clone().connect().await
    }

    /// Round trip to the server; returns the time it took.
    ///
    /// # Errors
    /// Connection errors ([`Error::ConnectionLost`], [`Error::Connect`]) and
    /// server statuses.
    ///
    /// # Cancellation safety
    /// Safe.
    pub async fn ping(&self) -> Result<Duration, Error> {
        let conn = self.pick().await?;
        let start = Instant::now();
        match body(
            self.call_on(&conn, &Request::Ping, HeldUpdate::None, Duration::ZERO)
                .await?,
        )? {
            ResponseBody::Pong => Ok(start.elapsed()),
            other => Err(unexpected(&other)),
        }
    }

    /// Locks held through this client (`HeldScope::Connection`: the locks of
    /// every connection of the pool), or through the server by anyone
    /// (`HeldScope::Server`).
    ///
    /// # Errors
    /// Connection errors and server statuses.
    ///
    /// # Cancellation safety
    /// Safe.
    pub async fn held(&self, scope: HeldScope) -> Result<Vec<HeldLock>, Error> {
        let req = Request::Held { scope };
        let slots = match scope {
            HeldScope::Connection => 0..self.pool.slots.len(),
            HeldScope::Server => 0..1,
        };
        let mut all = Vec::new();
        for slot in slots {
            let conn = self.conn(slot).await?;
            match body(self.call_on(&conn, &req, HeldUpdate::None, Duration::ZERO).await?)? {
                ResponseBody::Held(list) => all.extend(list),
                other => return Err(unexpected(&other)),
            }
        }
        Ok(all)
    }

    /// A kind's current version and mode.
    ///
    /// # Errors
    /// [`Error::InvalidName`] for a bad kind (checked before sending);
    /// connection errors and server statuses.
    ///
    /// # Cancellation safety
    /// Safe.
    pub async fn version(&self, kind: &str) -> Result<VersionInfo, Error> {
        name::validate("kind", kind).map_err(|e| Error::InvalidName(e.to_string()))?;
        let conn = self.pick().await?;
        let req = Request::Version { kind: kind.to_owned() };
        match body(self.call_on(&conn, &req, HeldUpdate::None, Duration::ZERO).await?)? {
            ResponseBody::Version(v) => Ok(v),
            other => Err(unexpected(&other)),
        }
    }

    /// Server, backend and counters, as ordered `name → value` pairs.
    ///
    /// # Errors
    /// Connection errors and server statuses.
    ///
    /// # Cancellation safety
    /// Safe.
    pub async fn info(&self) -> Result<Vec<(String, String)>, Error> {
        let conn = self.pick().await?;
        match body(
            self.call_on(&conn, &Request::Info, HeldUpdate::None, Duration::ZERO)
                .await?,
        )? {
            ResponseBody::Info(pairs) => Ok(pairs),
            other => Err(unexpected(&other)),
        }
    }

    /// Sends any request as is, on the first connection of the pool, and
    /// returns the server's response whatever its status: the building block
    /// of debugging tools such as `clastor shell`.
    ///
    /// Locks taken this way are not tracked by the client: no guard releases
    /// them, and their loss shows only on [`Client::events`]. They are held
    /// until released with another raw request or until the connection closes.
    ///
    /// # Errors
    /// Only transport failures ([`Error::ConnectionLost`], [`Error::Connect`],
    /// [`Error::Malformed`]); [`Error::InvalidArgument`] for `HELLO`, which the
    /// client sends itself.
    ///
    /// # Cancellation safety
    /// Safe: the request still completes on the server.
    pub async fn request(&self, req: Request) -> Result<Response, Error> {
        if matches!(req, Request::Hello(_)) {
            return Err(Error::InvalidArgument(
                "the client performs the HELLO handshake itself".into(),
            ));
        }
        let extra = match &req {
            Request::Acquire(a) => Duration::from_millis(a.wait_ms.into()),
            // A rotation answers when its drain (default 60 s) and clean-up end.
            Request::Rotate(r) => {
                Duration::from_millis(r.drain_timeout_ms.max(60_000).into()) + Duration::from_secs(60)
            }
            _ => Duration::ZERO,
        };
        let conn = self.conn(0).await?;
        Ok(self.call_on(&conn, &req, HeldUpdate::None, extra).await?.response)
    }

    /// Subscribes to connection and server events from now on.
    pub fn events(&self) -> EventStream {
        EventStream {
            rx: self.pool.events.subscribe(),
        }
    }

    /// Facts about the first connection of the pool, if it is up.
    pub fn connection_info(&self) -> Option<ConnectionInfo> {
        match &*self.pool.slots[0].borrow() {
            Slot::Up(c) if c.is_alive() => Some(ConnectionInfo {
                connection_id: c.connection_id(),
                server: c.hello.server.clone(),
                peer: c.peer,
                max_in_flight: c.hello.max_in_flight,
                max_frame_len: c.hello.max_frame_len,
            }),
            _ => None,
        }
    }

    /// Closes the client, every clone of it included: its connections close
    /// (the server releases every lock held through them, and every guard
    /// reports [`LostReason::ConnectionLost`](crate::LostReason::ConnectionLost)),
    /// and later calls fail with [`Error::Closed`]. Dropping the last clone
    /// does the same; this is for closing while clones live on.
    pub fn close(&self) {
        self.pool.stop.cancel();
        for slot in &self.pool.slots {
            if let Slot::Up(c) = &*slot.borrow() {
                c.fail(Error::Closed);
            }
        }
    }

    /// Gives back every lock held through this client (every clone's), all
    /// requests at once, and returns how many the server released. Their
    /// guards report [`LostReason::ReleasedAll`](crate::LostReason::ReleasedAll)
    /// from then on: whoever held one must stop acting on it. For a shutdown
    /// path that must not leave locks to the server's connection timeouts.
    ///
    /// # Errors
    /// [`Error::Closed`] after [`Client::close`]; otherwise none: a lock
    /// whose release cannot be confirmed goes with its connection.
    pub async fn release_all(&self) -> Result<usize, Error> {
        if self.pool.stop.is_cancelled() {
            return Err(Error::Closed);
        }
        let mut replies = Vec::new();
        for slot in &self.pool.slots {
            let conn = match &*slot.borrow() {
                Slot::Up(c) if c.is_alive() => c.clone(),
                _ => continue,
            };
            for lock in conn.held_locks() {
                if !lock.mark_lost(crate::LostReason::ReleasedAll) {
                    continue;
                }
                let (tx, rx) = tokio::sync::oneshot::channel();
                if conn.send_release(&lock, Some(tx)).is_ok() {
                    replies.push(rx);
                }
            }
        }
        let released = futures_util::future::join_all(replies).await;
        Ok(released
            .into_iter()
            .filter(|r| {
                matches!(
                    r,
                    Ok(Ok(reply)) if matches!(reply.response.result, Ok(ResponseBody::Released { released: true }))
                )
            })
            .count())
    }

    /// Whether [`Client::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.pool.stop.is_cancelled()
    }

    /// The address this client connects to.
    pub fn server_addr(&self) -> &ServerAddr {
        &self.pool.cfg.addr
    }

    pub(crate) fn config(&self) -> &ClientBuilder {
        &self.pool.cfg
    }

    /// A live connection, round-robin over the pool.
    pub(crate) async fn pick(&self) -> Result<Conn, Error> {
        let n = self.pool.slots.len();
        let slot = if n == 1 {
            0
        } else {
            self.pool.next.fetch_add(1, Ordering::Relaxed) % n
        };
        self.conn(slot).await
    }

    /// The live connection of `slot`, waiting up to the connect timeout for a
    /// reconnect if it is down.
    async fn conn(&self, slot: usize) -> Result<Conn, Error> {
        if self.pool.stop.is_cancelled() {
            return Err(Error::Closed);
        }
        if let Slot::Up(c) = &*self.pool.slots[slot].borrow()
            && c.is_alive()
        {
            return Ok(c.clone());
        }
        let mut rx = self.pool.slots[slot].clone();
        let timeout = self.pool.cfg.connect_timeout;
        // No deadline if the configured timeout is too long to represent.
        let deadline = tokio::time::Instant::now().checked_add(timeout);
        loop {
            let last_error = match &*rx.borrow_and_update() {
                Slot::Up(c) if c.is_alive() => return Ok(c.clone()),
                Slot::Up(c) => c.dead_error(),
                Slot::Down(e) => e.clone(),
            };
            let changed = match deadline {
                Some(deadline) => tokio::time::timeout_at(deadline, rx.changed()).await,
                None => Ok(rx.changed().await),
            };
            match changed {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(Error::Closed),
                Err(_) => {
                    return Err(match last_error {
                        e @ Error::Connect { .. } => e,
                        e => Error::Connect {
                            addr: self.pool.cfg.addr.to_string(),
                            message: format!("not reconnected within {timeout:?} after: {e}"),
                        },
                    });
                }
            }
        }
    }

    /// One request on `conn`, under the request timeout (plus `extra`, the
    /// time the server may legitimately take, e.g. an acquire's wait).
    pub(crate) async fn call_on(
        &self,
        conn: &Conn,
        req: &Request,
        update: HeldUpdate,
        extra: Duration,
    ) -> Result<Reply, Error> {
        match self.pool.cfg.request_timeout {
            None => conn.call(req, update).await,
            Some(t) => {
                let limit = t.saturating_add(extra);
                tokio::time::timeout(limit, conn.call(req, update))
                    .await
                    .unwrap_or(Err(Error::RequestTimeout(limit)))
            }
        }
    }
}

impl ClientBuilder {
    /// Connects every connection (handshake included) and returns the client.
    ///
    /// # Errors
    /// [`Error::Connect`] if the address does not resolve, the server cannot be
    /// reached within the connect timeout, or the handshake fails;
    /// [`Error::VersionMismatch`] and other server statuses if the server
    /// refuses the handshake.
    ///
    /// # Cancellation safety
    /// Safe: dropping the future closes any connection made so far.
    pub async fn connect(self) -> Result<Client, Error> {
        let cfg = self;
        let (events, _) = broadcast::channel(cfg.event_capacity);
        let stop = CancellationToken::new();
        // Armed before the first connection: an early return stops the
        // supervisors already started.
        let stop_guard = stop.clone().drop_guard();
        let mut slots = Vec::with_capacity(cfg.connections);
        for _ in 0..cfg.connections {
            let conn = conn::connect(&cfg, events.clone()).await?;
            let (tx, rx) = watch::channel(Slot::Up(conn.clone()));
            tokio::spawn(supervise(cfg.clone(), tx, conn, events.clone(), stop.clone()));
            slots.push(rx);
        }
        Ok(Client {
            pool: Arc::new(ClientPool {
                cfg,
                slots,
                next: AtomicUsize::new(0),
                events,
                stop,
                _stop: stop_guard,
            }),
        })
    }
}

/// Keeps one pool slot connected: waits for its connection to die, then
/// reconnects with exponential backoff (the first attempt immediately; then
/// [`Backoff`] from `backoff_min` doubling to `backoff_max`, jittered).
async fn supervise(
    cfg: ClientBuilder,
    tx: watch::Sender<Slot>,
    mut conn: Conn,
    events: broadcast::Sender<ClientEvent>,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::new(cfg.backoff_min, cfg.backoff_max).with_jitter();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = conn.closed() => {}
        }
        let error = conn.dead_error();
        // The slot lets go; guards of the old connection keep their own handles.
        drop(conn);
        tx.send_replace(Slot::Down(error));
        backoff.reset();
        // The first attempt goes at once; the back-off starts after it fails.
        let mut delay = Duration::ZERO;
        let mut attempt = 0u32;
        conn = loop {
            if !delay.is_zero() {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
            }
            attempt += 1;
            let result = tokio::select! {
                () = stop.cancelled() => return,
                r = conn::connect(&cfg, events.clone()) => r,
            };
            match result {
                Ok(c) => break c,
                Err(e) => {
                    tracing::debug!(addr = %cfg.addr, attempt, error = %e, "reconnect failed");
                    tx.send_replace(Slot::Down(e));
                    delay = backoff.next_delay();
                }
            }
        };
        tracing::info!(addr = %cfg.addr, attempt, connection_id = conn.connection_id(), "reconnected");
        let _ = events.send(ClientEvent::Connected {
            connection_id: conn.connection_id(),
            server: conn.hello.server.clone(),
        });
        tx.send_replace(Slot::Up(conn.clone()));
    }
}
