//! A service port's place in the balancer map: its balancer, built on first use.
//!
//! A node's pods call a handful of the cluster's services. A balancer (endpoint stats,
//! locality views, a Maglev table) for each of the tens of thousands they never call was most
//! of the balancers' memory, about 1.8 KB per service port, and of a sync's time; a slot keeps
//! the service value it comes from (shared with the snapshot) until the first pick builds the
//! balancer. A port whose balancer must exist before any pick (subsets, whose members depend
//! on the snapshot's workloads; an active health check, which runs without picks; live state
//! to carry over) is built at once.

use std::sync::{Arc, OnceLock};

use super::select::Spec;
use super::service::ServiceBalancer;
use super::status::ServiceStatus;
use crate::config::Service;

pub(super) struct Slot {
    port: u16,
    /// What a deferred balancer is built from: the service, the port's index in it, and this
    /// node's zone.
    source: Option<(Arc<Service>, usize, Option<Arc<str>>)>,
    built: OnceLock<Arc<ServiceBalancer>>,
}

impl Slot {
    pub(super) fn built(balancer: Arc<ServiceBalancer>) -> Self {
        Self {
            port: balancer.port(),
            source: None,
            built: OnceLock::from(balancer),
        }
    }

    /// A slot for port `index` of `service`, which has no subsets (its spec needs no
    /// workloads).
    pub(super) fn deferred(service: Arc<Service>, index: usize, zone: Option<Arc<str>>) -> Self {
        Self {
            port: service.ports.get(index).map_or(0, |p| p.port),
            source: Some((service, index, zone)),
            built: OnceLock::new(),
        }
    }

    pub(super) fn port(&self) -> u16 {
        self.port
    }

    /// The balancer, built now if it was deferred.
    pub(super) fn balancer(&self) -> Option<&Arc<ServiceBalancer>> {
        if let Some(built) = self.built.get() {
            return Some(built);
        }
        let balancer = Arc::new(ServiceBalancer::build(self.spec()?, None));
        Some(self.built.get_or_init(|| balancer))
    }

    /// The balancer if it exists (live state to carry over or to check).
    pub(super) fn existing(&self) -> Option<&Arc<ServiceBalancer>> {
        self.built.get()
    }

    /// The port's status; a deferred one's as its balancer would start (nothing measured),
    /// without keeping it.
    pub(super) fn status(&self) -> Option<ServiceStatus> {
        match self.built.get() {
            Some(built) => Some(built.status()),
            None => Some(ServiceBalancer::build(self.spec()?, None).status()),
        }
    }

    fn spec(&self) -> Option<Spec> {
        let (service, index, zone) = self.source.as_ref()?;
        Some(Spec::plain(
            service,
            service.ports.get(*index)?,
            zone.as_deref(),
        ))
    }
}
