//! The sidecar's HTTP API (axum).
//!
//! `/healthz`, `/readyz`, `/metrics` and `GET /v1/queues` are open. Calls that
//! change a queue or read message content (bodies, reasons, runs' filters and
//! samples) need `Authorization: Bearer <token>` when a token is configured;
//! it is compared in constant time. Errors are JSON: `{"error": "..."}`,
//! including those of request bodies (415, 400, 422).

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{FromRequestParts, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;

use crate::backend::QueueBackend;
use crate::engine::redrive::Trigger;
use crate::engine::registry::{RedriveRequest, RegistryError};
use crate::engine::triage;
use crate::filter::Filter;
use crate::model::DlqMessage;
use crate::output::MessageView;
use crate::sidecar::app::{App, Cancelled};
use crate::sidecar::exclusion::{Busy, ReadGuard};

const MAX_LIMIT: usize = 1000;
/// Messages a filtered browse reads at most by default (`scan`), as the
/// CLI's `inspect --scan`; `MAX_SCAN` at most.
pub(crate) const DEFAULT_SCAN: usize = 1000;
pub(crate) const MAX_SCAN: usize = 10_000;
/// Bodies a browse (`/messages`, the dashboard's `/browse`) holds at most:
/// past them it answers fewer than `limit` messages, with `truncated`. A
/// `limit=1000` of 1 MiB bodies would otherwise hold a gigabyte, and its
/// JSON (base64 and text) more than twice that, in a sidecar whose memory
/// limit is a few hundred MiB.
pub(crate) const MAX_BROWSE_BODY_BYTES: usize = 8 << 20;
/// How long an API read waits for another read of the queue (the poller's
/// sample) to finish.
const READ_WAIT: Duration = Duration::from_secs(10);

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
        .route("/v1/runs/{id}/cancel", post(cancel_run))
}

/// How many messages a browse reads: `limit` without a filter (nothing is
/// skipped, so reading more would only raise delivery counts on SQS and
/// Pub/Sub), else `scan` (default `DEFAULT_SCAN`), never fewer than `limit`.
pub(crate) fn browse_reads(limit: usize, filtered: bool, scan: Option<usize>) -> usize {
    if filtered {
        scan.unwrap_or(DEFAULT_SCAN).clamp(limit, MAX_SCAN.max(limit))
    } else {
        limit
    }
}

/// The filter a request gives in parameter `param`. Left out, it selects
/// every message; given, it must say something, as the CLI's `--filter`:
/// an empty or blank one (most often a quoting or templating slip) is
/// refused with a 400 that names `param`, rather than read as no filter.
pub(crate) fn given_filter<'a>(param: &str, filter: Option<&'a str>) -> Result<Option<&'a str>, ApiError> {
    match filter {
        Some(f) if f.trim().is_empty() => Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "`{param}` is empty: leave it out to select every message (an empty value is often a quoting slip)"
            ),
        )),
        given => Ok(given),
    }
}

/// Take the queue's read guard before a read that leases (SQS, Pub/Sub): a
/// run on the queue would otherwise find the leased messages missing and
/// stop early. Refused with 409 while a run is active.
pub(crate) async fn read_guard(
    app: &App,
    queue: &str,
    backend: &dyn QueueBackend,
) -> Result<Option<ReadGuard>, ApiError> {
    if backend.capabilities().true_peek {
        return Ok(None);
    }
    match app.locks.read(queue, READ_WAIT).await {
        Ok(g) => Ok(Some(g)),
        Err(Busy::RunActive) => Err(ApiError(
            StatusCode::CONFLICT,
            format!(
                "a run is active on `{queue}`: reading it now would lease (hide) messages the run needs, as this provider has no true peek; try again once it has finished (GET /v1/runs)"
            ),
        )),
        Err(Busy::ReadInFlight) => Err(ApiError(
            StatusCode::CONFLICT,
            format!("another read of `{queue}` is still in flight; try again"),
        )),
    }
}

