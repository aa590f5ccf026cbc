//! The copy loop between the two sides of a proxied connection: both directions at once,
//! each with one buffer sized by use (2 KiB for small messages, doubled by reads that fill it
//! up to the configured `bufferBytes`, shrunk back after a run of small reads; never more
//! than `bufferBytes` per direction), backpressure by awaiting each write before reading
//! more, half-close passed on (EOF on one side shuts down the write side of the other), and
//! an idle timeout covering both directions.
//!
//! A direction with nothing to read holds no buffer: when a read would wait, the buffer is
//! freed and the loop waits for the reader to become readable ([`Readable`]) before taking
//! one again. Most proxied connections are idle most of the time (pools, keep-alives), and
//! their buffers were most of the agent's memory per connection.
//!
//! It knows nothing of routing or policy: the connection pipeline (`crate::proxy`) and the
//! tunnel share it, and stop it from outside by dropping the future (revocation). Bytes are
//! counted in a [`Transferred`] the caller owns, so they are known however the copy ends.
//!
//! Shaping plugs in through [`Pace`], one pacer per direction, awaited before each write:
//! a rate limit pauses reading (the loop does not read again until the write is through),
//! never drops. `()` is the pacer that never waits, for unshaped connections.

use std::{
    future::{Future, poll_fn},
    io,
    sync::atomic::{AtomicU64, Ordering},
    task::{Context, Poll},
    time::Duration,
};

use bytes::BufMut;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpStream, tcp},
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

/// A read side that can wait for data without a buffer to read into, so an idle direction
/// holds none.
pub trait Readable: AsyncRead + Unpin {
    /// Ready once a read may find data, EOF or an error (spurious readiness is allowed: the
    /// read that follows simply waits again).
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl Readable for tcp::ReadHalf<'_> {
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.as_ref().poll_read_ready(cx)
    }
}

