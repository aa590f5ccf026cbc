//! The CA's API server: TLS (mutual locally; in Kubernetes the node shows a token in the
//! request instead of a certificate), then one HTTP/1.1 request per connection, authenticated
//! before anything else is looked at (the wire format is [`crate::tls::ca_api`]).
//!
//! Nothing a client sends can take it down or starve another node. Connections in total are
//! capped (the rest wait in the kernel's backlog); TLS handshakes in flight are capped in total
//! and per peer address and must finish within a timeout, so garbage, a slow client or a
//! handshake flood hold a slot for seconds at most. Request headers and bodies are size-capped
//! and must arrive within a timeout. After authentication each node has its own token bucket
//! of requests: a node flooding the CA is answered `429` cheaply, before its body is read,
//! while other nodes keep their own rate.

use std::{convert::Infallible, net::SocketAddr, num::NonZeroU32, sync::Arc, time::Duration};

use bytes::Bytes;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Semaphore,
    time::timeout,
};
use tokio_rustls::TlsAcceptor;

use super::{
    auth::{AuthError, Caller, NodeAuthenticator},
    placement::Placement,
};
use crate::tls::{
    HandshakeLimits, HandshakePermit, LocalCa, SpiffeId,
    ca_api::{
        self, ErrorBody, HEALTH_PATH, MAX_REQUEST_BYTES, SIGN_PATH, SignRequest, SignResponse,
    },
    cert_info,
};

/// The CA's limits and timeouts.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Longest workload certificate the CA signs (a request for more gets this).
    pub max_lifetime: Duration,
    /// Signing requests per second per node, and the burst above it.
    pub per_node_rate: NonZeroU32,
    pub per_node_burst: NonZeroU32,
    pub max_connections: usize,
    pub max_handshakes: usize,
    pub max_handshakes_per_peer: usize,
    /// TLS handshake.
    pub handshake_timeout: Duration,
    /// Request headers and body, from the end of the handshake.
    pub request_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_lifetime: Duration::from_secs(24 * 3600),
            per_node_rate: NonZeroU32::new(20).unwrap_or(NonZeroU32::MIN),
            per_node_burst: NonZeroU32::new(50).unwrap_or(NonZeroU32::MIN),
            max_connections: 1024,
            max_handshakes: 64,
            max_handshakes_per_peer: 8,
            handshake_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
        }
    }
}

/// What a request needs: who signs, who may have what, who is asking.
pub struct Authority {
    pub signer: LocalCa,
    pub trust_domain: String,
    pub placement: Arc<dyn Placement>,
    pub authenticator: Arc<dyn NodeAuthenticator>,
    pub limits: Limits,
}

/// Serves the API on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, authority: Arc<Authority>, acceptor: TlsAcceptor) {
    let limits = &authority.limits;
    let connections = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let handshakes = HandshakeLimits::new(limits.max_handshakes, limits.max_handshakes_per_peer);
    // One bucket per node that authenticated: as many as there are node certificates.
    let per_node: Arc<DefaultKeyedRateLimiter<String>> = Arc::new(RateLimiter::dashmap(
        Quota::per_second(limits.per_node_rate).allow_burst(limits.per_node_burst),
    ));
    loop {
        let Ok(slot) = connections.clone().acquire_owned().await else {
            return;
        };
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of descriptors and the like: back off rather than spin.
                tracing::warn!(%error, "accepting a CA connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(handshake) = handshakes.try_acquire(peer.ip()) else {
            tracing::debug!(%peer, "too many TLS handshakes in flight: connection closed");
            continue;
        };
        let (authority, acceptor, per_node) =
            (authority.clone(), acceptor.clone(), per_node.clone());
        tokio::spawn(async move {
            connection(&authority, &acceptor, &per_node, tcp, peer, handshake).await;
            drop(slot);
        });
    }
}

async fn connection(
    authority: &Arc<Authority>,
    acceptor: &TlsAcceptor,
    per_node: &Arc<DefaultKeyedRateLimiter<String>>,
    tcp: TcpStream,
    peer: SocketAddr,
    handshake: HandshakePermit,
) {
    let limits = &authority.limits;
    let tls = match timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) if error.kind() == std::io::ErrorKind::UnexpectedEof => {
            // Closed before the handshake ended: a TCP probe (the Deployment's), or a client
            // that gave up. Nothing was refused.
            tracing::debug!(%peer, "a connection to the CA closed during the handshake");
            return;
        }
        Ok(Err(error)) => {
            let reason = error
                .get_ref()
                .map_or_else(|| error.to_string(), ToString::to_string);
            tracing::info!(%peer, %reason, "refused a connection to the CA");
            return;
        }
        Err(_) => {
            tracing::info!(%peer, "refused a connection to the CA: the TLS handshake timed out");
            return;
        }
    };
    drop(handshake);
    // The verified client certificate, if any (local mode requires one; in Kubernetes the
    // requests carry a token instead). Authentication is per request: one per connection.
    let certificate = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|leaf| leaf.clone().into_owned());
    let service = {
        let (authority, per_node) = (authority.clone(), per_node.clone());
        service_fn(move |request| {
            let (authority, per_node, certificate) =
                (authority.clone(), per_node.clone(), certificate.clone());
            async move {
                let caller = Caller {
                    certificate: certificate.as_ref(),
                    headers: request.headers(),
                };
                let node = match authority.authenticator.authenticate(caller).await {
                    Ok(node) => node,
                    Err(error) => return Ok::<_, Infallible>(unauthenticated(peer, &error)),
                };
                Ok(handle(&authority, &per_node, &node, peer, request).await)
            }
        })
    };
    let serving = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.request_timeout)
        .max_buf_size(MAX_REQUEST_BYTES)
        .keep_alive(false)
        .serve_connection(TokioIo::new(tls), service);
    // Headers and body within the request timeout; the answer is quick: twice bounds it all.
    if timeout(limits.request_timeout * 2, serving).await.is_err() {
        tracing::info!(%peer, "closed a CA connection: the request took too long");
    }
}