/// Browse for display ([`triage::first_matches`]) in a task of its own,
/// holding `guard` until the read ends: a client that hangs up drops the
/// request's future, and a read dropped between its leases and their
/// release would leave them hidden for the hold. A 502 when the provider
/// fails.
pub(crate) async fn read_detached(
    app: &App,
    backend: Arc<dyn QueueBackend>,
    guard: Option<ReadGuard>,
    scan: usize,
    limit: usize,
    matches: impl FnMut(&DlqMessage) -> Option<bool> + Send + 'static,
) -> Result<triage::Shown, ApiError> {
    // Shutdown stops the read at its next message (it then releases what it
    // holds): a scan of thousands on a slow endpoint held the process past
    // the shutdown grace.
    let cancel = app.shutdown.child_token();
    let task = tokio::spawn(async move {
        let got = triage::first_matches(
            &backend,
            scan,
            limit,
            MAX_BROWSE_BODY_BYTES,
            triage::DISPLAY_HOLD,
            &cancel,
            matches,
        )
        .await;
        drop(guard);
        got
    });
    match task.await {
        Ok(got) => got.map_err(|e| ApiError(StatusCode::BAD_GATEWAY, e.to_string())),
        Err(e) => Err(ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the read failed: {e}"),
        )),
    }
}

/// Run a read that leases and may take long (a report, an export) in a task
/// of its own that holds `guard` until it ends. A client that hangs up drops
/// the request's future: the read is then cancelled and still releases what
/// it leased (dropped between its leases and their release, they would stay
/// hidden for the hold, and the guard would let a run find them gone).
/// Shutdown cancels it the same way, so it never holds up a graceful stop.
pub(crate) async fn leasing_read<T, F>(
    app: &App,
    guard: Option<ReadGuard>,
    read: impl FnOnce(CancellationToken) -> F,
) -> Result<T, ApiError>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let cancel = app.shutdown.child_token();
    let _cancel_if_dropped = cancel.clone().drop_guard();
    let read = read(cancel);
    let task = tokio::spawn(async move {
        let got = read.await;
        drop(guard);
        got
    });
    task.await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("the read failed: {e}")))
}

/// Bytes a request body may have: a redrive's or a purge's fields and its
/// filter (at most 16 KiB) take a few KiB.
const MAX_BODY_BYTES: usize = 64 << 10;

/// How long a request body may take to arrive once its headers have:
/// [`crate::sidecar::http::HEAD_TIMEOUT`] bounds only the headers.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// The request body as JSON, with JSON errors (axum's own rejections are
/// plain text), read only after the token was checked: taken as an
/// extractor, the body would be read first, and a caller without the token
/// could hold a connection and its buffer by sending one slowly. The body
/// needs `Content-Type: application/json` (or `+json`): without it a client
/// such as Python's `requests.post(url, data=...)` would have its body
/// ignored, and a browser could send a "simple" cross-site `text/plain`
/// request. An empty body is refused too: an unfiltered redrive must be asked
/// for with `{}`.
pub(crate) async fn authorized_json<T: DeserializeOwned>(app: &App, request: Request) -> Result<T, ApiError> {
    let (parts, body) = request.into_parts();
    authorize(app, &parts.headers)?;
    let body = tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, MAX_BODY_BYTES))
        .await
        .map_err(|_| {
            ApiError(
                StatusCode::REQUEST_TIMEOUT,
                format!("the request body did not arrive within {BODY_TIMEOUT:?}"),
            )
        })?
        .map_err(body_error)?;
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or(""));
    parse_json_body(content_type, &body)
}

