//! The one-node L4 data path, end to end on the real kernel: pods' connects to a service
//! VIP are captured by eBPF, balanced to endpoints, and copied by the agent.

use std::{collections::BTreeSet, time::Duration};

use mesh_tests::{Agent, ConfigBuilder, Node, Pod, Topology, assert_root, kernel, parse_id_reply};

const TOOL: &str = env!("CARGO_BIN_EXE_mesh-testtool");
const VIP: &str = "10.96.0.10";
const VIP6: &str = "fd00:96::10";

/// Client pod `a`, echo servers `b` and `c` (label app=echo) on :8080, service `echo`
/// (VIPs 10.96.0.10 and fd00:96::10, port 80 -> 8080), all enrolled.
struct Mesh {
    topo: Topology,
    node: Node,
    a: Pod,
    b: Pod,
    c: Pod,
    _servers: Vec<mesh_tests::Background>,
}

impl Mesh {
    fn new(name: &str) -> Mesh {
        assert_root();
        let mut topo = Topology::new(name).expect("topology");
        let node = topo.add_node("node1").expect("node");
        let a = topo.add_pod(&node, "a").expect("pod a");
        let b = topo.add_pod(&node, "b").expect("pod b");
        let c = topo.add_pod(&node, "c").expect("pod c");
        // [::] serves IPv4 and IPv6 alike.
        let servers = [(&b, "b"), (&c, "c")]
            .into_iter()
            .map(|(pod, name)| {
                pod.spawn_ready(TOOL, ["serve", "--listen", "[::]:8080", "--name", name])
                    .expect("server")
            })
            .collect();
        Mesh {
            topo,
            node,
            a,
            b,
            c,
            _servers: servers,
        }
    }

    fn config(&self, selector: &[(&str, &str)]) -> String {
        ConfigBuilder::new(&self.topo, &self.node)
            .workload(&self.a, &[("app", "client")], &[])
            .workload(&self.b, &[("app", "echo"), ("version", "b")], &[])
            .workload(&self.c, &[("app", "echo"), ("version", "c")], &[])
            // Round robin: these tests check that both endpoints serve with a few
            // connections; balancing itself is tested in traffic.rs.
            .service_with(
                "echo",
                &[VIP, VIP6],
                (80, 8080),
                selector,
                "trafficPolicy: {loadBalancer: {algorithm: roundRobin}}",
            )
            .build()
    }

    fn agent(&self) -> Agent {
        Agent::start(&self.topo, &self.node, &self.config(&[("app", "echo")]))
            .expect("agent starts")
    }

    /// `mesh-testtool id` from pod a to `target`: (server name, peer address it saw).
    fn id(&self, target: &str) -> (String, std::net::SocketAddr) {
        let out = self
            .a
            .run(TOOL, ["id", "--connect", target])
            .expect("id through the mesh");
        parse_id_reply(&String::from_utf8_lossy(&out.stdout)).expect("id reply")
    }
}

#[test]
fn service_vip_reaches_both_endpoints_over_ipv4_and_ipv6() {
    let mesh = Mesh::new("vip_balance");
    let agent = mesh.agent();
    for (vip, client_ip) in [
        (format!("{VIP}:80"), std::net::IpAddr::V4(mesh.a.ipv4())),
        (format!("[{VIP6}]:80"), std::net::IpAddr::V6(mesh.a.ipv6())),
    ] {
        let answers: Vec<_> = (0..4).map(|_| mesh.id(&vip)).collect();
        let names: BTreeSet<&str> = answers.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(names, BTreeSet::from(["b", "c"]), "via {vip}");
        // The proxy connects from inside pod a: the servers see a's own address.
        assert!(
            answers.iter().all(|(_, peer)| peer.ip() == client_ip),
            "{answers:?}"
        );
    }
    let counters = agent.workload_counters(&mesh.a).expect("status");
    assert_eq!(counters["captured"], 8, "{counters}");
    // Without the agent's capture the VIP is not routable at all: the answers above came
    // through the proxy. A pod's own IP is reached too (routed as a pod, not a service).
    assert_eq!(mesh.id(&format!("{}:8080", mesh.b.ipv4())).0, "b");
}

