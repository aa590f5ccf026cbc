//! Validates the `services` list: names, VIPs, ports, the endpoints each one resolves to
//! (with their weights and zones), and the traffic policy (in [`super::traffic`]).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};

use super::{Cx, Result};
use crate::config::model::{
    Endpoint, EndpointSelection, Node, QualifiedName, Service, ServicePort, Workload, WorkloadId,
};
use crate::config::raw::{RawEndpoints, RawService, S};
use crate::config::settings::defaults;
use crate::names::Kind;

impl Cx<'_> {
    pub(super) fn services(
        &self,
        raw: &[S<RawService>],
        workloads: &[Workload],
        by_ip: &HashMap<IpAddr, WorkloadId>,
        nodes: &[Node],
    ) -> Result<Vec<Service>> {
        let zones: HashMap<&str, &str> = nodes
            .iter()
            .filter_map(|n| Some((n.name.as_str(), n.zone()?)))
            .collect();
        let index = WorkloadIndex::new(workloads);
        let mut out: Vec<Service> = Vec::with_capacity(raw.len());
        let mut names: HashMap<(String, String), u64> = HashMap::new();
        let mut vip_owner: HashMap<IpAddr, String> = HashMap::new();
        for (i, item) in raw.iter().enumerate() {
            let s: &RawService = &item.value;
            let base = format!("services[{i}]");
            let name = self.name(&s.name, &format!("{base}.name"), Kind::Service)?;
            let namespace = self.opt_name(
                &s.namespace,
                &base,
                "namespace",
                Kind::Namespace,
                defaults::NAMESPACE,
            )?;
            let qualified = QualifiedName(&namespace, &name).to_string();
            if let Some(line) = names.get(&(namespace.clone(), name.clone())) {
                return Err(self.err(
                    s.name.referenced,
                    format!("{base}.name"),
                    format!("service {qualified} is already defined at line {line}"),
                ));
            }
            names.insert((namespace.clone(), name.clone()), s.name.referenced.line());

            if s.vips.value.is_empty() {
                return Err(self.err(
                    s.vips.referenced,
                    format!("{base}.vips"),
                    "must list at least one VIP",
                ));
            }
            let mut vips = Vec::with_capacity(s.vips.value.len());
            for (j, raw_vip) in s.vips.value.iter().enumerate() {
                let path = format!("{base}.vips[{j}]");
                let vip = self.unicast_ip(raw_vip, &path)?;
                if let Some(owner) = vip_owner.get(&vip) {
                    return Err(self.err(
                        raw_vip.referenced,
                        path,
                        format!("{vip} is already the VIP of service {owner}"),
                    ));
                }
                if let Some(w) = by_ip.get(&vip).and_then(|id| workloads.get(id.0)) {
                    return Err(self.err(
                        raw_vip.referenced,
                        path,
                        format!(
                            "{vip} is an IP of workload {}: it cannot be a VIP",
                            w.qualified_name()
                        ),
                    ));
                }
                vip_owner.insert(vip, qualified.clone());
                vips.push(vip);
            }

            if s.ports.value.is_empty() {
                return Err(self.err(
                    s.ports.referenced,
                    format!("{base}.ports"),
                    "must list at least one port",
                ));
            }
            let mut ports: Vec<ServicePort> = Vec::with_capacity(s.ports.value.len());
            let mut port_lines: HashMap<u16, u64> = HashMap::new();
            let mut name_lines: HashMap<String, u64> = HashMap::new();
            for (j, raw_port) in s.ports.value.iter().enumerate() {
                let p = &raw_port.value;
                let pbase = format!("{base}.ports[{j}]");
                let port = self.port(&p.port, &format!("{pbase}.port"))?;
                if let Some(line) = port_lines.get(&port) {
                    return Err(self.err(
                        p.port.referenced,
                        format!("{pbase}.port"),
                        format!(
                            "port {port} is already defined for service {qualified} at line {line}"
                        ),
                    ));
                }
                port_lines.insert(port, p.port.referenced.line());
                let target_port = match &p.target_port {
                    Some(t) => self.port(t, &format!("{pbase}.targetPort"))?,
                    None => port,
                };
                let port_name = match &p.name {
                    Some(n) => {
                        let path = format!("{pbase}.name");
                        let n_value = self.name(n, &path, Kind::Port)?;
                        if let Some(line) = name_lines.get(&n_value) {
                            return Err(self.err(
                                n.referenced,
                                path,
                                format!(
                                    "port name {n_value} is already used in service {qualified} \
                                     at line {line}"
                                ),
                            ));
                        }
                        name_lines.insert(n_value.clone(), n.referenced.line());
                        Some(n_value)
                    }
                    None => None,
                };
                ports.push(ServicePort {
                    port,
                    target_port,
                    name: port_name,
                    endpoints: Vec::new(),
                });
            }

            let (selection, mut targets) =
                self.endpoints(&s.endpoints, &base, &namespace, &index, by_ip)?;
            self.weights(&s.endpoints.value, &base, &mut targets)?;
            for port in &mut ports {
                port.endpoints = targets
                    .iter()
                    .map(|t| Endpoint {
                        addr: SocketAddr::new(t.ip, port.target_port),
                        node: t.node.clone(),
                        local: t.local,
                        weight: t.weight,
                        zone: t
                            .node
                            .as_deref()
                            .and_then(|n| zones.get(n))
                            .map(|z| (*z).to_owned()),
                    })
                    .collect();
            }
            let traffic = self.traffic_policy(&s.traffic_policy, &base)?;

            out.push(Service {
                name,
                namespace,
                vips,
                ports,
                selection,
                traffic: std::sync::Arc::new(traffic),
            });
        }
        Ok(out)
    }

    /// The endpoint selection and the IPs it resolves to (port-independent).
    fn endpoints<'w>(
        &self,
        e: &S<RawEndpoints>,
        base: &str,
        namespace: &str,
        index: &WorkloadIndex<'w>,
        by_ip: &HashMap<IpAddr, WorkloadId>,
    ) -> Result<(EndpointSelection, Vec<Target<'w>>)> {
        let workloads = index.workloads;
        let base = format!("{base}.endpoints");
        let RawEndpoints {
            selector,
            workloads: names,
            addresses,
            weights: _,
        } = &e.value;
        let set: Vec<&str> = [
            selector.as_ref().map(|_| "selector"),
            names.as_ref().map(|_| "workloads"),
            addresses.as_ref().map(|_| "addresses"),
        ]
        .into_iter()
        .flatten()
        .collect();
        if set.len() != 1 {
            let found = if set.is_empty() {
                "none".to_owned()
            } else {
                set.join(" and ")
            };
            return Err(self.err(
                e.referenced,
                base,
                format!(
                    "exactly one of selector, workloads, addresses is required (found {found})"
                ),
            ));
        }

        let of_workload = |w: &'w Workload| -> Vec<Target<'w>> {
            w.ips
                .iter()
                .map(|ip| Target {
                    ip: *ip,
                    workload: Some(w),
                    node: Some(w.node.clone()),
                    local: w.local,
                    weight: DEFAULT_WEIGHT,
                })
                .collect()
        };

        if let Some(sel) = selector {
            if sel.value.is_empty() {
                return Err(self.err(
                    sel.referenced,
                    format!("{base}.selector"),
                    "must not be empty (list workloads or addresses explicitly instead)",
                ));
            }
            let targets = index
                .selected(namespace, &sel.value)
                .flat_map(of_workload)
                .collect();
            return Ok((
                EndpointSelection::Selector(std::sync::Arc::new(sel.value.clone())),
                targets,
            ));
        }

        if let Some(list) = names {
            if list.value.is_empty() {
                return Err(self.err(
                    list.referenced,
                    format!("{base}.workloads"),
                    "must list at least one workload",
                ));
            }
            let mut chosen: Vec<String> = Vec::with_capacity(list.value.len());
            let mut targets = Vec::new();
            for (k, n) in list.value.iter().enumerate() {
                let path = format!("{base}.workloads[{k}]");
                if chosen.contains(&n.value) {
                    return Err(self.err(
                        n.referenced,
                        path,
                        format!("workload {} is listed twice", n.value),
                    ));
                }
                let Some(w) = index.named(namespace, &n.value) else {
                    return Err(self.err(
                        n.referenced,
                        path,
                        format!(
                            "no workload {} (endpoints are workloads of the service's namespace)",
                            QualifiedName(namespace, &n.value)
                        ),
                    ));
                };
                chosen.push(n.value.clone());
                targets.extend(of_workload(w));
            }
            return Ok((EndpointSelection::Workloads(chosen), targets));
        }

        let Some(list) = addresses else {
            return Err(self.err(e.referenced, base, "no endpoints"));
        };
        if list.value.is_empty() {
            return Err(self.err(
                list.referenced,
                format!("{base}.addresses"),
                "must list at least one address",
            ));
        }
        let mut ips: Vec<IpAddr> = Vec::with_capacity(list.value.len());
        let mut targets = Vec::new();
        for (k, a) in list.value.iter().enumerate() {
            let path = format!("{base}.addresses[{k}]");
            let ip = self.unicast_ip(a, &path)?;
            if ips.contains(&ip) {
                return Err(self.err(a.referenced, path, format!("{ip} is listed twice")));
            }
            ips.push(ip);
            let owner = by_ip.get(&ip).and_then(|id| workloads.get(id.0));
            targets.push(Target {
                ip,
                workload: owner,
                node: owner.map(|w| w.node.clone()),
                local: owner.is_some_and(|w| w.local),
                weight: DEFAULT_WEIGHT,
            });
        }
        Ok((EndpointSelection::Addresses(ips), targets))
    }

    /// `endpoints.weights`: each key names an endpoint of the service (a workload it selects,
    /// or one of its `addresses`), whose every IP gets the weight.
    fn weights(&self, e: &RawEndpoints, base: &str, targets: &mut [Target<'_>]) -> Result<()> {
        let base = format!("{base}.endpoints");
        let message = "must not be empty (omit it: every endpoint then weighs 1)";
        let Some((weights, at)) = self.block(&e.weights, &base, "weights", message)? else {
            return Ok(());
        };
        if weights.is_empty() {
            return Err(self.err(at, format!("{base}.weights"), message));
        }
        let by_address = e.addresses.is_some();
        for (key, raw) in weights {
            let path = format!("{base}.weights.{key}");
            let weight = self.ranged(raw, &path, 1, MAX_ENDPOINT_WEIGHT, "")?;
            let mut matched = false;
            for t in targets.iter_mut() {
                let hit = if by_address {
                    key.parse::<IpAddr>()
                        .is_ok_and(|ip| ip.to_canonical() == t.ip)
                } else {
                    t.workload.is_some_and(|w| w.name == *key)
                };
                if hit {
                    t.weight = weight;
                    matched = true;
                }
            }
            if !matched {
                let what = if by_address {
                    "one of its addresses"
                } else {
                    "a workload its endpoints select"
                };
                return Err(self.err(
                    raw.referenced,
                    path,
                    format!("`{key}` is not an endpoint of this service ({what})"),
                ));
            }
        }
        Ok(())
    }
}

