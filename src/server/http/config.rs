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
    /// HTTP connections served at once; more are closed at once.
    pub max_connections: usize,
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
}

impl HttpConfig {
    /// The defaults, listening on `listen`.
    pub fn new(listen: SocketAddr) -> HttpConfig {
        HttpConfig {
            listen,
            max_connections: 256,
            max_body: 16 * 1024,
            header_timeout: Duration::from_secs(10),
            max_wait: Duration::from_secs(60),
            request_timeout: Duration::from_secs(75),
            default_lease: Duration::from_secs(30),
            max_locks: 10_000,
            max_metric_kinds: 64,
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
}
