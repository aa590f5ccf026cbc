//! Thin wrappers over the host tools (`ip`) and /proc parsing.
//!
//! Topology setup shells out to iproute2 because it is what operators use and
//! its error messages are clear; every call carries the full command line in
//! its error context.

use std::ffi::OsStr;
use std::fs;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context as _, Result, bail};

/// Runs `ip ARGS...`, failing with the command line and stderr on error.
pub(crate) fn ip<S: AsRef<OsStr>>(args: &[S]) -> Result<()> {
    run_tool("ip", args)
}

/// Runs a host tool to completion; non-zero exit is an error with its stderr.
pub(crate) fn run_tool<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Result<()> {
    let line = format!(
        "{program} {}",
        args.iter()
            .map(|a| a.as_ref().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("spawning `{line}`"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Mount point of the (first) cgroup2 filesystem, from /proc/self/mountinfo.
///
/// Hybrid hosts mount it at /sys/fs/cgroup/unified, pure v2 hosts at
/// /sys/fs/cgroup: never hard-code either.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let info =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    find_mount(&info, "cgroup2")
        .context("no cgroup2 filesystem is mounted (see /proc/self/mountinfo)")
}

/// Mount point of the first mount with filesystem type `fstype`.
pub(crate) fn find_mount(mountinfo: &str, fstype: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // Format: ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != fstype {
            return None;
        }
        left.split_whitespace()
            .nth(4)
            .map(|m| PathBuf::from(unescape_octal(m)))
    })
}

/// Undoes mountinfo's octal escaping (`\040` for space etc.).
fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// True if this process runs with effective uid 0.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_layout() {
        let info = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                    40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd\n\
                    41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            find_mount(info, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(find_mount(info, "bpf"), None);
    }

    #[test]
    fn unescapes_spaces() {
        assert_eq!(unescape_octal("/a\\040b"), "/a b");
        assert_eq!(unescape_octal("/a\\04"), "/a\\04");
    }
}
