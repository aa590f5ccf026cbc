//! Node-to-node mTLS end to end: two nodes, one agent each, pods' connections to endpoints
//! on the other node go through HTTP/2 CONNECT tunnels over mutual TLS.

use std::{process::Stdio, time::Duration};

use mesh_tests::{Agent, fixtures::TwoNodes, payload, wait_timeout, wait_until};

const TOOL: &str = env!("CARGO_BIN_EXE_mesh-testtool");
const VIP: &str = "10.96.0.10:80";
const ID_A: &str = "spiffe://cluster.local/ns/test/sa/a";

#[test]
fn cross_node_traffic_is_mutual_tls_and_the_server_side_knows_the_client_identity() {
    let mesh = TwoNodes::new("mtls_path");
    let (one, two) = mesh.agents(&[], None);
    // Capture everything on node 1's underlay while the client talks to the service.
    let pcap = std::env::temp_dir()
        .join(format!("mesh-test-{}", mesh.topo.id()))
        .join("underlay.pcap");
    let mut capture = mesh
        .n1
        .command("tcpdump")
        .args([
            "-i",
            &mesh.n1.underlay_dev_to(&mesh.n2),
            "-U",
            "-s",
            "0",
            "-w",
        ])
        .arg(&pcap)
        .arg("tcp")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tcpdump (installed by cargo xtask test)");
    std::thread::sleep(Duration::from_millis(700));

    let (name, _) = mesh.a.id(VIP).expect("a reaches b across nodes");
    assert_eq!(name, "b");
    let bytes = 4u64 << 20;
    mesh.a
        .run(
            TOOL,
            ["echo", "--connect", VIP, "--bytes", &bytes.to_string()],
        )
        .expect("4 MiB echoed");

    // Both agents counted the same bytes each way: `ID\n` and the 4 MiB from the client,
    // the id reply and the echo back; the server side as tunnel streams.
    let from_client = (3 + bytes) as f64;
    let metric = |agent: &Agent, direction: &str, way: &str| {
        agent
            .metric(
                "mesh_bytes_total",
                &[("direction", direction), ("way", way)],
            )
            .expect("metrics")
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while metric(&two, "tunnel", "from_client") != from_client
        || metric(&one, "outbound", "from_client") != from_client
    {
        assert!(
            std::time::Instant::now() < deadline,
            "bytes from the client: outbound {} and tunnel {}, expected {from_client}",
            metric(&one, "outbound", "from_client"),
            metric(&two, "tunnel", "from_client"),
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let to_client = metric(&one, "outbound", "to_client");
    assert!(to_client > bytes as f64, "the echo came back: {to_client}");
    assert_eq!(metric(&two, "tunnel", "to_client"), to_client);
    let closed = |agent: &Agent, direction: &str, route: &str| {
        agent
            .metric(
                "mesh_connections_total",
                &[
                    ("direction", direction),
                    ("route", route),
                    ("security", "mutual_tls"),
                    ("outcome", "closed"),
                ],
            )
            .expect("metrics")
    };
    assert_eq!(closed(&one, "outbound", "service"), 2.0);
    assert_eq!(closed(&two, "tunnel", "tunnel"), 2.0);
    // Istio's metric on the server side: a's identity, mutual TLS, the echo's bytes.
    let mtls_from_a = [
        ("reporter", "destination"),
        ("source_workload", "a"),
        ("source_principal", ID_A),
        ("destination_workload", "b"),
        ("connection_security_policy", "mutual_tls"),
    ];
    let istio = |name: &str| two.metric_sum(name, &mtls_from_a).expect("metrics");
    assert_eq!(istio("istio_tcp_connections_closed_total"), 2.0);
    assert_eq!(istio("istio_tcp_received_bytes_total"), from_client);

    // While a connection is open, node 2's agent shows it with a's identity.
    let mut held = mesh
        .a
        .spawn_ready(TOOL, ["hold", "--connect", VIP, "--seconds", "2"])
        .expect("hold");
    // The client is connected to agent 1 once `hold` is ready; its stream reaches agent 2
    // a moment later.
    let mut connections = Vec::new();
    let seen = wait_until(Duration::from_secs(5), || {
        let status = two.status().expect("status of agent 2");
        connections = status["connections"]
            .as_array()
            .expect("connections")
            .clone();
        connections
            .iter()
            .any(|c| c["source"] == ID_A && c["destination"] == "test/b" && c["port"] == 8080)
    });
    assert!(seen, "agent 2 sees a's identity: {connections:?}");
    assert!(
        wait_timeout(held.child_mut(), Duration::from_secs(10))
            .expect("wait")
            .is_some_and(|s| s.success())
    );

    std::thread::sleep(Duration::from_millis(500));
    // Our own, not yet reaped, child.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(capture.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    );
    let _ = capture.wait();
    let data = std::fs::read(&pcap).expect("capture file");
    assert!(
        data.len() > 4 << 20,
        "the capture holds the transfer ({} bytes)",
        data.len()
    );
    // TLS records (handshake 0x16 0x03 0x03 / application data 0x17 0x03 0x03) on the wire...
    assert!(
        data.windows(3)
            .any(|w| w == [0x16, 0x03, 0x01] || w == [0x16, 0x03, 0x03]),
        "TLS handshake"
    );
    // ... and none of the payload in clear: 64-byte pieces of what the client sent.
    let mut sent = vec![0u8; 1 << 20];
    payload::Payload::new(payload::SEED).fill(&mut sent);
    for piece in sent.chunks(64).step_by(997).take(16) {
        assert!(
            !data.windows(piece.len()).any(|w| w == piece),
            "plaintext payload on the underlay"
        );
    }
    // The server's reply line (long enough not to turn up in ciphertext by chance).
    let reply_prefix = format!("b {}:", mesh.a.ipv4());
    assert!(
        !data
            .windows(reply_prefix.len())
            .any(|w| w == reply_prefix.as_bytes()),
        "the id reply crossed in clear"
    );
    let _ = std::fs::remove_file(&pcap);
}

#[test]
fn cross_node_authorization_allows_and_denies_by_identity_and_revokes_on_change() {
    let mesh = TwoNodes::new("mtls_authz");
    let policy = |action: &str| {
        format!(
            "  authorization:\n    - name: echo-policy\n      namespace: test\n      selector: {{app: echo}}\n      action: {action}\n      rules:\n        - from:\n            identities: [\"{ID_A}\"]\n"
        )
    };
    let allow_a = policy("allow");
    let (_one, two) = mesh.agents(&[], Some(&allow_a));
    mesh.a
        .run(TOOL, ["id", "--connect", VIP])
        .expect("a is allowed");
    assert!(
        mesh.d.run(TOOL, ["id", "--connect", VIP]).is_err(),
        "d is denied by b's node"
    );

    // A live tunnel stream from a, then node 2 denies a: the stream is closed.
    let mut held = mesh
        .a
        .spawn_ready(TOOL, ["hold", "--connect", VIP, "--seconds", "5"])
        .expect("hold");
    let deny_a = policy("deny");
    let pin = mesh.topo.bpf_pin_name();
    let config = mesh.config(&mesh.n2, &[], Some(&deny_a)).replace(
        &format!("bpfName: {pin}\n"),
        &format!("bpfName: {pin}-n2\n"),
    );
    two.write_config(&config).expect("new policy on node 2");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !two.status().is_ok_and(|s| s["config"]["applied"] == 1) {
        assert!(
            std::time::Instant::now() < deadline,
            "node 2 applied the policy"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = wait_timeout(held.child_mut(), Duration::from_secs(10)).expect("wait");
    assert!(
        status.is_some_and(|s| !s.success()),
        "the held stream was closed: {status:?}"
    );
    assert!(
        mesh.a.run(TOOL, ["id", "--connect", VIP]).is_err(),
        "a is denied now"
    );
    mesh.d
        .run(TOOL, ["id", "--connect", VIP])
        .expect("d is allowed now");
}

#[test]
fn garbage_and_plaintext_on_the_tunnel_port_are_refused_and_the_tunnel_keeps_serving() {
    let mut mesh = TwoNodes::new("mtls_garbage");
    let outsider = mesh.topo.add_pod(&mesh.n1, "e").expect("pod e");
    let (one, two) = mesh.agents(&[], None);
    let tunnel = format!("{}:15008", mesh.b.ipv4());
    // A raw byte stream (not TLS) and an HTTP/1 request: both get no reply.
    let garbage = outsider.run(TOOL, ["send", "--connect", &tunnel, "--bytes", "100000"]);
    assert!(garbage.is_err(), "the tunnel answered garbage");
    // Plaintext: at most a TLS alert comes back, never an answer from the app.
    if let Ok(out) = outsider.run(TOOL, ["id", "--connect", &tunnel]) {
        let reply = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            mesh_tests::parse_id_reply(&reply).is_err(),
            "the tunnel answered plaintext: {reply:?}"
        );
        assert!(!reply.contains(" b "), "{reply:?}");
    }
    mesh.a
        .run(TOOL, ["id", "--connect", VIP])
        .expect("the tunnel still serves");
    two.status().expect("agent 2 is alive");
    // Both refusals count as failed handshakes on the server side, the good tunnel as one
    // successful handshake on each side.
    let handshakes = |agent: &Agent, role: &str, result: &str| {
        agent
            .metric(
                "mesh_tls_handshakes_total",
                &[("role", role), ("result", result)],
            )
            .expect("metrics")
    };
    assert_eq!(handshakes(&two, "server", "failed"), 2.0);
    assert_eq!(handshakes(&two, "server", "ok"), 1.0);
    assert_eq!(handshakes(&one, "client", "ok"), 1.0);
    assert_eq!(handshakes(&one, "client", "failed"), 0.0);
}

#[test]
fn tunnel_capture_and_config_build_metrics_follow_what_happens() {
    let mesh = TwoNodes::new("mtls_metrics");
    let (one, two) = mesh.agents(&[], None);
    let gauge = |agent: &Agent, name: &str, role: &str| {
        agent.metric(name, &[("role", role)]).expect("metrics")
    };
    let wait = |what: &str, done: &dyn Fn() -> bool| {
        assert!(wait_until(Duration::from_secs(5), done), "{what}");
    };

    // A held connection: one tunnel with one stream, seen from both ends.
    let mut held = mesh
        .a
        .spawn_ready(TOOL, ["hold", "--connect", VIP, "--seconds", "2"])
        .expect("hold");
    wait("one stream on each side", &|| {
        gauge(&one, "mesh_tunnel_streams", "client") == 1.0
            && gauge(&two, "mesh_tunnel_streams", "server") == 1.0
    });
    assert_eq!(gauge(&one, "mesh_tunnel_connections", "client"), 1.0);
    assert_eq!(gauge(&two, "mesh_tunnel_connections", "server"), 1.0);
    assert!(
        wait_timeout(held.child_mut(), Duration::from_secs(10))
            .expect("wait")
            .is_some_and(|s| s.success())
    );
    // The stream ends; the tunnel stays pooled for the next one.
    wait("the stream ended on both sides", &|| {
        gauge(&one, "mesh_tunnel_streams", "client") == 0.0
            && gauge(&two, "mesh_tunnel_streams", "server") == 0.0
    });
    assert_eq!(gauge(&one, "mesh_tunnel_connections", "client"), 1.0);

    // The capture counters of a, per workload, are the eBPF program's.
    let captured = one
        .metric(
            "mesh_captured_connections_total",
            &[("workload", "test/a"), ("result", "captured")],
        )
        .expect("metrics");
    let counted = one.workload_counters(&mesh.a).expect("status")["captured"].as_u64();
    assert!(captured >= 1.0, "a's connect was captured: {captured}");
    assert_eq!(Some(captured as u64), counted);

    // One snapshot built at start, one more per applied reload.
    let builds = || {
        one.metric("mesh_config_build_duration_seconds_count", &[])
            .expect("metrics")
    };
    assert_eq!(builds(), 1.0);
    one.reload(&mesh.config(&mesh.n1, &["idleTimeoutMs: 120000"], None))
        .expect("reload");
    wait("a second build after the reload", &|| builds() == 2.0);
}

#[test]
fn certificate_rotation_keeps_a_live_cross_node_stream() {
    let mesh = TwoNodes::new("mtls_rotation");
    // One-minute certificates rotate at about half-life (30 s, +-10%).
    let (one, two) = mesh.agents(&["certLifetimeMinutes: 1"], None);
    let serial = |agent: &Agent, identity: &str| -> String {
        let status = agent.status().expect("status");
        status["certificates"]
            .as_array()
            .and_then(|certs| certs.iter().find(|c| c["identity"] == identity))
            .and_then(|c| c["serial"].as_str())
            .unwrap_or_default()
            .to_owned()
    };
    let first = (
        serial(&one, ID_A),
        serial(&two, "spiffe://cluster.local/ns/test/sa/b"),
    );
    assert!(
        !first.0.is_empty() && !first.1.is_empty(),
        "certificates issued: {first:?}"
    );
    let mut held = mesh
        .a
        .spawn_ready(TOOL, ["hold", "--connect", VIP, "--seconds", "40"])
        .expect("hold");
    let status = wait_timeout(held.child_mut(), Duration::from_secs(60)).expect("wait");
    assert!(
        status.is_some_and(|s| s.success()),
        "the stream lived through the rotation: {status:?}"
    );
    let after = (
        serial(&one, ID_A),
        serial(&two, "spiffe://cluster.local/ns/test/sa/b"),
    );
    assert!(
        after.0 != first.0 && after.1 != first.1,
        "both certificates rotated: {first:?} -> {after:?}"
    );
    // New connections work with the new certificates.
    mesh.a
        .run(TOOL, ["id", "--connect", VIP])
        .expect("after rotation");
}
