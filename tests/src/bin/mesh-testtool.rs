//! `mesh-testtool`: the traffic endpoints of the end-to-end tests, run inside
//! pods (`env!("CARGO_BIN_EXE_mesh-testtool")`). Every operation is bounded by
//! timeouts so a broken data path fails a test instead of hanging it.
//!
//! Exit codes: 0 success, 1 failure (message on stderr), 2 usage error.

use std::io::{self, BufRead as _, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs as _, UdpSocket};
use std::process::ExitCode;
use std::thread;
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use clap::{Parser, Subcommand};
use mesh_tests::payload::{self, SEED};
use sha2::{Digest as _, Sha256};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const IO_TIMEOUT: Duration = Duration::from_secs(30);
const UDP_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Parser, Debug)]
#[command(
    name = "mesh-testtool",
    about = "Traffic endpoints for mesh end-to-end tests"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// TCP server: `ID\n` gets `NAME PEER\n`, anything else is echoed.
    Serve {
        #[arg(long)]
        listen: String,
        #[arg(long, default_value = "server")]
        name: String,
    },
    /// COUNT sequential connections to a `serve` (at RATE per second when given), each
    /// asking `ID`; prints `NAME N` per server that answered and `failed N`.
    Ids {
        #[arg(long)]
        connect: String,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        rate: Option<f64>,
    },
    /// TCP server: reads to EOF, replies `SHA256HEX BYTES\n`.
    Sink {
        #[arg(long)]
        listen: String,
    },
    /// Streams N deterministic bytes to a sink and checks its reply.
    Send {
        #[arg(long)]
        connect: String,
        #[arg(long)]
        bytes: u64,
    },
    /// Asks a `serve` for its name and the peer address it sees.
    Id {
        #[arg(long)]
        connect: String,
        /// How long to wait for the reply.
        #[arg(long, default_value_t = 30_000)]
        timeout_ms: u64,
    },
    /// Sends N bytes to a `serve` while reading the echo; checks it.
    Echo {
        #[arg(long)]
        connect: String,
        #[arg(long)]
        bytes: u64,
    },
    /// Connects and closes.
    Connect {
        #[arg(long)]
        connect: String,
    },
    /// UDP echo server.
    UdpEcho {
        #[arg(long)]
        listen: String,
    },
    /// One UDP request/response to a `udp-echo` (2 s timeout).
    UdpPing {
        #[arg(long)]
        connect: String,
    },
    /// Holds one connection to a `serve` open for SECONDS, echoing a line every 50 ms; prints
    /// `ready` once connected and the number of echoes at the end (fails on any mismatch).
    Hold {
        #[arg(long)]
        connect: String,
        #[arg(long)]
        seconds: u64,
    },
    /// HTTP/1.0 GET of PATH (the agent's admin API, say); prints the body, fails unless 200.
    HttpGet {
        #[arg(long)]
        connect: String,
        #[arg(long)]
        path: String,
    },
    /// Opens N connections at once to a `serve`, echoes a message on each.
    Many {
        #[arg(long)]
        connect: String,
        #[arg(long)]
        count: usize,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-testtool: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Serve { listen, name } => serve(&listen, &name),
        Cmd::Ids {
            connect,
            count,
            rate,
        } => ids(&connect, count, rate),
        Cmd::Sink { listen } => sink(&listen),
        Cmd::Send { connect, bytes } => send(&connect, bytes),
        Cmd::Id {
            connect,
            timeout_ms,
        } => id(&connect, Duration::from_millis(timeout_ms)),
        Cmd::Hold { connect, seconds } => hold(&connect, seconds),
        Cmd::Echo { connect, bytes } => echo(&connect, bytes),
        Cmd::Connect { connect } => {
            let s = connect_tcp(&connect)?;
            drop(s);
            println!("connected {connect}");
            Ok(())
        }
        Cmd::UdpEcho { listen } => udp_echo(&listen),
        Cmd::UdpPing { connect } => udp_ping(&connect),
        Cmd::Many { connect, count } => many(&connect, count),
        Cmd::HttpGet { connect, path } => http_get(&connect, &path),
    }
}

