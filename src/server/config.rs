//! Server settings, their production defaults, and the rules a usable
//! combination of them must follow ([`ServerConfig::validate`]), checked
//! once for the command line, the tests and library users alike.

use std::net::SocketAddr;
use std::time::Duration;

use clastor_protocol::{MAX_FRAME_LEN_CEILING, MIN_FRAME_LEN};
use thiserror::Error;

use crate::engine::EngineConfig;

/// In-flight slots a connection keeps beyond its waits, so that however many
/// acquires it has waiting it can still send (and be read for) more requests.
pub const IN_FLIGHT_HEADROOM: usize = 16;

/// Server settings. `Default` gives the production defaults.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Connections served at once; more are refused with `LIMIT_EXCEEDED`.
    pub max_connections: usize,
    /// Requests processed concurrently per connection; further frames are
    /// read only as earlier requests finish (TCP back-pressure). At least the
    /// engine's `max_waits_per_session` + [`IN_FLIGHT_HEADROOM`]: a connection
    /// whose slots were all taken by waits would not be read, so its going
    /// away would not be noticed until one of them ends.
    pub max_in_flight: usize,
    /// Largest frame accepted from a client (header + body), between
    /// [`MIN_FRAME_LEN`] and [`MAX_FRAME_LEN_CEILING`].
    pub max_frame_len: usize,
    /// Time a new connection has to send its first byte and, in binary mode,
    /// to complete `HELLO`.
    pub handshake_timeout: Duration,
    /// A connection with no request in flight, no lock held and no traffic for
    /// this long is closed. `None`: never.
    pub idle_timeout: Option<Duration>,
    /// How long a stalled client may block a write before it is dropped
    /// (its locks released). More than zero: a write that could block for
    /// ever would pin the connection, and its locks, until shutdown.
    pub write_timeout: Duration,
    /// TCP keepalive idle time on accepted connections (`None`: off). A
    /// client whose host vanished (power loss, partition) holds its locks
    /// until its connection is known dead: about twice this long (idle time,
    /// then three probes a third of it apart; unacknowledged writes give up
    /// after the same time).
    pub tcp_keepalive: Option<Duration>,
    /// On shutdown, how long connections get to say goodbye and release their
    /// locks before they are cut.
    pub shutdown_grace: Duration,
    /// The operators' HTTP port (metrics, health, REST API, status page);
    /// `None`: off.
    #[cfg(feature = "http")]
    pub http: Option<super::HttpConfig>,
    /// Client authentication and per-kind permissions from an auth file
    /// (every port); `None`: off, anyone who reaches the ports may do
    /// anything.
    #[cfg(feature = "tls")]
    pub auth: Option<super::AuthConfig>,
    /// TLS on every port (and mTLS with a client CA); `None`: plain TCP.
    #[cfg(feature = "tls")]
    pub tls: Option<super::TlsConfig>,
    /// The gRPC API's port; `None`: off.
    #[cfg(feature = "grpc")]
    pub grpc: Option<super::GrpcConfig>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            max_connections: 10_000,
            max_in_flight: 512,
            max_frame_len: clastor_protocol::DEFAULT_MAX_FRAME_LEN,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Some(Duration::from_secs(600)),
            write_timeout: Duration::from_secs(30),
            tcp_keepalive: Some(Duration::from_secs(30)),
            shutdown_grace: Duration::from_secs(10),
            #[cfg(feature = "http")]
            http: None,
            #[cfg(feature = "tls")]
            auth: None,
            #[cfg(feature = "tls")]
            tls: None,
            #[cfg(feature = "grpc")]
            grpc: None,
        }
    }
}

