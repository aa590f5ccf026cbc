//! The client's address across nodes: the app of a pod on node 2 sees the address of the
//! client pod on node 1 (the agent there connects from a transparent socket bound to it, and
//! the pod's reply route brings the app's answers back), over IPv4 and IPv6, for long
//! transfers and many connections; the reply route leaves with the pod; and where the kernel
//! refuses it, connections go on from the pod's own address, counted and warned about once.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use mesh_tests::{Agent, ConfigBuilder, Pod, fixtures::TwoNodes, parse_ids, wait_until};

const TOOL: &str = env!("CARGO_BIN_EXE_mesh-testtool");
const VIP: &str = "10.96.0.10:80";
/// The defaults of `agent.transparentMark` and `agent.replyTable`.
const MARK: &str = "0x40000539";
const TABLE: &str = "1337";

/// `ip <args>` in `pod`'s netns, its stdout.
fn ip(pod: &Pod, args: &[&str]) -> String {
    let out = pod.run("ip", args).expect("ip");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether `pod`'s netns has the reply rule and route of `family` (`-4` or `-6`).
fn reply_route(pod: &Pod, family: &str) -> (bool, bool) {
    let rules = ip(pod, &[family, "rule", "show"]);
    let rule = rules
        .lines()
        .any(|l| l.contains(&format!("fwmark {MARK} lookup {TABLE}")));
    let routes = ip(pod, &[family, "route", "show", "table", TABLE]);
    let route = routes
        .lines()
        .any(|l| l.starts_with("local default dev lo"));
    (rule, route)
}

fn fallbacks(agent: &Agent) -> f64 {
    agent
        .metric_sum("mesh_client_ip_fallbacks_total", &[("workload", "test/b")])
        .expect("metrics")
}

#[test]
fn across_nodes_the_app_sees_the_client_pod_and_the_reply_route_leaves_with_the_pod() {
    let mesh = TwoNodes::new("client_ip");
    let (_one, two) = mesh.agents(&[], None);
    assert_eq!(
        reply_route(&mesh.b, "-4"),
        (true, true),
        "b's IPv4 reply route"
    );
    assert_eq!(
        reply_route(&mesh.b, "-6"),
        (true, true),
        "b's IPv6 reply route"
    );

    // Through the service and to b's addresses, from both pods of node 1.
    let (name, peer) = mesh.a.id(VIP).expect("a reaches b");
    assert_eq!((name.as_str(), peer.ip()), ("b", IpAddr::V4(mesh.a.ipv4())));
    let (_, peer) = mesh.d.id(VIP).expect("d reaches b");
    assert_eq!(peer.ip(), IpAddr::V4(mesh.d.ipv4()), "d is not a");
    let b6 = SocketAddr::new(mesh.b.ipv6().into(), 8080).to_string();
    let (_, peer) = mesh.a.id(&b6).expect("a reaches b over IPv6");
    assert_eq!(peer.ip(), IpAddr::V6(mesh.a.ipv6()));

    // A long transfer: every byte of the echo comes back through the reply route.
    let bytes = (64u64 << 20).to_string();
    mesh.a
        .run(TOOL, ["echo", "--connect", VIP, "--bytes", &bytes])
        .expect("64 MiB echoed through the transparent path");
    mesh.a
        .run(TOOL, ["echo", "--connect", &b6, "--bytes", &bytes])
        .expect("64 MiB echoed over IPv6");
    // Many connections one after the other (ports are picked per connection).
    let out = mesh
        .a
        .run(TOOL, ["ids", "--connect", VIP, "--count", "300"])
        .expect("ids");
    let (counts, failed) = parse_ids(&String::from_utf8_lossy(&out.stdout)).expect("ids output");
    assert_eq!((counts.get("b").copied(), failed), (Some(300), 0));
    assert_eq!(fallbacks(&two), 0.0, "no connection fell back");

    // The server side's access log names a's address as the client.
    let client = format!("client={}:", mesh.a.ipv4());
    assert!(
        wait_until(Duration::from_secs(5), || two.access_log().iter().any(
            |l| l.contains("tunnel") && l.contains(&client) && l.contains("test/a")
        )),
        "agent 2 logs a as the client: {:?}",
        two.access_log().last()
    );
    let status = two.status().expect("status");
    let pods = status["workloads"].as_array().expect("workloads").clone();
    assert!(
        pods.iter().all(|p| p["clientIpRefused"].is_null()),
        "{pods:?}"
    );

    // b leaves node 2's configuration: its reply route goes with it.
    let pin = mesh.topo.bpf_pin_name();
    let without_b = ConfigBuilder::new(&mesh.topo, &mesh.n2)
        .agent_line(&format!(
            "caCertFile: {}",
            mesh.ca_dir.join("ca.crt").display()
        ))
        .agent_line(&format!(
            "caKeyFile: {}",
            mesh.ca_dir.join("ca.key").display()
        ))
        .workload(&mesh.a, &[("app", "client")], &[])
        .workload(&mesh.d, &[("app", "other")], &[])
        .build()
        .replace(
            &format!("bpfName: {pin}\n"),
            &format!("bpfName: {pin}-n2\n"),
        );
    two.reload(&without_b).expect("reload without b on node 2");
    let gone = || {
        reply_route(&mesh.b, "-4") == (false, false) && reply_route(&mesh.b, "-6") == (false, false)
    };
    assert!(
        wait_until(Duration::from_secs(5), gone),
        "b's rules and routes removed: IPv4 {:?}, IPv6 {:?}",
        reply_route(&mesh.b, "-4"),
        reply_route(&mesh.b, "-6")
    );
}

#[test]
fn where_the_reply_table_is_taken_the_app_sees_its_own_pod_and_the_agent_says_so_once() {
    let mesh = TwoNodes::new("client_ip_fallback");
    // Something else already uses the table for IPv4 in b's netns: the agent leaves it.
    mesh.b
        .run(
            "ip",
            [
                "-4",
                "route",
                "add",
                "unreachable",
                "default",
                "table",
                TABLE,
            ],
        )
        .expect("a route of someone else's in the table");
    let (_one, two) = mesh.agents(&[], None);

    for _ in 0..3 {
        let (name, peer) = mesh.a.id(VIP).expect("a still reaches b");
        assert_eq!(
            (name.as_str(), peer.ip()),
            ("b", IpAddr::V4(mesh.b.ipv4())),
            "the app sees its own pod's address"
        );
    }
    mesh.a
        .run(TOOL, ["echo", "--connect", VIP, "--bytes", "1048576"])
        .expect("traffic still flows");
    assert_eq!(fallbacks(&two), 4.0, "each connection counted");
    // IPv6 is not affected: its table is free.
    let b6 = SocketAddr::new(mesh.b.ipv6().into(), 8080).to_string();
    let (_, peer) = mesh.a.id(&b6).expect("a reaches b over IPv6");
    assert_eq!(peer.ip(), IpAddr::V6(mesh.a.ipv6()));

    let warnings: Vec<String> = two
        .log_lines()
        .into_iter()
        .filter(|l| l.contains("own address instead of the client's"))
        .collect();
    assert_eq!(warnings.len(), 1, "one warning for the pod: {warnings:?}");
    assert!(
        warnings[0].contains("already holds another IPv4 default route"),
        "{warnings:?}"
    );
    let status = two.status().expect("status");
    let b = status["workloads"]
        .as_array()
        .and_then(|pods| pods.iter().find(|p| p["workload"] == "test/b"))
        .cloned()
        .expect("b in the status");
    assert!(
        b["clientIpRefused"]
            .as_str()
            .is_some_and(|r| r.contains("table 1337")),
        "{b}"
    );
    assert_eq!(b["clientIpFallbacks"], 4, "{b}");
    // The other route in the table is untouched, and no rule was added for IPv4.
    assert!(ip(&mesh.b, &["-4", "route", "show", "table", TABLE]).contains("unreachable default"));
    assert_eq!(reply_route(&mesh.b, "-4"), (false, false));
}
