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
}

impl<B: Backend> ServerState<B> {
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
        ];
        out.extend(self.engine.info());
        out
    }
}