#[test]
fn proxy_upstream_is_not_captured_again_even_inside_the_attached_cgroup() {
    let mesh = Mesh::new("loop_guard");
    // The agent itself lives under the cgroup its programs are attached to: only the proxy
    // mark keeps its upstream connects (made from the pod's netns) from being captured.
    let agent_cgroup = mesh.topo.cgroup_root().join("agent");
    let _agent = Agent::start_with(
        &mesh.topo,
        &mesh.node,
        &mesh.config(&[("app", "echo")]),
        Some(&agent_cgroup),
    )
    .expect("agent starts");
    for _ in 0..3 {
        mesh.id(&format!("{VIP}:80"));
    }
    let cookie = kernel::netns_cookie(&mesh.a.netns_path()).expect("cookie");
    let stats = kernel::pod_stats(&mesh.topo.bpf_pin_name(), cookie)
        .expect("map")
        .expect("counted");
    assert_eq!(
        stats.captured, 3,
        "each app connect captured once, proxy connects never: {stats:?}"
    );
}

#[test]
fn hundred_megabytes_arrive_intact_both_ways_with_half_close() {
    let mesh = Mesh::new("bulk");
    let _sink = mesh
        .b
        .spawn_ready(TOOL, ["sink", "--listen", "0.0.0.0:9000"])
        .expect("sink");
    let config = ConfigBuilder::new(&mesh.topo, &mesh.node)
        .workload(&mesh.a, &[("app", "client")], &[])
        .workload(&mesh.b, &[("app", "echo")], &[])
        .service("echo", &[VIP], 80, 8080, &[("app", "echo")])
        .service("sink", &["10.96.0.11"], 90, 9000, &[("app", "echo")])
        .build();
    let _agent = Agent::start(&mesh.topo, &mesh.node, &config).expect("agent");
    // Upload, half-close, then the sink's checksum comes back over the still-open half.
    let bytes = (100u64 << 20).to_string();
    mesh.a
        .run(
            TOOL,
            ["send", "--connect", "10.96.0.11:90", "--bytes", &bytes],
        )
        .expect("send 100 MB");
    // Both directions at once: the echo is checked byte for byte.
    mesh.a
        .run(
            TOOL,
            ["echo", "--connect", &format!("{VIP}:80"), "--bytes", &bytes],
        )
        .expect("echo 100 MB");
}

#[test]
fn a_thousand_concurrent_connections() {
    let mesh = Mesh::new("many");
    let _agent = mesh.agent();
    let out = mesh
        .a
        .run(
            TOOL,
            ["many", "--connect", &format!("{VIP}:80"), "--count", "1000"],
        )
        .expect("many");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1000");
}

#[test]
fn config_change_moves_new_connections_and_keeps_open_ones() {
    let mesh = Mesh::new("reload");
    let agent = mesh.agent();
    let vip = format!("{VIP}:80");
    // An open connection, echoing for 4 s across the change.
    let mut held = mesh
        .a
        .spawn_ready(TOOL, ["hold", "--connect", &vip, "--seconds", "4"])
        .expect("hold");
    agent
        .write_config(&mesh.config(&[("version", "c")]))
        .expect("new config");
    wait_until(
        || agent.status().is_ok_and(|s| s["config"]["applied"] == 1),
        "reload applied",
    );
    let names: BTreeSet<String> = (0..4).map(|_| mesh.id(&vip).0).collect();
    assert_eq!(
        names,
        BTreeSet::from(["c".to_owned()]),
        "new connections go to the new endpoint set"
    );
    let status = mesh_tests::wait_timeout(held.child_mut(), Duration::from_secs(10)).expect("wait");
    assert!(
        status.is_some_and(|s| s.success()),
        "the held connection kept flowing: {status:?}"
    );
}

