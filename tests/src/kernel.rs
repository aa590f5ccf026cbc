//! What the tests read straight from the kernel, beside the agent's own report: network
//! namespace cookies, the pinned capture counters, and which eBPF links exist.

use std::{fs::File, os::fd::AsRawFd, path::Path};

use anyhow::{Context as _, Result, bail};
use aya::maps::{Map, MapData, PerCpuHashMap};
use mesh_common::{PodStats, SCHEMA_VERSION, maps};

/// The cookie of the network namespace at `netns_path` (what the agent keys pods by).
// Unsafe: SO_NETNS_COOKIE has no safe wrapper (nix, socket2), so getsockopt(2) directly.
#[allow(unsafe_code)]
pub fn netns_cookie(netns_path: &Path) -> Result<u64> {
    let file =
        File::open(netns_path).with_context(|| format!("opening {}", netns_path.display()))?;
    // setns on a scratch thread so no test thread changes namespace.
    std::thread::scope(|scope| {
        scope
            .spawn(|| -> Result<u64> {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .context("entering the pod netns")?;
                let socket = std::net::UdpSocket::bind("127.0.0.1:0").context("probe socket")?;
                let mut cookie = 0u64;
                let mut len = size_of::<u64>() as libc::socklen_t;
                // SAFETY: valid fd and a u64 out-parameter with its length.
                let rc = unsafe {
                    libc::getsockopt(
                        socket.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_NETNS_COOKIE,
                        (&raw mut cookie).cast(),
                        &raw mut len,
                    )
                };
                if rc != 0 {
                    bail!("SO_NETNS_COOKIE: {}", std::io::Error::last_os_error());
                }
                Ok(cookie)
            })
            .join()
            .map_err(|_| anyhow::anyhow!("netns cookie thread panicked"))?
    })
}

/// The capture counters connect4/6 keep for a netns cookie, summed over CPUs; `None` when
/// the programs never counted anything for it.
pub fn pod_stats(pin_name: &str, netns_cookie: u64) -> Result<Option<PodStats>> {
    let path = Path::new("/sys/fs/bpf")
        .join(pin_name)
        .join(format!("v{SCHEMA_VERSION}/maps"))
        .join(maps::POD_STATS);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let map: PerCpuHashMap<_, u64, PodStats> = PerCpuHashMap::try_from(Map::PerCpuHashMap(data))?;
    match map.get(&netns_cookie, 0) {
        Ok(per_cpu) => Ok(Some(per_cpu.iter().fold(
            PodStats::default(),
            |sum, cpu| PodStats {
                captured: sum.captured + cpu.captured,
                skipped: sum.skipped + cpu.skipped,
                no_listener: sum.no_listener + cpu.no_listener,
                fast_path: sum.fast_path + cpu.fast_path,
            },
        ))),
        Err(aya::maps::MapError::KeyNotFound) => Ok(None),
        Err(error) => Err(error.into()),
    }
}

/// Ids of the links pinned under `/sys/fs/bpf/<pin_name>` (recursively).
pub fn pinned_link_ids(pin_name: &str) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    let root = Path::new("/sys/fs/bpf").join(pin_name);
    let mut dirs = vec![root];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.parent().is_some_and(|p| p.ends_with("links")) {
                let link = aya::programs::links::PinnedLink::from_pin(&path)
                    .with_context(|| format!("opening pinned link {}", path.display()))?;
                let info = aya::programs::links::FdLink::from(link).info()?;
                ids.push(info.id());
            }
        }
    }
    Ok(ids)
}

/// Ids of all eBPF links the kernel has now.
pub fn live_link_ids() -> Result<Vec<u32>> {
    aya::programs::loaded_links()
        .map(|info| info.map(|i| i.id()).map_err(anyhow::Error::from))
        .collect()
}
