//! `RawConfig` (as written, with positions) -> `Config` (plain, checked, resolved).
//!
//! Stops at the first error, which names the file, the line and column, and the field path.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde_saphyr::Location;

use super::error::ConfigError;
use super::model::{
    AgentConfig, AuthorizationPolicy, AuthorizationRule, Cidr, Config, Endpoint, EndpointSelection,
    Policies, QualifiedName, RuleSource, Service, ServicePort, Workload, WorkloadId, defaults,
};
use super::raw::{
    Present, RawAgent, RawAuthorizationPolicy, RawConfig, RawEndpoints, RawFrom, RawPolicies,
    RawRule, RawService, RawWorkload, S,
};

type Result<T> = std::result::Result<T, ConfigError>;

pub(super) fn validate(
    raw: RawConfig,
    file: &str,
    default_node: impl FnOnce() -> String,
) -> Result<Config> {
    let cx = Cx { file };
    let agent = cx.agent(&raw.agent.unwrap_or_default(), default_node)?;
    let workloads = cx.workloads(raw.workloads.as_deref().unwrap_or_default(), &agent)?;
    let by_ip: HashMap<IpAddr, WorkloadId> = workloads
        .iter()
        .flat_map(|w| w.ips.iter().map(|ip| (*ip, w.id)))
        .collect();
    let local = workloads.iter().filter(|w| w.local).map(|w| w.id).collect();
    let services = cx.services(
        raw.services.as_deref().unwrap_or_default(),
        &workloads,
        &by_ip,
    )?;
    let mut by_vip = HashMap::new();
    for (s, service) in services.iter().enumerate() {
        for vip in &service.vips {
            for (p, port) in service.ports.iter().enumerate() {
                by_vip.insert(SocketAddr::new(*vip, port.port), (s, p));
            }
        }
    }
    let policies = cx.policies(&raw.policies.unwrap_or_default())?;
    let authz_by_workload = workloads
        .iter()
        .map(|w| {
            policies
                .authorization
                .iter()
                .enumerate()
                .filter(|(_, p)| p.selects(w))
                .map(|(i, _)| i)
                .collect()
        })
        .collect();
    Ok(Config {
        agent,
        workloads,
        services,
        policies,
        by_vip,
        by_ip,
        local,
        authz_by_workload,
    })
}

struct Cx<'a> {
    file: &'a str,
}