/// A body that could not be read: too large (413), or cut off.
fn body_error(e: axum::Error) -> ApiError {
    let too_large = std::iter::successors(Some(&e as &(dyn std::error::Error + 'static)), |e| e.source())
        .any(|e| e.is::<http_body_util::LengthLimitError>());
    if too_large {
        ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is larger than {} KiB", MAX_BODY_BYTES >> 10),
        )
    } else {
        ApiError(StatusCode::BAD_REQUEST, format!("reading the request body: {e}"))
    }
}

fn is_json_content_type(ct: &str) -> bool {
    let media = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    media == "application/json" || (media.starts_with("application/") && media.ends_with("+json"))
}

pub(crate) fn parse_json_body<T: DeserializeOwned>(content_type: Option<&str>, body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "empty request body: send a JSON object with Content-Type: application/json (`{}` takes every default, which for a redrive means every message)".into(),
        ));
    }
    if !content_type.is_some_and(is_json_content_type) {
        return Err(ApiError(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "the request body must be JSON sent with Content-Type: application/json (got {})",
                content_type.map_or("no Content-Type".to_string(), |c| format!("`{c}`"))
            ),
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        use serde_json::error::Category;
        let status = match e.classify() {
            Category::Data => StatusCode::UNPROCESSABLE_ENTITY,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError(status, format!("invalid JSON body: {e}"))
    })
}

#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub String);

/// axum's `Query`, refused in the API's own shape: a bad query string
/// (`limit=abc`) is a 400 with a JSON `error`, like every other refusal,
/// not axum's plain-text rejection.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(q)) => Ok(ApiQuery(q)),
            Err(e) => Err(ApiError(StatusCode::BAD_REQUEST, e.body_text())),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        let status = match &e {
            RegistryError::UnknownQueue { .. } => StatusCode::NOT_FOUND,
            // A queue's configured `source` the provider does not know is
            // the server's config to mend, not the caller's request.
            RegistryError::Source { .. } if e.is_usage() => StatusCode::INTERNAL_SERVER_ERROR,
            e if e.is_usage() => StatusCode::BAD_REQUEST,
            _ => StatusCode::BAD_GATEWAY,
        };
        let message = match e {
            // Over HTTP the destination is the body's `to`, not the CLI's flag.
            RegistryError::Destination {
                flag: "--to",
                to,
                error,
            } => format!("to {to}: {error}"),
            e => e.to_string(),
        };
        ApiError(status, message)
    }
}

/// The credentials of an `Authorization: Bearer <token>` header. The scheme
/// is case-insensitive (RFC 9110 §11.1); whitespace around the token is not
/// part of it.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, rest) = value.trim().split_once([' ', '\t'])?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
}

pub(crate) fn authorize(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(token) = &app.token else { return Ok(()) };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token)
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
            "not every configured backend has polled one of its queues yet".into(),
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

async fn queues(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    // Failure reasons are message content, as `/report`'s are: without the
    // token the counts are shown and the reasons left out.
    let reasons = authorize(&app, &headers).is_ok();
    let polled = app.cache.all().await;
    let mut out = Vec::new();
    for q in &app.registry.config().queues {
        match polled.iter().find(|s| s.queue == q.name) {
            Some(s) => {
                let mut v = serde_json::to_value(s).expect("status serializes");
                if !reasons && let Some(status) = v.as_object_mut() {
                    status.remove("top_reasons");
                }
                out.push(v);
            }
            None => out.push(json!({ "queue": q.name, "backend": q.kind.backend_name(), "polled_at": null })),
        }
    }
    Json(out).into_response()
}

#[derive(Deserialize)]
struct MessagesQuery {
    filter: Option<String>,
    limit: Option<usize>,
    /// With a filter: messages read at most while looking for matches.
    scan: Option<usize>,
}

async fn messages(
    State(app): State<Arc<App>>,
    Path(queue): Path<String>,
    ApiQuery(q): ApiQuery<MessagesQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&app, &headers)?;
    let limit = q.limit.unwrap_or(20).clamp(1, MAX_LIMIT);
    let read = browse_matches(&app, &queue, q.filter.as_deref(), None, limit, q.scan).await?;
    let views = read
        .shown
        .messages
        .iter()
        .map(|m| serde_json::to_value(MessageView::new(m, read.now)).expect("message view serializes"))
        .collect();
    Ok(Json(read.into_json(queue, views)).into_response())
}

