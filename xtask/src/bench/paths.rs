//! The data paths the bench compares: one entry each, measured the same way.

use std::net::SocketAddr;

use anyhow::{Result, bail};
use clap::ValueEnum;
use mesh_tests::Pod;

/// Key of the direct same-node path, the baseline of same-node paths.
pub const DIRECT_SAME: &str = "direct-same-node";
/// Key of the direct cross-node path, the baseline of cross-node paths.
pub const DIRECT_CROSS: &str = "direct-cross-node";
pub const AGENT_SAME: &str = "agent-same-node";
pub const AGENT_CROSS: &str = "agent-cross-node";
pub const HAPROXY_CROSS: &str = "haproxy-tls-cross-node";

/// How agent-to-agent traffic crosses nodes; it names the agent cross-node path and adds
/// what the mode needs to each agent's config.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum CrossNodeMode {
    /// Today's agent: the client node's agent connects straight to the remote pod, whose
    /// node's agent takes the connection in (inbound capture).
    #[default]
    Plaintext,
    /// The HBONE mTLS tunnel between the two agents (not in the agent yet).
    Mtls,
}

impl CrossNodeMode {
    /// Column label of the agent cross-node path.
    pub fn label(self) -> &'static str {
        match self {
            CrossNodeMode::Plaintext => "agent cross-node (plaintext)",
            CrossNodeMode::Mtls => "agent cross-node (mTLS tunnel)",
        }
    }

    /// Extra lines of each agent's `agent:` block in this mode.
    pub fn agent_config(self) -> Result<Vec<String>> {
        match self {
            CrossNodeMode::Plaintext => Ok(Vec::new()),
            // When the tunnel lands: the settings it needs (certificates, tunnel port) go
            // here, and the rest of the bench stays as it is.
            CrossNodeMode::Mtls => bail!(
                "the agent has no mTLS tunnel yet: run with --cross-node plaintext until it lands"
            ),
        }
    }
}

/// A process whose memory and CPU the path is charged with (the agents, haproxy).
#[derive(Clone, Debug)]
pub struct Proxy {
    pub label: String,
    pub pid: u32,
}

/// One data path: a client pod, the address it connects to, what sits in between.
#[derive(Clone, Debug)]
pub struct PathSpec {
    /// Stable key (JSON, ratios).
    pub name: &'static str,
    /// Column header.
    pub label: String,
    /// The direct path this one is compared with.
    pub baseline: Option<&'static str>,
    pub client: Pod,
    pub target: SocketAddr,
    pub proxies: Vec<Proxy>,
}

impl PathSpec {
    pub fn proxy_pids(&self) -> Vec<u32> {
        self.proxies.iter().map(|p| p.pid).collect()
    }
}
