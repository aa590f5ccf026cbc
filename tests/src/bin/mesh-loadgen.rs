//! `mesh-loadgen`: the load generator of `cargo xtask bench`, run inside a client pod, and
//! its server (run inside a server pod). Each client mode prints one JSON object on stdout.
//!
//! Wire protocol (plain TCP, so any L4 proxy in between is transparent): the client opens
//! with a 5-byte header, one op byte and a little-endian u32 size.
//! - `R` request/response: the server reads `size` bytes and writes `size` bytes back,
//!   repeatedly, until EOF.
//! - `S` sink: the server reads to EOF, then writes the byte count (u64 LE) and closes.
//!
//! Latency of the open-loop test is measured from each request's *scheduled* send time, so
//! a stall delays every request behind it in the numbers too (no coordinated omission).

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use serde_json::{Value, json};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const IO_TIMEOUT: Duration = Duration::from_secs(10);
const OP_RR: u8 = b'R';
const OP_SINK: u8 = b'S';
/// Largest `R` message the server accepts.
const MAX_RR_SIZE: u32 = 1 << 20;

#[derive(Parser, Debug)]
#[command(
    name = "mesh-loadgen",
    about = "Load generator for `cargo xtask bench`"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Serves the `R` and `S` ops, one thread per connection; prints `ready`.
    Server {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Retries one small request/response until it succeeds (or the timeout passes).
    Probe {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 10.0)]
        timeout: f64,
    },
    /// Open loop: `rate` requests/s of `size` bytes spread over `conns` connections, one
    /// outstanding request per connection; latency from the scheduled send time.
    Rr {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 2000)]
        rate: u64,
        #[arg(long, default_value_t = 8)]
        conns: usize,
        #[arg(long, default_value_t = 1024)]
        size: u32,
        /// Seconds measured (after the warm-up).
        #[arg(long, default_value_t = 5.0)]
        duration: f64,
        #[arg(long, default_value_t = 0.5)]
        warmup: f64,
    },
    /// Closed loop: `size`-byte ping-pong on one connection, as fast as it goes.
    Pingpong {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 1)]
        size: u32,
        #[arg(long, default_value_t = 5.0)]
        duration: f64,
        #[arg(long, default_value_t = 0.5)]
        warmup: f64,
    },
    /// Bulk upload over `streams` connections for `duration` seconds; bytes counted by the
    /// server (its acknowledgement), so nothing left in a buffer counts.
    Bulk {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 1)]
        streams: usize,
        #[arg(long, default_value_t = 5.0)]
        duration: f64,
    },
    /// New connections per second, each with one `size`-byte request/response, from
    /// `threads` closed-loop threads, stopping after `duration` s or `max_conns` connections.
    Cps {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 4)]
        threads: usize,
        #[arg(long, default_value_t = 1024)]
        size: u32,
        #[arg(long, default_value_t = 5.0)]
        duration: f64,
        #[arg(long, default_value_t = 10_000)]
        max_conns: u64,
    },
    /// Opens `conns` connections, one 1-byte request/response on each (so each is proxied
    /// end to end), prints `ready N` and holds them idle until stdin has a line or ends;
    /// then closes them all and reports. For the memory an idle connection costs.
    Idle {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 5000)]
        conns: usize,
    },
    /// One HTTP/1.1 GET (e.g. an agent's admin `/metrics`, run in the node's network
    /// namespace); prints the response body as is. Fails on a status other than 200.
    HttpGet {
        /// Address of the server, e.g. 127.0.0.1:15000.
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value = "/metrics")]
        path: String,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse().cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-loadgen: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cmd: Cmd) -> Result<()> {
    let report = match cmd {
        Cmd::Server { listen } => return server(listen),
        Cmd::HttpGet { addr, path } => {
            let body = http_get(addr, &path)?;
            io::stdout().write_all(&body)?;
            return Ok(());
        }
        Cmd::Probe { connect, timeout } => probe(connect, secs(timeout))?,
        Cmd::Idle { connect, conns } => idle(connect, conns)?,
        Cmd::Rr {
            connect,
            rate,
            conns,
            size,
            duration,
            warmup,
        } => rr(connect, rate, conns, size, secs(duration), secs(warmup))?,
        Cmd::Pingpong {
            connect,
            size,
            duration,
            warmup,
        } => pingpong(connect, size, secs(duration), secs(warmup))?,
        Cmd::Bulk {
            connect,
            streams,
            duration,
        } => bulk(connect, streams, secs(duration))?,
        Cmd::Cps {
            connect,
            threads,
            size,
            duration,
            max_conns,
        } => cps(connect, threads, size, secs(duration), max_conns)?,
    };
    println!("{report}");
    Ok(())
}

