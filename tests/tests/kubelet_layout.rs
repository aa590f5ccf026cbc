//! Tests of pods in the kubelet's cgroup layout ([`mesh_tests::kubelet`]): from a pod's UID
//! alone, by the kubelet's documented names, a finder must reach the pod's cgroup, a process
//! in it and the pod's network namespace, for both cgroup drivers, also after the sandbox is
//! recreated. They need root and fail loudly without it.

use std::fs;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use mesh_agent::sys::kubepods as agent_finder;
use mesh_tests::{CgroupDriver, Qos, Topology, assert_root};

const TOOL: &str = env!("CARGO_BIN_EXE_mesh-testtool");

/// The pod cgroup of `uid` under `kubepods`, by the kubelet's documented names (not by the
/// library's functions, so that this checks them).
fn find_pod_cgroup(kubepods: &Path, uid: &str) -> Option<PathBuf> {
    let systemd = format!("-pod{}.slice", uid.replace('-', "_"));
    let cgroupfs = format!("pod{uid}");
    let mut dirs = vec![(kubepods.to_owned(), 0)];
    while let Some((dir, depth)) = dirs.pop() {
        for entry in fs::read_dir(&dir).ok()?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !entry.path().is_dir() {
                continue;
            }
            if (name.starts_with("kubepods-") && name.ends_with(&systemd)) || name == cgroupfs {
                return Some(entry.path());
            }
            if depth < 2 {
                dirs.push((entry.path(), depth + 1));
            }
        }
    }
    None
}

/// Pids anywhere below `dir`.
fn pids_below(dir: &Path) -> Vec<u32> {
    let mut pids: Vec<u32> = fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect();
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.path().is_dir() {
            pids.extend(pids_below(&entry.path()));
        }
    }
    pids
}

fn inode(path: &Path) -> u64 {
    fs::metadata(path).expect("stat").ino()
}

/// From the UID: pod cgroup, a pid in it, and its netns inode must be the pod's.
fn assert_found(kubepods: &Path, pod: &mesh_tests::Pod) -> PathBuf {
    let uid = pod.uid().expect("uid");
    let dir = find_pod_cgroup(kubepods, uid).unwrap_or_else(|| panic!("no cgroup for pod {uid}"));
    let want = inode(&pod.netns_path());
    let pids = pids_below(&dir);
    assert!(
        pids.iter()
            .any(|pid| inode(&PathBuf::from(format!("/proc/{pid}/ns/net"))) == want),
        "no process of {} in its netns: {pids:?}",
        dir.display()
    );
    // The agent's own finder (mesh-agent sys/kubepods) agrees.
    let found = agent_finder::find_pod(kubepods, uid).expect("the agent's finder");
    assert_eq!((&found.cgroup, found.netns_inode), (&dir, want));
    dir
}

