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
    pin::{Pin, pin},
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

mod splice;

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
    let activity = Activity::new();
    let copy = async {
        tokio::try_join!(
            pipe(
                &mut down_read,
                &mut up_write,
                buffer_bytes,
                &activity,
                &moved.downstream_to_upstream,
                to_upstream,
            ),
            pipe(
                &mut up_read,
                &mut down_write,
                buffer_bytes,
                &activity,
                &moved.upstream_to_downstream,
                to_downstream,
            ),
        )
    };
    until_idle(&activity, idle_timeout, pin!(copy)).await
}

/// Copies between two TCP connections like [`halves`], each direction moving its bytes
/// kernel-side with `splice(2)` through a pipe it holds only while data flows
/// ([`splice`]); a direction the kernel will not splice falls back to the buffered loop.
pub async fn spliced(
    (mut down_read, mut down_write): (tcp::ReadHalf<'_>, tcp::WriteHalf<'_>),
    (mut up_read, mut up_write): (tcp::ReadHalf<'_>, tcp::WriteHalf<'_>),
    buffer_bytes: usize,
    idle_timeout: Duration,
    moved: &Transferred,
    (to_upstream, to_downstream): (&impl Pace, &impl Pace),
) -> Result<(), CopyError> {
    let activity = Activity::new();
    let copy = async {
        tokio::try_join!(
            splice::direction(
                (&mut down_read, &mut up_write),
                buffer_bytes,
                &activity,
                &moved.downstream_to_upstream,
                to_upstream,
            ),
            splice::direction(
                (&mut up_read, &mut down_write),
                buffer_bytes,
                &activity,
                &moved.upstream_to_downstream,
                to_downstream,
            ),
        )
    };
    until_idle(&activity, idle_timeout, pin!(copy)).await
}

/// When a copy last moved a byte either way, for the idle timeout.
struct Activity {
    start: Instant,
    /// Milliseconds since `start` of the last byte moved either way.
    last: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        self.last
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last.load(Ordering::Relaxed))
    }
}

/// Runs `copy` (both directions) to its end, or until nothing moved for `idle_timeout`.
/// `copy` is pinned by the caller: taken by value, it would be held twice in this future
/// (the argument and its pinned local, about 900 bytes each for every open connection).
async fn until_idle<T>(
    activity: &Activity,
    idle_timeout: Duration,
    mut copy: Pin<&mut impl Future<Output = io::Result<T>>>,
) -> Result<(), CopyError> {
    loop {
        tokio::select! {
            result = copy.as_mut() => {
                result?;
                return Ok(());
            }
            _ = sleep_until(activity.last() + idle_timeout) => {
                if activity.last() + idle_timeout <= Instant::now() {
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
    activity: &Activity,
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
        activity.touch();
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
mod splice_tests;
#[cfg(test)]
mod tests;
