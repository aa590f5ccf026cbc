use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{
    CopyError, Transferred,
    splice::tests_support::{LEASED, pooled_capacities},
    spliced,
    tests::pair,
};

/// Bytes that differ by position, so a reordered or lost run shows.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ (i >> 13) as u8 ^ seed)
        .collect()
}

/// The pipes this (test) thread holds for copies right now.
fn leased() -> usize {
    LEASED.with(|n| n.get())
}

/// Pipe file descriptors open in the process.
fn open_pipes() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("fds")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("pipe:"))
        .count()
}

#[tokio::test]
async fn bytes_arrive_intact_both_ways_and_half_close_passes_through() {
    let (mut app, mut proxy_down) = pair().await;
    let (mut proxy_up, mut server) = pair().await;
    let moved = Transferred::default();
    let copy = spliced(
        proxy_down.split(),
        proxy_up.split(),
        64 * 1024,
        Duration::from_secs(10),
        &moved,
        (&(), &()),
    );
    let request = pattern(3_000_001, 1);
    let response = pattern(700_003, 2);
    let peers = async {
        let send = async {
            app.write_all(&request).await.expect("write");
            app.shutdown().await.expect("half-close");
        };
        let serve = async {
            let mut received = Vec::new();
            server.read_to_end(&mut received).await.expect("server EOF");
            // The reply only after the client's EOF: the other direction still flows.
            server.write_all(&response).await.expect("reply");
            server.shutdown().await.expect("server half-close");
            received
        };
        let ((), received) = tokio::join!(send, serve);
        let mut reply = Vec::new();
        app.read_to_end(&mut reply).await.expect("client EOF");
        (received, reply)
    };
    let (result, (received, reply)) = tokio::join!(copy, peers);
    result.expect("copy");
    assert!(received == request, "request corrupted");
    assert!(reply == response, "response corrupted");
    assert_eq!(moved.get(), (3_000_001, 700_003));
    assert_eq!(leased(), 0, "pipes given back");
}

#[tokio::test]
async fn a_large_transfer_is_counted_to_the_byte() {
    let (mut app, mut proxy_down) = pair().await;
    let (mut proxy_up, mut server) = pair().await;
    let moved = Transferred::default();
    let copy = spliced(
        proxy_down.split(),
        proxy_up.split(),
        64 * 1024,
        Duration::from_secs(30),
        &moved,
        (&(), &()),
    );
    let block = pattern(1 << 20, 3);
    const BLOCKS: usize = 256;
    let peers = async {
        let send = async {
            for _ in 0..BLOCKS {
                app.write_all(&block).await.expect("write");
            }
            app.shutdown().await.expect("half-close");
        };
        let receive = async {
            let mut got = vec![0u8; block.len()];
            for i in 0..BLOCKS {
                server.read_exact(&mut got).await.expect("read");
                assert!(got == block, "block {i} corrupted");
            }
            assert_eq!(server.read(&mut got).await.expect("EOF"), 0);
            server.shutdown().await.expect("server half-close");
        };
        tokio::join!(send, receive);
    };
    let (result, ()) = tokio::join!(copy, peers);
    result.expect("copy");
    assert_eq!(moved.get(), ((BLOCKS << 20) as u64, 0));
}

#[tokio::test]
async fn a_peer_that_stops_reading_stops_the_copy_with_one_pipe_in_flight() {
    let (mut app, mut proxy_down) = pair().await;
    let (mut proxy_up, mut server) = pair().await;
    let moved = Transferred::default();
    let copy = spliced(
        proxy_down.split(),
        proxy_up.split(),
        64 * 1024,
        Duration::from_secs(30),
        &moved,
        (&(), &()),
    );
    let data = pattern(64 << 20, 4);
    let peers = async {
        let mut written = 0;
        // `write` (not `write_all`) so that what went out is known when the timeout drops it.
        let writing = async {
            while written < data.len() {
                written += app.write(&data[written..]).await.expect("write");
            }
        };
        // The server reads nothing: the writes stall well before 64 MiB.
        let stalled = tokio::time::timeout(Duration::from_millis(1500), writing).await;
        assert!(
            stalled.is_err(),
            "all 64 MiB went through to a peer not reading"
        );
        let before = moved.get().0;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let after = moved.get().0;
        assert_eq!(before, after, "still moving to a peer that does not read");
        assert!(leased() <= 1, "one pipe at most for the stalled direction");
        // The agent holds at most that pipe: the rest waits in the sockets' queues.
        assert!(after < data.len() as u64 / 2, "{after} moved");
        // The peer reads again: everything arrives, in order.
        let rest = async {
            app.write_all(&data[written..]).await.expect("write rest");
            app.shutdown().await.expect("half-close");
        };
        let receive = async {
            let mut received = Vec::new();
            server.read_to_end(&mut received).await.expect("read");
            server.shutdown().await.expect("server half-close");
            received
        };
        let ((), received) = tokio::join!(rest, receive);
        received
    };
    let (result, received) = tokio::join!(copy, peers);
    result.expect("copy");
    assert!(received == data, "data corrupted after the stall");
    assert_eq!(moved.get().0, data.len() as u64);
}

