//! The web dashboard of `serve` (issue 15): a hand-written page (HTML, CSS
//! and plain JavaScript, no framework, no build step) embedded in the binary
//! and served from the API's listener at `/` and `/ui`, plus the few API
//! endpoints it needs beyond the existing ones (`api`).
//!
//! The page holds no privilege of its own: it calls the same `/v1` API as any
//! client, with the bearer token the user types (kept in the tab's
//! `sessionStorage`, never in a cookie). What keeps another site from using a
//! browser as a confused deputy is [`crate::sidecar::guard`]: unsafe methods must come from
//! the same origin, and without a token (loopback only) the Host must be a
//! loopback name, which defeats DNS rebinding.

pub mod api;

use std::sync::Arc;

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::sidecar::app::App;

const INDEX_HTML: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/dashboard/index.html"));
const APP_JS: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/dashboard/app.js"));
const APP_CSS: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/dashboard/app.css"));
const FAVICON_SVG: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/dashboard/favicon.svg"));

/// Scripts, styles and images from this origin only; no inline code, no
/// eval, no framing, no form posts, fetches to this origin only.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The page and its assets; `/v1` endpoints come from [`api::routes`].
pub fn routes(enabled: bool) -> Router<Arc<App>> {
    let r = Router::new();
    if !enabled {
        return r;
    }
    r.route("/", get(index))
        .route("/ui", get(index))
        .route("/ui/", get(index))
        .route(
            "/ui/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/ui/app.css",
            get(|| async { asset("text/css; charset=utf-8", APP_CSS) }),
        )
        .route("/ui/favicon.svg", get(|| async { asset("image/svg+xml", FAVICON_SVG) }))
}

async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    // The assets change with the binary; revalidating costs a few KB.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}
