//! Message types and their body encodings: requests (client → server),
//! responses (server → client, echoing the request id) and events (server →
//! client, request id 0).
//!
//! Encoders write the complete frame, length prefix included, after reserving
//! its exact size. Decoders take a body that framing already isolated, so a
//! short body is *malformed* ([`BodyError`]), never *incomplete*.

use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};

use crate::body_error::BodyError;
use crate::constants::{
    EVENT_REQUEST_ID, HEADER_LEN, HIGHEST_VERSION, LENGTH_PREFIX_LEN, MAX_TOKEN_LEN, PROTOCOL_VERSION,
};
use crate::header::{Flags, Header};
use crate::opcode::Opcode;
use crate::rotation::{DrainState, Rotate, RotateOk, RotationProgress};
use crate::status::Status;
use crate::wire::{Reader, put_string, string_len, truncate};

/// Lock mode requested by `ACQUIRE`. The field has been on the wire since
/// version 1; shared locks are granted from version 4 (a server answers
/// `UNSUPPORTED` to a shared `ACQUIRE` on a connection of version 1 to 3).
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum LockMode {
    /// One holder at a time (a writer).
    #[default]
    Exclusive = 0,
    /// Many holders at a time, none of them exclusive (readers). FIFO with
    /// the exclusive requests: a reader queued behind a writer waits for it.
    Shared = 1,
}

impl LockMode {
    /// The lower-case name used in logs, the text form and JSON.
    pub fn name(self) -> &'static str {
        match self {
            LockMode::Exclusive => "exclusive",
            LockMode::Shared => "shared",
        }
    }
}

/// How a kind's locks are laid out in the backend, which decides whether it
/// takes shared locks (version 4; PROTOCOL.md, "Layouts"). On ZooKeeper the
/// mutex layout is Curator's `InterProcessMutex` and the read-write layout
/// Curator's `InterProcessReadWriteLock`; other backends have one layout for
/// every kind. Changed only by a version rotation.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum KindLayout {
    /// Exclusive locks only.
    #[default]
    Mutex = 0,
    /// Exclusive and shared locks.
    ReadWrite = 1,
}

impl KindLayout {
    /// The lower-case name used in logs, the text form and JSON.
    pub fn name(self) -> &'static str {
        match self {
            KindLayout::Mutex => "mutex",
            KindLayout::ReadWrite => "read_write",
        }
    }

    /// Parses [`KindLayout::name`] (also `read-write` and `rw`).
    pub fn from_name(name: &str) -> Option<KindLayout> {
        match name.to_ascii_lowercase().as_str() {
            "mutex" => Some(KindLayout::Mutex),
            "read_write" | "read-write" | "rw" => Some(KindLayout::ReadWrite),
            _ => None,
        }
    }
}

impl TryFrom<u8> for KindLayout {
    /// The unknown value.
    type Error = u8;

    fn try_from(v: u8) -> Result<Self, u8> {
        match v {
            0 => Ok(KindLayout::Mutex),
            1 => Ok(KindLayout::ReadWrite),
            other => Err(other),
        }
    }
}

impl TryFrom<u8> for LockMode {
    /// The unknown value.
    type Error = u8;

    fn try_from(v: u8) -> Result<Self, u8> {
        match v {
            0 => Ok(LockMode::Exclusive),
            1 => Ok(LockMode::Shared),
            other => Err(other),
        }
    }
}

/// Whether `HELD` lists this connection's locks or every lock of the server.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum HeldScope {
    /// Locks held by the asking connection.
    #[default]
    Connection = 0,
    /// Locks held through this server by any connection.
    Server = 1,
}

impl TryFrom<u8> for HeldScope {
    /// The unknown value.
    type Error = u8;

    fn try_from(v: u8) -> Result<Self, u8> {
        match v {
            0 => Ok(HeldScope::Connection),
            1 => Ok(HeldScope::Server),
            other => Err(other),
        }
    }
}

/// A resource kind's lifecycle mode (see version rotation in DESIGN.md).
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum KindMode {
    /// Acquires proceed under the current version.
    #[default]
    Normal = 0,
    /// A rotation is draining the current version: new acquires wait.
    Draining = 1,
}

impl KindMode {
    /// Lower-case word used in the text form.
    pub fn name(self) -> &'static str {
        match self {
            KindMode::Normal => "normal",
            KindMode::Draining => "draining",
        }
    }
}

impl TryFrom<u8> for KindMode {
    /// The unknown value.
    type Error = u8;

    fn try_from(v: u8) -> Result<Self, u8> {
        match v {
            0 => Ok(KindMode::Normal),
            1 => Ok(KindMode::Draining),
            other => Err(other),
        }
    }
}

