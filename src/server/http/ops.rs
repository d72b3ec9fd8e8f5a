//! What orchestrators and monitoring read: `/healthz` (the process answers),
//! `/readyz` (the backend can grant: 503 while, say, every ZooKeeper session
//! is untrusted), `/metrics` (Prometheus text format) and the OpenAPI
//! description of the REST API.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::HttpState;
use crate::backend::Backend;

/// The OpenAPI 3 description of `/api/v1`, served as is.
const OPENAPI: &str = include_str!("openapi.json");

#[derive(Serialize)]
struct Health<'a> {
    status: &'static str,
    backend: &'static str,
    detail: &'a str,
}

/// `GET /healthz`: 200 while the process serves HTTP at all.
pub(super) async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

/// `GET /readyz`: 200 when the backend can grant locks, 503 when it cannot
/// (or the server is shutting down).
pub(super) async fn readyz<B: Backend>(State(st): State<Arc<HttpState<B>>>) -> Response {
    let health = st.shared.engine.backend().health();
    let stopping = st.shutdown.is_cancelled();
    let ready = health.ready && !stopping;
    let detail = if stopping {
        "shutting down"
    } else {
        health.detail.as_str()
    };
    let body = Json(Health {
        status: if ready { "ready" } else { "unavailable" },
        backend: st.shared.engine.backend().name(),
        detail,
    });
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, body).into_response()
}

/// `GET /metrics`: Prometheus text exposition format 0.0.4.
pub(super) async fn metrics<B: Backend>(State(st): State<Arc<HttpState<B>>>) -> Response {
    let text = st.metrics.render(
        &st.shared,
        st.connections_open.load(Ordering::Relaxed),
        st.connections_refused.load(Ordering::Relaxed),
    );
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        text,
    )
        .into_response()
}

/// `GET /api/v1/openapi.json`
pub(super) async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}
