//! Settings of the gRPC port, their defaults and their rules, next to the
//! TCP server's own (the per-stream in-flight limit, the write timeout and
//! the keepalive are the TCP server's, so both owners behave alike).

use std::net::SocketAddr;
use std::time::Duration;

use thiserror::Error;

/// gRPC port settings. `GrpcConfig::new(listen)` gives the defaults.
#[derive(Debug, Clone)]
pub struct GrpcConfig {
    /// Address to listen on (HTTP/2 without TLS, "h2c").
    pub listen: SocketAddr,
    /// gRPC connections served at once; past it a new one is closed at once.
    pub max_connections: usize,
    /// Sessions open at once, streams and unary sessions together; past it
    /// `OpenSession` and a new `Session` stream fail `RESOURCE_EXHAUSTED`.
    pub max_sessions: usize,
    /// Calls (streams included) in progress at once on one connection
    /// (HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS`).
    pub max_streams_per_connection: u32,
    /// Largest message accepted or sent, in bytes (requests are small; a
    /// `Held` listing of the whole server is the large reply).
    pub max_message: usize,
    /// A unary session that no call has named for this long is closed and
    /// its locks released: an abandoned client cannot hold them for ever.
    /// As long as the TCP port's keepalive default, so a vanished unary
    /// client loses its locks about as soon as a vanished binary one; and
    /// it bounds the unary sessions' `safe_ms`, since the server may release
    /// their locks that long after their last call.
    pub idle_expiry: Duration,
}

impl GrpcConfig {
    /// The defaults, listening on `listen`.
    pub fn new(listen: SocketAddr) -> GrpcConfig {
        GrpcConfig {
            listen,
            max_connections: 1024,
            max_sessions: 10_000,
            max_streams_per_connection: 256,
            max_message: 4 * 1024 * 1024,
            idle_expiry: Duration::from_secs(30),
        }
    }

    /// Checks that these settings can serve.
    ///
    /// # Errors
    /// The first rule broken.
    pub fn validate(&self) -> Result<(), GrpcConfigError> {
        if self.max_connections == 0 {
            return Err(GrpcConfigError::Zero("max_connections"));
        }
        if self.max_sessions == 0 {
            return Err(GrpcConfigError::Zero("max_sessions"));
        }
        if self.max_streams_per_connection == 0 {
            return Err(GrpcConfigError::Zero("max_streams_per_connection"));
        }
        if self.idle_expiry.is_zero() {
            return Err(GrpcConfigError::Zero("idle_expiry"));
        }
        if self.max_message < MIN_MESSAGE {
            return Err(GrpcConfigError::MessageTooSmall(self.max_message));
        }
        Ok(())
    }
}

/// The smallest message limit: the largest request (two 128-byte names, a
/// trace id and the numbers) with room to spare.
pub(super) const MIN_MESSAGE: usize = 1024;

/// gRPC settings the server refuses to start with.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum GrpcConfigError {
    /// A limit or timeout of zero, which would refuse everything.
    #[error("gRPC setting {0} must be greater than zero")]
    Zero(&'static str),
    /// A message limit below the largest request.
    #[error("gRPC max_message is {0} bytes but must be at least {MIN_MESSAGE}")]
    MessageTooSmall(usize),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid_and_zeros_are_not() {
        let ok = GrpcConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)));
        assert_eq!(ok.validate(), Ok(()));
        let zero = GrpcConfig {
            idle_expiry: Duration::ZERO,
            ..ok.clone()
        };
        assert_eq!(zero.validate(), Err(GrpcConfigError::Zero("idle_expiry")));
        let tiny = GrpcConfig { max_message: 10, ..ok };
        assert_eq!(tiny.validate(), Err(GrpcConfigError::MessageTooSmall(10)));
    }
}
