//! The gRPC channels of one Pub/Sub endpoint, and which CAs they trust.
//!
//! gcloud-gax's `ConnectionManager` is not used. It builds its TLS on the
//! public CAs compiled into webpki-roots alone, so a private CA (a
//! TLS-inspecting proxy, a private endpoint's own certificate) could not be
//! trusted, as it can be for SQS and Service Bus; and it takes the TLS name
//! from the whole endpoint, so `host:port` could not be verified. Here
//! Google's endpoints read the variables the other backends read: the CAs of
//! `SSL_CERT_FILE` / `SSL_CERT_DIR` when either is set, else the system's
//! store. Unlike SQS's client, which then has no CA at all, an image without
//! a store falls back to the public CAs built in. The bearer token goes on
//! every call, as gcloud-gax puts it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use gcloud_gax::grpc::codegen::http::header::AUTHORIZATION;
use gcloud_gax::grpc::codegen::http::{HeaderValue, Request};
use gcloud_gax::grpc::{Code, Status};
use token_source::TokenSource;
use tonic::body::Body;
use tonic::transport::{Channel as TonicChannel, ClientTlsConfig, Endpoint};
use tower::filter::{AsyncFilter, AsyncPredicate};

use super::super::BackendError;

/// What the generated clients are built on.
pub(super) type Channel = AsyncFilter<TonicChannel, Auth>;

/// A whole call's deadline, and the connect timeout that reports a stopped
/// emulator (or a wrong endpoint) at once.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Puts the bearer token on each call (none on an emulator).
#[derive(Clone)]
pub(super) struct Auth(Option<Arc<dyn TokenSource>>, Arc<AtomicBool>);

impl Auth {
    fn new(tokens: Option<Arc<dyn TokenSource>>) -> Self {
        Self(tokens, Arc::new(AtomicBool::new(false)))
    }
}

impl AsyncPredicate<Request<Body>> for Auth {
    type Future = Pin<Box<dyn Future<Output = Result<Request<Body>, tower::BoxError>> + Send>>;
    type Request = Request<Body>;

    fn check(&mut self, request: Request<Body>) -> Self::Future {
        let Some(tokens) = self.0.clone() else {
            return Box::pin(std::future::ready(Ok(request)));
        };
        let obtained = self.1.clone();
        Box::pin(async move {
            // The token source's own words may quote the credentials file's
            // path, never its key: it is safe to pass on, with the innermost
            // cause (a metadata server that refused, a DNS failure), which
            // its own message leaves out. Once a token was had, a refresh
            // that fails is most likely the token server's blip (GKE's
            // metadata server, hourly): unavailable, which is retried, not
            // an authentication failure, which stops a run for good.
            let token = tokens.token().await.map_err(|e| {
                let why = super::super::with_root_cause(&*e);
                if obtained.load(Ordering::Relaxed) {
                    Status::new(Code::Unavailable, format!("refreshing the access token failed: {why}"))
                } else {
                    Status::new(Code::Unauthenticated, format!("no access token: {why}"))
                }
            })?;
            obtained.store(true, Ordering::Relaxed);
            let value = HeaderValue::from_str(&token)
                .map_err(|_| Status::new(Code::Unauthenticated, "the access token is not a valid header value"))?;
            let (mut parts, body) = request.into_parts();
            parts.headers.insert(AUTHORIZATION, value);
            Ok(Request::from_parts(parts, body))
        })
    }
}

/// Channels taken in turn, so that calls spread over the connections.
pub(super) struct Pool {
    channels: Vec<Channel>,
    next: AtomicUsize,
}

impl Pool {
    pub(super) fn conn(&self) -> Channel {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        self.channels[i % self.channels.len()].clone()
    }
}

/// What a connection is made from: the endpoint (with its TLS, built once)
/// and the credentials every call carries.
pub(super) struct Dialer {
    endpoint: Endpoint,
    auth: Auth,
}

