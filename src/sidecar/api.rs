//! The sidecar's HTTP API (axum).
//!
//! `/healthz`, `/readyz`, `/metrics` and `GET /v1/queues` are open. Calls that
//! change a queue or read message bodies need `Authorization: Bearer <token>`
//! when a token is configured; it is compared in constant time. Errors are
//! JSON: `{"error": "..."}`.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::Utc;
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::engine::redrive::Trigger;
use crate::engine::registry::{RedriveRequest, RegistryError};
use crate::filter::Filter;
use crate::output::MessageView;
use crate::sidecar::app::App;

const MAX_LIMIT: usize = 1000;

/// The `/v1` API, the probes and `/metrics`.
pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/queues", get(queues))
        .route("/v1/queues/{queue}/messages", get(messages))
        .route("/v1/queues/{queue}/report", get(report))
        .route("/v1/queues/{queue}/redrive", post(redrive))
        .route("/v1/runs/{id}", get(run))
}

pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        let status = match &e {
            RegistryError::UnknownQueue { .. } => StatusCode::NOT_FOUND,
            e if e.is_usage() => StatusCode::BAD_REQUEST,
            _ => StatusCode::BAD_GATEWAY,
        };
        ApiError(status, e.to_string())
    }
}

pub(crate) fn authorize(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(token) = &app.token else { return Ok(()) };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if bool::from(given.as_bytes().ct_eq(token.as_bytes())) {
        Ok(())
    } else {
        Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token".into(),
        ))
    }
}

async fn readyz(State(app): State<Arc<App>>) -> Response {
    if app.ready().await {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "not every queue has been polled yet".into(),
        )
        .into_response()
    }
}

/// OpenMetrics for Prometheus, which asks for it; the classic text format for
/// every other scraper (DESIGN §5).
async fn metrics(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let (content_type, body) = app.metrics.render_for(accept);
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

async fn queues(State(app): State<Arc<App>>) -> Response {
    let polled = app.cache.all().await;
    let mut out = Vec::new();
    for q in &app.registry.config().queues {
        match polled.iter().find(|s| s.queue == q.name) {
            Some(s) => out.push(serde_json::to_value(s).expect("status serializes")),
            None => out.push(json!({ "queue": q.name, "backend": q.kind.backend_name(), "polled_at": null })),
        }
    }
    Json(out).into_response()
}

#[derive(Deserialize)]
struct MessagesQuery {
    filter: Option<String>,
    limit: Option<usize>,
}

async fn messages(
    State(app): State<Arc<App>>,
    Path(queue): Path<String>,
    Query(q): Query<MessagesQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&app, &headers)?;
    let filter = match q.filter.as_deref().filter(|f| !f.trim().is_empty()) {
        Some(f) => Filter::compile(f).map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?,
        None => Filter::match_all(),
    };
    let limit = q.limit.unwrap_or(20).clamp(1, MAX_LIMIT);
    let backend = app.registry.backend(&queue).await?;
    let msgs = backend
        .peek(MAX_LIMIT)
        .await
        .map_err(|e| ApiError(StatusCode::BAD_GATEWAY, e.to_string()))?;
    let now = Utc::now();
    let views: Vec<MessageView> = msgs
        .iter()
        .filter(|m| filter.matches(m, now).unwrap_or(false))
        .take(limit)
        .map(|m| MessageView::new(m, now))
        .collect();
    Ok(Json(json!({
        "queue": queue,
        "true_peek": backend.capabilities().true_peek,
        "messages": views,
    }))
    .into_response())
}

#[derive(Deserialize)]
struct ReportQuery {
    by: Option<String>,
    filter: Option<String>,
    top: Option<usize>,
    scan: Option<usize>,
}

/// `report` over HTTP (see `dlq-bridge report`): groups with counts, shares,
/// enqueue times, delivery-count ranges and sample IDs. Reads like
/// `/messages` (and needs the token, when one is set, for the same reason:
/// reasons and descriptions are message content).
async fn report(
    State(app): State<Arc<App>>,
    Path(queue): Path<String>,
    Query(q): Query<ReportQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    use crate::engine::triage::{self, GroupBy, ReportRequest, TriageError};
    authorize(&app, &headers)?;
    let by: GroupBy =
        q.by.as_deref()
            .unwrap_or("pattern")
            .parse()
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e))?;
    let req = ReportRequest {
        by,
        filter: q.filter.as_deref(),
        top: q.top.unwrap_or(triage::DEFAULT_TOP).clamp(1, 100),
        scan: q.scan.unwrap_or(MAX_LIMIT).clamp(1, 10 * MAX_LIMIT),
    };
    match triage::report(&app.registry, &queue, &req).await {
        Ok(r) => Ok(Json(r).into_response()),
        Err(TriageError::Registry(e)) => Err(e.into()),
        Err(e) if e.is_usage() => Err(ApiError(StatusCode::BAD_REQUEST, e.to_string())),
        Err(e) => Err(ApiError(StatusCode::BAD_GATEWAY, e.to_string())),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RedriveBody {
    filter: Option<String>,
    #[serde(default)]
    dry_run: bool,
    rate: Option<u32>,
    max: Option<u64>,
    to: Option<String>,
    concurrency: Option<usize>,
}

async fn redrive(
    State(app): State<Arc<App>>,
    Path(queue): Path<String>,
    headers: HeaderMap,
    body: Option<Json<RedriveBody>>,
) -> Result<Response, ApiError> {
    authorize(&app, &headers)?;
    let Json(b) = body.unwrap_or_default();
    let req = RedriveRequest {
        filter: b.filter,
        to: b.to,
        dry_run: b.dry_run,
        rate: b.rate,
        max: b.max,
        concurrency: b.concurrency,
    };
    let run_id = app.start_run(&queue, req, Trigger::Api).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "run_id": run_id, "status_url": format!("/v1/runs/{run_id}") })),
    )
        .into_response())
}

async fn run(State(app): State<Arc<App>>, Path(id): Path<String>) -> Result<Response, ApiError> {
    match app.run_view(&id).await {
        Some(v) => Ok(Json(v).into_response()),
        None => Err(ApiError(StatusCode::NOT_FOUND, format!("no run `{id}`"))),
    }
}
