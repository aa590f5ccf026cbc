//! Tests of the topology library itself, on the real kernel. They need root
//! and fail loudly (never skip) without it.

use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use mesh_tests::{Background, Pod, Topology, assert_root, naming, parse_id_reply, sweep};

const TOOL: &str = env!("CARGO_BIN_EXE_mesh-testtool");

fn topo(name: &str) -> Topology {
    assert_root();
    Topology::new(name).expect("creating topology")
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn serve(pod: &Pod, listen: &str) -> Background {
    pod.spawn_ready(TOOL, ["serve", "--listen", listen, "--name", pod.name()])
        .expect("starting serve")
}

/// `id` from `client` to `addr`; returns (server name, peer seen by server).
fn id(client: &Pod, addr: SocketAddr) -> (String, SocketAddr) {
    let out = client
        .run(TOOL, ["id", "--connect", &addr.to_string()])
        .expect("id request");
    parse_id_reply(&stdout(&out)).expect("parsing id reply")
}

fn netns_list() -> String {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What a dropped topology must have removed.
struct Leftovers {
    netns: Vec<String>,
    cgroup_root: PathBuf,
    marker: PathBuf,
}

impl Leftovers {
    fn of(t: &Topology) -> Self {
        Self {
            netns: t.netns_names().to_vec(),
            cgroup_root: t.cgroup_root().to_path_buf(),
            marker: naming::marker_path(t.id()),
        }
    }

    fn assert_gone(&self) {
        let list = netns_list();
        for ns in &self.netns {
            assert!(
                !list.contains(ns.as_str()),
                "netns {ns} still exists:\n{list}"
            );
            assert!(
                !Path::new("/var/run/netns").join(ns).exists(),
                "{ns} still in /var/run/netns"
            );
        }
        assert!(
            !self.cgroup_root.exists(),
            "{} still exists",
            self.cgroup_root.display()
        );
        assert!(
            !self.marker.exists(),
            "{} still exists",
            self.marker.display()
        );
    }
}

fn two_nodes(t: &mut Topology) -> (Pod, Pod) {
    let n1 = t.add_node("node1").expect("node1");
    let n2 = t.add_node("node2").expect("node2");
    t.connect_nodes(&n1, &n2).expect("connect");
    let a = t.add_pod(&n1, "a").expect("pod a");
    let b = t.add_pod(&n2, "b").expect("pod b");
    (a, b)
}

#[test]
fn names_addresses_and_layout() {
    let mut t = topo("names_addresses_and_layout");
    assert_eq!(t.id().len(), 5);
    let mount = mesh_tests::cgroup2_mount().expect("cgroup2 mount");
    assert_eq!(t.cgroup_root(), mount.join(format!("mesh-test-{}", t.id())));
    assert_eq!(t.bpf_pin_name(), format!("mesh-test-{}", t.id()));
    let (a, b) = two_nodes(&mut t);
    assert_eq!(a.netns_name(), format!("mt-{}-n1p2", t.id()));
    assert_eq!(b.netns_name(), format!("mt-{}-n2p2", t.id()));
    assert_eq!(a.node().netns_name(), format!("mt-{}-n1", t.id()));
    assert_eq!(a.ipv4().to_string(), "10.1.0.2");
    assert_eq!(b.ipv6().to_string(), "fd00:2::2");
    assert_eq!(a.node().bridge_ipv4().to_string(), "10.1.0.1");
    assert_eq!(b.node().underlay_ipv6().to_string(), "fd00:ff::2");
    assert_eq!(a.cgroup_dir(), t.cgroup_root().join("a"));
    assert_eq!(a.node_name(), "node1");
    assert!(a.netns_path().exists());
    assert!(a.cgroup_dir().is_dir());

    // A pod process is in the pod cgroup and sees the pod's interfaces.
    let cg = stdout(&a.run("cat", ["/proc/self/cgroup"]).expect("cat in pod"));
    assert!(
        cg.contains(&format!("0::/mesh-test-{}/a", t.id())),
        "pod cgroup: {cg}"
    );
    let addrs = stdout(
        &a.run("ip", ["-o", "addr", "show", "dev", "eth0"])
            .expect("ip in pod"),
    );
    assert!(
        addrs.contains("10.1.0.2/24") && addrs.contains("fd00:1::2/64"),
        "{addrs}"
    );
    // A node process is in the node netns but not in any test cgroup.
    let cg = stdout(
        &a.node()
            .run("cat", ["/proc/self/cgroup"])
            .expect("cat in node"),
    );
    assert!(
        !cg.contains("mesh-test-"),
        "node process must not be in a pod cgroup: {cg}"
    );
    let links = stdout(&a.node().run("ip", ["-o", "link"]).expect("ip in node"));
    assert!(
        links.contains("br0") && links.contains("vp2") && links.contains("ul2"),
        "{links}"
    );
    // Bad or duplicate names are refused.
    let n1 = a.node().clone();
    assert!(t.add_pod(&n1, "a").is_err());
    assert!(t.add_pod(&n1, "bad/name").is_err());
}

#[test]
fn cross_node_ipv4_sees_client_ip() {
    let mut t = topo("cross_node_ipv4");
    let (a, b) = two_nodes(&mut t);
    let srv = serve(&b, "0.0.0.0:8080");
    let (name, peer) = id(&a, SocketAddr::new(b.ipv4().into(), 8080));
    assert_eq!(name, "b");
    assert_eq!(peer.ip(), IpAddr::from(a.ipv4()));
    // The server runs in b's cgroup.
    let procs = fs::read_to_string(b.cgroup_dir().join("cgroup.procs")).expect("cgroup.procs");
    assert!(
        procs.lines().any(|l| l.trim() == srv.pid().to_string()),
        "server not in pod cgroup: {procs}"
    );
    // Bulk echo and many concurrent connections across nodes.
    let out = a
        .run(
            TOOL,
            [
                "echo",
                "--connect",
                &format!("{}:8080", b.ipv4()),
                "--bytes",
                "3000000",
            ],
        )
        .expect("echo");
    assert_eq!(stdout(&out).trim(), "3000000");
    let out = a
        .run(
            TOOL,
            [
                "many",
                "--connect",
                &format!("{}:8080", b.ipv4()),
                "--count",
                "50",
            ],
        )
        .expect("many");
    assert_eq!(stdout(&out).trim(), "50");
}

#[test]
fn cross_node_sink_and_udp() {
    let mut t = topo("cross_node_sink_and_udp");
    let (a, b) = two_nodes(&mut t);
    let _sink = b
        .spawn_ready(TOOL, ["sink", "--listen", "0.0.0.0:9000"])
        .expect("sink");
    let _udp = b
        .spawn_ready(TOOL, ["udp-echo", "--listen", "[::]:9001"])
        .expect("udp-echo");
    a.run(
        TOOL,
        [
            "send",
            "--connect",
            &format!("{}:9000", b.ipv4()),
            "--bytes",
            "2000001",
        ],
    )
    .expect("send to sink");
    a.run(
        TOOL,
        ["udp-ping", "--connect", &format!("[{}]:9001", b.ipv6())],
    )
    .expect("udp ping v6");
    a.run(
        TOOL,
        ["udp-ping", "--connect", &format!("{}:9001", b.ipv4())],
    )
    .expect("udp ping v4 to dual-stack socket");
    // Nothing listens on 9002: connect must fail with exit code 1.
    let mut cmd = a.command(TOOL);
    cmd.args(["connect", "--connect", &format!("{}:9002", b.ipv4())]);
    let out = mesh_tests::output_timeout(&mut cmd, Duration::from_secs(20)).expect("connect");
    assert_eq!(
        out.status.code(),
        Some(1),
        "connect to a closed port must fail"
    );
}

#[test]
fn same_node_ipv4() {
    let mut t = topo("same_node_ipv4");
    let n1 = t.add_node("node1").expect("node1");
    let a = t.add_pod(&n1, "a").expect("a");
    let b = t.add_pod(&n1, "b").expect("b");
    assert_eq!(b.ipv4().to_string(), "10.1.0.3");
    let _srv = serve(&b, "0.0.0.0:8080");
    let (name, peer) = id(&a, SocketAddr::new(b.ipv4().into(), 8080));
    assert_eq!(name, "b");
    assert_eq!(peer.ip(), IpAddr::from(a.ipv4()));
}

#[test]
fn ipv6_cross_and_same_node() {
    let mut t = topo("ipv6");
    let (a, b) = two_nodes(&mut t);
    let n2 = b.node().clone();
    let c = t.add_pod(&n2, "c").expect("pod c");
    let _srv = serve(&b, "[::]:8080");
    let (name, peer) = id(&a, SocketAddr::new(b.ipv6().into(), 8080));
    assert_eq!(name, "b");
    assert_eq!(peer.ip(), IpAddr::from(a.ipv6()));
    let (_, peer) = id(&c, SocketAddr::new(b.ipv6().into(), 8080));
    assert_eq!(peer.ip(), IpAddr::from(c.ipv6()));
}

#[test]
fn drop_removes_everything_and_kills_pod_processes() {
    let mut t = topo("drop_cleanup");
    let (a, _b) = two_nodes(&mut t);
    let mut sleeper = a.command("sleep");
    sleeper.arg("1000");
    let mut child = sleeper.spawn().expect("spawning sleep in pod");
    let left = Leftovers::of(&t);
    assert_eq!(left.netns.len(), 4);
    assert!(left.marker.exists());
    drop(t);
    left.assert_gone();
    let status = mesh_tests::wait_timeout(&mut child, Duration::from_secs(5))
        .expect("waiting for sleep")
        .expect("sleep in the pod must have been killed by the teardown");
    assert!(!status.success());
}

#[test]
fn panic_still_cleans_up() {
    let mut seen: Option<Leftovers> = None;
    let r = catch_unwind(AssertUnwindSafe(|| {
        let mut t = topo("panic_cleanup");
        let (_a, b) = two_nodes(&mut t);
        let _srv = serve(&b, "0.0.0.0:8080");
        seen = Some(Leftovers::of(&t));
        panic!("deliberate panic inside a topology scope");
    }));
    assert!(r.is_err(), "the scope must have panicked");
    let left = seen.expect("topology was built before the panic");
    assert_eq!(left.netns.len(), 4);
    left.assert_gone();
}

#[test]
fn sweep_removes_dead_leftovers_and_spares_live_ones() {
    assert_root();
    let live = topo("sweep_live");
    // A leftover of a "crashed" run: netns + cgroup + marker with a dead pid.
    let mut dead = Command::new("true").spawn().expect("spawn true");
    let dead_pid = dead.id();
    dead.wait().expect("wait true");
    let id = format!("x{:04x}", std::process::id() & 0xffff);
    let ns = format!("mt-{id}-n1");
    let st = Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .expect("ip netns add");
    assert!(st.success(), "ip netns add {ns}");
    let cg = mesh_tests::cgroup2_mount()
        .expect("cgroup2")
        .join(format!("mesh-test-{id}"));
    fs::create_dir_all(cg.join("pod")).expect("leaked cgroup");
    fs::create_dir_all(naming::MARKER_DIR).expect("marker dir");
    fs::write(naming::marker_path(&id), format!("{dead_pid} 1\n")).expect("marker");

    // Other test processes may sweep concurrently and remove it first, so
    // check the outcome rather than which sweep did it.
    let report = sweep().expect("sweep");
    assert!(
        !netns_list().contains(&ns),
        "leaked netns {ns} survived the sweep"
    );
    assert!(!cg.exists(), "leaked cgroup survived the sweep");
    assert!(!naming::marker_path(&id).exists());
    // The live topology (owned by this process) is untouched.
    assert!(
        report.skipped_live.iter().any(|i| i == live.id()),
        "{report:?}"
    );
    assert!(live.cgroup_root().exists());
    assert!(naming::marker_path(live.id()).exists());
}
