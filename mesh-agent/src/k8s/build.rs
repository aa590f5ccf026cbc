//! The stores' pieces -> one `Config`, through the config's own assembly: workloads from the
//! pods of enrolled namespaces, services with the endpoints of their slices, the policies,
//! and this node's labels. Nothing is parsed here.
//!
//! A Service is the bulk of a large cluster (30,000 of them against a few thousand pods), and
//! one event changes one or two: the [`BuildCache`] keeps what each Service became and builds
//! again only those the stores saw touched (itself, a slice, its TrafficPolicy), handing the
//! others over as the same `Arc`, which the assembly and the balancers recognize. The
//! workloads are kept as one shared table while no pod or namespace changed, and the last
//! snapshot is handed to the assembly, which patches its lookups.

use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;

use super::kinds::ObjectKind;
use super::locate::Sandboxes;
use super::store::Stores;
use super::translate::{ObjectKey, Piece, PolicyPiece, ServicePiece, SlicePiece, TargetPort};
use crate::config::{
    AgentConfig, Config, Endpoint, EndpointSelection, Node, Parts, Policies, PolicyObject, Service,
    ServicePort, TrafficPolicy, Workload, Workloads,
};

/// The weight of every endpoint (the API has no per-endpoint weight).
const WEIGHT: u32 = 1;

/// A rebuilt snapshot and what it could not settle.
pub struct Built {
    pub config: Arc<Config>,
    /// Local pods left out because their sandbox is not found yet.
    pub unresolved: usize,
    /// TrafficPolicies refused because an older one names the same Service.
    pub conflicts: Vec<ObjectKey>,
}

/// What the last build made, to make the next from.
#[derive(Debug, Default)]
pub struct BuildCache {
    /// Each Service as built, in the order of `keys`.
    services: Vec<Arc<Service>>,
    /// Their `namespace/name`s, ascending (the stores' order).
    keys: Vec<ObjectKey>,
    /// Services with an endpoint whose node came from its workload (a slice without
    /// `nodeName`): built again when the workloads change.
    from_workloads: BTreeSet<ObjectKey>,
    workloads: Option<KeptWorkloads>,
    /// The node the services were built for (their endpoints' `local`); `None`: nothing built.
    node: Option<String>,
    /// The last snapshot, whose lookups the next one patches.
    previous: Option<Arc<Config>>,
    /// The policy of every Service without a TrafficPolicy, one shared value.
    default_traffic: Arc<TrafficPolicy>,
}

#[derive(Debug)]
struct KeptWorkloads {
    table: Arc<Workloads>,
    /// The pods' and namespaces' change counts it was made at.
    at: (u64, u64),
    /// Local pods it left out (looked for again at the next build).
    unresolved: usize,
}