#[test]
fn invalid_config_change_is_refused_and_traffic_goes_on() {
    let mesh = Mesh::new("bad_reload");
    let agent = mesh.agent();
    let broken = mesh
        .config(&[("app", "echo")])
        .replace("targetPort: 8080", "targetPort: 70000");
    agent.write_config(&broken).expect("write");
    wait_until(
        || agent.status().is_ok_and(|s| s["config"]["rejected"] == 1),
        "reload rejected",
    );
    let status = agent.status().expect("status");
    let error = status["config"]["lastError"]
        .as_str()
        .expect("error text")
        .to_owned();
    let file = agent.config_path().display().to_string();
    assert!(
        error.starts_with(&format!("{file}:")),
        "error names the file and line: {error}"
    );
    assert!(error.contains("70000"), "{error}");
    // The old snapshot is in force: both endpoints still serve.
    let names: BTreeSet<String> = (0..4).map(|_| mesh.id(&format!("{VIP}:80")).0).collect();
    assert_eq!(names.len(), 2);
}

#[test]
fn udp_is_untouched() {
    let mesh = Mesh::new("udp");
    let _udp = mesh
        .b
        .spawn_ready(TOOL, ["udp-echo", "--listen", "0.0.0.0:5353"])
        .expect("udp echo");
    let agent = mesh.agent();
    mesh.a
        .run(
            TOOL,
            ["udp-ping", "--connect", &format!("{}:5353", mesh.b.ipv4())],
        )
        .expect("udp works");
    assert_eq!(
        agent.workload_counters(&mesh.a).expect("status")["captured"],
        0
    );
}

#[test]
fn inbound_connections_from_outside_the_mesh_pass_through_the_inbound_listener() {
    let mut mesh = Mesh::new("inbound");
    let outsider = mesh.topo.add_pod(&mesh.node, "d").expect("pod d");
    let _agent = mesh.agent();
    // d is not enrolled: its connect is not captured, but b's sk_lookup hands it to the
    // agent's inbound listener, which reaches the app from inside b.
    let out = outsider
        .run(
            TOOL,
            ["id", "--connect", &format!("{}:8080", mesh.b.ipv4())],
        )
        .expect("id");
    let (name, peer) = parse_id_reply(&String::from_utf8_lossy(&out.stdout)).expect("reply");
    assert_eq!(name, "b");
    assert_eq!(
        peer.ip(),
        std::net::IpAddr::V4(mesh.b.ipv4()),
        "the app sees the inbound proxy in its own pod"
    );
}

#[test]
fn fail_closed_pod_is_refused_and_fail_open_pod_goes_direct_when_the_agent_is_down() {
    let mesh = Mesh::new("fail_mode");
    let config = ConfigBuilder::new(&mesh.topo, &mesh.node)
        .workload(&mesh.a, &[("app", "client")], &["failMode: closed"])
        .workload(&mesh.c, &[("app", "other")], &[])
        .build();
    let mut agent = Agent::start(&mesh.topo, &mesh.node, &config).expect("agent");
    let target = format!("{}:8080", mesh.b.ipv4());
    mesh.a
        .run(TOOL, ["connect", "--connect", &target])
        .expect("works with the agent up");
    agent.stop().expect("stop");
    // The programs stay pinned; no listener answers in the pods any more.
    let refused = mesh.a.run(TOOL, ["connect", "--connect", &target]);
    assert!(
        refused.is_err(),
        "fail-closed pod must be refused without the agent"
    );
    mesh.c
        .run(TOOL, ["connect", "--connect", &target])
        .expect("fail-open pod connects directly");
    let cookie = kernel::netns_cookie(&mesh.a.netns_path()).expect("cookie");
    let stats = kernel::pod_stats(&mesh.topo.bpf_pin_name(), cookie)
        .expect("map")
        .expect("counted");
    assert_eq!(stats.no_listener, 1, "{stats:?}");
}

fn wait_until(condition: impl FnMut() -> bool, what: &str) {
    assert!(
        mesh_tests::wait_until(Duration::from_secs(10), condition),
        "timed out waiting for {what}"
    );
}

