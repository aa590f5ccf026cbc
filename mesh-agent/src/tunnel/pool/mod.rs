//! The sending end: a pool of tunnel connections keyed by (source identity, expected server
//! identity, tunnel address), each an HTTP/2 connection carrying many CONNECT streams.
//!
//! The expected server identity is part of the key, not only the address: a connection is
//! verified for exactly one server identity, and must not be reused for a caller that expects
//! another one at the same address.
//!
//! A key holds up to `connections_per_peer` connections and each new stream goes on the one
//! carrying the fewest: one HTTP/2 connection is driven by one task, so all its streams' TLS
//! and framing run on one core at a time, and 8 streams on one connection moved less than one
//! stream alone. Another connection is opened only when every connection there is already
//! carries a stream (a single stream, or one stream at a time, keeps one connection), by the
//! stream that asks for it and outside the key's lock, so the streams arriving meanwhile go on
//! the connections there are; if it fails, that stream goes on one of them too.
//!
//! The first connection of a key is made under the key's async lock (held over the
//! handshake), so a burst of streams shares it instead of racing to open many. Beyond
//! `connections_per_peer`, a key opens another connection only when the streams outgrow what
//! the server allows on each (its `SETTINGS_MAX_CONCURRENT_STREAMS`): the next connection is
//! opened then, not queued. Those extra connections close soon after their last stream; a
//! key's oldest stays for the idle timeout (see `drive`).

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use h2::{Reason, client::SendRequest};
use http::StatusCode;
use parking_lot::Mutex;
use rustls::pki_types::ServerName;
use tokio::{net::TcpStream, time::Instant};
use tokio_rustls::TlsConnector;

mod drive;
#[cfg(test)]
mod tests;

use drive::drive;

use super::{
    connect::{StreamTarget, connect_request},
    read_ahead::ReadAhead,
    stream::TunnelStream,
};
use crate::{
    metrics::{GaugeGuard, TunnelMetrics},
    tls::{CertStore, ConfigError, SpiffeId, client_config},
};

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("creating the tunnel socket to {addr}: {source}")]
    Socket { addr: SocketAddr, source: io::Error },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("TLS handshake with {addr}: {reason}")]
    Tls { addr: SocketAddr, reason: String },
    #[error("{addr} did not negotiate ALPN h2")]
    Alpn { addr: SocketAddr },
    #[error("HTTP/2 handshake with {addr}: {source}")]
    Handshake { addr: SocketAddr, source: h2::Error },
    #[error("opening a tunnel stream via {addr}: {source}")]
    Stream { addr: SocketAddr, source: h2::Error },
    #[error("the tunnel at {addr} refused {authority}: {status}")]
    Refused {
        addr: SocketAddr,
        authority: SocketAddr,
        status: StatusCode,
    },
    #[error("{what} via {addr} timed out after {after:?}")]
    Timeout {
        what: &'static str,
        addr: SocketAddr,
        after: Duration,
    },
    #[error("building the CONNECT request: {0}")]
    Request(#[from] http::Error),
}

#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// Socket, TLS and HTTP/2 handshake of a new connection, together.
    pub connect_timeout: Duration,
    /// Opening one stream (until the server's response).
    pub stream_timeout: Duration,
    /// A key's oldest connection without streams for this long is closed (the others
    /// sooner: `drive::SURPLUS_IDLE`).
    pub idle_timeout: Duration,
    pub stream_window: u32,
    pub connection_window: u32,
    /// The most queued for sending per stream, and the largest single write.
    pub buffer_bytes: usize,
    pub max_header_list_size: u32,
    /// Connections per key that streams are spread over (at least 1).
    pub connections_per_peer: usize,
    /// Handshakes, open tunnels and streams, counted as they happen.
    pub metrics: TunnelMetrics,
}

/// The default `connections_per_peer`: one per core the runtime's worker threads can use,
/// at most 8 (each costs a handshake and its buffers, and is opened only under concurrency).
pub fn default_connections_per_peer() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
}

impl Default for PoolOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            stream_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            // 1 MiB per stream, 4 MiB per connection: +25% single-stream bulk over 256 KiB / 1 MiB
            // in `cargo xtask bench --quick` (3.1 -> 3.9 Gbit/s), bounding what a slow reader
            // leaves buffered per tunnel connection at 4 MiB.
            stream_window: 1024 * 1024,
            connection_window: 4 * 1024 * 1024,
            buffer_bytes: 64 * 1024,
            max_header_list_size: 8 * 1024,
            connections_per_peer: default_connections_per_peer(),
            metrics: TunnelMetrics::unregistered(),
        }
    }
}

