//! The original Clastor's REST endpoints (its Spring controller), so its
//! clients can move over without a change: `POST
//! /api/v1/locks/{resource}/acquire?resourceId=&timeoutMs=` and
//! `.../release?resourceId=`. Two path segments after `locks/`, so they never
//! clash with our three-segment `{kind}/{id}/acquire`.
//!
//! Its answers are kept: always 200, the outcome in `status` (`ACQUIRED` /
//! `FAILED`, `RELEASED` / `NOT_HELD`), with our fields added (token, version,
//! lease), which Jackson-based clients ignore. Its default wait (5 s) is
//! kept too. Its release took no token; here the token is the capability to
//! release, so a tokenless release is refused (400) unless the operator
//! turned on `compat_tokenless_release`, knowing what it gives away.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use clastor_protocol::{LockMode, Status};
use serde::Deserialize;
use tracing::info;

use super::error::ApiError;
use super::rest::{lease, lock_key, not_acquired, params, parse_token, released, take_lock, wait};
use super::{HttpState, Peer};
use crate::backend::Backend;
use crate::key::LockKey;

/// The original service's wait when `timeoutMs` is not given.
pub(super) const DEFAULT_WAIT: Duration = Duration::from_millis(5000);

/// The parameters of the original's acquire and release, plus ours.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct CompatParams {
    resource_id: Option<String>,
    timeout_ms: Option<u64>,
    lease_ms: Option<u64>,
    token: Option<String>,
}

impl CompatParams {
    /// Query parameters over body parameters.
    fn merge(query: CompatParams, body: CompatParams) -> CompatParams {
        CompatParams {
            resource_id: query.resource_id.or(body.resource_id),
            timeout_ms: query.timeout_ms.or(body.timeout_ms),
            lease_ms: query.lease_ms.or(body.lease_ms),
            token: query.token.or(body.token),
        }
    }
}

/// Reads the key (`{resource}` and `resourceId`) and the parameters.
fn request(
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<CompatParams>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(LockKey, CompatParams), ApiError> {
    let Path(resource) = path.map_err(|e| ApiError::status(Status::InvalidName, format!("bad lock path: {e}")))?;
    let (query, body) = params(query, body)?;
    let params = CompatParams::merge(query, body);
    let id = params
        .resource_id
        .as_deref()
        .ok_or_else(|| ApiError::bad_request("resourceId is required"))?;
    Ok((lock_key(&resource, id)?, params))
}

/// `POST /api/v1/locks/{resource}/acquire?resourceId=&timeoutMs=&leaseMs=`:
/// 200 `ACQUIRED` (with token, version, leaseMs) or 200 `FAILED`.
pub(super) async fn acquire<B: Backend>(
    State(st): State<Arc<HttpState<B>>>,
    axum::Extension(Peer(peer)): axum::Extension<Peer>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<CompatParams>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (key, params) = request(path, query, body)?;
    if params.token.is_some() {
        return Err(ApiError::bad_request("acquire takes no token"));
    }
    let terms = (
        wait(params.timeout_ms, DEFAULT_WAIT, st.config.max_wait)?,
        lease(&st, params.lease_ms)?,
    );
    // The original API has exclusive locks only.
    let (granted, trace) = take_lock(&st, &key, terms, LockMode::Exclusive, peer, &headers).await?;
    Ok(match granted {
        Some(g) => super::rest::acquired(&key, &g, terms.1, LockMode::Exclusive, trace.as_deref()),
        None => not_acquired(&key, StatusCode::OK, "FAILED", terms.0),
    })
}

/// `POST /api/v1/locks/{resource}/release?resourceId=&token=`: 200
/// `RELEASED`, or 200 `NOT_HELD` when no HTTP lock on the key has that token.
/// Without a token: 400, or with `compat_tokenless_release` on, whichever
/// HTTP lock the key has.
pub(super) async fn release<B: Backend>(
    State(st): State<Arc<HttpState<B>>>,
    axum::Extension(Peer(peer)): axum::Extension<Peer>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<CompatParams>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (key, params) = request(path, query, body)?;
    if params.timeout_ms.is_some() || params.lease_ms.is_some() {
        return Err(ApiError::bad_request("release takes only resourceId and token"));
    }
    let token = match params.token.as_deref() {
        Some(raw) => Some(parse_token(raw)?),
        None if st.config.compat_tokenless_release => {
            info!(%key, %peer, "tokenless HTTP release (compatibility switch on)");
            None
        }
        None => {
            return Err(ApiError::bad_request(
                "a release needs the lock's token (token=, as returned by acquire): the token is the \
                 capability to release. This server honours the original Clastor's tokenless release only \
                 with --http-compat-tokenless-release, which lets anyone who reaches this port release \
                 anyone's HTTP lock",
            ));
        }
    };
    match st.gateway.release(&key, token).await {
        Ok(()) => Ok(released(&key, "RELEASED")),
        Err(e) if e.code() == Status::NotHeld.name() => Ok(released(&key, "NOT_HELD")),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(query: &str) -> Result<CompatParams, ApiError> {
        let uri: axum::http::Uri = format!("/x?{query}")
            .parse()
            .map_err(|_| ApiError::bad_request("URI"))?;
        let (query, body) = params::<CompatParams>(Query::try_from_uri(&uri), Ok(Bytes::new()))?;
        Ok(CompatParams::merge(query, body))
    }

    /// The original's clients rely on its default wait: an acquire that
    /// names no `timeoutMs` waits 5 s, not our try-once; one that names it
    /// waits that long, up to the port's longest wait.
    #[test]
    fn the_default_wait_is_the_originals() {
        let max = Duration::from_secs(60);
        let wait_of = |q: &str| parsed(q).and_then(|p| wait(p.timeout_ms, DEFAULT_WAIT, max));
        assert_eq!(wait_of("resourceId=a").ok(), Some(Duration::from_millis(5000)));
        assert_eq!(wait_of("resourceId=a&timeoutMs=0").ok(), Some(Duration::ZERO));
        assert_eq!(
            wait_of("resourceId=a&timeoutMs=250").ok(),
            Some(Duration::from_millis(250))
        );
        assert!(wait_of("resourceId=a&timeoutMs=60001").is_err());
        let unknown = parsed("resourceId=a&timeout=5").err().map(|e| e.message().to_owned());
        assert!(unknown.is_some_and(|m| m.contains("timeout")));
    }
}