#[test]
fn proxy_ports_are_kept_for_the_proxy_and_excluded_ports_are_not_captured() {
    let mesh = Mesh::new("guards");
    let _sink = mesh
        .b
        .spawn_ready(TOOL, ["sink", "--listen", "0.0.0.0:9000"])
        .expect("sink");
    let config = mesh.config(&[("app", "echo")]).replace(
        "  connectTimeoutMs: 2000\n",
        &format!(
            "  connectTimeoutMs: 2000\n  excludedPorts: [9000]\n  excludedCidrs: [\"{}/32\", \"{}/128\"]\n",
            mesh.c.ipv4(),
            mesh.c.ipv6()
        ),
    );
    let agent = Agent::start(&mesh.topo, &mesh.node, &config).expect("agent");
    // An app in an enrolled pod may not take the proxy's ports (bind4/6 refuse it).
    for addr in ["0.0.0.0:15008", "[::]:15001"] {
        let squatter = mesh.a.spawn_ready(TOOL, ["serve", "--listen", addr]);
        assert!(squatter.is_err(), "an app bound {addr}");
    }
    // An excluded destination port goes direct, counted as skipped.
    mesh.a
        .run(
            TOOL,
            [
                "send",
                "--connect",
                &format!("{}:9000", mesh.b.ipv4()),
                "--bytes",
                "1000",
            ],
        )
        .expect("send");
    // So does an excluded destination network (c's addresses), over IPv4 and IPv6.
    for target in [
        format!("{}:8080", mesh.c.ipv4()),
        format!("[{}]:8080", mesh.c.ipv6()),
    ] {
        mesh.a
            .run(TOOL, ["connect", "--connect", &target])
            .expect("connect to c");
    }
    let counters = agent.workload_counters(&mesh.a).expect("status");
    assert_eq!(
        (counters["captured"].as_u64(), counters["skipped"].as_u64()),
        (Some(0), Some(3)),
        "{counters}"
    );
}

#[test]
fn authorization_policy_holds_on_the_node_and_a_change_closes_what_it_now_denies() {
    let mut mesh = Mesh::new("authz_local");
    let intruder = mesh.topo.add_pod(&mesh.node, "d").expect("pod d");
    let outsider = mesh.topo.add_pod(&mesh.node, "e").expect("pod e");
    let policy = |action: &str, who: &str| {
        format!(
            "  authorization:\n    - name: echo-policy\n      namespace: test\n      selector: {{app: echo}}\n      action: {action}\n      rules:\n        - from:\n            identities: [\"spiffe://cluster.local/ns/test/sa/{who}\"]\n          ports: [8080]\n"
        )
    };
    let config = |policies: String| {
        ConfigBuilder::new(&mesh.topo, &mesh.node)
            .workload(&mesh.a, &[("app", "client")], &[])
            .workload(&intruder, &[("app", "intruder")], &[])
            .workload(&mesh.b, &[("app", "echo")], &[])
            .service("echo", &[VIP], 80, 8080, &[("app", "echo")])
            .policies(&policies)
            .build()
    };
    let agent = Agent::start(&mesh.topo, &mesh.node, &config(policy("allow", "a"))).expect("agent");
    let vip = format!("{VIP}:80");
    assert_eq!(mesh.id(&vip).0, "b", "the allowed identity gets through");
    assert!(
        intruder.run(TOOL, ["id", "--connect", &vip]).is_err(),
        "another identity is refused"
    );
    // A plaintext client from outside the mesh has no identity: the allow rule cannot match.
    let direct = format!("{}:8080", mesh.b.ipv4());
    assert!(
        outsider.run(TOOL, ["id", "--connect", &direct]).is_err(),
        "unauthenticated refused"
    );

    // A live connection from a, then a policy that denies a: the connection is closed.
    let mut held = mesh
        .a
        .spawn_ready(TOOL, ["hold", "--connect", &vip, "--seconds", "5"])
        .expect("hold");
    agent
        .write_config(&config(policy("deny", "a")))
        .expect("new policy");
    wait_until(
        || agent.status().is_ok_and(|s| s["config"]["applied"] == 1),
        "reload applied",
    );
    let status = mesh_tests::wait_timeout(held.child_mut(), Duration::from_secs(10)).expect("wait");
    assert!(
        status.is_some_and(|s| !s.success()),
        "the held connection was closed: {status:?}"
    );
    assert!(
        mesh.a.run(TOOL, ["id", "--connect", &vip]).is_err(),
        "new connections denied"
    );
    assert_eq!(
        intruder
            .run(TOOL, ["id", "--connect", &vip])
            .map(|_| ())
            .ok(),
        Some(()),
        "d is no longer denied"
    );
}

