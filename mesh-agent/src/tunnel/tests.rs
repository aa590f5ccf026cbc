//! Tunnels over real TLS on loopback: data, identities, refusals, rotation.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{Method, Request, StatusCode, Version};
use parking_lot::Mutex;
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};
use tokio_rustls::TlsConnector;

use super::{
    ConnectRequest, Early, Forward, Pool, PoolError, PoolOptions, Refusal, Server, ServerOptions,
    TunnelStream,
};
use crate::tls::{
    CaError, CertStore, LocalCa, SignFuture, Signer, SpiffeId, StoreOptions, TrustBundle,
    cert_info, client_config, init_dev_ca,
};

pub(super) fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("mesh_agent=info")
        .try_init();
}

pub(super) fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "default", sa).expect("identity")
}

/// A dev CA on disk.
pub(super) struct Ca {
    _dir: tempfile::TempDir,
    cert: std::path::PathBuf,
    pub(super) ca: Arc<LocalCa>,
}

pub(super) fn new_ca() -> Ca {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, _) = init_dev_ca(dir.path(), "cluster.local", 1, false).expect("init");
    let ca = Arc::new(LocalCa::load_dir(dir.path()).expect("load"));
    Ca {
        _dir: dir,
        cert,
        ca,
    }
}

pub(super) fn store(signer: Arc<dyn Signer>, roots: &[&Ca]) -> Arc<CertStore> {
    let paths: Vec<_> = roots.iter().map(|ca| ca.cert.clone()).collect();
    let bundle = TrustBundle::from_pem_files(&paths).expect("bundle");
    CertStore::new(signer, bundle, StoreOptions::default())
}

/// Signs with a fixed validity window relative to now.
struct Skewed {
    ca: Arc<LocalCa>,
    from_now: (i64, i64),
}

impl Signer for Skewed {
    fn sign<'a>(
        &'a self,
        identity: &'a SpiffeId,
        spki: &'a [u8],
        _lifetime: Duration,
    ) -> SignFuture<'a> {
        let at = |seconds: i64| {
            let now = SystemTime::now();
            if seconds >= 0 {
                now + Duration::from_secs(seconds.unsigned_abs())
            } else {
                now - Duration::from_secs(seconds.unsigned_abs())
            }
        };
        let result: Result<_, CaError> =
            self.ca
                .sign_valid(identity, spki, at(self.from_now.0), at(self.from_now.1));
        Box::pin(async move { result })
    }
}

/// Echoes every connection (copy until EOF, then half-close).
pub(super) async fn echo_upstream() -> SocketAddr {
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

pub(super) type Seen = Arc<Mutex<Vec<ConnectRequest>>>;

/// A tunnel server for `identity` connecting streams to their authority, recording requests;
/// it refuses port 1 and never answers for port 2.
pub(super) async fn start_server(
    store: &Arc<CertStore>,
    identity: &SpiffeId,
    options: ServerOptions,
) -> (SocketAddr, Seen, JoinHandle<()>) {
    store.ensure(identity).await.expect("server cert");
    let seen: Seen = Arc::default();
    let record = seen.clone();
    let handler = move |request: ConnectRequest| {
        let record = record.clone();
        async move {
            let authority = request.authority;
            record.lock().push(request);
            if authority.port() == 1 {
                return Err(Refusal::Forbidden("port 1 is off limits".into()));
            }
            if authority.port() == 2 {
                // Never answers: a destination whose connect hangs.
                return std::future::pending().await;
            }
            TcpStream::connect(authority)
                .await
                .map_err(|e| Refusal::Unreachable(e.to_string()))
        }
    };
    let server =
        Server::new(store, identity.clone(), Forward::new(handler), options).expect("server");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    (addr, seen, server.spawn(listener))
}

/// A socket factory counting the TCP connections it makes.
pub(super) fn counting(
    count: &Arc<AtomicUsize>,
) -> impl FnOnce(SocketAddr) -> std::pin::Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send>>
{
    let count = count.clone();
    move |addr| {
        count.fetch_add(1, Ordering::SeqCst);
        Box::pin(TcpStream::connect(addr))
    }
}

pub(super) async fn plain(addr: SocketAddr) -> io::Result<TcpStream> {
    TcpStream::connect(addr).await
}

/// Writes `data` then half-closes, while reading everything back; returns what was read.
pub(super) async fn exchange(stream: TunnelStream, data: Vec<u8>) -> Vec<u8> {
    let (mut read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        write.write_all(&data).await.expect("write");
        write.shutdown().await.expect("half-close");
        write
    });
    let mut received = Vec::new();
    read.read_to_end(&mut received).await.expect("read");
    drop(writer.await.expect("writer"));
    received
}

