//! The node's client of the CA's API: a [`Signer`] that sends public keys to the certificate
//! authority (`mesh-agent ca serve`) and gets chains back, so the node holds no CA key.
//!
//! The node accepts only a server holding the CA identity of the trust domain, chained to the
//! trust bundle, and authenticates with its node certificate (`mesh-agent ca issue-node`) or,
//! in Kubernetes, with its pod's projected service-account token, sent as `Authorization:
//! Bearer` and read from its file for every request (the kubelet rotates it). One
//! TLS connection per request: requests are rare (a pod's first certificate, then one per
//! half-life), so nothing is kept open. A request the CA answers busy is tried again a few
//! times with backoff; one that cannot reach the CA fails, and so do the next ones for a few
//! seconds without trying (a node enrolling many pods does not wait a connect timeout per
//! pod). The certificate store retries rotations, and the agent enrollments, with their own
//! longer backoff, keeping the current certificates meanwhile. What happened last is kept for
//! `mesh-agent status` and the metrics ([`CaHealth`]).

use std::{
    fs, io,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use tokio::{net::TcpStream, time::timeout};
use tokio_rustls::TlsConnector;

use super::{
    bundle::TrustBundle,
    ca::{CaError, SignFuture, Signer},
    ca_api::{self, ErrorBody, HEALTH_PATH, MAX_RESPONSE_BYTES, SIGN_PATH, SignRequest},
    cert,
    config::ConfigError,
    control::{ControlId, ControlIdError},
    control_tls::ca_client_config,
    identity::SpiffeId,
};

/// Tries of one signing request while the CA answers that it is busy (`429`, `503`).
const ATTEMPTS: u32 = 3;
/// The wait before the second try; doubled for each further one, give or take a fifth.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// After an exchange that could not reach the CA, signing requests fail at once for this long
/// rather than each waiting for a connect timeout (a node enrolling many pods while the CA is
/// unreachable); the callers retry with their own backoff.
const FAIL_FAST: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path}: no PEM certificate in it")]
    NoCertificate { path: PathBuf },
    #[error("{path}: {reason}")]
    BadFile { path: PathBuf, reason: String },
    #[error("{path} is the certificate of {presented}, not of this node ({expected})")]
    WrongNode {
        path: PathBuf,
        presented: String,
        expected: String,
    },
    #[error("{path}: the token file is empty")]
    EmptyToken { path: PathBuf },
    #[error("the CA's identity: {0}")]
    Identity(#[from] ControlIdError),
    #[error("the CA client: {0}")]
    Config(#[from] ConfigError),
}

/// How the node proves who it is to the CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeCredential {
    /// The node certificate (leaf first, then intermediates) and its key, PEM.
    Certificate {
        cert_file: PathBuf,
        key_file: PathBuf,
    },
    /// A bearer token in a file (Kubernetes: the projected service-account token for the
    /// CA's audience), read again for every request.
    Token { file: PathBuf },
}

/// Where the CA is and how this node proves who it is.
#[derive(Debug, Clone)]
pub struct RemoteSignerOptions {
    /// `host:port` of the CA's API.
    pub address: String,
    pub trust_domain: String,
    /// This node's name: its node certificate must be for it.
    pub node: String,
    pub credential: NodeCredential,
    /// Roots the CA's own certificate must chain to.
    pub bundle: TrustBundle,
    /// One request, connect to answer.
    pub request_timeout: Duration,
}

/// What the node knows of the CA: the last exchange and the totals.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CaHealth {
    /// Whether the last exchange (a request or a check) reached the CA; `None` before the
    /// first one.
    pub reachable: Option<bool>,
    /// When the CA last answered.
    pub last_contact: Option<SystemTime>,
    /// Why the last failed exchange failed.
    pub last_error: Option<String>,
    /// Signing requests by outcome: issued, refused by the CA, CA unreachable or busy.
    pub issued: u64,
    pub refused: u64,
    pub unavailable: u64,
}

pub struct RemoteSigner {
    address: String,
    connector: TlsConnector,
    /// The bearer token's file, when the node authenticates with one.
    token_file: Option<PathBuf>,
    request_timeout: Duration,
    health: Mutex<CaHealth>,
    /// When the last exchange that could not reach the CA ended.
    unreached_at: Mutex<Option<tokio::time::Instant>>,
}

/// What one exchange brought back: the status and the body.
pub type Answer = (StatusCode, Bytes);

