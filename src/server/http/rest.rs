//! The REST API (JSON): acquire, renew and release a lock, list held locks,
//! read a kind's version, rotate a kind. Names pass the lock protocol's
//! validation; tokens travel as decimal strings (they exceed 2^53, the
//! largest integer a JSON number keeps exactly in JavaScript). The original
//! Clastor's two-segment paths are in `compat.rs`.
//!
//! Parameters come from the query string (`?timeoutMs=&leaseMs=&token=`) or,
//! for clients that prefer it, a JSON object body with the same names; the
//! query wins where both say something. A parameter an endpoint does not
//! know is a 400 naming it, never silently ignored (a misspelt `timeoutMS`
//! would otherwise turn a wait into a try-once). Bodies are capped by the
//! router's body limit (413 `LIMIT_EXCEEDED`).
//!
//! Listings never show fencing tokens: over HTTP the token is the capability
//! to renew and release, and these pages have no authentication.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use clastor_protocol::{KindLayout, LockMode, Status};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tracing::{Instrument, Span, debug, info_span};

use super::error::ApiError;
use super::gateway::Terms;
use super::{HttpState, Peer};
use crate::backend::Backend;
use crate::engine::{Engine, Granted, HeldInfo, WaitInfo};
use crate::key::LockKey;

/// Most locks (and waits) one listing shows.
const MAX_LISTING: usize = 10_000;

/// The parameters of acquire, renew and release.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct LockParams {
    timeout_ms: Option<u64>,
    lease_ms: Option<u64>,
    token: Option<String>,
    /// `exclusive` (the default) or `shared` (acquire only).
    mode: Option<String>,
}

impl LockParams {
    /// Query parameters over body parameters.
    fn merge(query: LockParams, body: LockParams) -> LockParams {
        LockParams {
            timeout_ms: query.timeout_ms.or(body.timeout_ms),
            lease_ms: query.lease_ms.or(body.lease_ms),
            token: query.token.or(body.token),
            mode: query.mode.or(body.mode),
        }
    }

    /// The acquire's mode: `exclusive` (the default) or `shared`.
    fn mode(&self) -> Result<LockMode, ApiError> {
        match self.mode.as_deref().map(str::to_ascii_lowercase).as_deref() {
            None | Some("exclusive") => Ok(LockMode::Exclusive),
            Some("shared") => Ok(LockMode::Shared),
            Some(other) => Err(ApiError::bad_request(format!(
                "mode {other:?} is neither exclusive nor shared"
            ))),
        }
    }

    fn token(&self) -> Result<u64, ApiError> {
        let raw = self.token.as_deref().ok_or_else(|| {
            ApiError::bad_request(
                "a token is required: the fencing token of the grant (decimal string), as returned by acquire",
            )
        })?;
        parse_token(raw)
    }
}

/// A fencing token as sent: a decimal `u64` above 0.
pub(super) fn parse_token(raw: &str) -> Result<u64, ApiError> {
    raw.parse::<u64>()
        .ok()
        .filter(|&t| t != 0)
        .ok_or_else(|| ApiError::bad_request(format!("token {raw:?} is not a fencing token (a decimal u64 above 0)")))
}

/// An endpoint that takes no parameters: any given is refused by name.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NoParams {}

/// Reads an endpoint's parameters from the query string and the body (a
/// JSON object, or nothing), each on its own: the caller merges them, the
/// query first. Unknown names are refused (`deny_unknown_fields` on `P`).
pub(super) fn params<P: DeserializeOwned + Default>(
    query: Result<Query<P>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(P, P), ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(format!("bad query: {}", e.body_text())))?;
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::with_http(
                StatusCode::PAYLOAD_TOO_LARGE,
                Status::LimitExceeded,
                "request body too large",
            )
        } else {
            ApiError::bad_request(format!("unreadable body: {}", e.body_text()))
        }
    })?;
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        P::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request(format!(
                "the body must be a JSON object of this endpoint's parameters: {e}"
            ))
        })?
    };
    Ok((query, body))
}

/// Only the query string, for endpoints without a body.
pub(super) fn query_only<P>(query: Result<Query<P>, QueryRejection>) -> Result<P, ApiError> {
    query
        .map(|Query(q)| q)
        .map_err(|e| ApiError::bad_request(format!("bad query: {}", e.body_text())))
}

