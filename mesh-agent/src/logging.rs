//! Where the log lines go.
//!
//! The agent logs from its runtime workers, one access-log line per connection among them.
//! Written there, a log reader that stops reading (a container runtime's full pipe, a stuck
//! disk) would block a worker in `write(2)`, and with it every connection that worker
//! drives: the data path would hang on its logs. So the services (`mesh-agent run`,
//! `mesh-agent ca serve`) append each line to a buffer that one writer thread empties:
//!
//! - a line costs its caller a short lock and a copy, never a syscall or a wake-up of its own;
//! - access lines are batched: the first one into an empty buffer wakes the writer, which
//!   lets more gather for up to [`LINGER`] (or [`BATCH`] bytes) and writes them in one call.
//!   A writer woken for every line spent 9% of a busy agent's CPU on those wake-ups
//!   (`cargo xtask bench --perf cps`, tracing-appender's non-blocking writer);
//! - any other line (start-up, warnings, errors) is written at once;
//! - when the reader stalls and [`QUEUED`] bytes wait, new lines are dropped and counted in
//!   `mesh_log_lines_dropped_total`; traffic goes on;
//! - what waits is written when the service exits (for at most [`EXIT_WAIT`]).
//!
//! The short commands (`status`, `config check`, ...) write to stderr directly: they exit
//! right after their one line, some through `process::exit`, which would skip the flush.

use std::{
    io::{self, Write},
    mem,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use parking_lot::{Condvar, Mutex};
use prometheus::{
    IntCounter,
    core::{Collector, Desc},
    proto::MetricFamily,
};
use tracing::Metadata;
use tracing_subscriber::{EnvFilter, fmt::MakeWriter};

/// How long access lines may wait to be written with the ones that follow.
pub const LINGER: Duration = Duration::from_millis(50);
/// Waiting bytes that are written without lingering.
pub const BATCH: usize = 64 * 1024;
/// Waiting bytes beyond which lines are dropped: about 2,000 access lines, 0.2 s of a
/// stalled reader at 10,000 connections a second.
pub const QUEUED: usize = 1024 * 1024;
/// How long an exiting service waits for its last lines to be written.
pub const EXIT_WAIT: Duration = Duration::from_secs(1);
/// Lines of this target linger; the others are written at once.
const BATCHED_TARGET: &str = "access";

/// The writer's count of dropped lines, once a service has started it.
static DROPPED: OnceLock<Arc<AtomicU64>> = OnceLock::new();

/// How lines are written (`--log-format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// `key=value` text; coloured on a terminal.
    Text,
    /// JSON lines, the event's fields at the top level.
    Json,
}

/// Keeps the writer thread; dropping it writes what waits and ends the thread.
#[must_use = "dropping the guard stops the log writer"]
pub struct Guard {
    writer: Option<Arc<Shared>>,
}

/// Installs the global subscriber: `RUST_LOG` (default `info`) in `format`, to stderr,
/// through the writer thread when `background` (the services), else directly.
pub fn init(format: Format, background: bool) -> Guard {
    if !background {
        install(format, io::stderr);
        return Guard { writer: None };
    }
    let writer = Batched::start(io::stderr());
    let _ = DROPPED.set(writer.shared.dropped.clone());
    let shared = writer.shared.clone();
    install(format, writer);
    Guard {
        writer: Some(shared),
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

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(shared) = &self.writer {
            shared.close(EXIT_WAIT);
        }
    }
}

/// The lines waiting, shared by the loggers and the writer thread.
struct Shared {
    state: Mutex<State>,
    /// Wakes the writer: lines to write, or closing.
    wake: Condvar,
    /// Wakes the closing guard once the writer is done.
    done: Condvar,
    dropped: Arc<AtomicU64>,
}

#[derive(Default)]
struct State {
    lines: Vec<u8>,
    /// A line that is not to linger is waiting.
    urgent: bool,
    closing: bool,
    finished: bool,
}

