//! The API endpoints the dashboard needs beyond the original ones, in the same
//! style and under the same rules: reads of message content and every
//! mutating call need the bearer token when one is configured; errors are
//! `{"error": "..."}`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::engine::redrive::{Action, Backup, Trigger};
use crate::engine::registry::RedriveRequest;
use crate::engine::triage::{self, GroupBy, TriageError};
use crate::filter::{Filter, FilterError};
use crate::output::MessageView;
use crate::sidecar::api::{
    ApiError, ApiQuery, Narrow, authorize, authorized_json, browse_matches, given_filter, leasing_read, read_guard,
};
use crate::sidecar::app::App;
use crate::sidecar::history;

/// Messages one browse shows at most.
const MAX_LIMIT: usize = 1000;
/// Runs `/v1/runs` returns by default, newest first.
const DEFAULT_RUNS: usize = 100;

pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/v1/info", get(info))
        .route("/v1/filter/check", get(check_filter))
        .route("/v1/history", get(history))
        .route("/v1/alerts", get(alerts))
        .route("/v1/runs", get(runs))
        .route("/v1/queues/{queue}/browse", get(browse))
        .route("/v1/queues/{queue}/purge", post(purge))
        .route("/v1/queues/{queue}/export", post(export))
}

fn bad_request(e: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, e.to_string())
}

fn triage_error(e: TriageError) -> ApiError {
    match e {
        TriageError::Registry(e) => e.into(),
        e if e.is_usage() => bad_request(e),
        e => ApiError(StatusCode::BAD_GATEWAY, e.to_string()),
    }
}

/// What the page needs to know before it asks anything else.
async fn info(State(app): State<Arc<App>>) -> Response {
    let cfg = app.registry.config();
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "token_required": app.token.is_some(),
        "show_bodies": cfg.serve.dashboard.show_bodies,
        "queues": cfg.queues.iter().map(|q| json!({"queue": q.name, "backend": q.kind.backend_name()})).collect::<Vec<_>>(),
    }))
    .into_response()
}

#[derive(Deserialize)]
struct CheckQuery {
    filter: Option<String>,
}

/// Compile a filter and say where it is wrong, reading nothing. Always 200:
/// the answer is the verdict (`valid`), with the 1-based `line` and `column`
/// of the error when it has a position.
async fn check_filter(ApiQuery(q): ApiQuery<CheckQuery>) -> Response {
    let source = q.filter.unwrap_or_default();
    if source.trim().is_empty() {
        // The page's empty box, which reads every message: the page then
        // sends no filter at all (a blank `filter=` given to a read is refused).
        return Json(json!({ "valid": true, "empty": true })).into_response();
    }
    match Filter::compile(&source) {
        Ok(_) => Json(json!({ "valid": true })).into_response(),
        Err(e) => {
            let (line, column, message) = match &e {
                FilterError::Syntax {
                    line, column, message, ..
                } => (Some(*line), Some(*column), message.clone()),
                FilterError::UnknownVariable { name, line, column, .. } => {
                    (Some(*line), Some(*column), format!("unknown variable `{name}`"))
                }
                FilterError::UnknownFunction { name, line, column, .. } => {
                    (Some(*line), Some(*column), format!("unknown function `{name}`"))
                }
                FilterError::BadArgument {
                    function,
                    message,
                    line,
                    column,
                    ..
                } => (Some(*line), Some(*column), format!("{function}(): {message}")),
                FilterError::TypeMismatch {
                    message, line, column, ..
                } => (Some(*line), Some(*column), message.clone()),
                FilterError::TooComplex(m) => (None, None, m.clone()),
            };
            Json(json!({
                "valid": false,
                "error": e.to_string(),
                "message": message,
                "line": line,
                "column": column,
            }))
            .into_response()
        }
    }
}

/// Depth over the last hours, per queue: `{"queue": [[unix_seconds, depth], ...]}`.
async fn history(State(app): State<Arc<App>>) -> Response {
    Json(app.cache.history()).into_response()
}

/// Alert rules firing now: `[{"queue", "rule"}]`. Every replica evaluates the
/// rules (only the leader notifies), so any replica can answer.
async fn alerts(State(app): State<Arc<App>>) -> Response {
    let firing: Vec<Value> = app
        .metrics
        .firing()
        .into_iter()
        .map(|(queue, rule)| json!({ "queue": queue, "rule": rule }))
        .collect();
    Json(firing).into_response()
}

