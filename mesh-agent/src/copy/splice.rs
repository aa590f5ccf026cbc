//! One copy direction between two TCP sockets with `splice(2)`: socket -> pipe -> socket, so
//! bulk bytes stay in the kernel (no copy into the agent and back out, no buffer of ours).
//!
//! Each burst still starts with one small buffered read (2 KiB): a message that fits, the
//! usual request/response or a new connection's exchange, goes through as in the buffered
//! loop (splicing one would cost the same syscalls plus a pipe); only a read that fills it
//! turns the rest of the burst into splices.
//!
//! The same contract as the buffered loop: the pipe is filled only once it is empty again, so
//! at most one pipe's worth is in flight and a reader that stops reading stops the copy
//! (backpressure); each run is paced before it is passed on; bytes are counted from what
//! `splice` says it moved; EOF shuts down the write side of the other socket.
//!
//! Pipes are sized by use: a new one holds the kernel's default 64 KiB, and one that a single
//! splice fills grows to 1 MiB (`F_SETPIPE_SZ`), so a bulk burst moves 1 MiB per pair of
//! splices instead of 64 KiB. In `cargo xtask bench` (same-node, one stream) that took bulk
//! from 0.47x to 0.54x of a direct connection and the agent's CPU per GB from 0.37 s to 0.26 s
//! (256 KiB: 0.50x, 0.35 s). A grown pipe holds pages only while bytes are in it, like any
//! pipe; only its ring of slots (about 10 KiB) stays. A `bufferBytes` below 64 KiB caps each
//! splice instead, and the pipe never grows.
//!
//! A pipe is two file descriptors and kernel pages, and most connections are idle: a
//! direction takes a pipe only when its socket has data and gives it back when a read would
//! wait (with the pipe empty, which is always the case then). Pipes given back wait in a small
//! pool per thread, so a request/response connection does not create and close one per
//! message; beyond the pool they are closed. An idle direction therefore holds no pipe, and
//! the agent's open files grow with bursts in progress, not with connections.
//!
//! A socket the kernel will not splice (`EINVAL`, `ENOSYS`, `EOPNOTSUPP`), or a pipe that
//! cannot be had (`EMFILE`...), sends the direction back to the buffered loop, logged once
//! per process.

use std::{
    cell::RefCell,
    io,
    os::fd::OwnedFd,
    sync::{
        Once,
        atomic::{AtomicU64, Ordering},
    },
};

use nix::{
    errno::Errno,
    fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice},
};
use tokio::{
    io::{AsyncWriteExt, Interest},
    net::{TcpStream, tcp},
};

use super::{Activity, INITIAL_BUFFER, Pace, Readable, pipe, try_read};

/// Pipes kept per thread for the next burst; more are closed when given back.
const POOL_PER_THREAD: usize = 8;
/// A new pipe's capacity: the kernel's default.
const PIPE_BYTES: usize = 64 * 1024;
/// What a pipe grows to once one splice fills it (see the module docs).
const GROWN_PIPE_BYTES: usize = 1024 * 1024;

thread_local! {
    static POOL: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

/// An empty pipe, both ends, and what it holds.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
    /// Not grown yet, and not refused growing.
    may_grow: bool,
}

impl Pipe {
    /// Grows to [`GROWN_PIPE_BYTES`]; where the kernel refuses (a pipe size limit), it stays
    /// as it is and is not asked again.
    fn grow(&mut self) {
        self.may_grow = false;
        if let Ok(capacity) = fcntl(&self.write, FcntlArg::F_SETPIPE_SZ(GROWN_PIPE_BYTES as i32)) {
            self.capacity = usize::try_from(capacity).unwrap_or(self.capacity);
        }
    }
}

/// A pipe taken from the pool for one burst, and what is in it. Dropped empty, the pipe goes
/// back to the pool; with bytes still in it (an error, the copy dropped), it is closed.
struct Lease {
    pipe: Option<Pipe>,
    in_pipe: usize,
}

impl Lease {
    fn take() -> io::Result<Lease> {
        // `try_with`: a copy dropped while its thread shuts down finds no pool, not a panic.
        let pooled = POOL.try_with(|pool| pool.borrow_mut().pop()).ok().flatten();
        let pipe = match pooled {
            Some(pipe) => pipe,
            None => {
                let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
                Pipe {
                    read,
                    write,
                    capacity: PIPE_BYTES,
                    may_grow: true,
                }
            }
        };
        #[cfg(test)]
        tests_support::LEASED.with(|n| n.set(n.get() + 1));
        Ok(Lease {
            pipe: Some(pipe),
            in_pipe: 0,
        })
    }

    fn pipe(&self) -> io::Result<&Pipe> {
        self.pipe
            .as_ref()
            .ok_or_else(|| io::Error::other("splice pipe already given back"))
    }

    /// The most one splice into the pipe may move: its capacity, or `limit` (`bufferBytes`)
    /// where that is smaller than a new pipe.
    fn room(&self, limit: usize) -> usize {
        match &self.pipe {
            Some(pipe) if limit >= PIPE_BYTES => pipe.capacity,
            _ => limit,
        }
    }