/// Reads the key and the parameters, refusing what the lock protocol refuses.
fn request(
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<LockParams>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(LockKey, LockParams), ApiError> {
    let Path((kind, id)) = path.map_err(|e| ApiError::status(Status::InvalidName, format!("bad lock path: {e}")))?;
    let key = lock_key(&kind, &id)?;
    let (query, body) = params(query, body)?;
    Ok((key, LockParams::merge(query, body)))
}

/// A lock's key from a request: `INVALID_NAME` as the lock protocol says.
pub(super) fn lock_key(kind: &str, id: &str) -> Result<LockKey, ApiError> {
    LockKey::new(kind, id).map_err(|e| ApiError::status(Status::InvalidName, e.to_string()))
}

/// The name an HTTP caller gives itself, for listings: its `User-Agent`.
fn user_agent(headers: &HeaderMap) -> Option<&str> {
    headers.get(axum::http::header::USER_AGENT)?.to_str().ok()
}

/// The wait of an acquire: `timeoutMs`, or `default` (each path form has
/// its own), at most the port's longest wait.
pub(super) fn wait(timeout_ms: Option<u64>, default: Duration, max: Duration) -> Result<Duration, ApiError> {
    ms("timeoutMs", timeout_ms, default, max)
}

/// The lease of an acquire: `leaseMs`, by default the port's default lease,
/// at most the engine's longest; never 0: an HTTP lock always has one.
pub(super) fn lease<B: Backend>(st: &HttpState<B>, lease_ms: Option<u64>) -> Result<Duration, ApiError> {
    let lease = ms(
        "leaseMs",
        lease_ms,
        st.config.default_lease,
        st.shared.engine.config().max_lease,
    )?;
    if lease.is_zero() {
        return Err(ApiError::bad_request(
            "leaseMs must be above 0: a lock taken over HTTP always has a lease",
        ));
    }
    Ok(lease)
}

/// Takes `key` for an HTTP caller (both path forms): the trace id of its
/// `traceparent`, its `User-Agent` as the client name. `Ok(None)`: not
/// granted within `wait`.
pub(super) async fn take_lock<B: Backend>(
    st: &HttpState<B>,
    key: &LockKey,
    (wait, lease): (Duration, Duration),
    mode: LockMode,
    peer: std::net::SocketAddr,
    headers: &HeaderMap,
) -> Result<(Option<Granted>, Option<Arc<str>>), ApiError> {
    let trace = trace_id(headers);
    let span = match &trace {
        Some(t) => info_span!("http_request", trace_id = %t, %peer),
        None => Span::none(),
    };
    span.in_scope(
        || debug!(%key, wait_ms = millis(wait), lease_ms = millis(lease), mode = mode.name(), "HTTP acquire"),
    );
    let granted = st
        .gateway
        .acquire(
            key,
            Terms { wait, lease, mode },
            peer,
            user_agent(headers),
            trace.clone(),
        )
        .instrument(span.clone())
        .await?;
    span.in_scope(|| debug!(%key, granted = granted.is_some(), "HTTP acquire done"));
    Ok((granted, trace))
}

/// The trace id of a W3C `traceparent` header
/// (`00-<32 hex trace-id>-<16 hex parent-id>-<2 hex flags>`); a malformed
/// header is ignored, as the W3C recommendation says.
pub(super) fn trace_id(headers: &HeaderMap) -> Option<Arc<str>> {
    let value = headers.get("traceparent")?.to_str().ok()?.trim();
    let mut parts = value.split('-');
    let (version, trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let valid = hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(parent, 16)
        && hex(flags, 2)
        && (version != "00" || parts.next().is_none());
    valid.then(|| Arc::from(trace))
}

pub(super) fn ms(what: &str, v: Option<u64>, default: Duration, max: Duration) -> Result<Duration, ApiError> {
    let d = v.map_or(default, Duration::from_millis);
    if d > max {
        return Err(ApiError::bad_request(format!(
            "{what} is over the maximum of {} ms",
            max.as_millis()
        )));
    }
    Ok(d)
}

pub(super) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Acquired<'a> {
    resource: &'a str,
    resource_id: &'a str,
    status: &'static str,
    token: String,
    version: &'a str,
    lease_ms: u64,
    mode: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    trace_id: Option<&'a str>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct NotAcquired<'a> {
    resource: &'a str,
    resource_id: &'a str,
    status: &'static str,
    timeout_ms: u64,
}

/// `POST /api/v1/locks/{kind}/{id}/acquire?timeoutMs=&leaseMs=&mode=`
pub(super) async fn acquire<B: Backend>(
    State(st): State<Arc<HttpState<B>>>,
    axum::Extension(Peer(peer)): axum::Extension<Peer>,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<LockParams>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (key, params) = request(path, query, body)?;
    // Ours tries once unless told to wait.
    let terms = (
        wait(params.timeout_ms, Duration::ZERO, st.config.max_wait)?,
        lease(&st, params.lease_ms)?,
    );
    let mode = params.mode()?;
    let (granted, trace) = take_lock(&st, &key, terms, mode, peer, &headers).await?;
    Ok(match granted {
        Some(g) => acquired(&key, &g, terms.1, mode, trace.as_deref()),
        None => not_acquired(&key, StatusCode::CONFLICT, "NOT_ACQUIRED", terms.0),
    })
}

/// The answer to a granted acquire (both path forms).
pub(super) fn acquired(key: &LockKey, g: &Granted, lease: Duration, mode: LockMode, trace: Option<&str>) -> Response {
    Json(Acquired {
        resource: key.kind(),
        resource_id: key.id(),
        status: "ACQUIRED",
        token: g.token.to_string(),
        version: &g.version,
        lease_ms: millis(lease),
        mode: mode.name(),
        trace_id: trace,
    })
    .into_response()
}

/// The answer to an acquire not granted within `wait`: each path form has
/// its own HTTP status and status word.
pub(super) fn not_acquired(key: &LockKey, http: StatusCode, status: &'static str, wait: Duration) -> Response {
    (
        http,
        Json(NotAcquired {
            resource: key.kind(),
            resource_id: key.id(),
            status,
            timeout_ms: millis(wait),
        }),
    )
        .into_response()
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Renewed<'a> {
    resource: &'a str,
    resource_id: &'a str,
    status: &'static str,
    token: String,
    lease_ms: u64,
}

/// `POST /api/v1/locks/{kind}/{id}/renew?token=&leaseMs=`
pub(super) async fn renew<B: Backend>(
    State(st): State<Arc<HttpState<B>>>,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<LockParams>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (key, params) = request(path, query, body)?;
    let token = params.token()?;
    let lease = ms(
        "leaseMs",
        params.lease_ms,
        st.config.default_lease,
        st.shared.engine.config().max_lease,
    )?;
    let g = st.gateway.renew(&key, token, lease)?;
    Ok(Json(Renewed {
        resource: key.kind(),
        resource_id: key.id(),
        status: "RENEWED",
        token: g.token.to_string(),
        lease_ms: millis(lease),
    })
    .into_response())
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Released<'a> {
    resource: &'a str,
    resource_id: &'a str,
    status: &'static str,
}

/// `POST /api/v1/locks/{kind}/{id}/release?token=`
pub(super) async fn release<B: Backend>(
    State(st): State<Arc<HttpState<B>>>,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<LockParams>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (key, params) = request(path, query, body)?;
    let token = params.token()?;
    st.gateway.release(&key, Some(token)).await?;
    Ok(released(&key, "RELEASED"))
}

/// The answer to a release (both path forms).
pub(super) fn released(key: &LockKey, status: &'static str) -> Response {
    Json(Released {
        resource: key.kind(),
        resource_id: key.id(),
        status,
    })
    .into_response()
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct VersionJson<'a> {
    resource: &'a str,
    version: &'a str,
    mode: &'static str,
    layout: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    drain: Option<DrainJson>,
}

/// The `{kind}` of a kind-level path (the engine checks the name itself).
fn kind_in(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    path.map(|Path(kind)| kind)
        .map_err(|e| ApiError::status(Status::InvalidName, format!("bad kind: {e}")))
}

/// `GET /api/v1/locks/{kind}/version`: version, mode, and while draining the
/// rotation's target, the lock nodes left and the time left.
pub(super) async fn version<B: Backend>(
    State(st): State<Arc<HttpState<B>>>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<NoParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let kind = kind_in(path)?;
    query_only(query)?;
    let (v, drain) = st.shared.engine.version_detail(&kind).await?;
    Ok(Json(VersionJson {
        resource: &kind,
        version: &v.version,
        mode: v.mode.name(),
        layout: v.layout.name(),
        drain: drain.map(|d| DrainJson {
            to: d.to,
            remaining: d.remaining,
            left_ms: d.left_ms,
        }),
    })
    .into_response())
}

/// A draining kind's rotation.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DrainJson {
    to: String,
    remaining: u32,
    left_ms: u32,
}

/// The parameters of a rotation.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RotateParams {
    from: Option<String>,
    to: Option<String>,
    drain_timeout_ms: Option<u64>,
    /// The layout `to` gets: `mutex` or `read_write`; absent: `from`'s.
    layout: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Rotated<'a> {
    resource: &'a str,
    status: &'static str,
    from: &'a str,
    version: &'a str,
    drain_ms: u64,
    leftover: u32,
}

