//! The stores' pieces -> one `Config`, through the config's own assembly: workloads from the
//! pods of enrolled namespaces, services with the endpoints of their slices, the policies,
//! and this node's labels. Linear in the pieces; nothing is parsed here.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};

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

/// Builds the snapshot of `stores` under `agent`.
pub fn build(stores: &Stores, agent: &AgentConfig, sandboxes: &mut Sandboxes) -> Built {
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

    let mut slices: HashMap<(&str, &str), Vec<&SlicePiece>> = HashMap::new();
    for (key, piece) in stores.pieces(ObjectKind::EndpointSlice) {
        if let Piece::EndpointSlice(slice) = piece {
            slices
                .entry((key.namespace.as_str(), slice.service.as_str()))
                .or_default()
                .push(slice);
        }
    }
    let (traffic, conflicts) = traffic_policies(stores);

    let node = agent.startup.node.as_str();
    let mut services = Vec::new();
    for (_, piece) in stores.pieces(ObjectKind::Service) {
        let Piece::Service(s) = piece else { continue };
        let key = (s.namespace.as_str(), s.name.as_str());
        let of_service = slices.get(&key).map(Vec::as_slice).unwrap_or_default();
        let policy = traffic.get(&key).map(|p| (*p).clone()).unwrap_or_default();
        services.push(std::sync::Arc::new(service(
            s, of_service, &by_ip, node, policy,
        )));
    }

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

/// The traffic policy of each Service `(namespace, name)`: of two naming the same Service,
/// the older (creation time, then name) wins; the others are returned as conflicts.
fn traffic_policies(stores: &Stores) -> (HashMap<(&str, &str), &TrafficPolicy>, Vec<ObjectKey>) {
    let mut winners: HashMap<(&str, &str), (&ObjectKey, &PolicyPiece, &TrafficPolicy)> =
        HashMap::new();
    let mut conflicts = Vec::new();
    for (key, piece) in stores.pieces(ObjectKind::TrafficPolicy) {
        let Piece::Policy(p) = piece else { continue };
        let PolicyObject::Traffic { service, policy } = &p.object else {
            continue;
        };
        let target = (key.namespace.as_str(), service.as_str());
        match winners.get(&target) {
            Some((held, holder, _)) if (&holder.created, *held) <= (&p.created, key) => {
                conflicts.push(key.clone());
            }
            Some((held, _, _)) => {
                conflicts.push((*held).clone());
                winners.insert(target, (key, p, policy));
            }
            None => {
                winners.insert(target, (key, p, policy));
            }
        }
    }
    conflicts.sort();
    let winners = winners.into_iter().map(|(k, (_, _, p))| (k, p)).collect();
    (winners, conflicts)
}

/// One Service with its endpoints: each ready address x the slice's port for each service
/// port (by name; a numeric target port also serves slices that do not list the port).
fn service(
    s: &ServicePiece,
    slices: &[&SlicePiece],
    by_ip: &HashMap<IpAddr, (WorkloadId, &str)>,
    node: &str,
    traffic: TrafficPolicy,
) -> Service {
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
                        let endpoint_node = e
                            .node
                            .clone()
                            .or_else(|| owner.map(|(_, n)| (*n).to_owned()));
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
    Service {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        vips: s.vips.clone(),
        ports,
        selection: EndpointSelection::Selector(s.selector.clone()),
        traffic,
    }
}
