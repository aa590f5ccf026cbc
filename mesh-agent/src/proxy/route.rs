//! Where an outbound connection goes, decided from its original destination and the config
//! snapshot alone (no I/O, so it is unit-tested directly).

use std::net::SocketAddr;

use crate::{
    balance::Balancer,
    config::{Config, Endpoint, UnknownDestination, Workload},
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// A service VIP:port, balanced to one of its endpoints.
    Service {
        service: String,
        endpoint: SocketAddr,
    },
    /// A known pod's own IP.
    Pod { workload: String, addr: SocketAddr },
    /// Not in the mesh; the source workload lets it through unchanged.
    Passthrough { addr: SocketAddr },
    /// Refused, with the reason for the log.
    Deny { reason: String },
}

pub fn outbound(
    config: &Config,
    source: &Workload,
    dst: SocketAddr,
    balancer: &dyn Balancer,
) -> Route {
    if let Some((service, port)) = config.service_by_vip(dst) {
        let name = service.qualified_name().to_string();
        // Prefer endpoints of the destination's address family (an IPv4 VIP is reached over
        // IPv4); a single-stack endpoint of the other family still serves.
        let same_family: Vec<&Endpoint> = port
            .endpoints
            .iter()
            .filter(|e| e.addr.is_ipv4() == dst.is_ipv4())
            .collect();
        let candidates: Vec<&Endpoint> = if same_family.is_empty() {
            port.endpoints.iter().collect()
        } else {
            same_family
        };
        let key = format!("{name}:{}", port.port);
        return match balancer.pick(&key, &candidates) {
            Some(endpoint) => Route::Service {
                service: name,
                endpoint: endpoint.addr,
            },
            None => Route::Deny {
                reason: format!("service {name} port {} has no endpoints", port.port),
            },
        };
    }
    if let Some(workload) = config.workload_by_ip(dst.ip()) {
        return Route::Pod {
            workload: workload.qualified_name().to_string(),
            addr: dst,
        };
    }
    match source.unknown_destination {
        UnknownDestination::Passthrough => Route::Passthrough { addr: dst },
        UnknownDestination::Deny => Route::Deny {
            reason: format!(
                "{dst} is not a known service or pod and {} denies unknown destinations",
                source.qualified_name()
            ),
        },
    }
}
