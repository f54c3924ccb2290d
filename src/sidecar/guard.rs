//! Cross-site request forgery and DNS-rebinding guard in front of every
//! route of the sidecar's listener (the API and the dashboard alike).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::sidecar::api::ApiError;
use crate::sidecar::app::App;

/// Refuses what a browser must not be made to do for another site.
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
    use axum::http::HeaderValue;

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
