//! The access log and the switchable per-connection metrics, end to end: real pods, the real
//! agent, its real log output (JSON and text), and live reloads that change what is logged.

use std::time::Duration;

use mesh_tests::{Agent, ConfigBuilder, Node, Pod, Topology, assert_root, wait_until};
use serde_json::Value;

const TOOL: &str = env!("CARGO_BIN_EXE_mesh-testtool");
const VIP: &str = "10.96.0.10:80";
/// A service whose endpoint listens on nothing: every connect fails.
const DEAD_VIP: &str = "10.96.0.11:80";
/// How long an agent may take to record what a finished client did.
const WAIT: Duration = Duration::from_secs(5);

/// One node: clients `a` and `c`, echo server `b` behind `echo` (and `dead`, a port of b
/// where nothing listens).
struct Mesh {
    topo: Topology,
    node: Node,
    a: Pod,
    b: Pod,
    c: Pod,
    _server: mesh_tests::Background,
}

impl Mesh {
    fn new(name: &str) -> Mesh {
        assert_root();
        let mut topo = Topology::new(name).expect("topology");
        let node = topo.add_node("node1").expect("node");
        let a = topo.add_pod(&node, "a").expect("pod a");
        let b = topo.add_pod(&node, "b").expect("pod b");
        let c = topo.add_pod(&node, "c").expect("pod c");
        let server = b
            .spawn_ready(TOOL, ["serve", "--listen", "[::]:8080", "--name", "b"])
            .expect("server");
        Mesh {
            topo,
            node,
            a,
            b,
            c,
            _server: server,
        }
    }

    /// The config, with `a_extra` in a's workload entry and `agent` lines.
    fn config(&self, a_extra: &[&str], agent: &[&str]) -> String {
        let mut builder = ConfigBuilder::new(&self.topo, &self.node);
        for line in agent {
            builder = builder.agent_line(line);
        }
        builder
            .workload(&self.a, &[("app", "client")], a_extra)
            .workload(&self.b, &[("app", "echo")], &[])
            .workload(&self.c, &[("app", "other")], &[])
            .service("echo", &["10.96.0.10"], 80, 8080, &[("app", "echo")])
            .service_with(
                "dead",
                &["10.96.0.11"],
                (80, 9999),
                &[("app", "echo")],
                "trafficPolicy: {retries: {attempts: 1}}",
            )
            .build()
    }

    /// `mesh-testtool echo` of `bytes` from `pod` to the echo service.
    fn echo(&self, pod: &Pod, bytes: u64) {
        pod.run(
            TOOL,
            ["echo", "--connect", VIP, "--bytes", &bytes.to_string()],
        )
        .expect("echo through the agent");
    }

    /// A connection to the dead service: the agent accepts it, then fails to connect.
    fn dead(&self, pod: &Pod) {
        // The agent closes it once the connect fails; the tool's result does not matter.
        let _ = pod.run(TOOL, ["id", "--connect", DEAD_VIP, "--timeout-ms", "5000"]);
    }
}

/// The agent's JSON access-log lines whose source pod is `pod` (`test/<name>`).
fn lines_of(agent: &Agent, pod: &str) -> Vec<Value> {
    agent
        .access_log()
        .iter()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|line| line["direction"] == "outbound" && line["pod"] == pod)
        .collect()
}

/// Waits until `pod` has `count` lines (a line is written when its connection ends, a
/// moment after the client is done).
fn wait_lines(agent: &Agent, pod: &str, count: usize) -> Vec<Value> {
    wait_until(WAIT, || lines_of(agent, pod).len() >= count);
    let lines = lines_of(agent, pod);
    assert!(
        lines.len() >= count,
        "{pod}: {} access-log lines, expected {count}: {lines:#?}",
        lines.len()
    );
    lines
}

