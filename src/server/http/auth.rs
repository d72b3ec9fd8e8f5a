//! Who may use the HTTP port: `Authorization: Bearer <token>` (the auth
//! file's tokens) or, with mTLS, the client certificate's principal; each
//! route needs what the lock protocol's request of the same meaning needs.
//! Missing or refused credentials: `401` with `WWW-Authenticate: Bearer`;
//! a principal without the permission: `403`. `/healthz` and `/readyz`
//! stay open to probes, and `/metrics` too with `metrics_public`.
//! Without auth (no auth file), everything is open.

use std::sync::Arc;

use axum::extract::rejection::RawPathParamsRejection;
use axum::extract::{MatchedPath, RawPathParams, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use clastor_protocol::{AuthToken, ErrorReply, Status};

use super::error::ApiError;
use super::{ClientCert, HttpState, Peer};
use crate::backend::Backend;
use crate::server::auth::{AUTHENTICATE_FIRST, Access, Permission, REFUSED, bearer_token};

/// What a route needs, beyond a principal.
enum Need {
    /// Nothing at all: health probes (and public metrics).
    Open,
    /// A principal, nothing more.
    Principal,
    /// A server-wide permission.
    Admin,
    /// A permission on the kind the path names.
    Kind(Permission),
    /// Either permission that holds a lock of the kind (renew, release).
    Holder,
}

fn need(route: &str, metrics_public: bool) -> Need {
    match route {
        "/healthz" | "/readyz" => Need::Open,
        "/metrics" if metrics_public => Need::Open,
        "/metrics" | "/" | "/api/v1/status" | "/api/v1/locks/held" => Need::Admin,
        "/api/v1/locks/{kind}/version" => Need::Kind(Permission::Read),
        "/api/v1/locks/{kind}/rotate" | "/api/v1/locks/{kind}/rotate/abort" => Need::Kind(Permission::Rotate),
        "/api/v1/locks/{kind}/{id}/acquire" | "/api/v1/locks/{resource}/acquire" => Need::Kind(Permission::Acquire),
        "/api/v1/locks/{kind}/{id}/renew"
        | "/api/v1/locks/{kind}/{id}/release"
        | "/api/v1/locks/{resource}/release" => Need::Holder,
        _ => Need::Principal,
    }
}

fn unauthorized(message: &str) -> Response {
    let mut response = ApiError::with_http(StatusCode::UNAUTHORIZED, Status::Unauthenticated, message).into_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

fn refused(e: ErrorReply) -> Response {
    if e.status == Status::Unauthenticated {
        return unauthorized(&e.message);
    }
    ApiError::status(e.status, e.message).into_response()
}

/// The bearer token, if the header is there; `Err` if it is malformed.
fn bearer(headers: &HeaderMap) -> Option<Result<&str, ()>> {
    let value = headers.get(header::AUTHORIZATION)?;
    Some(value.to_str().ok().and_then(bearer_token).ok_or(()))
}

/// The middleware: authenticates, then checks the route's permission.
pub(super) async fn authorize<B: Backend>(
    State(st): State<Arc<HttpState<B>>>,
    params: Result<RawPathParams, RawPathParamsRejection>,
    req: Request,
    next: Next,
) -> Response {
    if !st.shared.auth_on() {
        return next.run(req).await;
    }
    let route = req.extensions().get::<MatchedPath>().map(|m| m.as_str().to_owned());
    let need = need(route.as_deref().unwrap_or_default(), st.config.metrics_public);
    if let Need::Open = need {
        return next.run(req).await;
    }
    let cert = req.extensions().get::<ClientCert>().and_then(|c| c.0.clone());
    let mut access: Access = st.shared.access(cert.as_deref());
    let peer = req.extensions().get::<Peer>().map(|p| p.0);
    match bearer(req.headers()) {
        Some(Ok(token)) => {
            let token = AuthToken::new(token);
            let Some(peer) = peer else {
                return unauthorized(REFUSED);
            };
            // One attempt per request; the count is the metric's.
            let mut attempts = 0;
            if access
                .authenticate(&token, &mut attempts, peer, &st.shared.stats.http_auth_failures)
                .is_err()
            {
                return unauthorized(REFUSED);
            }
        }
        Some(Err(())) => return unauthorized("the Authorization header must be `Bearer <token>`"),
        None if access.principal().is_none() => return unauthorized(AUTHENTICATE_FIRST),
        None => {}
    }
    let kind = params.ok().and_then(|params| {
        params
            .iter()
            .find(|(name, _)| matches!(*name, "kind" | "resource"))
            .map(|(_, v)| v.to_owned())
    });
    let per_kind = |check: &dyn Fn(&str) -> Result<(), ErrorReply>| match &kind {
        Some(kind) => check(kind),
        // A path whose kind cannot be read (bad percent-encoding) names
        // no kind anyone may use.
        None => Err(ErrorReply {
            status: Status::InvalidName,
            message: "bad lock path: the kind is not valid UTF-8".into(),
        }),
    };
    let checked = match need {
        Need::Open | Need::Principal => Ok(()),
        Need::Admin => access.require(Permission::Admin, None),
        Need::Kind(p) => per_kind(&|k| access.require(p, Some(k))),
        Need::Holder => per_kind(&|k| {
            access
                .require(Permission::Shared, Some(k))
                .or_else(|_| access.require(Permission::Acquire, Some(k)))
        }),
    };
    match checked {
        Ok(()) => next.run(req).await,
        Err(e) => refused(e),
    }
}
