//! The command line: what a newcomer sees with `mesh-agent --help`.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Parser, Subcommand};

use crate::{logging::Format, source::SourceKind};

/// One service-mesh proxy per node: eBPF steers the node's pod traffic into this agent, which
/// routes it to services, and reports what it does.
#[derive(Debug, Parser)]
#[command(name = "mesh-agent", version, propagate_version = true)]
pub struct Cli {
    /// Log lines (and the one access-log line per connection) as text or JSON, on stderr.
    #[arg(long, global = true, value_enum, default_value_t = Format::Text)]
    pub log_format: Format,
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
        /// This node's name, instead of `agent.node` in the config (default: the host name).
        /// A DaemonSet sets it from the downward API (`spec.nodeName`).
        #[arg(long, value_name = "NAME", env = "MESH_NODE_NAME", value_parser = node_name)]
        node: Option<String>,
        /// Where workloads, services and policies come from: the file, or the Kubernetes API
        /// (in-cluster credentials or KUBECONFIG; the file then holds the agent block only).
        #[arg(long, value_enum, default_value_t = SourceKind::File)]
        source: SourceKind,
    },
    /// Is this node's mesh healthy? Asks the running agent (its admin API) and prints a
    /// first screen: a one-line verdict (`healthy`, or `degraded:` and what is wrong), eBPF
    /// programs and capture counters, pods enrolled and failed, the config generation and
    /// last error, certificates and the soonest expiry, tunnels, connections.
    ///
    /// The views show one part in full. Exits 1 when the agent cannot be reached.
    Status {
        #[command(subcommand)]
        view: Option<StatusView>,
        /// The agent's admin address (`agent.adminAddr`).
        #[arg(long, global = true, default_value = "127.0.0.1:15000")]
        admin: SocketAddr,
        /// Print the agent's JSON answer instead of the 80-column text.
        #[arg(long, global = true)]
        json: bool,
    },
    /// Ask a running agent whether it is live or ready, for a Kubernetes exec probe (the admin
    /// API listens on loopback only, which a kubelet's HTTP probe cannot reach).
    ///
    /// Prints one line; exits 0 when the agent answered 200, 1 otherwise (not listening, an
    /// error status, or no answer within the timeout).
    Probe {
        /// `live` asks /healthz, `ready` asks /ready.
        #[arg(value_enum)]
        check: ProbeCheck,
        /// The agent's admin address.
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: SocketAddr,
        /// Give up after this many milliseconds.
        #[arg(
            long,
            default_value_t = 1000,
            value_parser = clap::value_parser!(u64).range(1..=60_000)
        )]
        timeout_ms: u64,
        /// `ready` passes only if the agent that answered is this process (its start time
        /// is compared). During a rolling update two agents share the admin address; in the
        /// DaemonSet the agent is PID 1 of the probe's container: `--agent-pid 1`.
        #[arg(long, value_name = "PID")]
        agent_pid: Option<u32>,
    },
    /// Remove the programs and maps an agent pinned, which stops all steering on this node.
    Uninstall {
        /// The agent's pin name (`agent.bpfName` in the config).
        #[arg(long, default_value = "mesh")]
        name: String,
    },
    /// Work with configuration files without running an agent.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// The certificate authority that signs the mesh's workload certificates: run it off the
    /// nodes (`ca serve`), issue node certificates, or make a development CA.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
}

#[derive(Clone, Copy, Debug, Subcommand)]
pub enum StatusView {
    /// Enrolled pods with their eBPF capture counters, and the pods that failed to enroll
    /// with the reason.
    Pods,
    /// Each service port this node's pods call: its endpoints, their state, load and
    /// latency; then the rate limits and their use.
    Services,
    /// Live connections, oldest first, like `ss` for the mesh: source, destination,
    /// addresses, both identities, age, bytes each way.
    Connections {
        /// Show at most this many (the rest are counted).
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=10000))]
        limit: u32,
    },
    /// The certificates held for this node's pods: identity, serial, validity, time left.
    Certificates,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProbeCheck {
    Live,
    Ready,
}

impl ProbeCheck {
    /// The admin API path that answers this check.
    pub fn path(self) -> &'static str {
        match self {
            ProbeCheck::Live => "/healthz",
            ProbeCheck::Ready => "/ready",
        }
    }
}

