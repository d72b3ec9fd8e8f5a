//! One TCP connection to a server: the handshake, request submission, the
//! reader task that routes replies and events, keepalive, and teardown.
//!
//! Why it is built this way:
//! - **Writes are combined, not queued to a task.** A caller encodes its frame
//!   into a shared buffer under a short mutex; if nobody is writing, it becomes
//!   the writer and sends the buffer with a non-blocking `try_write`, then keeps
//!   sending whatever other callers appended meanwhile, so a burst of requests
//!   leaves in one syscall. Only when the socket is full does a writer task take
//!   over (waiting for writability). Submission is synchronous, so it is
//!   cancel-safe and usable from `Drop` (guards release in the background), and
//!   the common case costs no task hop.
//! - **One reader task** decodes frames and completes the matching pending
//!   request (a oneshot per request); events go to lock guards and to the
//!   client's event channel. It also registers each grant in the connection's
//!   table of held locks *before* handing it to the caller, so a `LOCK_LOST`
//!   that follows the grant on the wire always finds its guard. The grant
//!   travels as a [`PendingGrant`], which gives the lock back if it is dropped
//!   before a guard takes it (the caller stopped waiting, even after the reply
//!   was already in its channel).
//! - **Only a broken frame is fatal.** A reply whose body does not decode (or
//!   carries a status this client does not know) fails its own request; an
//!   event with an unknown opcode is logged and ignored. The connection, and
//!   every lock held through it, lives on. A reply that contradicts the
//!   client's state (an unknown request id, the wrong opcode) or a `LOCK_LOST`
//!   that cannot be read still closes the connection: the server then releases
//!   everything, which is safer than guessing which lock it meant.
//! - **Teardown happens in one place**: when the reader stops (socket error,
//!   malformed frame, keepalive timeout, or the last handle dropped), every
//!   pending request fails with the same [`Error`], and every lock held through
//!   the connection is marked lost at once.
//! - **One grant per key and connection.** The table of held locks refuses a
//!   second acquire of a key the connection holds, and orders an acquire after
//!   a release of the same key that is still in flight; RELEASE and RENEW name
//!   the grant's token, so a late one from a lost grant never touches a newer
//!   grant of the same key.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::ops::Deref;
use std::pin::pin;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use clastor_protocol::{
    AcquireOk, BodyError, ClastorCodec, EVENT_REQUEST_ID, Event, Flags, Frame, FrameError, HIGHEST_VERSION, Hello,
    HelloOk, LENGTH_PREFIX_LEN, Opcode, PROTOCOL_VERSION, Request, Response, ResponseBody,
};
use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, TryAcquireError, broadcast, oneshot, watch};
use tokio_util::codec::FramedRead;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::config::ClientBuilder;
use crate::error::{Error, LostReason};
use crate::event::ClientEvent;
use crate::transport::Writer;

/// Request id of the handshake; ids of later requests start after `AUTH_ID`.
const HELLO_ID: u32 = 1;

/// Request id of the `AUTH` sent right after `HELLO` when a token is set.
const AUTH_ID: u32 = 2;

/// How many batches a caller writes inline before handing the rest to the
/// writer task, so one unlucky caller does not carry everyone's traffic.
const INLINE_ROUNDS: usize = 4;

/// Write buffers larger than this are not kept for reuse after a burst.
const SPARE_CAPACITY: usize = 64 * 1024;

/// Identifies a lock within a connection: `kind/id` (names cannot contain `/`).
pub(crate) type Key = String;

pub(crate) fn key(kind: &str, id: &str) -> Key {
    let mut k = String::with_capacity(kind.len() + 1 + id.len());
    k.push_str(kind);
    k.push('/');
    k.push_str(id);
    k
}

/// A grant held through a connection: the one record that its guard and the
/// connection's table of held locks both point to.
#[derive(Debug)]
pub(crate) struct HeldGrant {
    /// `kind/id`; the kind is its first `kind_len` bytes.
    pub(crate) key: Key,
    kind_len: usize,
    pub(crate) token: u64,
    pub(crate) version: String,
    pub(crate) lease_ms: AtomicU32,
    /// When the reader received the grant. The server started the lease no
    /// later than this (and, after a queue wait, possibly long after the
    /// ACQUIRE was sent).
    pub(crate) received: tokio::time::Instant,
    pub(crate) lost: watch::Sender<Option<LostReason>>,
    /// Until when the server guarantees nobody else is granted this lock, on
    /// this client's clock (protocol version 2).
    pub(crate) safe: watch::Sender<Safe>,
    /// The holding task's turn at the key among its connection's tasks:
    /// given back when the lock is released, dropped or lost.
    turn: Mutex<Option<LocalTurn>>,
}

/// A grant's safe-until and what may still move it.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Safe {
    /// `None` with a version 1 server, which promises nothing.
    pub(crate) until: Option<tokio::time::Instant>,
    /// Send instant of the latest renewal: it set `until` outright (a renewal
    /// can shorten the lease), and confirmations sent before it are stale.
    renewed: Option<tokio::time::Instant>,
    /// The lease's end counted from the send of the acquire or renewal that
    /// set it: `CONFIRM` replies leave leases out, so this caps them.
    lease_until: Option<tokio::time::Instant>,
}

impl Safe {
    /// The safe-until in force: the confirmed one, capped by the lease.
    pub(crate) fn effective(&self) -> Option<tokio::time::Instant> {
        match (self.until, self.lease_until) {
            (Some(u), Some(l)) => Some(u.min(l)),
            (u, _) => u,
        }
    }
}

impl HeldGrant {
    /// Takes the key (and the grant's version) instead of copying them: this
    /// runs once per acquire.
    fn new(key: Key, kind_len: usize, grant: &mut AcquireOk) -> HeldGrant {
        HeldGrant {
            key,
            kind_len,
            token: grant.token,
            version: std::mem::take(&mut grant.version),
            lease_ms: AtomicU32::new(grant.lease_ms),
            received: tokio::time::Instant::now(),
            lost: watch::channel(None).0,
            safe: watch::channel(Safe::default()).0,
            turn: Mutex::new(None),
        }
    }