/// Why a held lock was lost.
///
/// Receivers read a value this version does not define as
/// [`LostReason::Unknown`] rather than failing (PROTOCOL.md §9): a client must
/// still learn that it lost the lock. [`Event::decode`] does that mapping;
/// `TryFrom<u8>` itself is strict, like every wire enum's.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LostReason {
    /// A reason this version does not know (forward compatibility).
    Unknown = 0,
    /// The lease ran out without a `RENEW`.
    LeaseExpired = 1,
    /// The backend session that held the lock expired.
    SessionExpired = 2,
    /// The backend was unreachable for long enough that the grant can no longer
    /// be guaranteed.
    BackendUnreachable = 3,
    /// The server is shutting down and released the lock.
    ServerShutdown = 4,
    /// The backend reported the lock gone for another reason.
    BackendError = 5,
    /// The lock's record in the backend was deleted from outside Clastor (an
    /// operator removed the ZooKeeper lock node).
    NodeDeleted = 6,
}

impl LostReason {
    /// Lower-case word used in the text form (`reason=<word>`).
    pub fn name(self) -> &'static str {
        match self {
            LostReason::Unknown => "unknown",
            LostReason::LeaseExpired => "lease_expired",
            LostReason::SessionExpired => "session_expired",
            LostReason::BackendUnreachable => "backend_unreachable",
            LostReason::ServerShutdown => "shutdown",
            LostReason::BackendError => "backend_error",
            LostReason::NodeDeleted => "node_deleted",
        }
    }
}

impl TryFrom<u8> for LostReason {
    /// The unknown value.
    type Error = u8;

    fn try_from(v: u8) -> Result<Self, u8> {
        match v {
            0 => Ok(LostReason::Unknown),
            1 => Ok(LostReason::LeaseExpired),
            2 => Ok(LostReason::SessionExpired),
            3 => Ok(LostReason::BackendUnreachable),
            4 => Ok(LostReason::ServerShutdown),
            5 => Ok(LostReason::BackendError),
            6 => Ok(LostReason::NodeDeleted),
            other => Err(other),
        }
    }
}

/// `HELLO` request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Lowest protocol version the client speaks.
    pub min_version: u8,
    /// Highest protocol version the client speaks.
    pub max_version: u8,
    /// Free-form client name for logs (`app-7/clastor-client 0.1`).
    pub client_name: String,
}

/// `ACQUIRE` request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acquire {
    /// Resource kind (namespace).
    pub kind: String,
    /// Resource id within the kind.
    pub id: String,
    /// How long to wait for the lock, in ms; 0 tries once.
    pub wait_ms: u32,
    /// Lease in ms; 0 means no lease (held until released or disconnected).
    pub lease_ms: u32,
    /// Requested mode.
    pub mode: LockMode,
    /// Version 3: a trace id the server logs with everything this request
    /// and its grant do, and lists with the grant in `HELD`. On the wire only
    /// when `Some` (send it only on a connection that negotiated version 3).
    pub trace_id: Option<String>,
}

/// The secret an `AUTH` carries. Its `Debug` never shows it, so a request
/// logged with `?` leaks nothing; [`AuthToken::expose`] is the one way in.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthToken(String);

impl AuthToken {
    /// Wraps a token.
    pub fn new(token: impl Into<String>) -> AuthToken {
        AuthToken(token.into())
    }

    /// The secret itself, for hashing or sending.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for AuthToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuthToken(<redacted>)")
    }
}

/// A request from client to server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Handshake.
    Hello(Hello),
    /// Liveness probe.
    Ping,
    /// Take a lock.
    Acquire(Acquire),
    /// Give a lock back.
    Release {
        /// Resource kind.
        kind: String,
        /// Resource id.
        id: String,
        /// Release only the grant with this fencing token; 0 releases whatever
        /// grant of the key this connection holds. A holder that names its
        /// token can never release a later grant by mistake.
        token: u64,
    },
    /// Extend a lease.
    Renew {
        /// Resource kind.
        kind: String,
        /// Resource id.
        id: String,
        /// New lease from now, in ms (must be > 0).
        lease_ms: u32,
        /// Renew only the grant with this fencing token; 0 renews whatever
        /// grant of the key this connection holds.
        token: u64,
    },
    /// List held locks.
    Held {
        /// Whose.
        scope: HeldScope,
    },
    /// A kind's version and mode.
    Version {
        /// Resource kind.
        kind: String,
    },
    /// Server information and counters.
    Info,
    /// `CONFIRM` (version 2): how long this connection's locks stay safe.
    Confirm,
    /// Admin: rotate a kind to a new version.
    Rotate(Rotate),
    /// Admin: abort a kind's rotation.
    RotateAbort {
        /// Resource kind.
        kind: String,
    },
    /// Authenticate the connection (every protocol version).
    Auth {
        /// The secret (at most [`MAX_TOKEN_LEN`] bytes).
        token: AuthToken,
    },
}