impl RemoteSigner {
    /// Loads the node certificate and key and checks they name this node, or checks the
    /// token file can be read. Nothing is sent.
    pub fn new(options: RemoteSignerOptions) -> Result<Self, RemoteError> {
        let ca = ControlId::ca(&options.trust_domain)?;
        let (node, token_file) = match &options.credential {
            NodeCredential::Certificate {
                cert_file,
                key_file,
            } => {
                let identity = load_checked_identity(
                    cert_file,
                    key_file,
                    &options.trust_domain,
                    &options.node,
                )?;
                (Some(identity), None)
            }
            NodeCredential::Token { file } => {
                read_token(file)?;
                (None, Some(file.clone()))
            }
        };
        let config = ca_client_config(options.bundle, ca, node)?;
        Ok(Self {
            address: options.address,
            connector: TlsConnector::from(config),
            token_file,
            request_timeout: options.request_timeout,
            health: Mutex::new(CaHealth::default()),
            unreached_at: Mutex::new(None),
        })
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    pub fn health(&self) -> CaHealth {
        self.health.lock().clone()
    }

    /// Asks the CA whether it is there (`GET /v1/health`), and records the answer.
    pub async fn check(&self) -> Result<(), CaError> {
        let (result, reached) = match self.exchange(Method::GET, HEALTH_PATH, Bytes::new()).await {
            Ok((StatusCode::OK, _)) => (Ok(()), true),
            Ok((status, body)) => (Err(CaError::Unavailable(answer_text(status, &body))), true),
            Err(error) => (Err(error), false),
        };
        self.record(&result, reached, false);
        result
    }

    /// One exchange with the CA, as it is: a new mutual-TLS connection, one request, the
    /// status and (at most [`MAX_RESPONSE_BYTES`] of) the body. Transport failures are
    /// [`CaError::Unavailable`].
    pub async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<Answer, CaError> {
        let unavailable = |what: &str, error: &dyn std::error::Error| {
            CaError::Unavailable(format!("{what} {}: {}", self.address, with_sources(error)))
        };
        let exchange = async {
            let token = match &self.token_file {
                Some(file) => {
                    Some(read_token(file).map_err(|e| unavailable("authenticating to", &e))?)
                }
                None => None,
            };
            let tcp = TcpStream::connect(&self.address)
                .await
                .map_err(|e| unavailable("connecting to", &e))?;
            let _ = tcp.set_nodelay(true);
            let name = ServerName::try_from("mesh-ca").map_err(|e| unavailable("naming", &e))?;
            let tls = self
                .connector
                .connect(name, tcp)
                .await
                .map_err(|e| unavailable("TLS handshake with", &e))?;
            let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| unavailable("HTTP with", &e))?;
            let driver = tokio::spawn(connection);
            let mut request = Request::builder()
                .method(method)
                .uri(path)
                .header(header::HOST, "mesh-ca")
                .header(header::CONTENT_TYPE, "application/json");
            if let Some(token) = token {
                request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
            }
            let request = request
                .body(Full::new(body))
                .map_err(|e| unavailable("building a request to", &e))?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| unavailable("sending to", &e))?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| unavailable("reading the answer of", &*e))?
                .to_bytes();
            driver.abort();
            Ok((status, body))
        };
        match timeout(self.request_timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(CaError::Unavailable(format!(
                "{} did not answer within {:?}",
                self.address, self.request_timeout
            ))),
        }
    }

    /// One signing request, and whether it reached the CA.
    async fn sign_once(
        &self,
        identity: &SpiffeId,
        subject_public_key_info: &[u8],
        lifetime: Duration,
    ) -> (Result<Vec<CertificateDer<'static>>, CaError>, bool) {
        let request = SignRequest {
            identity: identity.to_string(),
            public_key: ca_api::encode(subject_public_key_info),
            lifetime_seconds: lifetime.as_secs(),
        };
        let body = match serde_json::to_vec(&request) {
            Ok(body) => body,
            Err(e) => {
                let reason = e.to_string();
                let identity = identity.to_string();
                return (Err(CaError::Sign { identity, reason }), false);
            }
        };
        let (status, body) = match self
            .exchange(Method::POST, SIGN_PATH, Bytes::from(body))
            .await
        {
            Ok(answer) => answer,
            Err(error) => return (Err(error), false),
        };
        let result = match status {
            StatusCode::OK => parse_chain(&body),
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
                Err(CaError::Unavailable(answer_text(status, &body)))
            }
            status if status.is_server_error() => {
                Err(CaError::Unavailable(answer_text(status, &body)))
            }
            status => Err(CaError::Refused(answer_text(status, &body))),
        };
        (result, true)
    }

    /// Counts a signing request that was not sent (the CA unreachable a moment ago).
    fn record_unsent<T>(&self, result: &Result<T, CaError>) {
        let mut health = self.health.lock();
        health.unavailable += 1;
        if let Err(error) = result {
            health.last_error = Some(error.to_string());
        }
    }

    /// Records an exchange: `reached` when the CA answered at all (a refusal included).
    fn record<T>(&self, result: &Result<T, CaError>, reached: bool, signing: bool) {
        *self.unreached_at.lock() = (!reached).then(tokio::time::Instant::now);
        let mut health = self.health.lock();
        health.reachable = Some(reached);
        if reached {
            health.last_contact = Some(SystemTime::now());
        }
        match result {
            Ok(_) => {
                health.last_error = None;
                health.issued += u64::from(signing);
            }
            Err(error) => {
                health.last_error = Some(error.to_string());
                if signing {
                    match error {
                        CaError::Unavailable(_) => health.unavailable += 1,
                        _ => health.refused += 1,
                    }
                }
            }
        }
    }
}

