//! The stores' pieces -> one `Config`, through the config's own assembly: workloads from the
//! pods of enrolled namespaces, services with the endpoints of their slices, the policies,
//! and this node's labels. Linear in the pieces; nothing is parsed here.
//!
//! A Service is the bulk of a large cluster (30,000 of them against a few thousand pods), and
//! one event changes one or two: the [`BuildCache`] keeps what each Service became, with the
//! pieces it was made from, and a Service whose pieces are the same ones (by pointer: the
//! stores replace a piece only when it changes) is handed over as the same `Arc`, which the
//! balancers also recognize.

use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use super::kinds::ObjectKind;
use super::locate::Sandboxes;
use super::store::Stores;
use super::translate::{ObjectKey, Piece, PolicyPiece, ServicePiece, SlicePiece, TargetPort};
use crate::config::{
    AgentConfig, Config, Endpoint, EndpointSelection, Node, Parts, Policies, PolicyObject, Service,
    ServicePort, TrafficPolicy, WorkloadId,
};

/// The weight of every endpoint (the API has no per-endpoint weight).
const WEIGHT: u32 = 1;

/// A rebuilt snapshot and what it could not settle.
pub struct Built {
    pub config: Config,
    /// Local pods left out because their sandbox is not found yet.
    pub unresolved: usize,
    /// TrafficPolicies refused because an older one names the same Service.
    pub conflicts: Vec<ObjectKey>,
}

/// What the last build made of each Service, and from which pieces.
#[derive(Debug, Default)]
pub struct BuildCache {
    /// By the address of the Service's piece (held in [`Made`], so not reused meanwhile).
    services: HashMap<usize, Made>,
}

#[derive(Debug)]
struct Made {
    service: Arc<Piece>,
    slices: Vec<Arc<Piece>>,
    traffic: Option<Arc<Piece>>,
    /// Set when an endpoint's node came from its workload (a slice without `nodeName`): the
    /// pods' and namespaces' change counts it was made at, which it is only valid with.
    workloads: Option<(u64, u64)>,
    built: Arc<Service>,
}

impl Made {
    fn still(
        &self,
        service: &Arc<Piece>,
        slices: &[&Arc<Piece>],
        traffic: Option<&Arc<Piece>>,
        workloads: (u64, u64),
    ) -> bool {
        Arc::ptr_eq(&self.service, service)
            && self.slices.len() == slices.len()
            && self
                .slices
                .iter()
                .zip(slices)
                .all(|(a, b)| Arc::ptr_eq(a, b))
            && match (&self.traffic, traffic) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            }
            && self.workloads.is_none_or(|at| at == workloads)
    }
}

/// Builds the snapshot of `stores` under `agent`, reusing from `cache` the Services whose
/// pieces did not change.
pub fn build(
    stores: &Stores,
    agent: &AgentConfig,
    sandboxes: &mut Sandboxes,
    cache: &mut BuildCache,
) -> Built {
    let enrolled: HashSet<&str> = stores
        .pieces(ObjectKind::Namespace)
        .filter(|(_, p)| matches!(p, Piece::Namespace { enrolled: true }))
        .map(|(k, _)| k.name.as_str())
        .collect();
    let mut workloads = Vec::new();
    let mut unresolved = 0;
    for (key, piece) in stores.pieces(ObjectKind::Pod) {
        let Piece::Pod(pod) = piece else { continue };
        if !enrolled.contains(key.namespace.as_str()) {
            continue;
        }
        let mut workload = pod.workload.clone();
        if workload.local {
            match sandboxes.netns(&pod.uid) {
                Some(netns) => workload.netns = Some(netns),
                None => {
                    unresolved += 1;
                    continue;
                }
            }
        }
        workloads.push(workload);
    }
    let mut by_ip: HashMap<IpAddr, (WorkloadId, &str)> = HashMap::new();
    for (i, w) in workloads.iter().enumerate() {
        for ip in &w.ips {
            by_ip.entry(*ip).or_insert((WorkloadId(i), w.node.as_str()));
        }
    }

    let mut slices: HashMap<(&str, &str), Vec<&Arc<Piece>>> = HashMap::new();
    for (key, piece) in stores.shared(ObjectKind::EndpointSlice) {
        if let Piece::EndpointSlice(slice) = &**piece {
            slices
                .entry((key.namespace.as_str(), slice.service.as_str()))
                .or_default()
                .push(piece);
        }
    }
    let (traffic, conflicts) = traffic_policies(stores);

    let node = agent.startup.node.as_str();
    let workload_changes = (
        stores.changes(ObjectKind::Pod),
        stores.changes(ObjectKind::Namespace),
    );
    let mut made = HashMap::with_capacity(cache.services.len());
    let mut services = Vec::new();
    for (_, shared) in stores.shared(ObjectKind::Service) {
        let Piece::Service(s) = &**shared else {
            continue;
        };
        let target = (s.namespace.as_str(), s.name.as_str());
        let of_service = slices.get(&target).map(Vec::as_slice).unwrap_or_default();
        let policy = traffic.get(&target).copied();
        let address = Arc::as_ptr(shared) as usize;
        let entry = match cache.services.remove(&address) {
            Some(entry) if entry.still(shared, of_service, policy, workload_changes) => entry,
            _ => {
                let pieces: Vec<&SlicePiece> = of_service
                    .iter()
                    .filter_map(|p| match &***p {
                        Piece::EndpointSlice(slice) => Some(slice),
                        _ => None,
                    })
                    .collect();
                let traffic_policy = policy
                    .and_then(|p| match &**p {
                        Piece::Policy(p) => match &p.object {
                            PolicyObject::Traffic { policy, .. } => Some(policy.clone()),
                            _ => None,
                        },
                        _ => None,
                    })
                    .unwrap_or_default();
                let (built, from_workloads) = service(s, &pieces, &by_ip, node, traffic_policy);
                Made {
                    service: shared.clone(),
                    slices: of_service.iter().map(|p| (*p).clone()).collect(),
                    traffic: policy.cloned(),
                    workloads: from_workloads.then_some(workload_changes),
                    built: Arc::new(built),
                }
            }
        };
        services.push(entry.built.clone());
        made.insert(address, entry);
    }
    cache.services = made;

    let mut policies = Policies::default();
    for kind in [
        ObjectKind::AuthorizationPolicy,
        ObjectKind::RateLimit,
        ObjectKind::EgressLimit,
    ] {
        for (_, piece) in stores.pieces(kind) {
            let Piece::Policy(p) = piece else { continue };
            match &p.object {
                PolicyObject::Authorization(a) => policies.authorization.push(a.clone()),
                PolicyObject::RateLimit(r) => policies.rate_limits.push(r.clone()),
                PolicyObject::EgressLimit(e) => policies.egress_limits.push(e.clone()),
                PolicyObject::Traffic { .. } => {}
            }
        }
    }
    let nodes = stores
        .pieces(ObjectKind::Node)
        .filter_map(|(key, piece)| match piece {
            Piece::Node { labels } if key.name == node => Some(Node {
                name: key.name.clone(),
                labels: labels.clone(),
            }),
            _ => None,
        })
        .collect();
    let config = Config::assemble(Parts {
        agent: agent.clone(),
        workloads,
        services,
        policies,
        nodes,
    });
    Built {
        config,
        unresolved,
        conflicts,
    }
}

