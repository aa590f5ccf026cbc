//! Endpoint picking with live state: which endpoint of a service port takes a new
//! connection, decided from the service's `TrafficPolicy` and what the agent has seen of each
//! endpoint (load, connect latency, failures, health).
//!
//! # Shape
//!
//! [`Balancers`] holds one [`ServiceBalancer`] per (service, service port) in an immutable
//! map behind an `ArcSwap`: the connection path reads it without a lock, and
//! [`Balancers::sync`] swaps in a new map on each config snapshot. A service port's balancer
//! is built on its first pick (most of a large cluster's services are never called from a
//! given node; see `slot`), or at once when it has subsets, an active health check or live
//! state to carry over. A service port whose
//! inputs (endpoints, policy, subset membership, this node's zone) are unchanged keeps its
//! balancer; a changed one gets a new picker (subsets, locality tiers, Maglev tables are
//! precomputed, so a pick does no allocation in the common case) that takes over the live
//! state: the port's counters and retry budget, and each endpoint's stats by address.
//!
//! A pick goes: circuit limits of the service (refuse at once, never queue) -> subset (a
//! caller route fixes it, else weighted among subsets with an available endpoint) ->
//! locality tier (this node, then this node's zone, then all: the narrowest with at least
//! `min_healthy_percent` available) -> the algorithm within the tier. *Available* means not
//! ejected, not marked unhealthy, not already tried by this connection, and under the
//! per-endpoint circuit limits. When nothing is ejected, unhealthy or tried and no
//! per-endpoint limit is set (the common case), every endpoint is available without looking;
//! otherwise the pick scans the port's endpoints once.
//!
//! The returned [`Pick`] counts a connect in flight until it reports [`Pick::connected`] (then
//! an [`ActiveGuard`] counts the connection until dropped) or [`Pick::failed`]; those outcomes
//! feed the latency estimate and outlier ejection.
//!
//! # Algorithms
//!
//! - round robin, random, weighted (by `Endpoint::weight`);
//! - least connections: power of two choices on active + pending connections;
//! - peak-EWMA, the default: power of two choices on `latency estimate x (active + pending +
//!   1)`. It needs no tuning and steers away from endpoints that are slow *or* busy: a slow
//!   endpoint's connections stay pending longer, and its estimate jumps to any higher
//!   latency at once (peak) and comes down only gradually. The estimate decays with
//!   τ = 10 s (an observation Δt old weighs `e^(-Δt/τ)`); an estimate not refreshed decays
//!   toward zero, so an endpoint once slow is tried again after a while. An endpoint never
//!   measured starts at 5 ms (`endpoint::INITIAL_ESTIMATE`), a little worse than a connect in
//!   a cluster, so a new endpoint ramps up instead of being flooded before it is measured;
//! - Maglev: consistent hashing on the caller's IP or identity (module `maglev`); a source keeps
//!   its endpoint while that one is available, and an unavailable one spills its sources
//!   onward in the table. Maglev **ignores locality**: stickiness is the point of choosing
//!   it, and tiers that widen and narrow with health would move sources around. Endpoint
//!   weights do not apply to it; among subsets, a source's subset is chosen by its hash too.
//!
//! # Outlier ejection, circuit limits, retry budget
//!
//! `consecutive_failures` connect failures (or resets before any reply) in a row eject an
//! endpoint for `base_ejection x 2^(ejections so far)`, at most `max_ejection`, unless more
//! than `max_ejected_percent` of the port's endpoints would be ejected at once (then it stays
//! in; its streak keeps counting). An ejection ends by itself: picks compare the deadline to
//! the clock. A success clears the streak. The retry budget is described in module `budget`.

mod budget;
mod clock;
mod endpoint;
mod maglev;
mod select;
mod service;
mod slot;
mod status;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Arc,
};

use arc_swap::ArcSwap;
use parking_lot::Mutex;

