//! The command line: what a newcomer sees with `mesh-agent --help`.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Parser, Subcommand};

/// One service-mesh proxy per node: eBPF steers the node's pod traffic into this agent, which
/// routes it to services, and reports what it does.
#[derive(Debug, Parser)]
#[command(name = "mesh-agent", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: load the eBPF programs, enroll this node's pods, proxy their traffic.
    ///
    /// Needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN). Stops cleanly on SIGTERM or
    /// SIGINT, leaving the pinned programs in place so pods keep their steering across a
    /// restart; `mesh-agent uninstall` removes them.
    Run {
        /// The YAML configuration (workloads, services); reloaded when it changes.
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// Attach to this cgroup instead of the one in the config (default: the cgroup2 root).
        #[arg(long, value_name = "DIR")]
        cgroup: Option<PathBuf>,
    },
    /// Show what a running agent is doing: enrolled pods, capture counters, programs.
    Status {
        /// The agent's admin address.
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: SocketAddr,
        /// Print the raw JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove the programs and maps an agent pinned, which stops all steering on this node.
    Uninstall {
        /// The agent's pin name (`agent.bpfName` in the config).
        #[arg(long, default_value = "mesh")]
        name: String,
    },
}
