//! The resolved configuration snapshot: plain values, validated, with the lookups the data
//! plane needs precomputed. Built only by [`Config::from_yaml_str`] / [`Config::load`] (and
//! later by other sources producing the same model); shared as `Arc<Config>` and never mutated.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use foldhash::HashMap;
use serde::{Deserialize, Serialize};

use super::dump;
use crate::tls::SpiffeId;

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
    pub const CA_CHECK_INTERVAL: Duration = Duration::from_secs(30);
}

/// One immutable configuration snapshot. The data fields are public for reading; a `Config`
/// can only be built by this module (the lookups are private), so it is always validated.
/// Serialized (the lookups left out) for `/config_dump`, under the YAML's names.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    pub agent: AgentConfig,
    /// In file order; `WorkloadId(i)` is `workloads[i]`.
    pub workloads: Vec<Workload>,
    /// In file order. Shared between snapshots: a source that rebuilds only what changed
    /// hands the others over as they were (and the balancers see them unchanged by pointer).
    pub services: Vec<Arc<Service>>,
    pub policies: Policies,
    /// Nodes with labels (the zone, for locality); in file order. Optional.
    pub nodes: Vec<Node>,
    /// (canonical VIP, service port) -> (service index, port index)
    #[serde(skip)]
    pub(super) by_vip: HashMap<SocketAddr, (usize, usize)>,
    /// canonical workload IP -> workload
    #[serde(skip)]
    pub(super) by_ip: HashMap<IpAddr, WorkloadId>,
    /// A workload endpoint (pod IP, target port) -> the index of the first service, in file
    /// order, that has it: what the server side of a connection names as its service.
    #[serde(skip)]
    pub(super) by_endpoint: HashMap<SocketAddr, usize>,
    #[serde(skip)]
    pub(super) local: Vec<WorkloadId>,
    /// `WorkloadId(i)` -> indices into `policies.authorization` of the policies selecting
    /// workload `i`, in file order.
    #[serde(skip)]
    pub(super) authz_by_workload: Vec<Vec<usize>>,
}

impl Config {
    pub fn agent(&self) -> &AgentConfig {
        &self.agent
    }

    /// All workloads, in file order; `WorkloadId(i)` is `workloads()[i]`.
    pub fn workloads(&self) -> &[Workload] {
        &self.workloads
    }

    /// All services, in file order.
    pub fn services(&self) -> &[Arc<Service>] {
        &self.services
    }

    pub fn policies(&self) -> &Policies {
        &self.policies
    }

    /// The zone of this agent's node (`agent.node`'s zone label in `nodes`), if known: the
    /// middle tier of locality.
    pub fn local_zone(&self) -> Option<&str> {
        self.nodes
            .iter()
            .find(|n| n.name == self.agent.startup.node)
            .and_then(Node::zone)
    }

    pub fn workload(&self, id: WorkloadId) -> Option<&Workload> {
        self.workloads.get(id.0)
    }

    /// The first service (in file order) with the workload endpoint `addr`: on the server
    /// side, which knows only the pod address a connection came to, the service it was for.
    pub fn service_by_endpoint(&self, addr: SocketAddr) -> Option<&Service> {
        let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
        self.by_endpoint
            .get(&addr)
            .and_then(|s| self.services.get(*s))
            .map(Arc::as_ref)
    }

    /// The workload owning an endpoint's IP, if any (raw `addresses` that are a known
    /// workload's IP are that workload's too). Looked up rather than stored, so that a service
    /// is the same value whatever else changed among the workloads: a source may keep it.
    pub fn endpoint_workload(&self, endpoint: &Endpoint) -> Option<&Workload> {
        self.workload_by_ip(endpoint.addr.ip())
    }

    /// The workload owning `ip` (IPv4-mapped IPv6 addresses are matched as IPv4).
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Workload> {
        self.by_ip
            .get(&ip.to_canonical())
            .and_then(|id| self.workload(*id))
    }

    /// The local workload named `namespace/name` (how the data plane keys pods), without
    /// allocating: it is looked up once per proxied connection.
    pub fn local_workload(&self, qualified: &str) -> Option<&Workload> {
        let (namespace, name) = qualified.split_once('/')?;
        self.local_workloads()
            .find(|w| w.namespace == namespace && w.name == name)
    }

