//! The resolved configuration snapshot: plain values, validated, with the lookups the data
//! plane needs precomputed. Built only by `Config::assemble`, for every source (the file's
//! [`Config::from_yaml_str`] / [`Config::load`], the Kubernetes source); shared as
//! `Arc<Config>` and never mutated. The `agent` block's types are in `settings`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::assemble::{Owners, Workloads};
use super::settings::{AccessLog, AgentConfig};
use super::sharded::ShardedMap;
use crate::tls::SpiffeId;

/// One immutable configuration snapshot. The data fields are public for reading; a `Config`
/// can only be built by this module (the lookups are private), so it is always validated.
/// Serialized (the lookups left out) for `/config_dump`, under the YAML's names.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub agent: AgentConfig,
    /// In source order; `WorkloadId(i)` is the `i`-th. Shared between snapshots while the
    /// workloads are the same.
    #[serde(serialize_with = "workload_list")]
    pub(super) workloads: Arc<Workloads>,
    /// In file order. Shared between snapshots: a source that rebuilds only what changed
    /// hands the others over as they were (and the balancers see them unchanged by pointer).
    pub services: Vec<Arc<Service>>,
    pub policies: Policies,
    /// Nodes with labels (the zone, for locality); in file order. Optional.
    pub nodes: Vec<Node>,
    /// (canonical VIP, service port) -> (service index, port index)
    #[serde(skip)]
    pub(super) by_vip: ShardedMap<SocketAddr, (usize, usize)>,
    /// An endpoint address -> the indices of the services that have it, ascending: the first
    /// is what the server side of a connection to a workload names as its service.
    #[serde(skip)]
    pub(super) by_endpoint: ShardedMap<SocketAddr, Owners>,
    /// `WorkloadId(i)` -> indices into `policies.authorization` of the policies selecting
    /// workload `i`, in file order (empty when there are no such policies).
    #[serde(skip)]
    pub(super) authz_by_workload: Vec<Vec<usize>>,
}

fn workload_list<S: serde::Serializer>(w: &Arc<Workloads>, s: S) -> Result<S::Ok, S::Error> {
    w.list().serialize(s)
}

/// Two snapshots are equal when their data are: the lookups are computed from it. Parts
/// shared by pointer compare at once.
impl PartialEq for Config {
    fn eq(&self, other: &Self) -> bool {
        self.agent == other.agent
            && (Arc::ptr_eq(&self.workloads, &other.workloads)
                || self.workloads.list == other.workloads.list)
            && self.services.len() == other.services.len()
            && self
                .services
                .iter()
                .zip(&other.services)
                .all(|(a, b)| Arc::ptr_eq(a, b) || a == b)
            && self.policies == other.policies
            && self.nodes == other.nodes
    }
}

impl Config {
    pub fn agent(&self) -> &AgentConfig {
        &self.agent
    }

    /// All workloads, in file order; `WorkloadId(i)` is `workloads()[i]`.
    pub fn workloads(&self) -> &[Arc<Workload>] {
        self.workloads.list()
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
        self.workloads.list.get(id.0).map(Arc::as_ref)
    }

    /// The first service (in file order) with the workload endpoint `addr`: on the server
    /// side, which knows only the pod address a connection came to, the service it was for.
    pub fn service_by_endpoint(&self, addr: SocketAddr) -> Option<&Service> {
        let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
        self.workload_by_ip(addr.ip())?;
        self.by_endpoint
            .get(&addr)
            .and_then(|owners| self.services.get(*owners.first()?))
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
        self.workloads.by_ip(ip.to_canonical())
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
        self.workloads
            .local
            .iter()
            .filter_map(|id| self.workload(*id))
    }

    /// The authorization policies that select `workload` (same namespace, selector included
    /// in its labels), in file order. Precomputed per workload of this snapshot; a workload
    /// from elsewhere (another snapshot, built by hand) is matched on the fly.
    pub fn authorization_policies_for<'a>(
        &'a self,
        workload: &'a Workload,
    ) -> impl Iterator<Item = &'a super::authorization::AuthorizationPolicy> + 'a {
        // The selection depends only on the namespace and the labels. A workload is found in
        // this snapshot by its first IP (IPs are unique among workloads).
        let precomputed = workload
            .ips
            .first()
            .and_then(|ip| self.workloads.by_ip.get(ip))
            .filter(|id| {
                self.workload(**id).is_some_and(|w| {
                    std::ptr::eq(w, workload)
                        || (w.namespace == workload.namespace && w.labels == workload.labels)
                })
            })
            .and_then(|id| self.authz_by_workload.get(id.0));
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

/// Index of a workload in [`Config::workloads`]; only valid for the snapshot it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkloadId(pub usize);

/// A pod (or any process group in its own netns) known to the mesh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
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
    /// destination (a source that sets them per workload overrides them).
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
    /// Shared: most services of a cluster have the default one.
    pub traffic: Arc<super::traffic::TrafficPolicy>,
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
    /// Shared with the source's own copy (a Kubernetes Service's selector).
    Selector(Arc<BTreeMap<String, String>>),
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
