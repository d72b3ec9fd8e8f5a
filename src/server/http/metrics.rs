//! Prometheus metrics: a `metrics-exporter-prometheus` recorder owned by
//! this server (not the process-wide one, so two servers in one process —
//! tests, embedders — keep their numbers apart).
//!
//! Two sources: events the engine reports as they happen ([`EngineObserver`]:
//! grants, refusals, ends of holds with their wait and hold times, into
//! counters and histograms labelled by kind), and state read at scrape time
//! (connections, requests by opcode, backend sessions), written into gauges
//! and absolute counters just before rendering. Kinds are user input, so
//! their label is capped: the first `max_metric_kinds` kinds get their own,
//! the rest share `other`.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{PoisonError, RwLock};
use std::time::Duration;

use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use crate::backend::Backend;
use crate::engine::{EngineObserver, HoldEnd};
use crate::key::LockKey;
use crate::server::state::ServerState;

/// Histogram buckets, in seconds: sub-millisecond grants up to hour-long holds.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
    3600.0,
];

/// The label every kind past the cap is counted under.
pub(super) const OTHER_KIND: &str = "other";

/// This server's metrics.
pub(super) struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    kinds: RwLock<HashSet<String>>,
    max_kinds: usize,
    sessions: SessionNames,
}

/// The names of the backend sessions' metrics: `clastor_zk_session_*` for
/// ZooKeeper's pooled sessions (the names dashboards know), and
/// `clastor_{backend}_session_*` for any other backend's (etcd: its leases;
/// PostgreSQL and Redis: the server's own session).
struct SessionNames {
    /// What one session is, for the descriptions ("ZooKeeper session").
    noun: &'static str,
    state: String,
    trusted: String,
    last_contact: String,
    grants: String,
    probe: String,
    requests: String,
    request_time: String,
}

impl SessionNames {
    fn for_backend(backend: &str) -> SessionNames {
        let (prefix, noun) = match backend {
            "zookeeper" => ("clastor_zk".to_owned(), "ZooKeeper session"),
            "etcd" => ("clastor_etcd".to_owned(), "etcd lease"),
            other => (format!("clastor_{other}"), "backend session"),
        };
        SessionNames {
            noun,
            state: format!("{prefix}_session_state"),
            trusted: format!("{prefix}_session_trusted"),
            last_contact: format!("{prefix}_session_last_contact_seconds"),
            grants: format!("{prefix}_session_grants"),
            probe: format!("{prefix}_session_probe_seconds"),
            requests: format!("{prefix}_requests_total"),
            request_time: format!("{prefix}_request_microseconds_total"),
        }
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("max_kinds", &self.max_kinds)
            .finish_non_exhaustive()
    }
}