    /// Workloads on this agent's node (`workload.node == agent.node`), in file order.
    pub fn local_workloads(&self) -> impl Iterator<Item = &Workload> + '_ {
        self.local.iter().filter_map(|id| self.workload(*id))
    }

    /// The authorization policies that select `workload` (same namespace, selector included
    /// in its labels), in file order. Precomputed per workload of this snapshot; a workload
    /// from elsewhere (another snapshot, built by hand) is matched on the fly.
    pub fn authorization_policies_for<'a>(
        &'a self,
        workload: &'a Workload,
    ) -> impl Iterator<Item = &'a super::authorization::AuthorizationPolicy> + 'a {
        // The selection depends only on the namespace and the labels.
        let precomputed = self
            .workload(workload.id)
            .filter(|w| {
                std::ptr::eq(*w, workload)
                    || (w.namespace == workload.namespace && w.labels == workload.labels)
            })
            .and_then(|_| self.authz_by_workload.get(workload.id.0));
        let all = &self.policies.authorization;
        let (listed, scanned) = match precomputed {
            Some(indices) => (indices.as_slice(), None),
            None => (&[][..], Some(all.iter().filter(|p| p.selects(workload)))),
        };
        listed
            .iter()
            .filter_map(|i| all.get(*i))
            .chain(scanned.into_iter().flatten())
    }

    pub fn service(&self, namespace: &str, name: &str) -> Option<&Service> {
        self.services
            .iter()
            .find(|s| s.namespace == namespace && s.name == name)
            .map(Arc::as_ref)
    }

    /// The service and port whose VIP:port is `dst` (the original destination of an outbound
    /// connection). IPv4-mapped IPv6 addresses are matched as IPv4.
    pub fn service_by_vip(&self, dst: SocketAddr) -> Option<(&Service, &ServicePort)> {
        let key = SocketAddr::new(dst.ip().to_canonical(), dst.port());
        let (s, p) = *self.by_vip.get(&key)?;
        let service: &Service = self.services.get(s)?;
        Some((service, service.ports.get(p)?))
    }
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

/// Index of a workload in [`Config::workloads`]; only valid for the snapshot it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkloadId(pub usize);

/// A pod (or any process group in its own netns) known to the mesh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    #[serde(skip)]
    pub id: WorkloadId,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// `spiffe://<agent.trustDomain>/ns/<namespace>/sa/<serviceAccount>`: what the workload
    /// presents to other pods and what authorization sees of it.
    pub identity: SpiffeId,
    /// Canonical (IPv4-mapped addresses folded to IPv4), in file order, non-empty.
    pub ips: Vec<IpAddr>,
    pub node: String,
    /// Network namespace path; always set for local workloads.
    pub netns: Option<PathBuf>,
    pub labels: BTreeMap<String, String>,
    pub fail_mode: FailMode,
    pub unknown_destination: UnknownDestination,
    /// Its own, merged over the agent's.
    pub access_log: AccessLog,
    /// `node == agent.node`
    pub local: bool,
}

/// What any source knows of a workload; [`Workload::new`] derives the rest the same way for
/// all of them.
#[derive(Debug, Clone)]
pub struct WorkloadSpec {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// Canonical, non-empty.
    pub ips: Vec<IpAddr>,
    pub node: String,
    pub netns: Option<PathBuf>,
    pub labels: BTreeMap<String, String>,
}

impl Workload {
    /// The workload of `spec` under `agent`: its identity in the agent's trust domain, local
    /// when on the agent's node, the agent's access log and the default fail mode and unknown
    /// destination (a source that sets them per workload overrides them). Its `id` is set
    /// when the snapshot is assembled.
    pub fn new(
        spec: WorkloadSpec,
        agent: &AgentConfig,
    ) -> Result<Workload, crate::tls::IdentityError> {
        let identity = SpiffeId::new(
            &agent.startup.trust_domain,
            &spec.namespace,
            &spec.service_account,
        )?;
        let local = spec.node == agent.startup.node;
        Ok(Workload {
            id: WorkloadId(0),
            name: spec.name,
            namespace: spec.namespace,
            service_account: spec.service_account,
            identity,
            ips: spec.ips,
            node: spec.node,
            netns: spec.netns,
            labels: spec.labels,
            fail_mode: FailMode::default(),
            unknown_destination: UnknownDestination::default(),
            access_log: agent.live.access_log,
            local,
        })
    }

