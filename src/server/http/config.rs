//! Settings of the HTTP port (metrics, health, REST API, status page), their
//! defaults and their rules, next to the TCP server's own.

use std::net::SocketAddr;
use std::time::Duration;

use thiserror::Error;

/// HTTP port settings. `HttpConfig::new(listen)` gives the defaults.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// HTTP connections served at once; past it a new connection gets a
    /// `503 LIMIT_EXCEEDED` answer (or, past a small number of such answers
    /// in progress, is closed).
    pub max_connections: usize,
    /// Lock requests (acquires, rotations: the requests that may wait) in
    /// progress at once; more get an immediate `429 LIMIT_EXCEEDED`. Below
    /// `max_connections`, so waiting acquires never take every connection:
    /// the rest stay for `/healthz`, `/readyz`, `/metrics` and quick requests.
    pub max_lock_requests: usize,
    /// Largest request body read, in bytes; larger ones get 413.
    pub max_body: usize,
    /// Time a client has to send a request's headers.
    pub header_timeout: Duration,
    /// Longest an acquire over HTTP may wait (`timeoutMs`).
    pub max_wait: Duration,
    /// Every request is answered within this (503 `TIMEOUT` otherwise); at
    /// least `max_wait` plus a margin, so an acquire's own wait never hits it.
    pub request_timeout: Duration,
    /// The lease of a lock taken over HTTP that asks for none: HTTP locks
    /// always have one, since no connection's end would release them.
    pub default_lease: Duration,
    /// Locks held over HTTP at once (waits included); more get 429.
    pub max_locks: usize,
    /// Distinct lock kinds that get their own label in the metrics; the
    /// rest are counted under `other`.
    pub max_metric_kinds: usize,
    /// Honour a release on the original Clastor's path
    /// (`/api/v1/locks/{resource}/release?resourceId=`) that names no token,
    /// releasing whatever HTTP lock the key has. Off by default, and unsafe
    /// when on: anyone who can reach the port can then release anyone's
    /// HTTP lock. Only for migrating clients that cannot send the token yet.
    pub compat_tokenless_release: bool,
    /// With authentication on, serve `/metrics` without credentials (for a
    /// scraper on a trusted network). Off: it needs the admin permission.
    pub metrics_public: bool,
}

impl HttpConfig {
    /// The default `max_lock_requests` for `max_connections`: three
    /// quarters of them, leaving the rest to health checks, metrics and
    /// the other routes.
    pub fn lock_requests_for(max_connections: usize) -> usize {
        (max_connections - max_connections.div_ceil(4)).max(1)
    }

    /// The defaults, listening on `listen`.
    pub fn new(listen: SocketAddr) -> HttpConfig {
        HttpConfig {
            listen,
            max_connections: 256,
            max_lock_requests: HttpConfig::lock_requests_for(256),
            max_body: 16 * 1024,
            header_timeout: Duration::from_secs(10),
            max_wait: Duration::from_secs(60),
            request_timeout: Duration::from_secs(75),
            default_lease: Duration::from_secs(30),
            max_locks: 10_000,
            max_metric_kinds: 64,
            compat_tokenless_release: false,
            metrics_public: false,
        }
    }

    /// Checks that these settings can serve.
    ///
    /// # Errors
    /// The first rule broken.
    pub fn validate(&self) -> Result<(), HttpConfigError> {
        if self.max_connections == 0 {
            return Err(HttpConfigError::Zero("max_connections"));
        }
        if self.max_lock_requests == 0 {
            return Err(HttpConfigError::Zero("max_lock_requests"));
        }
        if self.max_lock_requests >= self.max_connections {
            return Err(HttpConfigError::LockRequestsNotBelowConnections {
                max_lock_requests: self.max_lock_requests,
                max_connections: self.max_connections,
            });
        }
        if self.default_lease.is_zero() {
            return Err(HttpConfigError::Zero("default_lease"));
        }
        if self.request_timeout <= self.max_wait {
            return Err(HttpConfigError::TimeoutBelowWait {
                request_timeout: self.request_timeout,
                max_wait: self.max_wait,
            });
        }
        Ok(())
    }
}

/// HTTP settings the server refuses to start with.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum HttpConfigError {
    /// A limit of zero, which would refuse everything.
    #[error("HTTP setting {0} must be greater than zero")]
    Zero(&'static str),
    /// Waiting lock requests could take every connection, and health
    /// checks and metrics would go unanswered.
    #[error(
        "HTTP max_lock_requests ({max_lock_requests}) must be below max_connections ({max_connections}), \
         so health checks and metrics keep connections of their own (--http-max-lock-requests, --http-max-connections)"
    )]
    LockRequestsNotBelowConnections {
        /// Lock requests at once.
        max_lock_requests: usize,
        /// Connections at once.
        max_connections: usize,
    },
    /// Requests would be cut before an acquire's longest wait ends.
    #[error("HTTP request_timeout ({request_timeout:?}) must be longer than max_wait ({max_wait:?})")]
    TimeoutBelowWait {
        /// The request timeout.
        request_timeout: Duration,
        /// The longest acquire wait.
        max_wait: Duration,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid() {
        assert_eq!(
            HttpConfig::new(SocketAddr::from(([127, 0, 0, 1], 0))).validate(),
            Ok(())
        );
    }

    #[test]
    fn the_request_timeout_must_outlast_the_wait() {
        let mut c = HttpConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)));
        c.request_timeout = c.max_wait;
        assert!(matches!(c.validate(), Err(HttpConfigError::TimeoutBelowWait { .. })));
    }

    #[test]
    fn lock_requests_leave_connections_for_health_checks() {
        let mut c = HttpConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)));
        c.max_lock_requests = c.max_connections;
        assert!(matches!(
            c.validate(),
            Err(HttpConfigError::LockRequestsNotBelowConnections { .. })
        ));
        c.max_lock_requests = 0;
        assert_eq!(c.validate(), Err(HttpConfigError::Zero("max_lock_requests")));
        for (connections, lock_requests) in [(256, 192), (100, 75), (5, 3), (2, 1), (1, 1)] {
            assert_eq!(HttpConfig::lock_requests_for(connections), lock_requests);
        }
        assert_eq!(HttpConfig::new(c.listen).max_lock_requests, 192);
        c.max_lock_requests = c.max_connections - 1;
        assert_eq!(c.validate(), Ok(()));
    }
}