impl Request {
    /// The opcode this request travels under.
    pub fn opcode(&self) -> Opcode {
        match self {
            Request::Hello(_) => Opcode::Hello,
            Request::Ping => Opcode::Ping,
            Request::Acquire(_) => Opcode::Acquire,
            Request::Release { .. } => Opcode::Release,
            Request::Renew { .. } => Opcode::Renew,
            Request::Held { .. } => Opcode::Held,
            Request::Version { .. } => Opcode::Version,
            Request::Info => Opcode::Info,
            Request::Confirm => Opcode::Confirm,
            Request::Rotate(_) => Opcode::Rotate,
            Request::RotateAbort { .. } => Opcode::RotateAbort,
            Request::Auth { .. } => Opcode::Auth,
        }
    }

    fn body_len(&self) -> usize {
        match self {
            Request::Hello(h) => 2 + string_len(&h.client_name),
            Request::Ping | Request::Info | Request::Confirm => 0,
            Request::Acquire(a) => {
                string_len(&a.kind) + string_len(&a.id) + 4 + 4 + 1 + a.trace_id.as_deref().map_or(0, string_len)
            }
            Request::Release { kind, id, .. } => string_len(kind) + string_len(id) + 8,
            Request::Renew { kind, id, .. } => string_len(kind) + string_len(id) + 4 + 8,
            Request::Held { .. } => 1,
            Request::Version { kind } | Request::RotateAbort { kind } => string_len(kind),
            Request::Rotate(r) => r.len(),
            Request::Auth { token } => string_len(token.expose()),
        }
    }

    /// Appends the whole frame (length prefix, header, body) to `dst`.
    pub fn encode(&self, request_id: u32, dst: &mut BytesMut) {
        let body_len = self.body_len();
        let header = Header {
            version: PROTOCOL_VERSION,
            opcode: self.opcode() as u8,
            flags: Flags::REQUEST,
            request_id,
        };
        let dst = start_frame(dst, &header, body_len);
        match self {
            Request::Hello(h) => {
                dst.put_u8(h.min_version);
                dst.put_u8(h.max_version);
                put_string(dst, &h.client_name);
            }
            Request::Ping | Request::Info | Request::Confirm => {}
            Request::Acquire(a) => {
                put_string(dst, &a.kind);
                put_string(dst, &a.id);
                dst.put_u32(a.wait_ms);
                dst.put_u32(a.lease_ms);
                dst.put_u8(a.mode as u8);
                if let Some(trace_id) = &a.trace_id {
                    put_string(dst, trace_id);
                }
            }
            Request::Release { kind, id, token } => {
                put_string(dst, kind);
                put_string(dst, id);
                dst.put_u64(*token);
            }
            Request::Renew {
                kind,
                id,
                lease_ms,
                token,
            } => {
                put_string(dst, kind);
                put_string(dst, id);
                dst.put_u32(*lease_ms);
                dst.put_u64(*token);
            }
            Request::Held { scope } => dst.put_u8(*scope as u8),
            Request::Version { kind } | Request::RotateAbort { kind } => put_string(dst, kind),
            Request::Rotate(r) => r.write(dst),
            Request::Auth { token } => put_string(dst, token.expose()),
        }
    }

    /// Decodes a request body. The header must already have passed the frame
    /// checks (version); this checks the opcode, then the flags, then the body
    /// (PROTOCOL.md §12). An event opcode is not a request: it is unknown here,
    /// whatever the flags say.
    pub fn decode(header: &Header, body: Bytes) -> Result<Request, BodyError> {
        Request::decode_for(header, body, HIGHEST_VERSION)
    }

