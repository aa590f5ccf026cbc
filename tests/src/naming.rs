//! Unique per-test ids, the project prefixes, and the owner marker files.
//!
//! Every object a test creates carries a prefix plus a short id so that
//! parallel tests (also in several processes) never collide, and so that
//! [`crate::sweep`] can find leftovers of crashed runs. A marker file
//! `/run/mesh-test/<id>.pid` records which process owns an id; the sweep
//! leaves an id alone while that process is alive.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};

/// Prefix of every network namespace name: `mt-<id>-<role>`.
pub const NETNS_PREFIX: &str = "mt-";
/// Prefix of the per-test cgroup root and bpffs pin dir: `mesh-test-<id>`.
pub const DIR_PREFIX: &str = "mesh-test-";
/// Where owner marker files live (`<id>.pid`).
pub const MARKER_DIR: &str = "/run/mesh-test";
/// Where `ip netns` keeps its namespace bind mounts.
pub const NETNS_RUN_DIR: &str = "/var/run/netns";
/// Base directory of bpffs pins.
pub const BPFFS_DIR: &str = "/sys/fs/bpf";

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh 5-hex-char candidate id from pid, time and a process-wide counter.
///
/// 20 bits are few, so callers must claim the id with [`claim_id`], which
/// fails if another live or dead run already used it.
pub(crate) fn candidate_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut x = nanos
        ^ (u64::from(std::process::id()) << 32)
        ^ COUNTER
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    // splitmix64 finaliser: spreads every input bit over the output.
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    format!("{:05x}", x & 0xf_ffff)
}

/// Path of the owner marker of `id`.
pub fn marker_path(id: &str) -> PathBuf {
    Path::new(MARKER_DIR).join(format!("{id}.pid"))
}

/// Content identifying this process: `<pid> <start time>`; the start time
/// protects against pid reuse after a crash.
fn owner_line(pid: u32) -> Result<String> {
    let start = process_start_time(pid)
        .with_context(|| format!("reading start time of own process {pid}"))?;
    Ok(format!("{pid} {start}\n"))
}

/// Atomically creates the marker for `id` owned by `pid`. Returns Ok(false)
/// if the id is already taken (marker exists).
///
/// Written to a temp file and hard-linked into place, so a reader never sees
/// a half-written marker and two claimers can never both win.
pub fn write_marker(id: &str, pid: u32) -> Result<bool> {
    fs::create_dir_all(MARKER_DIR).with_context(|| format!("creating {MARKER_DIR}"))?;
    let content = owner_line(pid)?;
    let tmp = Path::new(MARKER_DIR).join(format!(
        ".{id}.{}.{}.tmp",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    {
        let mut f =
            fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(content.as_bytes())
            .with_context(|| format!("writing {}", tmp.display()))?;
    }
    let res = fs::hard_link(&tmp, marker_path(id));
    let _ = fs::remove_file(&tmp);
    match res {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e).with_context(|| format!("creating marker {}", marker_path(id).display())),
    }
}

/// Claims `id` for this process if neither a marker nor leftovers use it.
pub(crate) fn claim_id(id: &str, cgroup2_mount: &Path) -> Result<bool> {
    let leftovers = cgroup2_mount.join(format!("{DIR_PREFIX}{id}")).exists()
        || Path::new(BPFFS_DIR)
            .join(format!("{DIR_PREFIX}{id}"))
            .exists()
        || list_netns()?.iter().any(|n| netns_id(n) == Some(id));
    if leftovers {
        return Ok(false);
    }
    write_marker(id, std::process::id())
}

/// True if the marker of `id` names a process that is still running.
/// A missing or unreadable marker means "not alive": markers are created
/// before anything else and removed after everything else.
pub fn owner_alive(id: &str) -> bool {
    let Ok(text) = fs::read_to_string(marker_path(id)) else {
        return false;
    };
    let mut it = text.split_whitespace();
    let (Some(pid), Some(start)) = (it.next(), it.next()) else {
        return false;
    };
    let (Ok(pid), Ok(start)) = (pid.parse::<u32>(), start.parse::<u64>()) else {
        return false;
    };
    process_start_time(pid).is_ok_and(|s| s == start)
}

/// Start time (field 22 of /proc/PID/stat, in clock ticks since boot).
fn process_start_time(pid: u32) -> Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) may contain spaces and ')': skip past the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc/PID/stat")?;
    // After ')' comes field 3 (state); field 22 is the 20th from there.
    rest.split_whitespace()
        .nth(19)
        .context("short /proc/PID/stat")?
        .parse()
        .context("parsing start time")
}

/// The id part of a project netns name `mt-<id>-<role>`, if it is one.
pub fn netns_id(name: &str) -> Option<&str> {
    let rest = name.strip_prefix(NETNS_PREFIX)?;
    let id = rest.split_once('-').map_or(rest, |(id, _)| id);
    (!id.is_empty()).then_some(id)
}

/// Names of all named network namespaces (entries of /var/run/netns).
pub fn list_netns() -> Result<Vec<String>> {
    let rd = match fs::read_dir(NETNS_RUN_DIR) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing {NETNS_RUN_DIR}")),
    };
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.with_context(|| format!("listing {NETNS_RUN_DIR}"))?;
        if let Some(name) = entry.file_name().to_str() {
            out.push(name.to_owned());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_five_hex_chars_and_differ() {
        let a = candidate_id();
        let b = candidate_id();
        assert_eq!(a.len(), 5);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn netns_id_parses() {
        assert_eq!(netns_id("mt-3fa2c-n1p2"), Some("3fa2c"));
        assert_eq!(netns_id("mt-3fa2c"), Some("3fa2c"));
        assert_eq!(netns_id("other"), None);
        assert_eq!(netns_id("mt-"), None);
    }

    #[test]
    fn own_start_time_is_readable() {
        assert!(process_start_time(std::process::id()).is_ok());
    }
}