/// `POST /api/v1/locks/{kind}/rotate?from=&to=&drainTimeoutMs=`: the whole
/// rotation (PROTOCOL.md, "Version rotation"), answered when it is over —
/// `200 ROTATED`, or `409` with `ROTATION_REFUSED` / `ROTATION_ABORTED`. The
/// drain timeout defaults to the HTTP port's longest wait (`max_wait`; also
/// for 0) and may not exceed it (400), so the answer comes within the
/// request timeout; a caller that goes away leaves the kind draining,
/// resumable like any abandoned rotation.
pub(super) async fn rotate<B: Backend>(
    State(st): State<Arc<HttpState<B>>>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<RotateParams>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let kind = kind_in(path)?;
    let (query, body) = params(query, body)?;
    let from = query
        .from
        .or(body.from)
        .ok_or_else(|| ApiError::bad_request("from is required"))?;
    let to = query
        .to
        .or(body.to)
        .ok_or_else(|| ApiError::bad_request("to is required"))?;
    let layout = match query.layout.or(body.layout) {
        None => None,
        Some(name) => Some(
            KindLayout::from_name(&name)
                .ok_or_else(|| ApiError::bad_request(format!("layout {name:?} is neither mutex nor read_write")))?,
        ),
    };
    let max = st.config.max_wait;
    // 0 is the default too: the engine's own default drain could outlast
    // this port's request timeout.
    let drain = ms(
        "drainTimeoutMs",
        query.drain_timeout_ms.or(body.drain_timeout_ms).filter(|&ms| ms != 0),
        max,
        max,
    )?;
    let (drained, leftover) = st
        .shared
        .engine
        .rotate_to_layout(&kind, &from, &to, layout, drain, &|p| {
            debug!(kind = %p.kind, remaining = p.remaining, phase = p.phase.name(), "HTTP rotation progress");
        })
        .await?;
    Ok(Json(Rotated {
        resource: &kind,
        status: "ROTATED",
        from: &from,
        version: &to,
        drain_ms: millis(drained),
        leftover,
    })
    .into_response())
}

