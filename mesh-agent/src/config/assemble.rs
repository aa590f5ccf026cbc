//! The one place a [`Config`] is put together from its parts, whatever the source: the
//! lookups the data plane reads (VIP, workload IP, workload endpoint, local workloads,
//! authorization policies per workload) are computed here, in time linear in the parts (the
//! authorization lookup: workloads x policies of their namespace).
//!
//! A source that changes little between snapshots (the Kubernetes source: one event, one or
//! two services) hands over the previous snapshot too, and what did not change is kept rather
//! than computed again: the workloads with their lookups as one shared [`Workloads`], the VIP
//! lookup when no service's frontend moved, and the endpoint lookup patched for the services
//! that changed (both lookups are [`ShardedMap`]s: a patch copies only the shards it writes).
//! A change is then visible in time of the change, not of the cluster.

use foldhash::{HashMap, HashMapExt, HashSet};
use smallvec::SmallVec;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use super::model::{Config, Node, Policies, Service, Workload, WorkloadId};
use super::settings::AgentConfig;
use super::sharded::{Patch, ShardedMap};

/// Above this many changed services, the endpoint lookup is built again rather than patched.
const PATCH_LIMIT: usize = 256;

/// The indices of the services with an endpoint address, ascending.
pub(super) type Owners = SmallVec<[usize; 2]>;

/// What a source hands over.
#[derive(Debug, Clone)]
pub struct Parts {
    pub agent: AgentConfig,
    pub workloads: Arc<Workloads>,
    pub services: Vec<Arc<Service>>,
    pub policies: Policies,
    pub nodes: Vec<Node>,
}

/// The workloads of a snapshot, in source order (`WorkloadId(i)` is the `i`-th), with the
/// lookups that depend on them alone. Shared between snapshots while the workloads are the
/// same.
#[derive(Debug, PartialEq, Eq)]
pub struct Workloads {
    pub(super) list: Vec<Arc<Workload>>,
    /// canonical workload IP -> workload
    pub(super) by_ip: HashMap<IpAddr, WorkloadId>,
    pub(super) local: Vec<WorkloadId>,
}

impl Workloads {
    /// `list` with its lookups. A workload is shared (`Arc`) with the source, which hands
    /// the unchanged ones over to the next table without copying them.
    pub fn new(list: Vec<Arc<Workload>>) -> Arc<Self> {
        let ids = (0..list.len()).map(WorkloadId);
        let by_ip = list
            .iter()
            .zip(ids.clone())
            .flat_map(|(w, id)| w.ips.iter().map(move |ip| (*ip, id)))
            .collect();
        let local = list
            .iter()
            .zip(ids)
            .filter(|(w, _)| w.local)
            .map(|(_, id)| id)
            .collect();
        Arc::new(Self { list, by_ip, local })
    }

    pub fn list(&self) -> &[Arc<Workload>] {
        &self.list
    }

    /// The workload owning `ip` (canonical).
    pub fn by_ip(&self, ip: IpAddr) -> Option<&Workload> {
        self.by_ip
            .get(&ip)
            .and_then(|id| self.list.get(id.0))
            .map(Arc::as_ref)
    }
}

impl Config {
    /// The snapshot of `parts`, lookups computed, reusing from `previous` (the source's last
    /// snapshot, if it keeps one) what its unchanged inputs allow. The first service with a
    /// VIP:port, and the first with a workload endpoint, own it in the lookups (sources
    /// refuse or order duplicates before).
    pub fn assemble(parts: Parts, previous: Option<&Config>) -> Config {
        let Parts {
            agent,
            workloads,
            services,
            policies,
            nodes,
        } = parts;
        let by_vip = match previous {
            Some(p) if same_frontends(&p.services, &services) => p.by_vip.clone(),
            _ => by_vip(&services),
        };
        let by_endpoint = previous
            .and_then(|p| patched_endpoints(p, &services))
            .unwrap_or_else(|| by_endpoint(&services));
        let authz_by_workload = authz_by_workload(&workloads, &policies);
        Config {
            agent,
            workloads,
            services,
            policies,
            nodes,
            by_vip,
            by_endpoint,
            authz_by_workload,
        }
    }
}

