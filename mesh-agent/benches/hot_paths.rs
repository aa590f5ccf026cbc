//! Micro-benchmarks of the agent's per-connection hot pieces: `cargo bench -p mesh-agent`.
//!
//! - balancer pick (round robin over a service port's endpoints);
//! - the outbound route decision (VIP lookup + pick) on a realistic config snapshot;
//! - the original-destination flow key encoding and its decoding;
//! - the copy loop between two loopback TCP connections (throughput).
//!
//! Each is kept short (small sample sizes, short measurement times).

use std::{
    hint::black_box,
    net::SocketAddr,
    time::{Duration, Instant},
};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mesh_agent::{
    balance::{Balancer, RoundRobin},
    config::{Config, Endpoint},
    copy::{Transferred, tcp as copy_tcp},
    ebpf::{decode_addr, flow_key},
    proxy::route,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// A node with `pods` server pods behind one service, plus a client, and `extra` more
/// services so the VIP lookup is not in a trivially small table.
fn config(pods: usize, extra: usize) -> Config {
    let mut yaml = String::from(
        "agent:\n  node: node-a\n  bpfName: bench\nworkloads:\n  - name: client\n    namespace: demo\n    ips: [10.1.0.2]\n    node: node-a\n    netns: /var/run/netns/client\n    labels: {app: client}\n",
    );
    for i in 0..pods {
        yaml.push_str(&format!(
            "  - name: server-{i}\n    namespace: demo\n    ips: [10.1.1.{}]\n    node: node-{}\n    netns: /var/run/netns/server-{i}\n    labels: {{app: echo}}\n",
            i + 1,
            if i % 2 == 0 { "a" } else { "b" },
        ));
    }
    yaml.push_str("services:\n  - name: echo\n    namespace: demo\n    vips: [10.96.0.10]\n    ports:\n      - port: 80\n        targetPort: 8080\n    endpoints:\n      selector: {app: echo}\n");
    for i in 0..extra {
        yaml.push_str(&format!(
            "  - name: other-{i}\n    namespace: demo\n    vips: [10.96.{}.{}]\n    ports:\n      - port: 80\n        targetPort: 8080\n    endpoints:\n      selector: {{app: echo}}\n",
            1 + i / 250,
            1 + i % 250,
        ));
    }
    Config::from_yaml_str(&yaml, "bench.yaml").expect("the bench config is valid")
}

fn balancer(c: &mut Criterion) {
    let endpoints: Vec<Endpoint> = (1..=8)
        .map(|i| Endpoint {
            addr: format!("10.1.1.{i}:8080").parse().expect("valid"),
            workload: None,
            node: None,
            local: true,
        })
        .collect();
    let candidates: Vec<&Endpoint> = endpoints.iter().collect();
    let rr = RoundRobin::default();
    c.bench_function("balance/round_robin_pick_8", |b| {
        b.iter(|| rr.pick(black_box("demo/echo:80"), black_box(&candidates)))
    });
}

fn route_decision(c: &mut Criterion) {
    let config = config(8, 200);
    let source = config
        .workloads()
        .iter()
        .find(|w| w.name == "client")
        .expect("client workload");
    let rr = RoundRobin::default();
    let vip: SocketAddr = "10.96.0.10:80".parse().expect("valid");
    let pod: SocketAddr = "10.1.1.3:8080".parse().expect("valid");
    let outside: SocketAddr = "192.0.2.1:443".parse().expect("valid");
    let mut group = c.benchmark_group("route/outbound");
    group.bench_function("service_vip", |b| {
        b.iter(|| route::outbound(&config, source, black_box(vip), &rr))
    });
    group.bench_function("pod_ip", |b| {
        b.iter(|| route::outbound(&config, source, black_box(pod), &rr))
    });
    group.bench_function("passthrough", |b| {
        b.iter(|| route::outbound(&config, source, black_box(outside), &rr))
    });
    group.finish();
}

fn flow_keys(c: &mut Criterion) {
    let v4: SocketAddr = "10.1.0.2:43210".parse().expect("valid");
    let v6: SocketAddr = "[fd00:1::2]:43210".parse().expect("valid");
    let mut group = c.benchmark_group("ebpf/flow_key");
    group.bench_function("encode_v4", |b| {
        b.iter(|| flow_key(black_box(0x1234_5678_9abc), black_box(v4)))
    });
    group.bench_function("encode_v6", |b| {
        b.iter(|| flow_key(black_box(0x1234_5678_9abc), black_box(v6)))
    });
    let key4 = flow_key(1, v4);
    let key6 = flow_key(1, v6);
    group.bench_function("decode_v4", |b| {
        b.iter(|| decode_addr(black_box(&key4.src)))
    });
    group.bench_function("decode_v6", |b| {
        b.iter(|| decode_addr(black_box(&key6.src)))
    });
    group.finish();
}

/// A connected pair of loopback sockets.
async fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
    (client.expect("connect"), server.expect("accept").0)
}

/// Pushes `bytes` from an app through the copy loop to a sink and back-acknowledges EOF.
async fn copy_once(bytes: usize, buffer: usize) -> Duration {
    let (mut app, mut proxy_down) = pair().await;
    let (mut proxy_up, mut sink) = pair().await;
    let proxy = tokio::spawn(async move {
        copy_tcp(
            &mut proxy_down,
            &mut proxy_up,
            buffer,
            Duration::from_secs(30),
            &Transferred::default(),
        )
        .await
    });
    let sink = tokio::spawn(async move {
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0usize;
        loop {
            let n = sink.read(&mut buf).await.expect("sink read");
            if n == 0 {
                break;
            }
            total += n;
        }
        sink.shutdown().await.expect("sink shutdown");
        total
    });
    let chunk = vec![0x5au8; 256 * 1024];
    let start = Instant::now();
    let mut sent = 0;
    while sent < bytes {
        let n = chunk.len().min(bytes - sent);
        app.write_all(&chunk[..n]).await.expect("app write");
        sent += n;
    }
    app.shutdown().await.expect("app shutdown");
    let received = sink.await.expect("sink task");
    let mut rest = Vec::new();
    app.read_to_end(&mut rest).await.expect("app read EOF");
    let elapsed = start.elapsed();
    proxy.await.expect("proxy task").expect("copy");
    assert_eq!(received, bytes);
    elapsed
}

fn copy_loop(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    const BYTES: usize = 64 * 1024 * 1024;
    let mut group = c.benchmark_group("proxy/copy_bidirectional");
    group.throughput(Throughput::Bytes(BYTES as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_millis(500));
    for buffer in [16 * 1024, 64 * 1024] {
        group.bench_function(format!("loopback_64MiB_buf{}k", buffer / 1024), |b| {
            b.iter_custom(|iters| {
                runtime.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        total += copy_once(BYTES, buffer).await;
                    }
                    total
                })
            })
        });
    }
    group.finish();
}

fn short() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(30)
}

criterion_group! {
    name = hot;
    config = short();
    targets = balancer, route_decision, flow_keys, copy_loop
}
criterion_main!(hot);