impl Dialer {
    /// An emulator's `host:port`, in plain HTTP/2, with no token.
    pub(super) fn emulator(host: &str) -> Result<Self, BackendError> {
        let endpoint = Endpoint::from_shared(format!("http://{host}"))
            .map_err(|e| invalid(format!("Pub/Sub emulator host `{host}`"), &e))?;
        Ok(Self::with(endpoint, Auth::new(None)))
    }

    /// A Google API host (`host` or `host:port`), over TLS, with a token.
    pub(super) fn google(host: &str, tokens: Arc<dyn TokenSource>) -> Result<Self, BackendError> {
        let (url, domain) = google_url(host);
        let endpoint = Endpoint::from_shared(url).map_err(|e| invalid(format!("Pub/Sub endpoint `{host}`"), &e))?;
        let tls = trusted_cas()?.domain_name(domain);
        let endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| invalid(format!("TLS for the Pub/Sub endpoint `{host}`"), &e))?;
        Ok(Self::with(endpoint, Auth::new(Some(tokens))))
    }

    fn with(endpoint: Endpoint, auth: Auth) -> Self {
        let endpoint = endpoint.timeout(CALL_TIMEOUT).connect_timeout(CONNECT_TIMEOUT);
        Self { endpoint, auth }
    }

    /// `size` connections, opened at once (each a TCP and, on Google's
    /// endpoint, a TLS handshake); the first failure is returned.
    pub(super) async fn open(&self, size: usize) -> Result<Pool, tonic::transport::Error> {
        let connects = (0..size.max(1)).map(|_| self.endpoint.connect());
        let channels = futures::future::try_join_all(connects)
            .await?
            .into_iter()
            .map(|channel| AsyncFilter::new(channel, self.auth.clone()))
            .collect();
        Ok(Pool {
            channels,
            next: AtomicUsize::new(0),
        })
    }
}

/// The URL of a Google API host (`host` or `host:port`), and the name its
/// certificate must carry: the host, not the port (the config takes no IPv6
/// literal, whose colons would be cut here).
fn google_url(host: &str) -> (String, &str) {
    let domain = host.rsplit_once(':').map_or(host, |(name, _)| name);
    (format!("https://{host}/"), domain)
}

