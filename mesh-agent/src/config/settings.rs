//! The `agent` block of the snapshot, defaults applied: the settings read once at start
//! ([`StartupSettings`]) apart from those a reload applies ([`LiveSettings`]), so that a
//! reload can name what it may not change. Beside the model rather than in it: it is the
//! part every source takes from the file.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use super::dump;

/// Defaults of the `agent` block.
pub mod defaults {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    use std::time::Duration;

    pub const BPF_NAME: &str = "mesh";
    pub const OUTBOUND_PORT: u16 = 15001;
    pub const INBOUND_PORT: u16 = 15006;
    pub const TUNNEL_PORT: u16 = 15008;
    pub const ADMIN_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15000);
    pub const PROXY_MARK: u32 = 0x539;
    pub const TRANSPARENT_MARK: u32 = 0x4000_0539;
    pub const REPLY_TABLE: u32 = 1337;
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    pub const IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
    pub const BUFFER_BYTES: usize = 64 * 1024;
    /// Upper bound of `bufferBytes` (per direction per connection).
    pub const MAX_BUFFER_BYTES: usize = 16 * 1024 * 1024;
    /// `splice`: on where the benchmark measured it better (same-node bulk).
    pub const SPLICE: bool = true;
    /// Connections the proxy copies at once, node-wide (each holds two copy buffers).
    pub const MAX_CONNECTIONS: usize = 16384;
    pub const NAMESPACE: &str = "default";
    pub const SERVICE_ACCOUNT: &str = "default";
    pub const TRUST_DOMAIN: &str = "cluster.local";
    pub const CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
    /// Upper bound of `certLifetimeMinutes`: certificates are meant to be short-lived.
    pub const MAX_CERT_LIFETIME_MINUTES: u64 = 365 * 24 * 60;
    pub const TUNNEL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
    /// Under Kubernetes' default termination grace period (30 s).
    pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(25);
    pub const MAX_DRAIN_TIMEOUT_MS: u64 = 3_600_000;
    /// Upper bound of `tunnelConnectionsPerPeer`.
    pub const MAX_TUNNEL_CONNECTIONS_PER_PEER: usize = 64;
    pub const CA_CHECK_INTERVAL: Duration = Duration::from_secs(30);
}

/// The `agent` block, defaults applied, in two parts: what the agent reads once at start
/// ([`StartupSettings`]: a reload changing it is refused) and what a reload applies
/// ([`LiveSettings`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgentConfig {
    #[serde(flatten)]
    pub startup: StartupSettings,
    #[serde(flatten)]
    pub live: LiveSettings,
}

/// The settings that take effect only when the agent starts (listeners, pins, the CA, the
/// connection limit). Serialized to name the ones a reload changed, and for `/config_dump`:
/// the serialized keys are the YAML names of the `agent` block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StartupSettings {
    /// Node this agent serves; default: the host name (`/proc/sys/kernel/hostname`).
    pub node: String,
    /// cgroup2 directory to attach to; `None` = the cgroup2 root (resolved elsewhere).
    pub cgroup: Option<PathBuf>,
    /// Pin directory name under /sys/fs/bpf (a single path component).
    pub bpf_name: String,
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub tunnel_port: u16,
    /// Admin + metrics listener; always a loopback address.
    pub admin_addr: SocketAddr,
    /// SO_MARK of the proxy's own sockets (never captured); non-zero.
    pub proxy_mark: u32,
    /// SO_MARK of the proxy's sockets that connect to an app from the address of a tunnel's
    /// client pod (transparent); non-zero, not `proxy_mark`. The app's accepted socket
    /// inherits it, and the reply route in the pod's netns selects it.
    pub transparent_mark: u32,
    /// The routing table, in each enrolled pod's netns, that sends replies to those
    /// sockets' connections back to the agent (`local default dev lo`).
    pub reply_table: u32,
    /// Connections proxied at once (outbound and inbound); beyond it the listeners stop
    /// accepting and new connections wait in the kernel's backlog.
    pub max_connections: usize,
    /// SPIFFE trust domain of the mesh identities; default `cluster.local`.
    pub trust_domain: String,
    /// PEM certificate of the built-in CA (absolute path). `None` (with `ca_key_file`): the
    /// agent generates an in-memory development CA. Set together with `ca_key_file`.
    pub ca_cert_file: Option<PathBuf>,
    /// PEM private key of the built-in CA (absolute path); set together with `ca_cert_file`.
    pub ca_key_file: Option<PathBuf>,
    /// Extra PEM bundles accepted as trust roots besides the CA's own certificate (root
    /// rotation); absolute, distinct, in file order.
    pub trust_root_files: Vec<PathBuf>,
    /// Lifetime of the workload certificates the CA signs; default 24 h, at least a minute.
    #[serde(rename = "certLifetimeMinutes", serialize_with = "dump::minutes")]
    pub cert_lifetime: Duration,
    /// An HBONE tunnel (node-to-node connection) with no stream is closed after this long.
    #[serde(rename = "tunnelIdleTimeoutMs", serialize_with = "dump::millis")]
    pub tunnel_idle_timeout: Duration,
    /// Tunnel connections to one peer (source pod, destination pod) that concurrent streams
    /// are spread over; `None`: one per CPU, at most 8 (`tunnel::default_connections_per_peer`).
    #[serde(rename = "tunnelConnectionsPerPeer")]
    pub tunnel_connections_per_peer: Option<usize>,
    /// On SIGTERM, how long established connections may go on after the listeners close
    /// (keep it under the pod's termination grace period); zero closes them at once.
    #[serde(rename = "drainTimeoutMs", serialize_with = "dump::millis")]
    pub drain_timeout: Duration,
    /// The certificate authority off the node (`mesh-agent ca serve`); `None`: the built-in
    /// signer with a CA key on the node (the development shortcut).
    pub ca: Option<RemoteCa>,
    /// The eBPF fast path: what an app sends to the agent inside its pod is redirected
    /// (sk_msg) instead of crossing loopback TCP. Off by default.
    pub fast_path: bool,
}

