//! The immutable part of a picker, built once per config change of a service port: the
//! endpoints of each address family, grouped by subset, each group in locality tiers (or a
//! Maglev table); and the algorithms that choose within a tier.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
};

use super::{endpoint::EndpointStats, maglev::Table};
use crate::config::{
    Config, Endpoint, LoadBalancer, Service, ServicePort, TrafficPolicy, Workload,
    traffic::defaults::ZONE_LABEL,
};

/// What a service port's picker is built from: a reload that leaves it equal keeps the
/// picker as it is.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Spec {
    /// `namespace/name`
    pub(super) service: String,
    pub(super) port: u16,
    pub(super) policy: Arc<TrafficPolicy>,
    pub(super) endpoints: Vec<Endpoint>,
    /// Per subset of the policy, the indices of its endpoints.
    pub(super) subsets: Vec<Vec<u32>>,
    /// The zone of this agent's node.
    pub(super) local_zone: Option<String>,
}

impl Spec {
    pub(super) fn new(config: &Config, service: &Service, port: &ServicePort) -> Self {
        let workload = |e: &Endpoint| config.endpoint_workload(e);
        let mut spec = Self::plain(service, port, local_zone(config));
        spec.subsets = service
            .traffic
            .subsets
            .iter()
            .map(|subset| {
                (0u32..)
                    .zip(&port.endpoints)
                    .filter(|(_, e)| {
                        subset.labels.iter().all(|(k, v)| {
                            workload(e).is_some_and(|w: &Workload| w.labels.get(k) == Some(v))
                        })
                    })
                    .map(|(i, _)| i)
                    .collect()
            })
            .collect();
        spec
    }

    /// The spec of a port whose service has no subsets (nothing in it depends on the
    /// workloads), in zone `local_zone`.
    pub(super) fn plain(service: &Service, port: &ServicePort, local_zone: Option<&str>) -> Self {
        Self {
            service: service.qualified_name().to_string(),
            port: port.port,
            policy: service.traffic.clone(),
            endpoints: port.endpoints.clone(),
            subsets: Vec::new(),
            local_zone: local_zone.map(str::to_owned),
        }
    }
}

/// The zone label of this agent's node, if the node is listed.
pub(super) fn local_zone(config: &Config) -> Option<&str> {
    let node = &config.agent().startup.node;
    config
        .nodes
        .iter()
        .find(|n| &n.name == node)
        .and_then(|n| n.labels.get(ZONE_LABEL))
        .map(String::as_str)
}

/// The endpoints of one address family (or of both, for a single-stack service).
pub(super) struct View {
    /// One per subset of the policy, in order; a single one of all endpoints without subsets.
    pub(super) groups: Vec<Group>,
}

pub(super) struct Group {
    pub(super) members: Vec<u32>,
    /// Locality tiers, narrowest first, each including the previous; the last is all
    /// members. Empty for Maglev, which uses `table`.
    pub(super) tiers: Vec<Tier>,
    pub(super) table: Option<Table>,
}

pub(super) struct Tier {
    pub(super) members: Vec<u32>,
    /// Running sums of the members' weights (weighted algorithm only).
    pub(super) cumulative: Vec<u64>,
}

/// The views of `spec` and, indexed by "the caller dialled IPv4", which view serves it: a
/// dual-stack service port serves each family from its own endpoints; a single-stack one
/// serves both families from all.
pub(super) fn views(spec: &Spec) -> (Vec<View>, [usize; 2]) {
    let has = |v4: bool| spec.endpoints.iter().any(|e| e.addr.is_ipv4() == v4);
    if has(true) && has(false) {
        let v6 = view(spec, |e| !e.addr.is_ipv4());
        let v4 = view(spec, |e| e.addr.is_ipv4());
        (vec![v6, v4], [0, 1])
    } else {
        (vec![view(spec, |_| true)], [0, 0])
    }
}

fn view(spec: &Spec, family: impl Fn(&Endpoint) -> bool) -> View {
    let in_family = |i: &u32| endpoint(&spec.endpoints, *i).is_some_and(&family);
    let groups = if spec.policy.subsets.is_empty() {
        let all: Vec<u32> = (0u32..).take(spec.endpoints.len()).collect();
        vec![group(spec, all.into_iter().filter(in_family).collect())]
    } else {
        spec.subsets
            .iter()
            .map(|members| group(spec, members.iter().copied().filter(in_family).collect()))
            .collect()
    };
    View { groups }
}

