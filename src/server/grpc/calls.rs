//! One gRPC request, unary or on the stream, onto the server's `dispatch`
//! (the binary protocol's semantics, version 4 with safe-until) and its
//! reply back into the `.proto`'s messages. The idempotent acquire lives
//! here: a retry with the request id of a grant the session still holds
//! gets that grant.

use clastor_protocol::{
    Acquire, ErrorReply, HeldLock, HeldScope, KindLayout, KindMode, LockMode, Request, ResponseBody, Status,
};

use super::proto;
use super::sessions::{Entry, Owner};
use crate::backend::Backend;
use crate::key::LockKey;
use crate::server::dispatch::{MAX_HELD_LISTING, RequestContext, dispatch, listed};
use crate::server::state::ServerState;

/// How a session's requests are run: the binary protocol's version 4, with
/// safe-until, trace ids in listings and modes.
pub(super) fn context<B: Backend>(shared: &ServerState<B>, entry: &Entry<B>) -> RequestContext<B> {
    RequestContext {
        engine: shared.engine.clone(),
        session: entry.session.clone(),
        reports_safe: true,
        reports_drain: false,
        reports_traces: true,
        speaks_modes: true,
        // Who opened the session (`auth.rs`); `dispatch` checks each
        // request's permission against it.
        access: entry.access.clone(),
        // Only the logs of refused `AUTH`s name it, and gRPC sends none
        // (its credentials are checked per call, in `auth.rs`).
        peer: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
    }
}

fn unexpected(body: &ResponseBody) -> ErrorReply {
    ErrorReply {
        status: Status::Internal,
        message: format!("unexpected reply {body:?}"),
    }
}

fn mode(m: i32) -> Result<LockMode, ErrorReply> {
    match proto::LockMode::try_from(m) {
        Ok(proto::LockMode::Exclusive) => Ok(LockMode::Exclusive),
        Ok(proto::LockMode::Shared) => Ok(LockMode::Shared),
        Err(_) => Err(ErrorReply {
            status: Status::BadRequest,
            message: format!("unknown lock mode {m}"),
        }),
    }
}

fn proto_mode(m: LockMode) -> proto::LockMode {
    match m {
        LockMode::Exclusive => proto::LockMode::Exclusive,
        LockMode::Shared => proto::LockMode::Shared,
    }
}

fn proto_layout(l: KindLayout) -> proto::KindLayout {
    match l {
        KindLayout::Mutex => proto::KindLayout::Mutex,
        KindLayout::ReadWrite => proto::KindLayout::ReadWrite,
    }
}

/// A unary session's promise is also bounded by its idle expiry: the
/// server may release its locks that long after its last call.
fn cap_safe<B: Backend>(safe_ms: u32, entry: &Entry<B>, idle_ms: u32) -> u32 {
    match entry.owner {
        Owner::Unary => safe_ms.min(idle_ms),
        Owner::Stream => safe_ms,
    }
}

/// An acquire. Not granted within the wait is `granted = false`, not an
/// error. `request_id` (non-zero) makes it idempotent for the session.
pub(super) async fn acquire<B: Backend>(
    shared: &ServerState<B>,
    entry: &Entry<B>,
    idle_ms: u32,
    request_id: u64,
    a: proto::AcquireRequest,
) -> Result<proto::AcquireReply, ErrorReply> {
    let lock_mode = mode(a.mode)?;
    let key = LockKey::new(&a.kind, &a.id).map_err(|e| ErrorReply {
        status: Status::InvalidName,
        message: e.to_string(),
    })?;
    if let Some(g) = entry.replay(request_id, &key, lock_mode) {
        return Ok(granted(&g, entry, idle_ms));
    }
    let req = Request::Acquire(Acquire {
        kind: a.kind,
        id: a.id,
        wait_ms: a.wait_ms,
        lease_ms: a.lease_ms,
        mode: lock_mode,
        trace_id: (!a.trace_id.is_empty()).then_some(a.trace_id),
    });
    match dispatch(&context(shared, entry), shared, req).await {
        Ok(ResponseBody::Acquired(g)) => {
            entry.record(request_id, &key, lock_mode, &g);
            Ok(granted(&g, entry, idle_ms))
        }
        Ok(other) => Err(unexpected(&other)),
        Err(e) if e.status == Status::Timeout => Ok(proto::AcquireReply {
            granted: false,
            reason: e.message,
            ..proto::AcquireReply::default()
        }),
        Err(e) => Err(e),
    }
}

fn granted<B: Backend>(g: &clastor_protocol::AcquireOk, entry: &Entry<B>, idle_ms: u32) -> proto::AcquireReply {
    proto::AcquireReply {
        granted: true,
        token: g.token,
        version: g.version.clone(),
        lease_ms: g.lease_ms,
        safe_ms: cap_safe(g.safe_ms.unwrap_or(0), entry, idle_ms),
        reason: String::new(),
    }
}