    /// Decodes a request body as a connection of protocol `version` reads it:
    /// fields that version does not have are trailing bytes, so malformed
    /// (an `ACQUIRE` with a `trace_id` on a version 1 or 2 connection,
    /// PROTOCOL.md §2.2), exactly as a server speaking only that version
    /// would answer. Before the handshake, pass [`HIGHEST_VERSION`].
    pub fn decode_for(header: &Header, body: Bytes, version: u8) -> Result<Request, BodyError> {
        let op = Opcode::try_from(header.opcode)
            .ok()
            .filter(|op| !op.is_event())
            .ok_or(BodyError::UnknownOpcode(header.opcode))?;
        if header.flags != Flags::REQUEST {
            return Err(BodyError::BadFlags(header.flags.0));
        }
        let mut r = Reader::new(body);
        let req = match op {
            Opcode::Hello => Request::Hello(Hello {
                min_version: r.u8("min_version")?,
                max_version: r.u8("max_version")?,
                client_name: r.string("client_name")?,
            }),
            Opcode::Ping => Request::Ping,
            Opcode::Acquire => Request::Acquire(Acquire {
                kind: r.string("kind")?,
                id: r.string("id")?,
                wait_ms: r.u32("wait_ms")?,
                lease_ms: r.u32("lease_ms")?,
                mode: r.enum_u8("mode")?,
                trace_id: if version >= 3 {
                    r.optional_string("trace_id")?
                } else {
                    None
                },
            }),
            Opcode::Release => Request::Release {
                kind: r.string("kind")?,
                id: r.string("id")?,
                token: r.u64("token")?,
            },
            Opcode::Renew => Request::Renew {
                kind: r.string("kind")?,
                id: r.string("id")?,
                lease_ms: r.u32("lease_ms")?,
                token: r.u64("token")?,
            },
            Opcode::Held => Request::Held {
                scope: r.enum_u8("scope")?,
            },
            Opcode::Version => Request::Version {
                kind: r.string("kind")?,
            },
            Opcode::Info => Request::Info,
            Opcode::Confirm => Request::Confirm,
            Opcode::Rotate => Request::Rotate(Rotate::read(&mut r, version)?),
            Opcode::RotateAbort => Request::RotateAbort {
                kind: r.string("kind")?,
            },
            Opcode::Auth => {
                let token = r.string("token")?;
                if token.len() > MAX_TOKEN_LEN {
                    return Err(BodyError::TooLong {
                        field: "token",
                        max: MAX_TOKEN_LEN,
                    });
                }
                Request::Auth {
                    token: AuthToken(token),
                }
            }
            // Filtered out above; kept so a new event opcode is a compile error here.
            Opcode::LockLost | Opcode::Closing | Opcode::RotateProgress => {
                return Err(BodyError::UnknownOpcode(header.opcode));
            }
        };
        r.finish()?;
        Ok(req)
    }
}

/// Whether a `HELD` listing carries its trace-id section (version 3; always
/// with a mode section, version 4).
fn has_trace_ids(list: &[HeldLock]) -> bool {
    has_modes(list) || list.iter().take(usize::from(u16::MAX)).any(|h| h.trace_id.is_some())
}

/// Whether a `HELD` listing carries its mode section (version 4).
fn has_modes(list: &[HeldLock]) -> bool {
    list.iter().take(usize::from(u16::MAX)).any(|h| h.mode.is_some())
}

/// Encoded size of an optional trailing `u32`.
fn optional_len(v: Option<u32>) -> usize {
    if v.is_some() { 4 } else { 0 }
}

/// `HELLO` response body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloOk {
    /// The protocol version chosen for this connection.
    pub version: u8,
    /// The server's id for this connection (appears in logs and `HELD` listings).
    pub connection_id: u64,
    /// Largest frame length the server accepts.
    pub max_frame_len: u32,
    /// Requests the server processes concurrently on this connection; more are
    /// read only as earlier ones finish.
    pub max_in_flight: u32,
    /// Server name and version (`clastor 0.1.0 (memory)`).
    pub server: String,
    /// Version 2: how often the client should send `CONFIRM`, in ms. On the
    /// wire exactly when `version` is 2 or more (as 0 if `None`).
    pub confirm_ms: Option<u32>,
}

/// `ACQUIRE` success body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcquireOk {
    /// Fencing token: strictly greater than every token granted before for the key.
    pub token: u64,
    /// Lease granted in ms, 0 if none.
    pub lease_ms: u32,
    /// The kind's version the lock was taken under.
    pub version: String,
    /// Version 2: for how long after the server handled the request it
    /// guarantees nobody else is granted this lock; the client counts it from
    /// when it sent the request. On the wire only when `Some`.
    pub safe_ms: Option<u32>,
}

/// One entry of a `HELD` listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldLock {
    /// Resource kind.
    pub kind: String,
    /// Resource id.
    pub id: String,
    /// The grant's fencing token.
    pub token: u64,
    /// Version the lock was taken under.
    pub version: String,
    /// Lease left in ms, 0 if the lock has no lease.
    pub lease_remaining_ms: u32,
    /// Holding connection's id.
    pub connection_id: u64,
    /// Version 3: the trace id the grant was acquired with. A server sends
    /// trace ids only to connections that negotiated version 3 (see
    /// [`ResponseBody::Held`]).
    pub trace_id: Option<String>,
    /// Version 4: the grant's mode. A server sends modes only to connections
    /// that negotiated version 4 (see [`ResponseBody::Held`]).
    pub mode: Option<LockMode>,
}

/// `VERSION` response body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionInfo {
    /// Current version name (`v1`).
    pub version: String,
    /// Current mode.
    pub mode: KindMode,
    /// Version 2, while the kind drains: where the rotation is. On the wire
    /// only when `Some`.
    pub drain: Option<DrainState>,
    /// Version 4: the kind's layout (whether it takes shared locks). On the
    /// wire only when `Some`, after `drain`.
    pub layout: Option<KindLayout>,
}