    /// Applies a `safe_ms` the server gave in reply to a request this client
    /// sent at `sent`: counted from the send, never from the receipt, since
    /// the server may have handled the request at any time in between.
    /// A grant's `safe_ms` and lease, for an acquire sent at `sent`.
    pub(crate) fn granted(&self, sent: tokio::time::Instant, safe_ms: u32, lease_ms: u32) {
        self.safe.send_modify(|cur| {
            cur.until = Some(later_by(sent, safe_ms));
            cur.lease_until = (lease_ms > 0).then(|| later_by(sent, lease_ms));
        });
    }

    /// A confirmation (a `CONFIRM`'s) moves it forward only.
    pub(crate) fn confirm(&self, sent: tokio::time::Instant, safe_ms: u32) {
        let until = later_by(sent, safe_ms);
        self.safe.send_if_modified(|cur| {
            let stale = cur.renewed.is_some_and(|r| sent < r);
            if !stale && cur.until.is_none_or(|c| until > c) {
                cur.until = Some(until);
                true
            } else {
                false
            }
        });
    }

    /// Applies a renewal's `safe_ms` (sent at `sent`): outright, since a
    /// renewal may have shortened the lease, and confirmations sent before it
    /// no longer count.
    pub(crate) fn renewed(&self, sent: tokio::time::Instant, safe_ms: u32, lease_ms: u32) {
        let until = later_by(sent, safe_ms);
        self.safe.send_if_modified(|cur| {
            if cur.renewed.is_some_and(|r| sent < r) {
                return false;
            }
            *cur = Safe {
                until: Some(until),
                renewed: Some(sent),
                lease_until: (lease_ms > 0).then(|| later_by(sent, lease_ms)),
            };
            true
        });
    }

    pub(crate) fn kind(&self) -> &str {
        &self.key[..self.kind_len]
    }

    pub(crate) fn safe_until(&self) -> Option<tokio::time::Instant> {
        self.safe.borrow().effective()
    }

    pub(crate) fn id(&self) -> &str {
        &self.key[self.kind_len + 1..]
    }

    /// Records the loss; the first reason wins. Returns whether this call
    /// recorded it.
    pub(crate) fn mark_lost(&self, reason: LostReason) -> bool {
        let recorded = self.lost.send_if_modified(|slot| {
            if slot.is_none() {
                *slot = Some(reason);
                true
            } else {
                false
            }
        });
        if recorded {
            // A lost lock holds nobody back: the next task of the
            // connection may go ahead even while this guard lives on.
            drop(self.take_turn());
        }
        recorded
    }

    /// Hands the grant the task's turn at its key (see
    /// [`Connection::local_turn`]), to give back when the grant ends.
    pub(crate) fn keep_turn(&self, turn: LocalTurn) {
        let mut slot = self.turn.lock().unwrap_or_else(PoisonError::into_inner);
        *slot = Some(turn);
        drop(slot);
        // Lost before it was handed over: give it back at once.
        if self.lost_reason().is_some() {
            drop(self.take_turn());
        }
    }

    /// Takes the turn back (to drop it).
    pub(crate) fn take_turn(&self) -> Option<LocalTurn> {
        self.turn.lock().unwrap_or_else(PoisonError::into_inner).take()
    }

    pub(crate) fn lost_reason(&self) -> Option<LostReason> {
        self.lost.borrow().clone()
    }
}

/// One task's turn at a key of its connection: from
/// [`Connection::local_turn`], given back (to the next task waiting, in
/// arrival order) when dropped.
#[derive(Debug)]
pub(crate) struct LocalTurn {
    conn: Weak<Connection>,
    key: Key,
    permit: Option<OwnedSemaphorePermit>,
}

impl Drop for LocalTurn {
    fn drop(&mut self) {
        drop(self.permit.take());
        if let Some(conn) = self.conn.upgrade() {
            let mut turns = lock_turns(&conn.turns);
            // Nobody else has or awaits it: forget the key.
            if turns.get(&self.key).is_some_and(|t| Arc::strong_count(t) == 1) {
                turns.remove(&self.key);
            }
        }
    }
}

fn lock_turns(m: &Mutex<HashMap<Key, Arc<Semaphore>>>) -> MutexGuard<'_, HashMap<Key, Arc<Semaphore>>> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `sent + ms`, saturating a year ahead.
fn later_by(sent: tokio::time::Instant, ms: u32) -> tokio::time::Instant {
    sent.checked_add(Duration::from_millis(u64::from(ms)))
        .unwrap_or_else(|| sent + Duration::from_secs(86_400 * 365))
}

/// How a request's reply updates the connection's table of held locks,
/// besides completing the request.
#[derive(Debug)]
pub(crate) enum HeldUpdate {
    /// Nothing.
    None,
    /// An acquire through the lock API: register the grant. The key is
    /// `kind/id`, the kind its first `kind_len` bytes.
    Acquire { key: Key, kind_len: usize },
    /// A release through the lock API: forget the grant with this token.
    Release { key: Key, token: u64 },
}

/// A reply and, for a granted acquire, the registered grant (whose version
/// has moved out of the response body into the grant).
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) response: Response,
    pub(crate) grant: Option<PendingGrant>,
}

/// A registered grant on its way to the caller. Until [`accept`] hands it to a
/// guard, dropping it (the caller stopped waiting, possibly after the reply was
/// already in its channel) gives the lock back in the background, so a
/// cancelled acquire never leaves a lock held for nobody.
///
/// [`accept`]: PendingGrant::accept
#[derive(Debug)]
pub(crate) struct PendingGrant {
    lock: Option<Arc<HeldGrant>>,
    conn: Weak<Connection>,
}

impl PendingGrant {
    /// Disarms the grant: the caller's guard owns the lock from now on.
    pub(crate) fn accept(mut self) -> Option<Arc<HeldGrant>> {
        self.lock.take()
    }
}

impl Drop for PendingGrant {
    fn drop(&mut self) {
        if let Some(lock) = self.lock.take()
            && let Some(conn) = self.conn.upgrade()
        {
            tracing::debug!(key = %lock.key, token = lock.token, "releasing a grant nobody waited for");
            conn.release_in_background(&lock);
        }
    }
}

type ReplyTx = oneshot::Sender<Result<Reply, Error>>;