#[test]
fn access_log_lines_name_both_ends_and_follow_the_config_live() {
    let mesh = Mesh::new("access_log");
    let agent = Agent::start_json_logs(&mesh.topo, &mesh.node, &mesh.config(&[], &[]))
        .expect("agent starts");

    // One echo: every field of the line.
    mesh.echo(&mesh.a, 1000);
    let lines = wait_lines(&agent, "test/a", 1);
    let line = &lines[0];
    let start = line["start"].as_str().expect("start time");
    assert!(
        start.len() >= 20 && start.as_bytes()[10] == b'T' && start.ends_with('Z'),
        "RFC 3339 start time: {start}"
    );
    assert!(line["duration_ms"].is_u64(), "duration: {line}");
    let b_endpoint = format!("{}:8080", mesh.b.ipv4());
    for (field, want) in [
        ("src_workload", "test/a"),
        ("src_identity", "spiffe://cluster.local/ns/test/sa/a"),
        ("dst_workload", "test/b"),
        ("dst_identity", "spiffe://cluster.local/ns/test/sa/b"),
        ("service", "test/echo"),
        ("endpoint", b_endpoint.as_str()),
        ("response_flags", "-"),
        ("result", "closed"),
        ("security", "plaintext"),
    ] {
        assert_eq!(line[field], want, "{field} in {line}");
    }
    assert_eq!(line["from_client"], 1000, "{line}");
    assert_eq!(line["to_client"], 1000, "{line}");
    assert!(
        line.get("tunnel").is_none(),
        "no tunnel on one node: {line}"
    );

    // A failure is logged with its response flag.
    mesh.dead(&mesh.a);
    let lines = wait_lines(&agent, "test/a", 2);
    assert_eq!(lines[1]["result"], "connect_failed", "{}", lines[1]);
    assert_eq!(lines[1]["response_flags"], "CONNECT", "{}", lines[1]);
    assert_eq!(lines[1]["service"], "test/dead", "{}", lines[1]);

    // Off for a, live: nothing more from a, while c (the agent's default) still logs.
    agent
        .reload(&mesh.config(&["accessLog: {enabled: false}"], &[]))
        .expect("reload");
    mesh.echo(&mesh.a, 10);
    mesh.dead(&mesh.a);
    mesh.echo(&mesh.c, 10);
    wait_lines(&agent, "test/c", 1);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(lines_of(&agent, "test/a").len(), 2, "a's log is off");

    // Sampled at 0%: connections that end well are not logged, failures still are.
    agent
        .reload(&mesh.config(&["accessLog: {samplePercent: 0}"], &[]))
        .expect("reload");
    mesh.echo(&mesh.a, 10);
    mesh.dead(&mesh.a);
    let lines = wait_lines(&agent, "test/a", 3);
    std::thread::sleep(Duration::from_millis(200));
    let lines_now = lines_of(&agent, "test/a");
    assert_eq!(lines_now.len(), 3, "only the failure: {lines_now:#?}");
    assert_eq!(lines[2]["result"], "connect_failed");

    // Sampled at 50%: about half of 200 connections (far outside 50..150 is a bug, not
    // chance: that is over seven standard deviations).
    agent
        .reload(&mesh.config(&["accessLog: {samplePercent: 50}"], &[]))
        .expect("reload");
    let ids = mesh
        .a
        .run(TOOL, ["ids", "--connect", VIP, "--count", "200"])
        .expect("200 connections");
    assert!(
        String::from_utf8_lossy(&ids.stdout).contains("b 200"),
        "every connection answered: {}",
        String::from_utf8_lossy(&ids.stdout)
    );
    // The connection metric says when all 200 have ended (204 with a's 3 and c's 1 before).
    let closed = || {
        agent
            .metric_sum(
                "mesh_connections_total",
                &[("direction", "outbound"), ("outcome", "closed")],
            )
            .unwrap_or(0.0)
    };
    assert!(
        wait_until(WAIT, || closed() >= 204.0),
        "closed: {}",
        closed()
    );
    let sampled = lines_of(&agent, "test/a").len() - 3;
    assert!(
        (50..=150).contains(&sampled),
        "{sampled} of 200 connections logged at 50%"
    );
}