#[derive(Serialize)]
struct RotateAborted<'a> {
    resource: &'a str,
    version: &'a str,
    aborted: bool,
}

/// `POST /api/v1/locks/{kind}/rotate/abort`: back to normal on the current
/// version (`aborted: false` when the kind was not draining).
pub(super) async fn rotate_abort<B: Backend>(
    State(st): State<Arc<HttpState<B>>>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<NoParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let kind = kind_in(path)?;
    query_only(query)?;
    let (v, aborted) = st.shared.engine.rotate_abort(&kind).await?;
    Ok(Json(RotateAborted {
        resource: &kind,
        version: &v.version,
        aborted,
    })
    .into_response())
}

/// One waiting acquire.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct WaiterJson {
    holder: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    client: Option<String>,
    connection: u64,
    waited_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    trace_id: Option<String>,
}

/// One held lock, with the acquires waiting for it in queue order. No
/// token: over HTTP it is the capability to release.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct LockJson {
    resource: String,
    resource_id: String,
    version: String,
    /// `exclusive` or `shared` (shared holders of one key are listed once each).
    mode: &'static str,
    holder: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    client: Option<String>,
    connection: u64,
    age_ms: u64,
    lease_remaining_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    trace_id: Option<String>,
    waiters: Vec<WaiterJson>,
}

/// Acquires waiting for a key no session of this server holds (held
/// through another server, or just being handed over).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct QueueJson {
    resource: String,
    resource_id: String,
    waiters: Vec<WaiterJson>,
}

/// Every lock held through this server and every acquire waiting.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct HeldJson {
    pub(super) locks: Vec<LockJson>,
    pub(super) waiting_elsewhere: Vec<QueueJson>,
}

