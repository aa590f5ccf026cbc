//! `mesh-agent status` against live agents, as an operator runs it on a node: the first
//! screen and each view, for a person (80 columns) and as JSON, and the failure cases (a pod
//! that cannot be enrolled, a rejected configuration, no agent at all). `/config_dump` shows
//! the snapshot in force.

use std::{
    process::Output,
    time::{Duration, Instant},
};

use mesh_tests::{
    Agent, ConfigBuilder, Node, Pod, Topology, assert_root, fixtures::TwoNodes, wait_timeout,
};
use serde_json::Value;

const TOOL: &str = env!("CARGO_BIN_EXE_mesh-testtool");
const VIP: &str = "10.96.0.10:80";
const ID_A: &str = "spiffe://cluster.local/ns/test/sa/a";
const ID_B: &str = "spiffe://cluster.local/ns/test/sa/b";

/// Every line of `text` fits an 80-column terminal (characters, not bytes).
fn assert_fits(text: &str) {
    for line in text.lines() {
        assert!(
            line.chars().count() <= 80,
            "line of {} characters: {line:?}\n{text}",
            line.chars().count()
        );
    }
}

/// `mesh-agent status ARGS` that succeeded: its stdout, checked to fit 80 columns unless
/// it is JSON.
fn status(agent: &Agent, args: &[&str]) -> String {
    let output = agent.status_command(args).expect("mesh-agent status");
    assert!(
        output.status.success(),
        "mesh-agent status {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    if !args.contains(&"--json") {
        assert_fits(&text);
    }
    text
}

fn status_json(agent: &Agent, args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.push("--json");
    serde_json::from_str(&status(agent, &args)).expect("status JSON")
}