/// The body of a successful response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResponseBody {
    /// To `HELLO`.
    Hello(HelloOk),
    /// To `PING`.
    Pong,
    /// To `ACQUIRE`.
    Acquired(AcquireOk),
    /// To `RELEASE`: whether this call released the lock (false: it was not held,
    /// which is not an error — release is idempotent).
    Released {
        /// True if the lock was held by this connection and is now released.
        released: bool,
    },
    /// To `RENEW`.
    Renewed {
        /// The grant's token (unchanged by renewal).
        token: u64,
        /// The new lease in ms.
        lease_ms: u32,
        /// Version 2: as [`AcquireOk::safe_ms`]. On the wire only when `Some`.
        safe_ms: Option<u32>,
    },
    /// To `HELD`. Version 3: when any entry has a trace id, the entries are
    /// followed by one `trace_id` string per entry (empty for none). Version
    /// 4: when any entry has a mode, the trace-id section is always there,
    /// followed by one `mode` byte per entry.
    Held(Vec<HeldLock>),
    /// To `VERSION`.
    Version(VersionInfo),
    /// To `INFO`: ordered `name → value` pairs.
    Info(Vec<(String, String)>),
    /// To `ROTATE`: the rotation completed.
    Rotated(RotateOk),
    /// To `ROTATE_ABORT`.
    RotateAborted {
        /// The kind's version now.
        version: String,
        /// True if a rotation was aborted (the kind was draining and is now
        /// normal); false if there was nothing to abort.
        aborted: bool,
    },
    /// To `AUTH`: the connection now acts as this principal.
    Authenticated {
        /// The principal's name (from the server's auth file).
        principal: String,
    },
    /// To `CONFIRM`: for how long after the server handled it no lock this
    /// connection holds will be granted to anyone else (the client counts it
    /// from when it sent the request).
    Confirmed {
        /// Milliseconds; `u32::MAX` if no bound applies.
        safe_ms: u32,
    },
}

impl ResponseBody {
    /// The opcode of the request this body answers.
    pub fn opcode(&self) -> Opcode {
        match self {
            ResponseBody::Hello(_) => Opcode::Hello,
            ResponseBody::Pong => Opcode::Ping,
            ResponseBody::Acquired(_) => Opcode::Acquire,
            ResponseBody::Released { .. } => Opcode::Release,
            ResponseBody::Renewed { .. } => Opcode::Renew,
            ResponseBody::Held(_) => Opcode::Held,
            ResponseBody::Version(_) => Opcode::Version,
            ResponseBody::Info(_) => Opcode::Info,
            ResponseBody::Confirmed { .. } => Opcode::Confirm,
            ResponseBody::Rotated(_) => Opcode::Rotate,
            ResponseBody::RotateAborted { .. } => Opcode::RotateAbort,
            ResponseBody::Authenticated { .. } => Opcode::Auth,
        }
    }

    fn len(&self) -> usize {
        match self {
            ResponseBody::Hello(h) => 1 + 8 + 4 + 4 + string_len(&h.server) + if h.version >= 2 { 4 } else { 0 },
            ResponseBody::Pong => 0,
            ResponseBody::Acquired(a) => 8 + 4 + string_len(&a.version) + optional_len(a.safe_ms),
            ResponseBody::Released { .. } => 1,
            ResponseBody::Renewed { safe_ms, .. } => 12 + optional_len(*safe_ms),
            ResponseBody::Confirmed { .. } => 4,
            ResponseBody::Held(list) => {
                2 + list
                    .iter()
                    .take(usize::from(u16::MAX))
                    .map(|h| string_len(&h.kind) + string_len(&h.id) + 8 + string_len(&h.version) + 4 + 8)
                    .sum::<usize>()
                    + if has_trace_ids(list) {
                        list.iter()
                            .take(usize::from(u16::MAX))
                            .map(|h| string_len(h.trace_id.as_deref().unwrap_or_default()))
                            .sum::<usize>()
                    } else {
                        0
                    }
                    + if has_modes(list) {
                        list.len().min(usize::from(u16::MAX))
                    } else {
                        0
                    }
            }
            ResponseBody::Version(v) => {
                string_len(&v.version)
                    + 1
                    + v.drain.as_ref().map_or(0, DrainState::len)
                    + usize::from(v.layout.is_some())
            }
            ResponseBody::Rotated(r) => r.len(),
            ResponseBody::RotateAborted { version, .. } => string_len(version) + 1,
            ResponseBody::Authenticated { principal } => string_len(principal),
            ResponseBody::Info(pairs) => {
                2 + pairs
                    .iter()
                    .take(usize::from(u16::MAX))
                    .map(|(k, v)| string_len(k) + string_len(v))
                    .sum::<usize>()
            }
        }
    }

