//! Removal of leftovers from earlier (crashed or killed) runs.
//!
//! Anything carrying the project prefix (netns `mt-<id>-*`, cgroups
//! `mesh-test-<id>` under the cgroup2 mount, bpffs dirs `mesh-test-<id>`)
//! is removed unless the owner recorded in `/run/mesh-test/<id>.pid` is
//! still alive, so tests running in parallel are never harmed.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result};

use crate::cgroup;
use crate::naming::{self, BPFFS_DIR, DIR_PREFIX, MARKER_DIR, NETNS_RUN_DIR};
use crate::sys;
use crate::topology::{remove_dir_all_if_present, remove_file_if_present};

/// What [`sweep`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepReport {
    /// Network namespaces deleted.
    pub netns: Vec<String>,
    /// cgroup trees removed.
    pub cgroups: Vec<PathBuf>,
    /// bpffs directories removed.
    pub bpf_dirs: Vec<PathBuf>,
    /// Stale marker files removed.
    pub markers: Vec<PathBuf>,
    /// Ids left alone because their owner process is alive.
    pub skipped_live: Vec<String>,
}

/// Removes leftovers of any earlier run whose owner process is gone.
/// Tries every item; returns the report, or the first error after trying all.
pub fn sweep() -> Result<SweepReport> {
    let mount = sys::cgroup2_mount()?;
    let mut ids = BTreeSet::new();
    let netns = naming::list_netns()?;
    for n in &netns {
        if let Some(id) = naming::netns_id(n) {
            ids.insert(id.to_owned());
        }
    }
    for dir in [mount.as_path(), Path::new(BPFFS_DIR)] {
        ids.extend(prefixed_entries(dir, DIR_PREFIX));
    }
    ids.extend(
        prefixed_entries(Path::new(MARKER_DIR), "")
            .into_iter()
            .filter_map(|f| f.strip_suffix(".pid").map(str::to_owned)),
    );

    let mut report = SweepReport::default();
    let mut first: Option<anyhow::Error> = None;
    let mut note = |r: Result<()>| {
        if let Err(e) = r {
            eprintln!("mesh-tests sweep: {e:#}");
            first.get_or_insert(e);
        }
    };
    for id in ids {
        if naming::owner_alive(&id) {
            report.skipped_live.push(id);
            continue;
        }
        let cg = mount.join(format!("{DIR_PREFIX}{id}"));
        if cg.exists() {
            // Kill first: processes may hold the namespaces.
            note(cgroup::remove_tree(&cg, Duration::from_secs(5)));
            report.cgroups.push(cg);
        }
        for n in netns
            .iter()
            .filter(|n| naming::netns_id(n) == Some(id.as_str()))
        {
            let path = Path::new(NETNS_RUN_DIR).join(n);
            if path.exists() {
                match sys::ip(&["netns", "del", n.as_str()]) {
                    Ok(()) => report.netns.push(n.clone()),
                    // A concurrent sweep (another test process) got there first.
                    Err(_) if !path.exists() => {}
                    Err(e) => note(Err(e)),
                }
            }
        }
        for dir in crate::topology::owned_dirs(&format!("{DIR_PREFIX}{id}")) {
            if dir.exists() {
                note(remove_dir_all_if_present(&dir));
                report.bpf_dirs.push(dir);
            }
        }
        let marker = naming::marker_path(&id);
        if marker.exists() {
            note(remove_file_if_present(&marker));
            report.markers.push(marker);
        }
    }
    match first {
        Some(e) => Err(e).context("sweep finished with errors"),
        None => Ok(report),
    }
}

/// Names in `dir` starting with `prefix` (suffix after it; not dotfiles).
fn prefixed_entries(dir: &Path, prefix: &str) -> Vec<String> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter(|n| !n.starts_with('.'))
        .filter_map(|n| {
            n.strip_prefix(prefix)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        })
        .collect()
}
