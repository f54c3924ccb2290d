//! The web dashboard of `serve` (issue 15): a hand-written page (HTML, CSS
//! and plain JavaScript, no framework, no build step) embedded in the binary
//! and served from the API's listener at `/` and `/ui`, plus the few API
//! endpoints it needs beyond the existing ones (`api`).
//!
//! The page holds no privilege of its own: it calls the same `/v1` API as any
//! client, with the bearer token the user types (kept in the tab's
//! `sessionStorage`, never in a cookie). What keeps another site from using a
//! browser as a confused deputy is [`guard`]: unsafe methods must come from
//! the same origin, and without a token (loopback only) the Host must be a
//! loopback name, which defeats DNS rebinding.

pub mod api;

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::serve::App;
use crate::server::ApiError;

const INDEX_HTML: &str = include_str!("../../assets/dashboard/index.html");
const APP_JS: &str = include_str!("../../assets/dashboard/app.js");
const APP_CSS: &str = include_str!("../../assets/dashboard/app.css");
const FAVICON_SVG: &str = include_str!("../../assets/dashboard/favicon.svg");

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

/// Cross-site request forgery and DNS-rebinding guard, in front of every
/// route.
///
/// - Unsafe methods (anything but GET, HEAD, OPTIONS) are refused when the
///   browser says the request comes from another site (`Sec-Fetch-Site`) or
///   its `Origin` is not this server's. Clients that send neither (curl, the
///   CLI, scripts) are not browsers and pass. A token alone already forces a
///   CORS preflight that this server never grants, but without a token a
///   "simple" cross-site POST would otherwise start a redrive.
/// - Without a token the server only binds loopback, so every legitimate
///   client names it by a loopback host. A page on a rebound DNS name
///   (`evil.example` now resolving to 127.0.0.1) is same-origin to itself, so
///   the `/v1` API and the page refuse any other Host.
pub async fn guard(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let scoped = path == "/" || path.starts_with("/ui") || path.starts_with("/v1/");
    if scoped && app.token.is_none() && !host_is_loopback(req.headers()) {
        return ApiError(
            StatusCode::FORBIDDEN,
            "without a token the API only answers requests addressed to a loopback host".into(),
        )
        .into_response();
    }
    let safe = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if !safe && !same_origin(req.headers()) {
        return ApiError(StatusCode::FORBIDDEN, "cross-origin request refused".into()).into_response();
    }
    next.run(req).await
}

fn header_str(h: &HeaderMap, name: impl axum::http::header::AsHeaderName) -> Option<&str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn same_origin(h: &HeaderMap) -> bool {
    if let Some(site) = header_str(h, "sec-fetch-site")
        && site != "same-origin"
        && site != "none"
    {
        return false;
    }
    match header_str(h, header::ORIGIN) {
        None => true,
        Some(origin) => {
            let Some(host) = header_str(h, header::HOST) else {
                return false;
            };
            origin
                .strip_prefix("http://")
                .or_else(|| origin.strip_prefix("https://"))
                .is_some_and(|o| o.eq_ignore_ascii_case(host))
        }
    }
}

fn host_is_loopback(h: &HeaderMap) -> bool {
    // HTTP/1.0 clients may send no Host; they are not browsers.
    let Some(host) = header_str(h, header::HOST) else {
        return true;
    };
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(n, _)| n)
    };
    let name = name.to_ascii_lowercase();
    if name == "localhost" || name.ends_with(".localhost") {
        return true;
    }
    name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn same_origin_rules() {
        assert!(same_origin(&headers(&[("host", "127.0.0.1:9090")])));
        assert!(same_origin(&headers(&[
            ("host", "127.0.0.1:9090"),
            ("origin", "http://127.0.0.1:9090"),
            ("sec-fetch-site", "same-origin"),
        ])));
        assert!(!same_origin(&headers(&[
            ("host", "127.0.0.1:9090"),
            ("origin", "http://evil.example"),
        ])));
        assert!(!same_origin(&headers(&[
            ("host", "127.0.0.1:9090"),
            ("origin", "null")
        ])));
        assert!(!same_origin(&headers(&[
            ("host", "127.0.0.1:9090"),
            ("sec-fetch-site", "cross-site"),
        ])));
        assert!(!same_origin(&headers(&[
            ("host", "127.0.0.1:9090"),
            ("origin", "http://127.0.0.1:9091"),
        ])));
    }

    #[test]
    fn loopback_hosts() {
        for ok in [
            "127.0.0.1:9090",
            "localhost:1",
            "LOCALHOST",
            "[::1]:80",
            "app.localhost:3",
            "127.5.0.1",
        ] {
            assert!(host_is_loopback(&headers(&[("host", ok)])), "{ok}");
        }
        for bad in [
            "evil.example:9090",
            "10.0.0.1:9090",
            "[::2]:1",
            "localhost.evil.example",
        ] {
            assert!(!host_is_loopback(&headers(&[("host", bad)])), "{bad}");
        }
    }
}
