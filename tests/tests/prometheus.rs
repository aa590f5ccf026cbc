//! A real Prometheus scrapes the agent: traffic with known counts and bytes goes through the
//! mesh, then PromQL answers with exactly those numbers, and every query of the Grafana
//! dashboard in deploy/grafana returns data.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use mesh_tests::{
    Agent, ConfigBuilder, Node, Pod, Prometheus, Topology, agent::ADMIN_ADDRESS, assert_root,
    grafana, parse_ids,
};

const TOOL: &str = env!("CARGO_BIN_EXE_mesh-testtool");
/// Long enough for a few scrapes at a 1 s interval on a loaded 2-core machine.
const SCRAPES: Duration = Duration::from_secs(20);

fn dashboard_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/mesh-agent-dashboard.json")
}

fn dashboard() -> serde_json::Value {
    let path = dashboard_path();
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// `mesh-testtool ids` from `pod` to `target`: (answers per server, failures).
fn ids(
    pod: &Pod,
    target: &str,
    count: usize,
) -> (std::collections::BTreeMap<String, usize>, usize) {
    let out = pod
        .run(
            TOOL,
            ["ids", "--connect", target, "--count", &count.to_string()],
        )
        .unwrap_or_else(|e| panic!("ids from {} to {target}: {e:#}", pod.name()));
    parse_ids(&String::from_utf8_lossy(&out.stdout)).expect("ids output")
}

/// Polls until PromQL `query` (`sum(metric{labels})`) returns one series of value `want`.
fn expect_value(prometheus: &Prometheus, query: &str, want: f64) {
    if let Err(e) = prometheus.wait_for_value(query, want, SCRAPES) {
        // Every series of the metric, to show which label differs.
        let metric = query
            .trim_start_matches("sum(")
            .split(['{', ')'])
            .next()
            .unwrap_or(query);
        panic!(
            "{e:#}\nthe series of {metric}: {:#?}",
            prometheus.query(metric)
        );
    }
}

/// One node: client `a`; `b` serving echo (:8080) and a sink (:9000); `c` selected by the
/// `flaky` service but serving nothing; `d`, denied by echo's policy; `e`, egress-limited
/// to one connection per second.
struct Mesh {
    topo: Topology,
    node: Node,
    a: Pod,
    d: Pod,
    e: Pod,
    _servers: Vec<mesh_tests::Background>,
}

const ECHO: &str = "10.96.0.10:80";
const SINK: &str = "10.96.0.11:90";
const FLAKY: &str = "10.96.0.12:80";
const TIGHT: &str = "10.96.0.13:80";

impl Mesh {
    fn new() -> (Mesh, ConfigBuilder) {
        assert_root();
        let mut topo = Topology::new("prometheus").expect("topology");
        let node = topo.add_node("node1").expect("node");
        let pods: Vec<Pod> = ["a", "b", "c", "d", "e"]
            .iter()
            .map(|name| topo.add_pod(&node, name).expect("pod"))
            .collect();
        let [a, b, c, d, e] = <[Pod; 5]>::try_from(pods).expect("five pods");
        let servers = vec![
            b.spawn_ready(TOOL, ["serve", "--listen", "[::]:8080", "--name", "b"])
                .expect("echo server"),
            b.spawn_ready(TOOL, ["sink", "--listen", "[::]:9000"])
                .expect("sink"),
        ];
        let policies = "  authorization:\n    - name: echo-policy\n      namespace: test\n      selector: {app: echo}\n      action: deny\n      rules:\n        - from:\n            identities: [\"spiffe://cluster.local/ns/test/sa/d\"]\n  egressLimits:\n    - name: noisy-egress\n      namespace: test\n      selector: {app: noisy}\n      connections: {perSecond: 1, burst: 1}\n";
        let config = ConfigBuilder::new(&topo, &node)
            .workload(&a, &[("app", "client")], &[])
            .workload(&b, &[("app", "echo"), ("tier", "backend")], &[])
            .workload(&c, &[("app", "dead"), ("tier", "backend")], &[])
            .workload(&d, &[("app", "intruder")], &[])
            .workload(&e, &[("app", "noisy")], &[])
            .service("echo", &["10.96.0.10"], 80, 8080, &[("app", "echo")])
            .service("sink", &["10.96.0.11"], 90, 9000, &[("app", "echo")])
            .service_with(
                "flaky",
                &["10.96.0.12"],
                (80, 8080),
                &[("tier", "backend")],
                "trafficPolicy:\n  loadBalancer: {algorithm: roundRobin}\n  outlierDetection: {consecutiveFailures: 1, baseEjectionMs: 60000, maxEjectedPercent: 50}\n",
            )
            .service_with(
                "tight",
                &["10.96.0.13"],
                (80, 8080),
                &[("app", "echo")],
                "trafficPolicy: {circuitBreaker: {maxConnections: 1}}",
            )
            .policies(policies);
        let mesh = Mesh {
            topo,
            node,
            a,
            d,
            e,
            _servers: servers,
        };
        (mesh, config)
    }
}

#[test]
fn prometheus_scrapes_the_agent_and_every_dashboard_query_returns_data() {
    let (mesh, config) = Mesh::new();
    let agent = Agent::start(&mesh.topo, &mesh.node, &config.build()).expect("agent starts");
    let prometheus =
        Prometheus::start(&mesh.topo, &mesh.node, ADMIN_ADDRESS).expect("prometheus starts");
    prometheus
        .wait_for_target(SCRAPES)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", prometheus.log()));
    expect_value(&prometheus, "sum(mesh_enrolled_pods)", 5.0);

    // Two rounds of connections to echo, the second after Prometheus has seen the first, so
    // that rates (and the latency quantiles) have an increase to show.
    let echo_from_a = r#"reporter="source",source_workload="a",source_principal="spiffe://cluster.local/ns/test/sa/a",destination_workload="b",destination_service="echo.test.svc.cluster.local",destination_service_name="echo",destination_service_namespace="test",response_flags="-",connection_security_policy="none""#;
    for round in 1..=2 {
        let (answers, failed) = ids(&mesh.a, ECHO, 5);
        assert_eq!((answers.get("b"), failed), (Some(&5), 0), "round {round}");
        expect_value(
            &prometheus,
            &format!("sum(istio_tcp_connections_closed_total{{{echo_from_a}}})"),
            5.0 * f64::from(round),
        );
    }
    expect_value(
        &prometheus,
        &format!("sum(istio_tcp_connections_opened_total{{{echo_from_a}}})"),
        10.0,
    );
    // Each connection asked `ID\n`: 3 bytes that the server received.
    expect_value(
        &prometheus,
        &format!("sum(istio_tcp_received_bytes_total{{{echo_from_a}}})"),
        30.0,
    );
    expect_value(
        &prometheus,
        r#"sum(mesh_connect_duration_seconds_count{service="test/echo"})"#,
        10.0,
    );

    // 100,000 bytes to the sink, whose reply is one 72-byte line.
    mesh.a
        .run(TOOL, ["send", "--connect", SINK, "--bytes", "100000"])
        .expect("send to the sink");
    let sink_from_a = r#"reporter="source",source_workload="a",destination_workload="b",destination_service_name="sink""#;
    expect_value(
        &prometheus,
        &format!("sum(istio_tcp_received_bytes_total{{{sink_from_a}}})"),
        100_000.0,
    );
    expect_value(
        &prometheus,
        &format!("sum(istio_tcp_sent_bytes_total{{{sink_from_a}}})"),
        72.0,
    );

    // Failures, each with its response flag: d is denied by echo's policy ...
    assert!(
        mesh.d.run(TOOL, ["id", "--connect", ECHO]).is_err(),
        "d is denied"
    );
    expect_value(
        &prometheus,
        r#"sum(istio_tcp_connections_closed_total{source_workload="d",destination_service_name="echo",response_flags="DENY"})"#,
        1.0,
    );
    // ... e is over its egress limit (1/s, burst 1) ...
    let (answers, refused) = ids(&mesh.e, ECHO, 3);
    assert!(
        refused >= 1,
        "3 connections at once at 1/s: {answers:?}, {refused} refused"
    );
    expect_value(
        &prometheus,
        r#"sum(mesh_rate_limited_total{policy="test/noisy-egress",kind="egress"})"#,
        refused as f64,
    );
    expect_value(
        &prometheus,
        r#"sum(istio_tcp_connections_closed_total{source_workload="e",response_flags="RL"})"#,
        refused as f64,
    );
    // ... tight's circuit breaker (one connection at most) refuses a second one ...
    let _held = mesh
        .a
        .spawn_ready(TOOL, ["hold", "--connect", TIGHT, "--seconds", "3"])
        .expect("hold a connection to tight");
    let (_, refused) = ids(&mesh.a, TIGHT, 1);
    assert_eq!(
        refused, 1,
        "the circuit breaker refused the second connection"
    );
    expect_value(
        &prometheus,
        r#"sum(mesh_circuit_open_total{service="test/tight"})"#,
        1.0,
    );
    expect_value(
        &prometheus,
        r#"sum(istio_tcp_connections_closed_total{destination_service_name="tight",response_flags="UO"})"#,
        1.0,
    );
    // ... and flaky's dead endpoint c is retried around, then ejected.
    let (answers, failed) = ids(&mesh.a, FLAKY, 4);
    assert_eq!(
        (answers.get("b"), failed),
        (Some(&4), 0),
        "retries hide the dead endpoint c"
    );
    expect_value(
        &prometheus,
        r#"sum(mesh_retries_total{service="test/flaky",result="retried"})"#,
        1.0,
    );
    expect_value(
        &prometheus,
        r#"sum(mesh_endpoint_ejections_total{service="test/flaky"})"#,
        1.0,
    );
    // The agent's own counters agree: every failure above, by outcome.
    for (outcome, count) in [("denied", 1.0), ("circuit_open", 1.0)] {
        expect_value(
            &prometheus,
            &format!(r#"sum(mesh_connections_total{{outcome="{outcome}"}})"#),
            count,
        );
    }
    // a's certificate is valid for a while yet.
    let left = prometheus
        .value(r#"min(mesh_certificate_expiry_timestamp_seconds{identity="spiffe://cluster.local/ns/test/sa/a"}) - time()"#)
        .expect("query")
        .expect("a's certificate expiry is scraped");
    assert!(left > 3600.0, "a's certificate expires in {left} s");

    // Every query of the dashboard, Grafana's variables substituted, returns data.
    let queries = grafana::dashboard_queries(&dashboard()).expect("the dashboard's queries");
    assert!(queries.len() >= 10, "{queries:?}");
    let deadline = Instant::now() + SCRAPES;
    let mut pending = queries;
    loop {
        let mut empty = Vec::new();
        for query in pending {
            match prometheus.query(&query.promql) {
                Ok(samples) if samples.iter().any(|s| !s.value.is_nan()) => {}
                Ok(samples) => empty.push((query, format!("{samples:?}"))),
                // A query Prometheus refuses will not get better: fail now.
                Err(e) => panic!(
                    "{}: {}\nsent as {}\n{e:#}",
                    query.place, query.original, query.promql
                ),
            }
        }
        if empty.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            let report: Vec<String> = empty
                .iter()
                .map(|(q, got)| {
                    format!(
                        "{}: {}\n  sent as {}\n  got {got}",
                        q.place, q.original, q.promql
                    )
                })
                .collect();
            panic!(
                "dashboard queries without data after {SCRAPES:?}:\n{}\n/metrics:\n{}",
                report.join("\n"),
                agent.metrics().unwrap_or_default()
            );
        }
        pending = empty.into_iter().map(|(q, _)| q).collect();
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn each_node_prometheus_sees_a_cross_node_connection_as_mutual_tls_with_its_bytes() {
    assert_root();
    let mut topo = Topology::new("prometheus_mtls").expect("topology");
    let n1 = topo.add_node("node1").expect("node1");
    let n2 = topo.add_node("node2").expect("node2");
    topo.connect_nodes(&n1, &n2).expect("underlay");
    let a = topo.add_pod(&n1, "a").expect("pod a");
    let b = topo.add_pod(&n2, "b").expect("pod b");
    let _server = b
        .spawn_ready(TOOL, ["serve", "--listen", "[::]:8080", "--name", "b"])
        .expect("server");
    // Both agents trust one CA.
    let ca = std::env::temp_dir().join(topo.bpf_pin_name()).join("ca");
    mesh_tests::agent::init_ca(&ca).expect("mesh-agent ca init");
    let config = |node: &Node| {
        ConfigBuilder::new(&topo, node)
            .agent_line(&format!("caCertFile: {}", ca.join("ca.crt").display()))
            .agent_line(&format!("caKeyFile: {}", ca.join("ca.key").display()))
            .workload(&a, &[("app", "client")], &[])
            .workload(&b, &[("app", "echo")], &[])
            .service("echo", &["10.96.0.10"], 80, 8080, &[("app", "echo")])
            .build()
    };
    let pin = topo.bpf_pin_name();
    let _one = Agent::start(&topo, &n1, &config(&n1)).expect("agent 1");
    let _two = Agent::start(
        &topo,
        &n2,
        &config(&n2).replace(
            &format!("bpfName: {pin}\n"),
            &format!("bpfName: {pin}-n2\n"),
        ),
    )
    .expect("agent 2");
    let prometheus: Vec<Prometheus> = [&n1, &n2]
        .into_iter()
        .map(|node| {
            let prometheus = Prometheus::start(&topo, node, ADMIN_ADDRESS).expect("prometheus");
            prometheus
                .wait_for_target(SCRAPES)
                .unwrap_or_else(|e| panic!("{e:#}\n{}", prometheus.log()));
            prometheus
        })
        .collect();

    // One connection echoing 1 MiB from a on node 1 to b on node 2, through the tunnel.
    let bytes = 1u64 << 20;
    a.run(
        TOOL,
        ["echo", "--connect", ECHO, "--bytes", &bytes.to_string()],
    )
    .expect("echo across nodes");
    // Node 1 reports it as the source, node 2 as the destination: both as mutual TLS, with
    // the client's identity, the service (node 2 finds it from the endpoint the tunnel
    // stream came to) and the same bytes each way.
    let service = [r#",destination_service_name="echo""#; 2];
    for ((prometheus, reporter), service) in prometheus
        .iter()
        .zip(["source", "destination"])
        .zip(service)
    {
        let series = format!(
            r#"reporter="{reporter}",source_workload="a",source_principal="spiffe://cluster.local/ns/test/sa/a",destination_workload="b",destination_principal="spiffe://cluster.local/ns/test/sa/b",response_flags="-",connection_security_policy="mutual_tls"{service}"#
        );
        for (metric, want) in [
            ("istio_tcp_connections_opened_total", 1.0),
            ("istio_tcp_connections_closed_total", 1.0),
            ("istio_tcp_received_bytes_total", bytes as f64),
            ("istio_tcp_sent_bytes_total", bytes as f64),
        ] {
            expect_value(prometheus, &format!("sum({metric}{{{series}}})"), want);
        }
    }
    for (prometheus, direction) in prometheus.iter().zip(["outbound", "tunnel"]) {
        expect_value(
            prometheus,
            &format!(
                r#"sum(mesh_connections_total{{direction="{direction}",security="mutual_tls",outcome="closed"}})"#
            ),
            1.0,
        );
        expect_value(
            prometheus,
            &format!(r#"sum(mesh_bytes_total{{direction="{direction}",way="from_client"}})"#),
            bytes as f64,
        );
    }
}

/// What a stock Grafana needs to import the dashboard, checked without a Grafana.
#[test]
fn the_dashboard_is_importable_and_every_panel_queries_the_datasource_variable() {
    let dashboard = dashboard();
    assert_eq!(dashboard["uid"], "mesh-agent-node");
    assert!(dashboard["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(
        dashboard["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
        "schemaVersion {}",
        dashboard["schemaVersion"]
    );
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("variables");
    assert!(
        variables.iter().any(|v| v["name"] == "datasource"
            && v["type"] == "datasource"
            && v["query"] == "prometheus"),
        "a Prometheus datasource variable: {variables:?}"
    );
    let mut ids = std::collections::BTreeSet::new();
    let mut stack: Vec<&serde_json::Value> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .collect();
    let mut with_queries = 0;
    while let Some(panel) = stack.pop() {
        let title = panel["title"].as_str().unwrap_or_default();
        assert!(!title.is_empty(), "a panel without a title: {panel}");
        let id = panel["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("{title}: no id"));
        assert!(ids.insert(id), "{title}: id {id} is used twice");
        let grid = &panel["gridPos"];
        for key in ["x", "y", "w", "h"] {
            assert!(grid[key].is_u64(), "{title}: gridPos.{key} missing: {grid}");
        }
        assert!(
            grid["x"].as_u64().unwrap_or(0) + grid["w"].as_u64().unwrap_or(0) <= 24,
            "{title}: wider than the grid: {grid}"
        );
        if panel["type"] == "row" {
            stack.extend(panel["panels"].as_array().into_iter().flatten());
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no queries");
        for target in targets {
            assert_eq!(target["datasource"]["uid"], "${datasource}", "{title}");
            assert!(
                target["refId"].is_string(),
                "{title}: a target without refId"
            );
            let expr = target["expr"].as_str().unwrap_or_default();
            assert!(!expr.is_empty(), "{title}: a target without expr");
            // Rates over Grafana's interval, never a fixed window.
            if expr.contains("rate(") || expr.contains("increase(") {
                assert!(
                    expr.contains("[$__rate_interval]") || expr.contains("[$__range]"),
                    "{title}: {expr}"
                );
            }
        }
        with_queries += 1;
    }
    assert!(with_queries >= 10, "{with_queries} panels with queries");
}
