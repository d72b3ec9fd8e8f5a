//! Maps a decoded request onto the engine and back to a response body. Used
//! by the binary and the text form, so both have one semantics.

use std::sync::Arc;
use std::time::Duration;

use clastor_protocol::name::validate_trace_id;
use tokio::time::Instant;
use tracing::{Instrument, Span, debug, info_span};

use clastor_protocol::{
    AcquireOk, ErrorReply, HeldLock, HeldScope, KindMode, LockMode, Request, ResponseBody, Rotate, RotateOk,
    RotationProgress, Status, VersionInfo,
};

use super::auth::{Access, Permission};
use super::state::ServerState;
use crate::backend::Backend;
use crate::engine::{AcquireOptions, Engine, HeldInfo, Session};
use crate::error::LockError;
use crate::key::LockKey;

/// Longest server-wide `HELD` listing; the rest is left off (INFO counts all).
pub(crate) const MAX_HELD_LISTING: usize = 10_000;

/// What a connection needs to run a request.
#[derive(Debug)]
pub(crate) struct RequestContext<B: Backend> {
    pub(crate) engine: Engine<B>,
    pub(crate) session: Session<B>,
    /// The connection negotiated protocol version 2: grants and renewals
    /// carry `safe_ms`.
    pub(crate) reports_safe: bool,
    /// `VERSION` replies carry a draining kind's progress (version 2, text).
    pub(crate) reports_drain: bool,
    /// The connection negotiated protocol version 3 (or speaks text):
    /// `HELD` listings carry the grants' trace ids.
    pub(crate) reports_traces: bool,
    /// The connection negotiated protocol version 4 (or speaks text): it
    /// may take shared locks, and listings and `VERSION` carry modes and
    /// layouts.
    pub(crate) speaks_modes: bool,
    /// Who the connection is and what it may do (`auth/`).
    pub(crate) access: Access,
    /// The connection's peer, for the logs of refused `AUTH`s.
    pub(crate) peer: std::net::SocketAddr,
}

impl<B: Backend> Clone for RequestContext<B> {
    fn clone(&self) -> Self {
        RequestContext {
            engine: self.engine.clone(),
            session: self.session.clone(),
            reports_safe: self.reports_safe,
            reports_drain: self.reports_drain,
            reports_traces: self.reports_traces,
            speaks_modes: self.speaks_modes,
            access: self.access.clone(),
            peer: self.peer,
        }
    }
}

fn err(status: Status, message: impl Into<String>) -> ErrorReply {
    ErrorReply {
        status,
        message: message.into(),
    }
}

impl From<LockError> for ErrorReply {
    fn from(e: LockError) -> ErrorReply {
        err(e.status(), e.to_string())
    }
}

fn key(kind: &str, id: &str) -> Result<LockKey, ErrorReply> {
    LockKey::new(kind, id).map_err(|e| err(Status::InvalidName, e.to_string()))
}

/// Why a try-once was not granted, as far as this server can tell without
/// asking the backend again: a draining kind (which a try-once does not wait
/// for), or another owner.
fn tried_once<B: Backend>(engine: &Engine<B>, key: &LockKey) -> String {
    match engine.backend().cached_version(key.kind()) {
        Some(v) if v.mode == KindMode::Draining => format!(
            "kind {} is draining (a rotation from {}{}); a try-once does not wait for it",
            key.kind(),
            v.version,
            v.rotation.map(|r| format!(" to {}", r.to)).unwrap_or_default()
        ),
        _ => "held by another owner (tried once)".to_owned(),
    }
}

fn ms(v: u32) -> Duration {
    Duration::from_millis(u64::from(v))
}