#[test]
fn unknown_destinations_pass_or_are_denied_per_workload_and_removal_unenrolls() {
    let mut mesh = Mesh::new("unknown_dst");
    let strict = mesh.topo.add_pod(&mesh.node, "s").expect("pod s");
    let outside = mesh.topo.add_pod(&mesh.node, "o").expect("pod o");
    let _server = outside
        .spawn_ready(TOOL, ["serve", "--listen", "[::]:7000", "--name", "o"])
        .expect("server outside the mesh");
    let config = |with_strict: bool| {
        let mut builder =
            ConfigBuilder::new(&mesh.topo, &mesh.node).workload(&mesh.a, &[("app", "client")], &[]);
        if with_strict {
            builder =
                builder.workload(&strict, &[("app", "strict")], &["unknownDestination: deny"]);
        }
        builder.build()
    };
    let agent = Agent::start(&mesh.topo, &mesh.node, &config(true)).expect("agent");
    let target = format!("{}:7000", outside.ipv4());
    mesh.a
        .run(TOOL, ["id", "--connect", &target])
        .expect("passthrough to a pod outside the mesh");
    assert!(
        strict.run(TOOL, ["id", "--connect", &target]).is_err(),
        "denied for the strict pod"
    );
    assert_eq!(
        agent.workload_counters(&strict).expect("status")["captured"],
        1
    );

    // Taking the workload out of the config unenrolls it: no capture, no sk_lookup link.
    let links_before =
        mesh_tests::kernel::pinned_link_ids(&mesh.topo.bpf_pin_name()).expect("links");
    agent
        .write_config(&config(false))
        .expect("config without s");
    wait_until(
        || agent.status().is_ok_and(|s| s["config"]["applied"] == 1),
        "reload applied",
    );
    strict
        .run(TOOL, ["id", "--connect", &target])
        .expect("s connects directly now");
    let cookie = kernel::netns_cookie(&strict.netns_path()).expect("cookie");
    assert_eq!(
        kernel::pod_stats(&mesh.topo.bpf_pin_name(), cookie).expect("map"),
        None
    );
    let links_after =
        mesh_tests::kernel::pinned_link_ids(&mesh.topo.bpf_pin_name()).expect("links");
    assert_eq!(
        links_after.len() + 1,
        links_before.len(),
        "s's sk_lookup link is gone"
    );
}

#[test]
fn at_the_connection_limit_new_connections_wait_instead_of_costing_memory() {
    let mesh = Mesh::new("limit");
    let config = mesh.config(&[("app", "echo")]).replace(
        "  connectTimeoutMs: 2000\n",
        "  connectTimeoutMs: 2000\n  maxConnections: 2\n",
    );
    let _agent = Agent::start(&mesh.topo, &mesh.node, &config).expect("agent");
    let vip = format!("{VIP}:80");
    let mut holds: Vec<_> = (0..2)
        .map(|_| {
            mesh.a
                .spawn_ready(TOOL, ["hold", "--connect", &vip, "--seconds", "3"])
                .expect("hold")
        })
        .collect();
    // Both slots are taken: a third connection waits in the backlog, unanswered.
    let waiting = mesh
        .a
        .run(TOOL, ["id", "--connect", &vip, "--timeout-ms", "1000"]);
    assert!(
        waiting.is_err(),
        "a third connection was served at a limit of 2"
    );
    for hold in &mut holds {
        let status =
            mesh_tests::wait_timeout(hold.child_mut(), Duration::from_secs(10)).expect("wait");
        assert!(
            status.is_some_and(|s| s.success()),
            "held connections kept flowing"
        );
    }
    // Slots free again: served.
    assert!(["b", "c"].contains(&mesh.id(&vip).0.as_str()));
}

