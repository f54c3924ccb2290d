//! A TLS terminator in front of a plain-text emulator: what a private
//! endpoint, or a TLS-inspecting proxy, looks like to dlq-bridge. Its
//! certificate (for `localhost` and 127.0.0.1) is issued by a CA made for
//! the test, which no system store holds.

use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

pub struct TlsTerminator {
    /// `localhost:PORT`, the name the certificate carries.
    pub endpoint: String,
    /// The test CA, PEM: what SSL_CERT_FILE must name to trust the terminator.
    pub ca_pem: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsTerminator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A CA of its own, that issued nothing the terminator serves.
pub fn unrelated_ca_pem() -> String {
    let key = KeyPair::generate().expect("CA key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.self_signed(&key).expect("CA certificate").pem()
}

impl TlsTerminator {
    /// Accepts TLS, offering `alpn` (`h2` for gRPC, `http/1.1` for an HTTP
    /// emulator: the bytes are relayed as they are, so the protocol must be
    /// the upstream's), and relays each connection to `upstream` (`host:port`).
    pub async fn start(upstream: &str, alpn: &[&[u8]]) -> Self {
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "dlq-bridge test CA");
        let ca = ca_params.self_signed(&ca_key).expect("CA certificate");

        let key = KeyPair::generate().expect("server key");
        let params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).expect("server params");
        let cert = params.signed_by(&key, &ca, &ca_key).expect("server certificate");

        let der_key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut config =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("TLS versions")
                .with_no_client_auth()
                .with_single_cert(vec![cert.der().clone()], der_key)
                .expect("server TLS config");
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let acceptor = TlsAcceptor::from(Arc::new(config));

        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("local address").port();
        let upstream = upstream.to_string();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (acceptor, upstream) = (acceptor.clone(), upstream.clone());
                tokio::spawn(async move {
                    // A refused handshake is what some tests want to see.
                    let Ok(mut client) = acceptor.accept(client).await else {
                        return;
                    };
                    let Ok(mut server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
            }
        });
        TlsTerminator {
            endpoint: format!("localhost:{port}"),
            ca_pem: ca.pem(),
            task,
        }
    }
}