/// `--node`: the config's rule for node names, checked before anything runs.
fn node_name(name: &str) -> Result<String, String> {
    let kind = crate::names::Kind::Node;
    kind.check(name)
        .map(|()| name.to_owned())
        .map_err(|error| format!("not a valid {kind} ({error}): {}", kind.rule_text()))
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a configuration file exactly as `run` loads it, without running anything: no
    /// root needed, no eBPF, namespace or network is touched (like `nginx -t`).
    ///
    /// Valid: prints `FILE: ok (N workloads, N services, N authorization policies, N rate
    /// limits, N egress limits)`, or `FILE: ok (agent block only)` with `--source
    /// kubernetes`, and exits 0. Invalid or unreadable: prints
    /// `FILE:LINE:COLUMN: field.path: message` on stderr and exits 1.
    Check {
        /// The YAML configuration to check.
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// The source `run` will use: with `kubernetes` the file must hold the agent block
        /// only (what a DaemonSet's ConfigMap holds).
        #[arg(long, value_enum, default_value_t = SourceKind::File)]
        source: SourceKind,
    },
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Write a self-signed development CA (ca.crt, and ca.key readable only by its owner)
    /// for the agent's built-in signer. Not for production: keep real CA keys in a Secret.
    Init {
        /// Directory to write ca.crt and ca.key into (created if missing).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The SPIFFE trust domain the CA is for (recorded in its subject).
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// Validity of the CA certificate, in days.
        #[arg(
            long,
            default_value_t = crate::tls::DEFAULT_CA_DAYS,
            value_parser = clap::value_parser!(u32).range(1..=36500)
        )]
        days: u32,
        /// Make an intermediate CA signed by the CA in this directory (its ca.crt and ca.key)
        /// instead of a self-signed root: the root key can then stay offline.
        #[arg(long, value_name = "DIR")]
        parent: Option<PathBuf>,
        /// Replace existing ca.crt / ca.key.
        #[arg(long)]
        force: bool,
    },
    /// Run the certificate authority: sign workload certificates for node agents over TLS,
    /// each identity only for the nodes its pods are placed on.
    ///
    /// Holds the CA key (of `ca init`, a root or an intermediate); the agents hold only the
    /// trust bundle. Locally (--config) they authenticate with their node certificate (`ca
    /// issue-node`) and placement is read from the mesh configuration (`workloads[].node`,
    /// `namespace`, `serviceAccount`; the trust domain is `agent.trustDomain`), reloaded when
    /// the file changes. In Kubernetes (--kubernetes) they authenticate with their projected
    /// service-account token (audience `mesh-ca`), checked by TokenReview, and placement comes
    /// from the CA's own watch of pods. Stops on SIGTERM or SIGINT.
    Serve {
        /// Directory with ca.crt (the CA certificate, then its chain up to the root) and ca.key.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The mesh configuration (YAML, as the agents read it): local mode.
        #[arg(
            long,
            short,
            value_name = "FILE",
            required_unless_present = "kubernetes"
        )]
        config: Option<PathBuf>,
        /// Kubernetes mode: tokens checked by TokenReview, placement from a watch of pods
        /// (the API server from the pod's service account or the kubeconfig).
        #[arg(long, conflicts_with_all = ["config", "trust_roots"])]
        kubernetes: bool,
        /// The mesh's trust domain, as the agents' `agent.trustDomain` (Kubernetes mode;
        /// locally it is the config's) [default: cluster.local].
        #[arg(long, conflicts_with = "config")]
        trust_domain: Option<String>,
        /// The agents' service account: the only one whose tokens are accepted (Kubernetes
        /// mode) [default: mesh-system/mesh-agent].
        #[arg(long, value_name = "NAMESPACE/NAME", conflicts_with = "config")]
        agent_service_account: Option<String>,
        /// Address of the CA's API.
        #[arg(long, default_value = crate::ca::DEFAULT_LISTEN)]
        listen: SocketAddr,
        /// More roots node certificates may chain to (during a root rotation); repeatable.
        #[arg(long = "trust-root", value_name = "FILE")]
        trust_roots: Vec<PathBuf>,
        /// Longest workload certificate signed, in minutes.
        #[arg(long, default_value_t = 1440, value_parser = clap::value_parser!(u64).range(1..=525_600))]
        max_lifetime_minutes: u64,
        /// Signing requests per second per node (more get 429).
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
        rate_per_node: u32,
        /// Requests a node may send at once above its rate.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
        burst_per_node: u32,
    },
    /// Issue the certificate a node's agent authenticates to `ca serve` with (`agent.ca`):
    /// writes node.crt and node.key (readable only by its owner) into --out.
    IssueNode {
        /// Directory with the CA's ca.crt and ca.key.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The node's name (`agent.node`).
        #[arg(long)]
        node: String,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// Validity, in days.
        #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u32).range(1..=3650))]
        days: u32,
        /// Directory to write node.crt and node.key into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
}
