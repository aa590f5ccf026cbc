//! The copy loop between the two sides of a proxied connection: both directions at once,
//! each with one fixed buffer (memory per connection never grows with traffic), backpressure
//! by awaiting each write before reading more, half-close passed on (EOF on one side shuts
//! down the write side of the other), and an idle timeout covering both directions.
//!
//! It knows nothing of routing or policy: the connection pipeline (`crate::proxy`) and the
//! tunnel share it, and stop it from outside by dropping the future (revocation). Bytes are
//! counted in a [`Transferred`] the caller owns, so they are known however the copy ends.
//!
//! Shaping plugs in through [`Pace`], one pacer per direction, awaited before each write:
//! a rate limit pauses reading (the loop does not read again until the write is through),
//! never drops. `()` is the pacer that never waits, for unshaped connections.

use std::{
    future::Future,
    io,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
    time::{Instant, sleep_until},
};

/// Bytes moved each way so far; read them at any time, also after an error.
#[derive(Debug, Default)]
pub struct Transferred {
    /// From the side that opened the connection (the client) to the other.
    pub downstream_to_upstream: AtomicU64,
    /// Back to the client.
    pub upstream_to_downstream: AtomicU64,
}

impl Transferred {
    /// `(downstream_to_upstream, upstream_to_downstream)`.
    pub fn get(&self) -> (u64, u64) {
        (
            self.downstream_to_upstream.load(Ordering::Relaxed),
            self.upstream_to_downstream.load(Ordering::Relaxed),
        )
    }
}

/// Holds a direction of a copy to a rate: `pace(n)` completes when `n` more bytes may be
/// written. Called by one copy direction at a time, with at most one buffer's worth; a pacer
/// whose burst is smaller than that waits for it in pieces.
pub trait Pace: Sync {
    fn pace(&self, bytes: usize) -> impl Future<Output = ()> + Send;
}

/// No shaping: ready at once.
impl Pace for () {
    fn pace(&self, _bytes: usize) -> impl Future<Output = ()> + Send {
        std::future::ready(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("idle for {0:?}")]
    Idle(Duration),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Copies between two TCP connections until both directions have reached EOF, an error,
/// or the idle timeout. `pace`: (downstream -> upstream, upstream -> downstream).
pub async fn tcp(
    downstream: &mut TcpStream,
    upstream: &mut TcpStream,
    buffer_bytes: usize,
    idle_timeout: Duration,
    moved: &Transferred,
    pace: (&impl Pace, &impl Pace),
) -> Result<(), CopyError> {
    halves(
        downstream.split(),
        upstream.split(),
        buffer_bytes,
        idle_timeout,
        moved,
        pace,
    )
    .await
}

/// The same over any pair of already split streams (a tunnel stream, say).
pub async fn halves<DR, DW, UR, UW>(
    (mut down_read, mut down_write): (DR, DW),
    (mut up_read, mut up_write): (UR, UW),
    buffer_bytes: usize,
    idle_timeout: Duration,
    moved: &Transferred,
    (to_upstream, to_downstream): (&impl Pace, &impl Pace),
) -> Result<(), CopyError>
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
                (start, &last_activity),
                &moved.downstream_to_upstream,
                to_upstream,
            ),
            pipe(
                &mut up_read,
                &mut down_write,
                buffer_bytes,
                (start, &last_activity),
                &moved.upstream_to_downstream,
                to_downstream,
            ),
        )
    };
    tokio::pin!(copy);
    loop {
        let idle_until =
            start + Duration::from_millis(last_activity.load(Ordering::Relaxed)) + idle_timeout;
        tokio::select! {
            result = &mut copy => {
                result?;
                return Ok(());
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
    (start, last_activity): (Instant, &AtomicU64),
    total: &AtomicU64,
    pace: &impl Pace,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buffer = vec![0u8; buffer_bytes];
    loop {
        let read = reader.read(&mut buffer).await?;
        if read == 0 {
            // Half-close: the peer finished sending; tell the other side, keep reading it.
            writer.shutdown().await?;
            return Ok(());
        }
        pace.pace(read).await;
        writer.write_all(&buffer[..read]).await?;
        total.fetch_add(read as u64, Ordering::Relaxed);
        last_activity.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::atomic::{AtomicU64, AtomicUsize, Ordering},
        time::Duration,
    };

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
    };

    use super::{CopyError, Pace, Transferred, tcp};

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
            let moved = Transferred::default();
            let result = tcp(
                &mut proxy_down,
                &mut proxy_up,
                1024,
                Duration::from_secs(5),
                &moved,
                (&(), &()),
            )
            .await;
            result.map(|()| moved.get())
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
        assert_eq!(moved, (100_000, 15));
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed_and_its_bytes_are_still_counted() {
        let (mut app, mut proxy_down) = pair().await;
        let (mut proxy_up, mut server) = pair().await;
        app.write_all(b"hello").await.expect("write");
        let moved = Transferred::default();
        let copy = tcp(
            &mut proxy_down,
            &mut proxy_up,
            1024,
            Duration::from_millis(200),
            &moved,
            (&(), &()),
        );
        let (result, _) = tokio::join!(copy, async {
            let mut hello = [0u8; 5];
            server.read_exact(&mut hello).await.expect("read");
            server.write_all(b"hi").await.expect("reply");
        });
        assert!(matches!(result, Err(CopyError::Idle(_))), "{result:?}");
        assert_eq!(moved.get(), (5, 2));
    }

    /// Counts what it is asked for, and the largest single request.
    #[derive(Default)]
    struct Counting {
        bytes: AtomicU64,
        largest: AtomicUsize,
    }

    impl Pace for Counting {
        async fn pace(&self, bytes: usize) {
            self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
            self.largest.fetch_max(bytes, Ordering::Relaxed);
        }
    }

    #[tokio::test]
    async fn each_direction_is_paced_for_every_byte_it_writes() {
        let (mut app, mut proxy_down) = pair().await;
        let (mut proxy_up, mut server) = pair().await;
        let (to_server, to_client) = (Counting::default(), Counting::default());
        let moved = Transferred::default();
        let copy = tcp(
            &mut proxy_down,
            &mut proxy_up,
            4096,
            Duration::from_secs(5),
            &moved,
            (&to_server, &to_client),
        );
        let peers = async {
            app.write_all(&[1u8; 50_000]).await.expect("write");
            app.shutdown().await.expect("half-close");
            let mut received = Vec::new();
            server.read_to_end(&mut received).await.expect("read");
            server.write_all(&[2u8; 300]).await.expect("reply");
            server.shutdown().await.expect("server half-close");
            let mut reply = Vec::new();
            app.read_to_end(&mut reply).await.expect("read reply");
            (received.len(), reply.len())
        };
        let (result, received) = tokio::join!(copy, peers);
        result.expect("copy");
        assert_eq!(received, (50_000, 300));
        assert_eq!(to_server.bytes.load(Ordering::Relaxed), 50_000);
        assert_eq!(to_client.bytes.load(Ordering::Relaxed), 300);
        assert!(to_server.largest.load(Ordering::Relaxed) <= 4096);
    }
}