    fn write(&self, dst: &mut BytesMut) {
        match self {
            ResponseBody::Hello(h) => {
                dst.put_u8(h.version);
                dst.put_u64(h.connection_id);
                dst.put_u32(h.max_frame_len);
                dst.put_u32(h.max_in_flight);
                put_string(dst, &h.server);
                if h.version >= 2 {
                    dst.put_u32(h.confirm_ms.unwrap_or(0));
                }
            }
            ResponseBody::Pong => {}
            ResponseBody::Acquired(a) => {
                dst.put_u64(a.token);
                dst.put_u32(a.lease_ms);
                put_string(dst, &a.version);
                if let Some(safe_ms) = a.safe_ms {
                    dst.put_u32(safe_ms);
                }
            }
            ResponseBody::Released { released } => dst.put_u8(u8::from(*released)),
            ResponseBody::Renewed {
                token,
                lease_ms,
                safe_ms,
            } => {
                dst.put_u64(*token);
                dst.put_u32(*lease_ms);
                if let Some(safe_ms) = safe_ms {
                    dst.put_u32(*safe_ms);
                }
            }
            ResponseBody::Confirmed { safe_ms } => dst.put_u32(*safe_ms),
            ResponseBody::Held(list) => {
                dst.put_u16(clamp_count(list.len()));
                for h in list.iter().take(usize::from(u16::MAX)) {
                    put_string(dst, &h.kind);
                    put_string(dst, &h.id);
                    dst.put_u64(h.token);
                    put_string(dst, &h.version);
                    dst.put_u32(h.lease_remaining_ms);
                    dst.put_u64(h.connection_id);
                }
                if has_trace_ids(list) {
                    for h in list.iter().take(usize::from(u16::MAX)) {
                        put_string(dst, h.trace_id.as_deref().unwrap_or_default());
                    }
                }
                if has_modes(list) {
                    for h in list.iter().take(usize::from(u16::MAX)) {
                        dst.put_u8(h.mode.unwrap_or_default() as u8);
                    }
                }
            }
            ResponseBody::Version(v) => {
                put_string(dst, &v.version);
                dst.put_u8(v.mode as u8);
                if let Some(drain) = &v.drain {
                    drain.write(dst);
                }
                if let Some(layout) = v.layout {
                    dst.put_u8(layout as u8);
                }
            }
            ResponseBody::Rotated(r) => r.write(dst),
            ResponseBody::RotateAborted { version, aborted } => {
                put_string(dst, version);
                dst.put_u8(u8::from(*aborted));
            }
            ResponseBody::Authenticated { principal } => put_string(dst, principal),
            ResponseBody::Info(pairs) => {
                dst.put_u16(clamp_count(pairs.len()));
                for (k, v) in pairs.iter().take(usize::from(u16::MAX)) {
                    put_string(dst, k);
                    put_string(dst, v);
                }
            }
        }
    }

    fn read(op: Opcode, r: &mut Reader) -> Result<ResponseBody, BodyError> {
        Ok(match op {
            Opcode::Hello => {
                let version = r.u8("version")?;
                ResponseBody::Hello(HelloOk {
                    version,
                    connection_id: r.u64("connection_id")?,
                    max_frame_len: r.u32("max_frame_len")?,
                    max_in_flight: r.u32("max_in_flight")?,
                    server: r.string("server")?,
                    confirm_ms: if version >= 2 { Some(r.u32("confirm_ms")?) } else { None },
                })
            }
            Opcode::Ping => ResponseBody::Pong,
            Opcode::Acquire => ResponseBody::Acquired(AcquireOk {
                token: r.u64("token")?,
                lease_ms: r.u32("lease_ms")?,
                version: r.string("version")?,
                safe_ms: r.optional_u32("safe_ms")?,
            }),
            Opcode::Release => ResponseBody::Released {
                released: r.bool("released")?,
            },
            Opcode::Renew => ResponseBody::Renewed {
                token: r.u64("token")?,
                lease_ms: r.u32("lease_ms")?,
                safe_ms: r.optional_u32("safe_ms")?,
            },
            Opcode::Confirm => ResponseBody::Confirmed {
                safe_ms: r.u32("safe_ms")?,
            },
            Opcode::Held => {
                // Smallest entry: three empty strings (6) + token, lease, connection (20).
                let n = r.count("count", 26)?;
                let mut list = Vec::with_capacity(n);
                for _ in 0..n {
                    list.push(HeldLock {
                        kind: r.string("kind")?,
                        id: r.string("id")?,
                        token: r.u64("token")?,
                        version: r.string("version")?,
                        lease_remaining_ms: r.u32("lease_remaining_ms")?,
                        connection_id: r.u64("connection_id")?,
                        trace_id: None,
                        mode: None,
                    });
                }
                // Version 3: one trace id per entry, if any grant has one.
                if r.has_remaining() {
                    for h in &mut list {
                        h.trace_id = Some(r.string("trace_id")?).filter(|t| !t.is_empty());
                    }
                }
                // Version 4: one mode per entry.
                if r.has_remaining() {
                    for h in &mut list {
                        h.mode = Some(r.enum_u8("mode")?);
                    }
                }
                ResponseBody::Held(list)
            }
            Opcode::Version => {
                let version = r.string("version")?;
                let mode = r.enum_u8("mode")?;
                // A drain state is longer than one byte; a lone byte is the
                // version 4 layout of a kind that does not drain.
                let drain = if r.remaining() > 1 {
                    Some(DrainState::read(r)?)
                } else {
                    None
                };
                let layout = if r.has_remaining() {
                    Some(r.enum_u8("layout")?)
                } else {
                    None
                };
                ResponseBody::Version(VersionInfo {
                    version,
                    mode,
                    drain,
                    layout,
                })
            }
            Opcode::Rotate => ResponseBody::Rotated(RotateOk::read(r)?),
            Opcode::RotateAbort => ResponseBody::RotateAborted {
                version: r.string("version")?,
                aborted: r.bool("aborted")?,
            },
            Opcode::Auth => ResponseBody::Authenticated {
                principal: r.string("principal")?,
            },
            Opcode::Info => {
                let n = r.count("count", 4)?;
                let mut pairs = Vec::with_capacity(n);
                for _ in 0..n {
                    pairs.push((r.string("name")?, r.string("value")?));
                }
                ResponseBody::Info(pairs)
            }
            Opcode::LockLost | Opcode::Closing | Opcode::RotateProgress => {
                return Err(BodyError::UnknownOpcode(op as u8));
            }
        })
    }
}