pub use budget::RetryBudgetStatus;
pub use service::{ActiveGuard, Pick, ServiceBalancer};
pub use status::{CircuitStatus, EndpointState, EndpointStatus, ServiceStatus};

use crate::{config::Config, tls::SpiffeId};
use slot::Slot;

/// Who is calling (for Maglev, caller routes, and the address family).
#[derive(Clone, Copy, Debug)]
pub struct Caller<'a> {
    pub ip: IpAddr,
    pub identity: Option<&'a SpiffeId>,
    pub labels: &'a BTreeMap<String, String>,
    /// The original destination was IPv4: prefer IPv4 endpoints (the other family serves
    /// only when the service port has no endpoint of this one).
    pub ipv4: bool,
}

/// Why [`ServiceBalancer::pick`] found no endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PickError {
    #[error("the service port has no endpoints")]
    NoEndpoints,
    #[error("no endpoint is available (ejected, unhealthy, at its limits or already tried)")]
    NoneAvailable,
    /// A service-wide circuit limit (`max_connections` or `max_pending`) is reached.
    #[error("circuit open: {0} reached")]
    CircuitOpen(&'static str),
}

/// Service name (`namespace/name`) -> its ports' slots, in file order. Shared keys and
/// values: a sync copies the map cheaply and replaces only what changed.
type Map = foldhash::HashMap<Arc<str>, Arc<[Arc<Slot>]>>;

/// Node-wide balancing state: one [`ServiceBalancer`] per (service, service port), kept
/// across config snapshots. Reads are lock-free (an `ArcSwap` of an immutable map).
#[derive(Default)]
pub struct Balancers {
    map: ArcSwap<Map>,
    /// What the map was last synced from; holding it also serializes [`Balancers::sync`]
    /// (each builds on the map the previous one stored).
    synced: Mutex<Synced>,
}

/// The services of the last sync, in the snapshot's order, with their names (the `Arc`s kept
/// here, so an address is not reused while it is listed), and this node's zone then.
#[derive(Default)]
struct Synced {
    services: Vec<(Arc<crate::config::Service>, Arc<str>)>,
    zone: Option<String>,
}

impl Balancers {
    pub fn new() -> Self {
        Self::default()
    }