impl Readable for tcp::OwnedReadHalf {
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.as_ref().poll_read_ready(cx)
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
    DR: Readable,
    DW: AsyncWrite + Unpin,
    UR: Readable,
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

/// The first read buffer of each direction: what a request/response connection uses. A read
/// that fills the buffer doubles it (up to the configured size: bulk gets big reads in a few
/// steps); a run of small reads shrinks it back.
const INITIAL_BUFFER: usize = 2 * 1024;
/// Reads using at most a quarter of the buffer, in a row, before it shrinks back.
const SMALL_READS_TO_SHRINK: u32 = 64;

async fn pipe<R, W>(
    reader: &mut R,
    writer: &mut W,
    buffer_bytes: usize,
    (start, last_activity): (Instant, &AtomicU64),
    total: &AtomicU64,
    pace: &impl Pace,
) -> io::Result<()>
where
    R: Readable,
    W: AsyncWrite + Unpin,
{
    let max = buffer_bytes.max(1);
    // The size the next buffer gets; the buffer itself exists only while data flows.
    let mut size = INITIAL_BUFFER.min(max);
    let mut buffer: Vec<u8> = Vec::new();
    let mut small_reads = 0u32;
    loop {
        if buffer.capacity() != size {
            buffer = Vec::with_capacity(size);
        }
        buffer.clear();
        let read = match try_read(reader, &mut buffer, size).await {
            Some(read) => read?,
            None => {
                // Nothing to read now: wait without a buffer.
                buffer = Vec::new();
                poll_fn(|cx| reader.poll_readable(cx)).await?;
                continue;
            }
        };
        if read == 0 {
            // Half-close: the peer finished sending; tell the other side, keep reading it.
            writer.shutdown().await?;
            return Ok(());
        }
        pace.pace(read).await;
        writer.write_all(&buffer[..read]).await?;
        total.fetch_add(read as u64, Ordering::Relaxed);
        last_activity.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
        resize(&mut size, read, max, &mut small_reads);
    }
}

/// One read of at most `limit` bytes into `buffer`'s spare capacity (no zeroing), if it
/// completes without waiting; `None` when the reader has nothing now.
async fn try_read<R: AsyncRead + Unpin>(
    reader: &mut R,
    buffer: &mut Vec<u8>,
    limit: usize,
) -> Option<io::Result<usize>> {
    let mut limited = (&mut *buffer).limit(limit);
    let mut read = std::pin::pin!(reader.read_buf(&mut limited));
    poll_fn(|cx| match read.as_mut().poll(cx) {
        Poll::Ready(result) => Poll::Ready(Some(result)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

/// Sizes the next buffer by use after a read of `read` bytes: doubled when the read filled
/// it, back to the initial size after a run of small reads.
fn resize(size: &mut usize, read: usize, max: usize, small_reads: &mut u32) {
    let len = *size;
    if read == len && len < max {
        *small_reads = 0;
        *size = (len * 2).min(max);
    } else if read <= len / 4 && len > INITIAL_BUFFER {
        *small_reads += 1;
        if *small_reads >= SMALL_READS_TO_SHRINK {
            *small_reads = 0;
            *size = INITIAL_BUFFER.min(max);
        }
    } else {
        *small_reads = 0;
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

    use super::{
        CopyError, INITIAL_BUFFER, Pace, Readable, SMALL_READS_TO_SHRINK, Transferred, halves,
        resize, tcp,
    };

    #[test]
    fn buffers_grow_with_full_reads_up_to_the_limit_and_shrink_after_small_ones() {
        let max = 64 * 1024;
        let mut size = INITIAL_BUFFER;
        let mut small = 0;
        // Bulk: every read fills the buffer, which doubles up to the limit.
        let mut sizes = Vec::new();
        for _ in 0..8 {
            let read = size;
            resize(&mut size, read, max, &mut small);
            sizes.push(size / 1024);
        }
        assert_eq!(sizes, [4, 8, 16, 32, 64, 64, 64, 64]);
        // Request/response after it: small reads, then back to the initial size.
        for _ in 0..SMALL_READS_TO_SHRINK - 1 {
            resize(&mut size, 100, max, &mut small);
        }
        assert_eq!(size, max, "not before a run of small reads");
        resize(&mut size, 100, max, &mut small);
        assert_eq!(size, INITIAL_BUFFER);
        // A medium read breaks a run of small ones.
        let mut size = max;
        for i in 0..SMALL_READS_TO_SHRINK * 2 {
            let read = if i % 10 == 9 { max / 2 } else { 100 };
            resize(&mut size, read, max, &mut small);
        }
        assert_eq!(size, max);
        // Never above a small configured limit.
        let mut size = 1024;
        resize(&mut size, 1024, 1024, &mut small);
        assert_eq!(size, 1024);
    }

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

    /// A read half that counts the waits the copy made on it without a buffer.
    struct Watched<'a> {
        inner: tokio::net::tcp::ReadHalf<'a>,
        waits: &'a AtomicUsize,
    }

    impl tokio::io::AsyncRead for Watched<'_> {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl Readable for Watched<'_> {
        fn poll_readable(
            &mut self,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            self.waits.fetch_add(1, Ordering::Relaxed);
            self.inner.poll_readable(cx)
        }
    }

    #[tokio::test]
    async fn an_idle_direction_waits_for_data_without_a_buffer() {
        let (mut app, mut proxy_down) = pair().await;
        let (mut proxy_up, mut server) = pair().await;
        let waits = AtomicUsize::new(0);
        let moved = Transferred::default();
        let (down_read, down_write) = proxy_down.split();
        let copy = halves(
            (
                Watched {
                    inner: down_read,
                    waits: &waits,
                },
                down_write,
            ),
            proxy_up.split(),
            64 * 1024,
            Duration::from_secs(5),
            &moved,
            (&(), &()),
        );
        let peers = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let idle_waits = waits.load(Ordering::Relaxed);
            app.write_all(b"after a pause").await.expect("write");
            let mut got = [0u8; 13];
            server.read_exact(&mut got).await.expect("read");
            assert_eq!(&got, b"after a pause");
            app.shutdown().await.expect("half-close");
            server.shutdown().await.expect("server half-close");
            idle_waits
        };
        let (result, idle_waits) = tokio::join!(copy, peers);
        result.expect("copy");
        assert!(idle_waits >= 1, "the idle direction waited in a read");
        assert_eq!(moved.get(), (13, 0));
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