#[tokio::test]
async fn idle_connections_hold_no_pipe() {
    const CONNECTIONS: usize = 200;
    let pipes_before = open_pipes();
    let mut peers = Vec::new();
    let mut copies = tokio::task::JoinSet::new();
    for _ in 0..CONNECTIONS {
        let (app, mut proxy_down) = pair().await;
        let (mut proxy_up, server) = pair().await;
        copies.spawn(async move {
            let moved = Transferred::default();
            spliced(
                proxy_down.split(),
                proxy_up.split(),
                64 * 1024,
                Duration::from_secs(30),
                &moved,
                (&(), &()),
            )
            .await
        });
        peers.push((app, server));
    }
    // One burst each way on every connection, large enough to be spliced, then nothing.
    let burst = pattern(100_000, 5);
    let mut got = vec![0u8; burst.len()];
    for (app, server) in &mut peers {
        app.write_all(&burst).await.expect("write");
        server.read_exact(&mut got).await.expect("read");
        assert!(got == burst);
        server.write_all(&burst).await.expect("reply");
        app.read_exact(&mut got).await.expect("read reply");
        assert!(got == burst);
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(leased(), 0, "an idle direction holds no pipe");
    let grown = open_pipes().saturating_sub(pipes_before);
    // At most this thread's pool (8 pipes, 16 fds), and what tests on other threads hold
    // meanwhile; one pipe per idle direction would be 800.
    assert!(
        grown <= 48,
        "{grown} pipe fds for {CONNECTIONS} idle connections"
    );
    drop(peers);
    while let Some(ended) = copies.join_next().await {
        let ended = ended.expect("join");
        assert!(matches!(ended, Ok(()) | Err(CopyError::Io(_))), "{ended:?}");
    }
}

/// Copies `len` bytes one way through a spliced copy whose `bufferBytes` is `limit`, and
/// checks they arrive intact.
async fn one_way(len: usize, limit: usize) {
    let (mut app, mut proxy_down) = pair().await;
    let (mut proxy_up, mut server) = pair().await;
    let moved = Transferred::default();
    let copy = spliced(
        proxy_down.split(),
        proxy_up.split(),
        limit,
        Duration::from_secs(30),
        &moved,
        (&(), &()),
    );
    let data = pattern(len, 5);
    let peers = async {
        let send = async {
            app.write_all(&data).await.expect("write");
            app.shutdown().await.expect("half-close");
        };
        let receive = async {
            let mut received = Vec::new();
            server.read_to_end(&mut received).await.expect("server EOF");
            server.shutdown().await.expect("server half-close");
            received
        };
        tokio::join!(send, receive).1
    };
    let (result, received) = tokio::join!(copy, peers);
    result.expect("copy");
    assert!(
        received == data,
        "{} of {len} bytes, or corrupted",
        received.len()
    );
}

#[tokio::test]
async fn a_bulk_burst_grows_its_pipe_unless_the_buffer_setting_is_small() {
    // bufferBytes below a new pipe's 64 KiB caps each splice, and no pipe grows.
    one_way(8 << 20, 16 * 1024).await;
    let small = pooled_capacities();
    assert!(!small.is_empty(), "a pipe went back to the pool");
    assert!(small.iter().all(|&c| c == 64 * 1024), "{small:?}");
    // With the default, a splice that fills the pipe grows it to 1 MiB (kept in the pool).
    one_way(8 << 20, 64 * 1024).await;
    let grown = pooled_capacities();
    assert!(grown.contains(&(1 << 20)), "{grown:?}");
    assert_eq!(leased(), 0, "pipes given back");
}