/// A minimal HTTP/1.1 GET with `Connection: close`: status line checked, headers skipped,
/// body read to EOF (chunked transfer decoded).
fn http_get(addr: SocketAddr, path: &str) -> Result<Vec<u8>> {
    let mut s = connect(addr)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: */*\r\n\r\n"
    )?;
    let mut response = Vec::new();
    s.read_to_end(&mut response)
        .with_context(|| format!("reading the response of {addr}{path}"))?;
    let Some(split) = response.windows(4).position(|w| w == b"\r\n\r\n") else {
        bail!("{addr}{path}: no complete HTTP header in the response");
    };
    let head = String::from_utf8_lossy(&response[..split]).to_string();
    let body = response.split_off(split + 4);
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        bail!("{addr}{path}: {status}");
    }
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if !chunked {
        return Ok(body);
    }
    let mut out = Vec::new();
    let mut rest = &body[..];
    loop {
        let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
            bail!("{addr}{path}: truncated chunked body");
        };
        let size_text = String::from_utf8_lossy(&rest[..eol]);
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .with_context(|| format!("{addr}{path}: bad chunk size {size_text:?}"))?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if rest.len() < size + 2 {
            bail!("{addr}{path}: truncated chunk");
        }
        out.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

// ---------------------------------------------------------------------------------------
// Server

fn server(listen: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(listen).with_context(|| format!("listening on {listen}"))?;
    {
        let mut out = io::stdout().lock();
        writeln!(out, "ready")?;
        out.flush()?;
    }
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("accept: {e}");
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        thread::spawn(move || {
            if let Err(e) = serve_conn(stream)
                && !is_disconnect(&e)
            {
                eprintln!("connection: {e:#}");
            }
        });
    }
}

fn is_disconnect(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>().is_some_and(|e| {
            matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::UnexpectedEof
            )
        })
    })
}

fn serve_conn(mut s: TcpStream) -> Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut header = [0u8; 5];
    match read_full(&mut s, &mut header)? {
        0 => return Ok(()),
        5 => {}
        n => bail!("short header ({n} bytes)"),
    }
    let size = u32::from_le_bytes([header[1], header[2], header[3], header[4]]);
    match header[0] {
        OP_RR => {
            if size == 0 || size > MAX_RR_SIZE {
                bail!("bad request size {size}");
            }
            let mut buf = vec![0u8; size as usize];
            loop {
                let n = read_full(&mut s, &mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                if n < buf.len() {
                    bail!("truncated request ({n} of {size} bytes)");
                }
                s.write_all(&buf)?;
            }
        }
        OP_SINK => {
            let mut buf = vec![0u8; 256 * 1024];
            let mut total: u64 = 0;
            loop {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => total += n as u64,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e.into()),
                }
            }
            s.write_all(&total.to_le_bytes())?;
            let _ = s.shutdown(Shutdown::Write);
            Ok(())
        }
        op => bail!("unknown op {op:#x}"),
    }
}

/// Reads until `buf` is full or EOF; returns the bytes read (0 = EOF at once).
fn read_full(s: &mut TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let mut have = 0;
    while have < buf.len() {
        match s.read(&mut buf[have..]) {
            Ok(0) => break,
            Ok(n) => have += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(have)
}

// ---------------------------------------------------------------------------------------
// Client helpers

fn connect(addr: SocketAddr) -> Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

fn header(op: u8, size: u32) -> [u8; 5] {
    let b = size.to_le_bytes();
    [op, b[0], b[1], b[2], b[3]]
}

/// Opens an `R` connection for `size`-byte messages.
fn rr_conn(addr: SocketAddr, size: u32) -> Result<TcpStream> {
    let mut s = connect(addr)?;
    s.write_all(&header(OP_RR, size))?;
    Ok(s)
}

/// See `Cmd::Idle`.
fn idle(addr: SocketAddr, conns: usize) -> Result<Value> {
    let started = Instant::now();
    let mut open = Vec::with_capacity(conns);
    let mut resp = [0u8; 1];
    for i in 0..conns {
        let mut s = rr_conn(addr, 1).with_context(|| format!("connection {i}"))?;
        exchange(&mut s, &[1], &mut resp).with_context(|| format!("connection {i}"))?;
        open.push(s);
    }
    let opened_s = started.elapsed().as_secs_f64();
    let mut out = io::stdout();
    writeln!(out, "ready {}", open.len())?;
    out.flush()?;
    let mut line = String::new();
    io::stdin().read_line(&mut line)?;
    // Every connection still answers after its idle time.
    let mut alive = 0usize;
    for s in &mut open {
        if exchange(s, &[1], &mut resp).is_ok() {
            alive += 1;
        }
    }
    drop(open);
    Ok(json!({ "connections": conns, "alive_after_idle": alive, "open_s": opened_s }))
}

/// One request/response on an `R` connection.
fn exchange(s: &mut TcpStream, req: &[u8], resp: &mut [u8]) -> Result<()> {
    s.write_all(req).context("sending request")?;
    s.read_exact(resp).context("reading response")?;
    Ok(())
}

fn new_histogram() -> Histogram<u64> {
    // 1 ns .. 100 s at 3 significant figures.
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("valid histogram bounds")
}

fn record(h: &mut Histogram<u64>, d: Duration) {
    let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1);
    h.saturating_record(ns);
}

/// Percentiles in microseconds.
fn summary(h: &Histogram<u64>) -> Value {
    let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    json!({
        "count": h.len(),
        "min_us": h.min() as f64 / 1000.0,
        "mean_us": h.mean() / 1000.0,
        "p50_us": us(0.50),
        "p90_us": us(0.90),
        "p99_us": us(0.99),
        "p999_us": us(0.999),
        "max_us": h.max() as f64 / 1000.0,
    })
}

/// Smallest timer slack for this thread, so sleeping until a scheduled send time wakes up
/// within microseconds instead of the default 50 us slack.
fn precise_timers() {
    let _ = nix::sys::prctl::set_timerslack(1);
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        thread::sleep(t - now);
    }
}

// ---------------------------------------------------------------------------------------
// Modes

fn probe(addr: SocketAddr, timeout: Duration) -> Result<Value> {
    let deadline = Instant::now() + timeout;
    let mut tries = 0u32;
    loop {
        tries += 1;
        let attempt = (|| -> Result<()> {
            let mut s = rr_conn(addr, 16)?;
            let mut resp = [0u8; 16];
            exchange(&mut s, b"mesh-loadgen-pro", &mut resp)?;
            if &resp != b"mesh-loadgen-pro" {
                bail!("probe reply differs: {resp:?}");
            }
            Ok(())
        })();
        match attempt {
            Ok(()) => return Ok(json!({"ok": true, "tries": tries})),
            Err(e) if Instant::now() >= deadline => {
                return Err(e.context(format!("probe of {addr} failed after {tries} tries")));
            }
            Err(_) => thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// One rr connection's outcome: latency and service-time histograms, late sends, and the
/// worst latency with its scheduled time after t0.
type RrThread = (Histogram<u64>, Histogram<u64>, u64, Duration, Duration);

fn rr(
    addr: SocketAddr,
    rate: u64,
    conns: usize,
    size: u32,
    duration: Duration,
    warmup: Duration,
) -> Result<Value> {
    if rate == 0 || conns == 0 {
        bail!("rate and conns must be positive");
    }
    let streams: Vec<TcpStream> = (0..conns)
        .map(|_| rr_conn(addr, size))
        .collect::<Result<_>>()?;
    // Each connection carries rate/conns requests/s; their schedules are staggered.
    let interval = Duration::from_secs_f64(conns as f64 / rate as f64);
    let t0 = Instant::now() + Duration::from_millis(20);
    let measure_from = t0 + warmup;
    let end = measure_from + duration;
    let handles: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(i, mut s)| {
            thread::spawn(move || -> Result<RrThread> {
                precise_timers();
                let mut latency = new_histogram();
                let mut service = new_histogram();
                let req = vec![0x5au8; size as usize];
                let mut resp = vec![0u8; size as usize];
                let mut scheduled = t0 + interval.mul_f64(i as f64 / conns as f64);
                let mut late = 0u64;
                // The worst latency and when (after t0) its request was scheduled: tells a
                // start-up stall from one in the middle of the run.
                let (mut worst, mut worst_at) = (Duration::ZERO, Duration::ZERO);
                while scheduled < end {
                    sleep_until(scheduled);
                    let sent = Instant::now();
                    exchange(&mut s, &req, &mut resp)?;
                    let done = Instant::now();
                    if scheduled >= measure_from {
                        record(&mut latency, done - scheduled);
                        record(&mut service, done - sent);
                        if sent - scheduled > interval {
                            late += 1;
                        }
                        if done - scheduled > worst {
                            worst = done - scheduled;
                            worst_at = scheduled - t0;
                        }
                    }
                    scheduled += interval;
                }
                Ok((latency, service, late, worst, worst_at))
            })
        })
        .collect();
    let mut latency = new_histogram();
    let mut service = new_histogram();
    let mut late = 0;
    let (mut worst, mut worst_at) = (Duration::ZERO, Duration::ZERO);
    for h in handles {
        let (l, s, n, w, w_at) = h
            .join()
            .map_err(|_| anyhow::anyhow!("rr thread panicked"))??;
        latency.add(&l)?;
        service.add(&s)?;
        late += n;
        if w > worst {
            (worst, worst_at) = (w, w_at);
        }
    }
    Ok(json!({
        "mode": "rr",
        "target_rps": rate,
        "conns": conns,
        "size": size,
        "duration_s": duration.as_secs_f64(),
        "achieved_rps": latency.len() as f64 / duration.as_secs_f64(),
        "late_sends": late,
        "worst_us": worst.as_secs_f64() * 1e6,
        "worst_scheduled_at_s": worst_at.as_secs_f64(),
        "latency": summary(&latency),
        "service_time": summary(&service),
    }))
}

fn pingpong(addr: SocketAddr, size: u32, duration: Duration, warmup: Duration) -> Result<Value> {
    let mut s = rr_conn(addr, size)?;
    let req = vec![0x42u8; size as usize];
    let mut resp = vec![0u8; size as usize];
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let mut h = new_histogram();
    loop {
        let sent = Instant::now();
        if sent >= end {
            break;
        }
        exchange(&mut s, &req, &mut resp)?;
        if sent >= measure_from {
            record(&mut h, sent.elapsed());
        }
    }
    Ok(json!({
        "mode": "pingpong",
        "size": size,
        "duration_s": duration.as_secs_f64(),
        "round_trips_per_s": h.len() as f64 / duration.as_secs_f64(),
        "latency": summary(&h),
    }))
}

fn bulk(addr: SocketAddr, streams: usize, duration: Duration) -> Result<Value> {
    if streams == 0 {
        bail!("streams must be positive");
    }
    let conns: Vec<TcpStream> = (0..streams)
        .map(|_| {
            let mut s = connect(addr)?;
            s.write_all(&header(OP_SINK, 0))?;
            Ok(s)
        })
        .collect::<Result<_>>()?;
    let start = Instant::now();
    let end = start + duration;
    let handles: Vec<_> = conns
        .into_iter()
        .map(|mut s| {
            thread::spawn(move || -> Result<(u64, u64)> {
                let buf = vec![0xa5u8; 256 * 1024];
                let mut sent = 0u64;
                while Instant::now() < end {
                    s.write_all(&buf).context("sending bulk data")?;
                    sent += buf.len() as u64;
                }
                s.shutdown(Shutdown::Write)?;
                let mut ack = [0u8; 8];
                s.read_exact(&mut ack).context("reading the sink's count")?;
                Ok((sent, u64::from_le_bytes(ack)))
            })
        })
        .collect();
    let mut sent = 0;
    let mut acked = 0;
    for h in handles {
        let (s, a) = h
            .join()
            .map_err(|_| anyhow::anyhow!("bulk thread panicked"))??;
        sent += s;
        acked += a;
    }
    let elapsed = start.elapsed().as_secs_f64();
    if acked != sent {
        bail!("the sink counted {acked} bytes of {sent} sent");
    }
    Ok(json!({
        "mode": "bulk",
        "streams": streams,
        "bytes": acked,
        "elapsed_s": elapsed,
        "gbit_per_s": acked as f64 * 8.0 / elapsed / 1e9,
    }))
}

fn cps(
    addr: SocketAddr,
    threads: usize,
    size: u32,
    duration: Duration,
    max_conns: u64,
) -> Result<Value> {
    let started = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let end = start + duration;
    let handles: Vec<_> = (0..threads.max(1))
        .map(|_| {
            let started = started.clone();
            thread::spawn(move || {
                let mut h = new_histogram();
                let mut ok = 0u64;
                let mut errors = 0u64;
                let mut first_error = None;
                let mut msg = header(OP_RR, size).to_vec();
                msg.resize(5 + size as usize, 0x33);
                let mut resp = vec![0u8; size as usize];
                while Instant::now() < end && started.fetch_add(1, Ordering::Relaxed) < max_conns {
                    let t = Instant::now();
                    let attempt = (|| -> Result<()> {
                        let mut s = connect(addr)?;
                        s.write_all(&msg)?;
                        s.read_exact(&mut resp)?;
                        Ok(())
                    })();
                    match attempt {
                        Ok(()) => {
                            ok += 1;
                            record(&mut h, t.elapsed());
                        }
                        Err(e) => {
                            errors += 1;
                            first_error.get_or_insert_with(|| format!("{e:#}"));
                        }
                    }
                }
                (h, ok, errors, first_error)
            })
        })
        .collect();
    let mut h = new_histogram();
    let (mut ok, mut errors, mut first_error) = (0, 0, None);
    for t in handles {
        let (th, tok, terr, tfirst) = t
            .join()
            .map_err(|_| anyhow::anyhow!("cps thread panicked"))?;
        h.add(&th)?;
        ok += tok;
        errors += terr;
        if first_error.is_none() {
            first_error = tfirst;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    Ok(json!({
        "mode": "cps",
        "threads": threads,
        "size": size,
        "connections": ok,
        "errors": errors,
        "first_error": first_error,
        "elapsed_s": elapsed,
        "conns_per_s": ok as f64 / elapsed,
        "latency": summary(&h),
    }))
}
