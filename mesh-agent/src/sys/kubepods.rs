//! Finding a Kubernetes pod on this node from its UID: its cgroup under the kubelet's layout,
//! and its network namespace through a process in that cgroup.
//!
//! The API server tells the agent which pods run on its node, never where they are on the
//! host. No CNI plugin is needed to find out: the kubelet names every pod's cgroup after the
//! pod's UID, under either cgroup driver —
//!
//! - systemd: `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid>.slice`, with the
//!   UID's `-` written `_` (guaranteed pods: `kubepods.slice/kubepods-pod<uid>.slice`);
//! - cgroupfs: `kubepods/<qos>/pod<uid>` (guaranteed pods: `kubepods/pod<uid>`).
//!
//! A kubelet given a cgroup root (`cgroupRoot`, `--cgroup-root`) puts that tree one level
//! down and, under systemd, prefixes every name with it: kind's nodes (`cgroupRoot:
//! /kubelet`, systemd) keep pods in `kubelet.slice/kubelet-kubepods.slice/
//! kubelet-kubepods-<qos>.slice/kubelet-kubepods-<qos>-pod<uid>.slice`.
//!
//! cgroup v2 keeps processes in leaves only, so a pod's processes sit in its containers'
//! child cgroups (`cri-containerd-<id>.scope`, `<id>`); every container of a pod shares the
//! pod's network namespace, so any of them leads to it (`/proc/<pid>/ns/net`, which needs the
//! host's PID namespace: the DaemonSet sets `hostPID`; and, the process being another user's,
//! `CAP_SYS_PTRACE` for the kernel's ptrace read check). The path is only a way to open the
//! namespace; what identifies it is the inode, which changes when the pod's sandbox is
//! recreated.

use std::{
    fs, io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

/// How deep below the given root the pod cgroups are looked for: the root may be the cgroup2
/// mount (`kubepods.slice` is then level 1, the QoS level 2, the pod level 3).
const POD_SEARCH_DEPTH: usize = 3;
/// How deep below a pod's cgroup its processes are looked for (containers, and a runtime's
/// own sub-cgroups inside them).
const PROCESS_SEARCH_DEPTH: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum KubepodsError {
    #[error("pod UID {0:?} is not a UID (hex digits and dashes)")]
    InvalidUid(String),
    #[error("no cgroup for pod {uid} under {root} (kubepods-...-pod<uid>.slice or pod<uid>)")]
    NoCgroup { uid: String, root: PathBuf },
    #[error("pod cgroup {0} holds no process whose network namespace can be opened (yet)")]
    NoProcess(PathBuf),
    #[error("pod cgroup {0} runs in the node's network namespace (hostNetwork)")]
    HostNetwork(PathBuf),
    #[error(
        "opening {0}: permission denied (another user's process: the agent needs CAP_SYS_PTRACE)"
    )]
    Denied(PathBuf),
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
}

/// Where a pod is on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSandbox {
    /// The pod's cgroup directory (`...pod<uid>.slice` or `.../pod<uid>`).
    pub cgroup: PathBuf,
    /// `/proc/<pid>/ns/net` of one of its processes: open it while that process lives.
    pub netns: PathBuf,
    /// The namespace's inode: the same pod with another inode has a new sandbox.
    pub netns_inode: u64,
}

/// The kubelet's cgroup of all pods under `cgroup` (the host's cgroup2 tree, or that cgroup
/// itself): `kubepods.slice` (systemd driver) or `kubepods` (cgroupfs driver), or one level
/// down below a kubelet cgroup root (`<root>.slice/<root>-kubepods.slice`, `<root>/kubepods`);
/// `None` if there is none. The agent attaches its programs there, so only pods are steered.
pub fn kubepods_dir(cgroup: &Path) -> Option<PathBuf> {
    if cgroup
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(is_kubepods_name)
    {
        return Some(cgroup.to_owned());
    }
    if let Some(dir) = ["kubepods.slice", "kubepods"]
        .iter()
        .map(|name| cgroup.join(name))
        .find(|dir| dir.is_dir())
    {
        return Some(dir);
    }
    // Below a cgroup root: one look per child, no walk of the host's other cgroups.
    let children = subdirs(cgroup).ok()?;
    children.into_iter().find_map(|(name, path)| {
        if is_kubepods_name(&name) {
            return Some(path);
        }
        let kubepods = match name.strip_suffix(".slice") {
            Some(root) => path.join(format!("{root}-kubepods.slice")),
            None => path.join("kubepods"),
        };
        kubepods.is_dir().then_some(kubepods)
    })
}