type Key = (SpiffeId, SpiffeId, SocketAddr);
type Slot = Arc<tokio::sync::Mutex<Conns>>;

/// The connections of one key, oldest first.
#[derive(Default)]
struct Conns {
    list: Vec<Conn>,
    /// A stream is opening another connection outside the lock: no second one meanwhile.
    /// Set under the lock; cleared by the [`Growing`] guard, also when that stream is
    /// dropped (cancelled) before its connection is made.
    growing: Arc<AtomicBool>,
}

/// Clears `Conns::growing` when dropped.
struct Growing(Arc<AtomicBool>);

impl Drop for Growing {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Where a stream goes, decided under the key's lock.
enum Choice<S> {
    /// On this connection; `fresh` when it was opened for this stream.
    Use { conn: Conn, fresh: bool },
    /// Open another connection (outside the lock); if that fails, go on `fallback`.
    Grow {
        fallback: Conn,
        socket: S,
        growing: Growing,
    },
}

#[derive(Clone)]
struct Conn {
    id: u64,
    send: SendRequest<Bytes>,
    state: Arc<ConnState>,
}

struct ConnState {
    /// Streams open (either half alive).
    active: AtomicUsize,
    /// When the last stream ended, in milliseconds since the pool's epoch.
    last_used_ms: AtomicU64,
    closed: AtomicBool,
    epoch: Instant,
}

impl ConnState {
    fn touch(&self) {
        self.last_used_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn last_used(&self) -> Instant {
        self.epoch + Duration::from_millis(self.last_used_ms.load(Ordering::Relaxed))
    }
}

/// Held by both halves of a stream: counts it as active on its connection (and in the
/// streams gauge).
struct StreamGuard {
    state: Arc<ConnState>,
    _counted: GaugeGuard,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.state.touch();
        self.state.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Tunnel connections shared by all outbound connections of the node. Cheap to clone.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<CertStore>,
    options: PoolOptions,
    slots: Mutex<HashMap<Key, Slot>>,
    next_id: AtomicU64,
    opened: AtomicU64,
    live: AtomicUsize,
    epoch: Instant,
}

enum OpenError {
    /// The connection could not carry the stream (closing, GOAWAY), and the server did not
    /// take it: another connection may.
    Connection(h2::Error),
    Pool(PoolError),
}

/// A new connection's first bytes, sent right behind the stream's CONNECT instead of after
/// the server's response: the destination's agent has them when its connect to the app
/// succeeds, one crossing between the nodes fewer for a client that speaks first (a request,
/// a TLS ClientHello). The server holds them until it has connected, and drops them with any
/// refusal.
///
/// Once sent, a failure without an answer (the connection broke, the stream timed out) may
/// have come after the server passed them on to the app: [`Early::may_have_arrived`] tells
/// the caller not to send them again elsewhere.
#[derive(Debug, Default)]
pub struct Early {
    bytes: Bytes,
    sent: AtomicBool,
}

impl Early {
    pub fn new(bytes: Bytes) -> Self {
        Self {
            bytes,
            sent: AtomicBool::new(false),
        }
    }

    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The bytes went out on a stream that then failed without the server's answer.
    pub fn may_have_arrived(&self) -> bool {
        self.sent.load(Ordering::Acquire)
    }