fn group(spec: &Spec, members: Vec<u32>) -> Group {
    let algorithm = spec.policy.load_balancer;
    if let LoadBalancer::Maglev { .. } = algorithm {
        let keyed: Vec<(u32, SocketAddr)> = members
            .iter()
            .filter_map(|i| endpoint(&spec.endpoints, *i).map(|e| (*i, e.addr)))
            .collect();
        let table = Some(Table::build(&keyed));
        return Group {
            members,
            tiers: Vec::new(),
            table,
        };
    }
    let tier = |filter: &dyn Fn(&Endpoint) -> bool| -> Vec<u32> {
        members
            .iter()
            .copied()
            .filter(|i| endpoint(&spec.endpoints, *i).is_some_and(filter))
            .collect()
    };
    let mut tiers: Vec<Vec<u32>> = Vec::new();
    if spec.policy.locality.enabled {
        let zone = spec.local_zone.as_deref();
        let narrower: [&dyn Fn(&Endpoint) -> bool; 2] = [&|e| e.local, &|e| {
            e.local || (zone.is_some() && e.zone.as_deref() == zone)
        }];
        for filter in narrower {
            let members = tier(filter);
            if !members.is_empty() && tiers.last().is_none_or(|last| last.len() < members.len()) {
                tiers.push(members);
            }
        }
    }
    if tiers.last().is_none_or(|last| last.len() < members.len()) {
        tiers.push(members.clone());
    }
    let weighted = algorithm == LoadBalancer::Weighted;
    let tiers = tiers
        .into_iter()
        .map(|members| Tier {
            cumulative: if weighted {
                cumulative(&spec.endpoints, &members)
            } else {
                Vec::new()
            },
            members,
        })
        .collect();
    Group {
        members,
        tiers,
        table: None,
    }
}

pub(super) fn endpoint(endpoints: &[Endpoint], i: u32) -> Option<&Endpoint> {
    endpoints.get(i as usize)
}

fn cumulative(endpoints: &[Endpoint], members: &[u32]) -> Vec<u64> {
    members
        .iter()
        .scan(0u64, |sum, i| {
            *sum += endpoint(endpoints, *i).map_or(0, |e| u64::from(e.weight));
            Some(*sum)
        })
        .collect()
}

/// Which endpoints may take a new connection now: all of them (nothing is ejected, unhealthy
/// or tried, and no per-endpoint limit is set: the common case, decided without a scan), or
/// those marked in a mask of the service port's endpoints.
pub(super) struct Availability(pub(super) Option<Vec<bool>>);

impl Availability {
    pub(super) fn get(&self, i: u32) -> bool {
        match &self.0 {
            None => true,
            Some(mask) => mask.get(i as usize).copied().unwrap_or(false),
        }
    }

    pub(super) fn count(&self, members: &[u32]) -> usize {
        match &self.0 {
            None => members.len(),
            Some(_) => members.iter().filter(|i| self.get(**i)).count(),
        }
    }
}

/// The algorithms that choose within a tier.
pub(super) struct Chooser<'a> {
    pub(super) algorithm: LoadBalancer,
    pub(super) endpoints: &'a [Endpoint],
    pub(super) stats: &'a [Arc<EndpointStats>],
    pub(super) cursor: &'a AtomicUsize,
    pub(super) now: u64,
}

impl Chooser<'_> {
    /// One of `tier`'s members that `available` accepts (all are, when it has no mask).
    pub(super) fn choose(&self, tier: &Tier, available: &Availability) -> Option<u32> {
        match &available.0 {
            None => self.among(&tier.members, &tier.cumulative),
            Some(_) => {
                let members: Vec<u32> = tier
                    .members
                    .iter()
                    .copied()
                    .filter(|i| available.get(*i))
                    .collect();
                let cumulative = if tier.cumulative.is_empty() {
                    Vec::new()
                } else {
                    cumulative(self.endpoints, &members)
                };
                self.among(&members, &cumulative)
            }
        }
    }

    fn among(&self, members: &[u32], cumulative: &[u64]) -> Option<u32> {
        let len = members.len();
        if len == 0 {
            return None;
        }
        let at = |position: usize| members.get(position).copied();
        match self.algorithm {
            LoadBalancer::RoundRobin => at(self.cursor.fetch_add(1, Relaxed) % len),
            LoadBalancer::Random => at(fastrand::usize(..len)),
            LoadBalancer::Weighted => match cumulative.last() {
                Some(&total) if total > 0 => {
                    let r = fastrand::u64(..total);
                    at(cumulative.partition_point(|&sum| sum <= r))
                }
                // Every weight 0: uniformly.
                _ => at(fastrand::usize(..len)),
            },
            LoadBalancer::LeastConnections => self.two_choices(members, |s| f64::from(s.load())),
            LoadBalancer::PeakEwma => self.two_choices(members, |s| s.cost(self.now)),
            // Maglev chooses from its table, never from a tier.
            LoadBalancer::Maglev { .. } => at(0),
        }
    }

    /// Power of two choices: two distinct members at random, the one of lower cost (the
    /// first on a tie). Near the best of all at the cost of two reads, and never herds every
    /// new connection onto the single least loaded endpoint.
    fn two_choices(&self, members: &[u32], cost: impl Fn(&EndpointStats) -> f64) -> Option<u32> {
        let len = members.len();
        if len == 1 {
            return members.first().copied();
        }
        let a = fastrand::usize(..len);
        let mut b = fastrand::usize(..len - 1);
        if b >= a {
            b += 1;
        }
        let (a, b) = (members.get(a).copied()?, members.get(b).copied()?);
        let cost_of = |i: u32| self.stats.get(i as usize).map_or(f64::MAX, |s| cost(s));
        Some(if cost_of(b) < cost_of(a) { b } else { a })
    }
}
