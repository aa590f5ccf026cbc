//! The test topology: nodes (netns + bridge), pods (netns + veth + cgroup),
//! and underlay links between nodes. Everything is torn down on drop.
//!
//! Addressing (n = node index from 1, k = pod index on its node from 2):
//! - node bridge `br0`: 10.n.0.1/24, fd00:n::1/64 (pod gateway)
//! - pod `eth0`: 10.n.0.k/24, fd00:n::k/64, default routes via the bridge;
//!   its node-side veth is `vp<k>`, a port of `br0`
//! - underlay to node m: device `ul<m>` with 192.168.100.n/24, fd00:ff::n/64,
//!   plus routes to node m's pod subnets via its underlay address.
//!
//! Interfaces are created directly inside the namespaces, so the host's root
//! netns is never touched, and sysctls are only set inside node namespaces.

use std::ffi::OsStr;
use std::fs;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};

use crate::cgroup;
use crate::exec::{self, Background, Target};
use crate::kubelet::KubeletPod;
use crate::naming::{self, BPFFS_DIR, DIR_PREFIX, NETNS_PREFIX, NETNS_RUN_DIR};
use crate::sys;

/// Name of the pod gateway bridge inside every node netns.
pub const BRIDGE: &str = "br0";
/// Longest allowed pod/node name (it becomes a cgroup dir name).
const MAX_NAME: usize = 64;
/// How long teardown waits for killed processes and busy cgroups.
pub(crate) const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// A node: a network namespace with a pod bridge, able to route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    name: String,
    index: u8,
    netns: String,
}