/// The weight of an endpoint `weights` does not name.
const DEFAULT_WEIGHT: u32 = 1;
/// Upper bound of an endpoint's weight (as of a subset's).
const MAX_ENDPOINT_WEIGHT: u32 = 10_000;

/// One resolved endpoint IP, before the target port is known.
struct Target<'w> {
    ip: IpAddr,
    workload: Option<&'w Workload>,
    node: Option<String>,
    local: bool,
    weight: u32,
}

/// The workloads by name and by label, so that resolving every service's endpoints costs
/// about the size of what they select rather than services x workloads (30,000 services over
/// 5,000 workloads would be 150 million label comparisons).
struct WorkloadIndex<'w> {
    workloads: &'w [Workload],
    by_name: HashMap<(&'w str, &'w str), &'w Workload>,
    /// (namespace, label key, label value) -> the workloads with it, in file order.
    by_label: HashMap<(&'w str, &'w str, &'w str), Vec<&'w Workload>>,
}

impl<'w> WorkloadIndex<'w> {
    fn new(workloads: &'w [Workload]) -> Self {
        let mut by_name = HashMap::with_capacity(workloads.len());
        let mut by_label: HashMap<_, Vec<&Workload>> = HashMap::new();
        for w in workloads {
            by_name.insert((w.namespace.as_str(), w.name.as_str()), w);
            for (key, value) in &w.labels {
                by_label
                    .entry((w.namespace.as_str(), key.as_str(), value.as_str()))
                    .or_default()
                    .push(w);
            }
        }
        Self {
            workloads,
            by_name,
            by_label,
        }
    }

    fn named(&self, namespace: &str, name: &str) -> Option<&'w Workload> {
        self.by_name.get(&(namespace, name)).copied()
    }

    /// The workloads of `namespace` whose labels include every pair of `selector` (not
    /// empty), in file order: the shortest list of one pair, checked for the others.
    fn selected<'s>(
        &'s self,
        namespace: &'s str,
        selector: &'s BTreeMap<String, String>,
    ) -> impl Iterator<Item = &'w Workload> + 's {
        let shortest = selector
            .iter()
            .map(|(k, v)| {
                self.by_label
                    .get(&(namespace, k.as_str(), v.as_str()))
                    .map_or(&[][..], Vec::as_slice)
            })
            .min_by_key(|list| list.len())
            .unwrap_or(&[]);
        shortest
            .iter()
            .copied()
            .filter(move |w| selector.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
    }
}