pub(super) fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..len).map(|_| rng.u8(..)).collect()
}

/// The serial of the certificate the server at `addr` presents to a new connection.
async fn server_serial(
    store: &Arc<CertStore>,
    source: &SpiffeId,
    server: &SpiffeId,
    addr: SocketAddr,
) -> String {
    let config = client_config(store, source, server).expect("config");
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let tls = TlsConnector::from(config)
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .expect("tls");
    let leaf = tls.get_ref().1.peer_certificates().expect("certs")[0].clone();
    cert_info(&leaf).expect("info").serial
}

/// A bare h2 client over mTLS, for requests the pool would never send.
async fn raw_h2(
    store: &Arc<CertStore>,
    source: &SpiffeId,
    server: &SpiffeId,
    addr: SocketAddr,
) -> h2::client::SendRequest<Bytes> {
    let config = client_config(store, source, server).expect("config");
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let tls = TlsConnector::from(config)
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .expect("tls");
    let (send, connection) = h2::client::handshake(tls).await.expect("h2");
    tokio::spawn(connection);
    send
}

/// Status of a request, or the h2 reset reason as an error string.
async fn status_of(
    send: &h2::client::SendRequest<Bytes>,
    request: Request<()>,
) -> Result<StatusCode, String> {
    let mut send = send.clone().ready().await.map_err(|e| e.to_string())?;
    let (response, _body) = send
        .send_request(request, false)
        .map_err(|e| e.to_string())?;
    response
        .await
        .map(|r| r.status())
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_megabytes_each_way_with_half_close_and_the_client_identity() {
    init_logs();
    let ca = new_ca();
    let store = store(ca.ca.clone(), &[&ca]);
    let (server_id, client_id) = (id("server"), id("client"));
    let (tunnel, seen, _server) = start_server(&store, &server_id, ServerOptions::default()).await;
    store.ensure(&client_id).await.expect("client cert");
    let upstream = echo_upstream().await;
    let pool = Pool::new(store.clone(), PoolOptions::default());
    let stream = pool
        .connect(
            &client_id,
            &server_id,
            tunnel,
            upstream,
            &Early::default(),
            plain,
        )
        .await
        .expect("stream");
    let data = pattern(10 * 1024 * 1024, 1);
    let started = std::time::Instant::now();
    let received = exchange(stream, data.clone()).await;
    let elapsed = started.elapsed();
    assert!(
        received == data,
        "echo differs ({} bytes back)",
        received.len()
    );
    eprintln!(
        "10 MiB each way over one tunnel stream in {elapsed:?} ({:.0} MiB/s each way, debug build)",
        10.0 / elapsed.as_secs_f64()
    );
    let seen = seen.lock().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].client_identity, client_id);
    assert_eq!(seen[0].server_identity, server_id);
    assert_eq!(seen[0].authority, upstream);
    assert_eq!(seen[0].peer_addr.ip(), tunnel.ip());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_connection_per_peer_concurrent_streams_share_it_and_idle_ones_close() {
    init_logs();
    let ca = new_ca();
    let store = store(ca.ca.clone(), &[&ca]);
    let (server_id, client_id) = (id("server"), id("client"));
    let (tunnel, seen, _server) = start_server(&store, &server_id, ServerOptions::default()).await;
    store.ensure(&client_id).await.expect("client cert");
    let upstream = echo_upstream().await;
    let pool = Pool::new(
        store.clone(),
        PoolOptions {
            idle_timeout: Duration::from_millis(300),
            connections_per_peer: 1,
            ..PoolOptions::default()
        },
    );
    let sockets = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let (pool, client_id, server_id, sockets) = (
            pool.clone(),
            client_id.clone(),
            server_id.clone(),
            sockets.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let stream = pool
                .connect(
                    &client_id,
                    &server_id,
                    tunnel,
                    upstream,
                    &Early::default(),
                    counting(&sockets),
                )
                .await
                .expect("stream");
            let data = pattern(100_000, i);
            assert!(exchange(stream, data.clone()).await == data);
        }));
    }
    for task in tasks {
        task.await.expect("stream task");
    }
    assert_eq!(sockets.load(Ordering::SeqCst), 1, "one TCP connection");
    assert_eq!(pool.opened_connections(), 1);
    assert_eq!(seen.lock().len(), 64);
    assert_eq!(pool.live_connections(), 1);

    // Idle: closed after the idle timeout, and the next stream opens a new connection.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(pool.live_connections(), 0, "idle connection closed");
    let stream = pool
        .connect(
            &client_id,
            &server_id,
            tunnel,
            upstream,
            &Early::default(),
            counting(&sockets),
        )
        .await
        .expect("stream after idle close");
    assert!(exchange(stream, b"again".to_vec()).await == b"again");
    assert_eq!(sockets.load(Ordering::SeqCst), 2);
}

