//! Who a gRPC call is: `authorization: Bearer <token>` metadata (the auth
//! file's tokens, one attempt per call, as on the HTTP port) or, with mTLS,
//! the client certificate's principal. A session (a stream or an
//! `OpenSession` one) keeps the principal that opened it; a unary call on
//! it must come from the same principal. Permissions are then checked per
//! request by `dispatch`, as on the binary port, against the auth file as
//! it is now (a reload applies to open sessions too).
//!
//! Without auth (no auth file) every call is let through, as on the other
//! ports.

use clastor_protocol::{ErrorReply, Status};
use tonic::Request;

use super::conn::GrpcPeer;
use super::status;
use crate::backend::Backend;
use crate::server::auth::{AUTHENTICATE_FIRST, Access, Permission};
use crate::server::state::ServerState;

fn unauthenticated(message: &str) -> tonic::Status {
    status::to_status(ErrorReply {
        status: Status::Unauthenticated,
        message: message.to_owned(),
    })
}

/// The access of the caller of `request`.
///
/// # Errors
/// `UNAUTHENTICATED` with auth on and no principal: no credentials, a
/// malformed `authorization` value, or a refused token (one message for
/// every refused token, so it tells nothing about why).
pub(super) fn caller<B: Backend, T>(shared: &ServerState<B>, request: &Request<T>) -> Result<Access, tonic::Status> {
    let peer = request.extensions().get::<GrpcPeer>();
    let access = shared.access(peer.and_then(|p| p.cert.as_deref()));
    if !access.is_required() {
        return Ok(access);
    }
    bearer(shared, request, peer, access)
}

/// Authenticates `access` (auth on) with the call's bearer token, if any.
#[cfg(feature = "tls")]
fn bearer<B: Backend, T>(
    shared: &ServerState<B>,
    request: &Request<T>,
    peer: Option<&GrpcPeer>,
    mut access: Access,
) -> Result<Access, tonic::Status> {
    use crate::server::auth::REFUSED;
    let Some(value) = request.metadata().get("authorization") else {
        return match access.principal() {
            Some(_) => Ok(access),
            None => Err(unauthenticated(AUTHENTICATE_FIRST)),
        };
    };
    let Some(token) = value.to_str().ok().and_then(crate::server::auth::bearer_token) else {
        return Err(unauthenticated("the authorization metadata must be `Bearer <token>`"));
    };
    let Some(peer) = peer else {
        return Err(unauthenticated(REFUSED));
    };
    // One attempt per call; the count is the metric's.
    let mut attempts = 0;
    access
        .authenticate(
            &clastor_protocol::AuthToken::new(token),
            &mut attempts,
            peer.addr,
            &shared.stats.grpc_auth_failures,
        )
        .map_err(|_| unauthenticated(REFUSED))?;
    Ok(access)
}

/// Without the `tls` feature auth is never on.
#[cfg(not(feature = "tls"))]
fn bearer<B: Backend, T>(
    _: &ServerState<B>,
    _: &Request<T>,
    _: Option<&GrpcPeer>,
    _: Access,
) -> Result<Access, tonic::Status> {
    Err(unauthenticated(AUTHENTICATE_FIRST))
}

/// The caller of a unary call on a session opened as `owner`.
///
/// # Errors
/// As [`caller`]; `PERMISSION_DENIED` (`FORBIDDEN`) when the caller is
/// another principal than the session's.
pub(super) fn same_principal<B: Backend, T>(
    shared: &ServerState<B>,
    request: &Request<T>,
    owner: &Access,
) -> Result<(), tonic::Status> {
    let access = caller(shared, request)?;
    if access.principal() == owner.principal() {
        return Ok(());
    }
    Err(status::to_status(ErrorReply {
        status: Status::Forbidden,
        message: format!(
            "the session belongs to another principal than {}",
            access.principal().unwrap_or_default()
        ),
    }))
}

/// The caller, if it has `perm` (on `kind`).
///
/// # Errors
/// As [`caller`]; `PERMISSION_DENIED` (`FORBIDDEN`) without the permission.
pub(super) fn require<B: Backend, T>(
    shared: &ServerState<B>,
    request: &Request<T>,
    perm: Permission,
    kind: Option<&str>,
) -> Result<Access, tonic::Status> {
    let access = caller(shared, request)?;
    access.require(perm, kind).map_err(status::to_status)?;
    Ok(access)
}
