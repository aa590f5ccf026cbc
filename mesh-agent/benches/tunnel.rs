//! The node-to-node mTLS tunnel, in process over loopback TCP: `cargo bench -p mesh-agent
//! --bench tunnel`. Client and server run on ONE current-thread tokio runtime, so every
//! figure is what one core does with both ends of the connection.
//!
//! - `tunnel/mtls_handshake`: a full mutual TLS 1.3 handshake (ECDSA P-256 leaves from the
//!   built-in CA, X25519, client certificate verified, no resumption) on a fresh TCP
//!   connection, both sides; 1 / time = full handshakes per second per core;
//! - `tunnel/new_connection_connect`: a new tunnel connection from a fresh pool (TCP + mTLS +
//!   HTTP/2 handshake) plus one CONNECT stream and a 1-byte echo through it (the byte, its
//!   echo, then half-close and EOF);
//! - `tunnel/pooled_stream`: a new CONNECT stream on the warm pooled connection plus a 1-byte
//!   echo (what each new proxied connection costs once the tunnel is up);
//! - `tunnel/pooled_stream_early`: the same with the byte sent right behind the CONNECT (the
//!   connection's first bytes, as the proxy sends them when the app spoke first);
//! - `tunnel/stream_throughput`: one stream, 8 MiB written through the tunnel to an echo
//!   upstream and read back (throughput counts the bytes each way).
//!
//! `cargo xtask bench` runs this with short times and reports the figures in results.md.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mesh_agent::{
    tls::{
        CertStore, LocalCa, SpiffeId, StoreOptions, TrustBundle, client_config, generate_dev_ca,
        peer_identity, server_config,
    },
    tunnel::{
        ConnectRequest, Early, Forward, Pool, PoolOptions, Refusal, Server, ServerOptions,
        TunnelReadHalf, TunnelStream, TunnelWriteHalf,
    },
};
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    runtime::Runtime,
};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const STREAM_BYTES: usize = 8 * 1024 * 1024;

/// A shared CA (written to a temporary directory, as the agent loads it), a store holding a
/// client and a server identity, and the two identities.
struct Identities {
    _dir: tempfile::TempDir,
    store: Arc<CertStore>,
    client: SpiffeId,
    server: SpiffeId,
}

fn identities(runtime: &Runtime) -> Identities {
    let dev = generate_dev_ca("cluster.local", 1).expect("dev CA");
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = (dir.path().join("ca.crt"), dir.path().join("ca.key"));
    std::fs::write(&cert, &dev.cert_pem).expect("write ca.crt");
    std::fs::write(&key, &dev.key_pem).expect("write ca.key");
    let ca = Arc::new(LocalCa::load(&cert, &key).expect("load CA"));
    let bundle = TrustBundle::from_pem(dev.cert_pem.as_bytes()).expect("bundle");
    let store = CertStore::new(ca, bundle, StoreOptions::default());
    let client = SpiffeId::new("cluster.local", "bench", "client").expect("id");
    let server = SpiffeId::new("cluster.local", "bench", "server").expect("id");
    runtime.block_on(async {
        store.ensure(&client).await.expect("client cert");
        store.ensure(&server).await.expect("server cert");
    });
    Identities {
        _dir: dir,
        store,
        client,
        server,
    }
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Echoes every connection (copy until EOF, then half-close).
async fn echo_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = tcp.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
                let _ = write.shutdown().await;
            });
        }
    });
    addr
}

/// A tunnel server for `ids.server`, connecting every stream to its authority.
async fn tunnel_server(ids: &Identities) -> SocketAddr {
    let handler = |request: ConnectRequest| async move {
        TcpStream::connect(request.authority)
            .await
            .map_err(|e| Refusal::Unreachable(e.to_string()))
    };
    let server = Server::new(
        &ids.store,
        ids.server.clone(),
        Forward::new(handler),
        ServerOptions::default(),
    )
    .expect("server");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    server.spawn(listener);
    addr
}

