//! Who may do what (feature `tls`; without it every request is allowed and
//! `AUTH` is `UNSUPPORTED`).
//!
//! A connection starts with no principal, unless its verified mTLS client
//! certificate names one. `AUTH` names one by a token. The principal stays
//! with the connection; its permissions are read from the auth file as it
//! is *now* (a reload on `SIGHUP` applies to established connections at
//! their next request). The checks of one request ([`Access::check`]) come
//! before any other check that depends on the request's contents, in the
//! order PROTOCOL.md §13 states: `UNAUTHENTICATED`, then `FORBIDDEN`.
//!
//! Failed `AUTH`s are counted per connection; at `max_failures` the
//! connection is told `CLOSING UNAUTHENTICATED` and closed. A failure is
//! logged with the peer's address and counted in a metric, never with the
//! token.

#[cfg(feature = "tls")]
mod policy;

use std::net::SocketAddr;
#[cfg(feature = "tls")]
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
#[cfg(feature = "tls")]
use std::sync::{Arc, RwLock};

use clastor_protocol::{AuthToken, ErrorReply, HeldScope, LockMode, Request, ResponseBody, Status};

/// The hex SHA-256 of a token: what the auth file's `token_sha256` holds
/// (`clastor auth hash-token`).
#[cfg(feature = "tls")]
pub fn hash_token(token: &str) -> String {
    policy::to_hex(&policy::digest(token))
}

/// What a grant in the auth file allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "tls", derive(serde::Deserialize), serde(rename_all = "lowercase"))]
pub(crate) enum Permission {
    /// Take exclusive locks of the kind (and shared ones), renew and release them.
    Acquire = 0,
    /// Take shared locks of the kind.
    Shared = 1,
    /// Read the kind's version (`VERSION`).
    Read = 2,
    /// Rotate the kind (`ROTATE`, `ROTATE_ABORT`).
    Rotate = 3,
    /// Server-wide: `HELD ALL`, `INFO`'s details, the HTTP status page,
    /// listings and (unless public) metrics.
    Admin = 4,
}

impl Permission {
    fn verb(self) -> &'static str {
        match self {
            Permission::Acquire => "acquire",
            Permission::Shared => "take shared locks of",
            Permission::Read => "read",
            Permission::Rotate => "rotate",
            Permission::Admin => "administer",
        }
    }
}

/// The message of every refused token: the same whatever was wrong.
#[cfg(any(feature = "tls", feature = "http"))]
pub(crate) const REFUSED: &str = "authentication failed";

/// The token of an `Authorization`-style value `Bearer <token>` (scheme in
/// any case, blanks around the token ignored); `None` if it is not one.
#[cfg(any(feature = "http", feature = "grpc"))]
pub(crate) fn bearer_token(value: &str) -> Option<&str> {
    value
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim())
        .filter(|t| !t.is_empty())
}

/// The message of a request that needs a principal and has none.
pub(crate) const AUTHENTICATE_FIRST: &str = "authenticate first: send AUTH with a token";

/// Authentication settings: where the auth file is, and how many failed
/// `AUTH`s a connection gets.
#[cfg(feature = "tls")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthConfig {
    /// The TOML file of principals and grants (README, "Security").
    pub file: PathBuf,
    /// Failed `AUTH`s after which a connection is closed (at least 1).
    pub max_failures: u32,
}

#[cfg(feature = "tls")]
impl AuthConfig {
    /// Auth from `file`, with the default bound on failures (3).
    pub fn new(file: impl Into<PathBuf>) -> AuthConfig {
        AuthConfig {
            file: file.into(),
            max_failures: 3,
        }
    }
}

/// An auth file that cannot be used.
#[cfg(feature = "tls")]
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The file cannot be read.
    #[error("cannot read the auth file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file breaks the format or a rule (which, and where; never the
    /// file's text).
    #[error("auth file: {0}")]
    Invalid(String),
}

/// The server's auth file, as last loaded.
#[cfg(feature = "tls")]
#[derive(Debug)]
pub(crate) struct Authenticator {
    path: PathBuf,
    policy: RwLock<Arc<policy::AuthPolicy>>,
    pub(crate) max_failures: u32,
}

#[cfg(feature = "tls")]
impl Authenticator {
    /// Loads the file.
    ///
    /// # Errors
    /// The file cannot be read or is invalid.
    pub(crate) fn load(config: &AuthConfig) -> Result<Authenticator, AuthError> {
        let policy = read(&config.file)?;
        Ok(Authenticator {
            path: config.file.clone(),
            policy: RwLock::new(Arc::new(policy)),
            max_failures: config.max_failures.max(1),
        })
    }