impl Node {
    /// The name given to [`Topology::add_node`].
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Node index n (from 1), used in all its addresses.
    pub fn index(&self) -> u8 {
        self.index
    }
    /// Network namespace name, `mt-<id>-n<n>`.
    pub fn netns_name(&self) -> &str {
        &self.netns
    }
    /// Network namespace path, `/var/run/netns/<name>`.
    pub fn netns_path(&self) -> PathBuf {
        Path::new(NETNS_RUN_DIR).join(&self.netns)
    }
    /// Name of the pod bridge device in this node.
    pub fn bridge_name(&self) -> &'static str {
        BRIDGE
    }
    /// Bridge (pod gateway) IPv4: 10.n.0.1.
    pub fn bridge_ipv4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.index, 0, 1)
    }
    /// Bridge (pod gateway) IPv6: fd00:n::1.
    pub fn bridge_ipv6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, u16::from(self.index), 0, 0, 0, 0, 0, 1)
    }
    /// Pod subnet IPv4 network address (prefix length 24).
    pub fn pod_subnet_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.index, 0, 0)
    }
    /// Pod subnet IPv6 network address (prefix length 64).
    pub fn pod_subnet_v6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, u16::from(self.index), 0, 0, 0, 0, 0, 0)
    }
    /// Underlay IPv4 (set on links made by [`Topology::connect_nodes`]): 192.168.100.n.
    pub fn underlay_ipv4(&self) -> Ipv4Addr {
        Ipv4Addr::new(192, 168, 100, self.index)
    }
    /// Underlay IPv6: fd00:ff::n.
    pub fn underlay_ipv6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0xff, 0, 0, 0, 0, 0, u16::from(self.index))
    }
    /// Underlay device in this node that leads to `peer`: `ul<peer index>`.
    pub fn underlay_dev_to(&self, peer: &Node) -> String {
        format!("ul{}", peer.index)
    }

    fn target(&self) -> Target {
        Target {
            label: format!("node {} ({})", self.name, self.netns),
            netns_path: self.netns_path(),
            cgroup_dir: None,
        }
    }

    /// A Command that runs in this node's netns only (no pod cgroup): for
    /// the agent. Setup errors surface when it is spawned.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        self.target().command(program)
    }
    /// Like [`Self::command`], with setup errors returned at once.
    pub fn try_command(&self, program: impl AsRef<OsStr>) -> Result<Command> {
        self.target().try_command(program)
    }
    /// Runs `program args` in the node netns; non-zero exit is an error.
    pub fn run<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.target().run(program, args)
    }

    /// `GET path` (HTTP/1.0) from `address` inside the node's netns, where the agent's admin
    /// API and a test's Prometheus listen on loopback: the body of a 200 response, else an
    /// error with the status line and the body.
    pub fn http_get(&self, address: &str, path: &str) -> Result<String> {
        let mut command = self.try_command(crate::testtool_path()?)?;
        command.args(["http-get", "--connect", address, "--path", path]);
        let output = exec::output_timeout(&mut command, Duration::from_secs(15))?;
        ensure!(
            output.status.success(),
            "GET http://{address}{path} in node {}: {}",
            self.name,
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

/// A pod: a network namespace behind a node bridge, plus its own cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub(crate) name: String,
    pub(crate) index: u8,
    pub(crate) netns: String,
    pub(crate) node: Node,
    pub(crate) cgroup_dir: PathBuf,
    /// Set for pods in the kubelet's cgroup layout ([`Topology::add_kubelet_pod`]).
    pub(crate) kubelet: Option<KubeletPod>,
}

impl Pod {
    /// The name given to [`Topology::add_pod`] (also its cgroup dir name).
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Index k of the pod on its node (from 2; .1 is the bridge).
    pub fn index(&self) -> u8 {
        self.index
    }
    /// Network namespace name, `mt-<id>-n<n>p<k>`.
    pub fn netns_name(&self) -> &str {
        &self.netns
    }
    /// Network namespace path, `/var/run/netns/<name>`.
    pub fn netns_path(&self) -> PathBuf {
        Path::new(NETNS_RUN_DIR).join(&self.netns)
    }
    /// Pod IPv4: 10.n.0.k.
    pub fn ipv4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.node.index, 0, self.index)
    }
    /// Pod IPv6: fd00:n::k.
    pub fn ipv6(&self) -> Ipv6Addr {
        Ipv6Addr::new(
            0xfd00,
            u16::from(self.node.index),
            0,
            0,
            0,
            0,
            0,
            u16::from(self.index),
        )
    }
    /// The cgroup its commands run in: `<test root>/<pod name>`, or for a kubelet-layout
    /// pod its app container's leaf.
    pub fn cgroup_dir(&self) -> &Path {
        &self.cgroup_dir
    }
    /// Where a kubelet-layout pod sits in the kubepods tree; None for other pods.
    pub fn kubelet(&self) -> Option<&KubeletPod> {
        self.kubelet.as_ref()
    }
    /// metadata.uid of a kubelet-layout pod.
    pub fn uid(&self) -> Option<&str> {
        self.kubelet.as_ref().map(|k| k.uid.as_str())
    }
    /// Name of the node the pod runs on.
    pub fn node_name(&self) -> &str {
        &self.node.name
    }
    /// The node the pod runs on.
    pub fn node(&self) -> &Node {
        &self.node
    }
    /// Node-side veth of this pod (a `br0` port in the node netns): `vp<k>`.
    pub fn host_veth(&self) -> String {
        format!("vp{}", self.index)
    }

    /// Joins the pod's netns to its node: the `vp<k>`/`eth0` veth pair into the bridge, both
    /// addresses and default routes via the bridge.
    pub(crate) fn wire(&self) -> Result<()> {
        let (ns, node) = (&self.netns, &self.node);
        let host = self.host_veth();
        let nns = node.netns_name();
        let v4 = format!("{}/24", self.ipv4());
        let v6 = format!("{}/64", self.ipv6());
        let gw4 = node.bridge_ipv4().to_string();
        let gw6 = node.bridge_ipv6().to_string();
        // The MAC follows from the IPv4 address as with the bridge CNI plugin (0a:58 and the
        // address), so a pod whose sandbox is recreated keeps it and its peers' neighbour
        // entries stay right.
        let [a, b, c, d] = self.ipv4().octets();
        let mac = format!("0a:58:{a:02x}:{b:02x}:{c:02x}:{d:02x}");
        sys::ip(&[
            "-n", nns, "link", "add", &host, "type", "veth", "peer", "name", "eth0", "netns", ns,
            "address", &mac,
        ])?;
        sys::ip(&["-n", nns, "link", "set", &host, "master", BRIDGE, "up"])?;
        sys::ip(&["-n", ns, "addr", "add", &v4, "dev", "eth0"])?;
        sys::ip(&["-n", ns, "addr", "add", &v6, "dev", "eth0", "nodad"])?;
        sys::ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        sys::ip(&["-n", ns, "route", "add", "default", "via", &gw4])?;
        sys::ip(&["-n", ns, "-6", "route", "add", "default", "via", &gw6])
    }

    pub(crate) fn target(&self) -> Target {
        Target {
            label: format!("pod {} ({})", self.name, self.netns),
            netns_path: self.netns_path(),
            cgroup_dir: Some(self.cgroup_dir.clone()),
        }
    }

    /// A Command that first joins the pod cgroup, then the pod netns.
    /// Setup errors (missing netns/cgroup) surface when it is spawned.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        self.target().command(program)
    }
    /// Like [`Self::command`], with setup errors returned at once.
    pub fn try_command(&self, program: impl AsRef<OsStr>) -> Result<Command> {
        self.target().try_command(program)
    }
    /// Runs `program args` in the pod (bounded by [`exec::RUN_TIMEOUT`]);
    /// non-zero exit is an error with stdout/stderr.
    pub fn run<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.target().run(program, args)
    }
    /// `mesh-testtool id` from the pod to `target`: the name of the server that answered and
    /// the peer address it saw.
    pub fn id(&self, target: &str) -> Result<(String, std::net::SocketAddr)> {
        let out = self.run(crate::testtool_path()?, ["id", "--connect", target])?;
        crate::parse_id_reply(&String::from_utf8_lossy(&out.stdout))
    }
    /// Starts `program args` in the pod and waits for its `ready` line.
    pub fn spawn_ready<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Result<Background>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.try_command(program)?;
        cmd.args(args);
        exec::spawn_ready(&mut cmd, &self.name)
    }
}