/// The name of a kubepods cgroup: `kubepods.slice`, `kubepods`, or `<root>-kubepods.slice`.
fn is_kubepods_name(name: &str) -> bool {
    name == "kubepods.slice" || name == "kubepods" || name.ends_with("-kubepods.slice")
}

/// The pod with `uid` under the kubepods cgroup `root` (or the cgroup directly above
/// `kubepods.slice` or `kubepods`).
pub fn find_pod(root: &Path, uid: &str) -> Result<PodSandbox, KubepodsError> {
    find_pod_in(root, uid, Path::new("/proc"))
}

fn find_pod_in(root: &Path, uid: &str, proc: &Path) -> Result<PodSandbox, KubepodsError> {
    if uid.is_empty() || !uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
        return Err(KubepodsError::InvalidUid(uid.to_owned()));
    }
    let names = PodCgroupNames::new(uid);
    let cgroup =
        find_dir(root, POD_SEARCH_DEPTH, &|name| names.matches(name))?.ok_or_else(|| {
            KubepodsError::NoCgroup {
                uid: uid.to_owned(),
                root: root.to_owned(),
            }
        })?;
    let own = fs::metadata(proc.join("self/ns/net"))
        .map(|m| m.ino())
        .map_err(|source| KubepodsError::Read {
            path: proc.join("self/ns/net"),
            source,
        })?;
    let mut pids = Vec::new();
    collect_pids(&cgroup, PROCESS_SEARCH_DEPTH, &mut pids)?;
    // The oldest process first (lowest PID, as a rule the sandbox's): the path stays the
    // same from one look to the next while it lives.
    pids.sort_unstable();
    let mut host_network = false;
    let mut denied = None;
    for pid in pids {
        let netns = proc.join(pid.to_string()).join("ns/net");
        let meta = match fs::metadata(&netns) {
            Ok(meta) => meta,
            // The kernel's ptrace read check: another user's process, and no CAP_SYS_PTRACE.
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                denied.get_or_insert(netns);
                continue;
            }
            // A process that exited since cgroup.procs was read is simply skipped.
            Err(_) => continue,
        };
        if meta.ino() == own {
            host_network = true;
            continue;
        }
        return Ok(PodSandbox {
            cgroup,
            netns,
            netns_inode: meta.ino(),
        });
    }
    Err(match (host_network, denied) {
        (true, _) => KubepodsError::HostNetwork(cgroup),
        (false, Some(netns)) => KubepodsError::Denied(netns),
        (false, None) => KubepodsError::NoProcess(cgroup),
    })
}

/// The two names the kubelet gives a pod's cgroup.
struct PodCgroupNames {
    /// cgroupfs: `pod<uid>`
    cgroupfs: String,
    /// systemd: `-pod<uid with _>.slice`, after the `[<root>-]kubepods[-<qos>]` prefix.
    systemd_suffix: String,
}

impl PodCgroupNames {
    fn new(uid: &str) -> Self {
        Self {
            cgroupfs: format!("pod{uid}"),
            systemd_suffix: format!("-pod{}.slice", uid.replace('-', "_")),
        }
    }

    fn matches(&self, name: &str) -> bool {
        name == self.cgroupfs || (name.contains("kubepods") && name.ends_with(&self.systemd_suffix))
    }
}

/// Breadth first below `dir`, down to `depth` levels: the first directory whose name
/// `wanted` accepts. Only the kubelet's own levels are entered (`[<root>-]kubepods*`, the
/// QoS classes), so a host with many other cgroups costs no more than one with none.
fn find_dir(
    dir: &Path,
    depth: usize,
    wanted: &dyn Fn(&str) -> bool,
) -> Result<Option<PathBuf>, KubepodsError> {
    let mut level = vec![dir.to_owned()];
    for _ in 0..depth {
        let mut next = Vec::new();
        for dir in &level {
            for (name, path) in subdirs(dir)? {
                if wanted(&name) {
                    return Ok(Some(path));
                }
                if name.contains("kubepods") || name == "besteffort" || name == "burstable" {
                    next.push(path);
                }
            }
        }
        level = next;
    }
    Ok(None)
}