impl Cx<'_> {
    fn err(
        &self,
        at: Location,
        path: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_owned(),
            line: at.line(),
            column: at.column(),
            path: path.into(),
            message: message.into(),
        }
    }

    // ---- agent ------------------------------------------------------------------------------

    fn agent(&self, a: &RawAgent, default_node: impl FnOnce() -> String) -> Result<AgentConfig> {
        let node = match &a.node {
            Some(n) => self.dns_name(n, "agent.node")?,
            None => default_node(),
        };
        let cgroup = a
            .cgroup
            .as_ref()
            .map(|c| self.abs_path(c, "agent.cgroup"))
            .transpose()?;
        let bpf_name = match &a.bpf_name {
            Some(b) => self.pin_name(b, "agent.bpfName")?,
            None => defaults::BPF_NAME.to_owned(),
        };
        let port_or = |field: &Option<S<u64>>, path: &str, default: u16| match field {
            Some(p) => self.port(p, path),
            None => Ok(default),
        };
        let outbound_port = port_or(
            &a.outbound_port,
            "agent.outboundPort",
            defaults::OUTBOUND_PORT,
        )?;
        let inbound_port = port_or(&a.inbound_port, "agent.inboundPort", defaults::INBOUND_PORT)?;
        let tunnel_port = port_or(&a.tunnel_port, "agent.tunnelPort", defaults::TUNNEL_PORT)?;
        let admin_addr = match &a.admin_addr {
            Some(s) => self.admin_addr(s)?,
            None => defaults::ADMIN_ADDR,
        };

        // The listeners all live in the node netns: no two may share a port.
        let listeners = [
            (
                "agent.outboundPort",
                outbound_port,
                a.outbound_port.as_ref().map(|s| s.referenced),
            ),
            (
                "agent.inboundPort",
                inbound_port,
                a.inbound_port.as_ref().map(|s| s.referenced),
            ),
            (
                "agent.tunnelPort",
                tunnel_port,
                a.tunnel_port.as_ref().map(|s| s.referenced),
            ),
            (
                "agent.adminAddr",
                admin_addr.port(),
                a.admin_addr.as_ref().map(|s| s.referenced),
            ),
        ];
        for (j, (path_j, port_j, at_j)) in listeners.iter().enumerate() {
            for (path_i, port_i, at_i) in &listeners[..j] {
                if port_i != port_j {
                    continue;
                }
                // Point at whichever of the two was written in the file (defaults never
                // collide with each other).
                let (path, other, at) = match (at_j, at_i) {
                    (Some(at), _) => (path_j, path_i, *at),
                    (None, Some(at)) => (path_i, path_j, *at),
                    (None, None) => (path_j, path_i, Location::UNKNOWN),
                };
                return Err(self.err(
                    at,
                    *path,
                    format!("port {port_j} is already used by {other}"),
                ));
            }
        }

        let proxy_mark = match &a.proxy_mark {
            Some(m) if m.value == 0 => {
                return Err(self.err(m.referenced, "agent.proxyMark", "must be non-zero"));
            }
            Some(m) => u32::try_from(m.value).map_err(|_| {
                self.err(
                    m.referenced,
                    "agent.proxyMark",
                    format!("{:#x} does not fit in 32 bits", m.value),
                )
            })?,
            None => defaults::PROXY_MARK,
        };

        let mut excluded_ports = Vec::new();
        for (i, p) in a.excluded_ports.iter().flatten().enumerate() {
            let path = format!("agent.excludedPorts[{i}]");
            let port = self.port(p, &path)?;
            if excluded_ports.contains(&port) {
                return Err(self.err(p.referenced, path, format!("port {port} is listed twice")));
            }
            excluded_ports.push(port);
        }
        excluded_ports.sort_unstable();

        let mut excluded_cidrs: Vec<Cidr> = Vec::new();
        for (i, c) in a.excluded_cidrs.iter().flatten().enumerate() {
            let path = format!("agent.excludedCidrs[{i}]");
            let cidr = parse_cidr(&c.value)
                .map_err(|reason| self.err(c.referenced, path.as_str(), reason))?;
            if excluded_cidrs.contains(&cidr) {
                return Err(self.err(c.referenced, path, format!("{cidr} is listed twice")));
            }
            excluded_cidrs.push(cidr);
        }

        let millis = |field: &Option<S<u64>>, path: &str, default: Duration| match field {
            Some(ms) if ms.value == 0 => Err(self.err(ms.referenced, path, "must be at least 1")),
            Some(ms) => Ok(Duration::from_millis(ms.value)),
            None => Ok(default),
        };
        let connect_timeout = millis(
            &a.connect_timeout_ms,
            "agent.connectTimeoutMs",
            defaults::CONNECT_TIMEOUT,
        )?;
        let idle_timeout = millis(
            &a.idle_timeout_ms,
            "agent.idleTimeoutMs",
            defaults::IDLE_TIMEOUT,
        )?;

        let buffer_bytes = match &a.buffer_bytes {
            Some(b) => usize::try_from(b.value)
                .ok()
                .filter(|n| (1..=defaults::MAX_BUFFER_BYTES).contains(n))
                .ok_or_else(|| {
                    self.err(
                        b.referenced,
                        "agent.bufferBytes",
                        format!(
                            "{} is out of range 1..={}",
                            b.value,
                            defaults::MAX_BUFFER_BYTES
                        ),
                    )
                })?,
            None => defaults::BUFFER_BYTES,
        };
        let max_connections = match &a.max_connections {
            Some(n) => usize::try_from(n.value)
                .ok()
                .filter(|n| (1..=1 << 24).contains(n))
                .ok_or_else(|| {
                    self.err(
                        n.referenced,
                        "agent.maxConnections",
                        format!("{} is out of range 1..={}", n.value, 1 << 24),
                    )
                })?,
            None => defaults::MAX_CONNECTIONS,
        };

        let trust_domain = match &a.trust_domain {
            Some(t) => self.trust_domain(t, "agent.trustDomain")?,
            None => defaults::TRUST_DOMAIN.to_owned(),
        };
        let ca_cert_file = a
            .ca_cert_file
            .as_ref()
            .map(|c| self.abs_path(c, "agent.caCertFile"))
            .transpose()?;
        let ca_key_file = a
            .ca_key_file
            .as_ref()
            .map(|k| self.abs_path(k, "agent.caKeyFile"))
            .transpose()?;
        match (&a.ca_cert_file, &a.ca_key_file) {
            (Some(c), None) => {
                return Err(self.err(
                    c.referenced,
                    "agent.caCertFile",
                    "caKeyFile is required with caCertFile (omit both for a development CA)",
                ));
            }
            (None, Some(k)) => {
                return Err(self.err(
                    k.referenced,
                    "agent.caKeyFile",
                    "caCertFile is required with caKeyFile (omit both for a development CA)",
                ));
            }
            _ => {}
        }
        let mut trust_root_files: Vec<PathBuf> = Vec::new();
        for (i, f) in a.trust_root_files.iter().flatten().enumerate() {
            let path = format!("agent.trustRootFiles[{i}]");
            let file = self.abs_path(f, &path)?;
            if trust_root_files.contains(&file) {
                return Err(self.err(
                    f.referenced,
                    path,
                    format!("{} is listed twice", file.display()),
                ));
            }
            trust_root_files.push(file);
        }
        let cert_lifetime = match &a.cert_lifetime_minutes {
            Some(m) if (1..=defaults::MAX_CERT_LIFETIME_MINUTES).contains(&m.value) => {
                Duration::from_secs(m.value * 60)
            }
            Some(m) => {
                return Err(self.err(
                    m.referenced,
                    "agent.certLifetimeMinutes",
                    format!(
                        "{} is out of range 1..={} (one year)",
                        m.value,
                        defaults::MAX_CERT_LIFETIME_MINUTES
                    ),
                ));
            }
            None => defaults::CERT_LIFETIME,
        };
        let tunnel_idle_timeout = millis(
            &a.tunnel_idle_timeout_ms,
            "agent.tunnelIdleTimeoutMs",
            defaults::TUNNEL_IDLE_TIMEOUT,
        )?;

        Ok(AgentConfig {
            node,
            cgroup,
            bpf_name,
            outbound_port,
            inbound_port,
            tunnel_port,
            admin_addr,
            proxy_mark,
            excluded_ports,
            excluded_cidrs,
            connect_timeout,
            idle_timeout,
            buffer_bytes,
            max_connections,
            trust_domain,
            ca_cert_file,
            ca_key_file,
            trust_root_files,
            cert_lifetime,
            tunnel_idle_timeout,
        })
    }

    fn admin_addr(&self, s: &S<String>) -> Result<SocketAddr> {
        let path = "agent.adminAddr";
        let addr: SocketAddr = s.value.parse().map_err(|_| {
            self.err(
                s.referenced,
                path,
                format!("`{}` is not an IP:port address", s.value),
            )
        })?;
        if !addr.ip().to_canonical().is_loopback() {
            return Err(self.err(
                s.referenced,
                path,
                format!(
                    "{} is not a loopback address: the admin API must not be reachable from \
                     the network",
                    addr.ip()
                ),
            ));
        }
        if addr.port() == 0 {
            return Err(self.err(s.referenced, path, "port must be in 1..=65535"));
        }
        Ok(addr)
    }

    // ---- workloads --------------------------------------------------------------------------

    fn workloads(&self, raw: &[S<RawWorkload>], agent: &AgentConfig) -> Result<Vec<Workload>> {
        let mut out: Vec<Workload> = Vec::with_capacity(raw.len());
        let mut names: HashMap<(String, String), u64> = HashMap::new();
        let mut ip_owner: HashMap<IpAddr, usize> = HashMap::new();
        for (i, item) in raw.iter().enumerate() {
            let w: &RawWorkload = &item.value;
            let base = format!("workloads[{i}]");
            let name = self.dns_name(&w.name, &format!("{base}.name"))?;
            let namespace =
                self.opt_dns_name(&w.namespace, &base, "namespace", defaults::NAMESPACE)?;
            let service_account = self.opt_dns_name(
                &w.service_account,
                &base,
                "serviceAccount",
                defaults::SERVICE_ACCOUNT,
            )?;
            if let Some(line) = names.get(&(namespace.clone(), name.clone())) {
                return Err(self.err(
                    w.name.referenced,
                    format!("{base}.name"),
                    format!(
                        "workload {} is already defined at line {line}",
                        QualifiedName(&namespace, &name)
                    ),
                ));
            }
            names.insert((namespace.clone(), name.clone()), w.name.referenced.line());

            if w.ips.value.is_empty() {
                return Err(self.err(
                    w.ips.referenced,
                    format!("{base}.ips"),
                    "must list at least one IP",
                ));
            }
            let mut ips = Vec::with_capacity(w.ips.value.len());
            for (j, raw_ip) in w.ips.value.iter().enumerate() {
                let path = format!("{base}.ips[{j}]");
                let ip = self.unicast_ip(raw_ip, &path)?;
                if let Some(owner) = ip_owner.get(&ip) {
                    let owner_name = match out.get(*owner) {
                        Some(o) => o.qualified_name().to_string(),
                        None => QualifiedName(&namespace, &name).to_string(),
                    };
                    return Err(self.err(
                        raw_ip.referenced,
                        path,
                        format!("{ip} is already an IP of workload {owner_name}"),
                    ));
                }
                ip_owner.insert(ip, i);
                ips.push(ip);
            }

            let node = match &w.node {
                Some(n) => self.dns_name(n, &format!("{base}.node"))?,
                None => agent.node.clone(),
            };
            let local = node == agent.node;
            let netns = w
                .netns
                .as_ref()
                .map(|n| self.abs_path(n, &format!("{base}.netns")))
                .transpose()?;
            if local && netns.is_none() {
                return Err(self.err(
                    item.referenced,
                    base,
                    format!(
                        "netns is required for a workload on this agent's node ({})",
                        agent.node
                    ),
                ));
            }
            out.push(Workload {
                id: WorkloadId(i),
                name,
                namespace,
                service_account,
                ips,
                node,
                netns,
                labels: w.labels.clone().unwrap_or_default(),
                fail_mode: w.fail_mode.unwrap_or_default(),
                unknown_destination: w.unknown_destination.unwrap_or_default(),
                local,
            });
        }
        Ok(out)
    }

    // ---- services ---------------------------------------------------------------------------

    fn services(
        &self,
        raw: &[S<RawService>],
        workloads: &[Workload],
        by_ip: &HashMap<IpAddr, WorkloadId>,
    ) -> Result<Vec<Service>> {
        let mut out: Vec<Service> = Vec::with_capacity(raw.len());
        let mut names: HashMap<(String, String), u64> = HashMap::new();
        let mut vip_owner: HashMap<IpAddr, String> = HashMap::new();
        for (i, item) in raw.iter().enumerate() {
            let s: &RawService = &item.value;
            let base = format!("services[{i}]");
            let name = self.dns_name(&s.name, &format!("{base}.name"))?;
            let namespace =
                self.opt_dns_name(&s.namespace, &base, "namespace", defaults::NAMESPACE)?;
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
                        let n_value = self.dns_name(n, &path)?;
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

            let (selection, targets) =
                self.endpoints(&s.endpoints, &base, &namespace, workloads, by_ip)?;
            for port in &mut ports {
                port.endpoints = targets
                    .iter()
                    .map(|t| Endpoint {
                        addr: SocketAddr::new(t.ip, port.target_port),
                        workload: t.workload,
                        node: t.node.clone(),
                        local: t.local,
                    })
                    .collect();
            }

            out.push(Service {
                name,
                namespace,
                vips,
                ports,
                selection,
            });
        }
        Ok(out)
    }

    /// The endpoint selection and the IPs it resolves to (port-independent).
    fn endpoints(
        &self,
        e: &S<RawEndpoints>,
        base: &str,
        namespace: &str,
        workloads: &[Workload],
        by_ip: &HashMap<IpAddr, WorkloadId>,
    ) -> Result<(EndpointSelection, Vec<Target>)> {
        let base = format!("{base}.endpoints");
        let RawEndpoints {
            selector,
            workloads: names,
            addresses,
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

        let of_workload = |w: &Workload| -> Vec<Target> {
            w.ips
                .iter()
                .map(|ip| Target {
                    ip: *ip,
                    workload: Some(w.id),
                    node: Some(w.node.clone()),
                    local: w.local,
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
            let targets = workloads
                .iter()
                .filter(|w| w.namespace == namespace && selects(&sel.value, &w.labels))
                .flat_map(of_workload)
                .collect();
            return Ok((EndpointSelection::Selector(sel.value.clone()), targets));
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
                let Some(w) = workloads
                    .iter()
                    .find(|w| w.namespace == namespace && w.name == n.value)
                else {
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
                workload: owner.map(|w| w.id),
                node: owner.map(|w| w.node.clone()),
                local: owner.is_some_and(|w| w.local),
            });
        }
        Ok((EndpointSelection::Addresses(ips), targets))
    }

    // ---- policies ---------------------------------------------------------------------------

    fn policies(&self, raw: &RawPolicies) -> Result<Policies> {
        let mut authorization: Vec<AuthorizationPolicy> = Vec::new();
        let mut names: HashMap<(String, String), u64> = HashMap::new();
        for (i, item) in raw.authorization.iter().flatten().enumerate() {
            let base = format!("policies.authorization[{i}]");
            let policy = self.authorization_policy(&item.value, &base)?;
            let key = (policy.namespace.clone(), policy.name.clone());
            if let Some(line) = names.get(&key) {
                return Err(self.err(
                    item.value.name.referenced,
                    format!("{base}.name"),
                    format!(
                        "authorization policy {} is already defined at line {line}",
                        policy.qualified_name()
                    ),
                ));
            }
            names.insert(key, item.value.name.referenced.line());
            authorization.push(policy);
        }
        Ok(Policies { authorization })
    }

    fn authorization_policy(
        &self,
        p: &RawAuthorizationPolicy,
        base: &str,
    ) -> Result<AuthorizationPolicy> {
        let name = self.dns_name(&p.name, &format!("{base}.name"))?;
        let namespace = self.opt_dns_name(&p.namespace, base, "namespace", defaults::NAMESPACE)?;
        let selector = match &p.selector {
            None => None,
            Some(s) => match &s.value {
                Some(labels) if !labels.is_empty() => Some(labels.clone()),
                _ => {
                    return Err(self.err(
                        s.referenced,
                        format!("{base}.selector"),
                        "must not be empty (omit it to apply the policy to every workload of \
                         the namespace)",
                    ));
                }
            },
        };
        let action = match &p.action {
            None => Default::default(),
            Some(a) => a.value.ok_or_else(|| {
                self.err(
                    a.referenced,
                    format!("{base}.action"),
                    "must be allow or deny",
                )
            })?,
        };
        // `rules:` with no value is refused rather than read as "no rule": that would mean
        // "deny everything" or "match everything", a surprise either way.
        let raw_rules = self.present(&p.rules, base, "rules", "must be a list of rules")?;
        let mut rules = Vec::new();
        for (j, r) in raw_rules.into_iter().flatten().enumerate() {
            rules.push(self.rule(&r.value, &format!("{base}.rules[{j}]"))?);
        }
        Ok(AuthorizationPolicy {
            name,
            namespace,
            selector,
            action,
            rules,
        })
    }

    fn rule(&self, r: &RawRule, base: &str) -> Result<AuthorizationRule> {
        let from = match &r.from {
            None => None,
            Some(f) => match &f.value {
                Some(from) => Some(self.from(from, f.referenced, base)?),
                None => return Err(self.empty_from(f.referenced, base)),
            },
        };
        let mut ports: Vec<u16> = Vec::new();
        if let Some(list) = self.non_empty_list(&r.ports, base, "ports", "port")? {
            for (k, p) in list.iter().enumerate() {
                let path = format!("{base}.ports[{k}]");
                let port = self.port(p, &path)?;
                if ports.contains(&port) {
                    return Err(self.err(
                        p.referenced,
                        path,
                        format!("port {port} is listed twice"),
                    ));
                }
                ports.push(port);
            }
        }
        Ok(AuthorizationRule { from, ports })
    }

    /// The `from` block of the rule at `rule`.
    fn from(&self, f: &RawFrom, at: Location, rule: &str) -> Result<RuleSource> {
        if f.identities.is_none() && f.identity_prefixes.is_none() && f.namespaces.is_none() {
            return Err(self.empty_from(at, rule));
        }
        let base = format!("{rule}.from");
        let mut source = RuleSource::default();
        if let Some(list) = self.non_empty_list(&f.identities, &base, "identities", "identity")? {
            for (k, id) in list.iter().enumerate() {
                let path = format!("{base}.identities[{k}]");
                source.identities.push(self.spiffe(id, &path, true)?);
            }
        }
        if let Some(list) = self.non_empty_list(
            &f.identity_prefixes,
            &base,
            "identityPrefixes",
            "identity prefix",
        )? {
            for (k, prefix) in list.iter().enumerate() {
                let path = format!("{base}.identityPrefixes[{k}]");
                source
                    .identity_prefixes
                    .push(self.spiffe(prefix, &path, false)?);
            }
        }
        if let Some(list) = self.non_empty_list(&f.namespaces, &base, "namespaces", "namespace")? {
            for (k, ns) in list.iter().enumerate() {
                let path = format!("{base}.namespaces[{k}]");
                source.namespaces.push(self.dns_name(ns, &path)?);
            }
        }
        Ok(source)
    }

    fn empty_from(&self, at: Location, rule: &str) -> ConfigError {
        self.err(
            at,
            format!("{rule}.from"),
            "must set at least one of identities, identityPrefixes, namespaces (omit `from` to \
             match any source)",
        )
    }

    /// The value of a key that was written (`Some`), refusing an explicit null.
    fn present<'r, T>(
        &self,
        field: &'r Present<T>,
        base: &str,
        name: &str,
        message: &str,
    ) -> Result<Option<&'r T>> {
        match field {
            None => Ok(None),
            Some(S { value: Some(v), .. }) => Ok(Some(v)),
            Some(s) => Err(self.err(s.referenced, format!("{base}.{name}"), message)),
        }
    }

    /// An optional list key: when written, it must list something (an empty list would read
    /// as "no condition" and widen the rule).
    fn non_empty_list<'r, T>(
        &self,
        field: &'r Present<Vec<T>>,
        base: &str,
        name: &str,
        what: &str,
    ) -> Result<Option<&'r [T]>> {
        match field {
            None => Ok(None),
            Some(S {
                value: Some(list), ..
            }) if !list.is_empty() => Ok(Some(list)),
            Some(s) => Err(self.err(
                s.referenced,
                format!("{base}.{name}"),
                format!("must list at least one {what} (omit `{name}` for any)"),
            )),
        }
    }

    /// A SPIFFE ID (`exact`) or a prefix of one: `spiffe://`, then (for an ID) a trust domain
    /// and a path; no blank or control character.
    fn spiffe(&self, s: &S<String>, path: &str, exact: bool) -> Result<String> {
        let v = &s.value;
        let Some(rest) = v.strip_prefix("spiffe://") else {
            return Err(self.err(
                s.referenced,
                path,
                format!("`{v}` does not start with spiffe://"),
            ));
        };
        if v.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(self.err(
                s.referenced,
                path,
                format!("`{v}` contains a blank or control character"),
            ));
        }
        if exact {
            let well_formed = rest
                .split_once('/')
                .is_some_and(|(td, p)| !td.is_empty() && !p.is_empty());
            if !well_formed {
                return Err(self.err(
                    s.referenced,
                    path,
                    format!(
                        "`{v}` is not a SPIFFE ID: expected spiffe://<trust domain>/<path> (use \
                         identityPrefixes for a prefix)"
                    ),
                ));
            }
        }
        Ok(v.clone())
    }

    // ---- scalars ----------------------------------------------------------------------------

    fn port(&self, p: &S<u64>, path: &str) -> Result<u16> {
        u16::try_from(p.value)
            .ok()
            .filter(|port| *port != 0)
            .ok_or_else(|| {
                self.err(
                    p.referenced,
                    path,
                    format!("port {} is out of range 1..=65535", p.value),
                )
            })
    }

    /// A unicast address usable by a pod or as a VIP, IPv4-mapped IPv6 folded to IPv4.
    fn unicast_ip(&self, s: &S<String>, path: &str) -> Result<IpAddr> {
        let ip: IpAddr = s.value.parse().map_err(|_| {
            self.err(
                s.referenced,
                path,
                format!("`{}` is not an IP address", s.value),
            )
        })?;
        let ip = ip.to_canonical();
        let broadcast = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
        if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || broadcast {
            return Err(self.err(
                s.referenced,
                path,
                format!("{ip} is not a unicast address usable by a workload or service"),
            ));
        }
        Ok(ip)
    }

    /// A Kubernetes-style (RFC 1123 subdomain) name: these end up in SPIFFE IDs and map keys.
    fn dns_name(&self, s: &S<String>, path: &str) -> Result<String> {
        let v = &s.value;
        let ok = (1..=253).contains(&v.len())
            && v.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && v.starts_with(|c: char| c.is_ascii_alphanumeric())
            && v.ends_with(|c: char| c.is_ascii_alphanumeric());
        if ok {
            Ok(v.clone())
        } else {
            Err(self.err(
                s.referenced,
                path,
                format!(
                    "`{v}` is not a valid name: use 1 to 253 lowercase letters, digits, '-' or \
                     '.', starting and ending with a letter or digit"
                ),
            ))
        }
    }

    /// A SPIFFE trust domain, DNS-like: dot-separated labels of lowercase letters, digits and
    /// '-', each starting and ending with a letter or digit, 255 bytes at most.
    fn trust_domain(&self, s: &S<String>, path: &str) -> Result<String> {
        let v = &s.value;
        let ok = (1..=255).contains(&v.len())
            && v.split('.').all(|label| {
                (1..=63).contains(&label.len())
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && label.starts_with(|c: char| c.is_ascii_alphanumeric())
                    && label.ends_with(|c: char| c.is_ascii_alphanumeric())
            });
        if ok {
            Ok(v.clone())
        } else {
            Err(self.err(
                s.referenced,
                path,
                format!(
                    "`{v}` is not a valid trust domain: use dot-separated labels of lowercase \
                     letters, digits and '-', each starting and ending with a letter or digit"
                ),
            ))
        }
    }

    fn opt_dns_name(
        &self,
        s: &Option<S<String>>,
        base: &str,
        field: &str,
        default: &str,
    ) -> Result<String> {
        match s {
            Some(s) => self.dns_name(s, &format!("{base}.{field}")),
            None => Ok(default.to_owned()),
        }
    }

    fn abs_path(&self, s: &S<String>, path: &str) -> Result<PathBuf> {
        let p = PathBuf::from(&s.value);
        if p.is_absolute() {
            Ok(p)
        } else {
            Err(self.err(
                s.referenced,
                path,
                format!("`{}` is not an absolute path", s.value),
            ))
        }
    }

    /// One path component under /sys/fs/bpf.
    fn pin_name(&self, s: &S<String>, path: &str) -> Result<String> {
        let v = &s.value;
        let ok = (1..=64).contains(&v.len())
            && v != "."
            && v != ".."
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if ok {
            Ok(v.clone())
        } else {
            Err(self.err(
                s.referenced,
                path,
                format!(
                    "`{v}` is not a valid pin directory name: use 1 to 64 letters, digits, '-', \
                     '_' or '.'"
                ),
            ))
        }
    }
}

/// One resolved endpoint IP, before the target port is known.
struct Target {
    ip: IpAddr,
    workload: Option<WorkloadId>,
    node: Option<String>,
    local: bool,
}

/// The labels include every pair of the selector.
fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// `address/prefix`; the host bits must be zero so the network is written as meant.
fn parse_cidr(text: &str) -> std::result::Result<Cidr, String> {
    let (addr, prefix) = text
        .split_once('/')
        .ok_or_else(|| format!("{text:?} is not a CIDR (address/prefix)"))?;
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not an IP address"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| *p <= max)
        .ok_or_else(|| format!("prefix {prefix:?} is not in 0..={max}"))?;
    let bits = match addr {
        IpAddr::V4(v4) => u128::from(u32::from(v4)) << 96,
        IpAddr::V6(v6) => u128::from(v6),
    };
    // The address sits in the top bits: shifting the prefix out leaves the host bits.
    let host_bits = bits.checked_shl(u32::from(prefix)).unwrap_or(0);
    if prefix < max && host_bits != 0 {
        return Err(format!(
            "{text} has host bits set (the network is not written as meant)"
        ));
    }
    Ok(Cidr { addr, prefix })
}