#[test]
fn a_reload_changing_start_up_settings_is_refused_and_exclusions_apply_live() {
    let mesh = Mesh::new("reload_agent");
    let agent = mesh.agent();
    let vip = format!("{VIP}:80");
    let base = mesh.config(&[("app", "echo")]);
    // A new outbound port would need new listeners in every pod: refused until restart.
    agent
        .write_config(&base.replace(
            "  connectTimeoutMs: 2000\n",
            "  connectTimeoutMs: 2000\n  outboundPort: 15101\n",
        ))
        .expect("write");
    wait_until(
        || agent.status().is_ok_and(|s| s["config"]["rejected"] == 1),
        "reload refused",
    );
    let status = agent.status().expect("status");
    let error = status["config"]["lastError"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        error.contains("agent.outboundPort") && error.contains("restart"),
        "{error}"
    );
    assert!(
        ["b", "c"].contains(&mesh.id(&vip).0.as_str()),
        "traffic goes on"
    );
    // Excluded ports are live: connects to b:8080 now go direct.
    agent
        .write_config(&base.replace(
            "  connectTimeoutMs: 2000\n",
            "  connectTimeoutMs: 2000\n  excludedPorts: [8080]\n",
        ))
        .expect("write");
    wait_until(
        || agent.status().is_ok_and(|s| s["config"]["applied"] == 1),
        "reload applied",
    );
    let before = agent.workload_counters(&mesh.a).expect("status")["skipped"].as_u64();
    mesh.a
        .run(
            TOOL,
            ["connect", "--connect", &format!("{}:8080", mesh.b.ipv4())],
        )
        .expect("connect");
    let after = agent.workload_counters(&mesh.a).expect("status")["skipped"].as_u64();
    assert_eq!((before, after), (Some(0), Some(1)));
}

/// Waits until `mesh_bytes_total` and `mesh_connections_total` show what was sent: results
/// are recorded when a connection ends, a moment after the client has its reply.
fn wait_for_metric(agent: &Agent, name: &str, labels: &[(&str, &str)], want: f64) {
    let got = || agent.metric(name, labels).expect("metrics");
    assert!(
        mesh_tests::wait_until(Duration::from_secs(5), || got() == want),
        "{name}{labels:?} is {}, expected {want}\n{}",
        got(),
        agent.metrics().unwrap_or_default()
    );
}