/// Polls `check` on the agent's `/status` until it holds (10 s at most).
fn wait_status(agent: &Agent, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = agent.status().expect("status");
        if check(&status) {
            return status;
        }
        assert!(Instant::now() < deadline, "{what}: {status:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `status connections --json` once it lists a connection from `source` in `direction`
/// (5 s at most).
fn wait_connection(agent: &Agent, direction: &str, source: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let connections = status_json(agent, &["connections"]);
        let listed = connections["connections"].as_array().is_some_and(|all| {
            all.iter()
                .any(|c| c["direction"] == direction && c["source"] == source)
        });
        if listed || Instant::now() > deadline {
            return connections;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The connection of `connections` from `source` in `direction`.
fn find<'a>(connections: &'a Value, direction: &str, source: &str) -> &'a Value {
    connections["connections"]
        .as_array()
        .and_then(|all| {
            all.iter()
                .find(|c| c["direction"] == direction && c["source"] == source)
        })
        .unwrap_or_else(|| panic!("no {direction} connection from {source}: {connections:#}"))
}

#[test]
fn a_live_cross_node_connection_shows_on_both_nodes_with_both_identities_and_growing_bytes() {
    let mesh = TwoNodes::new("status_live");
    let (one, two) = mesh.agents(&[], None);
    // One connection from a to the service on node 2, open for 6 s, echoing every 50 ms.
    let mut held = mesh
        .a
        .spawn_ready(TOOL, ["hold", "--connect", VIP, "--seconds", "6"])
        .expect("hold");

    // Node 1: outbound from a, through a tunnel, to b.
    // The client is connected once the proxy accepted; it registers the connection when it
    // connects upstream, a moment later.
    let first = wait_connection(&one, "outbound", ID_A);
    let out = find(&first, "outbound", ID_A);
    assert_eq!(out["destination"], "test/b", "{out:#}");
    assert_eq!(out["port"], 8080);
    assert_eq!(out["pod"], "test/a");
    assert_eq!(out["sourceWorkload"], "test/a");
    assert_eq!(out["destinationIdentity"], ID_B);
    assert_eq!(out["service"], "test/echo");
    assert_eq!(out["tunneled"], true);
    assert_eq!(out["originalDestination"], VIP);
    assert_eq!(
        out["upstream"],
        format!("{}:8080", mesh.b.ipv4()).as_str(),
        "{out:#}"
    );
    assert_eq!(first["counts"]["outbound"], 1, "{first:#}");
    assert_eq!(first["counts"]["throughTunnels"], 1, "{first:#}");
    // The bytes grow while it is open (read from the copy's counters, not at the close).
    std::thread::sleep(Duration::from_millis(1500));
    let later = status_json(&one, &["connections"]);
    let again = find(&later, "outbound", ID_A);
    let sent = |c: &Value| c["bytesFromClient"].as_u64().unwrap_or_default();
    let received = |c: &Value| c["bytesToClient"].as_u64().unwrap_or_default();
    assert!(sent(again) > sent(out), "{out:#} then {again:#}");
    assert!(received(again) > received(out), "{out:#} then {again:#}");
    assert!(again["ageMs"].as_u64() > out["ageMs"].as_u64());

    // Node 2: the same connection arrives through the tunnel, with a's proven identity.
    let arrived = wait_connection(&two, "tunnel", ID_A);
    let tunnel = find(&arrived, "tunnel", ID_A);
    assert_eq!(tunnel["destination"], "test/b", "{tunnel:#}");
    assert_eq!(tunnel["sourceWorkload"], "test/a", "{tunnel:#}");
    assert_eq!(tunnel["destinationIdentity"], ID_B);
    assert_eq!(tunnel["tunneled"], true);
    assert!(sent(tunnel) > 0, "{tunnel:#}");

    // The same, for a person: one row, its addresses, both identities.
    let table = status(&one, &["connections"]);
    println!("{table}");
    assert!(
        table.starts_with("1 open: 1 outbound (1 through tunnels), 0 inbound, 0 tunnel"),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("out test/a") && l.contains("test/b:8080")),
        "{table}"
    );
    assert!(table.contains(&format!("{ID_A} -> {ID_B}")), "{table}");
    assert!(table.contains("svc test/echo  mTLS"), "{table}");
    let arrived_table = status(&two, &["connections"]);
    println!("{arrived_table}");
    assert!(
        arrived_table.contains(&format!("    {}:", mesh.a.ipv4())),
        "the peer's IPv4 address, not its IPv4-mapped form: {arrived_table}"
    );

    // The first screen: healthy, the tunnel up, the connection counted.
    let screen = status(&one, &[]);
    println!("{screen}");
    assert_eq!(screen.lines().next(), Some("healthy"), "{screen}");
    for expected in [
        "pods     2 enrolled, 0 failed",
        "config   generation 1 since",
        "tunnels  1 up to other nodes, 1 stream",
        "conns    1 open: 1 outbound, 0 inbound, 0 tunnel",
        "certs    2 held, soonest expiry in",
    ] {
        assert!(screen.contains(expected), "{expected:?} in\n{screen}");
    }
    assert!(
        screen
            .lines()
            .any(|l| l.starts_with("eBPF") && l.contains("programs attached; captured 1,")),
        "{screen}"
    );
    let overview = status_json(&one, &[]);
    assert_eq!(overview["health"]["healthy"], true, "{overview:#}");
    assert_eq!(overview["tunnels"]["connections"], 1, "{overview:#}");
    assert_eq!(overview["connectionCounts"]["total"], 1, "{overview:#}");
    assert_eq!(overview["config"]["generation"], 1);

    assert!(
        wait_timeout(held.child_mut(), Duration::from_secs(15))
            .expect("wait")
            .is_some_and(|s| s.success())
    );
    // Closed: gone from the view on both sides.
    wait_status(&one, "node 1 forgets the closed connection", |s| {
        s["connectionCounts"]["total"] == 0
    });
    wait_status(&two, "node 2 forgets the closed connection", |s| {
        s["connectionCounts"]["total"] == 0
    });
}

#[test]
fn the_views_show_pods_services_and_certificates_and_config_dump_the_snapshot() {
    let mesh = TwoNodes::new("status_views");
    let (one, _two) = mesh.agents(&[], None);
    let out = mesh
        .a
        .run(TOOL, ["id", "--connect", VIP])
        .expect("a reaches b through the mesh");
    assert!(out.status.success());

    let pods = status(&one, &["pods"]);
    let row = |name: &str| {
        pods.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no row for {name}:\n{pods}"))
            .split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    // POD, CAPTURED, SKIPPED, NO-LISTENER, NETNS COOKIE
    assert_eq!(row("test/a")[1], "1", "{pods}");
    assert_eq!(row("test/d")[1], "0", "{pods}");
    assert!(!pods.contains("FAILED"), "{pods}");
    let pods_json = status_json(&one, &["pods"]);
    assert_eq!(pods_json["workloads"].as_array().map(Vec::len), Some(2));
    assert_eq!(pods_json["failedPods"], Value::Array(vec![]));

    let services = status(&one, &["services"]);
    assert!(
        services.starts_with("service test/echo:80  peakEwma"),
        "{services}"
    );
    assert!(
        services
            .lines()
            .any(|l| l.contains(&format!("{}:8080", mesh.b.ipv4())) && l.contains("healthy")),
        "{services}"
    );
    let services_json = status_json(&one, &["services"]);
    assert_eq!(services_json["services"][0]["service"], "test/echo");

    let certificates = status(&one, &["certificates"]);
    let lines: Vec<&str> = certificates.lines().collect();
    for id in [ID_A, "spiffe://cluster.local/ns/test/sa/d"] {
        let at = lines
            .iter()
            .position(|l| *l == id)
            .unwrap_or_else(|| panic!("{id} on a line of its own:\n{certificates}"));
        assert!(
            lines[at + 1].starts_with("    valid ") && lines[at + 1].contains(", expires in "),
            "{certificates}"
        );
        assert!(lines[at + 2].starts_with("    serial "), "{certificates}");
    }
    let certificates_json = status_json(&one, &["certificates"]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let cert_a = certificates_json["certificates"]
        .as_array()
        .and_then(|all| all.iter().find(|c| c["identity"] == ID_A))
        .unwrap_or_else(|| panic!("{certificates_json:#}"));
    assert!(cert_a["notAfter"].as_u64().is_some_and(|t| t > now + 3600));
    assert!(cert_a["serial"].as_str().is_some_and(|s| !s.is_empty()));

    let dump: Value =
        serde_json::from_str(&one.admin_get("/config_dump").expect("/config_dump")).expect("JSON");
    assert_eq!(dump["generation"], 1, "{dump:#}");
    assert_eq!(
        dump["file"],
        one.config_path().display().to_string().as_str()
    );
    let config = &dump["config"];
    assert_eq!(config["agent"]["node"], "node1");
    assert_eq!(config["agent"]["connectTimeoutMs"], 2000);
    let names: Vec<&str> = config["workloads"]
        .as_array()
        .map(|all| all.iter().filter_map(|w| w["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(names, ["a", "d", "b"], "{config:#}");
    assert_eq!(config["workloads"][0]["identity"], ID_A);
    assert_eq!(config["services"][0]["vips"][0], "10.96.0.10");
    assert_eq!(config["services"][0]["ports"][0]["targetPort"], 8080);
}

/// One node: client `a` and server `b` enrolled, and `ghost`, whose network namespace
/// path does not exist until `fixed`.
fn failure_config(topo: &Topology, node: &Node, pods: &[&Pod; 3], fixed: bool) -> String {
    let [a, b, ghost] = pods;
    let config = ConfigBuilder::new(topo, node)
        .workload(a, &[("app", "client")], &[])
        .workload(b, &[("app", "echo")], &[])
        .workload(ghost, &[("app", "ghost")], &[])
        .service("echo", &["10.96.0.10"], 80, 8080, &[("app", "echo")])
        .build();
    if fixed {
        return config;
    }
    let netns = ghost.netns_path().display().to_string();
    config.replace(&netns, &format!("{netns}-gone"))
}

#[test]
fn a_pod_that_fails_to_enroll_a_rejected_config_and_a_stopped_agent_are_reported() {
    assert_root();
    let mut topo = Topology::new("status_failures").expect("topology");
    let node = topo.add_node("node1").expect("node");
    let a = topo.add_pod(&node, "a").expect("pod a");
    let b = topo.add_pod(&node, "b").expect("pod b");
    let ghost = topo.add_pod(&node, "ghost").expect("pod ghost");
    let pods = [&a, &b, &ghost];
    let mut agent = Agent::start(&topo, &node, &failure_config(&topo, &node, &pods, false))
        .expect("agent starts");

    // A pod that cannot be enrolled: the verdict says so, the pods view says why.
    let screen = status(&agent, &[]);
    assert_eq!(
        screen.lines().next(),
        Some("degraded: 1 pod failed to enroll"),
        "{screen}"
    );
    assert!(screen.contains("pods     2 enrolled, 1 failed"), "{screen}");
    assert!(
        screen
            .lines()
            .any(|l| l.trim_start().starts_with("test/ghost: opening ")),
        "{screen}"
    );
    let pods_view = status(&agent, &["pods"]);
    assert!(pods_view.contains("FAILED TO ENROLL"), "{pods_view}");
    assert!(
        pods_view.contains("No such file or directory"),
        "{pods_view}"
    );
    let failed = status_json(&agent, &["pods"]);
    assert_eq!(
        failed["failedPods"][0]["workload"], "test/ghost",
        "{failed:#}"
    );
    assert!(
        failed["failedPods"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("-gone") && r.contains("No such file")),
        "{failed:#}"
    );
    let overview = status_json(&agent, &[]);
    assert_eq!(overview["health"]["healthy"], false);
    assert_eq!(
        overview["health"]["problems"],
        serde_json::json!(["1 pod failed to enroll"])
    );

    // Fixed by a reload: enrolled, and the failure is gone.
    agent
        .reload(&failure_config(&topo, &node, &pods, true))
        .expect("reload");
    let fixed = wait_status(&agent, "ghost enrolled", |s| {
        s["failedPods"] == Value::Array(vec![])
            && s["workloads"].as_array().map(Vec::len) == Some(3)
    });
    assert_eq!(fixed["health"]["healthy"], true, "{fixed:#}");
    assert_eq!(fixed["config"]["generation"], 2);
    assert_eq!(status(&agent, &[]).lines().next(), Some("healthy"));

    // A rejected file: the verdict, the position of the error; the snapshot stays.
    agent
        .write_config(
            &failure_config(&topo, &node, &pods, true)
                .replace("connectTimeoutMs: 2000", "connectTimeoutMs: soon"),
        )
        .expect("write");
    let rejected = wait_status(&agent, "config rejected", |s| s["config"]["rejected"] == 1);
    let error = rejected["config"]["lastError"].as_str().unwrap_or_default();
    let file = agent.config_path().display().to_string();
    assert!(
        error.starts_with(&format!("{file}:5:")) && error.contains("connectTimeoutMs"),
        "{error}"
    );
    let screen = status(&agent, &[]);
    assert_eq!(
        screen.lines().next(),
        Some("degraded: last config rejected"),
        "{screen}"
    );
    assert!(screen.contains("config   generation 2 since"), "{screen}");
    assert!(screen.contains("last rejected: "), "{screen}");
    assert!(screen.contains("connectTimeoutMs"), "{screen}");
    let dump: Value =
        serde_json::from_str(&agent.admin_get("/config_dump").expect("dump")).expect("JSON");
    assert_eq!(dump["generation"], 2, "the snapshot in force stays");
    assert_eq!(dump["config"]["agent"]["connectTimeoutMs"], 2000);
    assert_eq!(
        dump["config"]["workloads"].as_array().map(Vec::len),
        Some(3)
    );

    // No agent: one line naming the address and the likely cause, exit code 1.
    agent.stop().expect("stop");
    for args in [&[][..], &["connections", "--json"][..]] {
        let output: Output = agent.status_command(args).expect("mesh-agent status");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(output.stdout.is_empty(), "{args:?}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.starts_with(
                "mesh-agent status: cannot reach the agent's admin API at 127.0.0.1:15000"
            ) && stderr.contains("is mesh-agent running on this node"),
            "{stderr}"
        );
        assert!(!stderr.contains("panicked") && !stderr.contains("backtrace"));
    }
}
