//! The copy loop between two TCP connections: both directions at once, each with one
//! fixed buffer (memory per connection never grows with traffic), backpressure by awaiting
//! each write before reading more, half-close passed on (EOF on one side shuts down the
//! write side of the other), and an idle timeout covering both directions.

use std::{
    io,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use super::registry::Tracked;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
    time::{Instant, sleep_until},
};

/// Bytes moved each way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transferred {
    pub downstream_to_upstream: u64,
    pub upstream_to_downstream: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("idle for {0:?}")]
    Idle(Duration),
    #[error("closed: no longer authorized")]
    Revoked,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Copies between two TCP connections until both directions have reached EOF, an error,
/// or the idle timeout.
pub async fn bidirectional(
    downstream: &mut TcpStream,
    upstream: &mut TcpStream,
    buffer_bytes: usize,
    idle_timeout: Duration,
    tracked: Option<&Tracked>,
) -> Result<Transferred, CopyError> {
    let (down_read, down_write) = downstream.split();
    let (up_read, up_write) = upstream.split();
    let copy = bidirectional_halves(
        (down_read, down_write),
        (up_read, up_write),
        buffer_bytes,
        idle_timeout,
    );
    match tracked {
        None => copy.await,
        // A revoked connection is dropped by the caller right after, closing both sides.
        Some(tracked) => tokio::select! {
            result = copy => result,
            () = tracked.revoked() => Err(CopyError::Revoked),
        },
    }
}

/// The same over any pair of already split streams (a tunnel stream, say).
pub async fn bidirectional_halves<DR, DW, UR, UW>(
    (mut down_read, mut down_write): (DR, DW),
    (mut up_read, mut up_write): (UR, UW),
    buffer_bytes: usize,
    idle_timeout: Duration,
) -> Result<Transferred, CopyError>
where
    DR: AsyncRead + Unpin,
    DW: AsyncWrite + Unpin,
    UR: AsyncRead + Unpin,
    UW: AsyncWrite + Unpin,
{
    let start = Instant::now();
    // Milliseconds since `start` of the last byte moved either way.
    let last_activity = AtomicU64::new(0);
    let copy = async {
        tokio::try_join!(
            pipe(
                &mut down_read,
                &mut up_write,
                buffer_bytes,
                start,
                &last_activity
            ),
            pipe(
                &mut up_read,
                &mut down_write,
                buffer_bytes,
                start,
                &last_activity
            ),
        )
    };
    tokio::pin!(copy);
    loop {
        let idle_until =
            start + Duration::from_millis(last_activity.load(Ordering::Relaxed)) + idle_timeout;
        tokio::select! {
            result = &mut copy => {
                let (downstream_to_upstream, upstream_to_downstream) = result?;
                return Ok(Transferred { downstream_to_upstream, upstream_to_downstream });
            }
            _ = sleep_until(idle_until) => {
                let last = start + Duration::from_millis(last_activity.load(Ordering::Relaxed));
                if last + idle_timeout <= Instant::now() {
                    return Err(CopyError::Idle(idle_timeout));
                }
            }
        }
    }
}

async fn pipe<R, W>(
    reader: &mut R,
    writer: &mut W,
    buffer_bytes: usize,
    start: Instant,
    last_activity: &AtomicU64,
) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buffer = vec![0u8; buffer_bytes];
    let mut total = 0u64;
    loop {
        let read = reader.read(&mut buffer).await?;
        if read == 0 {
            // Half-close: the peer finished sending; tell the other side, keep reading it.
            writer.shutdown().await?;
            return Ok(total);
        }
        writer.write_all(&buffer[..read]).await?;
        total += read as u64;
        last_activity.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
    };

    use super::{CopyError, bidirectional};

    /// A connected pair of loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.expect("connect"), server.expect("accept").0)
    }

    #[tokio::test]
    async fn half_close_passes_through_and_the_reply_still_flows() {
        let (mut app, mut proxy_down) = pair().await;
        let (mut proxy_up, mut server) = pair().await;
        let proxy = tokio::spawn(async move {
            bidirectional(
                &mut proxy_down,
                &mut proxy_up,
                1024,
                Duration::from_secs(5),
                None,
            )
            .await
        });
        let request = vec![7u8; 100_000];
        app.write_all(&request).await.expect("write");
        app.shutdown().await.expect("half-close");
        let mut received = Vec::new();
        server
            .read_to_end(&mut received)
            .await
            .expect("server reads to EOF");
        assert_eq!(received, request);
        server.write_all(b"reply after EOF").await.expect("reply");
        server.shutdown().await.expect("server half-close");
        let mut reply = Vec::new();
        app.read_to_end(&mut reply).await.expect("app reads reply");
        assert_eq!(reply, b"reply after EOF");
        let moved = proxy.await.expect("join").expect("copy");
        assert_eq!(moved.downstream_to_upstream, 100_000);
        assert_eq!(moved.upstream_to_downstream, 15);
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed() {
        let (_app, mut proxy_down) = pair().await;
        let (mut proxy_up, _server) = pair().await;
        let result = bidirectional(
            &mut proxy_down,
            &mut proxy_up,
            1024,
            Duration::from_millis(200),
            None,
        )
        .await;
        assert!(matches!(result, Err(CopyError::Idle(_))), "{result:?}");
    }
}