fn resolve(addr: &str) -> Result<Vec<SocketAddr>> {
    let v: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .with_context(|| format!("resolving {addr:?} (want IP:PORT or [IPv6]:PORT)"))?
        .collect();
    ensure!(!v.is_empty(), "{addr:?} resolved to no address");
    Ok(v)
}

/// Connects with a 5 s timeout and sets 30 s read/write timeouts.
fn connect_tcp(addr: &str) -> Result<TcpStream> {
    let mut last = None;
    for sa in resolve(addr)? {
        match TcpStream::connect_timeout(&sa, CONNECT_TIMEOUT) {
            Ok(s) => {
                set_timeouts(&s)?;
                return Ok(s);
            }
            Err(e) => last = Some(anyhow::Error::new(e).context(format!("connecting to {sa}"))),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no address to connect to for {addr}")))
}

fn set_timeouts(s: &TcpStream) -> Result<()> {
    s.set_read_timeout(Some(IO_TIMEOUT))
        .context("setting read timeout")?;
    s.set_write_timeout(Some(IO_TIMEOUT))
        .context("setting write timeout")?;
    Ok(())
}

fn listen_tcp(addr: &str) -> Result<TcpListener> {
    let sa = resolve(addr)?[0];
    let l = TcpListener::bind(sa).with_context(|| format!("listening on {sa}"))?;
    ready()?;
    Ok(l)
}

/// Tells the test harness the listener exists.
fn ready() -> Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "ready").context("writing ready")?;
    out.flush().context("flushing stdout")
}

/// Accepts forever, one thread per connection; per-connection errors are
/// logged, not fatal.
fn accept_loop(
    l: TcpListener,
    handler: impl Fn(TcpStream) -> Result<()> + Send + Sync + Clone + 'static,
) -> Result<()> {
    loop {
        let (s, peer) = match l.accept() {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("accept failed: {e}");
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let h = handler.clone();
        thread::spawn(move || {
            if let Err(e) = set_timeouts(&s).and_then(|()| h(s)) {
                eprintln!("connection from {peer}: {e:#}");
            }
        });
    }
}

fn serve(listen: &str, name: &str) -> Result<()> {
    let l = listen_tcp(listen)?;
    let name = name.to_owned();
    accept_loop(l, move |s| serve_conn(s, &name))
}

fn ids(addr: &str, count: usize, rate: Option<f64>) -> Result<()> {
    let start = std::time::Instant::now();
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    let mut failed = 0usize;
    for i in 0..count {
        if let Some(rate) = rate {
            let due = start + Duration::from_secs_f64(i as f64 / rate);
            if let Some(wait) = due.checked_duration_since(std::time::Instant::now()) {
                thread::sleep(wait);
            }
        }
        let answer = connect_tcp(addr).and_then(|mut s| {
            s.write_all(b"ID\n").context("sending ID")?;
            read_line(&s)
        });
        match answer {
            Ok(line) => {
                let name = line.split(' ').next().unwrap_or_default().to_owned();
                *counts.entry(name).or_default() += 1;
            }
            Err(e) => {
                failed += 1;
                if failed <= 3 {
                    eprintln!("connection {i}: {e:#}");
                }
            }
        }
    }
    for (name, n) in counts {
        println!("{name} {n}");
    }
    println!("failed {failed}");
    Ok(())
}

fn serve_conn(mut s: TcpStream, name: &str) -> Result<()> {
    const ID: &[u8] = b"ID\n";
    let peer = s.peer_addr().context("peer address")?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut have = 0;
    // Decide between ID and echo as soon as the first bytes can't be "ID\n".
    while have < ID.len() && buf[..have] == ID[..have] {
        let n = s.read(&mut buf[have..]).context("reading request")?;
        if n == 0 {
            break;
        }
        have += n;
    }
    if have == ID.len() && buf[..have] == *ID {
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        writeln!(s, "{name} {peer}").context("writing id reply")?;
        return Ok(());
    }
    s.write_all(&buf[..have]).context("echoing")?;
    if have == 0 {
        let _ = s.shutdown(Shutdown::Write);
        return Ok(());
    }
    loop {
        let n = s.read(&mut buf).context("reading")?;
        if n == 0 {
            break;
        }
        s.write_all(&buf[..n]).context("echoing")?;
    }
    s.shutdown(Shutdown::Write).context("half-closing")
}

fn sink(listen: &str) -> Result<()> {
    let l = listen_tcp(listen)?;
    accept_loop(l, |mut s| {
        let mut h = Sha256::new();
        let mut total: u64 = 0;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = s.read(&mut buf).context("reading")?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            total += n as u64;
        }
        writeln!(s, "{} {total}", payload::hex(&h.finalize())).context("writing reply")?;
        s.shutdown(Shutdown::Write).context("closing")
    })
}