/// Runs one request. `HELLO` is the connection's business and never reaches
/// here in binary mode; in text mode it is refused.
pub(crate) async fn dispatch<B: Backend>(
    ctx: &RequestContext<B>,
    shared: &ServerState<B>,
    req: Request,
) -> Result<ResponseBody, ErrorReply> {
    shared.stats.count_request(req.opcode());
    ctx.access.check(&req)?;
    match req {
        Request::Hello(_) => Err(err(Status::BadRequest, "HELLO is only valid as the first binary frame")),
        // The actors answer AUTH themselves: it changes the connection.
        Request::Auth { .. } => Err(err(Status::Internal, "AUTH reached dispatch")),
        Request::Ping => Ok(ResponseBody::Pong),
        Request::Acquire(a) => {
            let key = key(&a.kind, &a.id)?;
            let opts = AcquireOptions {
                wait: ms(a.wait_ms),
                lease: (a.lease_ms > 0).then(|| ms(a.lease_ms)),
                mode: a.mode,
            };
            let trace_id = match a.trace_id {
                Some(t) => {
                    validate_trace_id(&t).map_err(|e| err(Status::BadRequest, e.to_string()))?;
                    Some(Arc::<str>::from(t))
                }
                None => None,
            };
            if a.mode == LockMode::Shared && !ctx.speaks_modes {
                // After the session's own checks, before the lock is tried
                // (PROTOCOL.md, ACQUIRE, step 6).
                ctx.session.check_acquire(&key, &opts)?;
                return Err(err(
                    Status::Unsupported,
                    "shared locks need protocol version 4 (offer max_version 4 in HELLO)",
                ));
            }
            // Everything logged for this request, down to the backend, names its trace id.
            let span = match &trace_id {
                Some(t) => info_span!("request", trace_id = %t, connection = ctx.session.id()),
                None => Span::none(),
            };
            span.in_scope(|| debug!(%key, wait_ms = a.wait_ms, lease_ms = a.lease_ms, "acquire"));
            let granted = ctx
                .session
                .acquire_traced(&key, opts, trace_id)
                .instrument(span.clone())
                .await
                .inspect_err(|e| span.in_scope(|| debug!(error = %e, "acquire failed")))?;
            span.in_scope(|| debug!(granted = granted.is_some(), "acquire done"));
            match granted {
                Some(g) => Ok(ResponseBody::Acquired(AcquireOk {
                    token: g.token,
                    lease_ms: a.lease_ms,
                    version: g.version.to_string(),
                    safe_ms: ctx.reports_safe.then(|| safe_ms(ctx, shared, Some(&key))),
                })),
                None if a.wait_ms == 0 => Err(err(Status::Timeout, tried_once(&ctx.engine, &key))),
                None => Err(err(Status::Timeout, format!("not acquired within {} ms", a.wait_ms))),
            }
        }
        Request::Release { kind, id, token } => {
            let key = key(&kind, &id)?;
            let released = ctx.session.release_grant(&key, any_token(token)).await?;
            Ok(ResponseBody::Released { released })
        }
        Request::Renew {
            kind,
            id,
            lease_ms,
            token,
        } => {
            let key = key(&kind, &id)?;
            let g = ctx.session.renew_grant(&key, ms(lease_ms), any_token(token))?;
            Ok(ResponseBody::Renewed {
                token: g.token,
                lease_ms,
                safe_ms: ctx.reports_safe.then(|| safe_ms(ctx, shared, Some(&key))),
            })
        }
        Request::Held { scope } => {
            let held = match scope {
                HeldScope::Connection => ctx.session.held(),
                HeldScope::Server => ctx.engine.held_all(MAX_HELD_LISTING),
            };
            Ok(ResponseBody::Held(
                held.into_iter().map(|h| held_lock(h, ctx)).collect(),
            ))
        }
        Request::Version { kind } => {
            let (v, drain) = if ctx.reports_drain {
                Box::pin(ctx.engine.version_detail(&kind)).await?
            } else {
                (Box::pin(ctx.engine.version(&kind)).await?, None)
            };
            Ok(ResponseBody::Version(VersionInfo {
                version: v.version.to_string(),
                mode: v.mode,
                drain,
                layout: ctx.speaks_modes.then_some(v.layout),
            }))
        }
        // The actors hand progress to the client themselves (`rotate`).
        // Rare requests with big futures (a rotation drives a whole drain)
        // are boxed, so every request's future is not as big as theirs.
        Request::Rotate(r) => Box::pin(rotate(ctx, r, &|_| {})).await,
        Request::RotateAbort { kind } => {
            let (v, aborted) = Box::pin(ctx.engine.rotate_abort(&kind)).await?;
            Ok(ResponseBody::RotateAborted {
                version: v.version.to_string(),
                aborted,
            })
        }
        Request::Info if ctx.access.is_admin() => Ok(ResponseBody::Info(shared.info())),
        // Without admin, only what HELLO already tells.
        Request::Info => Ok(ResponseBody::Info(vec![
            ("server".to_owned(), shared.server_name()),
            (
                "principal".to_owned(),
                ctx.access.principal().unwrap_or_default().to_owned(),
            ),
        ])),
        Request::Confirm if !ctx.reports_safe => Err(err(
            Status::BadRequest,
            "CONFIRM needs protocol version 2 (offer max_version 2 in HELLO)",
        )),
        Request::Confirm => Ok(ResponseBody::Confirmed {
            safe_ms: safe_ms(ctx, shared, None),
        }),
    }
}