fn waiter(w: WaitInfo) -> WaiterJson {
    WaiterJson {
        holder: w.holder.to_string(),
        client: w.client.map(|c| c.to_string()),
        connection: w.session,
        waited_ms: millis(w.waited),
        trace_id: w.trace_id.map(|t| t.to_string()),
    }
}

/// The listing behind `/api/v1/locks/held` and the status page.
pub(super) fn held_listing<B: Backend>(engine: &Engine<B>) -> HeldJson {
    let held: Vec<HeldInfo> = engine.held_all(MAX_LISTING);
    let mut waits: Vec<WaitInfo> = engine.waiting_all(MAX_LISTING);
    let mut locks: Vec<LockJson> = held
        .into_iter()
        .map(|h| LockJson {
            resource: h.key.kind().to_owned(),
            resource_id: h.key.id().to_owned(),
            version: h.version.to_string(),
            mode: h.mode.name(),
            holder: h.holder.to_string(),
            client: h.client.map(|c| c.to_string()),
            connection: h.session,
            age_ms: millis(h.age),
            lease_remaining_ms: h.lease_remaining.map(millis),
            trace_id: h.trace_id.map(|t| t.to_string()),
            waiters: Vec::new(),
        })
        .collect();
    locks.sort_by(|a, b| (&a.resource, &a.resource_id).cmp(&(&b.resource, &b.resource_id)));
    for l in &mut locks {
        let (mine, rest): (Vec<WaitInfo>, Vec<WaitInfo>) = waits
            .into_iter()
            .partition(|w| w.key.kind() == l.resource && w.key.id() == l.resource_id);
        // Shared holders of one key: the waiters are listed with the first.
        l.waiters = mine.into_iter().map(waiter).collect();
        waits = rest;
    }
    let mut waiting_elsewhere: Vec<QueueJson> = Vec::new();
    for w in waits {
        let (kind, id) = (w.key.kind().to_owned(), w.key.id().to_owned());
        match waiting_elsewhere.last_mut() {
            Some(q) if q.resource == kind && q.resource_id == id => q.waiters.push(waiter(w)),
            _ => waiting_elsewhere.push(QueueJson {
                resource: kind,
                resource_id: id,
                waiters: vec![waiter(w)],
            }),
        }
    }
    HeldJson {
        locks,
        waiting_elsewhere,
    }
}

/// The parameters of `/api/v1/locks/held`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HeldParams {
    format: Option<String>,
}

/// `GET /api/v1/locks/held`: every lock held through this server with its
/// waiters; `?format=legacy` gives the original Clastor's shape instead, a
/// JSON array of `"resource/resourceId"`.
pub(super) async fn held<B: Backend>(
    State(st): State<Arc<HttpState<B>>>,
    query: Result<Query<HeldParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let engine = &st.shared.engine;
    match query_only(query)?.format.as_deref() {
        None | Some("full") => Ok(Json(held_listing(engine)).into_response()),
        Some("legacy") => {
            let mut keys: Vec<String> = engine
                .held_all(MAX_LISTING)
                .into_iter()
                .map(|h| format!("{}/{}", h.key.kind(), h.key.id()))
                .collect();
            keys.sort();
            Ok(Json(keys).into_response())
        }
        Some(other) => Err(ApiError::bad_request(format!(
            "format {other:?} is not one of full, legacy"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Ok(v) = v.parse() {
            h.insert("traceparent", v);
        }
        h
    }

    #[test]
    fn unknown_parameters_are_refused_by_name() {
        let query = |q: &str| -> Result<LockParams, ApiError> {
            let uri: axum::http::Uri = format!("/x?{q}").parse().map_err(|_| ApiError::bad_request("URI"))?;
            query_only(Query::try_from_uri(&uri))
        };
        assert!(query("timeoutMs=5&leaseMs=9&token=1").is_ok());
        let refused = query("timeoutMS=5").err().map(|e| e.message().to_owned());
        assert!(
            refused.as_deref().is_some_and(|m| m.contains("timeoutMS")),
            "{refused:?}"
        );
    }

    #[test]
    fn traceparent_gives_the_trace_id_or_nothing() {
        let ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            trace_id(&headers(ok)).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f35/7b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(trace_id(&headers(bad)), None, "{bad:?}");
        }
    }
}