/// A setting that cannot be used, with tonic's innermost cause ("invalid
/// URI" alone says nothing of what is wrong with it).
fn invalid(what: String, e: &(dyn std::error::Error + 'static)) -> BackendError {
    BackendError::Invalid(format!("{what}: {}", super::super::with_root_cause(e)))
}

/// The variables that replace the system's CA store, as OpenSSL and
/// rustls-native-certs (which SQS's client and the alert sinks use) read them.
const CA_VARIABLES: [&str; 2] = ["SSL_CERT_FILE", "SSL_CERT_DIR"];

/// The CAs Google's endpoints are checked against (see the module's
/// comment), read once: the decision and the roots it trusts are the same.
fn trusted_cas() -> Result<ClientTlsConfig, BackendError> {
    let named: Vec<String> = CA_VARIABLES
        .iter()
        .filter_map(|var| std::env::var_os(var).map(|v| format!("{var}={}", v.to_string_lossy())))
        .collect();
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (_, unparsable) = roots.add_parsable_certificates(found.certs);
    let mut problems: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
    if unparsable > 0 {
        problems.push(format!("{unparsable} certificates could not be parsed"));
    }
    let tls = ClientTlsConfig::new();
    if !roots.is_empty() {
        if !problems.is_empty() {
            if named.is_empty() {
                tracing::debug!(?problems, "some of the system's CA certificates could not be read");
            } else {
                tracing::warn!(
                    variables = %named.join(", "),
                    problems = %problems.join("; "),
                    "some CA certificates could not be read for Pub/Sub; trusting the others"
                );
            }
        }
        return Ok(tls.trust_anchors(roots.roots));
    }
    if named.is_empty() {
        tracing::debug!(?problems, "no system CA store: trusting the public CAs built in");
        return Ok(tls.with_webpki_roots());
    }
    // Named, and nothing in it: falling back to other CAs would trust what
    // the user meant to replace.
    let why = if problems.is_empty() {
        "no certificate in it".to_string()
    } else {
        problems.join("; ")
    };
    Err(BackendError::Invalid(format!(
        "{}: no CA certificate could be read for Pub/Sub ({why}); name a PEM file of CA certificates",
        named.join(", ")
    )))
}

#[cfg(test)]
mod tests {
    use tower::ServiceExt as _;

    use super::*;

    #[derive(Debug)]
    struct Tokens(Result<&'static str, &'static str>);

    #[async_trait::async_trait]
    impl TokenSource for Tokens {
        async fn token(&self) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
            self.0.map(str::to_string).map_err(Into::into)
        }
    }

    /// The header a call leaves with (the inner service echoes it).
    async fn sent_authorization(auth: Auth) -> Result<Option<String>, tower::BoxError> {
        let echo = tower::service_fn(|request: Request<Body>| async move {
            Ok::<_, std::convert::Infallible>(
                request
                    .headers()
                    .get(AUTHORIZATION)
                    .map(|v| v.to_str().unwrap().to_string()),
            )
        });
        AsyncFilter::new(echo, auth).oneshot(Request::new(Body::empty())).await
    }

    #[tokio::test]
    async fn every_call_carries_the_token_and_a_missing_one_is_unauthenticated() {
        let auth = |t| Auth::new(Some(Arc::new(Tokens(t))));
        assert_eq!(
            sent_authorization(auth(Ok("Bearer abc"))).await.unwrap().as_deref(),
            Some("Bearer abc")
        );
        assert_eq!(
            sent_authorization(Auth::new(None)).await.unwrap(),
            None,
            "an emulator's call"
        );
        let refused = sent_authorization(auth(Err("metadata server refused")))
            .await
            .unwrap_err();
        let status = refused.downcast::<Status>().expect("a gRPC status");
        assert_eq!(status.code(), Code::Unauthenticated);
        assert!(
            status.message().contains("no access token: metadata server refused"),
            "{status:?}"
        );
        let bad = sent_authorization(auth(Ok("Bearer a\nb"))).await.unwrap_err();
        assert_eq!(bad.downcast::<Status>().unwrap().code(), Code::Unauthenticated);
    }

    /// Gives one token, then fails (a metadata server's blip at refresh).
    #[derive(Debug, Default)]
    struct OnceThenDown(AtomicUsize);

    #[async_trait::async_trait]
    impl TokenSource for OnceThenDown {
        async fn token(&self) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
            match self.0.fetch_add(1, Ordering::Relaxed) {
                0 => Ok("Bearer abc".into()),
                _ => Err("metadata server timed out".into()),
            }
        }
    }

    /// A refresh that fails after a token was had is retried as the
    /// service's unavailability, not taken for refused credentials (which
    /// stop a run for good).
    #[tokio::test]
    async fn a_failed_refresh_after_a_token_is_unavailable_not_unauthenticated() {
        let auth = Auth::new(Some(Arc::new(OnceThenDown::default())));
        assert!(sent_authorization(auth.clone()).await.unwrap().is_some());
        let refused = sent_authorization(auth).await.unwrap_err();
        let status = refused.downcast::<Status>().expect("a gRPC status");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(status.message().contains("metadata server timed out"), "{status:?}");
    }

    #[test]
    fn google_endpoints_are_https_with_or_without_a_port_and_emulators_plain() {
        assert_eq!(
            google_url("pubsub.googleapis.com"),
            ("https://pubsub.googleapis.com/".to_string(), "pubsub.googleapis.com")
        );
        assert_eq!(
            google_url("pubsub.internal.example:8443"),
            (
                "https://pubsub.internal.example:8443/".to_string(),
                "pubsub.internal.example"
            )
        );
        let emulator = Dialer::emulator("127.0.0.1:8085").unwrap();
        assert_eq!(emulator.endpoint.uri().to_string(), "http://127.0.0.1:8085/");
        let Err(BackendError::Invalid(why)) = Dialer::emulator("127.0.0.1:80 85") else {
            panic!("a host with a space is refused")
        };
        assert!(
            why.starts_with("Pub/Sub emulator host `127.0.0.1:80 85`: invalid URI"),
            "{why}"
        );
    }
}
