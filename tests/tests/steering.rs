//! The foundation's end-to-end proof: with the agent running, the connect hook sees the
//! enrolled pod's connects and not a non-enrolled pod's; a restart keeps steering; and
//! uninstall plus topology drop leave no namespace, cgroup, link or pin behind.

use std::path::Path;

use mesh_tests::{Agent, ConfigBuilder, Topology, assert_root, kernel, parse_id_reply};

const TOOL: &str = env!("CARGO_BIN_EXE_mesh-testtool");

#[test]
fn connect_hook_sees_enrolled_pod_only_and_cleanup_leaves_nothing() {
    assert_root();
    let mut topo = Topology::new("steering").expect("topology");
    let node = topo.add_node("node1").expect("node");
    let enrolled = topo.add_pod(&node, "a").expect("pod a");
    let outsider = topo.add_pod(&node, "b").expect("pod b");
    let server = topo.add_pod(&node, "c").expect("pod c");
    let _serve = server
        .spawn_ready(TOOL, ["serve", "--listen", "0.0.0.0:8080", "--name", "c"])
        .expect("server");
    let config = ConfigBuilder::new(&topo, &node)
        .workload(&enrolled, &[("app", "a")], &[])
        .build();
    let pin_name = topo.bpf_pin_name();
    let mut agent = Agent::start(&topo, &node, &config).expect("agent starts");

    let links = kernel::pinned_link_ids(&pin_name).expect("pinned links");
    // connect4, connect6, bind4, bind6, sock_ops on the cgroup, sk_lookup in pod a's netns;
    // with the fast path, sock_ops on the agent's own cgroup too.
    let expected = 6 + usize::from(mesh_tests::agent::fast_path_from_env());
    assert_eq!(links.len(), expected, "pinned links: {links:?}");

    let target = format!("{}:8080", server.ipv4());
    for pod in [&enrolled, &outsider] {
        let out = pod
            .run(TOOL, ["id", "--connect", &target])
            .expect("connect works");
        let (name, _) = parse_id_reply(&String::from_utf8_lossy(&out.stdout)).expect("reply");
        assert_eq!(name, "c");
    }

    let enrolled_cookie = kernel::netns_cookie(&enrolled.netns_path()).expect("cookie a");
    let outsider_cookie = kernel::netns_cookie(&outsider.netns_path()).expect("cookie b");
    let seen = kernel::pod_stats(&pin_name, enrolled_cookie).expect("read map");
    assert_eq!(
        seen.map(|s| s.captured),
        Some(1),
        "connect4 saw pod a's connect once: {seen:?}"
    );
    let unseen = kernel::pod_stats(&pin_name, outsider_cookie).expect("read map");
    assert_eq!(
        unseen, None,
        "connect4 must not count the non-enrolled pod b"
    );
    // The agent's own report agrees with the kernel map.
    let counters = agent.workload_counters(&enrolled).expect("status");
    assert_eq!(counters["captured"], 1);
    assert_eq!(counters["netnsCookie"], enrolled_cookie);
    println!("{}", agent.status_table().expect("status table"));

    // SIGTERM exits cleanly and leaves steering pinned (restarts keep pods steered) ...
    let exit = agent.stop().expect("agent stops");
    assert!(exit.success(), "agent exit status {exit}");
    assert!(
        Path::new("/sys/fs/bpf").join(&pin_name).exists(),
        "pins survive SIGTERM"
    );
    let live = kernel::live_link_ids().expect("links");
    assert!(
        links.iter().all(|id| live.contains(id)),
        "links survive SIGTERM"
    );

    // ... a new agent takes over the pins and steering ...
    agent.restart().expect("agent restarts");
    enrolled
        .run(TOOL, ["id", "--connect", &target])
        .expect("connect after restart");
    let after = kernel::pod_stats(&pin_name, enrolled_cookie)
        .expect("read map")
        .expect("counted");
    assert_eq!(
        after.captured, 2,
        "the restarted agent steers with the same maps"
    );
    let relinked = kernel::pinned_link_ids(&pin_name).expect("pinned links");
    assert_eq!(relinked.len(), expected);
    let live = kernel::live_link_ids().expect("links");
    assert!(
        links
            .iter()
            .all(|id| !live.contains(id) || relinked.contains(id)),
        "the old links were replaced, not stacked: old {links:?} new {relinked:?} live {live:?}"
    );

    // ... and uninstall removes every link and pin.
    agent.stop().expect("agent stops");
    agent.uninstall().expect("uninstall");
    assert!(
        !Path::new("/sys/fs/bpf").join(&pin_name).exists(),
        "pins removed"
    );
    let live = kernel::live_link_ids().expect("links");
    assert!(
        relinked.iter().all(|id| !live.contains(id)),
        "links detached: {relinked:?} in {live:?}"
    );

    let netns = topo.netns_names().to_vec();
    let cgroup = topo.cgroup_root().to_owned();
    drop(agent);
    drop(topo);
    let listed = String::from_utf8_lossy(
        &std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip")
            .stdout,
    )
    .into_owned();
    for name in netns {
        assert!(
            !listed
                .lines()
                .any(|l| l.split_whitespace().next() == Some(&name)),
            "{name} left"
        );
    }
    assert!(!cgroup.exists(), "{} left", cgroup.display());
}