/// An error outcome: a status other than `OK` and a short human message.
///
/// [`Status`] is a closed enum of the codes this version defines, which is
/// what a server sends. A received reply with a code this version does not
/// define is not an `ErrorReply`: [`Response::decode`] returns it as
/// [`BodyError::UnknownStatus`], carrying the code and the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorReply {
    /// What went wrong (never [`Status::Ok`]).
    pub status: Status,
    /// Human-readable detail; not meant to be parsed.
    pub message: String,
}

/// A response: the request's id and raw opcode, and its outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Echo of the request id.
    pub request_id: u32,
    /// Echo of the request's raw opcode (may be unknown for an `UNKNOWN_OPCODE` reply).
    pub opcode: u8,
    /// Outcome.
    pub result: Result<ResponseBody, ErrorReply>,
}

impl Response {
    /// A successful response.
    pub fn ok(request_id: u32, body: ResponseBody) -> Response {
        Response {
            request_id,
            opcode: body.opcode() as u8,
            result: Ok(body),
        }
    }

    /// An error response. `status` must not be [`Status::Ok`]; if it is, the
    /// reply is sent as [`Status::Internal`] so the peer never sees OK without a body.
    pub fn error(request_id: u32, opcode: u8, status: Status, message: impl Into<String>) -> Response {
        let status = if status == Status::Ok { Status::Internal } else { status };
        Response {
            request_id,
            opcode,
            result: Err(ErrorReply {
                status,
                message: message.into(),
            }),
        }
    }

    /// The status this response carries.
    pub fn status(&self) -> Status {
        match &self.result {
            Ok(_) => Status::Ok,
            Err(e) => e.status,
        }
    }

    /// Appends the whole frame to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) {
        let body_len = 2 + match &self.result {
            Ok(body) => body.len(),
            Err(e) => string_len(truncate(&e.message, MAX_MESSAGE_LEN)),
        };
        let header = Header {
            version: PROTOCOL_VERSION,
            opcode: self.opcode,
            flags: Flags::RESPONSE,
            request_id: self.request_id,
        };
        let dst = start_frame(dst, &header, body_len);
        match &self.result {
            Ok(body) => {
                dst.put_u16(Status::Ok as u16);
                body.write(dst);
            }
            Err(e) => {
                dst.put_u16(e.status as u16);
                put_string(dst, truncate(&e.message, MAX_MESSAGE_LEN));
            }
        }
    }

    /// Decodes a response body (client side).
    ///
    /// An error reply whose status code this version does not define is
    /// well-formed, but [`Status`] cannot hold its code: it comes back as
    /// [`BodyError::UnknownStatus`] with the code and the message, once the
    /// whole body has been read (PROTOCOL.md §8).
    pub fn decode(header: &Header, body: Bytes) -> Result<Response, BodyError> {
        if header.flags != Flags::RESPONSE {
            return Err(BodyError::BadFlags(header.flags.0));
        }
        let mut r = Reader::new(body);
        let status = match Status::try_from(r.u16("status")?) {
            Ok(status) => status,
            Err(code) => {
                let message = r.string("message")?;
                r.finish()?;
                return Err(BodyError::UnknownStatus { code, message });
            }
        };
        let result = if status == Status::Ok {
            let op = Opcode::try_from(header.opcode).map_err(BodyError::UnknownOpcode)?;
            Ok(ResponseBody::read(op, &mut r)?)
        } else {
            Err(ErrorReply {
                status,
                message: r.string("message")?,
            })
        };
        r.finish()?;
        Ok(Response {
            request_id: header.request_id,
            opcode: header.opcode,
            result,
        })
    }
}

