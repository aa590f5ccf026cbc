//! The agent's reads of an app's redirected data, reported to the eBPF fast path: an app
//! socket may redirect a budget beyond what the agent has read (mesh-ebpf's `fast_path`), so
//! an agent that keeps up gives the budget back and the app's data never has to fall back to
//! TCP. Wraps the read half of the agent's socket on the fast-path hop: the accepted socket of
//! an outbound connection, the upstream socket of a connection into the pod.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use mesh_common::FastKey;
use tokio::{
    io::{AsyncRead, ReadBuf},
    net::TcpStream,
};

use crate::{
    copy::Readable,
    ebpf::{FAST_PATH_REPORT_EVERY, FastPathCredits},
};

/// The read count of one agent socket on the fast-path hop; its entry goes with it.
pub struct Credit {
    table: Arc<FastPathCredits>,
    key: FastKey,
    read: u64,
    reported: u64,
}

impl Credit {
    /// For the agent socket `stream` in the pod's netns; `None` when the fast path is off
    /// (without asking the kernel for its addresses: two syscalls per connection).
    pub fn new(
        table: Option<&Arc<FastPathCredits>>,
        netns_cookie: u64,
        stream: &TcpStream,
    ) -> Option<Credit> {
        let table = table?;
        let (local, peer) = (stream.local_addr().ok()?, stream.peer_addr().ok()?);
        Some(Credit {
            table: table.clone(),
            key: FastPathCredits::app_key(netns_cookie, local, peer),
            read: 0,
            reported: 0,
        })
    }

    fn add(&mut self, bytes: u64) {
        self.read += bytes;
        if self.read - self.reported >= FAST_PATH_REPORT_EVERY {
            // A failed write only keeps the budget smaller: the app falls back to TCP sooner.
            if self.table.consumed(&self.key, self.read).is_ok() {
                self.reported = self.read;
            }
        }
    }
}

impl Drop for Credit {
    fn drop(&mut self) {
        self.table.forget(&self.key);
    }
}

/// A read half that reports what it read to a [`Credit`] (when there is one).
pub struct Credited<R> {
    inner: R,
    credit: Option<Credit>,
}

impl<R> Credited<R> {
    pub fn new(inner: R, credit: Option<Credit>) -> Self {
        Self { inner, credit }
    }
}

impl<R: Readable> Readable for Credited<R> {
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner.poll_readable(cx)
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Credited<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        let read = (buf.filled().len() - before) as u64;
        if let Some(credit) = &mut self.credit {
            credit.add(read);
        }
        Poll::Ready(Ok(()))
    }
}