    fn mark(&self, sent: bool) {
        self.sent.store(sent, Ordering::Release);
    }
}

impl Pool {
    pub fn new(store: Arc<CertStore>, options: PoolOptions) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                options,
                slots: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(0),
                opened: AtomicU64::new(0),
                live: AtomicUsize::new(0),
                epoch: Instant::now(),
            }),
        }
    }

    /// Opens a stream from `source` to `target` (an authority, and the client pod's address it
    /// carries, if any) through the tunnel server at `tunnel_addr`, which must present
    /// `expected_server`. Reuses a pooled connection when
    /// there is a live one; otherwise calls `socket(tunnel_addr)` for a connected TCP socket
    /// (the caller makes it in the right network namespace, with its mark) and handshakes.
    /// `socket` is called at most once. `early` goes right behind the request.
    pub async fn connect<S, F>(
        &self,
        source: &SpiffeId,
        expected_server: &SpiffeId,
        tunnel_addr: SocketAddr,
        target: impl Into<StreamTarget>,
        early: &Early,
        socket: S,
    ) -> Result<TunnelStream, PoolError>
    where
        S: FnOnce(SocketAddr) -> F,
        F: Future<Output = io::Result<TcpStream>>,
    {
        let target = target.into();
        let key: Key = (source.clone(), expected_server.clone(), tunnel_addr);
        let slot = self.slot(&key);
        let mut socket = Some(socket);
        loop {
            let choice = {
                let mut current = slot.lock().await;
                current
                    .list
                    .retain(|conn| !conn.state.closed.load(Ordering::Acquire));
                // The connection with the fewest streams among those with room for one more.
                let least = current
                    .list
                    .iter()
                    .filter(|conn| {
                        conn.state.active.load(Ordering::Acquire)
                            < conn.send.current_max_send_streams()
                    })
                    .min_by_key(|conn| conn.state.active.load(Ordering::Acquire))
                    .cloned();
                let grow = !current.growing.load(Ordering::Acquire)
                    && current.list.len() < self.inner.options.connections_per_peer
                    && least
                        .as_ref()
                        .is_some_and(|conn| conn.state.active.load(Ordering::Acquire) > 0);
                match (least, socket.take()) {
                    (Some(fallback), Some(make_socket)) if grow => {
                        current.growing.store(true, Ordering::Release);
                        Choice::Grow {
                            fallback,
                            socket: make_socket,
                            growing: Growing(current.growing.clone()),
                        }
                    }
                    (Some(conn), socket_back) => {
                        socket = socket_back;
                        // Counted under the slot lock, so the idle closer never sees 0 for a
                        // connection a stream is about to use.
                        conn.state.active.fetch_add(1, Ordering::AcqRel);
                        Choice::Use { conn, fresh: false }
                    }
                    (None, Some(make_socket)) => {
                        let opened = self.open_within(&key, &slot, make_socket).await?;
                        current.list.push(opened.clone());
                        opened.state.active.fetch_add(1, Ordering::AcqRel);
                        Choice::Use {
                            conn: opened,
                            fresh: true,
                        }
                    }
                    // Unreachable in practice: only a failed reuse loops, and it leaves the
                    // socket factory unused.
                    (None, None) => {
                        return Err(PoolError::Stream {
                            addr: tunnel_addr,
                            source: h2::Error::from(Reason::REFUSED_STREAM),
                        });
                    }
                }
            };
            let (conn, fresh) = match choice {
                Choice::Use { conn, fresh } => (conn, fresh),
                Choice::Grow {
                    fallback,
                    socket: make_socket,
                    growing,
                } => {
                    let opened = self.open_within(&key, &slot, make_socket).await;
                    let mut current = slot.lock().await;
                    drop(growing);
                    match opened {
                        Ok(opened) => {
                            current.list.push(opened.clone());
                            opened.state.active.fetch_add(1, Ordering::AcqRel);
                            (opened, true)
                        }
                        Err(error)
                            if !fallback.state.closed.load(Ordering::Acquire)
                                && fallback.state.active.load(Ordering::Acquire)
                                    < fallback.send.current_max_send_streams() =>
                        {
                            tracing::debug!(%tunnel_addr, %error, "another tunnel connection failed; using an open one");
                            fallback.state.active.fetch_add(1, Ordering::AcqRel);
                            (fallback, false)
                        }
                        Err(error) => return Err(error),
                    }
                }
            };
            let guard = StreamGuard {
                state: conn.state.clone(),
                _counted: TunnelMetrics::hold(&self.inner.options.metrics.streams),
            };
            match self
                .open_stream(&conn, tunnel_addr, target, early, guard)
                .await
            {
                Ok(stream) => return Ok(stream),
                Err(OpenError::Connection(error)) if !fresh && socket.is_some() => {
                    // A pooled connection that went away under us: retire it, try a new one.
                    tracing::debug!(%tunnel_addr, %error, "pooled tunnel connection unusable; reconnecting");
                    conn.state.closed.store(true, Ordering::Release);
                }
                Err(OpenError::Connection(source)) => {
                    conn.state.closed.store(true, Ordering::Release);
                    return Err(PoolError::Stream {
                        addr: tunnel_addr,
                        source,
                    });
                }
                Err(OpenError::Pool(error)) => return Err(error),
            }
        }
    }

    /// Tunnel connections currently open.
    pub fn live_connections(&self) -> usize {
        self.inner.live.load(Ordering::Relaxed)
    }

    /// Tunnel connections opened since the pool was made.
    pub fn opened_connections(&self) -> u64 {
        self.inner.opened.load(Ordering::Relaxed)
    }

    /// [`Pool::open`] within the connect timeout.
    async fn open_within<S, F>(&self, key: &Key, slot: &Slot, socket: S) -> Result<Conn, PoolError>
    where
        S: FnOnce(SocketAddr) -> F,
        F: Future<Output = io::Result<TcpStream>>,
    {
        let after = self.inner.options.connect_timeout;
        tokio::time::timeout(after, self.open(key, slot.clone(), socket))
            .await
            .map_err(|_| PoolError::Timeout {
                what: "tunnel connection",
                addr: key.2,
                after,
            })?
    }

    fn slot(&self, key: &Key) -> Slot {
        self.inner
            .slots
            .lock()
            .entry(key.clone())
            .or_default()
            .clone()
    }

    async fn open<S, F>(&self, key: &Key, slot: Slot, socket: S) -> Result<Conn, PoolError>
    where
        S: FnOnce(SocketAddr) -> F,
        F: Future<Output = io::Result<TcpStream>>,
    {
        let (source, expected, addr) = key;
        let addr = *addr;
        let options = &self.inner.options;
        let config = client_config(&self.inner.store, source, expected)?;
        let tcp = socket(addr)
            .await
            .map_err(|source| PoolError::Socket { addr, source })?;
        let _ = tcp.set_nodelay(true);
        let handshake = options.metrics.handshake();
        // The name is not checked (the verifier checks the SPIFFE identity) and, being an IP,
        // is not sent as SNI.
        let tls = TlsConnector::from(config)
            .connect(ServerName::IpAddress(addr.ip().into()), ReadAhead::new(tcp))
            .await
            .map_err(|error| PoolError::Tls {
                addr,
                reason: super::tls_reason(&error),
            })?;
        if tls.get_ref().1.alpn_protocol() != Some(crate::tls::ALPN_H2) {
            return Err(PoolError::Alpn { addr });
        }
        let (send, connection) = h2::client::Builder::new()
            .enable_push(false)
            .initial_window_size(options.stream_window)
            .initial_connection_window_size(options.connection_window)
            .max_send_buffer_size(options.buffer_bytes)
            .max_header_list_size(options.max_header_list_size)
            .max_frame_size(super::MAX_FRAME_BYTES)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|source| PoolError::Handshake { addr, source })?;
        handshake.succeeded();
        let open = TunnelMetrics::hold(&options.metrics.connections);
        let state = Arc::new(ConnState {
            active: AtomicUsize::new(0),
            last_used_ms: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            epoch: self.inner.epoch,
        });
        state.touch();
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        self.inner.opened.fetch_add(1, Ordering::Relaxed);
        self.inner.live.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(drive(
            Arc::downgrade(&self.inner),
            key.clone(),
            slot,
            id,
            state.clone(),
            connection,
            open,
        ));
        Ok(Conn { id, send, state })
    }

    async fn open_stream(
        &self,
        conn: &Conn,
        addr: SocketAddr,
        target: StreamTarget,
        early: &Early,
        guard: StreamGuard,
    ) -> Result<TunnelStream, OpenError> {
        let authority = target.authority;
        let after = self.inner.options.stream_timeout;
        let request = connect_request(target).map_err(|e| OpenError::Pool(e.into()))?;
        let opening = async {
            let mut send = conn
                .send
                .clone()
                .ready()
                .await
                .map_err(OpenError::Connection)?;
            let (response, mut send_stream) = send
                .send_request(request, false)
                .map_err(OpenError::Connection)?;
            if !early.bytes.is_empty() {
                // Queued with the request's HEADERS; written together.
                send_stream
                    .send_data(early.bytes.clone(), false)
                    .map_err(OpenError::Connection)?;
                early.mark(true);
            }
            let response = response.await.map_err(|source| {
                // The server did not take the stream: a graceful GOAWAY fails only the streams
                // it did not take, and REFUSED_STREAM says so (RFC 9113, 8.7). Any other
                // failure may have come after it passed the early bytes on.
                let graceful = source.is_go_away() && source.reason() == Some(Reason::NO_ERROR);
                if graceful || source.reason() == Some(Reason::REFUSED_STREAM) {
                    early.mark(false);
                }
                if (source.is_go_away() || source.is_io()) && !early.may_have_arrived() {
                    OpenError::Connection(source)
                } else {
                    OpenError::Pool(PoolError::Stream { addr, source })
                }
            })?;
            // Answered: the server passes the early bytes on with a 200 only.
            early.mark(false);
            if response.status() != StatusCode::OK {
                return Err(OpenError::Pool(PoolError::Refused {
                    addr,
                    authority,
                    status: response.status(),
                }));
            }
            Ok((response.into_body(), send_stream))
        };
        let (recv, send) = tokio::time::timeout(after, opening).await.map_err(|_| {
            OpenError::Pool(PoolError::Timeout {
                what: "opening a tunnel stream",
                addr,
                after,
            })
        })??;
        let guard: Arc<dyn Send + Sync> = Arc::new(guard);
        Ok(TunnelStream::new(
            recv,
            send,
            self.inner.options.buffer_bytes,
            Some(guard),
        ))
    }
}