/// The same services at the same indices have the same VIPs and ports: the VIP lookup holds.
fn same_frontends(old: &[Arc<Service>], new: &[Arc<Service>]) -> bool {
    old.len() == new.len()
        && old.iter().zip(new).all(|(a, b)| {
            Arc::ptr_eq(a, b)
                || (a.vips == b.vips
                    && a.ports.len() == b.ports.len()
                    && a.ports.iter().zip(&b.ports).all(|(p, q)| p.port == q.port))
        })
}

fn by_vip(services: &[Arc<Service>]) -> ShardedMap<SocketAddr, (usize, usize)> {
    let mut by_vip = ShardedMap::default().patch();
    for (s, service) in services.iter().enumerate() {
        for vip in &service.vips {
            for (p, port) in service.ports.iter().enumerate() {
                by_vip
                    .shard(&SocketAddr::new(*vip, port.port))
                    .entry(SocketAddr::new(*vip, port.port))
                    .or_insert((s, p));
            }
        }
    }
    by_vip.done()
}

/// The distinct endpoint addresses of `service`.
fn endpoints(service: &Service) -> HashSet<SocketAddr> {
    service
        .ports
        .iter()
        .flat_map(|port| &port.endpoints)
        .map(|e| e.addr)
        .collect()
}

fn by_endpoint(services: &[Arc<Service>]) -> ShardedMap<SocketAddr, Owners> {
    let mut by_endpoint: Patch<SocketAddr, Owners> = ShardedMap::default().patch();
    for (s, service) in services.iter().enumerate() {
        let addrs = service.ports.iter().flat_map(|port| &port.endpoints);
        for addr in addrs.map(|e| e.addr) {
            // In index order: each list stays sorted, and a service already listed is last.
            let owners = by_endpoint.shard(&addr).entry(addr).or_default();
            if owners.last() != Some(&s) {
                owners.push(s);
            }
        }
    }
    by_endpoint.done()
}

/// The previous endpoint lookup with the services that changed taken out of the lists of
/// their old addresses and put into those of their new ones, when the services are the same
/// in number and few changed (`None`: build it again).
fn patched_endpoints(
    previous: &Config,
    services: &[Arc<Service>],
) -> Option<ShardedMap<SocketAddr, Owners>> {
    if previous.services.len() != services.len() {
        return None;
    }
    let changed: Vec<usize> = (0..services.len())
        .filter(|i| !Arc::ptr_eq(&previous.services[*i], &services[*i]))
        .collect();
    if changed.len() > PATCH_LIMIT {
        return None;
    }
    if changed.is_empty() {
        return Some(previous.by_endpoint.clone());
    }
    let mut by_endpoint = previous.by_endpoint.patch();
    for s in changed {
        let (old, new) = (endpoints(&previous.services[s]), endpoints(&services[s]));
        for addr in old.difference(&new) {
            let shard = by_endpoint.shard(addr);
            if let Some(owners) = shard.get_mut(addr) {
                owners.retain(|o| *o != s);
                if owners.is_empty() {
                    shard.remove(addr);
                }
            }
        }
        for addr in new.difference(&old) {
            let owners = by_endpoint.shard(addr).entry(*addr).or_default();
            if let Err(at) = owners.binary_search(&s) {
                owners.insert(at, s);
            }
        }
    }
    Some(by_endpoint.done())
}

/// Per workload, the indices of the authorization policies selecting it. Policies select
/// workloads of their own namespace only: indexed by namespace so that the lookup does not
/// compare every workload with every policy.
fn authz_by_workload(workloads: &Workloads, policies: &Policies) -> Vec<Vec<usize>> {
    let mut by_namespace: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, p) in policies.authorization.iter().enumerate() {
        by_namespace
            .entry(p.namespace.as_str())
            .or_default()
            .push(i);
    }
    if by_namespace.is_empty() {
        return Vec::new();
    }
    workloads
        .list
        .iter()
        .map(|w| {
            by_namespace
                .get(w.namespace.as_str())
                .into_iter()
                .flatten()
                .copied()
                .filter(|i| policies.authorization.get(*i).is_some_and(|p| p.selects(w)))
                .collect()
        })
        .collect()
}