impl Metrics {
    /// Metrics of a server whose backend is called `backend`
    /// ([`Backend::name`]).
    pub(super) fn new(max_kinds: usize, backend: &str) -> Metrics {
        // Buckets are constant and non-empty, so this cannot fail; fall back
        // to summaries rather than panic if a future version disagrees.
        let builder = PrometheusBuilder::new();
        let builder = match builder.set_buckets(BUCKETS) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "histogram buckets refused; using summaries");
                PrometheusBuilder::new()
            }
        };
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        let m = Metrics {
            recorder,
            handle,
            kinds: RwLock::new(HashSet::new()),
            max_kinds,
            sessions: SessionNames::for_backend(backend),
        };
        m.describe();
        m
    }

    fn describe(&self) {
        metrics::with_local_recorder(&self.recorder, || {
            describe_counter!("clastor_acquires_granted_total", "Acquires granted, by kind");
            describe_counter!(
                "clastor_acquires_not_granted_total",
                "Acquires not granted within their wait, by kind"
            );
            describe_counter!(
                "clastor_releases_total",
                "Holds ended by a release (how=release) or by their owner's session closing (how=close), by kind"
            );
            describe_counter!("clastor_locks_lost_total", "Locks lost, by reason");
            describe_counter!("clastor_leases_expired_total", "Locks lost because their lease ran out");
            describe_histogram!(
                "clastor_acquire_wait_seconds",
                Unit::Seconds,
                "Time granted acquires waited, by kind"
            );
            describe_histogram!(
                "clastor_hold_seconds",
                Unit::Seconds,
                "Time locks were held, by kind, however the hold ended"
            );
            describe_gauge!("clastor_locks_held", "Locks held through this server now");
            describe_gauge!("clastor_acquires_waiting", "Acquires waiting through this server now");
            describe_gauge!("clastor_connections_open", "Lock-protocol connections open");
            describe_counter!(
                "clastor_connections_accepted_total",
                "Lock-protocol connections accepted"
            );
            describe_counter!(
                "clastor_connections_refused_total",
                "Lock-protocol connections refused (over --max-connections)"
            );
            describe_counter!("clastor_requests_total", "Lock-protocol requests, by opcode");
            describe_counter!(
                "clastor_bad_requests_total",
                "Lock-protocol requests refused as malformed"
            );
            describe_counter!(
                "clastor_protocol_errors_total",
                "Lock-protocol connections closed for a protocol error"
            );
            describe_counter!(
                "clastor_auth_failures_total",
                "Refused credentials: failed or malformed AUTHs (port tcp), bad bearer tokens (ports http and grpc)"
            );
            describe_counter!(
                "clastor_tls_handshake_failures_total",
                "TLS handshakes that failed on any port (plain clients, bad or missing client certificates)"
            );
            describe_gauge!("clastor_http_connections_open", "HTTP connections open");
            describe_counter!(
                "clastor_http_connections_refused_total",
                "HTTP connections refused (over the HTTP connection limit)"
            );
            describe_counter!(
                "clastor_http_requests_total",
                "HTTP requests answered, by route template (unmatched: no route) and status"
            );
            describe_gauge!(
                "clastor_rotation_draining",
                "1 while a rotation driven through this server drains the kind"
            );
            describe_counter!(
                "clastor_rotations_total",
                "Rotations driven through this server, by kind and outcome (completed, refused, aborted, failed)"
            );
            describe_gauge!(
                "clastor_backend_ready",
                "1 while the backend can grant locks (what /readyz says)"
            );
            let n = &self.sessions;
            let noun = n.noun;
            describe_gauge!(
                n.state.clone(),
                format!("{noun} state per pool slot: 0 connected, 1 disconnected, 2 lost, 3 reconnecting")
            );
            describe_gauge!(
                n.trusted.clone(),
                format!("1 while the {noun} is in proven contact: new grants may go through it")
            );
            describe_gauge!(
                n.last_contact.clone(),
                Unit::Seconds,
                format!("Time since the send of the {noun}'s last answered request (a keepalive for etcd)")
            );
            describe_gauge!(n.grants.clone(), format!("Locks held through the {noun}"));
            describe_gauge!(
                n.probe.clone(),
                Unit::Seconds,
                format!("Round trip of the {noun}'s last answered liveness probe (ZooKeeper: sync; etcd: keepalive)")
            );
            describe_counter!(
                n.requests.clone(),
                format!("Requests answered through the {noun}, per pool slot (etcd: keepalives)")
            );
            describe_counter!(
                n.request_time.clone(),
                Unit::Microseconds,
                format!(
                    "Total time of the answered requests of the {noun} (first send to answer), per pool slot; with the requests total it gives the mean latency"
                )
            );
        });
    }

    /// The label for `kind`: itself while under the cap, else `other`.
    fn kind_label(&self, kind: &str) -> String {
        // Every grant passes here: the common case (a kind already seen) only reads.
        if self.kinds.read().unwrap_or_else(PoisonError::into_inner).contains(kind) {
            return kind.to_owned();
        }
        let mut kinds = self.kinds.write().unwrap_or_else(PoisonError::into_inner);
        if kinds.contains(kind) {
            return kind.to_owned();
        }
        if kinds.len() < self.max_kinds && kind != OTHER_KIND {
            kinds.insert(kind.to_owned());
            return kind.to_owned();
        }
        OTHER_KIND.to_owned()
    }

    /// Counts one HTTP answer. `route` is a route template, so the label
    /// values stay few.
    pub(super) fn http_request(&self, route: &str, status: axum::http::StatusCode) {
        let (route, status) = (route.to_owned(), status.as_u16().to_string());
        metrics::with_local_recorder(&self.recorder, || {
            counter!("clastor_http_requests_total", "route" => route, "status" => status).increment(1);
        });
    }

    /// Renders every metric, after reading the state that is not counted
    /// as it happens.
    pub(super) fn render<B: Backend>(&self, shared: &ServerState<B>, http_open: u64, http_refused: u64) -> String {
        let s = &shared.stats;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let health = shared.engine.backend().health();
        let sessions = shared.engine.sessions();
        let held: usize = sessions.iter().map(|s| s.held).sum();
        let waiting: usize = sessions.iter().map(|s| s.waiting).sum();
        metrics::with_local_recorder(&self.recorder, || {
            gauge!("clastor_locks_held").set(count(held));
            gauge!("clastor_acquires_waiting").set(count(waiting));
            gauge!("clastor_connections_open").set(load(&s.connections_open) as f64);
            counter!("clastor_connections_accepted_total").absolute(load(&s.connections_accepted));
            counter!("clastor_connections_refused_total").absolute(load(&s.connections_refused));
            counter!("clastor_bad_requests_total").absolute(load(&s.bad_requests));
            counter!("clastor_protocol_errors_total").absolute(load(&s.protocol_errors));
            counter!("clastor_auth_failures_total", "port" => "tcp").absolute(load(&s.auth_failures));
            counter!("clastor_auth_failures_total", "port" => "http").absolute(load(&s.http_auth_failures));
            #[cfg(all(feature = "grpc", feature = "tls"))]
            counter!("clastor_auth_failures_total", "port" => "grpc").absolute(load(&s.grpc_auth_failures));
            counter!("clastor_tls_handshake_failures_total").absolute(load(&s.tls_failures));
            for (op, n) in s.requests_by_opcode() {
                counter!("clastor_requests_total", "opcode" => op.name()).absolute(n);
            }
            gauge!("clastor_http_connections_open").set(http_open as f64);
            counter!("clastor_http_connections_refused_total").absolute(http_refused);
            gauge!("clastor_backend_ready").set(if health.ready { 1.0 } else { 0.0 });
            for z in &health.sessions {
                let slot = z.slot.to_string();
                let state = match z.state {
                    "connected" => 0.0,
                    "disconnected" => 1.0,
                    "lost" => 2.0,
                    _ => 3.0,
                };
                let n = &self.sessions;
                gauge!(n.state.clone(), "session" => slot.clone()).set(state);
                gauge!(n.trusted.clone(), "session" => slot.clone()).set(if z.trusted { 1.0 } else { 0.0 });
                if let Some(age) = z.last_contact {
                    gauge!(n.last_contact.clone(), "session" => slot.clone()).set(age.as_secs_f64());
                }
                gauge!(n.grants.clone(), "session" => slot.clone()).set(count(z.grants));
                if let Some(rtt) = z.last_probe {
                    gauge!(n.probe.clone(), "session" => slot.clone()).set(rtt.as_secs_f64());
                }
                counter!(n.requests.clone(), "session" => slot.clone()).absolute(z.requests);
                let us = u64::try_from(z.request_time.as_micros()).unwrap_or(u64::MAX);
                counter!(n.request_time.clone(), "session" => slot).absolute(us);
            }
        });
        self.handle.render()
    }
}

