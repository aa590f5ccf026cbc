//! Where the log lines go.
//!
//! The agent logs from its runtime workers, one access-log line per connection among them.
//! Written there, a log reader that stops reading (a container runtime's full pipe, a stuck
//! disk) would block a worker in `write(2)`, and with it every connection that worker
//! drives: the data path would hang on its logs. So `mesh-agent run` hands each line to a
//! writer thread of its own, over a bounded queue. When the reader stalls long enough for
//! the queue to fill, new lines are dropped and counted in `mesh_log_lines_dropped_total`;
//! traffic goes on. The thread writes what has queued in writes of up to 32 KiB, which
//! under load is many lines per call. Lines still queued are written when the agent exits.
//!
//! `mesh-agent ca serve` logs the same way. The short commands (`status`, `config check`,
//! ...) write to stderr directly: they exit right after their one line, some through
//! `process::exit`, which would skip the flush.

use std::{io, sync::OnceLock};

use prometheus::{
    IntCounter,
    core::{Collector, Desc},
    proto::MetricFamily,
};
use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::{EnvFilter, fmt::MakeWriter};

/// Lines queued for the writer thread at most: about 1 MB of access lines. A reader that
/// keeps up never lets more than a few queue; at 10,000 connections a second this covers
/// a stall of 0.2 s before lines are dropped.
const QUEUED_LINES: usize = 2048;
/// The writer thread's buffer: queued lines go out in writes of up to this size.
const WRITE_BUFFER: usize = 32 * 1024;

/// The writer thread's count of dropped lines, once a service has started it.
static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// Keeps the writer thread; dropping it writes what is queued and ends the thread.
#[must_use = "dropping the guard stops the log writer"]
pub struct Guard {
    _writer: Option<WorkerGuard>,
}

/// How lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `key=value` text; coloured on a terminal.
    Text,
    /// JSON lines, the event's fields at the top level.
    Json,
}

/// Installs the global subscriber: `RUST_LOG` (default `info`) in `format`, to stderr,
/// through a writer thread when `background` (the services: the agent, the CA), else
/// directly.
pub fn init(format: Format, background: bool) -> Guard {
    if !background {
        install(format, io::stderr);
        return Guard { _writer: None };
    }
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("mesh-log")
        .finish(io::BufWriter::with_capacity(WRITE_BUFFER, io::stderr()));
    let _ = DROPPED.set(writer.error_counter());
    install(format, writer);
    Guard {
        _writer: Some(guard),
    }
}

fn install<W>(format: Format, writer: W)
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        Format::Text => logs
            .with_ansi(io::IsTerminal::is_terminal(&io::stderr()))
            .init(),
        Format::Json => logs.json().flatten_event(true).init(),
    }
}

/// `mesh_log_lines_dropped_total`, read from the writer thread's count at each scrape.
pub struct DroppedLines {
    /// Its description; each scrape reports a fresh counter holding the count then.
    desc: IntCounter,
}

impl DroppedLines {
    pub fn new() -> Self {
        Self {
            desc: dropped_counter(),
        }
    }
}

impl Default for DroppedLines {
    fn default() -> Self {
        Self::new()
    }
}

fn dropped_counter() -> IntCounter {
    IntCounter::new(
        "mesh_log_lines_dropped_total",
        "Log lines (access-log lines among them) dropped because the log reader fell behind: \
         stderr blocked long enough to fill the agent's queue of lines",
    )
    .expect("static metric definition")
}

impl Collector for DroppedLines {
    fn desc(&self) -> Vec<&Desc> {
        self.desc.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let counter = dropped_counter();
        counter.inc_by(DROPPED.get().map_or(0, ErrorCounter::dropped_lines) as u64);
        counter.collect()
    }
}