/// A selection on top of a browse's filter (the dashboard's report group).
pub(crate) type Narrow = Box<dyn Fn(&DlqMessage) -> bool + Send>;

/// What [`browse_matches`] read.
pub(crate) struct BrowseRead {
    pub shown: triage::Shown,
    pub true_peek: bool,
    /// The filter's `now`: message views' ages are from it too.
    pub now: DateTime<Utc>,
}

impl BrowseRead {
    /// The answer's JSON: `messages` (each view as the caller made it)
    /// and what the read says of itself.
    pub(crate) fn into_json(
        self,
        queue: String,
        messages: Vec<serde_json::Value>,
    ) -> serde_json::Map<String, serde_json::Value> {
        let s = self.shown;
        serde_json::Map::from_iter([
            ("queue".to_string(), json!(queue)),
            ("true_peek".to_string(), json!(self.true_peek)),
            ("read".to_string(), json!(s.read)),
            ("filter_errors".to_string(), json!(s.filter_errors)),
            ("truncated".to_string(), json!(s.truncated)),
            ("held_back".to_string(), json!(s.held_back)),
            ("hold_limited".to_string(), json!(s.hold_limited)),
            ("messages".to_string(), serde_json::Value::Array(messages)),
        ])
    }
}

/// The read behind `/messages` and the dashboard's browse: the first
/// `limit` messages that `filter` selects (and `narrow`, when given), read
/// within `scan` messages when either is given. Only the matches shown are
/// kept (a scan of 10,000 bodies of 1 MiB must not sit in memory at once).
/// Messages the filter fails on are counted (`filter_errors`), as `inspect`
/// counts them: a filter that fails on every message otherwise looks like
/// an empty DLQ.
pub(crate) async fn browse_matches(
    app: &App,
    queue: &str,
    filter: Option<&str>,
    narrow: Option<Narrow>,
    limit: usize,
    scan: Option<usize>,
) -> Result<BrowseRead, ApiError> {
    let given = given_filter("filter", filter)?;
    let filter = match given {
        Some(f) => Filter::compile(f).map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?,
        None => Filter::match_all(),
    };
    let reads = browse_reads(limit, given.is_some() || narrow.is_some(), scan);
    let backend = app.registry.backend(queue).await?;
    let true_peek = backend.capabilities().true_peek;
    let guard = read_guard(app, queue, &*backend).await?;
    let now = Utc::now();
    let shown = read_detached(app, backend, guard, reads, limit, move |m| {
        let matched = filter.matches(m, now).ok()?;
        Some(matched && narrow.as_ref().is_none_or(|n| n(m)))
    })
    .await?;
    Ok(BrowseRead { shown, true_peek, now })
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
    ApiQuery(q): ApiQuery<ReportQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    use crate::engine::triage::{GroupBy, ReportRequest, TriageError};
    authorize(&app, &headers)?;
    let by: GroupBy =
        q.by.as_deref()
            .unwrap_or("pattern")
            .parse()
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e))?;
    let filter = given_filter("filter", q.filter.as_deref())?.map(str::to_string);
    let top = q.top.unwrap_or(triage::DEFAULT_TOP).clamp(1, 100);
    let scan = q.scan.unwrap_or(MAX_LIMIT).clamp(1, 10 * MAX_LIMIT);
    let backend = app.registry.backend(&queue).await?;
    let guard = read_guard(&app, &queue, &*backend).await?;
    let reading = app.clone();
    let result = leasing_read(&app, guard, move |cancel| async move {
        let req = ReportRequest {
            by,
            filter: filter.as_deref(),
            top,
            scan,
        };
        triage::report(&reading.registry, &queue, &req, &cancel).await
    })
    .await?;
    match result {
        Ok(r) => Ok(Json(r).into_response()),
        Err(TriageError::Registry(e)) => Err(e.into()),
        Err(e) if e.is_usage() => Err(ApiError(StatusCode::BAD_REQUEST, e.to_string())),
        Err(e) => Err(ApiError(StatusCode::BAD_GATEWAY, e.to_string())),
    }
}