#[derive(Deserialize)]
struct RunsQuery {
    limit: Option<usize>,
}

/// The audit trail: runs this process knows (running ones with live
/// progress) and every finished run in the journal, newest first, in the
/// shape of `/v1/runs/{id}`.
async fn runs(
    State(app): State<Arc<App>>,
    ApiQuery(q): ApiQuery<RunsQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    // Runs show their filters, sample IDs, reasons and destinations.
    authorize(&app, &headers)?;
    let limit = q.limit.unwrap_or(DEFAULT_RUNS).clamp(1, 10_000);
    let mut out: Vec<Value> = Vec::new();
    let mut seen = HashSet::new();
    for v in app.run_views().await {
        seen.insert(v.run_id.clone());
        out.push(serde_json::to_value(&v).expect("run view serializes"));
    }
    let finished = app
        .journaled_runs()
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("reading the journal: {e}")))?;
    for (run, summary) in finished.iter().flat_map(|r| r.iter().rev()) {
        if seen.insert(run.clone()) {
            out.push(history::from_summary(run, summary.clone()));
        }
    }
    out.sort_by(|a, b| b["started_at"].as_str().cmp(&a["started_at"].as_str()));
    out.truncate(limit);
    Ok(Json(out).into_response())
}

#[derive(Deserialize)]
struct BrowseQuery {
    filter: Option<String>,
    limit: Option<usize>,
    /// With `key`: only messages whose report group under `by` is `key`
    /// (how the page goes from a report row to its messages).
    by: Option<String>,
    key: Option<String>,
    /// With a filter or a group: messages read at most while looking for
    /// matches (default 1000, at most 10,000). Without either, `limit`.
    scan: Option<usize>,
}

/// `/messages` for the page: the same read, with bodies left out unless
/// `serve.dashboard.show_bodies` is on (`body_redacted: true`), and each
/// message's pattern, so the page can link it to its report group.
async fn browse(
    State(app): State<Arc<App>>,
    Path(queue): Path<String>,
    ApiQuery(q): ApiQuery<BrowseQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&app, &headers)?;
    let narrow: Option<Narrow> = match (q.by, q.key) {
        (Some(by), Some(key)) => {
            let by: GroupBy = by.parse().map_err(bad_request)?;
            Some(Box::new(move |m| by.key(m) == key))
        }
        _ => None,
    };
    let limit = q.limit.unwrap_or(50).clamp(1, MAX_LIMIT);
    let show_bodies = app.registry.config().serve.dashboard.show_bodies;
    let read = browse_matches(&app, &queue, q.filter.as_deref(), narrow, limit, q.scan).await?;
    let views: Vec<Value> = read
        .shown
        .messages
        .iter()
        .map(|m| {
            let mut v = serde_json::to_value(MessageView::new(m, read.now)).expect("message view serializes");
            if let Some(o) = v.as_object_mut() {
                if !show_bodies {
                    o.remove("body_base64");
                    o.remove("body_text");
                }
                o.insert("body_redacted".into(), json!(!show_bodies));
                o.insert("pattern".into(), json!(triage::pattern_of(m)));
            }
            v
        })
        .collect();
    let mut out = read.into_json(queue, views);
    out.insert("body_redacted".into(), json!(!show_bodies));
    Ok(Json(out).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PurgeBody {
    /// Required, as on the CLI: `true` purges everything.
    filter: String,
    /// e.g. `7d`: only messages older than this.
    older_than: Option<String>,
    #[serde(default)]
    dry_run: bool,
    max: Option<u64>,
    rate: Option<u32>,
    /// Write each message to a backup file under `serve.data_dir/backups`
    /// before deleting it (default true).
    backup: Option<bool>,
}

/// `purge` as a background run (see `/redrive`): 202 with the run ID, then
/// `/v1/runs/{id}` for progress and the summary.
async fn purge(
    State(app): State<Arc<App>>,
    Path(queue): Path<String>,
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    let b: PurgeBody = authorized_json(&app, request).await?;
    if b.filter.trim().is_empty() {
        return Err(bad_request("purge needs a filter (`true` purges everything)"));
    }
    let older_than: Option<Duration> = match b.older_than.as_deref().filter(|s| !s.trim().is_empty()) {
        Some(s) => Some(humantime::parse_duration(s.trim()).map_err(|e| bad_request(format!("older_than: {e}")))?),
        None => None,
    };
    // The user's own filter is checked first: wrapped, one that is never
    // true or false would pass (the `&&` is a bool).
    Filter::compile(&b.filter).map_err(|e| bad_request(e.to_string()))?;
    let req = RedriveRequest {
        filter: Some(triage::purge_filter(&b.filter, older_than)),
        dry_run: b.dry_run,
        rate: b.rate,
        max: b.max,
        ..Default::default()
    };
    let mut plan = app.registry.plan(&queue, &req, Trigger::Api).await?;
    let mut backup_path = None;
    let backup: Option<Arc<dyn Backup>> = if b.dry_run || b.backup == Some(false) {
        None
    } else {
        let Some(dir) = &app.data_dir else {
            return Err(bad_request(
                "no data directory for the backup: set serve.data_dir, or purge with \"backup\": false",
            ));
        };
        let path = triage::dated_path(&dir.join("backups"), &queue);
        let backend = app.registry.backend(&queue).await?;
        let fb = triage::FileBackup::create(&path, &queue, backend).map_err(triage_error)?;
        backup_path = Some(path);
        Some(Arc::new(fb))
    };
    plan.action = Action::Discard { backup };
    let run_id = app.start_planned(plan).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "run_id": run_id,
            "status_url": format!("/v1/runs/{run_id}"),
            "backup": backup_path,
        })),
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportBody {
    filter: Option<String>,
    /// Lines written at most.
    max: Option<u64>,
    /// Messages read at most (as `export --scan`); a dry run reads at most
    /// [`triage::DEFAULT_PEEK_CAP`].
    scan: Option<usize>,
    /// Count what would be exported (and name a few), write nothing.
    #[serde(default)]
    dry_run: bool,
}