    /// After a splice of `read` bytes with `room` to fill: a pipe it filled grows (a `room`
    /// capped below a new pipe's size never fills one).
    fn grow_if_filled(&mut self, read: usize, room: usize) {
        if let Some(pipe) = &mut self.pipe
            && pipe.may_grow
            && read >= pipe.capacity.max(room)
        {
            pipe.grow();
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        #[cfg(test)]
        tests_support::LEASED.with(|n| n.set(n.get() - 1));
        if let Some(pipe) = self.pipe.take()
            && self.in_pipe == 0
        {
            let _ = POOL.try_with(|pool| {
                let mut pool = pool.borrow_mut();
                if pool.len() < POOL_PER_THREAD {
                    pool.push(pipe);
                }
            });
        }
    }
}

const FLAGS: SpliceFFlags = SpliceFFlags::SPLICE_F_MOVE.union(SpliceFFlags::SPLICE_F_NONBLOCK);

/// Copies `reader` to `writer` until EOF (then shuts `writer` down) or an error; falls back
/// to the buffered loop where splicing is not possible.
pub(super) async fn direction(
    (reader, writer): (&mut tcp::ReadHalf<'_>, &mut tcp::WriteHalf<'_>),
    buffer_bytes: usize,
    activity: &Activity,
    total: &AtomicU64,
    pace: &impl Pace,
) -> io::Result<()> {
    match spliced(reader, writer, buffer_bytes.max(1), activity, total, pace).await? {
        Ended::Eof => Ok(()),
        Ended::Unsupported(error) => {
            static WARNED: Once = Once::new();
            WARNED.call_once(|| {
                tracing::warn!(%error, "splice unavailable, copying through buffers instead");
            });
            // Boxed, like the burst below: a connection's task keeps the size of what it
            // awaits while idle, not of the rarely taken ways.
            Box::pin(pipe(reader, writer, buffer_bytes, activity, total, pace)).await
        }
    }
}

enum Ended {
    Eof,
    /// Nothing of the direction is in a pipe; the buffered loop can take over.
    Unsupported(io::Error),
}

async fn spliced(
    reader: &mut tcp::ReadHalf<'_>,
    writer: &mut tcp::WriteHalf<'_>,
    limit: usize,
    activity: &Activity,
    total: &AtomicU64,
    pace: &impl Pace,
) -> io::Result<Ended> {
    let first = INITIAL_BUFFER.min(limit);
    loop {
        // Each burst starts as the buffered loop would, with one small read: a message that
        // fits (request/response, a new connection's exchange) costs the same syscalls as
        // before and takes no pipe; a read that fills it is bulk, spliced from there on.
        let mut buffer = Vec::with_capacity(first);
        let read = match try_read(reader, &mut buffer, first).await {
            Some(read) => read?,
            None => {
                // Idle: neither buffer nor pipe while waiting.
                drop(buffer);
                std::future::poll_fn(|cx| reader.poll_readable(cx)).await?;
                continue;
            }
        };
        if read == 0 {
            writer.shutdown().await?;
            return Ok(Ended::Eof);
        }
        pace.pace(read).await;
        writer.write_all(&buffer[..read]).await?;
        total.fetch_add(read as u64, Ordering::Relaxed);
        activity.touch();
        drop(buffer);
        if read < first {
            continue;
        }
        let spliced = Box::pin(burst(
            (reader.as_ref(), writer.as_ref()),
            limit,
            activity,
            total,
            pace,
        ));
        match spliced.await? {
            Burst::Drained => {}
            Burst::Eof => {
                writer.shutdown().await?;
                return Ok(Ended::Eof);
            }
            Burst::Unsupported(error) => return Ok(Ended::Unsupported(error)),
        }
    }
}

/// How a run of splices ended.
enum Burst {
    /// The socket has nothing more for now; the pipe is back in the pool.
    Drained,
    Eof,
    Unsupported(io::Error),
}

/// Splices `from` to `to` through a pipe until `from` has nothing more for now.
async fn burst(
    (from, to): (&TcpStream, &TcpStream),
    limit: usize,
    activity: &Activity,
    total: &AtomicU64,
    pace: &impl Pace,
) -> io::Result<Burst> {
    let mut lease = match Lease::take() {
        Ok(lease) => lease,
        Err(error) => return Ok(Burst::Unsupported(error)),
    };
    loop {
        let room = lease.room(limit);
        let read = from.try_io(Interest::READABLE, || {
            splice(from, None, &lease.pipe()?.write, None, room, FLAGS).map_err(io::Error::from)
        });
        let read = match read {
            Ok(0) => return Ok(Burst::Eof),
            Ok(read) => read,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(Burst::Drained),
            Err(error) if unsupported(&error) => return Ok(Burst::Unsupported(error)),
            Err(error) => return Err(error),
        };
        lease.in_pipe = read;
        lease.grow_if_filled(read, room);
        pace.pace(read).await;
        while lease.in_pipe > 0 {
            let written = to.try_io(Interest::WRITABLE, || {
                let pipe = lease.pipe()?;
                splice(&pipe.read, None, to, None, lease.in_pipe, FLAGS).map_err(io::Error::from)
            });
            match written {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(written) => {
                    lease.in_pipe -= written;
                    total.fetch_add(written as u64, Ordering::Relaxed);
                    activity.touch();
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    to.writable().await?;
                }
                Err(error) => return Err(error),
            }
        }
    }
}

/// The errors that mean "this kernel or socket does not splice", not "the connection failed".
fn unsupported(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error().map(Errno::from_raw),
        Some(Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP)
    )
}

#[cfg(test)]
pub(super) mod tests_support {
    use std::cell::Cell;

    use nix::fcntl::{FcntlArg, fcntl};

    thread_local! {
        /// Pipes leased on this thread and not given back yet.
        pub static LEASED: Cell<usize> = const { Cell::new(0) };
    }

    /// The kernel's capacity of each pipe in this thread's pool (`F_GETPIPE_SZ`).
    pub fn pooled_capacities() -> Vec<usize> {
        super::POOL.with(|pool| {
            pool.borrow()
                .iter()
                .map(|pipe| {
                    let capacity = fcntl(&pipe.write, FcntlArg::F_GETPIPE_SZ).expect("size");
                    usize::try_from(capacity).expect("positive")
                })
                .collect()
        })
    }
}