    /// Reads the file again; keeps the current one if the new one is
    /// invalid. Returns how many principals it names.
    ///
    /// # Errors
    /// The new file cannot be read or is invalid (the old one stays).
    pub(crate) fn reload(&self) -> Result<usize, AuthError> {
        let policy = read(&self.path)?;
        let n = policy.len();
        *self.policy.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(policy);
        Ok(n)
    }

    pub(crate) fn policy(&self) -> Arc<policy::AuthPolicy> {
        self.policy
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The principal a verified client certificate's name maps to.
    pub(crate) fn principal_for_cert(&self, cert_name: &str) -> Option<Arc<str>> {
        self.policy().principal_for_cert(cert_name)
    }
}

#[cfg(feature = "tls")]
fn read(path: &Path) -> Result<policy::AuthPolicy, AuthError> {
    let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
        path: path.to_owned(),
        source,
    })?;
    policy::AuthPolicy::parse(&text)
}

/// Why an `AUTH` was not accepted.
#[derive(Debug)]
pub(crate) struct Refusal {
    pub(crate) reply: ErrorReply,
    /// The connection has used up its attempts: send `CLOSING` and close.
    pub(crate) close: bool,
}

/// Text of the `CLOSING` after the last failed attempt.
pub(crate) const TOO_MANY_FAILURES: &str = "too many failed authentication attempts";

fn reply(status: Status, message: impl Into<String>) -> ErrorReply {
    ErrorReply {
        status,
        message: message.into(),
    }
}

/// What the requests of one connection (or one HTTP request) may do: the
/// server's authenticator, if auth is on, and the principal, once known.
#[derive(Debug, Clone, Default)]
pub(crate) struct Access {
    #[cfg(feature = "tls")]
    auth: Option<Arc<Authenticator>>,
    #[cfg(feature = "tls")]
    principal: Option<Arc<str>>,
}

impl Access {
    /// Access with auth on (`auth`) or off (`None`), for a principal
    /// already known (an mTLS certificate's) or none yet.
    #[cfg(feature = "tls")]
    pub(crate) fn new(auth: Option<Arc<Authenticator>>, principal: Option<Arc<str>>) -> Access {
        Access { auth, principal }
    }

    /// Whether requests need a principal.
    pub(crate) fn is_required(&self) -> bool {
        #[cfg(feature = "tls")]
        return self.auth.is_some();
        #[cfg(not(feature = "tls"))]
        false
    }

    /// The principal, once authenticated.
    pub(crate) fn principal(&self) -> Option<&str> {
        #[cfg(feature = "tls")]
        return self.principal.as_deref();
        #[cfg(not(feature = "tls"))]
        None
    }

    /// Whether the principal may do `perm` (on `kind`); always with auth off.
    pub(crate) fn allows(&self, perm: Permission, kind: Option<&str>) -> bool {
        #[cfg(feature = "tls")]
        {
            let Some(auth) = &self.auth else { return true };
            let Some(principal) = &self.principal else {
                return false;
            };
            auth.policy().allows(principal, perm, kind)
        }
        #[cfg(not(feature = "tls"))]
        {
            let _ = (perm, kind);
            true
        }
    }

    /// `UNAUTHENTICATED` without a principal, `FORBIDDEN` without `perm`.
    ///
    /// # Errors
    /// The refusal, with a message naming the principal and what it lacks.
    pub(crate) fn require(&self, perm: Permission, kind: Option<&str>) -> Result<(), ErrorReply> {
        if !self.is_required() {
            return Ok(());
        }
        let Some(principal) = self.principal() else {
            return Err(reply(Status::Unauthenticated, AUTHENTICATE_FIRST));
        };
        if self.allows(perm, kind) {
            return Ok(());
        }
        #[cfg(feature = "tls")]
        if let Some(auth) = &self.auth
            && !auth.policy().knows(principal)
        {
            return Err(reply(
                Status::Forbidden,
                format!("principal {principal} is no longer in the auth file"),
            ));
        }
        Err(reply(
            Status::Forbidden,
            match kind {
                Some(kind) => format!("principal {principal} may not {} kind {kind}", perm.verb()),
                None => format!("principal {principal} needs the admin permission"),
            },
        ))
    }