/// More open streams than the server allows on one connection: the pool opens another
/// connection instead of queueing (or failing) the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_beyond_the_server_limit_open_another_connection() {
    init_logs();
    let ca = new_ca();
    let store = store(ca.ca.clone(), &[&ca]);
    let (server_id, client_id) = (id("server"), id("client"));
    let options = ServerOptions {
        max_concurrent_streams: 4,
        ..ServerOptions::default()
    };
    let (tunnel, _seen, _server) = start_server(&store, &server_id, options).await;
    store.ensure(&client_id).await.expect("client cert");
    let upstream = echo_upstream().await;
    let pool = Pool::new(store.clone(), PoolOptions::default());
    let sockets = Arc::new(AtomicUsize::new(0));
    // Ten streams held open at once, each opened after the previous one answered.
    let mut open = Vec::new();
    for _ in 0..10 {
        let stream = tokio::time::timeout(
            Duration::from_secs(5),
            pool.connect(
                &client_id,
                &server_id,
                tunnel,
                upstream,
                &Early::default(),
                counting(&sockets),
            ),
        )
        .await
        .expect("not queued behind the limit")
        .expect("stream");
        open.push(stream);
    }
    assert_eq!(pool.opened_connections(), 3, "4 + 4 + 2 streams");
    assert_eq!(sockets.load(Ordering::SeqCst), 3);
    for (i, stream) in open.into_iter().enumerate() {
        let data = pattern(1000, i as u64);
        assert!(exchange(stream, data.clone()).await == data, "stream {i}");
    }
}

#[tokio::test]
async fn the_client_refuses_a_server_with_another_identity() {
    init_logs();
    let ca = new_ca();
    let store = store(ca.ca.clone(), &[&ca]);
    let (server_id, client_id) = (id("server"), id("client"));
    let (tunnel, seen, _server) = start_server(&store, &server_id, ServerOptions::default()).await;
    store.ensure(&client_id).await.expect("client cert");
    let upstream = echo_upstream().await;
    let pool = Pool::new(store.clone(), PoolOptions::default());
    let error = pool
        .connect(
            &client_id,
            &id("impostor-check"),
            tunnel,
            upstream,
            &Early::default(),
            plain,
        )
        .await
        .err()
        .expect("refused");
    assert!(matches!(error, PoolError::Tls { .. }), "{error}");
    assert!(error.to_string().contains("is not the expected"), "{error}");
    assert!(seen.lock().is_empty());
}

