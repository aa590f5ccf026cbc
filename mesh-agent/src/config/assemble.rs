//! The one place a [`Config`] is put together from its parts, whatever the source: the
//! lookups the data plane reads (VIP, workload IP, workload endpoint, local workloads,
//! authorization policies per workload) are computed here, in time linear in the parts (the
//! authorization lookup: workloads x policies of their namespace).

use foldhash::{HashMap, HashMapExt};
use std::net::SocketAddr;
use std::sync::Arc;

use super::model::{Config, Node, Policies, Service, Workload, WorkloadId};
use super::settings::AgentConfig;

/// What a source hands over. `workloads[i].id` is set to `WorkloadId(i)` here; endpoints'
/// `workload` must already use those indices.
#[derive(Debug, Clone)]
pub struct Parts {
    pub agent: AgentConfig,
    pub workloads: Vec<Workload>,
    pub services: Vec<Arc<Service>>,
    pub policies: Policies,
    pub nodes: Vec<Node>,
}

impl Config {
    /// The snapshot of `parts`, lookups computed. The first service with a VIP:port, and the
    /// first with a workload endpoint, own it in the lookups (sources refuse or order
    /// duplicates before).
    pub fn assemble(parts: Parts) -> Config {
        let Parts {
            agent,
            mut workloads,
            services,
            policies,
            nodes,
        } = parts;
        for (i, w) in workloads.iter_mut().enumerate() {
            w.id = WorkloadId(i);
        }
        let by_ip: HashMap<std::net::IpAddr, WorkloadId> = workloads
            .iter()
            .flat_map(|w| w.ips.iter().map(|ip| (*ip, w.id)))
            .collect();
        let local = workloads.iter().filter(|w| w.local).map(|w| w.id).collect();
        let mut by_vip = HashMap::with_capacity(services.len());
        for (s, service) in services.iter().enumerate() {
            for vip in &service.vips {
                for (p, port) in service.ports.iter().enumerate() {
                    by_vip
                        .entry(SocketAddr::new(*vip, port.port))
                        .or_insert((s, p));
                }
            }
        }
        let mut by_endpoint = HashMap::with_capacity(services.len());
        for (s, service) in services.iter().enumerate() {
            let workload_endpoints = service
                .ports
                .iter()
                .flat_map(|port| &port.endpoints)
                .filter(|e| by_ip.contains_key(&e.addr.ip()));
            for endpoint in workload_endpoints {
                by_endpoint.entry(endpoint.addr).or_insert(s);
            }
        }
        // Policies select workloads of their own namespace only: index them by namespace so
        // that the lookup does not compare every workload with every policy.
        let mut authz_by_namespace: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, p) in policies.authorization.iter().enumerate() {
            authz_by_namespace
                .entry(p.namespace.as_str())
                .or_default()
                .push(i);
        }
        let authz_by_workload = workloads
            .iter()
            .map(|w| {
                authz_by_namespace
                    .get(w.namespace.as_str())
                    .into_iter()
                    .flatten()
                    .copied()
                    .filter(|i| policies.authorization.get(*i).is_some_and(|p| p.selects(w)))
                    .collect()
            })
            .collect();
        Config {
            agent,
            workloads,
            services,
            policies,
            nodes,
            by_vip,
            by_ip,
            by_endpoint,
            local,
            authz_by_workload,
        }
    }
}
