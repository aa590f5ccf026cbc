//! Reaching the upstream: a TCP connection from inside the source pod's network namespace,
//! or a stream through the mTLS tunnel pool; and refusing a downstream with a reset.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use http::StatusCode;
use tokio::net::{TcpSocket, TcpStream};

use super::{
    client_ip::FamilyPath,
    context::{PodHandle, ProxyContext},
    socket,
};
use crate::{
    sys::reply_route::Family,
    tls::SpiffeId,
    tunnel::{Early, MeshTls, PoolError, StreamTarget, TunnelStream},
};

/// Connects to `target` from inside the pod's network namespace, so the destination sees
/// the pod's own address, with the proxy mark so the connect is not captured again.
pub async fn connect(
    pod: &PodHandle,
    target: SocketAddr,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    connect_socket(pod.sockets.take(target).await?, target, timeout).await
}

/// Connects to `target` in the pod from `client`'s address (a vouched-for client pod of
/// another node), so the app sees the client; where the pod's transparent path is missing or
/// the kernel refuses the socket, from the pod's own address like [`connect`], counted and
/// warned about once per pod. The source is registered for sk_lookup while connecting.
pub async fn connect_as(
    ctx: &ProxyContext,
    pod: &PodHandle,
    target: SocketAddr,
    client: IpAddr,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let path = &pod.client_ip;
    match path.family(Family::of(target.ip())) {
        FamilyPath::Ready => {
            let std_socket = pod.sockets.take(target).await?;
            let held = socket::transparent(&std_socket, client, path.transparent_mark())
                .and_then(|()| std_socket.local_addr())
                .map_err(|error| error.to_string())
                .and_then(|source| {
                    ctx.transparent_sources
                        .hold(source)
                        .map_err(|error| error.to_string())
                });
            match held {
                Ok(_held) => return connect_socket(std_socket, target, timeout).await,
                Err(error) => path.fell_back(
                    &pod.key,
                    &ctx.metrics,
                    format_args!("a transparent socket from {client}: {error}"),
                ),
            }
        }
        FamilyPath::Refused(reason) => path.fell_back(&pod.key, &ctx.metrics, reason),
        FamilyPath::Absent => {}
    }
    connect(pod, target, timeout).await
}

async fn connect_socket(
    std_socket: std::net::TcpStream,
    target: SocketAddr,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::from_std_stream(std_socket);
    match tokio::time::timeout(timeout, socket.connect(target)).await {
        Ok(result) => result,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "connect timed out",
        )),
    }
}

/// Opens a tunnel stream from `pod` (with its own identity) to `target.authority`, a pod of
/// another node whose identity must be `expected`, through that pod's tunnel port, within
/// `timeout` (a new tunnel connection, its handshakes and the stream's response together). A
/// new tunnel connection leaves from the source pod too. `early` goes with the stream.
pub async fn tunnel(
    mesh: &MeshTls,
    pod: &PodHandle,
    expected: &SpiffeId,
    target: StreamTarget,
    early: &Early,
    tunnel_port: u16,
    timeout: Duration,
) -> Result<TunnelStream, TunnelFailure> {
    let tunnel_addr = SocketAddr::new(target.authority.ip(), tunnel_port);
    let stream = mesh.pool.connect(
        &pod.identity,
        expected,
        tunnel_addr,
        target,
        early,
        |addr| async move { connect(pod, addr, timeout).await },
    );
    let reason = match tokio::time::timeout(timeout, stream).await {
        Ok(Ok(stream)) => return Ok(stream),
        Ok(Err(error @ PoolError::Refused { status, .. })) if status == StatusCode::FORBIDDEN => {
            return Err(TunnelFailure::Denied(error.to_string()));
        }
        Ok(Err(error)) => error.to_string(),
        Err(_) => format!("tunnel to {tunnel_addr} timed out after {timeout:?}"),
    };
    Err(if early.may_have_arrived() {
        TunnelFailure::AfterSending(format!(
            "{reason}, after the first {} bytes went out (not retried)",
            early.len()
        ))
    } else {
        TunnelFailure::Failed(reason)
    })
}

/// Why a tunnel stream could not be opened.
pub enum TunnelFailure {
    /// The destination's agent refused it by policy (`403`).
    Denied(String),
    /// The stream failed without an answer once the connection's first bytes were out: the
    /// app on the other side may have them.
    AfterSending(String),
    /// Anything else: unreachable, handshake, timeout, another status.
    Failed(String),
}

/// Closes with a reset, so the app sees a refused connection rather than an empty reply.
pub fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}