#[test]
fn byte_and_connection_counters_follow_each_direction() {
    let mut mesh = Mesh::new("byte_counters");
    let outsider = mesh.topo.add_pod(&mesh.node, "d").expect("pod d");
    let _sink = mesh
        .b
        .spawn_ready(TOOL, ["sink", "--listen", "[::]:9000"])
        .expect("sink");
    let agent = mesh.agent();
    let sink = format!("{}:9000", mesh.b.ipv4());
    // Outbound: pod a (enrolled) sends 100,000 bytes; the sink answers with one line,
    // `<64 hex digits> 100000\n` (72 bytes).
    mesh.a
        .run(TOOL, ["send", "--connect", &sink, "--bytes", "100000"])
        .expect("send from a");
    let outbound = [("direction", "outbound")];
    let way = |way| [("direction", "outbound"), ("way", way)];
    wait_for_metric(&agent, "mesh_bytes_total", &way("from_client"), 100_000.0);
    wait_for_metric(&agent, "mesh_bytes_total", &way("to_client"), 72.0);
    wait_for_metric(
        &agent,
        "mesh_connections_total",
        &[
            outbound[0],
            ("route", "pod"),
            ("security", "plaintext"),
            ("outcome", "closed"),
        ],
        1.0,
    );
    // Inbound: d (not enrolled) sends 30,000 bytes to b, whose inbound listener takes it;
    // the reply is 71 bytes. From the client means from d here, whoever owns the pod.
    outsider
        .run(TOOL, ["send", "--connect", &sink, "--bytes", "30000"])
        .expect("send from d");
    let way = |way| [("direction", "inbound"), ("way", way)];
    wait_for_metric(&agent, "mesh_bytes_total", &way("from_client"), 30_000.0);
    wait_for_metric(&agent, "mesh_bytes_total", &way("to_client"), 71.0);
    wait_for_metric(
        &agent,
        "mesh_connections_total",
        &[
            ("direction", "inbound"),
            ("route", "plaintext"),
            ("security", "plaintext"),
            ("outcome", "closed"),
        ],
        1.0,
    );
    // The same as Istio's TCP metrics, with Istio's labels: the client side reports
    // outbound (reporter=source), the pod's side inbound (reporter=destination); "received"
    // is what the server received.
    let istio =
        |name: &str, labels: &[(&str, &str)]| agent.metric_sum(name, labels).expect("metrics");
    let a_to_b = [
        ("reporter", "source"),
        ("source_workload", "a"),
        ("source_workload_namespace", "test"),
        ("source_principal", "spiffe://cluster.local/ns/test/sa/a"),
        ("source_app", "client"),
        ("destination_workload", "b"),
        (
            "destination_principal",
            "spiffe://cluster.local/ns/test/sa/b",
        ),
        ("destination_app", "echo"),
        ("destination_version", "b"),
        ("request_protocol", "tcp"),
        ("response_flags", "-"),
        ("connection_security_policy", "none"),
    ];
    assert_eq!(istio("istio_tcp_received_bytes_total", &a_to_b), 100_000.0);
    assert_eq!(istio("istio_tcp_sent_bytes_total", &a_to_b), 72.0);
    assert_eq!(istio("istio_tcp_connections_opened_total", &a_to_b), 1.0);
    assert_eq!(istio("istio_tcp_connections_closed_total", &a_to_b), 1.0);
    let to_b = [
        ("reporter", "destination"),
        ("source_workload", "unknown"),
        ("destination_workload", "b"),
    ];
    assert_eq!(istio("istio_tcp_received_bytes_total", &to_b), 30_000.0);
    assert_eq!(istio("istio_tcp_sent_bytes_total", &to_b), 71.0);
    // Nothing was counted twice or the wrong way round.
    let outbound_from = agent
        .metric(
            "mesh_bytes_total",
            &[("direction", "outbound"), ("way", "from_client")],
        )
        .expect("metrics");
    assert_eq!(outbound_from, 100_000.0);
    // A long connection's bytes are counted while it is open.
    let mut held = mesh
        .a
        .spawn_ready(
            TOOL,
            ["hold", "--connect", &format!("{VIP}:80"), "--seconds", "8"],
        )
        .expect("hold");
    let to_service = [
        ("reporter", "source"),
        ("destination_service", "echo.test.svc.cluster.local"),
        ("destination_service_name", "echo"),
        ("destination_service_namespace", "test"),
    ];
    let deadline = std::time::Instant::now() + Duration::from_secs(7);
    while istio("istio_tcp_received_bytes_total", &to_service) == 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "bytes of the open connection counted within the flush interval"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        istio("istio_tcp_connections_closed_total", &to_service),
        0.0
    );
    assert!(
        mesh_tests::wait_timeout(held.child_mut(), Duration::from_secs(10))
            .expect("wait")
            .is_some_and(|s| s.success())
    );
}

#[test]
fn the_metrics_pass_promtool_check() {
    let mesh = Mesh::new("promtool");
    let agent = mesh.agent();
    // Traffic first, so every family has series.
    let _ = mesh.id(&format!("{VIP}:80"));
    let exposition = agent.metrics().expect("metrics");
    // The connect latency of the service, and each local identity's certificate expiry.
    assert_eq!(
        mesh_tests::agent::metric_value(
            &exposition,
            "mesh_connect_duration_seconds_count",
            &[("service", "test/echo")]
        ),
        1.0,
        "{exposition}"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as f64;
    let expiry = mesh_tests::agent::metric_value(
        &exposition,
        "mesh_certificate_expiry_timestamp_seconds",
        &[("identity", "spiffe://cluster.local/ns/test/sa/a")],
    );
    assert!(
        expiry > now + 3600.0,
        "a's certificate expires in the future: {expiry}"
    );
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (installed by cargo xtask test)");
    std::io::Write::write_all(
        &mut promtool.stdin.take().expect("stdin"),
        exposition.as_bytes(),
    )
    .expect("write");
    let out = promtool.wait_with_output().expect("promtool");
    let complaints = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && complaints.trim().is_empty(),
        "promtool check metrics: {complaints}\n{exposition}"
    );
}