/// One end-to-end test's world. Dropping it removes everything it created,
/// also while unwinding from a panic.
#[derive(Debug)]
pub struct Topology {
    id: String,
    test_name: String,
    pub(crate) cgroup_root: PathBuf,
    nodes: Vec<Node>,
    pub(crate) pods: Vec<Pod>,
    /// Namespaces created so far, in creation order (removed in reverse).
    pub(crate) netns: Vec<String>,
    /// (node index, last pod index) to hand out pod indexes.
    pod_slots: Vec<(u8, u8)>,
    /// The sandbox processes of kubelet-layout pods, by pod name (killed with the cgroups
    /// at teardown, reaped when dropped).
    pub(crate) sandboxes: Vec<(String, Background)>,
}

impl Topology {
    /// Claims a unique id, writes the owner marker and creates the test's
    /// cgroup root `<cgroup2 mount>/mesh-test-<id>`.
    pub fn new(test_name: &str) -> Result<Topology> {
        ensure!(sys::is_root(), "mesh-tests topologies need root (euid 0)");
        let mount = sys::cgroup2_mount()?;
        let mut id = None;
        for _ in 0..100 {
            let cand = naming::candidate_id();
            if naming::claim_id(&cand, &mount)? {
                id = Some(cand);
                break;
            }
        }
        let id = id.context("could not find a free topology id after 100 tries")?;
        let topo = Topology {
            cgroup_root: mount.join(format!("{DIR_PREFIX}{id}")),
            id,
            test_name: test_name.to_owned(),
            nodes: Vec::new(),
            pods: Vec::new(),
            netns: Vec::new(),
            pod_slots: Vec::new(),
            sandboxes: Vec::new(),
        };
        // From here on, Drop cleans up whatever exists (including the marker).
        cgroup::create(&topo.cgroup_root)
            .with_context(|| format!("creating test cgroup root for {test_name}"))?;
        Ok(topo)
    }