#[test]
fn istio_metrics_switch_live_and_text_logs_carry_the_same_fields() {
    let mesh = Mesh::new("istio_switch");
    let agent = Agent::start(
        &mesh.topo,
        &mesh.node,
        &mesh.config(&[], &["istioMetrics: false"]),
    )
    .expect("agent starts");
    mesh.echo(&mesh.a, 100);
    let connections = || {
        agent
            .metric_sum(
                "mesh_connections_total",
                &[("direction", "outbound"), ("outcome", "closed")],
            )
            .unwrap_or(0.0)
    };
    assert!(
        wait_until(WAIT, || connections() >= 1.0),
        "the connection is counted"
    );
    let exposition = agent.metrics().expect("metrics");
    assert!(
        !exposition.contains("istio_tcp_connections_opened_total{"),
        "Istio's metrics are off:\n{exposition}"
    );
    // The text access line: the same fields, `key=value` (access lines are written in
    // batches, a moment later).
    let a_line = || {
        agent
            .access_log()
            .into_iter()
            .find(|line| line.contains("pod=test/a"))
    };
    wait_until(WAIT, || a_line().is_some());
    let line = a_line().expect("a's access-log line");
    for field in [
        "src_workload=\"test/a\"",
        "dst_workload=\"test/b\"",
        "dst_identity=spiffe://cluster.local/ns/test/sa/b",
        "from_client=100",
        "to_client=100",
        "response_flags=\"-\"",
    ] {
        assert!(line.contains(field), "{field} in {line}");
    }

    agent
        .reload(&mesh.config(&[], &["istioMetrics: true"]))
        .expect("reload");
    mesh.echo(&mesh.a, 100);
    let opened = || {
        agent
            .metric_sum(
                "istio_tcp_connections_closed_total",
                &[("reporter", "source"), ("source_workload", "a")],
            )
            .unwrap_or(0.0)
    };
    assert!(
        wait_until(WAIT, || opened() >= 1.0),
        "Istio's metrics are back on:\n{}",
        agent.metrics().unwrap_or_default()
    );
    assert_eq!(opened(), 1.0, "only the connection made while on");
}

/// A log reader that stops reading (a stuck container runtime behind the agent's stderr)
/// costs log lines, counted, never traffic: the agent's workers must not block on the log.
#[test]
fn a_stalled_log_reader_costs_log_lines_not_traffic() {
    let mesh = Mesh::new("tel-stall");
    let agent = Agent::start(&mesh.topo, &mesh.node, &mesh.config(&[], &[])).expect("agent");
    mesh.echo(&mesh.a, 1);
    assert_eq!(
        agent
            .metric("mesh_log_lines_dropped_total", &[])
            .expect("metric"),
        0.0,
        "nothing dropped while the log is read"
    );

    // 4,000 access lines are about 1.8 MB: 28 times the pipe's 64 KiB, and more than the
    // megabyte of lines the agent keeps waiting.
    agent.pause_log_reader(true);
    let out = mesh
        .a
        .run(TOOL, ["ids", "--connect", VIP, "--count", "4000"])
        .expect("connections while nobody reads the agent's log");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("b 4000") && stdout.contains("failed 0"),
        "every connection served: {stdout}"
    );
    let dropped = agent
        .metric("mesh_log_lines_dropped_total", &[])
        .expect("metric");
    assert!(
        dropped > 0.0,
        "the log reader stalled long enough to drop lines"
    );

    // Read again: the queued lines come out, then new connections' lines follow them
    // (while the queue still drains, a new line may be dropped too: try a few times).
    agent.pause_log_reader(false);
    let logged_again = (0..10).any(|_| {
        let before = agent.access_log().len();
        mesh.echo(&mesh.c, 1);
        wait_until(Duration::from_secs(1), || {
            agent
                .access_log()
                .iter()
                .skip(before)
                .any(|line| line.contains("pod=test/c"))
        })
    });
    assert!(logged_again, "c's access line once the log is read again");
}