#[derive(Deserialize)]
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

/// Start a redrive. The body is required JSON (see [`authorized_json`]); `{}` means
/// every default: every message, to its source, at the config's rate.
async fn redrive(
    State(app): State<Arc<App>>,
    Path(queue): Path<String>,
    request: Request,
) -> Result<Response, ApiError> {
    let b: RedriveBody = authorized_json(&app, request).await?;
    // The DLQ first, so that its own failure reads as the provider's (502);
    // planning then names a destination it cannot resolve (400 when the
    // provider does not know it).
    app.registry.backend(&queue).await?;
    let req = RedriveRequest {
        filter: b.filter,
        to: b.to,
        dry_run: b.dry_run,
        rate: b.rate,
        max: b.max,
        concurrency: b.concurrency,
        ..Default::default()
    };
    let run_id = app.start_run(&queue, req, Trigger::Api).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "run_id": run_id, "status_url": format!("/v1/runs/{run_id}") })),
    )
        .into_response())
}

async fn run(State(app): State<Arc<App>>, Path(id): Path<String>, headers: HeaderMap) -> Result<Response, ApiError> {
    // A run shows its filter, sample IDs, reasons and destinations.
    authorize(&app, &headers)?;
    match app.find_run(&id).await {
        Ok(Some(v)) => Ok(Json(v).into_response()),
        Ok(None) => Err(ApiError(StatusCode::NOT_FOUND, format!("no run `{id}`"))),
        Err(e) => Err(ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reading the journal: {e}"),
        )),
    }
}

