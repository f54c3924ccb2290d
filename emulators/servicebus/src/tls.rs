//! TLS: HTTPS for the ATOM endpoint (the Python admin client only speaks
//! https, and Entra ID's token endpoint is https), and AMQPS when asked for.

use std::sync::Arc;

use axum::Router;
use hyper_util::{rt::TokioIo, server::conn::auto, service::TowerToHyperService};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot generate the self-signed certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("cannot configure TLS: {0}")]
    Config(#[from] rustls::Error),
}

/// A fresh self-signed certificate for localhost, 127.0.0.1 and
/// `amqp_host` (where the AMQPS listener binds); returns the acceptor and the PEM.
pub fn self_signed(amqp_host: std::net::IpAddr) -> Result<(TlsAcceptor, String), TlsError> {
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    if !amqp_host.is_unspecified() && amqp_host.to_string() != "127.0.0.1" {
        names.push(amqp_host.to_string());
    }
    let certified = rcgen::generate_simple_self_signed(names)?;
    let pem = certified.cert.pem();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der()));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![certified.cert.der().clone()], key)?;
    Ok((TlsAcceptor::from(Arc::new(config)), pem))
}

pub async fn serve(listener: TcpListener, acceptor: TlsAcceptor, router: Router) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "HTTPS accept failed");
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let service = TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let stream = match acceptor.accept(stream).await {
                Ok(stream) => stream,
                Err(error) => {
                    tracing::debug!(%peer, %error, "TLS handshake failed");
                    return;
                }
            };
            if let Err(error) = auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%peer, %error, "HTTPS connection failed");
            }
        });
    }
}
