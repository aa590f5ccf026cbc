//! Micro-benchmarks of the agent's per-connection hot pieces: `cargo bench -p mesh-agent`.
//!
//! - balancer pick, per algorithm, at 10 and 1,000 endpoints (half of them on this node), and
//!   a reload that rebuilds a Maglev table of 1,000 endpoints;
//! - the outbound route decision (VIP lookup + pick) on a realistic config snapshot;
//! - the original-destination flow key encoding and its decoding;
//! - the copy loop between two loopback TCP connections (throughput);
//! - one connection-limit check (`Limits::admit`) with 100,000 source buckets present;
//! - building a whole snapshot from YAML (parse and validate) at 1,000 workloads / 10,000
//!   services and 3,000 / 30,000: the ratio of the two shows how the build scales (about 3x
//!   the work should take about 3x the time);
//! - the Kubernetes source at 30,000 Services (one EndpointSlice each) and 5,000 pods: the
//!   initial sync (every object translated, then one build) and a full rebuild from the
//!   translated pieces (what every change costs until the build is incremental).
//!
//! Each is kept short (small sample sizes, short measurement times).

use std::{
    collections::BTreeMap,
    hint::black_box,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use kube::{core::DynamicObject, runtime::watcher::Event};
use mesh_agent::{
    balance::{Balancers, Caller},
    config::{
        AgentConfig, Config, HashOn, LoadBalancer, OnLimit, PerSource, Rate, RateLimitPolicy,
    },
    copy::{Transferred, tcp as copy_tcp},
    ebpf::{decode_addr, flow_key},
    k8s::{
        ObjectKind, PodLocator,
        build::{BuildCache, build},
        locate::Sandboxes,
        store::{ApplyContext, Stores},
    },
    limit::{Limits, SourceKey},
    metrics::Metrics,
    proxy::route,
};
use serde_json::json;
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

/// A client on node-a and `pods` endpoints of service `demo/echo`, every other one on node-a.
fn balance_config(pods: usize, algorithm: LoadBalancer) -> Config {
    let mut yaml = String::from(
        "agent: {node: node-a}\nworkloads:\n  - {name: client, namespace: demo, ips: [10.0.0.2], node: node-a, netns: /n/client, labels: {app: client}}\n",
    );
    for i in 0..pods {
        yaml.push_str(&format!(
            "  - {{name: server-{i}, namespace: demo, ips: [10.1.{}.{}], node: node-{}, netns: /n/s{i}, labels: {{app: echo}}}}\n",
            i / 250,
            i % 250 + 1,
            if i % 2 == 0 { "a" } else { "b" },
        ));
    }
    yaml.push_str("services:\n  - {name: echo, namespace: demo, vips: [10.96.0.10], ports: [{port: 80, targetPort: 8080}], endpoints: {selector: {app: echo}}}\n");
    let mut config = Config::from_yaml_str(&yaml, "bench.yaml").expect("the bench config is valid");
    std::sync::Arc::make_mut(&mut std::sync::Arc::make_mut(&mut config.services[0]).traffic)
        .load_balancer = algorithm;
    config
}

fn balancer(c: &mut Criterion) {
    let algorithms = [
        ("round_robin", LoadBalancer::RoundRobin),
        ("random", LoadBalancer::Random),
        ("weighted", LoadBalancer::Weighted),
        ("least_connections", LoadBalancer::LeastConnections),
        ("peak_ewma", LoadBalancer::PeakEwma),
        (
            "maglev",
            LoadBalancer::Maglev {
                hash_on: HashOn::SourceIp,
            },
        ),
    ];
    let mut group = c.benchmark_group("balance/pick");
    for pods in [10, 1000] {
        for (name, algorithm) in algorithms {
            let config = balance_config(pods, algorithm);
            let client = &config.workloads()[0];
            let balancers = Balancers::new();
            balancers.sync(&config);
            let balancer = balancers.get("demo/echo", 80).expect("balancer");
            let caller = Caller {
                ip: client.ips[0],
                identity: Some(&client.identity),
                labels: &client.labels,
                ipv4: true,
            };
            // A pick and its drop (the connect resolved, pending released).
            group.bench_function(format!("{name}/{pods}"), |b| {
                b.iter(|| {
                    balancer
                        .pick(black_box(&caller), &[])
                        .map(|p| p.endpoint().addr)
                })
            });
        }
    }
    // One endpoint marked down: every pick scans the port's endpoints for availability.
    let config = balance_config(1000, LoadBalancer::PeakEwma);
    let client = &config.workloads()[0];
    let balancers = Balancers::new();
    balancers.sync(&config);
    let balancer = balancers.get("demo/echo", 80).expect("balancer");
    balancer.set_health(config.services[0].ports[0].endpoints[0].addr, false);
    let caller = Caller {
        ip: client.ips[0],
        identity: Some(&client.identity),
        labels: &client.labels,
        ipv4: true,
    };
    group.bench_function("peak_ewma/1000_one_unhealthy", |b| {
        b.iter(|| {
            balancer
                .pick(black_box(&caller), &[])
                .map(|p| p.endpoint().addr)
        })
    });
    group.finish();
    // A reload that changes the endpoint set: the picker and its Maglev table are rebuilt.
    let maglev = LoadBalancer::Maglev {
        hash_on: HashOn::SourceIp,
    };
    let full = balance_config(1000, maglev);
    let mut fewer = full.clone();
    std::sync::Arc::make_mut(&mut fewer.services[0]).ports[0]
        .endpoints
        .pop();
    let balancers = Balancers::new();
    let mut flip = false;
    c.bench_function("balance/sync_maglev_1000", |b| {
        b.iter(|| {
            flip = !flip;
            balancers.sync(if flip { &full } else { &fewer });
        })
    });
}

fn route_decision(c: &mut Criterion) {
    let config = config(8, 200);
    let source = config
        .workloads()
        .iter()
        .find(|w| w.name == "client")
        .expect("client workload");
    let balancers = Balancers::new();
    balancers.sync(&config);
    let vip: SocketAddr = "10.96.0.10:80".parse().expect("valid");
    let pod: SocketAddr = "10.1.1.3:8080".parse().expect("valid");
    let outside: SocketAddr = "192.0.2.1:443".parse().expect("valid");
    let mut group = c.benchmark_group("route/outbound");
    group.bench_function("service_vip", |b| {
        b.iter(|| route::outbound(&config, source, black_box(vip), &balancers))
    });
    group.bench_function("pod_ip", |b| {
        b.iter(|| route::outbound(&config, source, black_box(pod), &balancers))
    });
    group.bench_function("passthrough", |b| {
        b.iter(|| route::outbound(&config, source, black_box(outside), &balancers))
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
            (&(), &()),
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

/// `Limits::admit` for a workload under a total and a per-source connection rate (both far
/// above what the bench reaches, so every check admits), with 100,000 sources' buckets in
/// the map; and for a workload no policy selects.
fn limit_check(c: &mut Criterion) {
    const SOURCES: u32 = 100_000;
    let mut config = config(2, 0);
    config.policies.rate_limits = vec![RateLimitPolicy {
        name: "bench".to_owned(),
        namespace: "demo".to_owned(),
        selector: Some(BTreeMap::from([("app".to_owned(), "echo".to_owned())])),
        connections: Some(Rate {
            per_second: u32::MAX,
            burst: u32::MAX,
        }),
        bandwidth: None,
        per_source: Some(PerSource {
            connections: Some(Rate {
                per_second: 1_000_000,
                burst: 1_000_000,
            }),
            bandwidth: None,
            overrides: Vec::new(),
        }),
        on_limit: OnLimit::Reject,
    }];
    let limits = Limits::new();
    limits.sync(&config);
    let sources: Vec<SourceKey> = (0..SOURCES)
        .map(|i| SourceKey::ip(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))))
        .collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        for source in &sources {
            limits
                .admit("demo/server-0", source)
                .await
                .expect("admitted");
        }
    });
    let mut group = c.benchmark_group("limit/admit");
    // Cycling through all the sources (each check a cache miss in the map) or through 100.
    for (name, destination, cycle) in [
        ("per_source_100k_keys", "demo/server-0", SOURCES),
        ("per_source_100k_keys_100_active", "demo/server-0", 100),
        ("no_policy", "demo/client", SOURCES),
    ] {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                runtime.block_on(async {
                    let start = Instant::now();
                    for i in 0..iters {
                        let source = &sources[(i % u64::from(cycle)) as usize];
                        let admitted = limits.admit(black_box(destination), source).await;
                        black_box(admitted.is_ok());
                    }
                    start.elapsed()
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

/// A cluster-sized config: `workloads` pods (one in ten on this node), `services` services
/// each selecting the pods of one `app` label (two pods per app).
fn cluster_yaml(workloads: usize, services: usize) -> String {
    let mut yaml = String::from("agent: {node: node-a}\nworkloads:\n");
    for i in 0..workloads {
        yaml.push_str(&format!(
            "  - {{name: w{i}, namespace: ns{}, ips: [10.{}.{}.{}], node: node-{}, netns: /n/w{i}, labels: {{app: app{}}}}}\n",
            i % 50,
            1 + i / 62_500,
            (i / 250) % 250,
            i % 250 + 1,
            if i % 10 == 0 { "a" } else { "b" },
            i % (workloads / 2),
        ));
    }
    yaml.push_str("services:\n");
    for j in 0..services {
        yaml.push_str(&format!(
            "  - {{name: s{j}, namespace: ns{}, vips: [10.96.{}.{}], ports: [{{port: 80, targetPort: 8080}}], endpoints: {{selector: {{app: app{}}}}}}}\n",
            j % 50,
            j / 250,
            j % 250 + 1,
            j % (workloads / 2),
        ));
    }
    yaml
}

fn config_build(c: &mut Criterion) {
    let mut group = c.benchmark_group("config_build");
    group.sample_size(10);
    for (workloads, services) in [(1_000, 10_000), (3_000, 30_000)] {
        let yaml = cluster_yaml(workloads, services);
        group.bench_function(format!("{workloads}_workloads_{services}_services"), |b| {
            b.iter(|| Config::from_yaml_str(black_box(&yaml), "cluster.yaml").expect("valid"));
        });
    }
    group.finish();
}

/// A cluster as the API lists it: `pods` pods in 50 enrolled namespaces (one in fifty on this
/// node), `services` Services each with one EndpointSlice of two of those pods.
fn kube_objects(pods: usize, services: usize) -> Vec<(ObjectKind, DynamicObject)> {
    let ip = pod_ip;
    let mut objects = Vec::with_capacity(50 + pods + 2 * services);
    let mut push = |kind, value: serde_json::Value| {
        objects.push((kind, serde_json::from_value(value).expect("object")));
    };
    for n in 0..50 {
        push(
            ObjectKind::Namespace,
            json!({"metadata": {"name": format!("ns{n}"), "labels": {"mesh.example.dev/enrolled": "true"}}}),
        );
    }
    for i in 0..pods {
        push(
            ObjectKind::Pod,
            json!({
                "metadata": {"name": format!("p{i}"), "namespace": format!("ns{}", i % 50),
                             "uid": format!("0000-{i}"), "labels": {"app": format!("app{}", i / 2)}},
                "spec": {"nodeName": if i % 50 == 0 { "node-a" } else { "node-b" },
                         "serviceAccountName": "sa", "containers": []},
                "status": {"phase": "Running", "podIPs": [{"ip": ip(i)}]},
            }),
        );
    }
    for j in 0..services {
        let ns = format!("ns{}", j % 50);
        let (a, b) = ((2 * j) % pods, (2 * j + 1) % pods);
        push(
            ObjectKind::Service,
            json!({
                "metadata": {"name": format!("s{j}"), "namespace": ns},
                "spec": {"clusterIPs": [format!("10.96.{}.{}", j / 250, j % 250 + 1)],
                         "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
                         "selector": {"app": format!("app{j}")}},
            }),
        );
        push(
            ObjectKind::EndpointSlice,
            json!({
                "metadata": {"name": format!("s{j}-x"), "namespace": ns,
                             "labels": {"kubernetes.io/service-name": format!("s{j}")}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080}],
                "endpoints": [
                    {"addresses": [ip(a)], "nodeName": "node-b", "conditions": {"ready": true}},
                    {"addresses": [ip(b)], "nodeName": "node-b", "conditions": {"ready": true}},
                ],
            }),
        );
    }
    objects
}

/// The IP of pod `p{i}`.
fn pod_ip(i: usize) -> String {
    format!("10.{}.{}.{}", 1 + i / 62_500, (i / 250) % 250, i % 250 + 1)
}

/// Every pod of this node has a sandbox.
struct AnyPod;

impl PodLocator for AnyPod {
    fn netns(&self, uid: &str) -> Result<std::path::PathBuf, mesh_agent::k8s::Unresolved> {
        Ok(std::path::PathBuf::from(format!("/run/netns/{uid}")))
    }
}

/// The initial sync: every object applied (translated), then one build.
fn kube_sync(
    objects: Vec<(ObjectKind, DynamicObject)>,
    agent: &AgentConfig,
    metrics: &Metrics,
    sandboxes: &mut Sandboxes,
) -> Stores {
    let mut stores = Stores::default();
    let mut cx = ApplyContext {
        agent,
        metrics,
        sandboxes,
    };
    for kind in ObjectKind::ALL {
        stores.apply(kind, Event::Init, &mut cx);
    }
    for (kind, object) in objects {
        stores.apply(kind, Event::InitApply(object), &mut cx);
    }
    for kind in ObjectKind::ALL {
        stores.apply(kind, Event::InitDone, &mut cx);
    }
    stores
}

/// This process's resident memory (`/proc/self/statm`, pages of 4 KiB).
fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

/// Bytes the allocator has handed out and not taken back (glibc's `mallinfo2().uordblks`):
/// what is really held, without the free memory it cannot return (fragmentation).
#[allow(unsafe_code)]
fn allocated_bytes() -> u64 {
    // SAFETY: mallinfo2 takes no argument and returns a plain struct by value.
    let info = unsafe { libc::mallinfo2() };
    info.uordblks as u64
}

/// Pod `p{i}` of [`kube_objects`] with a `version` label of `round`: one pod changed.
fn changed_pod(i: usize, round: usize) -> DynamicObject {
    let ip = pod_ip(i);
    serde_json::from_value(json!({
        "metadata": {"name": format!("p{i}"), "namespace": format!("ns{}", i % 50),
                     "uid": format!("0000-{i}"),
                     "labels": {"app": format!("app{}", i / 2), "version": format!("v{round}")}},
        "spec": {"nodeName": if i.is_multiple_of(50) { "node-a" } else { "node-b" },
                 "serviceAccountName": "sa", "containers": []},
        "status": {"phase": "Running", "podIPs": [{"ip": ip}]},
    }))
    .expect("pod")
}

/// A slice of Service `s{j}` whose second endpoint is `ip`: one endpoint changed.
fn changed_slice(j: usize, ip: &str) -> DynamicObject {
    serde_json::from_value(json!({
        "metadata": {"name": format!("s{j}-x"), "namespace": format!("ns{}", j % 50),
                     "labels": {"kubernetes.io/service-name": format!("s{j}")}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": [
            {"addresses": ["10.9.0.1"], "nodeName": "node-b", "conditions": {"ready": true}},
            {"addresses": [ip], "nodeName": "node-b", "conditions": {"ready": true}},
        ],
    }))
    .expect("slice")
}

fn kube_build(c: &mut Criterion) {
    let (pods, services) = (5_000, 30_000);
    let objects = kube_objects(pods, services);
    let agent = Config::from_yaml_str("agent: {node: node-a}", "agent.yaml")
        .expect("valid")
        .agent()
        .clone();
    let metrics = Metrics::new();
    let mut sandboxes = Sandboxes::new(std::sync::Arc::new(AnyPod));
    let mut group = c.benchmark_group("k8s");
    group.sample_size(10);
    group.bench_function(
        format!("initial_sync_{services}_services_{pods}_pods"),
        |b| {
            b.iter_batched(
                || objects.clone(),
                |objects| {
                    let mut stores = kube_sync(objects, &agent, &metrics, &mut sandboxes);
                    build(
                        &mut stores,
                        &agent,
                        &mut sandboxes,
                        &mut BuildCache::default(),
                    )
                },
                BatchSize::LargeInput,
            );
        },
    );
    let mut stores = kube_sync(objects, &agent, &metrics, &mut sandboxes);
    let mut cache = BuildCache::default();
    let built = build(&mut stores, &agent, &mut sandboxes, &mut cache);
    assert_eq!(built.config.services().len(), services);
    assert_eq!(built.config.workloads().len(), pods);
    group.bench_function(
        format!("rebuild_from_nothing_{services}_services_{pods}_pods"),
        |b| {
            b.iter(|| {
                build(
                    black_box(&mut stores),
                    &agent,
                    &mut sandboxes,
                    &mut BuildCache::default(),
                )
            });
        },
    );
    group.finish();

    // One endpoint change, from the watch event to the snapshot new connections route by: the
    // event applied, the snapshot built, the balancers and limits synced (what the agent does
    // before it stores the snapshot). Reported as percentiles, the figure being p99.
    let balancers = Balancers::new();
    let limits = Limits::new();
    balancers.sync(&built.config);
    limits.sync(&built.config);
    let mut state = Changing {
        stores,
        cache,
        sandboxes,
        previous: built.config.clone(),
        balancers,
        limits,
    };
    let endpoint_change = state.changes("one_endpoint_change", &agent, &metrics, |round| {
        let j = (round * 7919) % services;
        let ip = format!("10.9.1.{}", round % 250 + 1);
        (ObjectKind::EndpointSlice, changed_slice(j, &ip))
    });
    let pod_change = state.changes("one_pod_change", &agent, &metrics, |round| {
        (ObjectKind::Pod, changed_pod((round * 7919) % pods, round))
    });
    let Changing {
        stores,
        cache,
        mut sandboxes,
        balancers,
        limits,
        ..
    } = state;
    // What the source holds for this cluster: the stores, the build cache and a snapshot,
    // measured as the process's resident memory before and after (free memory given back
    // first, as the agent does after bursts).
    drop((stores, cache, built, balancers, limits));
    mesh_agent::sys::memory::release_free_memory();
    let before = resident_bytes();
    let allocated_before = allocated_bytes();
    let mut cache = BuildCache::default();
    let mut stores = kube_sync(
        kube_objects(pods, services),
        &agent,
        &metrics,
        &mut sandboxes,
    );
    let stores_allocated = allocated_bytes().saturating_sub(allocated_before);
    let built = build(&mut stores, &agent, &mut sandboxes, &mut cache);
    mesh_agent::sys::memory::release_free_memory();
    let source = resident_bytes().saturating_sub(before);
    let source_allocated = allocated_bytes().saturating_sub(allocated_before);
    let balancers = Balancers::new();
    balancers.sync(&built.config);
    mesh_agent::sys::memory::release_free_memory();
    let held = resident_bytes().saturating_sub(before);
    let allocated = allocated_bytes().saturating_sub(allocated_before);
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    println!(
        "k8s/memory_{services}_services_{pods}_pods: resident {:.1} MiB (stores, build cache and snapshot {:.1} MiB; balancers {:.1} MiB); allocated {:.1} MiB (stores {:.1} MiB, build cache and snapshot {:.1} MiB; balancers {:.1} MiB)",
        mib(held),
        mib(source),
        mib(held.saturating_sub(source)),
        mib(allocated),
        mib(stores_allocated),
        mib(source_allocated.saturating_sub(stores_allocated)),
        mib(allocated.saturating_sub(source_allocated))
    );
    black_box((stores, cache, built, balancers));
    for (name, took) in [
        ("one_endpoint_change", endpoint_change),
        ("one_pod_change", pod_change),
    ] {
        let at = |q: f64| took[((took.len() as f64 * q) as usize).min(took.len() - 1)];
        println!(
            "k8s/{name}_{services}_services_{pods}_pods: p50 {:.2?} p99 {:.2?} max {:.2?} (500 events: apply, build, compare, balancers and limits synced)",
            at(0.50),
            at(0.99),
            at(1.0)
        );
    }
}

/// The source's state between changes, and what the agent syncs from each snapshot.
struct Changing {
    stores: Stores,
    cache: BuildCache,
    sandboxes: Sandboxes,
    previous: std::sync::Arc<Config>,
    balancers: Balancers,
    limits: Limits,
}

impl Changing {
    /// 500 changes, each from the watch event to the snapshot new connections route by: the
    /// event applied, the snapshot built and compared with the last (as the controller does
    /// before it publishes), the balancers and limits synced (what the agent does before it
    /// stores the snapshot). Prints the mean by step; returns the times, sorted (the issue's
    /// figure being their p99).
    fn changes(
        &mut self,
        name: &str,
        agent: &AgentConfig,
        metrics: &Metrics,
        event: impl Fn(usize) -> (ObjectKind, DynamicObject),
    ) -> Vec<Duration> {
        let mut took = Vec::with_capacity(500);
        let mut parts = [Duration::ZERO; 4];
        for round in 0..500 {
            let (kind, object) = event(round);
            let start = Instant::now();
            let mut cx = ApplyContext {
                agent,
                metrics,
                sandboxes: &mut self.sandboxes,
            };
            assert!(self.stores.apply(kind, Event::Apply(object), &mut cx));
            let applied = start.elapsed();
            let built = build(
                &mut self.stores,
                agent,
                &mut self.sandboxes,
                &mut self.cache,
            );
            assert!(*built.config != *self.previous, "{name}: a change");
            let building = start.elapsed();
            self.balancers.sync(&built.config);
            let balancing = start.elapsed();
            self.limits.sync(&built.config);
            took.push(start.elapsed());
            parts[0] += applied;
            parts[1] += building - applied;
            parts[2] += balancing - building;
            parts[3] += took[took.len() - 1] - balancing;
            self.previous = built.config;
        }
        let mean = |d: Duration| d / 500;
        println!(
            "k8s/{name}: mean apply {:.2?}, build and compare {:.2?}, balancers {:.2?}, limits {:.2?}",
            mean(parts[0]),
            mean(parts[1]),
            mean(parts[2]),
            mean(parts[3])
        );
        took.sort();
        took
    }
}

criterion_group! {
    name = hot;
    config = short();
    targets = balancer, route_decision, flow_keys, copy_loop, limit_check, config_build, kube_build
}
criterion_main!(hot);
