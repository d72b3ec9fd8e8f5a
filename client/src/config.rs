//! Client configuration: the server address and the builder's knobs.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use clastor_protocol::{AuthToken, MAX_FRAME_LEN_CEILING};

/// Where a server is: a socket address or a `host:port` string, resolved
/// anew on every (re)connect so a server that moved in DNS is found again.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServerAddr(String);

impl ServerAddr {
    /// The address as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<SocketAddr> for ServerAddr {
    fn from(a: SocketAddr) -> ServerAddr {
        ServerAddr(a.to_string())
    }
}

impl From<&str> for ServerAddr {
    fn from(a: &str) -> ServerAddr {
        ServerAddr(a.to_owned())
    }
}

impl From<String> for ServerAddr {
    fn from(a: String) -> ServerAddr {
        ServerAddr(a)
    }
}

impl From<&String> for ServerAddr {
    fn from(a: &String) -> ServerAddr {
        ServerAddr(a.clone())
    }
}

/// Builds a [`Client`](crate::Client) with non-default settings;
/// [`connect`](ClientBuilder::connect) (in `client.rs`, next to the pool it
/// starts) finishes it.
///
/// ```no_run
/// # async fn f() -> Result<(), clastor_client::Error> {
/// use std::time::Duration;
/// let client = clastor_client::Client::builder("127.0.0.1:7070")
///     .connections(4)
///     .client_name("billing-worker")
///     .connect_timeout(Duration::from_secs(2))
///     .connect()
///     .await?;
/// # let _ = client; Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    pub(crate) addr: ServerAddr,
    pub(crate) connections: usize,
    pub(crate) client_name: String,
    pub(crate) connect_timeout: Duration,
    pub(crate) request_timeout: Option<Duration>,
    pub(crate) backoff_min: Duration,
    pub(crate) backoff_max: Duration,
    pub(crate) max_in_flight: usize,
    pub(crate) max_frame_len: usize,
    pub(crate) keepalive: Option<Duration>,
    pub(crate) event_capacity: usize,
    /// Sent in `AUTH` right after `HELLO` on every (re)connect.
    pub(crate) token: Option<AuthToken>,
    #[cfg(feature = "tls")]
    pub(crate) tls: Option<crate::tls::TlsConfig>,
}

impl ClientBuilder {
    /// Defaults: one connection, 5 s connect timeout, no request timeout,
    /// reconnect backoff 50 ms doubling to 2 s, 4096 requests in flight per
    /// connection, a keepalive `PING` after 10 s without traffic.
    pub fn new(addr: impl Into<ServerAddr>) -> ClientBuilder {
        ClientBuilder {
            addr: addr.into(),
            connections: 1,
            client_name: concat!("clastor-client/", env!("CARGO_PKG_VERSION")).to_owned(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: None,
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
            max_in_flight: 4096,
            max_frame_len: MAX_FRAME_LEN_CEILING,
            keepalive: Some(Duration::from_secs(10)),
            event_capacity: 1024,
            token: None,
            #[cfg(feature = "tls")]
            tls: None,
        }
    }

    /// How many connections the client spreads requests over (at least 1).
    ///
    /// Locks are owned by a connection, so each [`LockGuard`](crate::LockGuard)
    /// stays tied to the connection that acquired it; low-level calls are
    /// spread round-robin, and [`Client::request`](crate::Client::request) always uses the first
    /// connection.
    pub fn connections(mut self, n: usize) -> ClientBuilder {
        self.connections = n.max(1);
        self
    }

    /// The name sent in `HELLO`, shown in server logs.
    pub fn client_name(mut self, name: impl Into<String>) -> ClientBuilder {
        self.client_name = name.into();
        self
    }

    /// Bound on one connect attempt (TCP and handshake), and on how long a
    /// call waits for a connection to come back after a loss before failing
    /// with [`Error::Connect`](crate::Error::Connect).
    pub fn connect_timeout(mut self, timeout: Duration) -> ClientBuilder {
        self.connect_timeout = timeout;
        self
    }

    /// Fail calls with [`Error::RequestTimeout`](crate::Error::RequestTimeout) if no reply arrives within
    /// `timeout` (for acquires: the wait plus `timeout`). Off by default.
    pub fn request_timeout(mut self, timeout: Option<Duration>) -> ClientBuilder {
        self.request_timeout = timeout;
        self
    }

    /// Delay between reconnect attempts: `min` after the first failure,
    /// doubling up to `max`. The first attempt after a loss is immediate.
    pub fn reconnect_backoff(mut self, min: Duration, max: Duration) -> ClientBuilder {
        self.backoff_min = min;
        self.backoff_max = max.max(min);
        self
    }

    /// Requests that may await a reply on one connection at once; further
    /// calls wait for a slot. Bounds the client's memory (at least 1).
    pub fn max_in_flight(mut self, n: usize) -> ClientBuilder {
        self.max_in_flight = n.max(1);
        self
    }

    /// Largest frame accepted from the server (clamped to the protocol's
    /// ceiling). Large `HELD ALL` listings need room.
    pub fn max_frame_len(mut self, n: usize) -> ClientBuilder {
        self.max_frame_len = n.min(MAX_FRAME_LEN_CEILING);
        self
    }

    /// Send a `PING` after this long without hearing from the server, and
    /// declare the connection lost (and its locks with it) if the ping gets no
    /// reply within the same interval. `None` turns keepalive off.
    pub fn keepalive(mut self, interval: Option<Duration>) -> ClientBuilder {
        self.keepalive = interval.filter(|d| !d.is_zero());
        self
    }

    /// Authenticate every connection with this token (`AUTH`, sent right
    /// after `HELLO`, so a reconnect authenticates again). A server that
    /// refuses it fails the connect with [`Error::Unauthenticated`](crate::Error::Unauthenticated);
    /// one without authentication with [`Error::Unsupported`](crate::Error::Unsupported).
    /// The token never appears in `Debug` output or logs.
    pub fn token(mut self, token: impl Into<String>) -> ClientBuilder {
        self.token = Some(AuthToken::new(token));
        self
    }

    /// Speak TLS to the server (feature `tls`).
    #[cfg(feature = "tls")]
    pub fn tls(mut self, tls: crate::tls::TlsConfig) -> ClientBuilder {
        self.tls = Some(tls);
        self
    }

    /// Capacity of the event channel behind [`Client::events`](crate::Client::events); a subscriber
    /// that falls further behind sees [`ClientEvent::Lagged`](crate::ClientEvent::Lagged).
    pub fn event_capacity(mut self, n: usize) -> ClientBuilder {
        self.event_capacity = n.max(1);
        self
    }
}