/// Builds the snapshot of `stores` under `agent`, from what `cache` kept of the last one:
/// only the Services touched since are built again.
pub fn build(
    stores: &mut Stores,
    agent: &AgentConfig,
    sandboxes: &mut Sandboxes,
    cache: &mut BuildCache,
) -> Built {
    let touched = stores.take_touched();
    let at = (
        stores.changes(ObjectKind::Pod),
        stores.changes(ObjectKind::Namespace),
    );
    let kept = cache
        .workloads
        .as_ref()
        .filter(|k| k.at == at && k.unresolved == 0)
        .map(|k| k.table.clone());
    let workloads_changed = kept.is_none();
    let (workloads, unresolved) = match kept {
        Some(table) => (table, 0),
        None => workloads(stores, sandboxes),
    };
    cache.workloads = Some(KeptWorkloads {
        table: workloads.clone(),
        at,
        unresolved,
    });

    let node = agent.startup.node.as_str();
    let (traffic, conflicts) = traffic_policies(stores);
    let redo: Vec<ObjectKey> = if touched.all || cache.node.as_deref() != Some(node) {
        cache.services.clear();
        cache.keys.clear();
        cache.from_workloads.clear();
        stores
            .shared(ObjectKind::Service)
            .map(|(key, _)| key.clone())
            .collect()
    } else {
        let mut redo = touched.services;
        if workloads_changed {
            redo.extend(cache.from_workloads.iter().cloned());
        }
        redo.into_iter().collect()
    };
    cache.node = Some(node.to_owned());
    for key in redo {
        let made = match stores.get(ObjectKind::Service, &key).map(|p| &**p) {
            Some(Piece::Service(s)) => {
                let slices: Vec<&SlicePiece> = stores
                    .slices_of(&key)
                    .filter_map(|p| match &**p {
                        Piece::EndpointSlice(slice) => Some(slice),
                        _ => None,
                    })
                    .collect();
                let policy = traffic
                    .get(&(key.namespace.as_str(), key.name.as_str()))
                    .and_then(|p| match &p.object {
                        PolicyObject::Traffic { policy, .. } => Some(policy.clone()),
                        _ => None,
                    })
                    .unwrap_or_else(|| cache.default_traffic.clone());
                Some(service(s, &slices, &workloads, node, policy))
            }
            _ => None,
        };
        match (made, cache.keys.binary_search(&key)) {
            (Some((built, from_workloads)), at) => {
                if from_workloads {
                    cache.from_workloads.insert(key.clone());
                } else {
                    cache.from_workloads.remove(&key);
                }
                match at {
                    Ok(i) => cache.services[i] = Arc::new(built),
                    Err(i) => {
                        cache.keys.insert(i, key);
                        cache.services.insert(i, Arc::new(built));
                    }
                }
            }
            (None, at) => {
                cache.from_workloads.remove(&key);
                if let Ok(i) = at {
                    cache.keys.remove(i);
                    cache.services.remove(i);
                }
            }
        }
    }
    let services = cache.services.clone();

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
    let config = Arc::new(Config::assemble(
        Parts {
            agent: agent.clone(),
            workloads,
            services,
            policies,
            nodes,
        },
        cache.previous.as_deref(),
    ));
    cache.previous = Some(config.clone());
    Built {
        config,
        unresolved,
        conflicts,
    }
}

/// The workloads: pods of enrolled namespaces, local ones with their sandbox's netns (those
/// not found yet left out and counted).
fn workloads(stores: &Stores, sandboxes: &mut Sandboxes) -> (Arc<Workloads>, usize) {
    let enrolled: HashSet<&str> = stores
        .pieces(ObjectKind::Namespace)
        .filter(|(_, p)| matches!(p, Piece::Namespace { enrolled: true }))
        .map(|(k, _)| k.name.as_str())
        .collect();
    let mut list = Vec::new();
    let mut unresolved = 0;
    for (key, piece) in stores.pieces(ObjectKind::Pod) {
        let Piece::Pod(pod) = piece else { continue };
        if !enrolled.contains(key.namespace.as_str()) {
            continue;
        }
        let workload = if pod.workload.local {
            let Some(netns) = sandboxes.netns(&pod.uid) else {
                unresolved += 1;
                continue;
            };
            Arc::new(Workload {
                netns: Some(netns),
                ..(*pod.workload).clone()
            })
        } else {
            pod.workload.clone()
        };
        list.push(workload);
    }
    (Workloads::new(list), unresolved)
}

/// A TrafficPolicy per Service `(namespace, name)`.
type ByService<'a> = HashMap<(&'a str, &'a str), &'a PolicyPiece>;

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
    let winners = winners.into_iter().map(|(k, (_, p, _))| (k, p)).collect();
    (winners, conflicts)
}

/// One Service with its endpoints: each ready address x the slice's port for each service
/// port (by name; a numeric target port also serves slices that do not list the port). With
/// it, whether an endpoint's node came from its workload (the slice did not say).
fn service(
    s: &ServicePiece,
    slices: &[&SlicePiece],
    workloads: &Workloads,
    node: &str,
    traffic: Arc<TrafficPolicy>,
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
                        let endpoint_node = e.node.clone().or_else(|| {
                            let owner = workloads.by_ip(*ip);
                            from_workloads |= owner.is_some();
                            owner.map(|w| w.node.clone())
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
