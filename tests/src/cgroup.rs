//! cgroup v2 helpers: create pod cgroups, kill everything in a subtree,
//! remove a subtree.
//!
//! Pods are cgroups so the agent's cgroup eBPF programs (attached to the
//! per-test root) see exactly the pod processes; teardown relies on
//! `cgroup.kill` so no test process survives its topology.

use std::fs;
use std::io::ErrorKind;
use std::path::Path;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

/// Creates a cgroup directory (the parent must exist).
pub(crate) fn create(dir: &Path) -> Result<()> {
    fs::create_dir(dir).with_context(|| format!("creating cgroup {}", dir.display()))
}

/// True while any process lives in `dir` or below (`cgroup.events`).
pub fn populated(dir: &Path) -> Result<bool> {
    let events = dir.join("cgroup.events");
    let text = match fs::read_to_string(&events) {
        Ok(t) => t,
        // Removed meanwhile (e.g. by a concurrent sweep): nothing lives there.
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).with_context(|| format!("reading {}", events.display())),
    };
    Ok(text.lines().any(|l| l.trim() == "populated 1"))
}

/// SIGKILLs every process in `dir` and its descendants, then waits up to
/// `timeout` for the subtree to become empty.
pub fn kill_all(dir: &Path, timeout: Duration) -> Result<()> {
    let kill = dir.join("cgroup.kill");
    match fs::write(&kill, "1") {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound && !dir.exists() => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("writing 1 to {}", kill.display())),
    }
    let deadline = Instant::now() + timeout;
    while populated(dir)? {
        if Instant::now() >= deadline {
            bail!("processes still in {} after {timeout:?}", dir.display());
        }
        sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Kills everything in the subtree and removes it, children first; retries
/// `rmdir` for up to `timeout` while exiting processes leave (EBUSY).
/// A missing `dir` is success.
pub fn remove_tree(dir: &Path, timeout: Duration) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    kill_all(dir, timeout)?;
    let deadline = Instant::now() + timeout;
    remove_dirs(dir, deadline)
}

fn remove_dirs(dir: &Path, deadline: Instant) -> Result<()> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    for entry in rd {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_dirs(&entry.path(), deadline)?;
        }
    }
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).with_context(|| format!("removing cgroup {}", dir.display())),
        }
    }
}
