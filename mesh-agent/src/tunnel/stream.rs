//! One tunnel stream as tokio I/O: a read half over the h2 receive stream and a write half
//! over the h2 send stream.
//!
//! Backpressure: the read half gives flow-control credit back only for bytes the reader has
//! taken, so a slow reader stops the peer after one window; the write half writes only as much
//! as h2 has granted capacity for, so a slow peer stops the writer. At most one received DATA
//! frame is held here, and at most `max_send_buffer_size` (h2) is queued per stream.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::copy::Readable;

/// Something kept alive as long as either half is (the pool's per-connection stream count).
pub(crate) type Guard = Option<Arc<dyn Send + Sync>>;

/// The receiving half: EOF when the peer ends its side (END_STREAM).
pub struct TunnelReadHalf {
    recv: RecvStream,
    pending: Bytes,
    _guard: Guard,
}

/// The sending half: `shutdown` sends END_STREAM (a half-close); dropping it without
/// shutting down, while the read half is also gone, resets the stream.
pub struct TunnelWriteHalf {
    send: SendStream<Bytes>,
    /// Largest single write handed to h2 (bounds each copy of the caller's buffer).
    max_write: usize,
    ended: bool,
    _guard: Guard,
}

/// A whole tunnel stream; [`TunnelStream::into_split`] gives the halves the copy loop takes.
pub struct TunnelStream {
    read: TunnelReadHalf,
    write: TunnelWriteHalf,
}

impl TunnelStream {
    pub(crate) fn new(
        recv: RecvStream,
        send: SendStream<Bytes>,
        max_write: usize,
        guard: Guard,
    ) -> Self {
        Self {
            read: TunnelReadHalf {
                recv,
                pending: Bytes::new(),
                _guard: guard.clone(),
            },
            write: TunnelWriteHalf {
                send,
                max_write: max_write.max(1),
                ended: false,
                _guard: guard,
            },
        }
    }

    pub fn into_split(self) -> (TunnelReadHalf, TunnelWriteHalf) {
        (self.read, self.write)
    }
}

fn h2_to_io(error: h2::Error) -> io::Error {
    if error.is_io() {
        if let Some(io) = error.into_io() {
            return io;
        }
        return io::Error::other("h2 I/O error");
    }
    let kind = match error.reason() {
        Some(Reason::CANCEL | Reason::STREAM_CLOSED) => io::ErrorKind::ConnectionReset,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, error)
}

impl AsyncRead for TunnelReadHalf {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                // Credit back only what the reader actually took.
                let _ = self.recv.flow_control().release_capacity(n);
                return Poll::Ready(Ok(()));
            }
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => self.pending = data,
                None => return Poll::Ready(Ok(())),
                // The peer ended the stream with a reset that says "done", not "failed".
                Some(Err(error)) if error.reason() == Some(Reason::NO_ERROR) => {
                    return Poll::Ready(Ok(()));
                }
                Some(Err(error)) => return Poll::Ready(Err(h2_to_io(error))),
            }
        }
    }
}

/// Readable once a DATA frame is held (or the stream ended): the copy loop waits here
/// without a buffer of its own.
impl Readable for TunnelReadHalf {
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.pending.is_empty()
            && let Some(Ok(data)) = ready!(self.recv.poll_data(cx))
        {
            self.pending = data;
        }
        // An end or an error is for the read that follows to report.
        Poll::Ready(Ok(()))
    }
}

impl TunnelWriteHalf {
    fn reset_error(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        match ready!(self.send.poll_reset(cx)) {
            Ok(reason) => Poll::Ready(io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("tunnel stream reset by peer: {reason}"),
            )),
            Err(error) => Poll::Ready(h2_to_io(error)),
        }
    }
}

impl AsyncWrite for TunnelWriteHalf {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if self.ended {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after shutdown of a tunnel stream",
            )));
        }
        let want = buf.len().min(self.max_write);
        // h2 only signals capacity *increases*: use what is already assigned first.
        while self.send.capacity() == 0 {
            self.send.reserve_capacity(want);
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return self.reset_error(cx).map(Err),
            }
        }
        let n = self.send.capacity().min(want);
        let chunk = Bytes::copy_from_slice(&buf[..n]);
        match self.send.send_data(chunk, false) {
            Ok(()) => Poll::Ready(Ok(n)),
            Err(_) => self.reset_error(cx).map(Err),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection task writes queued frames out on its own.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.ended {
            return Poll::Ready(Ok(()));
        }
        match self.send.send_data(Bytes::new(), true) {
            Ok(()) => {
                self.ended = true;
                Poll::Ready(Ok(()))
            }
            Err(_) => self.reset_error(cx).map(Err),
        }
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.read).poll_read(cx, buf)
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.write).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.write).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.write).poll_shutdown(cx)
    }
}
