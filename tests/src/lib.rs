//! End-to-end test topology for the mesh agent: nodes and pods made of real
//! network namespaces, veths, bridges and cgroups on one machine.
//!
//! ```no_run
//! use mesh_tests::Topology;
//! # fn main() -> anyhow::Result<()> {
//! let mut topo = Topology::new("cross_node")?;
//! let n1 = topo.add_node("node1")?;
//! let n2 = topo.add_node("node2")?;
//! topo.connect_nodes(&n1, &n2)?;
//! let a = topo.add_pod(&n1, "client")?;
//! let b = topo.add_pod(&n2, "server")?;
//! let tool = mesh_tests::testtool_path()?;
//! let _srv = b.spawn_ready(&tool, ["serve", "--listen", "0.0.0.0:8080", "--name", "b"])?;
//! let out = a.run(&tool, ["id", "--connect", &format!("{}:8080", b.ipv4())])?;
//! # let _ = out; Ok(()) }
//! ```
//!
//! Everything is removed when the [`Topology`] drops (also on panic);
//! [`sweep`] removes leftovers of crashed runs. See docs/architecture.md §7.

pub mod agent;
mod cgroup;
pub mod exec;
pub mod fixtures;
pub mod grafana;
pub mod kernel;
pub mod kubeapi;
pub mod kubelet;
mod kubelet_pods;
pub mod naming;
pub mod payload;
pub mod prometheus;
mod sweep;
mod sys;
mod topology;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};

pub use agent::{Agent, ConfigBuilder};
pub use exec::{Background, output_timeout, spawn_ready, wait_timeout, wait_until};
pub use kubelet::{CgroupDriver, Qos};
pub use prometheus::Prometheus;
pub use sweep::{SweepReport, sweep};
pub use sys::{cgroup2_mount, is_root};
pub use topology::{BRIDGE, Node, Pod, Topology};

/// Panics with a clear message unless running as root: end-to-end tests
/// must fail loudly, never silently skip, when they cannot run.
pub fn assert_root() {
    assert!(
        is_root(),
        "end-to-end tests need root (CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF): run `cargo test` as root"
    );
}

/// Path of the `mesh-testtool` binary built with this crate.
///
/// Integration tests should prefer `env!("CARGO_BIN_EXE_mesh-testtool")`;
/// this finds it next to the running test executable (`target/<profile>/`),
/// for code outside integration tests. `MESH_TESTTOOL` overrides.
pub fn testtool_path() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("MESH_TESTTOOL") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("locating the current executable")?;
    for dir in exe.ancestors().skip(1).take(3) {
        let cand = dir.join("mesh-testtool");
        if cand.is_file() {
            return Ok(cand);
        }
    }
    bail!(
        "mesh-testtool not found near {} (build it with `cargo build -p mesh-tests`, or set MESH_TESTTOOL)",
        exe.display()
    )
}

/// Parses a reply of `mesh-testtool id`: `NAME PEER_ADDR` (the server's name
/// and the client address it saw; IPv6 as `[addr]:port`).
pub fn parse_id_reply(line: &str) -> Result<(String, SocketAddr)> {
    let (name, peer) = line
        .trim()
        .split_once(' ')
        .with_context(|| format!("malformed id reply {line:?}"))?;
    let peer: SocketAddr = peer
        .trim()
        .parse()
        .with_context(|| format!("malformed peer address in id reply {line:?}"))?;
    Ok((name.to_owned(), peer))
}

/// Parses the output of `mesh-testtool ids`: connections per server name, and failures.
pub fn parse_ids(output: &str) -> Result<(std::collections::BTreeMap<String, usize>, usize)> {
    let mut counts = std::collections::BTreeMap::new();
    let mut failed = None;
    for line in output.lines() {
        let (name, n) = line
            .rsplit_once(' ')
            .with_context(|| format!("malformed ids line {line:?}"))?;
        let n: usize = n
            .parse()
            .with_context(|| format!("malformed count in {line:?}"))?;
        if name == "failed" {
            failed = Some(n);
        } else {
            counts.insert(name.to_owned(), n);
        }
    }
    let failed = failed.context("no `failed` line in the ids output")?;
    Ok((counts, failed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_id_replies() {
        let (n, a) = parse_id_reply("srv 10.2.0.2:4567\n").expect("v4");
        assert_eq!(n, "srv");
        assert_eq!(a, "10.2.0.2:4567".parse().expect("addr"));
        let (_, a) = parse_id_reply("srv [fd00:1::2]:80").expect("v6");
        assert_eq!(a, "[fd00:1::2]:80".parse().expect("addr"));
        assert!(parse_id_reply("nospace").is_err());
    }

    #[test]
    fn parses_ids_output() {
        let (counts, failed) = parse_ids("b 3\nc 5\nfailed 1\n").expect("ids");
        assert_eq!((counts["b"], counts["c"], failed), (3, 5, 1));
        assert!(parse_ids("b 3\n").is_err());
    }
}
