//! The node-to-node tunnel, HBONE style: HTTP/2 CONNECT streams over mutual TLS (see
//! [`crate::tls`]), one stream per proxied TCP connection, many streams per TLS connection.
//!
//! Built on the `h2` crate directly rather than hyper: CONNECT streams are raw byte pipes, and
//! h2 exposes exactly what the proxy needs — per-stream flow control (capacity reservation and
//! explicit window release, so backpressure reaches the peer), END_STREAM as half-close, and
//! server-side limits (header list size, concurrent streams) — without hyper's body and
//! upgrade machinery (which since 1.x copies upgraded streams through an extra channel task).

mod connect;
mod mesh;
mod pool;
mod read_ahead;
mod server;
mod stream;

#[cfg(test)]
mod tests;

pub use connect::{ConnectError, StreamTarget, connect_request, forwarded_for, parse_connect};
pub use mesh::{MeshTls, MeshTlsError, dev_ca_dir};
pub use pool::{Early, Pool, PoolError, PoolOptions, default_connections_per_peer};
pub use server::{
    ConnectRequest, Forward, ForwardOptions, PendingStream, Refusal, Server, ServerError,
    ServerOptions, StreamHandler,
};
pub use stream::{TunnelReadHalf, TunnelStream, TunnelWriteHalf};

/// The largest HTTP/2 frame either end accepts (h2's default is the protocol's minimum, 16
/// KiB). A whole write of the copy loop (`bufferBytes`, 64 KiB by default) then goes out as
/// one DATA frame: one frame header, one wake-up of the stream and one vectored write (of
/// four TLS records) instead of four of each.
const MAX_FRAME_BYTES: u32 = 64 * 1024;

/// A readable reason for a failed TLS handshake: the rustls error inside the io::Error, with
/// our own verifier errors (carried as `Other`) shown by their Display rather than Debug.
pub(crate) fn tls_reason(error: &std::io::Error) -> String {
    use rustls::{CertificateError, Error};
    let Some(inner) = error.get_ref() else {
        return error.to_string();
    };
    match inner.downcast_ref::<Error>() {
        Some(Error::InvalidCertificate(CertificateError::Other(other))) => {
            format!("invalid peer certificate: {}", other.0)
        }
        Some(Error::InvalidMessage(_)) => {
            format!("not a TLS handshake (plaintext or garbage?): {inner}")
        }
        _ => inner.to_string(),
    }
}
