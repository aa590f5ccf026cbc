//! The pool's spreading of streams over several connections per peer, and what it does when
//! one of them dies.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use parking_lot::Mutex;
use tokio::{
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

use crate::tunnel::{
    Early, Pool, PoolOptions, ServerOptions, TunnelStream,
    tests::{
        Seen, counting, echo_upstream, exchange, id, init_logs, new_ca, pattern, start_server,
        store,
    },
};
use crate::{test_support::eventually, tls::SpiffeId};

/// A server, an echo upstream, a pool with `per_peer` connections per peer and the
/// identities to use it.
struct Setup {
    pool: Pool,
    tunnel: SocketAddr,
    upstream: SocketAddr,
    seen: Seen,
    client: SpiffeId,
    server: SpiffeId,
    _server_task: JoinHandle<()>,
    _ca: crate::tunnel::tests::Ca,
}

async fn setup(per_peer: usize) -> Setup {
    init_logs();
    let ca = new_ca();
    let store = store(ca.ca.clone(), &[&ca]);
    let (server, client) = (id("server"), id("client"));
    let (tunnel, seen, server_task) = start_server(&store, &server, ServerOptions::default()).await;
    store.ensure(&client).await.expect("client cert");
    let pool = Pool::new(
        store.clone(),
        PoolOptions {
            connections_per_peer: per_peer,
            ..PoolOptions::default()
        },
    );
    Setup {
        pool,
        tunnel,
        upstream: echo_upstream().await,
        seen,
        client,
        server,
        _server_task: server_task,
        _ca: ca,
    }
}

impl Setup {
    async fn open(&self, sockets: &Arc<AtomicUsize>) -> TunnelStream {
        tokio::time::timeout(
            Duration::from_secs(5),
            self.pool.connect(
                &self.client,
                &self.server,
                self.tunnel,
                self.upstream,
                &Early::default(),
                counting(sockets),
            ),
        )
        .await
        .expect("in time")
        .expect("stream")
    }

    /// `n` streams opened one after the other and all held open.
    async fn open_held(&self, n: usize, sockets: &Arc<AtomicUsize>) -> Vec<TunnelStream> {
        let mut open = Vec::with_capacity(n);
        for _ in 0..n {
            open.push(self.open(sockets).await);
        }
        open
    }

    /// Streams the server saw per tunnel connection (by the connection's peer address).
    fn streams_per_connection(&self) -> Vec<usize> {
        let mut per: HashMap<SocketAddr, usize> = HashMap::new();
        for request in self.seen.lock().iter() {
            *per.entry(request.peer_addr).or_default() += 1;
        }
        let mut counts: Vec<usize> = per.into_values().collect();
        counts.sort_unstable();
        counts
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_stream_at_a_time_keeps_one_connection() {
    let setup = setup(4).await;
    let sockets = Arc::new(AtomicUsize::new(0));
    for i in 0..5 {
        let stream = setup.open(&sockets).await;
        let data = pattern(10_000, i);
        assert!(exchange(stream, data.clone()).await == data);
    }
    assert_eq!(setup.pool.opened_connections(), 1);
    assert_eq!(sockets.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_are_spread_over_the_connections_per_peer() {
    let setup = setup(3).await;
    let sockets = Arc::new(AtomicUsize::new(0));
    let open = setup.open_held(6, &sockets).await;
    assert_eq!(
        setup.pool.opened_connections(),
        3,
        "no more than 3 per peer"
    );
    assert_eq!(setup.pool.live_connections(), 3);
    assert_eq!(
        setup.streams_per_connection(),
        vec![2, 2, 2],
        "each new stream on the connection with the fewest"
    );
    let copies: Vec<_> = open
        .into_iter()
        .enumerate()
        .map(|(i, stream)| {
            tokio::spawn(async move {
                let data = pattern(300_000, i as u64);
                exchange(stream, data.clone()).await == data
            })
        })
        .collect();
    for (i, copy) in copies.into_iter().enumerate() {
        assert!(copy.await.expect("copy task"), "stream {i}");
    }
    assert_eq!(sockets.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_extra_connections_close_soon_after_their_streams_and_the_oldest_stays_warm() {
    let setup = setup(3).await;
    let sockets = Arc::new(AtomicUsize::new(0));
    let open = setup.open_held(6, &sockets).await;
    assert_eq!(setup.pool.live_connections(), 3);
    for (i, stream) in open.into_iter().enumerate() {
        let data = pattern(1_000, i as u64);
        assert!(exchange(stream, data.clone()).await == data, "stream {i}");
    }
    eventually(
        "the two extra connections closed within 5 s of their last stream",
        || setup.pool.live_connections() == 1,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(setup.pool.live_connections(), 1, "the oldest stays open");
    let data = pattern(1_000, 9);
    assert!(exchange(setup.open(&sockets).await, data.clone()).await == data);
    assert_eq!(
        setup.pool.opened_connections(),
        3,
        "the next stream reused it"
    );
    assert_eq!(
        setup.streams_per_connection(),
        vec![2, 2, 3],
        "on the first connection"
    );
}

/// A TCP relay to `to` whose links (one per accepted connection, in order) can be cut.
struct Relay {
    addr: SocketAddr,
    links: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

async fn relay(to: SocketAddr) -> Relay {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let links: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
    let record = links.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let link = tokio::spawn(async move {
                if let Ok(mut server) = TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
            record.lock().push(link);
        }
    });
    Relay { addr, links }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_connection_among_them_is_dropped_and_the_others_carry_on() {
    let setup = setup(2).await;
    let relay = relay(setup.tunnel).await;
    let early = Early::default();
    let open = |relay_addr: SocketAddr| {
        setup.pool.connect(
            &setup.client,
            &setup.server,
            setup.tunnel,
            setup.upstream,
            &early,
            move |_| TcpStream::connect(relay_addr),
        )
    };
    let first = open(relay.addr).await.expect("first stream");
    let second = open(relay.addr).await.expect("second stream");
    assert_eq!(setup.pool.live_connections(), 2);

    // Cut the first connection: the pool notices and drops it.
    relay.links.lock()[0].abort();
    tokio::time::timeout(Duration::from_secs(5), async {
        while setup.pool.live_connections() != 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the dead connection is dropped");
    let data = pattern(1000, 1);
    let (mut read, _write) = first.into_split();
    let mut buf = [0u8; 16];
    let ended = tokio::io::AsyncReadExt::read(&mut read, &mut buf).await;
    assert!(
        matches!(ended, Ok(0) | Err(_)),
        "the cut stream ends: {ended:?}"
    );

    // The other connection's stream is untouched.
    assert!(exchange(second, data.clone()).await == data);
    // New streams go on the live connection and, with concurrency, on one new connection.
    let mut more = Vec::new();
    for _ in 0..4 {
        more.push(open(relay.addr).await.expect("stream after the cut"));
    }
    assert_eq!(setup.pool.live_connections(), 2);
    assert_eq!(setup.pool.opened_connections(), 3);
    for (i, stream) in more.into_iter().enumerate() {
        let data = pattern(50_000, i as u64);
        assert!(exchange(stream, data.clone()).await == data, "stream {i}");
    }
}

/// A stream dropped while it opens another connection (its caller's timeout) does not stop
/// the next one from opening it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_growth_lets_the_next_stream_grow() {
    let setup = setup(2).await;
    let sockets = Arc::new(AtomicUsize::new(0));
    let _first = setup.open(&sockets).await;
    let early = Early::default();
    let stalled = setup.pool.connect(
        &setup.client,
        &setup.server,
        setup.tunnel,
        setup.upstream,
        &early,
        |_| std::future::pending::<std::io::Result<TcpStream>>(),
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(200), stalled)
            .await
            .is_err(),
        "the socket never comes"
    );
    let _second = setup.open(&sockets).await;
    assert_eq!(setup.pool.opened_connections(), 2, "grown after all");
    assert_eq!(sockets.load(Ordering::SeqCst), 2);
}