pub(super) async fn release<B: Backend>(
    shared: &ServerState<B>,
    entry: &Entry<B>,
    r: proto::ReleaseRequest,
) -> Result<proto::ReleaseReply, ErrorReply> {
    let req = Request::Release {
        kind: r.kind,
        id: r.id,
        token: r.token,
    };
    match dispatch(&context(shared, entry), shared, req).await? {
        ResponseBody::Released { released } => Ok(proto::ReleaseReply { released }),
        other => Err(unexpected(&other)),
    }
}

pub(super) async fn renew<B: Backend>(
    shared: &ServerState<B>,
    entry: &Entry<B>,
    idle_ms: u32,
    r: proto::RenewRequest,
) -> Result<proto::RenewReply, ErrorReply> {
    let req = Request::Renew {
        kind: r.kind,
        id: r.id,
        lease_ms: r.lease_ms,
        token: r.token,
    };
    match dispatch(&context(shared, entry), shared, req).await? {
        ResponseBody::Renewed {
            token,
            lease_ms,
            safe_ms,
        } => Ok(proto::RenewReply {
            token,
            lease_ms,
            safe_ms: cap_safe(safe_ms.unwrap_or(0), entry, idle_ms),
        }),
        other => Err(unexpected(&other)),
    }
}

pub(super) async fn confirm<B: Backend>(
    shared: &ServerState<B>,
    entry: &Entry<B>,
    idle_ms: u32,
) -> Result<proto::ConfirmReply, ErrorReply> {
    match dispatch(&context(shared, entry), shared, Request::Confirm).await? {
        ResponseBody::Confirmed { safe_ms } => Ok(proto::ConfirmReply {
            safe_ms: cap_safe(safe_ms, entry, idle_ms),
        }),
        other => Err(unexpected(&other)),
    }
}

pub(super) async fn held<B: Backend>(
    shared: &ServerState<B>,
    entry: &Entry<B>,
    all: bool,
) -> Result<proto::HeldReply, ErrorReply> {
    let scope = if all { HeldScope::Server } else { HeldScope::Connection };
    match dispatch(&context(shared, entry), shared, Request::Held { scope }).await? {
        ResponseBody::Held(locks) => Ok(held_reply(locks)),
        other => Err(unexpected(&other)),
    }
}

/// The whole server's locks, for a `Held { all }` without a session.
pub(super) fn held_all<B: Backend>(shared: &ServerState<B>) -> proto::HeldReply {
    let locks = shared.engine.held_all(MAX_HELD_LISTING);
    held_reply(locks.into_iter().map(|h| listed(h, true, true)).collect())
}

fn held_reply(locks: Vec<HeldLock>) -> proto::HeldReply {
    proto::HeldReply {
        locks: locks
            .into_iter()
            .map(|h| proto::HeldLock {
                kind: h.kind,
                id: h.id,
                token: h.token,
                version: h.version,
                lease_remaining_ms: h.lease_remaining_ms,
                session_id: h.connection_id,
                mode: proto_mode(h.mode.unwrap_or_default()).into(),
                trace_id: h.trace_id.unwrap_or_default(),
            })
            .collect(),
    }
}

pub(super) async fn version<B: Backend>(
    shared: &ServerState<B>,
    kind: &str,
) -> Result<proto::VersionReply, ErrorReply> {
    let v = Box::pin(shared.engine.version(kind)).await?;
    Ok(proto::VersionReply {
        version: v.version.to_string(),
        draining: v.mode == KindMode::Draining,
        layout: proto_layout(v.layout).into(),
    })
}

pub(super) async fn rotate<B: Backend>(
    shared: &ServerState<B>,
    r: proto::RotateRequest,
) -> Result<proto::RotateReply, ErrorReply> {
    let layout = if r.set_layout {
        match proto::KindLayout::try_from(r.layout) {
            Ok(proto::KindLayout::Mutex) => Some(KindLayout::Mutex),
            Ok(proto::KindLayout::ReadWrite) => Some(KindLayout::ReadWrite),
            Err(_) => {
                return Err(ErrorReply {
                    status: Status::BadRequest,
                    message: format!("unknown layout {}", r.layout),
                });
            }
        }
    } else {
        None
    };
    let timeout = std::time::Duration::from_millis(u64::from(r.drain_timeout_ms));
    let (drained, leftover) =
        Box::pin(
            shared
                .engine
                .rotate_to_layout(&r.kind, &r.from, &r.to, layout, timeout, &|_| {}),
        )
        .await?;
    Ok(proto::RotateReply {
        version: r.to,
        drain_ms: u32::try_from(drained.as_millis()).unwrap_or(u32::MAX),
        leftover,
    })
}
