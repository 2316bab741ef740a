//! Node-to-node traffic on the manager port (2377): HTTP/JSON over mutual TLS.
//!
//! Members present their node certificate and verify the peer's against the cluster CA. A
//! joining node has no certificate yet: the server lets it complete the handshake, and every
//! handler except join requires the caller's node ID (from its verified certificate). The
//! joiner verifies the server with the CA whose digest is in its token.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{anyhow, bail, Context as _, Result};
use axum::{Extension, Router};
use http_body_util::{BodyExt as _, Full};
use hyper::{body::Bytes, client::conn::http1::SendRequest, Request};
use hyper_util::rt::TokioIo;
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    server::WebPkiClientVerifier,
    ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme,
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use shoal_api::{ApiError, ErrorKind, Kind as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::pki::{ca_digest, node_id_of, NodeIdentity, CA_MISMATCH, CLUSTER_SERVER_NAME};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// What to check when a manager does not answer: the usual causes, in the error itself.
const UNREACHABLE_HINT: &str =
    " (is a manager's agent listening there, and is 2377/tcp open between the nodes?)";
/// How long a connection may wait between requests before the server closes it.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The verified node ID of the caller, or None for a node that is still joining.
#[derive(Clone, Debug)]
pub struct Peer(pub Option<String>);

impl Peer {
    pub fn require(&self) -> Result<&str> {
        self.0.as_deref().ok_or_else(|| {
            ApiError::forbidden("this endpoint needs a cluster member's certificate").into()
        })
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn pem_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>> {
    use rustls::pki_types::pem::PemObject as _;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .context("bad PEM certificate")
}

fn pem_key(pem: &str) -> Result<PrivateKeyDer<'static>> {
    use rustls::pki_types::pem::PemObject as _;
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).context("bad PEM key")
}

fn roots(ca_pem: &str) -> Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    for cert in pem_certs(ca_pem)? {
        roots.add(cert)?;
    }
    Ok(Arc::new(roots))
}

fn chain(identity: &NodeIdentity) -> Result<Vec<CertificateDer<'static>>> {
    let mut chain = pem_certs(&identity.cert_pem)?;
    chain.extend(pem_certs(&identity.ca_pem)?);
    Ok(chain)
}

pub fn server_config(identity: &NodeIdentity) -> Result<Arc<ServerConfig>> {
    let verifier =
        WebPkiClientVerifier::builder_with_provider(roots(&identity.ca_pem)?, provider())
            .allow_unauthenticated()
            .build()?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain(identity)?, pem_key(&identity.key_pem)?)?;
    Ok(Arc::new(config))
}

pub fn member_client_config(identity: &NodeIdentity) -> Result<Arc<ClientConfig>> {
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(&identity.ca_pem)?)
        .with_client_auth_cert(chain(identity)?, pem_key(&identity.key_pem)?)?;
    Ok(Arc::new(config))
}

/// For `swarm join`: trust the server only if its chain holds the CA the token names.
pub fn joining_client_config(expected_digest: &str) -> Result<Arc<ClientConfig>> {
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCaVerifier {
            digest: expected_digest.to_owned(),
            provider: provider(),
        }))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[derive(Debug)]
struct PinnedCaVerifier {
    digest: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| ca_digest(c) == self.digest)
            .ok_or_else(|| rustls::Error::General(CA_MISMATCH.into()))?;
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| rustls::Error::General(format!("bad CA certificate: {e}")))?;
        let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        webpki.verify_server_cert(end_entity, &[], server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Serves `router` over TLS on `listener`; each request carries the caller as `Peer`.
/// Connections belong to this future: aborting it ends them all (and drops the router).
pub async fn serve(listener: TcpListener, tls: Arc<ServerConfig>, router: Router) {
    let acceptor = TlsAcceptor::from(tls);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            Some(_) = connections.join_next() => continue,
        };
        let (stream, remote) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                tracing::warn!(error = %err, "accept on the manager port failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let router = router.clone();
        connections.spawn(async move {
            let stream = match tokio::time::timeout(CONNECT_TIMEOUT, acceptor.accept(stream)).await
            {
                Ok(Ok(stream)) => stream,
                Ok(Err(err)) => {
                    tracing::debug!(%remote, error = %err, "TLS handshake refused");
                    return;
                }
                Err(_) => return,
            };
            let peer = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .and_then(|cert| node_id_of(cert).ok());
            let service =
                hyper_util::service::TowerToHyperService::new(router.layer(Extension(Peer(peer))));
            // A connection that sends no request in time is closed, so idle (or
            // certificate-less) connections cannot pile up.
            if let Err(err) = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%remote, error = %err, "connection ended with an error");
            }
        });
    }
}