    /// The unique id (5 hex chars) in every name this topology creates.
    pub fn id(&self) -> &str {
        &self.id
    }
    /// The test name given to [`Topology::new`] (for messages).
    pub fn test_name(&self) -> &str {
        &self.test_name
    }
    /// The per-test cgroup root: attach the agent's cgroup programs here.
    pub fn cgroup_root(&self) -> &Path {
        &self.cgroup_root
    }
    /// Name of the agent's bpffs pin directory: `mesh-test-<id>`.
    pub fn bpf_pin_name(&self) -> String {
        format!("{DIR_PREFIX}{}", self.id)
    }
    /// Full pin directory, `/sys/fs/bpf/mesh-test-<id>` (removed on drop).
    pub fn bpf_pin_dir(&self) -> PathBuf {
        Path::new(BPFFS_DIR).join(self.bpf_pin_name())
    }
    /// Nodes created so far.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }
    /// Pods created so far.
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }
    /// Names of all namespaces created so far.
    pub fn netns_names(&self) -> &[String] {
        &self.netns
    }

    pub(crate) fn new_netns(&mut self, role: &str) -> Result<String> {
        let name = format!("{NETNS_PREFIX}{}-{role}", self.id);
        sys::ip(&["netns", "add", &name])?;
        self.netns.push(name.clone());
        sys::ip(&["-n", &name, "link", "set", "lo", "up"])?;
        // No duplicate address detection in this netns (before any device
        // exists, so link-local addresses are usable at once too): otherwise
        // the first IPv6 packets after setup are dropped for about a second.
        sysctl_in(
            &name,
            &[
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
            ],
        )?;
        Ok(name)
    }

    pub(crate) fn check_name(&self, name: &str) -> Result<()> {
        ensure!(
            !name.is_empty()
                && name.len() <= MAX_NAME
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "invalid name {name:?}: use 1-{MAX_NAME} of [A-Za-z0-9_-]"
        );
        ensure!(
            !self.nodes.iter().any(|n| n.name == name) && !self.pods.iter().any(|p| p.name == name),
            "name {name:?} is already used in this topology"
        );
        Ok(())
    }

    /// Adds a node: netns `mt-<id>-n<n>` with lo up, bridge `br0`
    /// (10.n.0.1/24, fd00:n::1/64) and forwarding enabled inside it.
    pub fn add_node(&mut self, name: &str) -> Result<Node> {
        self.check_name(name)?;
        ensure!(self.nodes.len() < 254, "at most 254 nodes");
        let index = u8::try_from(self.nodes.len() + 1).context("node index")?;
        let ns = self.new_netns(&format!("n{index}"))?;
        let node = Node {
            name: name.to_owned(),
            index,
            netns: ns.clone(),
        };
        let v4 = format!("{}/24", node.bridge_ipv4());
        let v6 = format!("{}/64", node.bridge_ipv6());
        (|| -> Result<()> {
            sys::ip(&["-n", &ns, "link", "add", BRIDGE, "type", "bridge"])?;
            sys::ip(&["-n", &ns, "addr", "add", &v4, "dev", BRIDGE])?;
            sys::ip(&["-n", &ns, "addr", "add", &v6, "dev", BRIDGE, "nodad"])?;
            sys::ip(&["-n", &ns, "link", "set", BRIDGE, "up"])?;
            sysctl_in(
                &ns,
                &["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"],
            )
        })()
        .with_context(|| format!("setting up node {name} in netns {ns}"))?;
        self.nodes.push(node.clone());
        self.pod_slots.push((index, 1));
        Ok(node)
    }

    /// Adds a pod on `node`: netns `mt-<id>-n<n>p<k>`, `eth0` veth into the
    /// node bridge with 10.n.0.k/24 and fd00:n::k/64, default routes via the
    /// bridge, and cgroup `<root>/<name>`.
    pub fn add_pod(&mut self, node: &Node, name: &str) -> Result<Pod> {
        self.check_name(name)?;
        let index = self.next_pod_index(node)?;
        let ns = self.new_netns(&format!("n{}p{index}", node.index))?;
        let cgroup_dir = self.cgroup_root.join(name);
        let pod = Pod {
            name: name.to_owned(),
            index,
            netns: ns.clone(),
            node: node.clone(),
            cgroup_dir: cgroup_dir.clone(),
            kubelet: None,
        };
        pod.wire()
            .and_then(|()| cgroup::create(&cgroup_dir))
            .with_context(|| {
                format!("setting up pod {name} on node {} in netns {ns}", node.name)
            })?;
        self.pods.push(pod.clone());
        Ok(pod)
    }

    /// The next pod index k on `node`.
    pub(crate) fn next_pod_index(&mut self, node: &Node) -> Result<u8> {
        let slot = self
            .pod_slots
            .iter_mut()
            .find(|(n, _)| *n == node.index)
            .with_context(|| format!("node {} is not part of this topology", node.name))?;
        ensure!(slot.1 < 254, "at most 253 pods per node");
        slot.1 += 1;
        Ok(slot.1)
    }

    /// Joins two nodes with an underlay veth pair (`ul<b>` in a, `ul<a>` in b)
    /// and routes each node's pod subnets (v4 and v6) via the other's
    /// underlay address.
    pub fn connect_nodes(&mut self, a: &Node, b: &Node) -> Result<()> {
        ensure!(
            a.index != b.index,
            "cannot connect node {} to itself",
            a.name
        );
        for n in [a, b] {
            ensure!(
                self.nodes.iter().any(|m| m == n),
                "node {} is not part of this topology",
                n.name
            );
        }
        let (da, db) = (a.underlay_dev_to(b), b.underlay_dev_to(a));
        (|| -> Result<()> {
            sys::ip(&[
                "-n", &a.netns, "link", "add", &da, "type", "veth", "peer", "name", &db, "netns",
                &b.netns,
            ])?;
            for (me, dev, peer) in [(a, &da, b), (b, &db, a)] {
                let ns = me.netns_name();
                sys::ip(&[
                    "-n",
                    ns,
                    "addr",
                    "add",
                    &format!("{}/24", me.underlay_ipv4()),
                    "dev",
                    dev,
                ])?;
                sys::ip(&[
                    "-n",
                    ns,
                    "addr",
                    "add",
                    &format!("{}/64", me.underlay_ipv6()),
                    "dev",
                    dev,
                    "nodad",
                ])?;
                sys::ip(&["-n", ns, "link", "set", dev, "up"])?;
                sys::ip(&[
                    "-n",
                    ns,
                    "route",
                    "add",
                    &format!("{}/24", peer.pod_subnet_v4()),
                    "via",
                    &peer.underlay_ipv4().to_string(),
                    "dev",
                    dev,
                ])?;
                sys::ip(&[
                    "-n",
                    ns,
                    "-6",
                    "route",
                    "add",
                    &format!("{}/64", peer.pod_subnet_v6()),
                    "via",
                    &peer.underlay_ipv6().to_string(),
                    "dev",
                    dev,
                ])?;
            }
            Ok(())
        })()
        .with_context(|| format!("connecting nodes {} and {}", a.name, b.name))
    }

    /// Removes everything; returns the first error but tries every step.
    fn teardown(&mut self) -> Result<()> {
        let mut first: Option<anyhow::Error> = None;
        let mut note = |r: Result<()>| {
            if let Err(e) = r {
                eprintln!(
                    "mesh-tests: teardown of {} ({}): {e:#}",
                    self.id, self.test_name
                );
                first.get_or_insert(e);
            }
        };
        // 1. Kill every process in the test's cgroups, so namespaces and
        //    cgroups are free.
        if self.cgroup_root.exists() {
            note(cgroup::kill_all(&self.cgroup_root, TEARDOWN_TIMEOUT));
        }
        // 2. Namespaces: pods and nodes, newest first.
        for ns in self.netns.drain(..).rev() {
            if Path::new(NETNS_RUN_DIR).join(&ns).exists() {
                note(sys::ip(&["netns", "del", &ns]));
            }
        }
        // 3. cgroups, children first, retrying while processes exit.
        note(cgroup::remove_tree(&self.cgroup_root, TEARDOWN_TIMEOUT));
        // 4. bpffs pins of the agents (`mesh-test-<id>` and any `mesh-test-<id>-<suffix>` of
        //    a second agent), their runtime state (/run/mesh-agent/<name>), and the test's
        //    scratch files (/tmp/mesh-test-<id>). Removing the pins detaches the links.
        for dir in owned_dirs(&self.bpf_pin_name()) {
            note(remove_dir_all_if_present(&dir));
        }
        // 5. The marker last: until now a sweep must not treat us as dead.
        note(remove_file_if_present(&naming::marker_path(&self.id)));
        match first {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Errors are already printed by teardown; a panic in drop would abort.
        let _ = self.teardown();
    }
}

