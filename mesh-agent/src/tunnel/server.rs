//! The receiving end of tunnels: one [`Server`] per local pod, on a listener the agent opened
//! inside the pod's network namespace, presenting the pod's identity.
//!
//! Every refusal by the server itself (handshake, malformed CONNECT) is one `info` log line
//! with the peer and the reason; what the handler decides, it reports. Nothing a peer sends
//! can panic a task. Memory is bounded by: the connection limit, the handshake limits (global and
//! per peer address, shareable across all servers of the node) with a timeout covering TLS and
//! the HTTP/2 preface, h2's header-list and concurrent-stream limits, and flow-control
//! windows (a slow upstream stops the client after one window).

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use h2::{RecvStream, server::SendResponse};
use http::{Request, Response, StatusCode};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Semaphore,
    task::JoinHandle,
    time::{Instant, timeout, timeout_at},
};
use tokio_rustls::TlsAcceptor;

use super::{
    connect::{forwarded_for, parse_connect},
    read_ahead::ReadAhead,
    stream::TunnelStream,
};
use crate::{
    metrics::TunnelMetrics,
    tls::{
        ALPN_H2, CertStore, ConfigError, HandshakeLimits, HandshakePermit, SpiffeId, peer_identity,
        server_config,
    },
};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("tunnel server: {0}")]
    Config(#[from] ConfigError),
}

/// A stream the server accepted: who asked, for what, from where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    /// The client's verified SPIFFE identity.
    pub client_identity: SpiffeId,
    /// The identity this server presents (the destination pod's).
    pub server_identity: SpiffeId,
    /// The validated `:authority`.
    pub authority: SocketAddr,
    /// The TCP peer of the tunnel connection (the source node or pod).
    pub peer_addr: SocketAddr,
    /// The client pod's address the stream claims (`Forwarded: for=`), not verified: the
    /// handler decides whether to believe it.
    pub forwarded_for: Option<SocketAddr>,
}

/// Why a handler will not connect a stream; becomes the response status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Policy, or a target that is not this pod: 403.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// The upstream could not be reached: 502.
    #[error("upstream unreachable: {0}")]
    Unreachable(String),
    /// The node is overloaded (rate limit): 503.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

impl Refusal {
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::Forbidden(_) => StatusCode::FORBIDDEN,
            Refusal::Unreachable(_) => StatusCode::BAD_GATEWAY,
            Refusal::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// Serves one accepted stream: decides, connects, answers with [`PendingStream::accept`] or
/// [`PendingStream::refuse`], and copies. Implemented for any
/// `Fn(ConnectRequest, PendingStream) -> impl Future<Output = ()>`; [`Forward`] adapts a plain
/// "connect to the upstream" function.
pub trait StreamHandler: Send + Sync + 'static {
    fn handle(
        &self,
        request: ConnectRequest,
        stream: PendingStream,
    ) -> impl Future<Output = ()> + Send;
}

impl<F, Fut> StreamHandler for F
where
    F: Fn(ConnectRequest, PendingStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    fn handle(
        &self,
        request: ConnectRequest,
        stream: PendingStream,
    ) -> impl Future<Output = ()> + Send {
        self(request, stream)
    }
}

/// A CONNECT stream not answered yet: the handler accepts it once its upstream is connected
/// (`200`), or refuses it (`403`, `502`, `503`...). Dropped unanswered, the stream is reset.
pub struct PendingStream {
    respond: SendResponse<Bytes>,
    body: RecvStream,
    buffer_bytes: usize,
}

impl PendingStream {
    /// Answers `200` and gives the stream as I/O.
    pub fn accept(mut self) -> Result<TunnelStream, h2::Error> {
        let response = Response::new(());
        let send = self.respond.send_response(response, false)?;
        Ok(TunnelStream::new(self.body, send, self.buffer_bytes, None))
    }

    /// Answers with the refusal's status and ends the stream.
    pub fn refuse(mut self, refusal: &Refusal) {
        refuse(&mut self.respond, refusal.status());
    }
}

/// A [`StreamHandler`] that connects each stream with `connect` (a refusal becomes the
/// response status) and copies: for tests, benchmarks and simple servers. The agent's own
/// handler is its connection pipeline.
pub struct Forward<F> {
    connect: F,
    options: ForwardOptions,
}

#[derive(Clone, Debug)]
pub struct ForwardOptions {
    pub connect_timeout: Duration,
    pub buffer_bytes: usize,
    pub idle_timeout: Duration,
}