    /// `namespace/name`
    pub fn qualified_name(&self) -> QualifiedName<'_> {
        QualifiedName(&self.namespace, &self.name)
    }
}

/// `namespace/name`, for messages and logs.
#[derive(Debug, Clone, Copy)]
pub struct QualifiedName<'a>(pub &'a str, pub &'a str);

impl fmt::Display for QualifiedName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.0, self.1)
    }
}

/// What to do with a workload's traffic when the proxy cannot serve it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum FailMode {
    /// Let traffic bypass the proxy.
    #[default]
    Open,
    /// Drop traffic.
    Closed,
}

/// What to do with outbound connections to a destination that is not a known service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum UnknownDestination {
    /// Connect to the original destination as is.
    #[default]
    Passthrough,
    /// Refuse the connection.
    Deny,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// Canonical, in file order, non-empty.
    pub vips: Vec<IpAddr>,
    /// Non-empty, distinct `port`s, in file order.
    pub ports: Vec<ServicePort>,
    /// How the endpoints were selected (kept for display and for later sources).
    #[serde(rename = "endpoints")]
    pub selection: EndpointSelection,
    /// What callers do: balancing, health, retries, limits, split.
    #[serde(rename = "trafficPolicy")]
    pub traffic: super::traffic::TrafficPolicy,
}

impl Service {
    /// `namespace/name`
    pub fn qualified_name(&self) -> QualifiedName<'_> {
        QualifiedName(&self.namespace, &self.name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    pub port: u16,
    pub target_port: u16,
    pub name: Option<String>,
    /// Resolved endpoints, one per (endpoint IP, target port); a dual-stack workload
    /// contributes one endpoint per IP. Order: selection order, then IP order. May be empty
    /// (a selector that matches nothing).
    pub endpoints: Vec<Endpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// Endpoint IP and the service port's target port.
    #[serde(rename = "address")]
    pub addr: SocketAddr,
    /// That workload's node; `None` for a raw address outside the mesh.
    pub node: Option<String>,
    /// The workload is on this agent's node (connect directly from its netns).
    pub local: bool,
    /// Relative weight for the `weighted` balancer (`endpoints.weights`); default 1.
    pub weight: u32,
    /// The zone of its node (the node's `topology.kubernetes.io/zone` label), if known.
    pub zone: Option<String>,
}

/// The `endpoints` block of a service: exactly one way of choosing them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum EndpointSelection {
    /// Workloads of the service's namespace whose labels include all of these.
    Selector(BTreeMap<String, String>),
    /// Workloads of the service's namespace, by name.
    Workloads(Vec<String>),
    /// Raw IPs.
    Addresses(Vec<IpAddr>),
}

/// The `policies` block. Rate limits will join authorization here (hence `non_exhaustive`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct Policies {
    /// L4 authorization policies, in file order; `(namespace, name)` is unique. Evaluated by
    /// `crate::authz::authorize`.
    pub authorization: Vec<super::authorization::AuthorizationPolicy>,
    /// Limits on what reaches workloads, in file order; `(namespace, name)` is unique.
    pub rate_limits: Vec<super::limits::RateLimitPolicy>,
    /// Limits on what workloads send, in file order; `(namespace, name)` is unique.
    pub egress_limits: Vec<super::limits::EgressLimitPolicy>,
}

/// A node of the cluster, as far as the mesh cares: its labels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Node {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

impl Node {
    /// Its zone: the label [`ZONE_LABEL`](super::traffic::defaults::ZONE_LABEL).
    pub fn zone(&self) -> Option<&str> {
        self.labels
            .get(super::traffic::defaults::ZONE_LABEL)
            .map(String::as_str)
    }
}

/// Here, beside [`Workload`], rather than with the type: the policy types import nothing of
/// the model.
impl super::authorization::AuthorizationPolicy {
    /// `namespace/name`
    pub fn qualified_name(&self) -> QualifiedName<'_> {
        QualifiedName(&self.namespace, &self.name)
    }

    /// The policy applies to `workload`: same namespace, and the selector (if any) is
    /// included in its labels.
    pub fn selects(&self, workload: &Workload) -> bool {
        workload.namespace == self.namespace
            && self.selector.as_ref().is_none_or(|selector| {
                selector
                    .iter()
                    .all(|(k, v)| workload.labels.get(k) == Some(v))
            })
    }
}