    /// Brings the state in line with `config`: a new service port gets fresh state; a
    /// changed endpoint set or policy rebuilds its picker while each endpoint's live stats
    /// carry over by address; gone ones are dropped.
    ///
    /// A service handed over as the same shared value as at the last sync (a source that
    /// rebuilds only what changed does so), without subsets (whose members depend on the
    /// workloads' labels) and with this node's zone unchanged, has the same inputs: it is
    /// kept without a look, so a change of one service among tens of thousands costs about
    /// one service.
    pub fn sync(&self, config: &Config) {
        let mut synced = self.synced.lock();
        let current = self.map.load_full();
        let zone = select::local_zone(config).map(str::to_owned);
        let same_zone = synced.zone == zone;
        let zone_name: Option<Arc<str>> = zone.as_deref().map(Arc::from);
        // The last sync's services, taken one by one as they are found again: at the same
        // index (a source keeps the order), else by address (looked up once something moved).
        let mut old: Vec<Option<(Arc<crate::config::Service>, Arc<str>)>> =
            std::mem::take(&mut synced.services)
                .into_iter()
                .map(Some)
                .collect();
        let mut by_address: Option<foldhash::HashMap<usize, usize>> = None;
        let mut next: Option<Map> = None;
        let mut listed = Vec::with_capacity(config.services().len());
        // Services looked at again; with those not listed any more, the names whose ports
        // may have gone.
        let mut looked_at: Vec<Arc<str>> = Vec::new();
        for (i, service) in config.services().iter().enumerate() {
            if same_zone && service.traffic.subsets.is_empty() {
                let same = |j: &usize| {
                    old.get(*j)
                        .and_then(Option::as_ref)
                        .is_some_and(|(s, _)| Arc::ptr_eq(s, service))
                };
                let found = Some(i).filter(same).or_else(|| {
                    let index = by_address.get_or_insert_with(|| {
                        old.iter()
                            .enumerate()
                            .filter_map(|(j, e)| Some((Arc::as_ptr(&e.as_ref()?.0) as usize, j)))
                            .collect()
                    });
                    index
                        .get(&(Arc::as_ptr(service) as usize))
                        .copied()
                        .filter(same)
                });
                if let Some(entry) = found.and_then(|j| old.get_mut(j)?.take()) {
                    listed.push(entry);
                    continue;
                }
            }
            let name: Arc<str> = Arc::from(service.qualified_name().to_string());
            let previous_ports = current.get(&name).map(|p| &p[..]).unwrap_or_default();
            let ports = (0..service.ports.len())
                .zip(&service.ports)
                .map(|(index, port)| {
                    let previous = previous_ports
                        .iter()
                        .find(|s| s.port() == port.port)
                        .and_then(|s| s.existing());
                    let now = previous.is_some()
                        || !service.traffic.subsets.is_empty()
                        || service.traffic.health_check.is_some();
                    if !now {
                        return Arc::new(Slot::deferred(service.clone(), index, zone_name.clone()));
                    }
                    let spec = select::Spec::new(config, service, port);
                    Arc::new(Slot::built(match previous {
                        Some(previous) if previous.spec == spec => previous.clone(),
                        _ => Arc::new(ServiceBalancer::build(spec, previous.map(Arc::as_ref))),
                    }))
                })
                .collect();
            next.get_or_insert_with(|| (*current).clone())
                .insert(name.clone(), ports);
            looked_at.push(name.clone());
            listed.push((service.clone(), name));
        }
        // What is left was replaced by a new value (its name was looked at above) or is gone.
        let fresh: std::collections::HashSet<&str> = looked_at.iter().map(|n| &**n).collect();
        let mut gone = Vec::new();
        for (_, name) in old.into_iter().flatten() {
            if !fresh.contains(&*name) {
                next.get_or_insert_with(|| (*current).clone()).remove(&name);
                gone.push(name);
            }
        }
        synced.services = listed;
        synced.zone = zone;
        let Some(next) = next else {
            // Every service kept as it was: the map stands.
            return;
        };
        // Service ports that are gone: their endpoints' late outcomes change nothing.
        for name in looked_at.iter().chain(&gone) {
            let existing = current.get(name).into_iter().flat_map(|p| p.iter());
            for balancer in existing.filter_map(|slot| slot.existing()) {
                let kept = next
                    .get(name)
                    .is_some_and(|ports| ports.iter().any(|b| b.port() == balancer.port()));
                if !kept {
                    balancer.retire_missing(&HashMap::new());
                }
            }
        }
        self.map.store(Arc::new(next));
    }

    /// The balancer of `service` (`namespace/name`) port `port` (the service port, not the
    /// target port).
    /// Built on first use (see `slot`).
    pub fn get(&self, service: &str, port: u16) -> Option<Arc<ServiceBalancer>> {
        self.map
            .load()
            .get(service)?
            .iter()
            .find(|s| s.port() == port)?
            .balancer()
            .cloned()
    }

    /// Every service port's balancer that exists (for the active health checker, which walks
    /// them each round so it sees what a reload added: ports with a health check are built
    /// at once).
    pub fn all(&self) -> Vec<Arc<ServiceBalancer>> {
        self.map
            .load()
            .values()
            .flat_map(|ports| ports.iter())
            .filter_map(|slot| slot.existing().cloned())
            .collect()
    }

    /// Every service port, by service name then port.
    pub fn status(&self) -> Vec<ServiceStatus> {
        let map = self.map.load();
        let mut all: Vec<ServiceStatus> = map
            .values()
            .flat_map(|ports| ports.iter())
            .filter_map(|slot| slot.status())
            .collect();
        all.sort_by(|a, b| (&a.service, a.port).cmp(&(&b.service, b.port)));
        all
    }
}
