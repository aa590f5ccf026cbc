//! Reaching the upstream: a TCP connection from inside the source pod's network namespace,
//! or a stream through the mTLS tunnel pool; and refusing a downstream with a reset.

use std::{net::SocketAddr, time::Duration};

use http::StatusCode;
use tokio::net::{TcpSocket, TcpStream};

use super::context::PodHandle;
use crate::{
    tls::SpiffeId,
    tunnel::{MeshTls, PoolError, TunnelStream},
};

/// Connects to `target` from inside the pod's network namespace, so the destination sees
/// the pod's own address, with the proxy mark so the connect is not captured again.
pub async fn connect(
    pod: &PodHandle,
    target: SocketAddr,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::from_std_stream(pod.sockets.take(target).await?);
    match tokio::time::timeout(timeout, socket.connect(target)).await {
        Ok(result) => result,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "connect timed out",
        )),
    }
}

/// Opens a tunnel stream from `pod` (with its own identity) to `target`, a pod of another
/// node whose identity must be `expected`, through that pod's tunnel port, within `timeout`
/// (a new tunnel connection, its handshakes and the stream's response together). A new
/// tunnel connection leaves from the source pod too.
pub async fn tunnel(
    mesh: &MeshTls,
    pod: &PodHandle,
    expected: &SpiffeId,
    target: SocketAddr,
    tunnel_port: u16,
    timeout: Duration,
) -> Result<TunnelStream, TunnelFailure> {
    let tunnel_addr = SocketAddr::new(target.ip(), tunnel_port);
    let stream = mesh.pool.connect(
        &pod.identity,
        expected,
        tunnel_addr,
        target,
        |addr| async move { connect(pod, addr, timeout).await },
    );
    match tokio::time::timeout(timeout, stream).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(error @ PoolError::Refused { status, .. })) if status == StatusCode::FORBIDDEN => {
            Err(TunnelFailure::Denied(error.to_string()))
        }
        Ok(Err(error)) => Err(TunnelFailure::Failed(error.to_string())),
        Err(_) => Err(TunnelFailure::Failed(format!(
            "tunnel to {tunnel_addr} timed out after {timeout:?}"
        ))),
    }
}

/// Why a tunnel stream could not be opened.
pub enum TunnelFailure {
    /// The destination's agent refused it by policy (`403`).
    Denied(String),
    /// Anything else: unreachable, handshake, timeout, another status.
    Failed(String),
}

/// Closes with a reset, so the app sees a refused connection rather than an empty reply.
pub fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}