#[tokio::test]
async fn handler_refusals_reach_the_client_as_status() {
    init_logs();
    let ca = new_ca();
    let store = store(ca.ca.clone(), &[&ca]);
    let (server_id, client_id) = (id("server"), id("client"));
    let (tunnel, _seen, _server) = start_server(&store, &server_id, ServerOptions::default()).await;
    store.ensure(&client_id).await.expect("client cert");
    let pool = Pool::new(store.clone(), PoolOptions::default());
    let forbidden: SocketAddr = "127.0.0.1:1".parse().expect("addr");
    match pool
        .connect(
            &client_id,
            &server_id,
            tunnel,
            forbidden,
            &Early::default(),
            plain,
        )
        .await
    {
        Err(PoolError::Refused { status, .. }) => assert_eq!(status, StatusCode::FORBIDDEN),
        other => panic!("{:?}", other.err()),
    }
    // A closed port: 502, on the same (still usable) connection.
    let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let closed_addr = closed.local_addr().expect("addr");
    drop(closed);
    match pool
        .connect(
            &client_id,
            &server_id,
            tunnel,
            closed_addr,
            &Early::default(),
            plain,
        )
        .await
    {
        Err(PoolError::Refused { status, .. }) => assert_eq!(status, StatusCode::BAD_GATEWAY),
        other => panic!("{:?}", other.err()),
    }
    assert_eq!(pool.opened_connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_bytes_reach_the_app_first_and_in_order() {
    init_logs();
    let ca = new_ca();
    let store = store(ca.ca.clone(), &[&ca]);
    let (server_id, client_id) = (id("server"), id("client"));
    let (tunnel, _seen, _server) = start_server(&store, &server_id, ServerOptions::default()).await;
    store.ensure(&client_id).await.expect("client cert");
    let upstream = echo_upstream().await;
    let pool = Pool::new(store.clone(), PoolOptions::default());
    let first = pattern(3000, 7);
    let early = Early::new(Bytes::from(first.clone()));
    let stream = pool
        .connect(&client_id, &server_id, tunnel, upstream, &early, plain)
        .await
        .expect("stream");
    assert!(!early.may_have_arrived(), "answered with 200");
    // Nothing more is written before the echo of the early bytes comes back: they went with
    // the stream, not through it.
    let (mut read, mut write) = stream.into_split();
    let mut echoed = vec![0; first.len()];
    tokio::time::timeout(Duration::from_secs(5), read.read_exact(&mut echoed))
        .await
        .expect("the early bytes are echoed without another write")
        .expect("read");
    assert_eq!(echoed, first);
    // What the copy writes after them follows them.
    let rest = pattern(200_000, 8);
    write.write_all(&rest).await.expect("write");
    write.shutdown().await.expect("half-close");
    let mut back = Vec::new();
    read.read_to_end(&mut back).await.expect("read");
    assert!(back == rest, "the rest differs ({} bytes back)", back.len());
}

#[tokio::test]
async fn early_bytes_of_a_refused_or_unanswered_stream() {
    init_logs();
    let ca = new_ca();
    let store = store(ca.ca.clone(), &[&ca]);
    let (server_id, client_id) = (id("server"), id("client"));
    let (tunnel, seen, _server) = start_server(&store, &server_id, ServerOptions::default()).await;
    store.ensure(&client_id).await.expect("client cert");
    let pool = Pool::new(
        store.clone(),
        PoolOptions {
            stream_timeout: Duration::from_millis(300),
            ..PoolOptions::default()
        },
    );
    let open = |port: u16, early| {
        let target: SocketAddr = SocketAddr::from(([127, 0, 0, 1], port));
        pool.connect(&client_id, &server_id, tunnel, target, early, plain)
    };
    // Refused (403) or not connected (502): answered, so the bytes never reached an app and
    // another endpoint may have them.
    let forbidden = Early::new(Bytes::from_static(b"GET / HTTP/1.1\r\n\r\n"));
    match open(1, &forbidden).await {
        Err(PoolError::Refused { status, .. }) => assert_eq!(status, StatusCode::FORBIDDEN),
        other => panic!("{:?}", other.err()),
    }
    assert!(!forbidden.may_have_arrived());
    let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let closed_port = closed.local_addr().expect("addr").port();
    drop(closed);
    let unreachable = Early::new(Bytes::from_static(b"hello"));
    match open(closed_port, &unreachable).await {
        Err(PoolError::Refused { status, .. }) => assert_eq!(status, StatusCode::BAD_GATEWAY),
        other => panic!("{:?}", other.err()),
    }
    assert!(!unreachable.may_have_arrived());
    // No answer in time after the bytes went out: they may have arrived.
    let unanswered = Early::new(Bytes::from_static(b"hello"));
    match open(2, &unanswered).await {
        Err(PoolError::Timeout { .. }) => {}
        other => panic!("{:?}", other.err()),
    }
    assert!(unanswered.may_have_arrived());
    // Without early bytes, the same timeout leaves nothing that may have arrived.
    let none = Early::default();
    assert!(open(2, &none).await.is_err());
    assert!(!none.may_have_arrived());
    assert_eq!(seen.lock().len(), 4);
}

/// Tries a client with its own store against the server; returns whether a stream opened.
async fn client_can_connect(
    client_store: &Arc<CertStore>,
    client_id: &SpiffeId,
    server_id: &SpiffeId,
    tunnel: SocketAddr,
    upstream: SocketAddr,
) -> Result<(), PoolError> {
    client_store.ensure(client_id).await.expect("client cert");
    let pool = Pool::new(client_store.clone(), PoolOptions::default());
    let stream = pool
        .connect(
            client_id,
            server_id,
            tunnel,
            upstream,
            &Early::default(),
            plain,
        )
        .await?;
    let back = exchange(stream, b"ping".to_vec()).await;
    assert_eq!(back, b"ping");
    Ok(())
}

#[tokio::test]
async fn clients_of_another_ca_or_outside_their_validity_are_refused() {
    init_logs();
    let ca = new_ca();
    let other = new_ca();
    let server_store = store(ca.ca.clone(), &[&ca]);
    let server_id = id("server");
    let (tunnel, seen, _server) =
        start_server(&server_store, &server_id, ServerOptions::default()).await;
    let upstream = echo_upstream().await;
    let client_id = id("client");

    // Wrong CA: the client trusts the server's root, the server does not trust the client's.
    let foreign = store(other.ca.clone(), &[&ca, &other]);
    let error = client_can_connect(&foreign, &client_id, &server_id, tunnel, upstream)
        .await
        .expect_err("foreign client accepted");
    eprintln!("wrong CA: {error}");

    let expired = store(
        Arc::new(Skewed {
            ca: ca.ca.clone(),
            from_now: (-7200, -3600),
        }),
        &[&ca],
    );
    let error = client_can_connect(&expired, &client_id, &server_id, tunnel, upstream)
        .await
        .expect_err("expired client accepted");
    eprintln!("expired: {error}");

    let early = store(
        Arc::new(Skewed {
            ca: ca.ca.clone(),
            from_now: (3600, 7200),
        }),
        &[&ca],
    );
    let error = client_can_connect(&early, &client_id, &server_id, tunnel, upstream)
        .await
        .expect_err("not-yet-valid client accepted");
    eprintln!("not yet valid: {error}");

    assert!(seen.lock().is_empty(), "no stream got through");
    // The server still serves good clients.
    client_can_connect(&server_store, &client_id, &server_id, tunnel, upstream)
        .await
        .expect("good client");
}

#[tokio::test]
async fn plaintext_and_garbage_are_refused_and_the_server_keeps_serving() {
    init_logs();
    let ca = new_ca();
    let store = store(ca.ca.clone(), &[&ca]);
    let (server_id, client_id) = (id("server"), id("client"));
    let (tunnel, _seen, _server) = start_server(&store, &server_id, ServerOptions::default()).await;
    let upstream = echo_upstream().await;
    for junk in [
        &b"CONNECT 10.0.0.1:80 HTTP/1.1\r\n\r\n"[..],
        &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..],
        &[0x16, 0x03, 0x01, 0xff, 0xff, 0, 0, 0][..],
        &pattern(100_000, 7)[..],
    ] {
        let mut tcp = TcpStream::connect(tunnel).await.expect("connect");
        let _ = tcp.write_all(junk).await;
        let mut reply = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut reply))
            .await
            .expect("the server closes the connection");
        // Either a TLS alert then EOF, or a reset: never an HTTP answer.
        if read.is_ok() {
            assert!(reply.len() < 64, "{} bytes of reply", reply.len());
            assert!(reply.first().is_none_or(|&b| b == 0x15), "{reply:?}");
        }
    }
    client_can_connect(&store, &client_id, &server_id, tunnel, upstream)
        .await
        .expect("still serving");
}