/// Stop a running run (a mistaken redrive of every message, say) as a
/// shutdown would: it stops leasing, finishes the sends it has out and
/// releases what it holds. 202 while it stops; 409 once it has ended.
async fn cancel_run(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&app, &headers)?;
    match app.cancel_run(&id).await {
        Cancelled::Stopping(view) => Ok((StatusCode::ACCEPTED, Json(view)).into_response()),
        Cancelled::Ended(view) => Err(ApiError(
            StatusCode::CONFLICT,
            format!("run `{id}` has ended already ({})", view.status.as_str()),
        )),
        Cancelled::Unknown => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no run `{id}` is running in this replica"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendError;

    /// Every route the API and the dashboard's API serve is in the README's
    /// endpoint table, with its method (`{queue}` is written `{q}` there).
    #[test]
    fn the_readme_lists_every_route() {
        let readme = include_str!("../../README.md");
        let table: Vec<&str> = readme.lines().filter(|l| l.starts_with("| `")).collect();
        let sources = [include_str!("api.rs"), include_str!("dashboard/api.rs")];
        let mut routes = 0;
        let mut missing = Vec::new();
        for source in sources {
            for line in source.lines() {
                let Some((_, rest)) = line.split_once(".route(\"") else {
                    continue;
                };
                let (path, handler) = rest.split_once('"').expect("a route's path is a string literal");
                let method = if handler.contains("post(") { "POST" } else { "GET" };
                let path = path.replace("{queue}", "{q}");
                routes += 1;
                let listed = format!("`{method} {path}");
                if !table
                    .iter()
                    .any(|l| l.starts_with(&format!("| {listed}`")) || l.starts_with(&format!("| {listed}?")))
                {
                    missing.push(listed);
                }
            }
        }
        assert!(routes >= 16, "found only {routes} routes: has the routing code moved?");
        assert!(missing.is_empty(), "README's endpoint table lacks {missing:?}");
    }

    #[test]
    fn bearer_scheme_is_case_insensitive_and_the_token_trimmed() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer abc"), Some("abc"));
        assert_eq!(bearer_token("BEARER  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearerabc"), None);
        assert_eq!(bearer_token(""), None);
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        #[allow(dead_code)]
        filter: Option<String>,
    }

    #[test]
    fn bodies_need_json_and_errors_say_why() {
        let ok: Body = parse_json_body(Some("application/json; charset=utf-8"), br#"{"filter": "true"}"#).unwrap();
        assert_eq!(ok.filter.as_deref(), Some("true"));
        assert!(parse_json_body::<Body>(Some("application/merge-patch+json"), b"{}").is_ok());
        let e = parse_json_body::<Body>(None, br#"{"filter": "x"}"#).unwrap_err();
        assert_eq!(e.0, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert!(e.1.contains("application/json"), "{}", e.1);
        let e = parse_json_body::<Body>(Some("text/plain"), b"{}").unwrap_err();
        assert_eq!(e.0, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        for empty in [&b""[..], b" \n"] {
            let e = parse_json_body::<Body>(None, empty).unwrap_err();
            assert_eq!(e.0, StatusCode::BAD_REQUEST);
            assert!(e.1.contains("empty"), "{}", e.1);
        }
        let e = parse_json_body::<Body>(Some("application/json"), br#"{"fliter": "x"}"#).unwrap_err();
        assert_eq!(e.0, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(e.1.contains("fliter"), "{}", e.1);
        let e = parse_json_body::<Body>(Some("application/json"), b"{").unwrap_err();
        assert_eq!(e.0, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn a_blank_filter_is_refused_naming_its_parameter_not_read_as_none() {
        for blank in ["", " ", "\t\n  "] {
            let ApiError(status, text) = given_filter("filter", Some(blank)).unwrap_err();
            assert_eq!(status, StatusCode::BAD_REQUEST, "{blank:?}");
            assert!(text.starts_with("`filter` is empty"), "{text}");
        }
        assert_eq!(given_filter("filter", None).unwrap(), None);
        assert_eq!(given_filter("filter", Some(" true ")).unwrap(), Some(" true "));
    }

    #[test]
    fn a_browse_reads_its_limit_without_a_filter_and_a_bounded_scan_with_one() {
        assert_eq!(browse_reads(1, false, None), 1);
        assert_eq!(browse_reads(20, false, Some(5000)), 20);
        assert_eq!(browse_reads(20, true, None), DEFAULT_SCAN);
        assert_eq!(browse_reads(20, true, Some(50)), 50);
        assert_eq!(browse_reads(20, true, Some(5)), 20, "never fewer than the limit");
        assert_eq!(browse_reads(20, true, Some(1_000_000)), MAX_SCAN);
    }

    #[test]
    fn an_unknown_destination_is_the_callers_mistake() {
        let destination = |error| RegistryError::Destination {
            flag: "--to",
            to: "nosuch".into(),
            error,
        };
        let not_found = BackendError::NotFound {
            queue: "nosuch".into(),
            detail: "no queue".into(),
        };
        assert_eq!(
            ApiError::from(destination(not_found.clone())).0,
            StatusCode::BAD_REQUEST
        );
        let dlq_missing = RegistryError::Backend {
            queue: "orders".into(),
            error: not_found,
        };
        assert_eq!(ApiError::from(dlq_missing).0, StatusCode::BAD_GATEWAY);
        let down = BackendError::Unreachable {
            endpoint: "x".into(),
            detail: "refused".into(),
        };
        assert_eq!(ApiError::from(destination(down)).0, StatusCode::BAD_GATEWAY);
        // The queue's configured source is the server's config, not the
        // caller's request.
        let source_missing = RegistryError::Source {
            queue: "orders".into(),
            name: "nosuch".into(),
            error: BackendError::NotFound {
                queue: "nosuch".into(),
                detail: "no topic".into(),
            },
        };
        assert!(source_missing.is_usage(), "the CLI's exit 2: a config to mend");
        assert_eq!(ApiError::from(source_missing).0, StatusCode::INTERNAL_SERVER_ERROR);
    }
}