impl Shared {
    /// Appends one formatted line (or drops it when [`QUEUED`] bytes wait, or when the
    /// writer is gone).
    fn push(&self, line: &[u8], urgent: bool) {
        let mut state = self.state.lock();
        if state.finished || state.lines.len() + line.len() > QUEUED {
            drop(state);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let first = state.lines.is_empty();
        state.lines.extend_from_slice(line);
        state.urgent |= urgent;
        let wake = first || urgent || state.lines.len() >= BATCH;
        drop(state);
        if wake {
            // No syscall when the writer is not waiting (it is writing).
            self.wake.notify_one();
        }
    }

    /// The writer thread: waits for lines, lets access lines gather, writes them.
    fn run(&self, mut out: impl Write) {
        let mut batch = Vec::new();
        loop {
            let mut state = self.state.lock();
            while state.lines.is_empty() && !state.closing {
                self.wake.wait(&mut state);
            }
            let deadline = Instant::now() + LINGER;
            while !(state.urgent || state.closing || state.lines.len() >= BATCH) {
                if self.wake.wait_until(&mut state, deadline).timed_out() {
                    break;
                }
            }
            mem::swap(&mut batch, &mut state.lines);
            state.urgent = false;
            let closing = state.closing;
            drop(state);
            // A failed write (the reader is gone) loses the lines, as a closed pipe would.
            let _ = out.write_all(&batch).and_then(|()| out.flush());
            batch.clear();
            if batch.capacity() > 2 * BATCH {
                // A burst's buffer goes back once written: the two buffers kept between
                // batches hold at most 256 KiB.
                batch = Vec::new();
            }
            if closing && self.state.lock().lines.is_empty() {
                break;
            }
        }
        self.state.lock().finished = true;
        self.done.notify_all();
    }

    /// Asks the writer to write what waits and stop; waits for it for at most `wait`.
    fn close(&self, wait: Duration) {
        let mut state = self.state.lock();
        state.closing = true;
        self.wake.notify_one();
        let deadline = Instant::now() + wait;
        while !state.finished {
            if self.done.wait_until(&mut state, deadline).timed_out() {
                return;
            }
        }
    }
}

/// The subscriber's writer in a service: hands each line to the writer thread.
struct Batched {
    shared: Arc<Shared>,
}

impl Batched {
    /// Starts the writer thread writing to `out`.
    fn start(out: impl Write + Send + 'static) -> Batched {
        let shared = Arc::new(Shared {
            state: Mutex::default(),
            wake: Condvar::new(),
            done: Condvar::new(),
            dropped: Arc::default(),
        });
        let writer = shared.clone();
        let started = std::thread::Builder::new()
            .name("mesh-log".into())
            .spawn(move || writer.run(out));
        if let Err(error) = started {
            // No thread, no writer: lines would only pile up. Say so, and drop them.
            eprintln!("mesh-agent: no log writer thread ({error}); log lines are dropped");
            let mut state = shared.state.lock();
            state.closing = true;
            state.finished = true;
        }
        Batched { shared }
    }
}

/// One event's writer: the subscriber formats the whole line, then writes it in one call.
struct Line<'a> {
    shared: &'a Shared,
    urgent: bool,
}

impl Write for Line<'_> {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        self.shared.push(line, self.urgent);
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Batched {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Line<'a> {
        Line {
            shared: &self.shared,
            urgent: true,
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Line<'a> {
        Line {
            shared: &self.shared,
            urgent: meta.target() != BATCHED_TARGET,
        }
    }
}

/// `mesh_log_lines_dropped_total`, read from the writer's count at each scrape.
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
         stderr blocked while a megabyte of lines waited",
    )
    .expect("static metric definition")
}

impl Collector for DroppedLines {
    fn desc(&self) -> Vec<&Desc> {
        self.desc.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let counter = dropped_counter();
        counter.inc_by(DROPPED.get().map_or(0, |d| d.load(Ordering::Relaxed)));
        counter.collect()
    }
}

#[cfg(test)]
mod tests;
