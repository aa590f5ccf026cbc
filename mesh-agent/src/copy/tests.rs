use std::{
    sync::atomic::{AtomicU64, AtomicUsize, Ordering},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use super::{
    CopyError, INITIAL_BUFFER, Pace, Readable, SMALL_READS_TO_SHRINK, Transferred, halves, resize,
    splice::tests_support::LEASED, spliced, tcp,
};

#[test]
fn buffers_grow_with_full_reads_up_to_the_limit_and_shrink_after_small_ones() {
    let max = 64 * 1024;
    let mut size = INITIAL_BUFFER;
    let mut small = 0;
    // Bulk: every read fills the buffer, which doubles up to the limit.
    let mut sizes = Vec::new();
    for _ in 0..8 {
        let read = size;
        resize(&mut size, read, max, &mut small);
        sizes.push(size / 1024);
    }
    assert_eq!(sizes, [4, 8, 16, 32, 64, 64, 64, 64]);
    // Request/response after it: small reads, then back to the initial size.
    for _ in 0..SMALL_READS_TO_SHRINK - 1 {
        resize(&mut size, 100, max, &mut small);
    }
    assert_eq!(size, max, "not before a run of small reads");
    resize(&mut size, 100, max, &mut small);
    assert_eq!(size, INITIAL_BUFFER);
    // A medium read breaks a run of small ones.
    let mut size = max;
    for i in 0..SMALL_READS_TO_SHRINK * 2 {
        let read = if i % 10 == 9 { max / 2 } else { 100 };
        resize(&mut size, read, max, &mut small);
    }
    assert_eq!(size, max);
    // Never above a small configured limit.
    let mut size = 1024;
    resize(&mut size, 1024, 1024, &mut small);
    assert_eq!(size, 1024);
}

/// A connected pair of loopback sockets.
pub(super) async fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
    (client.expect("connect"), server.expect("accept").0)
}

#[tokio::test]
async fn half_close_passes_through_and_the_reply_still_flows() {
    let (mut app, mut proxy_down) = pair().await;
    let (mut proxy_up, mut server) = pair().await;
    let proxy = tokio::spawn(async move {
        let moved = Transferred::default();
        let result = tcp(
            &mut proxy_down,
            &mut proxy_up,
            1024,
            Duration::from_secs(5),
            &moved,
            (&(), &()),
        )
        .await;
        result.map(|()| moved.get())
    });
    let request = vec![7u8; 100_000];
    app.write_all(&request).await.expect("write");
    app.shutdown().await.expect("half-close");
    let mut received = Vec::new();
    server
        .read_to_end(&mut received)
        .await
        .expect("server reads to EOF");
    assert_eq!(received, request);
    server.write_all(b"reply after EOF").await.expect("reply");
    server.shutdown().await.expect("server half-close");
    let mut reply = Vec::new();
    app.read_to_end(&mut reply).await.expect("app reads reply");
    assert_eq!(reply, b"reply after EOF");
    let moved = proxy.await.expect("join").expect("copy");
    assert_eq!(moved, (100_000, 15));
}

#[tokio::test]
async fn an_idle_connection_is_closed_and_its_bytes_are_still_counted() {
    for splice in [false, true] {
        let (mut app, mut proxy_down) = pair().await;
        let (mut proxy_up, mut server) = pair().await;
        app.write_all(b"hello").await.expect("write");
        let moved = Transferred::default();
        let copy = copy_pair(
            (&mut proxy_down, &mut proxy_up),
            1024,
            Duration::from_millis(200),
            &moved,
            (&(), &()),
            splice,
        );
        let (result, _) = tokio::join!(copy, async {
            let mut hello = [0u8; 5];
            server.read_exact(&mut hello).await.expect("read");
            server.write_all(b"hi").await.expect("reply");
        });
        assert!(matches!(result, Err(CopyError::Idle(_))), "{result:?}");
        assert_eq!(moved.get(), (5, 2), "splice: {splice}");
        assert_eq!(LEASED.with(|n| n.get()), 0, "no pipe held");
    }
}