/// `401`, or `503` when the credential could not be checked now (the node tries again).
fn unauthenticated(peer: SocketAddr, reason: &AuthError) -> Response<Full<Bytes>> {
    tracing::info!(%peer, %reason, "refused a request to the CA");
    match reason {
        AuthError::Unavailable(_) => busy(StatusCode::SERVICE_UNAVAILABLE, &reason.to_string()),
        _ => error(StatusCode::UNAUTHORIZED, &reason.to_string()),
    }
}

async fn handle(
    authority: &Authority,
    per_node: &DefaultKeyedRateLimiter<String>,
    node: &str,
    peer: SocketAddr,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    match (request.method(), request.uri().path()) {
        (&Method::GET, HEALTH_PATH) => json(StatusCode::OK, &serde_json::json!({"ok": true})),
        (&Method::POST, SIGN_PATH) => {
            if per_node.check_key(&node.to_owned()).is_err() {
                tracing::debug!(node, %peer, "signing request over the node's rate");
                return busy(StatusCode::TOO_MANY_REQUESTS, "over this node's rate");
            }
            match sign(authority, node, request).await {
                Ok(response) => response,
                Err((status, reason)) => {
                    tracing::warn!(node, %peer, %status, %reason, "refused a signing request");
                    error(status, &reason)
                }
            }
        }
        (_, HEALTH_PATH | SIGN_PATH) => error(StatusCode::METHOD_NOT_ALLOWED, "wrong method"),
        _ => error(StatusCode::NOT_FOUND, "no such path"),
    }
}

type Refusal = (StatusCode, String);

async fn sign(
    authority: &Authority,
    node: &str,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Refusal> {
    let bad = |reason: String| (StatusCode::BAD_REQUEST, reason);
    let too_large = || {
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request is over {MAX_REQUEST_BYTES} bytes"),
        )
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_REQUEST_BYTES as u64) {
        return Err(too_large());
    }
    let body = timeout(
        authority.limits.request_timeout,
        Limited::new(request.into_body(), MAX_REQUEST_BYTES).collect(),
    )
    .await
    .map_err(|_| {
        (
            StatusCode::REQUEST_TIMEOUT,
            "the body took too long".to_owned(),
        )
    })?
    .map_err(|e| {
        if e.is::<LengthLimitError>() {
            too_large()
        } else {
            bad(format!("reading the body: {e}"))
        }
    })?
    .to_bytes();
    let request: SignRequest =
        serde_json::from_slice(&body).map_err(|e| bad(format!("not a signing request: {e}")))?;
    let identity = SpiffeId::parse(&request.identity).map_err(|e| bad(e.to_string()))?;
    let forbidden = |reason: String| (StatusCode::FORBIDDEN, reason);
    if identity.trust_domain() != authority.trust_domain {
        return Err(forbidden(format!(
            "{identity} is not of this CA's trust domain {}",
            authority.trust_domain
        )));
    }
    match authority.placement.placed(node, &identity) {
        Ok(true) => {}
        Ok(false) => {
            return Err(forbidden(format!(
                "no pod running as {identity} is placed on node {node}"
            )));
        }
        Err(not_yet) => return Err((StatusCode::SERVICE_UNAVAILABLE, not_yet.to_string())),
    }
    let public_key = ca_api::decode(&request.public_key)
        .map_err(|e| bad(format!("publicKey is not base64: {e}")))?;
    if request.lifetime_seconds == 0 {
        return Err(bad("lifetimeSeconds must be at least 1".into()));
    }
    let lifetime = Duration::from_secs(request.lifetime_seconds).min(authority.limits.max_lifetime);
    let chain = authority
        .signer
        .sign_now(&identity, &public_key, lifetime)
        .map_err(|e| bad(e.to_string()))?;
    if let Some(info) = chain.first().and_then(|leaf| cert_info(leaf).ok()) {
        tracing::info!(node, %identity, serial = %info.serial, ?lifetime, "issued a certificate");
    }
    let chain = chain.iter().map(|der| ca_api::encode(der)).collect();
    Ok(json(StatusCode::OK, &SignResponse { chain }))
}

fn json(status: StatusCode, body: &impl Serialize) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(bytes)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

/// An answer the node retries after a second.
fn busy(status: StatusCode, reason: &str) -> Response<Full<Bytes>> {
    let mut response = error(status, reason);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    response
}

fn error(status: StatusCode, reason: &str) -> Response<Full<Bytes>> {
    json(
        status,
        &ErrorBody {
            error: reason.to_owned(),
        },
    )
}