impl Default for ForwardOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            buffer_bytes: 64 * 1024,
            idle_timeout: Duration::from_secs(3600),
        }
    }
}

impl<F> Forward<F> {
    pub fn new(connect: F) -> Self {
        Self {
            connect,
            options: ForwardOptions::default(),
        }
    }
}

impl<F, Fut> StreamHandler for Forward<F>
where
    F: Fn(ConnectRequest) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<TcpStream, Refusal>> + Send,
{
    async fn handle(&self, request: ConnectRequest, stream: PendingStream) {
        let options = &self.options;
        let upstream = match timeout(options.connect_timeout, (self.connect)(request)).await {
            Ok(Ok(upstream)) => upstream,
            Ok(Err(refusal)) => return stream.refuse(&refusal),
            Err(_) => return stream.refuse(&Refusal::Unreachable("connect timed out".into())),
        };
        let Ok(tunnel) = stream.accept() else {
            return;
        };
        let moved = crate::copy::Transferred::default();
        let _ = crate::copy::halves(
            tunnel.into_split(),
            upstream.into_split(),
            options.buffer_bytes,
            options.idle_timeout,
            &moved,
            (&(), &()),
        )
        .await;
    }
}

#[derive(Clone)]
pub struct ServerOptions {
    /// TLS handshake plus HTTP/2 preface and SETTINGS.
    pub handshake_timeout: Duration,
    pub handshakes: HandshakeLimits,
    /// Established tunnel connections of this server.
    pub max_connections: usize,
    /// Streams per connection (h2 SETTINGS_MAX_CONCURRENT_STREAMS).
    pub max_concurrent_streams: u32,
    /// Larger header blocks are refused (h2 answers 431 or resets the stream).
    pub max_header_list_size: u32,
    /// Receive window per stream, and per connection (the bound on buffered data).
    pub stream_window: u32,
    pub connection_window: u32,
    /// The most queued for sending per stream, and the largest single write.
    pub buffer_bytes: usize,
    /// Handshakes, open tunnels and streams, counted as they happen.
    pub metrics: TunnelMetrics,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            handshakes: HandshakeLimits::default(),
            max_connections: 1024,
            max_concurrent_streams: 256,
            max_header_list_size: 8 * 1024,
            // 1 MiB per stream, 4 MiB per connection: +25% single-stream bulk over 256 KiB / 1 MiB
            // in `cargo xtask bench --quick` (3.1 -> 3.9 Gbit/s), bounding what a slow reader
            // leaves buffered per tunnel connection at 4 MiB.
            stream_window: 1024 * 1024,
            connection_window: 4 * 1024 * 1024,
            buffer_bytes: 64 * 1024,
            metrics: TunnelMetrics::unregistered(),
        }
    }
}

/// A tunnel server for one identity. Cheap to clone.
pub struct Server<H> {
    shared: Arc<Shared<H>>,
}

impl<H> Clone for Server<H> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

struct Shared<H> {
    acceptor: TlsAcceptor,
    identity: SpiffeId,
    handler: H,
    options: ServerOptions,
    connections: Arc<Semaphore>,
}

impl<H: StreamHandler> Server<H> {
    /// `identity` must already be in the store ([`CertStore::ensure`]); the server presents
    /// its current certificate at each handshake, so rotations need nothing from the caller.
    pub fn new(
        store: &Arc<CertStore>,
        identity: SpiffeId,
        handler: H,
        options: ServerOptions,
    ) -> Result<Self, ServerError> {
        let config = server_config(store, &identity)?;
        let connections = Arc::new(Semaphore::new(options.max_connections.max(1)));
        Ok(Self {
            shared: Arc::new(Shared {
                acceptor: TlsAcceptor::from(config),
                identity,
                handler,
                options,
                connections,
            }),
        })
    }

    /// Serves `listener` until the task is aborted. Aborting stops accepting; established
    /// connections (their own tasks) go on until they end.
    pub async fn serve(self, listener: TcpListener) {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    // EMFILE and friends: back off rather than spin.
                    tracing::warn!(identity = %self.shared.identity, %error, "tunnel accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = self.shared.connections.clone().try_acquire_owned() else {
                tracing::info!(%peer, identity = %self.shared.identity, "tunnel connection refused: connection limit reached");
                continue;
            };
            let Some(handshake) = self.shared.options.handshakes.try_acquire(peer.ip()) else {
                tracing::info!(%peer, identity = %self.shared.identity, "tunnel connection refused: too many concurrent handshakes");
                continue;
            };
            let shared = self.shared.clone();
            tokio::spawn(async move {
                connection(shared, tcp, peer, handshake).await;
                drop(permit);
            });
        }
    }

    /// [`Server::serve`] on its own task.
    pub fn spawn(self, listener: TcpListener) -> JoinHandle<()> {
        tokio::spawn(self.serve(listener))
    }
}