#[derive(Debug)]
struct Pending {
    /// `None` for fire-and-forget requests (background releases, keepalive).
    tx: Option<ReplyTx>,
    opcode: Opcode,
    update: HeldUpdate,
    /// Held until the reply arrives: bounds requests in flight.
    _permit: Option<OwnedSemaphorePermit>,
}

#[derive(Debug)]
struct State {
    next_id: u32,
    pending: HashMap<u32, Pending>,
    /// Frames waiting to be written.
    buf: BytesMut,
    /// An empty buffer kept for the next swap with `buf`.
    spare: BytesMut,
    /// Someone (a caller or the writer task) is writing; others only append.
    writing: bool,
    /// A partly written batch handed to the writer task.
    stalled: Option<BytesMut>,
    /// Set once; every later submission fails with it.
    dead: Option<Error>,
    held: HashMap<Key, Arc<HeldGrant>>,
    /// Keys whose background release is in flight: an acquire of the same key
    /// on this connection waits for it, or the server would say ALREADY_HELD.
    releasing: HashMap<Key, Arc<Notify>>,
    /// The last `CLOSING` event, to explain the disconnect that follows.
    closing: Option<String>,
}

impl State {
    fn alloc_id(&mut self) -> u32 {
        loop {
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1).max(HELLO_ID + 1);
            if id > HELLO_ID && !self.pending.contains_key(&id) {
                return id;
            }
        }
    }
}

/// One connection: its socket's write half, its tables (requests in flight,
/// locks held), and the signals its reader, writer and keepalive tasks share.
/// Handles reach it through [`Conn`].
#[derive(Debug)]
pub(crate) struct Connection {
    /// Itself, for grants that must find the connection again when dropped.
    me: Weak<Connection>,
    pub(crate) hello: HelloOk,
    pub(crate) peer: SocketAddr,
    write: Writer,
    state: Mutex<State>,
    /// Per key, the turn its own tasks take, in arrival order (see
    /// [`Connection::local_turn`]); an entry lives while someone has or
    /// awaits the turn.
    turns: Mutex<HashMap<Key, Arc<Semaphore>>>,
    writer_wake: Notify,
    closed: CancellationToken,
    permits: Arc<Semaphore>,
    events: broadcast::Sender<ClientEvent>,
    born: Instant,
    /// Milliseconds since `born` when the last frame arrived.
    last_rx_ms: AtomicU64,
    /// Wakes the confirm loop early (a grant arrived already in jeopardy).
    confirm_now: Notify,
    /// `CONFIRM`s sent and not answered yet.
    confirms_out: AtomicUsize,
}

/// A handle on a live connection. The connection closes (and the server
/// releases its locks) when the last handle is dropped.
#[derive(Debug, Clone)]
pub(crate) struct Conn(Arc<CloseOnDrop>);

/// What every [`Conn`] clone shares: the connection, and the guard that
/// closes it when the last clone goes.
#[derive(Debug)]
struct CloseOnDrop {
    shared: Arc<Connection>,
    _close: DropGuard,
}

impl Deref for Conn {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        &self.0.shared
    }
}

/// Opens a connection and performs the handshake (and `AUTH`, with a token).
pub(crate) async fn connect(cfg: &ClientBuilder, events: broadcast::Sender<ClientEvent>) -> Result<Conn, Error> {
    let addr = cfg.addr.as_str();
    let connect_err = |message: String| Error::Connect {
        addr: addr.to_owned(),
        message,
    };
    let handshake = async {
        let stream = TcpStream::connect(addr).await.map_err(|e| connect_err(e.to_string()))?;
        // Requests are small and latency-bound: never let Nagle hold one back.
        stream
            .set_nodelay(true)
            .map_err(|e| connect_err(format!("setting TCP_NODELAY: {e}")))?;
        set_keepalive(&stream, cfg.keepalive);
        let peer = stream.peer_addr().map_err(|e| connect_err(e.to_string()))?;
        // HELLO and AUTH go out together: the server reads AUTH only after
        // it has answered HELLO, so the pipelining costs no round trip.
        let mut buf = BytesMut::new();
        Request::Hello(Hello {
            min_version: PROTOCOL_VERSION,
            max_version: HIGHEST_VERSION,
            client_name: cfg.client_name.clone(),
        })
        .encode(HELLO_ID, &mut buf);
        if let Some(token) = &cfg.token {
            Request::Auth { token: token.clone() }.encode(AUTH_ID, &mut buf);
        }
        #[cfg(feature = "tls")]
        if let Some(tls) = &cfg.tls {
            let sock = socket2::SockRef::from(&stream)
                .try_clone()
                .map_err(|e| connect_err(format!("duplicating the socket: {e}")))?;
            let mut stream = tls.connect(addr, stream).await.map_err(connect_err)?;
            stream
                .write_all(&buf)
                .await
                .map_err(|e| connect_err(format!("sending HELLO: {e}")))?;
            stream
                .flush()
                .await
                .map_err(|e| connect_err(format!("sending HELLO: {e}")))?;
            let (read, write) = tokio::io::split(stream);
            let mut frames = FramedRead::new(read, ClastorCodec::new(cfg.max_frame_len));
            let hello = read_handshake(&mut frames, cfg.token.is_some(), &connect_err).await?;
            return Ok::<Opened, Error>(Opened {
                peer,
                hello,
                frames: Box::new(frames) as Box<dyn FrameSource>,
                write: Writer::Tls {
                    half: tokio::sync::Mutex::new(write),
                    sock,
                },
            });
        }
        let (read, mut write) = stream.into_split();
        write
            .write_all(&buf)
            .await
            .map_err(|e| connect_err(format!("sending HELLO: {e}")))?;
        let mut frames = FramedRead::new(read, ClastorCodec::new(cfg.max_frame_len));
        let hello = read_handshake(&mut frames, cfg.token.is_some(), &connect_err).await?;
        Ok::<Opened, Error>(Opened {
            peer,
            hello,
            frames: Box::new(frames) as Box<dyn FrameSource>,
            write: Writer::Tcp(write),
        })
    };
    let opened = tokio::time::timeout(cfg.connect_timeout, handshake)
        .await
        .map_err(|_| connect_err(format!("no handshake within {:?}", cfg.connect_timeout)))??;
    let Opened {
        peer,
        hello,
        frames,
        write,
    } = opened;
    tracing::debug!(%peer, connection_id = hello.connection_id, server = %hello.server, "connected");
    // One slot below the server's limit stays free, so the server always reads
    // the next frame, a keepalive PING included, however many acquires block.
    let in_flight = cfg
        .max_in_flight
        .min(usize::try_from(hello.max_in_flight).unwrap_or(usize::MAX))
        .saturating_sub(1)
        .max(1);
    let shared = Arc::new_cyclic(|me| Connection {
        me: me.clone(),
        hello,
        peer,
        write,
        turns: Mutex::new(HashMap::new()),
        state: Mutex::new(State {
            // Without a token no AUTH went out: ids go on right after HELLO.
            next_id: if cfg.token.is_some() { AUTH_ID + 1 } else { AUTH_ID },
            pending: HashMap::new(),
            buf: BytesMut::with_capacity(4096),
            spare: BytesMut::with_capacity(4096),
            writing: false,
            stalled: None,
            dead: None,
            held: HashMap::new(),
            releasing: HashMap::new(),
            closing: None,
        }),
        writer_wake: Notify::new(),
        closed: CancellationToken::new(),
        permits: Arc::new(Semaphore::new(in_flight)),
        events,
        born: Instant::now(),
        last_rx_ms: AtomicU64::new(0),
        confirm_now: Notify::new(),
        confirms_out: AtomicUsize::new(0),
    });
    tokio::spawn(read_loop(shared.clone(), frames));
    #[cfg(feature = "tls")]
    if shared.write.tcp().is_none() {
        tokio::spawn(tls_write_loop(shared.clone()));
    } else {
        tokio::spawn(write_loop(shared.clone()));
    }
    #[cfg(not(feature = "tls"))]
    tokio::spawn(write_loop(shared.clone()));
    if let Some(interval) = cfg.keepalive {
        tokio::spawn(keepalive_loop(shared.clone(), interval));
    }
    if let Some(ms) = shared.hello.confirm_ms {
        // A server that names no pace (0) gets a second.
        let ms = if ms == 0 { 1_000 } else { ms };
        tokio::spawn(confirm_loop(shared.clone(), Duration::from_millis(u64::from(ms))));
    }
    let close = shared.closed.clone().drop_guard();
    Ok(Conn(Arc::new(CloseOnDrop { shared, _close: close })))
}