/// A combination of settings the server refuses to start with.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// Waits could take every in-flight slot of a connection.
    #[error(
        "--max-in-flight (max_in_flight) is {max_in_flight} but must be at least --max-waits \
         (max_waits_per_session, {max_waits}) + {IN_FLIGHT_HEADROOM} = {minimum}, so that a \
         connection with every wait taken can still be read"
    )]
    InFlightBelowWaits {
        /// The requested in-flight limit.
        max_in_flight: usize,
        /// The engine's wait limit per session.
        max_waits: usize,
        /// The smallest in-flight limit allowed with that wait limit.
        minimum: usize,
    },
    /// A frame limit that refuses valid requests or that framing cannot carry.
    #[error(
        "--max-frame (max_frame_len) is {max_frame_len} bytes but must be between {MIN_FRAME_LEN} \
         (the largest valid request) and {MAX_FRAME_LEN_CEILING}"
    )]
    FrameLenOutOfRange {
        /// The requested frame limit.
        max_frame_len: usize,
    },
    /// The HTTP port's settings break one of its rules.
    #[cfg(feature = "http")]
    #[error(transparent)]
    Http(#[from] super::HttpConfigError),
    /// The gRPC port's settings break one of its rules.
    #[cfg(feature = "grpc")]
    #[error(transparent)]
    Grpc(#[from] super::GrpcConfigError),
    /// A limit or timeout of zero, which would refuse everything.
    #[error("{flag} ({field}) must be greater than zero")]
    Zero {
        /// The setting's field name.
        field: &'static str,
        /// The `clastor serve` flag that sets it.
        flag: &'static str,
    },
}

impl ServerConfig {
    /// The longest this server can promise a connection that nobody else
    /// will be granted its locks, whatever the backend says (safe-until):
    /// the server itself releases a connection's locks when its TCP keepalive
    /// gives the peer up (no sooner than the keepalive idle time after it last
    /// heard from it), when a write to it blocks for the write timeout, and on
    /// shutdown after the shutdown grace. Never `None` today: the write
    /// timeout and the shutdown grace are always finite, so this server never
    /// sends `safe_ms` = `u32::MAX` ("no bound", PROTOCOL.md, "Safe-until").
    pub fn safe_horizon(&self) -> Option<Duration> {
        let mut horizon = self.write_timeout.min(self.shutdown_grace);
        if let Some(idle) = self.tcp_keepalive {
            horizon = horizon.min(idle);
        }
        Some(horizon)
    }

    /// Checks that these settings, with the engine's `engine` limits, make a
    /// server that can serve: [`spawn`](super::spawn) refuses them otherwise.
    ///
    /// # Errors
    /// The first rule broken, naming the settings and flags involved.
    pub fn validate(&self, engine: &EngineConfig) -> Result<(), ConfigError> {
        let zero = |field, flag| Err(ConfigError::Zero { field, flag });
        if self.max_connections == 0 {
            return zero("max_connections", "--max-connections");
        }
        if engine.max_held_per_session == 0 {
            return zero("max_held_per_session", "--max-held");
        }
        if self.handshake_timeout.is_zero() {
            return zero("handshake_timeout", "--handshake-timeout");
        }
        if self.write_timeout.is_zero() {
            return zero("write_timeout", "--write-timeout");
        }
        let minimum = engine.max_waits_per_session.saturating_add(IN_FLIGHT_HEADROOM);
        if self.max_in_flight < minimum {
            return Err(ConfigError::InFlightBelowWaits {
                max_in_flight: self.max_in_flight,
                max_waits: engine.max_waits_per_session,
                minimum,
            });
        }
        if !(MIN_FRAME_LEN..=MAX_FRAME_LEN_CEILING).contains(&self.max_frame_len) {
            return Err(ConfigError::FrameLenOutOfRange {
                max_frame_len: self.max_frame_len,
            });
        }
        #[cfg(feature = "http")]
        if let Some(http) = &self.http {
            http.validate()?;
        }
        #[cfg(feature = "tls")]
        if self.auth.as_ref().is_some_and(|a| a.max_failures == 0) {
            return zero("auth.max_failures", "--auth-max-failures");
        }
        #[cfg(feature = "grpc")]
        if let Some(grpc) = &self.grpc {
            grpc.validate()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid() {
        assert_eq!(ServerConfig::default().validate(&EngineConfig::default()), Ok(()));
    }

    #[test]
    fn in_flight_must_leave_room_beyond_the_waits() {
        let engine = EngineConfig {
            max_waits_per_session: 256,
            ..EngineConfig::default()
        };
        let config = |max_in_flight| ServerConfig {
            max_in_flight,
            ..ServerConfig::default()
        };
        assert_eq!(config(272).validate(&engine), Ok(()));
        let err = config(2).validate(&engine);
        assert_eq!(
            err,
            Err(ConfigError::InFlightBelowWaits {
                max_in_flight: 2,
                max_waits: 256,
                minimum: 272
            })
        );
        let message = err.map_err(|e| e.to_string()).err().unwrap_or_default();
        assert!(
            message.contains("--max-in-flight") && message.contains("--max-waits"),
            "{message}"
        );
        assert!(message.contains("272"), "{message}");
        assert!(config(271).validate(&engine).is_err());
    }

    #[test]
    fn frame_limit_must_carry_every_request() {
        let config = |max_frame_len| ServerConfig {
            max_frame_len,
            ..ServerConfig::default()
        };
        let engine = EngineConfig::default();
        assert_eq!(config(MIN_FRAME_LEN).validate(&engine), Ok(()));
        assert_eq!(config(MAX_FRAME_LEN_CEILING).validate(&engine), Ok(()));
        for bad in [0, 8, MIN_FRAME_LEN - 1, MAX_FRAME_LEN_CEILING + 1] {
            assert_eq!(
                config(bad).validate(&engine),
                Err(ConfigError::FrameLenOutOfRange { max_frame_len: bad })
            );
        }
    }

    #[test]
    fn zero_limits_are_refused() {
        let engine = EngineConfig::default();
        let no_connections = ServerConfig {
            max_connections: 0,
            ..ServerConfig::default()
        };
        assert!(matches!(
            no_connections.validate(&engine),
            Err(ConfigError::Zero {
                field: "max_connections",
                ..
            })
        ));
        let no_locks = EngineConfig {
            max_held_per_session: 0,
            ..EngineConfig::default()
        };
        let no_writes = ServerConfig {
            write_timeout: Duration::ZERO,
            ..ServerConfig::default()
        };
        assert!(matches!(
            no_writes.validate(&engine),
            Err(ConfigError::Zero {
                field: "write_timeout",
                flag: "--write-timeout"
            })
        ));
        assert!(matches!(
            ServerConfig::default().validate(&no_locks),
            Err(ConfigError::Zero {
                field: "max_held_per_session",
                ..
            })
        ));
    }
}
