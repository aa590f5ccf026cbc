//! The agent's part in the eBPF fast path: where its own sockets live (sock_ops must run for
//! the agent's accepted and upstream sockets inside pods, and those belong to the cgroup of
//! the process that created them, the agent's, which need not be below the pods' cgroup),
//! and how much of what each app socket redirected the agent has read (the app may redirect
//! a budget beyond it; past that its data goes through TCP).

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use aya::maps::{HashMap, MapData};
use mesh_common::{FastKey, maps};

use super::{EbpfError, addr};

/// What the agent has read of each app socket's redirected data, by the app socket's key.
/// Its lock is held for one map write, once per [`REPORT_EVERY`] bytes of a connection.
pub struct FastPathCredits {
    map: parking_lot::Mutex<HashMap<MapData, FastKey, u64>>,
}

impl FastPathCredits {
    pub(super) fn new(map: HashMap<MapData, FastKey, u64>) -> Self {
        Self {
            map: parking_lot::Mutex::new(map),
        }
    }

    /// The key of the app socket at the other end of the agent socket whose addresses are
    /// `local` and `peer`, in the pod's network namespace.
    pub fn app_key(netns_cookie: u64, local: SocketAddr, peer: SocketAddr) -> FastKey {
        let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
        FastKey {
            netns_cookie,
            local: addr::encode(canonical(peer)),
            remote: addr::encode(canonical(local)),
        }
    }

    /// Records that the agent has read `total` bytes from the app socket `key`.
    pub fn consumed(&self, key: &FastKey, total: u64) -> Result<(), EbpfError> {
        self.map
            .lock()
            .insert(key, total, 0)
            .map_err(|source| EbpfError::Map {
                name: maps::FAST_CONSUMED,
                source,
            })
    }

    /// Forgets the app socket `key` (its connection ended).
    pub fn forget(&self, key: &FastKey) {
        let _ = self.map.lock().remove(key);
    }
}

/// How many bytes read from an app socket are reported at once: a small part of the
/// redirect budget (4 MiB), so an app that the agent keeps up with never runs out of it.
pub const REPORT_EVERY: u64 = 256 << 10;

/// File name, in the link directory, of the sock_ops link on the agent's own cgroup.
pub const OWN_CGROUP_LINK: &str = "mesh_sock_ops-agent";

/// The agent's own cgroup directory, when sock_ops attached to `pods` does not already run
/// for it (the agent is not in or below `pods`). `None` as well when it cannot be told (no
/// cgroup2 line in /proc/self/cgroup): the fast path then only serves pairs sock_ops sees.
pub fn own_cgroup(pods: &Path) -> Option<PathBuf> {
    let text = fs::read_to_string("/proc/self/cgroup").ok()?;
    let relative = parse_cgroup2(&text)?;
    let mounts = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let root = cgroup2_mount(&mounts)?;
    let own = Path::new(root).join(relative.trim_start_matches('/'));
    if own.starts_with(pods) || !own.is_dir() {
        return None;
    }
    Some(own)
}

/// Where cgroup2 is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on a hybrid
/// host), from the text of /proc/self/mountinfo: the mount point is the fifth field, the file
/// system type the first after the ` - ` separator.
fn cgroup2_mount(mountinfo: &str) -> Option<&str> {
    mountinfo.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        fs.starts_with("cgroup2 ")
            .then(|| mount.split(' ').nth(4))
            .flatten()
    })
}

/// The cgroup2 path (`0::/path`) in the text of /proc/<pid>/cgroup.
fn parse_cgroup2(text: &str) -> Option<&str> {
    text.lines().find_map(|line| line.strip_prefix("0::"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup2_line() {
        assert_eq!(
            parse_cgroup2("1:name=systemd:/x\n0::/system.slice/mesh.service\n"),
            Some("/system.slice/mesh.service")
        );
        assert_eq!(parse_cgroup2("1:cpu:/x\n"), None);
    }

    #[test]
    fn cgroup2_mount_point() {
        let mountinfo = "25 1 0:23 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n\
                         30 25 0:26 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_mount(mountinfo), Some("/sys/fs/cgroup/unified"));
        assert_eq!(
            cgroup2_mount("25 1 0:23 / /sys rw - sysfs sysfs rw\n"),
            None
        );
    }

    #[test]
    fn not_needed_below_the_pods_cgroup() {
        // The test process's own cgroup is below the cgroup2 root.
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        if let Some(root) = cgroup2_mount(&mounts) {
            assert_eq!(own_cgroup(Path::new(root)), None);
        }
    }
}