/// Idle HTTP/1 connections, by peer address.
type Pool = HashMap<String, Vec<SendRequest<Full<Bytes>>>>;

/// A client with a small pool of HTTP/1 connections per peer.
#[derive(Clone)]
pub struct ClusterClient {
    connector: TlsConnector,
    idle: Arc<Mutex<Pool>>,
}

/// An error answer as any version of the agent writes it (older ones without a kind).
#[derive(Deserialize)]
struct ErrorBody {
    error: String,
    kind: Option<ErrorKind>,
}

impl ClusterClient {
    pub fn new(config: Arc<ClientConfig>) -> Self {
        Self {
            connector: TlsConnector::from(config),
            idle: Arc::default(),
        }
    }

    async fn connect(&self, addr: &str) -> Result<SendRequest<Full<Bytes>>> {
        let socket: SocketAddr = addr
            .parse()
            .with_context(|| format!("bad address {addr}"))?;
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(socket))
            .await
            .map_err(|_| anyhow!("connecting to {addr} timed out{UNREACHABLE_HINT}"))?
            .with_context(|| format!("connecting to {addr}{UNREACHABLE_HINT}"))?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from(CLUSTER_SERVER_NAME)?;
        let tls = tokio::time::timeout(CONNECT_TIMEOUT, self.connector.connect(name, tcp))
            .await
            .map_err(|_| anyhow!("TLS handshake with {addr} timed out"))?
            .with_context(|| format!("TLS handshake with {addr}"))?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(connection);
        Ok(sender)
    }

    /// POSTs `body` as JSON and decodes the JSON answer; errors carry the server's message.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        addr: &str,
        path: &str,
        body: &B,
        timeout: Duration,
    ) -> Result<T> {
        let bytes = self
            .post_raw(addr, path, serde_json::to_vec(body)?, timeout)
            .await?;
        serde_json::from_slice(&bytes).with_context(|| format!("bad answer from {addr}{path}"))
    }

    /// POSTs raw bytes; the answer's bytes on success, the server's message on failure.
    pub async fn post_raw(
        &self,
        addr: &str,
        path: &str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>> {
        let body = Bytes::from(body);
        let call = async {
            let pooled = self
                .idle
                .lock()
                .expect("pool")
                .get_mut(addr)
                .and_then(Vec::pop);
            let mut sender = match pooled {
                Some(sender) if sender.is_ready() => sender,
                _ => self.connect(addr).await?,
            };
            let request = Request::post(path)
                .header(hyper::header::HOST, CLUSTER_SERVER_NAME)
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(Full::new(body))?;
            let response = sender.send_request(request).await?;
            let status = response.status();
            let bytes = response.into_body().collect().await?.to_bytes();
            self.idle
                .lock()
                .expect("pool")
                .entry(addr.to_owned())
                .or_default()
                .push(sender);
            Ok::<_, anyhow::Error>((status, bytes))
        };
        // A node that cannot be reached cannot answer now; what it answers keeps its kind.
        let (status, bytes) = tokio::time::timeout(timeout, call)
            .await
            .map_err(|_| {
                ApiError::unavailable(format!("{addr} did not answer {path} within {timeout:?}"))
            })?
            .kind(ErrorKind::Unavailable)?;
        if !status.is_success() {
            let answer = serde_json::from_slice::<ErrorBody>(&bytes);
            let kind = answer
                .as_ref()
                .ok()
                .and_then(|body| body.kind)
                .unwrap_or_else(|| ErrorKind::from_status(status.as_u16()));
            let message = answer
                .map(|body| body.error)
                .unwrap_or_else(|_| format!("{addr} answered {status}"));
            bail!(ApiError::new(kind, message));
        }
        Ok(bytes.to_vec())
    }
}