fn read_line(s: &TcpStream) -> Result<String> {
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .context("reading reply line")?;
    ensure!(!line.is_empty(), "connection closed without a reply");
    Ok(line.trim_end().to_owned())
}

fn send(addr: &str, bytes: u64) -> Result<()> {
    let mut s = connect_tcp(addr)?;
    payload::for_each_chunk(SEED, bytes, |c| s.write_all(c)).context("sending payload")?;
    s.shutdown(Shutdown::Write).context("half-closing")?;
    let reply = read_line(&s)?;
    let want = format!("{} {bytes}", payload::sha256_hex(SEED, bytes));
    println!("{want}");
    println!("{reply}");
    ensure!(
        reply == want,
        "sink reply {reply:?} does not match sent {want:?}"
    );
    Ok(())
}

fn http_get(addr: &str, path: &str) -> Result<()> {
    let mut s = connect_tcp(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .context("setting the read timeout")?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").context("sending the request")?;
    let mut response = String::new();
    s.read_to_string(&mut response)
        .context("reading the response")?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("no end of headers in the response")?;
    ensure!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "GET {path}: {} {}",
        head.lines().next().unwrap_or_default(),
        body.trim()
    );
    print!("{body}");
    Ok(())
}

fn id(addr: &str, timeout: Duration) -> Result<()> {
    let mut s = connect_tcp(addr)?;
    s.set_read_timeout(Some(timeout))
        .context("setting the reply timeout")?;
    s.write_all(b"ID\n").context("sending ID")?;
    let reply = read_line(&s)?;
    println!("{reply}");
    Ok(())
}

fn echo(addr: &str, bytes: u64) -> Result<()> {
    let s = connect_tcp(addr)?;
    let mut w = s.try_clone().context("cloning socket")?;
    let writer = thread::spawn(move || -> Result<()> {
        payload::for_each_chunk(SEED, bytes, |c| w.write_all(c)).context("sending payload")?;
        w.shutdown(Shutdown::Write).context("half-closing")
    });
    let mut r = &s;
    let mut expect = payload::Payload::new(SEED);
    let mut want = vec![0u8; payload::CHUNK];
    let mut got = vec![0u8; payload::CHUNK];
    let mut total: u64 = 0;
    let mut result = Ok(());
    'outer: loop {
        // Read exactly one chunk (or until EOF) so the expected stream is
        // generated in the same chunk sizes as it was sent.
        let len =
            usize::try_from(bytes.saturating_sub(total).min(payload::CHUNK as u64)).unwrap_or(0);
        let mut filled = 0;
        while filled < len {
            match r.read(&mut got[filled..len]) {
                Ok(0) => break 'outer,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    result =
                        Err(anyhow::Error::new(e)
                            .context(format!("reading echo after {total} bytes")));
                    break 'outer;
                }
            }
        }
        if len == 0 {
            // Everything expected arrived; anything more is an error.
            let mut extra = [0u8; 1];
            match r.read(&mut extra) {
                Ok(0) => {}
                Ok(_) => result = Err(anyhow::anyhow!("echo has more bytes than the {bytes} sent")),
                Err(e) => result = Err(anyhow::Error::new(e).context("waiting for EOF after echo")),
            }
            break;
        }
        expect.fill(&mut want[..len]);
        if got[..len] != want[..len] {
            let off = got[..len]
                .iter()
                .zip(&want[..len])
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            result = Err(anyhow::anyhow!(
                "echo differs at byte {}",
                total + off as u64
            ));
            break;
        }
        total += len as u64;
    }
    let _ = s.shutdown(Shutdown::Both);
    match writer.join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) if result.is_ok() => result = Err(e),
        Ok(Err(_)) => {}
        Err(_) => bail!("writer thread panicked"),
    }
    result?;
    ensure!(total == bytes, "echo ended after {total} of {bytes} bytes");
    println!("{total}");
    Ok(())
}

