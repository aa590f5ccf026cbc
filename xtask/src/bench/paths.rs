//! The data paths the bench compares: one entry each, measured the same way, and what each
//! measured.

use std::{collections::BTreeMap, net::SocketAddr, path::Path};

use clap::ValueEnum;
use mesh_tests::Pod;
use serde_json::Value;

/// Key of the direct same-node path, the baseline of same-node paths.
pub const DIRECT_SAME: &str = "direct-same-node";
/// Key of the direct cross-node path, the baseline of cross-node paths.
pub const DIRECT_CROSS: &str = "direct-cross-node";
pub const AGENT_SAME: &str = "agent-same-node";
/// `agent-same-node` with the traffic policy on (see [`super::policy`]).
pub const AGENT_SAME_POLICY: &str = "agent-same-node-policy";
/// `agent-same-node` with the access log and Istio's per-connection metrics off.
pub const AGENT_SAME_QUIET: &str = "agent-same-node-no-telemetry";
pub const AGENT_CROSS: &str = "agent-cross-node";
pub const HAPROXY_CROSS: &str = "haproxy-tls-cross-node";

/// How agent-to-agent traffic crosses nodes; it names the agent cross-node path and decides
/// what each agent's config holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum CrossNodeMode {
    /// The HBONE tunnel: node1's agent opens an HTTP/2 CONNECT stream over mutual TLS to the
    /// remote pod's tunnel port (15008), served by node2's agent. Both agents share one CA
    /// and list the workloads of both nodes.
    #[default]
    Mtls,
    /// No tunnel: each agent knows only its own node's workloads, the remote service's
    /// endpoint is a bare address, so node1's agent connects straight to the remote pod and
    /// node2's agent takes the connection in (inbound capture).
    Plaintext,
}

impl CrossNodeMode {
    /// Column label of the agent cross-node path.
    pub fn label(self) -> &'static str {
        match self {
            CrossNodeMode::Plaintext => "agent cross-node (plaintext)",
            CrossNodeMode::Mtls => "agent cross-node (mTLS)",
        }
    }

    /// Extra lines of each agent's `agent:` block in this mode; `ca_dir` holds the shared
    /// CA (`ca.crt`, `ca.key`) of the mTLS mode.
    pub fn agent_config(self, ca_dir: &Path) -> Vec<String> {
        match self {
            CrossNodeMode::Plaintext => Vec::new(),
            CrossNodeMode::Mtls => vec![
                format!("caCertFile: {}", ca_dir.join("ca.crt").display()),
                format!("caKeyFile: {}", ca_dir.join("ca.key").display()),
            ],
        }
    }

    /// Whether each agent lists the other node's workloads (the tunnel needs them; without
    /// them a remote endpoint is a plain address).
    pub fn lists_remote_workloads(self) -> bool {
        self == CrossNodeMode::Mtls
    }
}

/// node1's agent's config for a path: plain (the access log and every metric on, the
/// defaults), with the traffic policy, or with per-connection telemetry off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    Plain,
    Policy,
    Quiet,
}

impl Variant {
    pub const ALL: [Variant; 3] = [Variant::Plain, Variant::Policy, Variant::Quiet];

    pub fn as_str(self) -> &'static str {
        match self {
            Variant::Plain => "plain",
            Variant::Policy => "policy",
            Variant::Quiet => "no-telemetry",
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
    /// The agents on the path (0: node1's, 1: node2's), charged like proxies; their pids
    /// are looked up when the path runs, as node1's agent restarts to change config.
    pub agents: Vec<usize>,
    /// The config node1's agent runs for this path.
    pub variant: Variant,
    /// Processes on the path besides the agents (the path's proxies once it runs).
    pub proxies: Vec<Proxy>,
}

impl PathSpec {
    pub fn proxy_pids(&self) -> Vec<u32> {
        self.proxies.iter().map(|p| p.pid).collect()
    }
}

/// What one path measured.
pub struct PathResult {
    pub name: &'static str,
    pub label: String,
    pub baseline: Option<&'static str>,
    pub metrics: BTreeMap<&'static str, f64>,
    /// The load generator's full reports.
    pub raw: serde_json::Map<String, Value>,
    /// Lines printed under the table (e.g. the tunnel check of the mTLS path).
    pub notes: Vec<String>,
    pub errors: Vec<String>,
}

impl PathResult {
    pub fn new(path: &PathSpec) -> Self {
        PathResult {
            name: path.name,
            label: path.label.clone(),
            baseline: path.baseline,
            metrics: BTreeMap::new(),
            raw: serde_json::Map::new(),
            notes: Vec::new(),
            errors: Vec::new(),
        }
    }

    pub fn set(&mut self, metric: &'static str, value: f64) {
        if value.is_finite() {
            self.metrics.insert(metric, value);
        }
    }

    pub fn set_from(&mut self, metric: &'static str, value: &Value) {
        if let Some(v) = value.as_f64() {
            self.set(metric, v);
        }
    }
}