async fn plain(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// A request and its answer: one byte out, the byte back, then half-close and EOF.
async fn echo_one(stream: TunnelStream) {
    let (read, mut write) = stream.into_split();
    write.write_all(b"x").await.expect("write");
    echo_back(read, write).await;
}

/// Reads the echo of the one byte already sent, then half-closes and waits for EOF.
async fn echo_back(mut read: TunnelReadHalf, mut write: TunnelWriteHalf) {
    let mut got = [0; 1];
    read.read_exact(&mut got).await.expect("read");
    assert_eq!(&got, b"x");
    write.shutdown().await.expect("half-close");
    let mut rest = Vec::new();
    read.read_to_end(&mut rest).await.expect("read");
    assert!(rest.is_empty());
}

fn handshake(c: &mut Criterion) {
    let runtime = runtime();
    let ids = identities(&runtime);
    let acceptor = TlsAcceptor::from(server_config(&ids.store, &ids.server).expect("server"));
    let connector =
        TlsConnector::from(client_config(&ids.store, &ids.client, &ids.server).expect("client"));
    let listener = runtime
        .block_on(TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let once = || async {
        let client = async {
            let tcp = TcpStream::connect(addr).await.expect("connect");
            tcp.set_nodelay(true).expect("nodelay");
            connector
                .connect(ServerName::IpAddress(addr.ip().into()), tcp)
                .await
                .expect("client handshake")
        };
        let server = async {
            let (tcp, _) = listener.accept().await.expect("accept");
            tcp.set_nodelay(true).expect("nodelay");
            acceptor.accept(tcp).await.expect("server handshake")
        };
        let (client, server) = tokio::join!(client, server);
        // The server saw the client's identity: a full mutual handshake happened.
        assert_eq!(
            peer_identity(server.get_ref().1).expect("client identity"),
            ids.client
        );
        drop(client);
    };
    let mut group = c.benchmark_group("tunnel");
    group.sample_size(20);
    group.bench_function("mtls_handshake", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    once().await;
                }
                start.elapsed()
            })
        })
    });
    group.finish();
}

fn streams(c: &mut Criterion) {
    let runtime = runtime();
    let ids = identities(&runtime);
    let (tunnel, upstream) =
        runtime.block_on(async { (tunnel_server(&ids).await, echo_upstream().await) });
    let (client, server) = (ids.client.clone(), ids.server.clone());
    let mut group = c.benchmark_group("tunnel");
    group.sample_size(20);

    group.bench_function("new_connection_connect", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    // A pool's connection outlives the pool until it is idle for
                    // idle_timeout: a short one closes it right after its one stream, so
                    // the servers' connection limit is never reached.
                    let pool = Pool::new(
                        ids.store.clone(),
                        PoolOptions {
                            idle_timeout: Duration::from_millis(1),
                            ..PoolOptions::default()
                        },
                    );
                    let stream = pool
                        .connect(&client, &server, tunnel, upstream, &Early::default(), plain)
                        .await
                        .expect("stream");
                    echo_one(stream).await;
                }
                start.elapsed()
            })
        })
    });

    let pool = Pool::new(ids.store.clone(), PoolOptions::default());
    group.bench_function("pooled_stream", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let stream = pool
                        .connect(&client, &server, tunnel, upstream, &Early::default(), plain)
                        .await
                        .expect("stream");
                    echo_one(stream).await;
                }
                start.elapsed()
            })
        })
    });
    group.bench_function("pooled_stream_early", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let early = Early::new(Bytes::from_static(b"x"));
                    let stream = pool
                        .connect(&client, &server, tunnel, upstream, &early, plain)
                        .await
                        .expect("stream");
                    let (read, write) = stream.into_split();
                    echo_back(read, write).await;
                }
                start.elapsed()
            })
        })
    });
    assert_eq!(
        pool.opened_connections(),
        1,
        "the pool reused one connection"
    );

    group.throughput(Throughput::Bytes(STREAM_BYTES as u64));
    group.sample_size(10);
    group.bench_function("stream_throughput", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let chunk = vec![0x5au8; 64 * 1024];
                let mut buf = vec![0u8; 64 * 1024];
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let stream = pool
                        .connect(&client, &server, tunnel, upstream, &Early::default(), plain)
                        .await
                        .expect("stream");
                    let (mut read, mut write) = stream.into_split();
                    let start = Instant::now();
                    let writer = async {
                        let mut sent = 0;
                        while sent < STREAM_BYTES {
                            write.write_all(&chunk).await.expect("write");
                            sent += chunk.len();
                        }
                        write.shutdown().await.expect("shutdown");
                    };
                    let reader = async {
                        let mut got = 0;
                        loop {
                            let n = read.read(&mut buf).await.expect("read");
                            if n == 0 {
                                break got;
                            }
                            got += n;
                        }
                    };
                    let ((), got) = tokio::join!(writer, reader);
                    total += start.elapsed();
                    assert_eq!(got, STREAM_BYTES);
                }
                total
            })
        })
    });
    group.finish();
}

fn short() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = tunnel;
    config = short();
    targets = handshake, streams
}
criterion_main!(tunnel);