#[tokio::test]
async fn malformed_and_oversized_connects_are_refused() {
    init_logs();
    let ca = new_ca();
    let store = store(ca.ca.clone(), &[&ca]);
    let (server_id, client_id) = (id("server"), id("client"));
    let (tunnel, seen, _server) = start_server(&store, &server_id, ServerOptions::default()).await;
    store.ensure(&client_id).await.expect("client cert");
    let upstream = echo_upstream().await;
    let send = raw_h2(&store, &client_id, &server_id, tunnel).await;
    let request = |method: Method, uri: &str| {
        Request::builder()
            .method(method)
            .version(Version::HTTP_2)
            .uri(uri)
            .body(())
            .expect("request")
    };
    let get = request(Method::GET, &format!("https://{upstream}/"));
    assert_eq!(status_of(&send, get).await, Ok(StatusCode::BAD_REQUEST));
    let name = request(Method::CONNECT, "localhost:80");
    assert_eq!(status_of(&send, name).await, Ok(StatusCode::BAD_REQUEST));
    let no_port = request(Method::CONNECT, "127.0.0.1");
    assert_eq!(status_of(&send, no_port).await, Ok(StatusCode::BAD_REQUEST));
    let zero = request(Method::CONNECT, "0.0.0.0:80");
    assert_eq!(status_of(&send, zero).await, Ok(StatusCode::BAD_REQUEST));
    // h2 itself resets a CONNECT without :authority (it cannot form a request URI): a refusal
    // at the stream level rather than a 400. Either way nothing is connected.
    let no_authority = request(Method::CONNECT, "/");
    let outcome = status_of(&send, no_authority).await;
    assert!(
        matches!(outcome, Ok(StatusCode::BAD_REQUEST)) || outcome.is_err(),
        "{outcome:?}"
    );
    // Over the 8 KiB limit: h2 answers 431 for the stream.
    let mut oversized = request(Method::CONNECT, &upstream.to_string());
    oversized
        .headers_mut()
        .insert("x-padding", "a".repeat(12 * 1024).parse().expect("value"));
    assert_eq!(
        status_of(&send, oversized).await,
        Ok(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
    );
    // Far over it: h2 drops the whole connection (GOAWAY) instead of buffering the block.
    let mut huge = request(Method::CONNECT, &upstream.to_string());
    huge.headers_mut()
        .insert("x-padding", "a".repeat(256 * 1024).parse().expect("value"));
    let outcome = status_of(&send, huge).await;
    assert!(outcome.is_err(), "{outcome:?}");
    assert!(seen.lock().is_empty(), "nothing reached the handler");
    // The connection (or at least the server) still works for a proper CONNECT.
    client_can_connect(&store, &client_id, &server_id, tunnel, upstream)
        .await
        .expect("still serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_keeps_live_streams_and_new_connections_get_the_new_certificate() {
    init_logs();
    let ca = new_ca();
    let store = store(ca.ca.clone(), &[&ca]);
    let (server_id, client_id) = (id("server"), id("client"));
    let (tunnel, _seen, _server) = start_server(&store, &server_id, ServerOptions::default()).await;
    store.ensure(&client_id).await.expect("client cert");
    let upstream = echo_upstream().await;
    let before = server_serial(&store, &client_id, &server_id, tunnel).await;

    // One connection per peer: the second stream, opened while the first is held, must ride
    // the connection made before the rotation.
    let pool = Pool::new(
        store.clone(),
        PoolOptions {
            connections_per_peer: 1,
            ..PoolOptions::default()
        },
    );
    let stream = pool
        .connect(
            &client_id,
            &server_id,
            tunnel,
            upstream,
            &Early::default(),
            plain,
        )
        .await
        .expect("stream");
    let (mut read, mut write) = stream.into_split();
    let mut buf = [0u8; 5];
    write.write_all(b"first").await.expect("write");
    read.read_exact(&mut buf).await.expect("read");
    assert_eq!(&buf, b"first");

    let rotated = store.rotate_now(&server_id).await.expect("server rotated");
    store.rotate_now(&client_id).await.expect("client rotated");
    assert_ne!(rotated.serial, before);
    let after = server_serial(&store, &client_id, &server_id, tunnel).await;
    assert_eq!(
        after, rotated.serial,
        "new connections see the new certificate"
    );

    // The stream on the old connection carries on.
    write
        .write_all(b"after")
        .await
        .expect("write after rotation");
    read.read_exact(&mut buf)
        .await
        .expect("read after rotation");
    assert_eq!(&buf, b"after");
    write.shutdown().await.expect("half-close");
    let mut rest = Vec::new();
    read.read_to_end(&mut rest).await.expect("eof");
    assert!(rest.is_empty());

    // And a new stream still rides the same pooled connection.
    let stream = pool
        .connect(
            &client_id,
            &server_id,
            tunnel,
            upstream,
            &Early::default(),
            plain,
        )
        .await
        .expect("stream");
    assert_eq!(exchange(stream, b"x".to_vec()).await, b"x");
    assert_eq!(pool.opened_connections(), 1);
}

#[tokio::test]
async fn both_roots_of_a_rotation_bundle_are_accepted() {
    init_logs();
    let old = new_ca();
    let new = new_ca();
    let server_store = store(old.ca.clone(), &[&old, &new]);
    let server_id = id("server");
    let (tunnel, seen, _server) =
        start_server(&server_store, &server_id, ServerOptions::default()).await;
    let upstream = echo_upstream().await;
    let on_new_root = store(new.ca.clone(), &[&old, &new]);
    client_can_connect(
        &on_new_root,
        &id("new-client"),
        &server_id,
        tunnel,
        upstream,
    )
    .await
    .expect("client on the new root");
    let on_old_root = store(old.ca.clone(), &[&old, &new]);
    client_can_connect(
        &on_old_root,
        &id("old-client"),
        &server_id,
        tunnel,
        upstream,
    )
    .await
    .expect("client on the old root");
    // A client trusting only the new root refuses the server still on the old one.
    let new_only = store(new.ca.clone(), &[&new]);
    client_can_connect(&new_only, &id("strict"), &server_id, tunnel, upstream)
        .await
        .expect_err("server on the old root accepted");
    assert_eq!(seen.lock().len(), 2);
}