fn count(n: usize) -> f64 {
    n as f64
}

impl EngineObserver for Metrics {
    fn granted(&self, key: &LockKey, waited: Duration) {
        let kind = self.kind_label(key.kind());
        metrics::with_local_recorder(&self.recorder, || {
            counter!("clastor_acquires_granted_total", "kind" => kind.clone()).increment(1);
            histogram!("clastor_acquire_wait_seconds", "kind" => kind).record(waited.as_secs_f64());
        });
    }

    fn not_granted(&self, key: &LockKey, _waited: Duration) {
        let kind = self.kind_label(key.kind());
        metrics::with_local_recorder(&self.recorder, || {
            counter!("clastor_acquires_not_granted_total", "kind" => kind).increment(1);
        });
    }

    fn rotation_started(&self, kind: &str) {
        let kind = self.kind_label(kind);
        metrics::with_local_recorder(&self.recorder, || {
            gauge!("clastor_rotation_draining", "kind" => kind).set(1.0);
        });
    }

    fn rotation_ended(&self, kind: &str, outcome: &'static str, drained: bool) {
        let kind = self.kind_label(kind);
        metrics::with_local_recorder(&self.recorder, || {
            if drained {
                gauge!("clastor_rotation_draining", "kind" => kind.clone()).set(0.0);
            }
            counter!("clastor_rotations_total", "kind" => kind, "outcome" => outcome).increment(1);
        });
    }

    fn ended(&self, key: &LockKey, held: Duration, how: HoldEnd) {
        let kind = self.kind_label(key.kind());
        metrics::with_local_recorder(&self.recorder, || {
            histogram!("clastor_hold_seconds", "kind" => kind.clone()).record(held.as_secs_f64());
            match how {
                HoldEnd::Released => {
                    counter!("clastor_releases_total", "kind" => kind, "how" => "release").increment(1)
                }
                HoldEnd::Closed => counter!("clastor_releases_total", "kind" => kind, "how" => "close").increment(1),
                HoldEnd::Lost(reason) => {
                    counter!("clastor_locks_lost_total", "reason" => reason.name()).increment(1);
                    if reason == clastor_protocol::LostReason::LeaseExpired {
                        counter!("clastor_leases_expired_total").increment(1);
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_past_the_cap_share_one_label() {
        let m = Metrics::new(2, "memory");
        assert_eq!(m.kind_label("a"), "a");
        assert_eq!(m.kind_label("b"), "b");
        assert_eq!(m.kind_label("c"), OTHER_KIND);
        assert_eq!(m.kind_label("a"), "a");
        // A kind named like the overflow label never takes a slot of its own.
        let m = Metrics::new(2, "memory");
        assert_eq!(m.kind_label(OTHER_KIND), OTHER_KIND);
        assert_eq!(m.kind_label("x"), "x");
    }
}