/// The PIDs in `dir`'s cgroup and its descendants, down to `depth` levels below it.
fn collect_pids(dir: &Path, depth: usize, pids: &mut Vec<u32>) -> Result<(), KubepodsError> {
    let procs = dir.join("cgroup.procs");
    match fs::read_to_string(&procs) {
        // PID 0: a process outside this PID namespace (the agent without hostPID).
        Ok(text) => pids.extend(
            text.lines()
                .filter_map(|l| l.trim().parse::<u32>().ok())
                .filter(|pid| *pid != 0),
        ),
        // The cgroup went away meanwhile: nothing in it.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(KubepodsError::Read {
                path: procs,
                source,
            });
        }
    }
    if depth > 0 {
        for (_, child) in subdirs(dir)? {
            collect_pids(&child, depth - 1, pids)?;
        }
    }
    Ok(())
}

/// Child directories of `dir` with their names, sorted by name (stable choices).
fn subdirs(dir: &Path) -> Result<Vec<(String, PathBuf)>, KubepodsError> {
    let read = |source| KubepodsError::Read {
        path: dir.to_owned(),
        source,
    };
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(read(e)),
    };
    let mut dirs = Vec::new();
    for entry in entries {
        let entry = entry.map_err(read)?;
        if entry.file_type().map_err(read)?.is_dir()
            && let Ok(name) = entry.file_name().into_string()
        {
            dirs.push((name, entry.path()));
        }
    }
    dirs.sort();
    Ok(dirs)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f3c9a2e-5b1d-4c7e-9a8b-1234567890ab";

    /// A fake cgroup tree whose pod holds `pids`, and a fake /proc where `ns/net` of each
    /// PID is a file (distinct inodes) and `self/ns/net` is `own`.
    struct Tree {
        dir: tempfile::TempDir,
    }

    impl Tree {
        fn new() -> Tree {
            let dir = tempfile::tempdir().expect("tempdir");
            fs::create_dir_all(dir.path().join("proc/self/ns")).expect("proc");
            fs::write(dir.path().join("proc/self/ns/net"), "own").expect("own netns");
            Tree { dir }
        }
        fn cgroups(&self) -> PathBuf {
            self.dir.path().join("cg")
        }
        fn proc(&self) -> PathBuf {
            self.dir.path().join("proc")
        }
        fn pod(&self, pod_dir: &str, container: &str, procs: &str) -> PathBuf {
            let container_dir = self.cgroups().join(pod_dir).join(container);
            fs::create_dir_all(&container_dir).expect("cgroup dirs");
            fs::write(self.cgroups().join(pod_dir).join("cgroup.procs"), "").expect("procs");
            fs::write(container_dir.join("cgroup.procs"), procs).expect("procs");
            self.cgroups().join(pod_dir)
        }
        fn process(&self, pid: u32) -> PathBuf {
            let ns = self.proc().join(pid.to_string()).join("ns");
            fs::create_dir_all(&ns).expect("ns dir");
            fs::write(ns.join("net"), pid.to_string()).expect("netns file");
            ns.join("net")
        }
    }

    #[test]
    fn finds_pods_under_both_drivers_and_every_qos_class() {
        let systemd_uid = UID.replace('-', "_");
        let layouts = [
            format!(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{systemd_uid}.slice"
            ),
            format!(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{systemd_uid}.slice"
            ),
            format!("kubepods.slice/kubepods-pod{systemd_uid}.slice"),
            format!("kubepods/besteffort/pod{UID}"),
            format!("kubepods/burstable/pod{UID}"),
            format!("kubepods/pod{UID}"),
        ];
        for layout in layouts {
            let tree = Tree::new();
            let pod = tree.pod(&layout, "cri-containerd-abc.scope", "0\n41\n");
            let netns = tree.process(41);
            // From the cgroup2 mount and from the kubepods directory alike.
            let kubepods = tree
                .cgroups()
                .join(layout.split('/').next().unwrap_or_default());
            for root in [tree.cgroups(), kubepods] {
                let found = find_pod_in(&root, UID, &tree.proc()).expect(&layout);
                assert_eq!(found.cgroup, pod, "{layout}");
                assert_eq!(found.netns, netns, "{layout}");
                let inode = fs::metadata(&netns).expect("netns").ino();
                assert_eq!(found.netns_inode, inode);
            }
        }
    }

    #[test]
    fn the_kubepods_cgroup_is_found_under_either_driver() {
        for name in ["kubepods.slice", "kubepods"] {
            let tree = Tree::new();
            let dir = tree.cgroups().join(name);
            fs::create_dir_all(dir.join("besteffort")).expect("dirs");
            assert_eq!(kubepods_dir(&tree.cgroups()), Some(dir.clone()));
            assert_eq!(kubepods_dir(&dir), Some(dir.clone()));
        }
        let tree = Tree::new();
        fs::create_dir_all(tree.cgroups().join("system.slice/containerd.service")).expect("dirs");
        fs::create_dir_all(tree.cgroups().join("init.scope")).expect("dirs");
        assert_eq!(kubepods_dir(&tree.cgroups()), None);
    }

    #[test]
    fn pods_are_found_below_a_kubelet_cgroup_root() {
        // kind's nodes: `cgroupRoot: /kubelet` with the systemd driver; and the same root with
        // cgroupfs.
        let systemd_uid = UID.replace('-', "_");
        let layouts = [
            (
                "kubelet.slice/kubelet-kubepods.slice",
                format!(
                    "kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{systemd_uid}.slice"
                ),
            ),
            (
                "kubelet.slice/kubelet-kubepods.slice",
                format!("kubelet-kubepods-pod{systemd_uid}.slice"),
            ),
            ("kubelet/kubepods", format!("burstable/pod{UID}")),
        ];
        for (kubepods, pod_dir) in layouts {
            let tree = Tree::new();
            fs::create_dir_all(tree.cgroups().join("system.slice/containerd.service"))
                .expect("dirs");
            let pod = tree.pod(&format!("{kubepods}/{pod_dir}"), "c1", "12\n");
            let netns = tree.process(12);
            let dir = tree.cgroups().join(kubepods);
            assert_eq!(
                kubepods_dir(&tree.cgroups()),
                Some(dir.clone()),
                "{kubepods}"
            );
            assert_eq!(kubepods_dir(&dir), Some(dir.clone()), "{kubepods}");
            let above = dir.parent().map(Path::to_path_buf).unwrap_or_default();
            assert_eq!(kubepods_dir(&above), Some(dir.clone()), "{kubepods}");
            let found = find_pod_in(&dir, UID, &tree.proc()).expect(&pod_dir);
            assert_eq!(found.cgroup, pod);
            assert_eq!(found.netns, netns);
        }
    }

    #[test]
    fn another_pod_or_a_missing_one_is_not_found() {
        let tree = Tree::new();
        tree.pod(
            "kubepods/besteffort/pod11111111-2222-3333-4444-555555555555",
            "c1",
            "7",
        );
        tree.process(7);
        // A UID that is a suffix of the other's does not match either.
        for uid in [UID, "2222-3333-4444-555555555555"] {
            let err = find_pod_in(&tree.cgroups(), uid, &tree.proc()).expect_err(uid);
            assert!(matches!(err, KubepodsError::NoCgroup { .. }), "{err}");
        }
    }

    #[test]
    fn the_oldest_live_process_is_chosen_and_exited_ones_skipped() {
        let tree = Tree::new();
        tree.pod(&format!("kubepods/pod{UID}"), "c1", "90\n30\n");
        // 30 exited (no /proc entry); 90 lives.
        let live = tree.process(90);
        let found = find_pod_in(&tree.cgroups(), UID, &tree.proc()).expect("found");
        assert_eq!(found.netns, live);
        let older = tree.process(30);
        let found = find_pod_in(&tree.cgroups(), UID, &tree.proc()).expect("found");
        assert_eq!(found.netns, older);
    }

    #[test]
    fn an_empty_pod_a_host_network_pod_and_a_bad_uid_are_refused() {
        let tree = Tree::new();
        let pod = tree.pod(&format!("kubepods/pod{UID}"), "c1", "0\n");
        let err = find_pod_in(&tree.cgroups(), UID, &tree.proc()).expect_err("no process");
        assert!(
            matches!(&err, KubepodsError::NoProcess(p) if *p == pod),
            "{err}"
        );

        // A process in the node's own namespace: hostNetwork.
        fs::write(pod.join("c1/cgroup.procs"), "5\n").expect("procs");
        let own = tree.proc().join("5/ns");
        fs::create_dir_all(&own).expect("ns dir");
        fs::hard_link(tree.proc().join("self/ns/net"), own.join("net")).expect("link");
        let err = find_pod_in(&tree.cgroups(), UID, &tree.proc()).expect_err("host network");
        assert!(matches!(err, KubepodsError::HostNetwork(_)), "{err}");

        for uid in ["", "../../etc", "pod*"] {
            let err = find_pod_in(&tree.cgroups(), uid, &tree.proc()).expect_err(uid);
            assert!(matches!(err, KubepodsError::InvalidUid(_)), "{err}");
        }
    }
}
