//! The live status page (`GET /`): plain HTML and a little JavaScript built
//! into the binary, polling `GET /api/v1/status` once a second. Shows held
//! locks (holder and its client's name, age, lease; never the token, which
//! over HTTP is the capability to release), waiters per key in queue order,
//! open connections and the backend's sessions with their health.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::HttpState;
use super::error::ApiError;
use super::rest::{HeldJson, NoParams, held_listing, query_only};
use crate::backend::Backend;

const PAGE: &str = include_str!("status.html");

/// `GET /`
pub(super) async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        PAGE,
    )
        .into_response()
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ConnectionJson {
    id: u64,
    label: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    client: Option<String>,
    held: usize,
    waiting: usize,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SessionJson {
    slot: usize,
    id: String,
    state: &'static str,
    trusted: bool,
    grants: usize,
    last_contact_ms: Option<u64>,
    probe_ms: Option<f64>,
    requests: u64,
    mean_latency_ms: Option<f64>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct BackendJson {
    name: &'static str,
    ready: bool,
    detail: String,
    sessions: Vec<SessionJson>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct StatusJson {
    server: String,
    listen: String,
    uptime_s: u64,
    backend: BackendJson,
    connections: Vec<ConnectionJson>,
    #[serde(flatten)]
    held: HeldJson,
}

/// `GET /api/v1/status`: everything the page shows.
pub(super) async fn status<B: Backend>(
    State(st): State<Arc<HttpState<B>>>,
    query: Result<Query<NoParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    query_only(query)?;
    let shared = &st.shared;
    let health = shared.engine.backend().health();
    let sessions = health
        .sessions
        .into_iter()
        .map(|s| SessionJson {
            slot: s.slot,
            id: s.id,
            state: s.state,
            trusted: s.trusted,
            grants: s.grants,
            last_contact_ms: s.last_contact.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            probe_ms: s.last_probe.map(|d| d.as_secs_f64() * 1000.0),
            requests: s.requests,
            mean_latency_ms: (s.requests > 0).then(|| s.request_time.as_secs_f64() * 1000.0 / s.requests as f64),
        })
        .collect();
    let body = StatusJson {
        server: shared.server_name(),
        listen: shared.local_addr.to_string(),
        uptime_s: shared.started.elapsed().as_secs(),
        backend: BackendJson {
            name: shared.engine.backend().name(),
            ready: health.ready,
            detail: health.detail,
            sessions,
        },
        connections: shared
            .engine
            .sessions()
            .into_iter()
            .map(|s| ConnectionJson {
                id: s.id,
                label: s.label.to_string(),
                client: s.client.map(|c| c.to_string()),
                held: s.held,
                waiting: s.waiting,
            })
            .collect(),
        held: held_listing(&shared.engine),
    };
    Ok(([(header::CACHE_CONTROL, "no-store")], Json(body)).into_response())
}
