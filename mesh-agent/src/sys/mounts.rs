//! bpffs and cgroup2 discovery from /proc/self/mountinfo (never hard-coded: hosts differ,
//! e.g. /sys/fs/cgroup on unified hosts, /sys/fs/cgroup/unified on hybrid ones).

use std::{fs, io, path::PathBuf};

use nix::mount::{MsFlags, mount};

const BPFFS: &str = "/sys/fs/bpf";

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("reading /proc/self/mountinfo: {0}")]
    MountInfo(io::Error),
    #[error("no cgroup2 file system is mounted (looked in /proc/self/mountinfo)")]
    NoCgroup2,
    #[error("mounting bpffs at {BPFFS}: {0}")]
    MountBpffs(nix::Error),
}

/// Mount points of file systems of type `fstype`, in mountinfo order.
fn mount_points(fstype: &str) -> Result<Vec<PathBuf>, MountError> {
    let info = fs::read_to_string("/proc/self/mountinfo").map_err(MountError::MountInfo)?;
    Ok(info
        .lines()
        .filter_map(|line| {
            // "36 35 98:0 / /mnt rw,noatime shared:1 - ext3 /dev/root rw": the fields after
            // " - " start with the fs type; the mount point is the 5th field.
            let (before, after) = line.split_once(" - ")?;
            let point = before.split(' ').nth(4)?;
            (after.split(' ').next()? == fstype).then(|| PathBuf::from(unescape(point)))
        })
        .collect())
}

/// mountinfo escapes spaces and such as \040 (octal).
fn unescape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(pos) = rest.find('\\') {
        out.push_str(&rest[..pos]);
        let code = rest
            .get(pos + 1..pos + 4)
            .and_then(|oct| u8::from_str_radix(oct, 8).ok());
        match code {
            Some(byte) => {
                out.push(char::from(byte));
                rest = &rest[pos + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[pos + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The cgroup2 mount point: the default cgroup to attach to.
pub fn cgroup2_root() -> Result<PathBuf, MountError> {
    mount_points("cgroup2")?
        .into_iter()
        .next()
        .ok_or(MountError::NoCgroup2)
}

/// Mounts bpffs at /sys/fs/bpf unless it already is (fresh machines may lack it).
pub fn ensure_bpffs() -> Result<(), MountError> {
    if mount_points("bpf")?
        .iter()
        .any(|point| point.as_os_str() == BPFFS)
    {
        return Ok(());
    }
    mount(
        Some("bpf"),
        BPFFS,
        Some("bpf"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(MountError::MountBpffs)
}

#[cfg(test)]
mod tests {
    use super::unescape;

    #[test]
    fn unescapes_octal_sequences() {
        assert_eq!(unescape(r"/run/a\040b"), "/run/a b");
        assert_eq!(unescape(r"/plain"), "/plain");
        assert_eq!(unescape(r"/odd\x"), r"/odd\x");
    }

    #[test]
    fn finds_the_cgroup2_mount() {
        let root = super::cgroup2_root().expect("this machine mounts cgroup2");
        assert!(
            root.join("cgroup.procs").exists(),
            "{} is not a cgroup2 root",
            root.display()
        );
    }
}