impl Signer for RemoteSigner {
    fn sign<'a>(
        &'a self,
        identity: &'a SpiffeId,
        subject_public_key_info: &'a [u8],
        lifetime: Duration,
    ) -> SignFuture<'a> {
        Box::pin(async move {
            let unreached = *self.unreached_at.lock();
            if let Some(at) = unreached.filter(|at| at.elapsed() < FAIL_FAST) {
                let result = Err(CaError::Unavailable(format!(
                    "not tried: {} could not be reached {:.1}s ago",
                    self.address,
                    at.elapsed().as_secs_f64()
                )));
                self.record_unsent(&result);
                return result;
            }
            let mut backoff = FIRST_BACKOFF;
            let mut attempt = 1;
            loop {
                let (result, reached) = self
                    .sign_once(identity, subject_public_key_info, lifetime)
                    .await;
                self.record(&result, reached, true);
                match result {
                    // Busy, not gone: try again shortly.
                    Err(CaError::Unavailable(reason)) if reached && attempt < ATTEMPTS => {
                        tracing::debug!(%identity, %reason, "the CA is busy; trying again");
                        tokio::time::sleep(backoff.mul_f64(0.8 + fastrand::f64() * 0.4)).await;
                        backoff *= 2;
                        attempt += 1;
                    }
                    result => return result,
                }
            }
        })
    }
}

/// `the CA answered 403 Forbidden: <its error>`.
fn answer_text(status: StatusCode, body: &[u8]) -> String {
    let reason = serde_json::from_slice::<ErrorBody>(body)
        .map(|e| e.error)
        .unwrap_or_else(|_| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned());
    format!("the CA answered {status}: {reason}")
}

fn parse_chain(body: &[u8]) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let bad = |reason: String| CaError::Refused(format!("unusable answer: {reason}"));
    let response: ca_api::SignResponse =
        serde_json::from_slice(body).map_err(|e| bad(e.to_string()))?;
    response
        .chain
        .iter()
        .map(|der| {
            ca_api::decode(der)
                .map(CertificateDer::from)
                .map_err(|e| bad(e.to_string()))
        })
        .collect()
}

/// An error and its sources: the reason a CA refused a node certificate (a TLS alert) sits
/// under hyper's "connection error".
fn with_sources(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        let inner_text = inner.to_string();
        if !text.contains(&inner_text) {
            text.push_str(": ");
            text.push_str(&inner_text);
        }
        source = inner.source();
    }
    text
}

/// The node certificate and key, checked to name `node` of `trust_domain`.
fn load_checked_identity(
    cert_file: &Path,
    key_file: &Path,
    trust_domain: &str,
    node: &str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), RemoteError> {
    let bad = |reason: String| RemoteError::BadFile {
        path: cert_file.to_owned(),
        reason,
    };
    let (chain, key) = load_node_identity(cert_file, key_file)?;
    let expected = ControlId::node(trust_domain, node).map_err(|e| bad(e.to_string()))?;
    let presented = chain
        .first()
        .map(|leaf| cert::control_id_of(leaf))
        .ok_or_else(|| RemoteError::NoCertificate {
            path: cert_file.to_owned(),
        })?
        .map_err(|e| bad(e.to_string()))?;
    if presented != expected {
        return Err(RemoteError::WrongNode {
            path: cert_file.to_owned(),
            presented: presented.to_string(),
            expected: expected.to_string(),
        });
    }
    Ok((chain, key))
}

/// The token in `path`, without surrounding white space. A small file on a tmpfs the kubelet
/// writes: read synchronously.
fn read_token(path: &Path) -> Result<String, RemoteError> {
    let text = fs::read_to_string(path).map_err(|source| RemoteError::Read {
        path: path.to_owned(),
        source,
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(RemoteError::EmptyToken {
            path: path.to_owned(),
        });
    }
    Ok(token.to_owned())
}

/// A node certificate file (leaf first) and its private key.
pub(crate) fn load_node_identity(
    cert_path: &Path,
    key_path: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), RemoteError> {
    let read = |path: &Path| {
        fs::read(path).map_err(|source| RemoteError::Read {
            path: path.to_owned(),
            source,
        })
    };
    let cert_pem = read(cert_path)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| RemoteError::BadFile {
            path: cert_path.to_owned(),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(RemoteError::NoCertificate {
            path: cert_path.to_owned(),
        });
    }
    let key =
        PrivateKeyDer::from_pem_slice(&read(key_path)?).map_err(|e| RemoteError::BadFile {
            path: key_path.to_owned(),
            reason: format!("not a PEM private key: {e}"),
        })?;
    Ok((chain, key))
}
