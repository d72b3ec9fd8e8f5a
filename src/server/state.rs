//! What every connection task of one server shares: the engine, the
//! settings, the counters, and the hard-stop signal.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use clastor_protocol::Opcode;
use tokio_util::sync::CancellationToken;

use super::config::ServerConfig;
use crate::backend::Backend;
use crate::engine::Engine;

/// Counters shared by all connections.
#[derive(Debug, Default)]
pub(crate) struct ServerStats {
    pub(crate) connections_open: AtomicU64,
    pub(crate) connections_accepted: AtomicU64,
    pub(crate) connections_refused: AtomicU64,
    pub(crate) requests: AtomicU64,
    pub(crate) bad_requests: AtomicU64,
    pub(crate) protocol_errors: AtomicU64,
    /// Refused `AUTH`s (binary and text), malformed ones included.
    pub(crate) auth_failures: AtomicU64,
    /// HTTP requests refused for a missing or unknown bearer token.
    #[cfg(feature = "http")]
    pub(crate) http_auth_failures: AtomicU64,
    /// gRPC calls refused for a missing or unknown bearer token.
    #[cfg(all(feature = "grpc", feature = "tls"))]
    pub(crate) grpc_auth_failures: AtomicU64,
    /// TLS handshakes that failed (any port): a plain client, a bad or
    /// missing client certificate, a timeout.
    pub(crate) tls_failures: AtomicU64,
    /// Requests that reached dispatch, by opcode (index: `Opcode as u8 & 0x1f`;
    /// request opcodes are 0x01..=0x1f).
    pub(crate) by_opcode: [AtomicU64; 32],
}

impl ServerStats {
    pub(crate) fn count_request(&self, opcode: Opcode) {
        if let Some(n) = self.by_opcode.get(usize::from(opcode as u8)) {
            n.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Requests by opcode, for the metrics.
    #[cfg(feature = "http")]
    pub(crate) fn requests_by_opcode(&self) -> impl Iterator<Item = (Opcode, u64)> + '_ {
        (0u8..32).filter_map(|i| {
            let op = Opcode::try_from(i).ok()?;
            Some((op, self.by_opcode[usize::from(i)].load(Ordering::Relaxed)))
        })
    }
}

/// What every connection task shares.
#[derive(Debug)]
pub(crate) struct ServerState<B: Backend> {
    pub(crate) engine: Engine<B>,
    pub(crate) config: ServerConfig,
    pub(crate) stats: ServerStats,
    pub(crate) local_addr: SocketAddr,
    pub(crate) started: Instant,
    /// Cancelled when the shutdown grace runs out: connections still
    /// writing to a client that does not read give up at once.
    pub(crate) hard_stop: CancellationToken,
    /// The auth file, when authentication is on.
    #[cfg(feature = "tls")]
    pub(crate) auth: Option<std::sync::Arc<super::auth::Authenticator>>,
    /// The acceptor of the TCP and HTTP ports, when TLS is on (the gRPC port builds its own, with ALPN `h2`).
    #[cfg(feature = "tls")]
    pub(crate) tls: Option<super::tls::Acceptor>,
}

fn on_off(on: bool) -> &'static str {
    if on { "on" } else { "off" }
}

impl<B: Backend> ServerState<B> {
    /// Whether requests need a principal.
    pub(crate) fn auth_on(&self) -> bool {
        #[cfg(feature = "tls")]
        return self.auth.is_some();
        #[cfg(not(feature = "tls"))]
        false
    }

    /// Whether the ports speak TLS.
    pub(crate) fn tls_on(&self) -> bool {
        #[cfg(feature = "tls")]
        return self.tls.is_some();
        #[cfg(not(feature = "tls"))]
        false
    }

    /// A new connection's access: no principal yet, unless its verified
    /// client certificate named one.
    pub(crate) fn access(&self, cert_name: Option<&str>) -> super::auth::Access {
        #[cfg(feature = "tls")]
        {
            let principal = match (&self.auth, cert_name) {
                (Some(auth), Some(name)) => {
                    let p = auth.principal_for_cert(name);
                    if p.is_none() {
                        tracing::info!(cert = name, "client certificate names no principal of the auth file");
                    }
                    p
                }
                _ => None,
            };
            super::auth::Access::new(self.auth.clone(), principal)
        }
        #[cfg(not(feature = "tls"))]
        {
            let _ = cert_name;
            super::auth::Access::default()
        }
    }

    pub(crate) fn server_name(&self) -> String {
        format!(
            "clastor {} ({})",
            env!("CARGO_PKG_VERSION"),
            self.engine.backend().name()
        )
    }

    pub(crate) fn info(&self) -> Vec<(String, String)> {
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed).to_string();
        let s = &self.stats;
        let mut out = vec![
            ("server".to_owned(), self.server_name()),
            ("listen".to_owned(), self.local_addr.to_string()),
            ("uptime_s".to_owned(), self.started.elapsed().as_secs().to_string()),
            ("connections_open".to_owned(), n(&s.connections_open)),
            ("connections_accepted".to_owned(), n(&s.connections_accepted)),
            ("connections_refused".to_owned(), n(&s.connections_refused)),
            ("max_connections".to_owned(), self.config.max_connections.to_string()),
            ("requests".to_owned(), n(&s.requests)),
            ("bad_requests".to_owned(), n(&s.bad_requests)),
            ("protocol_errors".to_owned(), n(&s.protocol_errors)),
            ("auth".to_owned(), on_off(self.auth_on()).to_owned()),
            ("auth_failures".to_owned(), n(&s.auth_failures)),
            ("tls".to_owned(), on_off(self.tls_on()).to_owned()),
            ("tls_failures".to_owned(), n(&s.tls_failures)),
        ];
        out.extend(self.engine.info());
        out
    }
}