/// `agent.ca`: where the CA is and how this node authenticates to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RemoteCa {
    /// `host:port` of the CA's API.
    pub address: String,
    /// How this node proves who it is: exactly one way.
    #[serde(flatten)]
    pub credential: CaCredential,
    /// How often the agent checks that the CA is reachable (status, metrics).
    #[serde(rename = "checkIntervalMs", serialize_with = "dump::millis")]
    pub check_interval: Duration,
}

/// `agent.ca`'s credential, dumped under the YAML's names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum CaCredential {
    /// `nodeCertFile`, `nodeKeyFile`: this node's certificate (from `mesh-agent ca
    /// issue-node`) and key, absolute paths (local mode).
    #[serde(rename_all = "camelCase")]
    NodeCertificate {
        node_cert_file: PathBuf,
        node_key_file: PathBuf,
    },
    /// `tokenFile`: the pod's projected service-account token for the CA's audience, read
    /// for every request (Kubernetes).
    #[serde(rename_all = "camelCase")]
    Token { token_file: PathBuf },
}

/// The settings a reload applies to new connections (and, for the exclusions, to the eBPF
/// maps at once).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LiveSettings {
    /// Destination ports never captured, sorted.
    pub excluded_ports: Vec<u16>,
    /// Destination networks never captured (e.g. the node's own network), in file order.
    pub excluded_cidrs: Vec<Cidr>,
    #[serde(rename = "connectTimeoutMs", serialize_with = "dump::millis")]
    pub connect_timeout: Duration,
    #[serde(rename = "idleTimeoutMs", serialize_with = "dump::millis")]
    pub idle_timeout: Duration,
    /// The largest copy buffer per direction per connection (buffers start small and grow
    /// with bulk reads).
    pub buffer_bytes: usize,
    /// The access log of pods that do not set their own.
    pub access_log: AccessLog,
    /// Istio's per-connection TCP metrics (`istio_tcp_*`); off leaves the agent's own.
    pub istio_metrics: bool,
    /// Same-node TCP-to-TCP copies move their bytes kernel-side with `splice(2)` instead of
    /// through a buffer of the agent's.
    pub splice: bool,
}

/// Which connections get an access-log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AccessLog {
    pub enabled: bool,
    /// Percent of the connections that end normally to log; refusals and failures are
    /// always logged while the log is enabled.
    pub sample_percent: u8,
}

impl Default for AccessLog {
    fn default() -> Self {
        Self {
            enabled: true,
            sample_percent: 100,
        }
    }
}

impl StartupSettings {
    /// The YAML names (`tunnelPort`) of the settings that differ between `self` and `new`;
    /// empty when they are equal. Derived from the serialized form, so a new setting is
    /// covered by adding the field.
    pub fn changes(&self, new: &StartupSettings) -> Vec<String> {
        if self == new {
            return Vec::new();
        }
        match (serde_json::to_value(self), serde_json::to_value(new)) {
            (Ok(serde_json::Value::Object(old)), Ok(serde_json::Value::Object(new))) => {
                let changed: Vec<String> = old
                    .iter()
                    .filter(|(key, value)| new.get(key.as_str()) != Some(value))
                    .map(|(key, _)| key.clone())
                    .collect();
                if changed.is_empty() {
                    // Unreachable while the serialization is faithful; never report "no
                    // change" for settings that differ.
                    vec![UNNAMED_CHANGE.to_owned()]
                } else {
                    changed
                }
            }
            // Only a path that is not UTF-8 fails to serialize (the file cannot write one).
            _ => vec![UNNAMED_CHANGE.to_owned()],
        }
    }

    /// Lowest and highest of the proxy's listener ports (outbound, inbound, tunnel): the range
    /// the eBPF programs reserve for the proxy (`mesh_common::Settings`).
    pub fn proxy_port_range(&self) -> (u16, u16) {
        let ports = [self.outbound_port, self.inbound_port, self.tunnel_port];
        let min = ports.iter().copied().min().unwrap_or(self.outbound_port);
        let max = ports.iter().copied().max().unwrap_or(self.outbound_port);
        (min, max)
    }
}

/// What [`StartupSettings::changes`] reports when it cannot name the setting.
const UNNAMED_CHANGE: &str = "(a start-up setting)";

/// An IP network, `address/prefix`, with the host bits zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}