/// Copies a TCP pair through buffers or, with `splice`, through pipes: what holds for both
/// is tested on both.
async fn copy_pair(
    (downstream, upstream): (&mut TcpStream, &mut TcpStream),
    buffer_bytes: usize,
    idle_timeout: Duration,
    moved: &Transferred,
    pace: (&impl Pace, &impl Pace),
    splice: bool,
) -> Result<(), CopyError> {
    if splice {
        let (down, up) = (downstream.split(), upstream.split());
        spliced(down, up, buffer_bytes, idle_timeout, moved, pace).await
    } else {
        tcp(
            downstream,
            upstream,
            buffer_bytes,
            idle_timeout,
            moved,
            pace,
        )
        .await
    }
}

/// A read half that counts the waits the copy made on it without a buffer.
struct Watched<'a> {
    inner: tokio::net::tcp::ReadHalf<'a>,
    waits: &'a AtomicUsize,
}

impl tokio::io::AsyncRead for Watched<'_> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl Readable for Watched<'_> {
    fn poll_readable(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.waits.fetch_add(1, Ordering::Relaxed);
        self.inner.poll_readable(cx)
    }
}

#[tokio::test]
async fn an_idle_direction_waits_for_data_without_a_buffer() {
    let (mut app, mut proxy_down) = pair().await;
    let (mut proxy_up, mut server) = pair().await;
    let waits = AtomicUsize::new(0);
    let moved = Transferred::default();
    let (down_read, down_write) = proxy_down.split();
    let copy = halves(
        (
            Watched {
                inner: down_read,
                waits: &waits,
            },
            down_write,
        ),
        proxy_up.split(),
        64 * 1024,
        Duration::from_secs(5),
        &moved,
        (&(), &()),
    );
    let peers = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let idle_waits = waits.load(Ordering::Relaxed);
        app.write_all(b"after a pause").await.expect("write");
        let mut got = [0u8; 13];
        server.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"after a pause");
        app.shutdown().await.expect("half-close");
        server.shutdown().await.expect("server half-close");
        idle_waits
    };
    let (result, idle_waits) = tokio::join!(copy, peers);
    result.expect("copy");
    assert!(idle_waits >= 1, "the idle direction waited in a read");
    assert_eq!(moved.get(), (13, 0));
}

/// Counts what it is asked for, and the largest single request.
#[derive(Default)]
struct Counting {
    pub bytes: AtomicU64,
    pub largest: AtomicUsize,
}

impl Pace for Counting {
    async fn pace(&self, bytes: usize) {
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.largest.fetch_max(bytes, Ordering::Relaxed);
    }
}

#[tokio::test]
async fn each_direction_is_paced_for_every_byte_it_writes() {
    for splice in [false, true] {
        let (mut app, mut proxy_down) = pair().await;
        let (mut proxy_up, mut server) = pair().await;
        let (to_server, to_client) = (Counting::default(), Counting::default());
        let moved = Transferred::default();
        let copy = copy_pair(
            (&mut proxy_down, &mut proxy_up),
            4096,
            Duration::from_secs(5),
            &moved,
            (&to_server, &to_client),
            splice,
        );
        let peers = async {
            app.write_all(&[1u8; 50_000]).await.expect("write");
            app.shutdown().await.expect("half-close");
            let mut received = Vec::new();
            server.read_to_end(&mut received).await.expect("read");
            server.write_all(&[2u8; 300]).await.expect("reply");
            server.shutdown().await.expect("server half-close");
            let mut reply = Vec::new();
            app.read_to_end(&mut reply).await.expect("read reply");
            (received.len(), reply.len())
        };
        let (result, received) = tokio::join!(copy, peers);
        result.expect("copy");
        assert_eq!(received, (50_000, 300), "splice: {splice}");
        assert_eq!(to_server.bytes.load(Ordering::Relaxed), 50_000);
        assert_eq!(to_client.bytes.load(Ordering::Relaxed), 300);
        assert!(to_server.largest.load(Ordering::Relaxed) <= 4096);
    }
}