/// Where the reader task takes frames from: the read half of a TCP or a TLS
/// stream, boxed so one reader serves both.
trait FrameSource: futures_util::Stream<Item = Result<Frame, FrameError>> + Send + Unpin {}

impl<S: futures_util::Stream<Item = Result<Frame, FrameError>> + Send + Unpin> FrameSource for S {}

/// A connection whose handshake is done.
struct Opened {
    peer: SocketAddr,
    hello: HelloOk,
    frames: Box<dyn FrameSource>,
    write: Writer,
}

/// Reads the replies to `HELLO` and, when one was sent, to `AUTH`.
async fn read_handshake<R: AsyncRead + Unpin>(
    frames: &mut FramedRead<R, ClastorCodec>,
    authenticating: bool,
    connect_err: &impl Fn(String) -> Error,
) -> Result<HelloOk, Error> {
    let mut next = async |what: &str| match frames.next().await {
        Some(Ok(frame)) => Ok(frame),
        // A TLS record's header (handshake 0x16, alert 0x15, version 3.x)
        // read as a length prefix: the server speaks TLS and this client not.
        Some(Err(FrameError::TooLarge { len, .. })) if matches!(len >> 16, 0x1503 | 0x1603) => Err(connect_err(
            "the server answered with TLS: connect with TLS (a CA file: ClientBuilder::tls, the CLI's --tls-ca)".into(),
        )),
        Some(Err(e)) => Err(connect_err(format!("reading the {what} reply: {e}"))),
        None => Err(connect_err(format!(
            "the server closed the connection during the handshake ({what})"
        ))),
    };
    let hello = handshake_reply(next("HELLO").await?)?;
    if authenticating {
        let principal = auth_reply(next("AUTH").await?)?;
        tracing::debug!(%principal, "authenticated");
    }
    Ok(hello)
}

/// Checks the reply to `AUTH`: the principal's name, or why not.
fn auth_reply(frame: Frame) -> Result<String, Error> {
    let Frame { header, body } = frame;
    if header.request_id == EVENT_REQUEST_ID {
        return match Event::decode(&header, body) {
            Ok(Event::Closing { status, message }) => Err(Error::from_status(status, message)),
            _ => Err(Error::Malformed("event during authentication".into())),
        };
    }
    let response = Response::decode(&header, body).map_err(|e| Error::from_body_error(e, "AUTH reply"))?;
    if response.request_id != AUTH_ID {
        return Err(Error::Malformed(format!(
            "expected the AUTH reply, got one for request {}",
            response.request_id
        )));
    }
    match response.result {
        Ok(ResponseBody::Authenticated { principal }) => Ok(principal),
        Ok(other) => Err(Error::Malformed(format!("{} body in the AUTH reply", other.opcode()))),
        Err(e) => Err(e.into()),
    }
}

/// Turns on TCP keepalive (probing after `interval` of silence, and giving up
/// on unacknowledged data after twice that on Linux), so a peer that vanished
/// is noticed even when the keepalive PING cannot be sent. Best effort: a
/// socket that refuses the options still works.
fn set_keepalive(stream: &TcpStream, interval: Option<Duration>) {
    let sock = socket2::SockRef::from(stream);
    let result = match interval {
        Some(interval) => {
            // The kernel counts in whole seconds, at least one.
            let interval = interval.max(Duration::from_secs(1));
            let params = socket2::TcpKeepalive::new().with_time(interval).with_interval(interval);
            sock.set_tcp_keepalive(&params)
        }
        None => sock.set_keepalive(true),
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "cannot set SO_KEEPALIVE");
    }
    #[cfg(target_os = "linux")]
    if let Some(interval) = interval
        && let Err(e) = sock.set_tcp_user_timeout(Some(interval.max(Duration::from_secs(1)).saturating_mul(2)))
    {
        tracing::debug!(error = %e, "cannot set TCP_USER_TIMEOUT");
    }
}