/// Sets sysctls inside netns `ns` only: under `ip netns exec`, sysctl's
/// /proc/sys/net is the namespace's own. The host's values are never touched.
fn sysctl_in(ns: &str, settings: &[&str]) -> Result<()> {
    let mut args = vec!["netns", "exec", ns, "sysctl", "-q", "-w"];
    args.extend_from_slice(settings);
    sys::ip(&args)
}

pub(crate) fn remove_dir_all_if_present(p: &Path) -> Result<()> {
    match fs::remove_dir_all(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", p.display())),
    }
}

pub(crate) fn remove_file_if_present(p: &Path) -> Result<()> {
    match fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", p.display())),
    }
}

/// Directories named `<pin name>` or `<pin name>-*` under bpffs and /run/mesh-agent, plus
/// the scratch directory `/tmp/<pin name>`: what a test run with this pin name may leave.
pub(crate) fn owned_dirs(pin_name: &str) -> Vec<PathBuf> {
    let mut dirs = vec![std::env::temp_dir().join(pin_name)];
    for parent in ["/sys/fs/bpf", "/run/mesh-agent"] {
        let Ok(entries) = fs::read_dir(parent) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == pin_name || name.starts_with(&format!("{pin_name}-")) {
                dirs.push(entry.path());
            }
        }
    }
    dirs
}