    /// The authentication and permission checks of one request, before
    /// anything else about it is looked at (PROTOCOL.md §13, "Checks").
    ///
    /// # Errors
    /// `UNAUTHENTICATED` or `FORBIDDEN`.
    pub(crate) fn check(&self, req: &Request) -> Result<(), ErrorReply> {
        if !self.is_required() {
            return Ok(());
        }
        match req {
            Request::Hello(_) | Request::Ping | Request::Auth { .. } => return Ok(()),
            _ if self.principal().is_none() => return Err(reply(Status::Unauthenticated, AUTHENTICATE_FIRST)),
            _ => {}
        }
        match req {
            Request::Acquire(a) => {
                let perm = match a.mode {
                    LockMode::Shared => Permission::Shared,
                    LockMode::Exclusive => Permission::Acquire,
                };
                self.require(perm, Some(&a.kind))
            }
            // Holding a kind's locks in either mode lets a connection renew them.
            Request::Renew { kind, .. } => self
                .require(Permission::Shared, Some(kind))
                .or_else(|_| self.require(Permission::Acquire, Some(kind))),
            Request::Held {
                scope: HeldScope::Server,
            } => self.require(Permission::Admin, None),
            Request::Version { kind } => self.require(Permission::Read, Some(kind)),
            Request::Rotate(r) => self.require(Permission::Rotate, Some(&r.kind)),
            Request::RotateAbort { kind } => self.require(Permission::Rotate, Some(kind)),
            // Giving back, one's own listing, safe-until and INFO (whose
            // details need admin: `is_admin`) need only a principal.
            Request::Release { .. }
            | Request::Held {
                scope: HeldScope::Connection,
            }
            | Request::Confirm
            | Request::Info
            | Request::Hello(_)
            | Request::Ping
            | Request::Auth { .. } => Ok(()),
        }
    }

    /// Whether server-wide details may be shown (always with auth off).
    pub(crate) fn is_admin(&self) -> bool {
        self.allows(Permission::Admin, None)
    }

    /// Handles an `AUTH` on the connection this access belongs to:
    /// `failures` is the connection's count of failed attempts, `counter`
    /// the server's.
    ///
    /// # Errors
    /// `UNSUPPORTED` with auth off; `UNAUTHENTICATED` with one generic
    /// message for any refused token, and `close` at the last attempt.
    pub(crate) fn authenticate(
        &mut self,
        token: &AuthToken,
        failures: &mut u32,
        peer: SocketAddr,
        counter: &AtomicU64,
    ) -> Result<ResponseBody, Refusal> {
        #[cfg(feature = "tls")]
        if let Some(auth) = &self.auth {
            if let Some(principal) = auth.policy().authenticate(token.expose()) {
                tracing::debug!(%peer, %principal, "authenticated");
                self.principal = Some(principal.clone());
                return Ok(ResponseBody::Authenticated {
                    principal: principal.to_string(),
                });
            }
            return Err(failed(failures, auth.max_failures, peer, counter));
        }
        let _ = (token, failures, peer, counter);
        Err(Refusal {
            reply: reply(Status::Unsupported, "authentication is not enabled on this server"),
            close: false,
        })
    }

    /// Counts a malformed `AUTH` as a failed attempt (when auth is on).
    pub(crate) fn malformed_attempt(&self, failures: &mut u32, peer: SocketAddr, counter: &AtomicU64) -> bool {
        #[cfg(feature = "tls")]
        if let Some(auth) = &self.auth {
            return failed(failures, auth.max_failures, peer, counter).close;
        }
        let _ = (failures, peer, counter);
        false
    }
}

#[cfg(feature = "tls")]
fn failed(failures: &mut u32, max: u32, peer: SocketAddr, counter: &AtomicU64) -> Refusal {
    *failures += 1;
    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let close = *failures >= max;
    tracing::warn!(%peer, attempt = *failures, max, closing = close, "authentication failed");
    Refusal {
        reply: reply(Status::Unauthenticated, REFUSED),
        close,
    }
}

#[cfg(all(test, any(feature = "http", feature = "grpc")))]
mod tests {
    use super::bearer_token;

    #[test]
    fn bearer_tokens_are_read_and_anything_else_is_not_one() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc "), Some("abc"));
        assert_eq!(bearer_token("BEARER abc"), Some("abc"));
        for bad in ["Basic abc", "Bearer", "Bearer ", "Bearer   ", "abc", ""] {
            assert_eq!(bearer_token(bad), None, "{bad:?}");
        }
    }
}