async fn connection<H: StreamHandler>(
    shared: Arc<Shared<H>>,
    tcp: TcpStream,
    peer: SocketAddr,
    handshake: HandshakePermit,
) {
    let identity = &shared.identity;
    let _ = tcp.set_nodelay(true);
    let counted = shared.options.metrics.handshake();
    let deadline = Instant::now() + shared.options.handshake_timeout;
    let tls = match timeout_at(deadline, shared.acceptor.accept(ReadAhead::new(tcp))).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            tracing::info!(%peer, %identity, reason = %super::tls_reason(&error), "tunnel handshake refused");
            return;
        }
        Err(_) => {
            tracing::info!(%peer, %identity, reason = "timed out", "tunnel handshake refused");
            return;
        }
    };
    let (_, session) = tls.get_ref();
    if session.alpn_protocol() != Some(ALPN_H2) {
        tracing::info!(%peer, %identity, reason = "client did not negotiate ALPN h2", "tunnel handshake refused");
        return;
    }
    let client_identity = match peer_identity(session) {
        Ok(client) => client,
        Err(error) => {
            tracing::info!(%peer, %identity, reason = %error, "tunnel handshake refused");
            return;
        }
    };
    let options = &shared.options;
    let mut builder = h2::server::Builder::new();
    builder
        .max_concurrent_streams(options.max_concurrent_streams)
        .max_header_list_size(options.max_header_list_size)
        .initial_window_size(options.stream_window)
        .initial_connection_window_size(options.connection_window)
        .max_frame_size(super::MAX_FRAME_BYTES)
        .max_send_buffer_size(options.buffer_bytes);
    let mut h2 = match timeout_at(deadline, builder.handshake::<_, Bytes>(tls)).await {
        Ok(Ok(h2)) => h2,
        Ok(Err(error)) => {
            tracing::info!(%peer, %identity, client = %client_identity, reason = %error, "tunnel HTTP/2 handshake refused");
            return;
        }
        Err(_) => {
            tracing::info!(%peer, %identity, client = %client_identity, reason = "HTTP/2 preface timed out", "tunnel HTTP/2 handshake refused");
            return;
        }
    };
    drop(handshake);
    counted.succeeded();
    let _open = TunnelMetrics::hold(&options.metrics.connections);
    tracing::debug!(%peer, %identity, client = %client_identity, "tunnel connection established");
    // Accepting also drives the connection; stream tasks run beside it.
    while let Some(accepted) = h2.accept().await {
        match accepted {
            Ok((request, respond)) => {
                let shared = shared.clone();
                let client_identity = client_identity.clone();
                tokio::spawn(async move {
                    stream(shared, request, respond, client_identity, peer).await;
                });
            }
            Err(error) => {
                if !error.is_go_away() && !error.is_io() {
                    tracing::info!(%peer, %identity, client = %client_identity, %error, "tunnel connection ended by protocol error");
                }
                break;
            }
        }
    }
}

async fn stream<H: StreamHandler>(
    shared: Arc<Shared<H>>,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    client_identity: SpiffeId,
    peer: SocketAddr,
) {
    let identity = &shared.identity;
    let (parts, body) = request.into_parts();
    // The request's head in a block of its own: a binding still in scope at the `.await`
    // below would be kept in this future for the stream's whole life.
    let request = {
        let head = Request::from_parts(parts, ());
        let authority = match parse_connect(&head) {
            Ok(authority) => authority,
            Err(error) => {
                tracing::info!(%peer, %identity, client = %client_identity, reason = %error, "tunnel stream refused: 400");
                refuse(&mut respond, StatusCode::BAD_REQUEST);
                return;
            }
        };
        ConnectRequest {
            client_identity,
            server_identity: identity.clone(),
            authority,
            peer_addr: peer,
            forwarded_for: forwarded_for(&head),
        }
    };
    let pending = PendingStream {
        respond,
        body,
        buffer_bytes: shared.options.buffer_bytes,
    };
    // The handler runs the stream to its end.
    let _open = TunnelMetrics::hold(&shared.options.metrics.streams);
    shared.handler.handle(request, pending).await;
}

fn refuse(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    if let Ok(response) = Response::builder().status(status).body(()) {
        let _ = respond.send_response(response, true);
    }
}
