//! The gRPC channels of one Pub/Sub endpoint, and which CAs they trust.
//!
//! gcloud-gax's `ConnectionManager` is not used. It builds its TLS on the
//! public CAs compiled into webpki-roots alone, so a private CA (a
//! TLS-inspecting proxy, a private endpoint's own certificate) could not be
//! trusted, as it can be for SQS and Service Bus; and it always dials port
//! 443. Here Google's endpoints are trusted as the other backends trust
//! theirs: the CAs of `SSL_CERT_FILE` / `SSL_CERT_DIR` when either is set,
//! else the system's store, else (an image without one) the public CAs built
//! in. The bearer token goes on every call, as gcloud-gax puts it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
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
pub(super) struct Auth(Option<Arc<dyn TokenSource>>);

impl AsyncPredicate<Request<Body>> for Auth {
    type Future = Pin<Box<dyn Future<Output = Result<Request<Body>, tower::BoxError>> + Send>>;
    type Request = Request<Body>;

    fn check(&mut self, request: Request<Body>) -> Self::Future {
        let Some(tokens) = self.0.clone() else {
            return Box::pin(std::future::ready(Ok(request)));
        };
        Box::pin(async move {
            // The token source's own words may quote the credentials file's
            // path, never its key: it is safe to pass on.
            let token = tokens
                .token()
                .await
                .map_err(|e| Status::new(Code::Unauthenticated, format!("no access token: {e}")))?;
            let value = HeaderValue::from_str(&token)
                .map_err(|_| Status::new(Code::Unauthenticated, "the access token is not a valid header value"))?;
            let (mut parts, body) = request.into_parts();
            parts.headers.insert(AUTHORIZATION, value);
            Ok(Request::from_parts(parts, body))
        })
    }
}

/// Where the channels go.
pub(super) enum Dial<'a> {
    /// An emulator's `host:port`, in plain HTTP/2.
    Emulator(&'a str),
    /// A Google API host (`host` or `host:port`), over TLS, with a token.
    Google {
        host: &'a str,
        tokens: Arc<dyn TokenSource>,
    },
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
    pub(super) fn new(dial: Dial<'_>) -> Result<Self, BackendError> {
        let (endpoint, auth) = match dial {
            Dial::Emulator(host) => {
                let endpoint = Endpoint::from_shared(format!("http://{host}"))
                    .map_err(|e| BackendError::Invalid(format!("Pub/Sub emulator host `{host}`: {e}")))?;
                (endpoint, Auth(None))
            }
            Dial::Google { host, tokens } => {
                let endpoint = Endpoint::from_shared(format!("https://{host}/"))
                    .map_err(|e| BackendError::Invalid(format!("Pub/Sub endpoint `{host}`: {e}")))?;
                // The certificate names the host, not the port.
                let domain = host.rsplit_once(':').map_or(host, |(name, _)| name);
                let tls = trusted_cas()?.domain_name(domain);
                let endpoint = endpoint
                    .tls_config(tls)
                    .map_err(|e| BackendError::Invalid(format!("TLS for the Pub/Sub endpoint `{host}`: {e}")))?;
                (endpoint, Auth(Some(tokens)))
            }
        };
        let endpoint = endpoint.timeout(CALL_TIMEOUT).connect_timeout(CONNECT_TIMEOUT);
        Ok(Self { endpoint, auth })
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

/// The variables that replace the system's CA store, as OpenSSL and
/// rustls-native-certs (which SQS's client and the alert sinks use) read them.
const CA_VARIABLES: [&str; 2] = ["SSL_CERT_FILE", "SSL_CERT_DIR"];

/// The CAs Google's endpoints are checked against (see the module's comment).
fn trusted_cas() -> Result<ClientTlsConfig, BackendError> {
    let set: Vec<String> = CA_VARIABLES
        .iter()
        .filter_map(|var| {
            std::env::var_os(var)
                .filter(|v| !v.is_empty())
                .map(|v| format!("{var}={}", v.to_string_lossy()))
        })
        .collect();
    let found = rustls_native_certs::load_native_certs();
    let tls = ClientTlsConfig::new();
    if !found.certs.is_empty() {
        if !found.errors.is_empty() {
            tracing::debug!(errors = ?found.errors, "some CA certificates could not be read");
        }
        return Ok(tls.with_native_roots());
    }
    if set.is_empty() {
        tracing::debug!(errors = ?found.errors, "no system CA store: trusting the public CAs built in");
        return Ok(tls.with_webpki_roots());
    }
    // Named, and nothing in it: falling back to other CAs would trust what
    // the user meant to replace.
    let why = if found.errors.is_empty() {
        "no certificate in it".to_string()
    } else {
        found
            .errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    };
    Err(BackendError::Invalid(format!(
        "{}: no CA certificate could be read for Pub/Sub ({why}); name a PEM file of CA certificates",
        set.join(", ")
    )))
}