/// Checks the first frame the server sends: the reply to `HELLO`, or a
/// `CLOSING` event saying why it will not talk to us.
fn handshake_reply(frame: Frame) -> Result<HelloOk, Error> {
    let Frame { header, body } = frame;
    if header.request_id == EVENT_REQUEST_ID {
        return match Event::decode(&header, body) {
            Ok(Event::Closing { status, message }) => Err(Error::from_status(status, message)),
            Ok(other) => Err(Error::Malformed(format!(
                "{} event during the handshake",
                other.opcode()
            ))),
            Err(e) => Err(Error::Malformed(format!("event during the handshake: {e}"))),
        };
    }
    let response = Response::decode(&header, body).map_err(|e| Error::from_body_error(e, "HELLO reply"))?;
    if response.request_id != HELLO_ID || response.opcode != Opcode::Hello as u8 {
        return Err(Error::Malformed(format!(
            "expected the HELLO reply, got opcode 0x{:02x} for request {}",
            response.opcode, response.request_id
        )));
    }
    match response.result {
        Ok(ResponseBody::Hello(hello)) if (PROTOCOL_VERSION..=HIGHEST_VERSION).contains(&hello.version) => Ok(hello),
        Ok(ResponseBody::Hello(hello)) => Err(Error::VersionMismatch(format!(
            "server chose protocol version {}, this client speaks {PROTOCOL_VERSION}..={HIGHEST_VERSION}",
            hello.version
        ))),
        Ok(other) => Err(Error::Malformed(format!("{} body in the HELLO reply", other.opcode()))),
        Err(e) => Err(e.into()),
    }
}

