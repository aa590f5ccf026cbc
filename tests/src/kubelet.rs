//! The kubelet's cgroup layout, for pods that a Kubernetes source must find from their UID.
//!
//! A real node keeps every pod under `kubepods.slice` (systemd cgroup driver) or `kubepods`
//! (cgroupfs driver), one level per QoS class except Guaranteed, one cgroup per pod named
//! after its UID, and one leaf per container (containerd's names). Test pods built this way
//! sit under the test's own cgroup root, never under the machine's real kubepods.
//!
//! - systemd: `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid, '-'
//!   as '_'>.slice/cri-containerd-<64 hex>.scope`; Guaranteed:
//!   `kubepods.slice/kubepods-pod<uid_>.slice/...`
//! - cgroupfs: `kubepods/besteffort/pod<uid>/<64 hex>`; Guaranteed: `kubepods/pod<uid>/...`

use std::fs::File;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

/// The kubelet's `--cgroup-driver`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupDriver {
    Systemd,
    Cgroupfs,
}

/// A pod's QoS class (status.qosClass), which picks its cgroup's parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl Qos {
    /// The class as the API writes it: `BestEffort`.
    pub fn class(self) -> &'static str {
        match self {
            Qos::Guaranteed => "Guaranteed",
            Qos::Burstable => "Burstable",
            Qos::BestEffort => "BestEffort",
        }
    }

    /// The QoS level's name in cgroup paths; None for Guaranteed (no level of its own).
    fn level(self) -> Option<&'static str> {
        match self {
            Qos::Guaranteed => None,
            Qos::Burstable => Some("burstable"),
            Qos::BestEffort => Some("besteffort"),
        }
    }
}

impl CgroupDriver {
    /// The kubepods cgroup under `root`: `kubepods.slice` or `kubepods`.
    pub fn kubepods_dir(self, root: &Path) -> PathBuf {
        root.join(match self {
            CgroupDriver::Systemd => "kubepods.slice",
            CgroupDriver::Cgroupfs => "kubepods",
        })
    }

    /// The cgroup of the pod with `uid` under the kubepods cgroup `kubepods`.
    pub fn pod_dir(self, kubepods: &Path, qos: Qos, uid: &str) -> PathBuf {
        match (self, qos.level()) {
            (CgroupDriver::Systemd, None) => {
                kubepods.join(format!("kubepods-pod{}.slice", uid.replace('-', "_")))
            }
            (CgroupDriver::Systemd, Some(level)) => kubepods
                .join(format!("kubepods-{level}.slice"))
                .join(format!(
                    "kubepods-{level}-pod{}.slice",
                    uid.replace('-', "_")
                )),
            (CgroupDriver::Cgroupfs, None) => kubepods.join(format!("pod{uid}")),
            (CgroupDriver::Cgroupfs, Some(level)) => kubepods.join(level).join(format!("pod{uid}")),
        }
    }

    /// The leaf cgroup of container `id` (64 hex digits) in the pod cgroup `pod_dir`.
    pub fn container_dir(self, pod_dir: &Path, id: &str) -> PathBuf {
        match self {
            CgroupDriver::Systemd => pod_dir.join(format!("cri-containerd-{id}.scope")),
            CgroupDriver::Cgroupfs => pod_dir.join(id),
        }
    }
}

/// Where a kubelet-layout pod lives in the cgroup tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeletPod {
    /// metadata.uid of the pod (a UUID).
    pub uid: String,
    pub driver: CgroupDriver,
    pub qos: Qos,
    /// The pod's cgroup (`...pod<uid>.slice` or `.../pod<uid>`).
    pub pod_dir: PathBuf,
    /// The sandbox ("pause") container: its leaf holds the long-lived sandbox process.
    pub sandbox_id: String,
    /// The app container: its leaf is where the pod's commands run.
    pub container_id: String,
    /// How many times the sandbox was recreated.
    pub generation: u32,
}

fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut buf = [0u8; N];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("reading /dev/urandom")?;
    Ok(buf)
}

/// A random version-4 UUID, as the API server gives every object.
pub fn new_uid() -> Result<String> {
    let mut b = random_bytes::<16>()?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    ))
}

/// A random container id: 64 hex digits, as containerd makes them.
pub fn new_container_id() -> Result<String> {
    Ok(random_bytes::<32>()?
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_follow_the_kubelet() {
        let uid = "5f2b4c1e-0a9d-4c7e-9b1a-3e2d1c0b9a87";
        let k = CgroupDriver::Systemd.kubepods_dir(Path::new("/cg/t"));
        assert_eq!(
            CgroupDriver::Systemd.pod_dir(&k, Qos::BestEffort, uid),
            Path::new(
                "/cg/t/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod5f2b4c1e_0a9d_4c7e_9b1a_3e2d1c0b9a87.slice"
            )
        );
        assert_eq!(
            CgroupDriver::Systemd.pod_dir(&k, Qos::Guaranteed, uid),
            Path::new(
                "/cg/t/kubepods.slice/kubepods-pod5f2b4c1e_0a9d_4c7e_9b1a_3e2d1c0b9a87.slice"
            )
        );
        let k = CgroupDriver::Cgroupfs.kubepods_dir(Path::new("/cg/t"));
        let pod = CgroupDriver::Cgroupfs.pod_dir(&k, Qos::Burstable, uid);
        assert_eq!(
            pod,
            Path::new("/cg/t/kubepods/burstable/pod5f2b4c1e-0a9d-4c7e-9b1a-3e2d1c0b9a87")
        );
        assert_eq!(
            CgroupDriver::Cgroupfs.container_dir(&pod, "ab"),
            pod.join("ab")
        );
        assert_eq!(
            CgroupDriver::Systemd.container_dir(&pod, "ab"),
            pod.join("cri-containerd-ab.scope")
        );
    }

    #[test]
    fn ids_look_like_the_real_ones() {
        let uid = new_uid().expect("uid");
        assert_eq!(uid.len(), 36);
        assert_eq!(&uid[14..15], "4");
        assert_ne!(uid, new_uid().expect("uid"));
        let id = new_container_id().expect("id");
        assert!(id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()));
    }
}