/// `export` to a file under `serve.data_dir/exports` (bodies stay on the
/// server: the page shows the summary and the file's path). A dry run reads
/// the same messages and answers the match count and a sample of IDs.
async fn export(
    State(app): State<Arc<App>>,
    Path(queue): Path<String>,
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    let b: ExportBody = authorized_json(&app, request).await?;
    let filter = given_filter("filter", b.filter.as_deref())?;
    // Both reads lease on SQS and Pub/Sub, like a browse.
    let filter = filter.map(str::to_string);
    let backend = app.registry.backend(&queue).await?;
    let guard = read_guard(&app, &queue, &*backend).await?;
    let reading = app.clone();
    let read_queue = queue.clone();
    if b.dry_run {
        // `max` caps what the export writes, not what it reads: the dry run
        // reads what a Service Bus export reads by default, and counts the
        // matches up to `max`.
        let scan = b.scan.unwrap_or(usize::MAX).clamp(1, triage::DEFAULT_PEEK_CAP);
        let r = leasing_read(&app, guard, move |cancel| async move {
            let req = triage::ReportRequest {
                by: GroupBy::Reason,
                filter: filter.as_deref(),
                top: 5,
                scan,
            };
            triage::report(&reading.registry, &read_queue, &req, &cancel).await
        })
        .await?
        .map_err(triage_error)?;
        let matched = b.max.map_or(r.matched, |m| r.matched.min(m));
        return Ok(Json(json!({
            "dry_run": true,
            "queue": queue,
            "read": r.read,
            "matched": matched,
            "capped": r.capped,
            "samples": r.groups.iter().map(|g| json!({"id": g.sample_id, "reason": g.key, "count": g.count})).collect::<Vec<_>>(),
        }))
        .into_response());
    }
    let Some(dir) = &app.data_dir else {
        return Err(bad_request("no data directory for exports: set serve.data_dir"));
    };
    let path = triage::dated_path(&dir.join("exports"), &queue);
    let (max, scan) = (b.max, b.scan.map(|s| s.max(1)));
    let s = leasing_read(&app, guard, move |cancel| async move {
        triage::export(
            &reading.registry,
            &read_queue,
            &path,
            filter.as_deref(),
            max,
            scan,
            &cancel,
        )
        .await
    })
    .await?
    .map_err(triage_error)?;
    tracing::info!(%queue, written = s.written, file = %s.file.display(), trigger = %Trigger::Api, "export finished");
    Ok(Json(s).into_response())
}