/// Error and event messages are cut to this many bytes on encode.
pub const MAX_MESSAGE_LEN: usize = 1024;

/// A frame the server pushes unprompted: request id 0, except
/// `ROTATE_PROGRESS`, which carries the id of the `ROTATE` it reports on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A lock held by this connection can no longer be guaranteed; the
    /// connection no longer holds it.
    LockLost {
        /// Resource kind.
        kind: String,
        /// Resource id.
        id: String,
        /// The token of the lost grant.
        token: u64,
        /// Why.
        reason: LostReason,
    },
    /// The server closes the connection right after this frame.
    Closing {
        /// Why (e.g. `SHUTTING_DOWN`, `PROTOCOL_ERROR`, `LIMIT_EXCEEDED`).
        status: Status,
        /// Detail.
        message: String,
    },
    /// How a `ROTATE` this connection sent is doing.
    RotateProgress {
        /// The `ROTATE`'s request id.
        request_id: u32,
        /// Where it is.
        progress: RotationProgress,
    },
}

impl Event {
    /// The opcode this event travels under.
    pub fn opcode(&self) -> Opcode {
        match self {
            Event::LockLost { .. } => Opcode::LockLost,
            Event::Closing { .. } => Opcode::Closing,
            Event::RotateProgress { .. } => Opcode::RotateProgress,
        }
    }

    /// Appends the whole frame to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) {
        let body_len = match self {
            Event::LockLost { kind, id, .. } => string_len(kind) + string_len(id) + 8 + 1,
            Event::Closing { message, .. } => 2 + string_len(truncate(message, MAX_MESSAGE_LEN)),
            Event::RotateProgress { progress, .. } => progress.len(),
        };
        let header = Header {
            version: PROTOCOL_VERSION,
            opcode: self.opcode() as u8,
            flags: Flags::EVENT,
            request_id: match self {
                Event::RotateProgress { request_id, .. } => *request_id,
                Event::LockLost { .. } | Event::Closing { .. } => EVENT_REQUEST_ID,
            },
        };
        let dst = start_frame(dst, &header, body_len);
        match self {
            Event::LockLost {
                kind,
                id,
                token,
                reason,
            } => {
                put_string(dst, kind);
                put_string(dst, id);
                dst.put_u64(*token);
                dst.put_u8(*reason as u8);
            }
            Event::Closing { status, message } => {
                dst.put_u16(*status as u16);
                put_string(dst, truncate(message, MAX_MESSAGE_LEN));
            }
            Event::RotateProgress { progress, .. } => progress.write(dst),
        }
    }

    /// Decodes an event body (client side).
    pub fn decode(header: &Header, body: Bytes) -> Result<Event, BodyError> {
        if header.flags != Flags::EVENT {
            return Err(BodyError::BadFlags(header.flags.0));
        }
        let mut r = Reader::new(body);
        let ev = match Opcode::try_from(header.opcode) {
            Ok(Opcode::LockLost) => Event::LockLost {
                kind: r.string("kind")?,
                id: r.string("id")?,
                token: r.u64("token")?,
                // Unknown reasons are read as `Unknown` (§9): new ones may be
                // added, and the holder must still learn of the loss.
                reason: match r.enum_u8("reason") {
                    Err(BodyError::BadEnum { .. }) => LostReason::Unknown,
                    reason => reason?,
                },
            },
            Ok(Opcode::Closing) => {
                let raw = r.u16("status")?;
                Event::Closing {
                    status: Status::try_from(raw).unwrap_or(Status::Internal),
                    message: r.string("message")?,
                }
            }
            Ok(Opcode::RotateProgress) => Event::RotateProgress {
                request_id: header.request_id,
                progress: RotationProgress::read(&mut r)?,
            },
            _ => return Err(BodyError::UnknownOpcode(header.opcode)),
        };
        r.finish()?;
        Ok(ev)
    }
}

fn clamp_count(n: usize) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

/// Reserves the exact frame size, writes prefix and header, and hands back the
/// buffer for the body.
fn start_frame<'a>(dst: &'a mut BytesMut, header: &Header, body_len: usize) -> &'a mut BytesMut {
    let frame_len = HEADER_LEN + body_len;
    dst.reserve(LENGTH_PREFIX_LEN + frame_len);
    // Bodies are bounded far below 4 GiB (strings ≤ 64 KiB, counts ≤ 65535).
    dst.put_u32(u32::try_from(frame_len).unwrap_or(u32::MAX));
    header.write(dst);
    dst
}
