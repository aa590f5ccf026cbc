//! Socket reads under TLS in large chunks. rustls asks its reader for at most 4 KiB at a time
//! (and shrinks its buffer again whenever it has decoded every record), so a stream of 16 KiB
//! records costs four or five `recv` calls per record; the profile of the bulk path showed
//! those calls. [`ReadAhead`] reads up to [`CHUNK`] bytes per call and serves rustls's small
//! reads from memory.
//!
//! The buffer is kept only while reads keep filling a good part of it (bulk): a connection
//! that goes quiet or trades small messages gives it back, so an idle tunnel connection holds
//! none.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most read from the socket in one call.
const CHUNK: usize = 64 * 1024;
/// A buffered read bringing less than this ends the read-ahead once its bytes are taken.
const BULK: usize = 16 * 1024;

/// An I/O object whose reads go through a read-ahead buffer; writes pass straight through.
///
/// Without a buffer, reads go straight to the socket; a read that fills the caller's buffer
/// (there is more behind it) starts the read-ahead, and a read-ahead that brings less than
/// [`BULK`] ends it once its bytes are taken.
pub(crate) struct ReadAhead<T> {
    io: T,
    buf: Vec<u8>,
    /// Unread bytes are `buf[start..end]`.
    start: usize,
    end: usize,
    /// The last read-ahead was small: let the buffer go when it is drained.
    quiet: bool,
}

impl<T> ReadAhead<T> {
    pub(crate) fn new(io: T) -> Self {
        Self {
            io,
            buf: Vec::new(),
            start: 0,
            end: 0,
            quiet: false,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadAhead<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.start == this.end {
            if this.buf.is_empty() || out.remaining() >= CHUNK {
                let room = out.remaining();
                let before = out.filled().len();
                ready!(Pin::new(&mut this.io).poll_read(cx, out))?;
                if out.filled().len() - before == room && room < CHUNK && this.buf.is_empty() {
                    this.buf = vec![0; CHUNK];
                }
                return Poll::Ready(Ok(()));
            }
            let mut read = ReadBuf::new(&mut this.buf);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut read))?;
            let n = read.filled().len();
            (this.start, this.end, this.quiet) = (0, n, n < BULK);
        }
        let n = (this.end - this.start).min(out.remaining());
        out.put_slice(&this.buf[this.start..this.start + n]);
        this.start += n;
        if this.start == this.end {
            (this.start, this.end) = (0, 0);
            if this.quiet {
                this.buf = Vec::new();
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadAhead<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::{CHUNK, ReadAhead};

    /// rustls's way of reading: 4 KiB at a time.
    async fn read_in_4k(reader: &mut ReadAhead<tokio::io::DuplexStream>, len: usize) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while got.len() < len {
            let n = reader.read(&mut buf).await.expect("read");
            assert!(n > 0, "early EOF");
            got.extend_from_slice(&buf[..n]);
        }
        got
    }

    #[tokio::test]
    async fn bulk_is_read_ahead_in_chunks_and_small_reads_hold_no_buffer() {
        let (mut writer, reader) = tokio::io::duplex(4 * CHUNK);
        let mut reader = ReadAhead::new(reader);
        let bulk: Vec<u8> = (0..3 * CHUNK).map(|i| (i % 251) as u8).collect();
        writer.write_all(&bulk).await.expect("write");
        let got = read_in_4k(&mut reader, bulk.len()).await;
        assert!(got == bulk, "bytes in order, none lost or repeated");

        // Small messages: the buffer goes once the small read-ahead is taken, and stays gone.
        for round in 0..3u8 {
            writer.write_all(&[round; 100]).await.expect("write");
            assert_eq!(read_in_4k(&mut reader, 100).await, vec![round; 100]);
            assert_eq!(reader.buf.capacity(), 0, "round {round}: no buffer held");
        }

        // A read that fills the caller's buffer starts the read-ahead again.
        writer.write_all(&bulk[..CHUNK]).await.expect("write");
        assert_eq!(read_in_4k(&mut reader, 4096).await, bulk[..4096]);
        assert_eq!(read_in_4k(&mut reader, 8192).await, bulk[4096..12288]);
        assert_eq!(reader.buf.len(), CHUNK, "reading ahead");
        assert_eq!(
            read_in_4k(&mut reader, CHUNK - 12288).await,
            bulk[12288..CHUNK]
        );

        drop(writer);
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).await.expect("EOF");
        assert!(rest.is_empty());
        assert_eq!(reader.buf.capacity(), 0);
    }
}