fn kubelet_layout(driver: CgroupDriver, expected: &[&str]) {
    assert_root();
    let mut topo = Topology::new("kubeapi_layout").expect("topology");
    let node = topo.add_node("node1").expect("node");
    let kubepods = topo.kubepods_root(driver);
    let plain = topo.add_pod(&node, "client").expect("plain pod");
    let besteffort = topo
        .add_kubelet_pod(&node, "be", driver, Qos::BestEffort)
        .expect("pod");
    let guaranteed = topo
        .add_kubelet_pod(&node, "gu", driver, Qos::Guaranteed)
        .expect("pod");
    let burstable = topo
        .add_kubelet_pod(&node, "bu", driver, Qos::Burstable)
        .expect("pod");
    assert!(
        kubepods.starts_with(topo.cgroup_root()),
        "under the test's own root"
    );
    assert_eq!(
        agent_finder::kubepods_dir(topo.cgroup_root()),
        Some(kubepods.clone())
    );
    for (pod, pattern) in [&besteffort, &guaranteed, &burstable]
        .into_iter()
        .zip(expected)
    {
        let dir = assert_found(&kubepods, pod);
        let relative = dir
            .strip_prefix(&kubepods)
            .expect("below kubepods")
            .to_string_lossy()
            .into_owned();
        let uid = pod.uid().expect("uid");
        assert_eq!(
            relative,
            pattern
                .replace("UID_", &uid.replace('-', "_"))
                .replace("UID", uid)
        );
        // Commands join the app container's leaf, in the pod's netns.
        let out = pod
            .run(
                "sh",
                [
                    "-c",
                    "grep ^0:: /proc/self/cgroup; readlink /proc/self/ns/net",
                ],
            )
            .expect("sh in the pod");
        let out = String::from_utf8_lossy(&out.stdout).into_owned();
        let mount = mesh_tests::cgroup2_mount().expect("cgroup2 mount");
        let leaf = pod
            .cgroup_dir()
            .strip_prefix(&mount)
            .expect("below the mount");
        let netns = format!("net:[{}]", inode(&pod.netns_path()));
        assert_eq!(out, format!("0::/{}\n{netns}\n", leaf.display()));
        assert_eq!(pod.cgroup_dir().parent(), Some(dir.as_path()));
    }
    let _server = besteffort
        .spawn_ready(TOOL, ["serve", "--listen", "0.0.0.0:8080", "--name", "be"])
        .expect("server");
    let (name, _) = plain
        .id(&format!("{}:8080", besteffort.ipv4()))
        .expect("reaching the pod");
    assert_eq!(name, "be");

    // A new sandbox: new netns and containers, same UID and pod cgroup.
    let old_netns = besteffort.netns_path();
    let old_inode = inode(&old_netns);
    let old_leaf = besteffort.cgroup_dir().to_owned();
    let restarted = topo.restart_sandbox(&besteffort).expect("restart");
    assert!(!old_netns.exists() && !old_leaf.exists());
    assert_ne!(inode(&restarted.netns_path()), old_inode);
    assert_eq!(restarted.uid(), besteffort.uid());
    assert_found(&kubepods, &restarted);
    let _server = restarted
        .spawn_ready(TOOL, ["serve", "--listen", "0.0.0.0:8080", "--name", "be2"])
        .expect("server");
    let (name, _) = plain
        .id(&format!("{}:8080", restarted.ipv4()))
        .expect("same address");
    assert_eq!(name, "be2");

    // Removal: cgroup and netns gone; the others stay.
    let pod_dir = restarted.kubelet().expect("kubelet").pod_dir.clone();
    topo.remove_pod(&restarted).expect("remove");
    assert!(!pod_dir.exists() && !restarted.netns_path().exists());
    assert!(find_pod_cgroup(&kubepods, restarted.uid().expect("uid")).is_none());
    assert_found(&kubepods, &guaranteed);
    let root = topo.cgroup_root().to_owned();
    drop(topo);
    assert!(
        !root.exists() && !guaranteed.netns_path().exists(),
        "all removed on drop"
    );
}

#[test]
fn kubelet_layout_systemd_driver() {
    kubelet_layout(
        CgroupDriver::Systemd,
        &[
            "kubepods-besteffort.slice/kubepods-besteffort-podUID_.slice",
            "kubepods-podUID_.slice",
            "kubepods-burstable.slice/kubepods-burstable-podUID_.slice",
        ],
    );
}

#[test]
fn kubelet_layout_cgroupfs_driver() {
    kubelet_layout(
        CgroupDriver::Cgroupfs,
        &["besteffort/podUID", "podUID", "burstable/podUID"],
    );
}

/// What a crashed run leaves of a kubelet-layout pod (a deep cgroup tree with a live sandbox,
/// a recreated sandbox's netns, a marker of a dead owner) is all swept.
#[test]
fn sweep_removes_a_crashed_runs_kubepods() {
    assert_root();
    let mut gone = std::process::Command::new("true")
        .spawn()
        .expect("spawn true");
    let dead_pid = gone.id();
    gone.wait().expect("wait true");
    let id = format!("k{:04x}", std::process::id() & 0xffff);
    let ns = format!("mt-{id}-n1p2r1");
    let status = std::process::Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .expect("ip netns add");
    assert!(status.success(), "ip netns add {ns}");
    let root = mesh_tests::cgroup2_mount()
        .expect("cgroup2")
        .join(format!("mesh-test-{id}"));
    let leaf = root.join(
        "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1_2.slice/cri-containerd-ab.scope",
    );
    fs::create_dir_all(&leaf).expect("leaked cgroups");
    let mut sandbox = std::process::Command::new("sleep")
        .arg("infinity")
        .spawn()
        .expect("sleep");
    fs::write(leaf.join("cgroup.procs"), sandbox.id().to_string()).expect("into the leaf");
    fs::create_dir_all(mesh_tests::naming::MARKER_DIR).expect("marker dir");
    let marker = mesh_tests::naming::marker_path(&id);
    fs::write(&marker, format!("{dead_pid} 1\n")).expect("marker");

    // Another test process may sweep first: check the outcome, not who did it.
    mesh_tests::sweep().expect("sweep");
    let status = sandbox.wait().expect("reaping the sandbox");
    assert!(!status.success(), "the leaked sandbox was killed: {status}");
    assert!(!root.exists(), "leaked cgroups survived the sweep");
    assert!(
        !Path::new("/var/run/netns").join(&ns).exists(),
        "leaked {ns}"
    );
    assert!(!marker.exists());
}
