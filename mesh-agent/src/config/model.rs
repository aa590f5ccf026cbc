//! The resolved configuration snapshot: plain values, validated, with the lookups the data
//! plane needs precomputed. Built only by [`Config::from_yaml_str`] / [`Config::load`] (and
//! later by other sources producing the same model); shared as `Arc<Config>` and never mutated.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

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
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    pub const IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
    pub const BUFFER_BYTES: usize = 64 * 1024;
    /// Upper bound of `bufferBytes` (per direction per connection).
    pub const MAX_BUFFER_BYTES: usize = 16 * 1024 * 1024;
    pub const NAMESPACE: &str = "default";
    pub const SERVICE_ACCOUNT: &str = "default";
}

/// One immutable configuration snapshot. The data fields are public for reading; a `Config`
/// can only be built by this module (the lookups are private), so it is always validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub agent: AgentConfig,
    /// In file order; `WorkloadId(i)` is `workloads[i]`.
    pub workloads: Vec<Workload>,
    /// In file order.
    pub services: Vec<Service>,
    pub policies: Policies,
    /// (canonical VIP, service port) -> (service index, port index)
    pub(super) by_vip: HashMap<SocketAddr, (usize, usize)>,
    /// canonical workload IP -> workload
    pub(super) by_ip: HashMap<IpAddr, WorkloadId>,
    pub(super) local: Vec<WorkloadId>,
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
    pub fn services(&self) -> &[Service] {
        &self.services
    }

    pub fn policies(&self) -> &Policies {
        &self.policies
    }

    pub fn workload(&self, id: WorkloadId) -> Option<&Workload> {
        self.workloads.get(id.0)
    }

    /// The workload owning `ip` (IPv4-mapped IPv6 addresses are matched as IPv4).
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Workload> {
        self.by_ip
            .get(&ip.to_canonical())
            .and_then(|id| self.workload(*id))
    }

    /// Workloads on this agent's node (`workload.node == agent.node`), in file order.
    pub fn local_workloads(&self) -> impl Iterator<Item = &Workload> + '_ {
        self.local.iter().filter_map(|id| self.workload(*id))
    }

    pub fn service(&self, namespace: &str, name: &str) -> Option<&Service> {
        self.services
            .iter()
            .find(|s| s.namespace == namespace && s.name == name)
    }

    /// The service and port whose VIP:port is `dst` (the original destination of an outbound
    /// connection). IPv4-mapped IPv6 addresses are matched as IPv4.
    pub fn service_by_vip(&self, dst: SocketAddr) -> Option<(&Service, &ServicePort)> {
        let key = SocketAddr::new(dst.ip().to_canonical(), dst.port());
        let (s, p) = *self.by_vip.get(&key)?;
        let service = self.services.get(s)?;
        Some((service, service.ports.get(p)?))
    }
}

/// The `agent` block, defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
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
    /// Destination ports never captured, sorted.
    pub excluded_ports: Vec<u16>,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// Copy buffer per direction per connection.
    pub buffer_bytes: usize,
}

impl AgentConfig {
    /// Lowest and highest of the proxy's listener ports (outbound, inbound, tunnel): the range
    /// the eBPF programs reserve for the proxy (`mesh_common::Settings`).
    pub fn proxy_port_range(&self) -> (u16, u16) {
        let ports = [self.outbound_port, self.inbound_port, self.tunnel_port];
        let min = ports.iter().copied().min().unwrap_or(self.outbound_port);
        let max = ports.iter().copied().max().unwrap_or(self.outbound_port);
        (min, max)
    }
}

/// Index of a workload in [`Config::workloads`]; only valid for the snapshot it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkloadId(pub usize);

/// A pod (or any process group in its own netns) known to the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub id: WorkloadId,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// Canonical (IPv4-mapped addresses folded to IPv4), in file order, non-empty.
    pub ips: Vec<IpAddr>,
    pub node: String,
    /// Network namespace path; always set for local workloads.
    pub netns: Option<PathBuf>,
    pub labels: BTreeMap<String, String>,
    pub fail_mode: FailMode,
    pub unknown_destination: UnknownDestination,
    /// `node == agent.node`
    pub local: bool,
}

impl Workload {
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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum FailMode {
    /// Let traffic bypass the proxy.
    #[default]
    Open,
    /// Drop traffic.
    Closed,
}

/// What to do with outbound connections to a destination that is not a known service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum UnknownDestination {
    /// Connect to the original destination as is.
    #[default]
    Passthrough,
    /// Refuse the connection.
    Deny,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// Canonical, in file order, non-empty.
    pub vips: Vec<IpAddr>,
    /// Non-empty, distinct `port`s, in file order.
    pub ports: Vec<ServicePort>,
    /// How the endpoints were selected (kept for display and for later sources).
    pub selection: EndpointSelection,
}

impl Service {
    /// `namespace/name`
    pub fn qualified_name(&self) -> QualifiedName<'_> {
        QualifiedName(&self.namespace, &self.name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub port: u16,
    pub target_port: u16,
    pub name: Option<String>,
    /// Resolved endpoints, one per (endpoint IP, target port); a dual-stack workload
    /// contributes one endpoint per IP. Order: selection order, then IP order. May be empty
    /// (a selector that matches nothing).
    pub endpoints: Vec<Endpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Endpoint IP and the service port's target port.
    pub addr: SocketAddr,
    /// The workload owning the IP, if any (raw `addresses` that are a known workload's IP are
    /// attributed to that workload too).
    pub workload: Option<WorkloadId>,
    /// That workload's node; `None` for a raw address outside the mesh.
    pub node: Option<String>,
    /// The workload is on this agent's node (connect directly from its netns).
    pub local: bool,
}

/// The `endpoints` block of a service: exactly one way of choosing them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointSelection {
    /// Workloads of the service's namespace whose labels include all of these.
    Selector(BTreeMap<String, String>),
    /// Workloads of the service's namespace, by name.
    Workloads(Vec<String>),
    /// Raw IPs.
    Addresses(Vec<IpAddr>),
}

/// Reserved: authorization and rate-limit policies will live here. Today the `policies` block
/// accepts no field (an empty map or nothing).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Policies {}
