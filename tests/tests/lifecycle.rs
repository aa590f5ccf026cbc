//! A rolling update of the agent on a node: a successor starts beside the running agent, the
//! old one gets SIGTERM, hands over and drains. Real agents, real namespaces, real traffic.

use std::time::Duration;

use mesh_tests::{Agent, ConfigBuilder, Topology, assert_root, wait_timeout};

const TOOL: &str = env!("CARGO_BIN_EXE_mesh-testtool");
const VIP: &str = "10.96.0.10:80";

#[test]
fn an_agent_replacement_fails_no_new_connection_and_lets_a_live_stream_finish() {
    assert_root();
    let mut topo = Topology::new("handover").expect("topology");
    let node = topo.add_node("node1").expect("node");
    let a = topo.add_pod(&node, "a").expect("pod a");
    let b = topo.add_pod(&node, "b").expect("pod b");
    let _server = b
        .spawn_ready(TOOL, ["serve", "--listen", "[::]:8080", "--name", "b"])
        .expect("server");
    // Fail closed: a connection no agent takes is refused, not passed around the mesh, so
    // every connection that succeeds went through an agent.
    let config = ConfigBuilder::new(&topo, &node)
        .agent_line("drainTimeoutMs: 20000")
        .workload(&a, &[("app", "client")], &["failMode: closed"])
        .workload(&b, &[("app", "echo")], &[])
        .service("echo", &["10.96.0.10"], 80, 8080, &[("app", "echo")])
        .build();
    let mut old = Agent::start(&topo, &node, &config).expect("the old agent");

    // A stream through the old agent for 6 s (it checks every echo), and a steady 40 new
    // connections per second for 7.5 s.
    let mut stream = a
        .spawn_ready(TOOL, ["hold", "--connect", VIP, "--seconds", "6"])
        .expect("long-lived stream");
    let steady = a
        .command(TOOL)
        .args(["ids", "--connect", VIP, "--count", "300", "--rate", "40"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("steady connections");
    std::thread::sleep(Duration::from_millis(1000));

    // The successor starts beside it (a DaemonSet's surge pod), then the old one is told to
    // stop.
    let new = Agent::start(&topo, &node, &config).expect("the successor");
    std::thread::sleep(Duration::from_millis(500));
    old.terminate().expect("SIGTERM");

    // The stream finishes intact through the old agent, which then exits, well within its
    // drain timeout.
    let held = wait_timeout(stream.child_mut(), Duration::from_secs(15)).expect("wait");
    assert!(
        held.is_some_and(|status| status.success()),
        "the long-lived stream broke: {held:?}"
    );
    let (status, took) = old
        .wait_exit(Duration::from_secs(25))
        .expect("the old agent exits");
    assert!(status.success(), "the old agent exited with {status}");
    assert!(took < Duration::from_secs(10), "the drain took {took:?}");
    assert!(
        old.log_lines()
            .iter()
            .any(|line| line.contains("a successor took over")),
        "the old agent saw its successor"
    );

    // Not one new connection failed, before, during or after the handover.
    let out = steady.wait_with_output().expect("steady connections end");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains("b 300") && report.contains("failed 0"),
        "new connections during the handover: {report}"
    );
    // The successor serves alone now.
    a.run(TOOL, ["id", "--connect", VIP])
        .expect("the successor proxies");
    new.status().expect("the successor answers");
}