impl Connection {
    /// This connection's turn at `key` among the tasks that share it, in
    /// arrival order: taken at once (no round trip) when no other task of the
    /// connection holds or is acquiring the key, else waited for. The server
    /// sees one owner per connection, so without it a second task asking for a
    /// key the first holds would be refused instead of waiting. The acquire
    /// holds the turn, then its guard, until the lock is given back.
    ///
    /// # Errors
    /// The connection's error once it is dead.
    ///
    /// # Cancellation safety
    /// Safe: a turn not yet taken is given up.
    pub(crate) async fn local_turn(&self, key: &str) -> Result<LocalTurn, Error> {
        let turn = {
            let mut turns = lock_turns(&self.turns);
            Arc::clone(
                turns
                    .entry(key.to_owned())
                    .or_insert_with(|| Arc::new(Semaphore::new(1))),
            )
        };
        let permit = turn.acquire_owned().await.map_err(|_| self.dead_error())?;
        Ok(LocalTurn {
            conn: self.me.clone(),
            key: key.to_owned(),
            permit: Some(permit),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The lock is never held across code that can panic on input; if it
        // was poisoned anyway, the state is still consistent enough to tear down.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The server's id for this connection.
    pub(crate) fn connection_id(&self) -> u64 {
        self.hello.connection_id
    }

    /// The protocol version negotiated with the server.
    pub(crate) fn version(&self) -> u8 {
        self.hello.version
    }

    /// Whether the connection can still carry requests.
    pub(crate) fn is_alive(&self) -> bool {
        !self.closed.is_cancelled()
    }

    /// Resolves once the connection is closed, for whatever reason.
    pub(crate) async fn closed(&self) {
        self.closed.cancelled().await;
    }

    /// Why the connection is gone (or a generic error if it is not).
    pub(crate) fn dead_error(&self) -> Error {
        self.state()
            .dead
            .clone()
            .unwrap_or_else(|| Error::ConnectionLost("connection closed".into()))
    }

    /// Sends `req` and waits for its reply, holding an in-flight permit.
    ///
    /// # Errors
    /// The connection's error if it is or becomes dead; [`Error::InvalidArgument`]
    /// if the request is larger than the server accepts.
    ///
    /// # Cancellation safety
    /// Safe: once submitted the request completes on the server regardless; its
    /// reply is dropped, except that a lock granted to a cancelled acquire is
    /// released in the background.
    pub(crate) async fn call(&self, req: &Request, update: HeldUpdate) -> Result<Reply, Error> {
        let permit = self.permit().await?;
        let (tx, rx) = oneshot::channel();
        self.submit(req, Some(tx), update, Some(permit))?;
        rx.await.unwrap_or_else(|_| Err(self.dead_error()))
    }

    /// Queues `req` for writing and registers its reply handler. Never blocks
    /// on the network.
    pub(crate) fn submit(
        &self,
        req: &Request,
        tx: Option<ReplyTx>,
        update: HeldUpdate,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Result<(), Error> {
        let st = self.state();
        self.submit_locked(st, req, tx, update, permit)
    }

    fn submit_locked(
        &self,
        mut st: MutexGuard<'_, State>,
        req: &Request,
        tx: Option<ReplyTx>,
        update: HeldUpdate,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Result<(), Error> {
        if let Some(e) = &st.dead {
            return Err(e.clone());
        }
        let id = st.alloc_id();
        let start = st.buf.len();
        req.encode(id, &mut st.buf);
        let frame_len = st.buf.len() - start - LENGTH_PREFIX_LEN;
        if frame_len > self.hello.max_frame_len as usize {
            st.buf.truncate(start);
            return Err(Error::InvalidArgument(format!(
                "request of {frame_len} bytes exceeds the server's frame limit of {}",
                self.hello.max_frame_len
            )));
        }
        st.pending.insert(
            id,
            Pending {
                tx,
                opcode: req.opcode(),
                update,
                _permit: permit,
            },
        );
        self.flush(st);
        Ok(())
    }

    /// Starts writing the buffer unless someone already is.
    fn flush(&self, mut st: MutexGuard<'_, State>) {
        if st.writing || st.buf.is_empty() {
            return;
        }
        st.writing = true;
        let mut chunk = std::mem::take(&mut st.spare);
        std::mem::swap(&mut chunk, &mut st.buf);
        drop(st);
        self.write_inline(chunk);
    }

    /// Writes without waiting; hands over to the writer task when the socket
    /// is full. The caller holds the `writing` role.
    fn write_inline(&self, mut chunk: BytesMut) {
        let Some(write) = self.write.tcp() else {
            #[cfg(feature = "tls")]
            self.write_inline_tls(chunk);
            return;
        };
        for _ in 0..INLINE_ROUNDS {
            match write.try_write(&chunk) {
                Ok(n) if n == chunk.len() => {
                    chunk.clear();
                    let mut st = self.state();
                    if st.buf.is_empty() || st.dead.is_some() {
                        st.writing = false;
                        if chunk.capacity() <= SPARE_CAPACITY {
                            st.spare = chunk;
                        }
                        return;
                    }
                    std::mem::swap(&mut chunk, &mut st.buf);
                }
                Ok(n) => {
                    chunk.advance(n);
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.fail(Error::ConnectionLost(format!("write failed: {e}")));
                    return;
                }
            }
        }
        self.state().stalled = Some(chunk);
        self.writer_wake.notify_one();
    }

    /// [`Connection::write_inline`] for TLS: writes and flushes without
    /// waiting as far as that goes, then hands the rest (or the flush) to
    /// the writer task.
    #[cfg(feature = "tls")]
    fn write_inline_tls(&self, mut chunk: BytesMut) {
        for _ in 0..INLINE_ROUNDS {
            match self.write.tls_write_now(&chunk) {
                Ok((n, true)) if n == chunk.len() => {
                    chunk.clear();
                    let mut st = self.state();
                    if st.buf.is_empty() || st.dead.is_some() {
                        st.writing = false;
                        if chunk.capacity() <= SPARE_CAPACITY {
                            st.spare = chunk;
                        }
                        return;
                    }
                    std::mem::swap(&mut chunk, &mut st.buf);
                }
                Ok((n, _)) => {
                    chunk.advance(n);
                    break;
                }
                Err(e) => {
                    self.fail(Error::ConnectionLost(format!("write failed: {e}")));
                    return;
                }
            }
        }
        // Possibly empty: then only the flush is left.
        self.state().stalled = Some(chunk);
        self.writer_wake.notify_one();
    }

    /// Marks the connection dead with `error` (the first error wins) and
    /// stops its tasks; the reader tears down.
    pub(crate) fn fail(&self, error: Error) {
        {
            let mut st = self.state();
            if st.dead.is_none() {
                st.dead = Some(error);
            }
        }
        self.closed.cancel();
    }

    /// Releases `lock` without waiting for the reply (guard drop, failed
    /// renewal, cancelled acquire). Nothing to do if the connection is dead:
    /// the server released everything it held.
    pub(crate) fn release_in_background(&self, lock: &HeldGrant) {
        if let Err(e) = self.send_release(lock, None) {
            tracing::debug!(key = %lock.key, error = %e, "background release not sent");
        }
    }

    /// Sends a RELEASE of `lock`'s grant (by token). From now until its reply,
    /// the key counts as "releasing" rather than held: an acquire of it on this
    /// connection waits for the reply instead of being refused.
    ///
    /// It takes no in-flight permit: with every permit held by acquires
    /// waiting for this very lock, waiting for one would deadlock.
    pub(crate) fn send_release(&self, lock: &HeldGrant, tx: Option<ReplyTx>) -> Result<(), Error> {
        let req = Request::Release {
            kind: lock.kind().to_owned(),
            id: lock.id().to_owned(),
            token: lock.token,
        };
        let mut st = self.state();
        if let Some(e) = &st.dead {
            return Err(e.clone());
        }
        if st.held.get(&lock.key).is_some_and(|l| l.token == lock.token) {
            st.held.remove(&lock.key);
        }
        st.releasing
            .entry(lock.key.clone())
            .or_insert_with(|| Arc::new(Notify::new()));
        let update = HeldUpdate::Release {
            key: lock.key.clone(),
            token: lock.token,
        };
        self.submit_locked(st, &req, tx, update, None)
    }

    /// An in-flight permit, waiting for one if all are taken.
    pub(crate) async fn permit(&self) -> Result<OwnedSemaphorePermit, Error> {
        match self.permits.clone().try_acquire_owned() {
            Ok(p) => Ok(p),
            Err(TryAcquireError::Closed) => Err(self.dead_error()),
            Err(TryAcquireError::NoPermits) => tokio::select! {
                p = self.permits.clone().acquire_owned() => p.map_err(|_| self.dead_error()),
                () = self.closed.cancelled() => Err(self.dead_error()),
            },
        }
    }

    /// Removes `lock` from the table of held locks (if it is still the grant
    /// there): the server said it no longer holds it.
    pub(crate) fn forget(&self, lock: &HeldGrant) {
        let mut st = self.state();
        if st.held.get(&lock.key).is_some_and(|l| l.token == lock.token) {
            st.held.remove(&lock.key);
        }
    }

    /// Refuses an acquire of a key this connection holds: the server would
    /// refuse it too, unless the held grant was lost a moment ago and its
    /// `LOCK_LOST` is still on the way, in which case two grants of one key
    /// would be alive on the client at once.
    pub(crate) fn check_not_held(&self, key: &str) -> Result<(), Error> {
        let mut st = self.state();
        match st.held.get(key) {
            Some(l) if l.lost_reason().is_some() => {
                st.held.remove(key);
                Ok(())
            }
            Some(l) => Err(Error::AlreadyHeld(format!(
                "{key} is already held by this connection (token {})",
                l.token
            ))),
            None => Ok(()),
        }
    }

    /// Waits until no background release of `key` is in flight on this
    /// connection.
    ///
    /// # Cancellation safety
    /// Safe: it only waits.
    pub(crate) async fn wait_released(&self, key: &str) {
        loop {
            let Some(notify) = self.state().releasing.get(key).cloned() else {
                return;
            };
            let mut notified = pin!(notify.notified());
            notified.as_mut().enable();
            // Re-check after enabling, so a release finishing in between is not missed.
            let still = self.state().releasing.get(key).is_some_and(|n| Arc::ptr_eq(n, &notify));
            if !still {
                continue;
            }
            notified.await;
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_rx_ms.store(ms, Ordering::Relaxed);
    }

    fn since_last_rx(&self) -> Duration {
        let last = Duration::from_millis(self.last_rx_ms.load(Ordering::Relaxed));
        self.born.elapsed().saturating_sub(last)
    }

    /// Handles one frame from the server. An error is fatal to the connection.
    fn on_frame(&self, frame: Frame) -> Result<(), Error> {
        let Frame { header, body } = frame;
        if header.flags == Flags::EVENT || header.request_id == EVENT_REQUEST_ID {
            match Event::decode(&header, body) {
                Ok(event) => self.on_event(event),
                // New event kinds may come with newer servers.
                Err(BodyError::UnknownOpcode(op)) => {
                    tracing::warn!(opcode = op, "ignoring an event with an unknown opcode");
                }
                // A garbled LOCK_LOST could hide the loss of any lock: only
                // closing the connection (the server then releases them all)
                // keeps every guard truthful.
                Err(e) => return Err(Error::Malformed(format!("event: {e}"))),
            }
            return Ok(());
        }
        let request_id = header.request_id;
        let pending = self
            .state()
            .pending
            .remove(&request_id)
            .ok_or_else(|| Error::Malformed(format!("reply to request {request_id}, which is not pending")))?;
        if header.opcode != pending.opcode as u8 {
            return Err(Error::Malformed(format!(
                "reply to {} request {request_id} carries opcode 0x{:02x}",
                pending.opcode, header.opcode
            )));
        }
        let mut response = match Response::decode(&header, body) {
            Ok(response) => response,
            Err(e) => {
                // An acquire may have been granted unless the reply was
                // recognisably a refusal (a status this client does not know,
                // or a known error whose message is broken).
                let maybe_granted = !e.is_error_reply();
                let error = Error::from_body_error(e, format_args!("reply to {} request {request_id}", pending.opcode));
                tracing::warn!(peer = %self.peer, %error, "undecodable reply; failing its request only");
                self.on_bad_reply(pending.update, maybe_granted);
                if let Some(tx) = pending.tx {
                    let _ = tx.send(Err(error));
                }
                return Ok(());
            }
        };
        let mut grant = None;
        match (pending.update, &mut response.result) {
            (HeldUpdate::Acquire { key, kind_len }, Ok(ResponseBody::Acquired(ok))) => {
                let shared = Arc::new(HeldGrant::new(key, kind_len, ok));
                if let Some(prev) = self.state().held.insert(shared.key.clone(), shared.clone()) {
                    // The server granted a key this connection already held:
                    // it cannot vouch for the old grant any more.
                    prev.mark_lost(LostReason::Unknown);
                }
                grant = Some(PendingGrant {
                    lock: Some(shared),
                    conn: self.me.clone(),
                });
            }
            (HeldUpdate::Release { key, token }, _) => self.finish_release(&key, token),
            _ => {}
        }
        if let Some(tx) = pending.tx {
            // If the caller stopped waiting, the reply is dropped here, and a
            // grant in it is given back by `PendingGrant`'s `Drop`.
            let _ = tx.send(Ok(Reply { response, grant }));
        }
        Ok(())
    }

    /// A reply to a tracked request could not be decoded: undo what the
    /// request may have done. An acquire that `maybe_granted` (answered `OK`
    /// with a broken body, or too short to tell) is released by "whichever
    /// grant this connection holds" (token 0; the client holds none of it, or
    /// it would not have sent the acquire). A release is treated as done: the
    /// guard is gone either way.
    fn on_bad_reply(&self, update: HeldUpdate, maybe_granted: bool) {
        match update {
            HeldUpdate::Acquire { key, kind_len } if maybe_granted => {
                let req = Request::Release {
                    kind: key[..kind_len].to_owned(),
                    id: key[kind_len + 1..].to_owned(),
                    token: 0,
                };
                let mut st = self.state();
                if st.dead.is_some() {
                    return;
                }
                st.releasing
                    .entry(key.clone())
                    .or_insert_with(|| Arc::new(Notify::new()));
                let update = HeldUpdate::Release { key, token: 0 };
                if let Err(e) = self.submit_locked(st, &req, None, update, None) {
                    tracing::debug!(error = %e, "release after an undecodable grant not sent");
                }
            }
            HeldUpdate::Release { key, token } => self.finish_release(&key, token),
            HeldUpdate::Acquire { .. } | HeldUpdate::None => {}
        }
    }

    /// A release of `key` (grant `token`, 0 for any) got its reply.
    fn finish_release(&self, key: &str, token: u64) {
        let mut st = self.state();
        if st.held.get(key).is_some_and(|l| token == 0 || l.token == token) {
            st.held.remove(key);
        }
        if let Some(n) = st.releasing.remove(key) {
            n.notify_waiters();
        }
    }

    fn on_event(&self, event: Event) {
        match &event {
            Event::LockLost {
                kind,
                id,
                token,
                reason,
            } => {
                let key = key(kind, id);
                let lock = {
                    let mut st = self.state();
                    match st.held.get(&key) {
                        Some(l) if l.token == *token => st.held.remove(&key),
                        _ => None,
                    }
                };
                match lock {
                    Some(lock) => {
                        tracing::warn!(%key, token, reason = reason.name(), "lock lost");
                        lock.mark_lost((*reason).into());
                    }
                    None => tracing::debug!(%key, token, "LOCK_LOST for a lock no guard holds"),
                }
            }
            // Delivered to `Client::rotate` through the event channel below.
            Event::RotateProgress { .. } => {}
            Event::Closing { status, message } => {
                tracing::info!(%status, %message, "server is closing the connection");
                self.state().closing = Some(format!("server closed the connection: {status} {message}"));
                // Heard: say so with a FIN, so a server keeping our locks
                // until their promised safe-until (on shutdown) need not.
                if let Err(e) = self.write.shutdown(std::net::Shutdown::Write) {
                    tracing::debug!(error = %e, "could not shut down the write side");
                }
            }
        }
        // Nobody listening is fine.
        let _ = self.events.send(ClientEvent::Server {
            connection_id: self.connection_id(),
            event,
        });
    }

    /// Fails everything still attached to the connection. Runs once, in the
    /// reader task, when it stops.
    fn teardown(&self, error: Option<Error>) {
        let (error, failure, pending, held, releasing) = {
            let mut st = self.state();
            let failure = error.is_some() || st.dead.is_some();
            let closing = st.closing.take();
            let error = st
                .dead
                .get_or_insert_with(|| {
                    error.unwrap_or_else(|| {
                        Error::ConnectionLost(closing.unwrap_or_else(|| "connection closed by the client".into()))
                    })
                })
                .clone();
            (
                error,
                failure,
                std::mem::take(&mut st.pending),
                std::mem::take(&mut st.held),
                std::mem::take(&mut st.releasing),
            )
        };
        self.closed.cancel();
        self.permits.close();
        if failure {
            // Handles (guards, the pool slot) may keep the socket open a while
            // longer; make sure the server sees the end now and releases what
            // this connection held, instead of keeping it for a client that has
            // already reported it lost.
            let _ = self.write.shutdown(std::net::Shutdown::Both);
        }
        for (_, p) in pending {
            if let Some(tx) = p.tx {
                let _ = tx.send(Err(error.clone()));
            }
        }
        for lock in held.values() {
            lock.mark_lost(LostReason::ConnectionLost);
        }
        for n in releasing.values() {
            n.notify_waiters();
        }
        if failure {
            tracing::warn!(peer = %self.peer, connection_id = self.connection_id(), %error, locks_lost = held.len(), "connection lost");
            let _ = self.events.send(ClientEvent::Disconnected {
                connection_id: self.connection_id(),
                error,
            });
        } else {
            tracing::debug!(connection_id = self.connection_id(), "connection closed");
        }
    }
}

async fn read_loop(shared: Arc<Connection>, mut frames: Box<dyn FrameSource>) {
    let error = loop {
        let next = tokio::select! {
            biased;
            () = shared.closed.cancelled() => break None,
            next = frames.next() => next,
        };
        shared.touch();
        match next {
            None => {
                let why = shared.state().closing.take();
                break Some(Error::ConnectionLost(
                    why.unwrap_or_else(|| "server closed the connection".into()),
                ));
            }
            Some(Err(FrameError::Io(e))) => break Some(Error::ConnectionLost(format!("read failed: {e}"))),
            Some(Err(e)) => break Some(Error::Malformed(e.to_string())),
            Some(Ok(frame)) => {
                if let Err(e) = shared.on_frame(frame) {
                    tracing::warn!(peer = %shared.peer, error = %e, "closing the connection");
                    break Some(e);
                }
            }
        }
    };
    shared.teardown(error);
}

async fn write_loop(shared: Arc<Connection>) {
    let Some(write) = shared.write.tcp() else {
        return;
    };
    loop {
        tokio::select! {
            () = shared.closed.cancelled() => return,
            () = shared.writer_wake.notified() => {}
        }
        let Some(mut chunk) = shared.state().stalled.take() else {
            continue;
        };
        loop {
            while !chunk.is_empty() {
                tokio::select! {
                    () = shared.closed.cancelled() => return,
                    ready = write.writable() => {
                        if let Err(e) = ready {
                            shared.fail(Error::ConnectionLost(format!("write failed: {e}")));
                            return;
                        }
                    }
                }
                match write.try_write(&chunk) {
                    Ok(0) => {
                        shared.fail(Error::ConnectionLost("write failed: socket closed".into()));
                        return;
                    }
                    Ok(n) => chunk.advance(n),
                    Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
                    Err(e) => {
                        shared.fail(Error::ConnectionLost(format!("write failed: {e}")));
                        return;
                    }
                }
            }
            let mut st = shared.state();
            if st.buf.is_empty() || st.dead.is_some() {
                st.writing = false;
                chunk.clear();
                if chunk.capacity() <= SPARE_CAPACITY {
                    st.spare = chunk;
                }
                break;
            }
            std::mem::swap(&mut chunk, &mut st.buf);
        }
    }
}

/// The writer task of a TLS connection: finishes what an inline write
/// could not (a full socket, records held back until a flush), batched like
/// the plain writer's.
#[cfg(feature = "tls")]
async fn tls_write_loop(shared: Arc<Connection>) {
    let Writer::Tls { half, .. } = &shared.write else {
        return;
    };
    loop {
        tokio::select! {
            () = shared.closed.cancelled() => return,
            () = shared.writer_wake.notified() => {}
        }
        let Some(mut chunk) = shared.state().stalled.take() else {
            continue;
        };
        loop {
            let written = tokio::select! {
                () = shared.closed.cancelled() => return,
                r = async {
                    let mut half = half.lock().await;
                    half.write_all(&chunk).await?;
                    half.flush().await
                } => r,
            };
            if let Err(e) = written {
                shared.fail(Error::ConnectionLost(format!("write failed: {e}")));
                return;
            }
            let mut st = shared.state();
            if st.buf.is_empty() || st.dead.is_some() {
                st.writing = false;
                chunk.clear();
                if chunk.capacity() <= SPARE_CAPACITY {
                    st.spare = chunk;
                }
                break;
            }
            chunk.clear();
            std::mem::swap(&mut chunk, &mut st.buf);
        }
    }
}

impl Connection {
    /// Every lock this connection holds, for [`Client::release_all`](crate::Client::release_all).
    pub(crate) fn held_locks(&self) -> Vec<Arc<HeldGrant>> {
        self.state().held.values().cloned().collect()
    }

    /// Asks the confirm loop for a `CONFIRM` now rather than at its next tick.
    pub(crate) fn confirm_soon(&self) {
        self.confirm_now.notify_one();
    }
}

/// Most `CONFIRM`s a connection leaves unanswered before it stops sending more.
const MAX_CONFIRMS_OUT: usize = 4;

/// Keeps the safe-until of every lock held through this connection fresh
/// (protocol version 2): a `CONFIRM` every `interval` while locks are held,
/// pipelined with whatever else is in flight and never skipped. Its reply
/// moves forward the safe-until of each grant received before it was sent
/// (a later grant may postdate the server's answer). A reply that does not
/// come only lets the safe-until run out: the guards fall into jeopardy,
/// which is the point.
async fn confirm_loop(shared: Arc<Connection>, interval: Duration) {
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
                let held: Vec<Arc<HeldGrant>> = shared.state().held.values().cloned().collect();
                for lock in held.iter().filter(|l| l.received < sent) {
                    lock.confirm(sent, safe_ms);
                }
            }
        });
    }
}

/// Pings when the connection has been quiet for `interval`, and declares it
/// lost if the ping is not answered within another `interval`: a peer that
/// vanished without a FIN would otherwise leave guards believing they hold
/// locks the server has long released.
async fn keepalive_loop(shared: Arc<Connection>, interval: Duration) {
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