/// Runs a `ROTATE`, handing each progress report to `progress`.
pub(crate) async fn rotate<B: Backend>(
    ctx: &RequestContext<B>,
    r: Rotate,
    progress: &(dyn Fn(RotationProgress) + Send + Sync),
) -> Result<ResponseBody, ErrorReply> {
    // The actors call this directly for its progress: the same check as dispatch's.
    ctx.access.require(Permission::Rotate, Some(&r.kind))?;
    let timeout = ms(r.drain_timeout_ms);
    let (drained, leftover) = ctx
        .engine
        .rotate_to_layout(&r.kind, &r.from, &r.to, r.layout, timeout, progress)
        .await?;
    Ok(ResponseBody::Rotated(RotateOk {
        version: r.to,
        drain_ms: millis_u32(drained),
        leftover,
    }))
}

/// Token 0 on the wire means "whichever grant this connection holds".
fn any_token(token: u64) -> Option<u64> {
    (token != 0).then_some(token)
}

fn held_lock<B: Backend>(h: HeldInfo, ctx: &RequestContext<B>) -> HeldLock {
    listed(h, ctx.reports_traces, ctx.speaks_modes)
}

/// One held lock as listings show it, with its trace id and mode if the
/// listener speaks them.
pub(crate) fn listed(h: HeldInfo, traces: bool, modes: bool) -> HeldLock {
    HeldLock {
        trace_id: h.trace_id.filter(|_| traces).map(|t| t.to_string()),
        mode: modes.then_some(h.mode),
        kind: h.key.kind().to_owned(),
        id: h.key.id().to_owned(),
        // A token that is a capability (an HTTP lock's) is never listed:
        // 0, which no grant has (PROTOCOL.md, HELD OK).
        token: if h.token_private { 0 } else { h.token },
        version: h.version.to_string(),
        // A lease with under 1 ms left still reports 1, so 0 keeps meaning "no lease".
        lease_remaining_ms: h.lease_remaining.map_or(0, |d| millis_u32(d).max(1)),
        connection_id: h.session,
    }
}

/// Clamps a duration to whole milliseconds in `u32`.
/// The `safe_ms` of a reply: for how long from now nobody else can be
/// granted `key` (with `None`: any lock of the connection), capped by what the
/// server itself can promise a connection ([`ServerConfig::safe_horizon`]).
/// `u32::MAX` means no bound; 0 that nothing is held (a lock lost a moment
/// ago: its `LOCK_LOST` is already queued and goes out first).
///
/// [`ServerConfig::safe_horizon`]: super::ServerConfig::safe_horizon
pub(crate) fn safe_ms<B: Backend>(ctx: &RequestContext<B>, shared: &ServerState<B>, key: Option<&LockKey>) -> u32 {
    let now = Instant::now();
    let Some(held) = ctx.session.safe_until(key) else {
        return 0;
    };
    let held = held.map(|t| t.saturating_duration_since(now));
    let bound = match (held, shared.config.safe_horizon()) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    bound.map_or(u32::MAX, |d| millis_u32(d).min(u32::MAX - 1))
}

/// How often a version 2 client should send `CONFIRM`: the backend's pace
/// (ZooKeeper: as often as contact is proven), and at least four times per
/// server horizon.
pub(crate) fn confirm_ms<B: Backend>(shared: &ServerState<B>) -> u32 {
    let backend = shared.engine.backend().confirm_interval();
    let horizon = shared.config.safe_horizon().map(|h| h / 4);
    let every = match (backend, horizon) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => a.or(b).unwrap_or(Duration::from_secs(1)),
    };
    millis_u32(every).max(1)
}

fn millis_u32(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}