/// A piece per Service `(namespace, name)`.
type ByService<'a> = HashMap<(&'a str, &'a str), &'a Arc<Piece>>;

/// The TrafficPolicy piece of each Service `(namespace, name)`: of two naming the same
/// Service, the older (creation time, then name) wins; the others are returned as conflicts.
fn traffic_policies(stores: &Stores) -> (ByService<'_>, Vec<ObjectKey>) {
    let mut winners: HashMap<(&str, &str), (&ObjectKey, &PolicyPiece, &Arc<Piece>)> =
        HashMap::new();
    let mut conflicts = Vec::new();
    for (key, shared) in stores.shared(ObjectKind::TrafficPolicy) {
        let Piece::Policy(p) = &**shared else {
            continue;
        };
        let PolicyObject::Traffic { service, .. } = &p.object else {
            continue;
        };
        let target = (key.namespace.as_str(), service.as_str());
        match winners.get(&target) {
            Some((held, holder, _)) if (&holder.created, *held) <= (&p.created, key) => {
                conflicts.push(key.clone());
            }
            Some((held, _, _)) => {
                conflicts.push((*held).clone());
                winners.insert(target, (key, p, shared));
            }
            None => {
                winners.insert(target, (key, p, shared));
            }
        }
    }
    conflicts.sort();
    let winners = winners.into_iter().map(|(k, (_, _, p))| (k, p)).collect();
    (winners, conflicts)
}

/// One Service with its endpoints: each ready address x the slice's port for each service
/// port (by name; a numeric target port also serves slices that do not list the port). With
/// it, whether an endpoint's node came from its workload (the slice did not say).
fn service(
    s: &ServicePiece,
    slices: &[&SlicePiece],
    by_ip: &HashMap<IpAddr, (WorkloadId, &str)>,
    node: &str,
    traffic: TrafficPolicy,
) -> (Service, bool) {
    let mut from_workloads = false;
    let ports = s
        .ports
        .iter()
        .map(|p| {
            let mut endpoints: Vec<Endpoint> = Vec::new();
            // An address in two slices (while the controller moves it) is one endpoint.
            let mut seen: HashSet<SocketAddr> = HashSet::new();
            let mut resolved = None;
            for slice in slices {
                let listed = slice
                    .ports
                    .iter()
                    .find(|(name, _)| *name == p.name)
                    .map(|(_, number)| *number);
                let target = match (&p.target, listed) {
                    (_, Some(number)) => number,
                    (TargetPort::Number(number), None) => *number,
                    (TargetPort::Name(_), None) => continue,
                };
                resolved.get_or_insert(target);
                for e in &slice.endpoints {
                    for ip in &e.ips {
                        if !seen.insert(SocketAddr::new(*ip, target)) {
                            continue;
                        }
                        let owner = by_ip.get(ip);
                        let endpoint_node = e.node.clone().or_else(|| {
                            from_workloads |= owner.is_some();
                            owner.map(|(_, n)| (*n).to_owned())
                        });
                        endpoints.push(Endpoint {
                            addr: SocketAddr::new(*ip, target),
                            local: endpoint_node.as_deref() == Some(node),
                            node: endpoint_node,
                            weight: WEIGHT,
                            zone: e.zone.clone(),
                        });
                    }
                }
            }
            let target_port = match &p.target {
                TargetPort::Number(number) => *number,
                // A name: what the endpoints resolve it to (0 while none does).
                TargetPort::Name(_) => resolved.unwrap_or(0),
            };
            ServicePort {
                port: p.port,
                target_port,
                name: p.name.clone(),
                endpoints,
            }
        })
        .collect();
    let service = Service {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        vips: s.vips.clone(),
        ports,
        selection: EndpointSelection::Selector(s.selector.clone()),
        traffic,
    };
    (service, from_workloads)
}