fn udp_echo(listen: &str) -> Result<()> {
    let sa = resolve(listen)?[0];
    let sock = UdpSocket::bind(sa).with_context(|| format!("binding UDP {sa}"))?;
    ready()?;
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, peer) = match sock.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e) => {
                eprintln!("udp recv: {e}");
                continue;
            }
        };
        if let Err(e) = sock.send_to(&buf[..n], peer) {
            eprintln!("udp send to {peer}: {e}");
        }
    }
}

fn udp_ping(addr: &str) -> Result<()> {
    let sa = resolve(addr)?[0];
    let local: SocketAddr = if sa.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
        .parse()
        .context("local address")?;
    let sock = UdpSocket::bind(local).context("binding UDP socket")?;
    sock.connect(sa)
        .with_context(|| format!("connecting UDP to {sa}"))?;
    sock.set_read_timeout(Some(UDP_TIMEOUT))
        .context("setting timeout")?;
    let msg = format!(
        "ping {} {}",
        std::process::id(),
        sock.local_addr().context("local addr")?
    );
    sock.send(msg.as_bytes())
        .with_context(|| format!("sending to {sa}"))?;
    let mut buf = vec![0u8; 65536];
    let n = sock
        .recv(&mut buf)
        .with_context(|| format!("no UDP reply from {sa} within {UDP_TIMEOUT:?}"))?;
    let reply = String::from_utf8_lossy(&buf[..n]);
    println!("{reply}");
    ensure!(
        reply == msg,
        "UDP reply {reply:?} differs from request {msg:?}"
    );
    Ok(())
}

fn hold(addr: &str, seconds: u64) -> Result<()> {
    let mut stream = connect_tcp(addr)?;
    ready()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(seconds);
    let mut echoes = 0u64;
    while std::time::Instant::now() < deadline {
        let line = format!("hold-{echoes}\n");
        stream
            .write_all(line.as_bytes())
            .context("sending on the held connection")?;
        let mut got = vec![0u8; line.len()];
        stream
            .read_exact(&mut got)
            .context("reading the echo on the held connection")?;
        ensure!(
            got == line.as_bytes(),
            "echo {:?} != {line:?}",
            String::from_utf8_lossy(&got)
        );
        echoes += 1;
        thread::sleep(Duration::from_millis(50));
    }
    println!("{echoes}");
    Ok(())
}

fn many(addr: &str, count: usize) -> Result<()> {
    // Open all first so they are concurrently established.
    let mut conns = Vec::with_capacity(count);
    let mut failed = 0usize;
    for i in 0..count {
        match connect_tcp(addr) {
            Ok(s) => conns.push((i, s)),
            Err(e) => {
                failed += 1;
                eprintln!("connection {i}: {e:#}");
            }
        }
    }
    let mut sent = Vec::with_capacity(conns.len());
    for (i, s) in conns.iter_mut() {
        match s.write_all(format!("many-{i}\n").as_bytes()) {
            Ok(()) => sent.push(true),
            Err(e) => {
                eprintln!("connection {i}: sending: {e}");
                sent.push(false);
            }
        }
    }
    let mut ok = 0usize;
    for ((i, s), sent) in conns.iter_mut().zip(sent) {
        if !sent {
            continue;
        }
        let msg = format!("many-{i}\n");
        let mut got = vec![0u8; msg.len()];
        match s.read_exact(&mut got) {
            Ok(()) if got == msg.as_bytes() => ok += 1,
            Ok(()) => eprintln!(
                "connection {i}: echo {:?} != {msg:?}",
                String::from_utf8_lossy(&got)
            ),
            Err(e) => eprintln!("connection {i}: reading echo: {e}"),
        }
    }
    drop(conns);
    println!("{ok}");
    ensure!(
        ok == count,
        "{ok} of {count} connections succeeded ({failed} failed to connect)"
    );
    Ok(())
}
