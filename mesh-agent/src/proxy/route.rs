//! The route decision: where a connection goes and what must be checked before it does,
//! decided from the config snapshot alone (no I/O; unit-tested below, benchmarked in
//! `benches/hot_paths.rs`). One function per way in, one [`Plan`] out.

use std::net::SocketAddr;

use super::registry::Subject;
use crate::{
    balance::Balancer,
    config::{Config, Endpoint, UnknownDestination, Workload},
    tls::SpiffeId,
};

/// What the connection is, for the access log and the `route` metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteKind {
    /// To a service VIP, balanced to an endpoint.
    Service,
    /// To a known pod's own address.
    Pod,
    /// Outside the mesh, let through unchanged.
    Passthrough,
    /// Into a local pod from outside the mesh (plaintext).
    Plaintext,
    /// Into a local pod through a tunnel from another node.
    Tunnel,
    /// Not decided (refused before routing).
    None,
}

impl RouteKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RouteKind::Service => "service",
            RouteKind::Pod => "pod",
            RouteKind::Passthrough => "passthrough",
            RouteKind::Plaintext => "plaintext",
            RouteKind::Tunnel => "tunnel",
            RouteKind::None => "none",
        }
    }
}

/// How the upstream is reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Via {
    /// A TCP connection from inside the pod's network namespace (the destination sees the
    /// pod's own address).
    Direct,
    /// A stream through the mTLS tunnel to the destination's node, whose server must hold
    /// `expected`.
    Tunnel { expected: SpiffeId },
}

/// The whole decision for one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub kind: RouteKind,
    /// The service whose VIP was dialled, `namespace/name`.
    pub service: Option<String>,
    pub target: SocketAddr,
    pub via: Via,
    /// A workload of this node is the destination: its inbound policy is enforced here, on
    /// this subject (registered first, for revocation).
    pub admit: Option<Subject>,
}

/// Why there is no route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NoRoute {
    pub kind: RouteKind,
    pub service: Option<String>,
    /// A destination that is not ours to serve (loops, foreign addresses): a refusal, not a
    /// missing route.
    pub forbidden: bool,
    pub reason: String,
}

/// An outbound connection of `source` (a local workload) to `dst`, its original destination.
pub fn outbound(
    config: &Config,
    source: &Workload,
    dst: SocketAddr,
    balancer: &dyn Balancer,
) -> Result<Plan, NoRoute> {
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
        let Some(endpoint) = balancer.pick(&key, &candidates) else {
            return Err(NoRoute {
                kind: RouteKind::Service,
                reason: format!("service {name} port {} has no endpoints", port.port),
                service: Some(name),
                forbidden: false,
            });
        };
        let destination = endpoint.workload.and_then(|id| config.workload(id));
        let mut plan = to_workload(source, destination, endpoint.addr);
        plan.kind = RouteKind::Service;
        plan.service = Some(name);
        return Ok(plan);
    }
    if let Some(workload) = config.workload_by_ip(dst.ip()) {
        return Ok(to_workload(source, Some(workload), dst));
    }
    match source.unknown_destination {
        UnknownDestination::Passthrough => Ok(Plan {
            kind: RouteKind::Passthrough,
            service: None,
            target: dst,
            via: Via::Direct,
            admit: None,
        }),
        UnknownDestination::Deny => Err(NoRoute {
            kind: RouteKind::Passthrough,
            service: None,
            forbidden: true,
            reason: format!(
                "{dst} is not a known service or pod and {} denies unknown destinations",
                source.qualified_name()
            ),
        }),
    }
}

/// `target` owned by `destination` (if a workload of the mesh): a pod of this node is reached
/// directly and its inbound policy checked here, with the source's identity this agent knows;
/// a pod of another node through a tunnel to its node's agent, which checks the policy.
fn to_workload(source: &Workload, destination: Option<&Workload>, target: SocketAddr) -> Plan {
    let (via, admit) = match destination {
        Some(workload) if workload.local => (
            Via::Direct,
            Some(subject(Some(source.identity.clone()), workload, target)),
        ),
        Some(workload) => (
            Via::Tunnel {
                expected: workload.identity.clone(),
            },
            None,
        ),
        None => (Via::Direct, None),
    };
    Plan {
        kind: RouteKind::Pod,
        service: None,
        target,
        via,
        admit,
    }
}

/// A connection from outside the mesh to `dst`, an address of the local pod `pod_key`
/// (handed over by sk_lookup, so the accepted socket's local address).
pub fn inbound(config: &Config, pod_key: &str, dst: SocketAddr) -> Result<Plan, NoRoute> {
    let workload = local_target(config, pod_key, dst, RouteKind::Plaintext)?;
    // Plaintext: the client is unauthenticated, so only policies without identity
    // conditions can allow it.
    Ok(Plan {
        kind: RouteKind::Plaintext,
        service: None,
        target: dst,
        via: Via::Direct,
        admit: Some(subject(None, workload, dst)),
    })
}

/// A tunnel stream from `client` asking for `target` in the local pod `pod_key`.
pub fn tunnel(
    config: &Config,
    pod_key: &str,
    client: &SpiffeId,
    target: SocketAddr,
) -> Result<Plan, NoRoute> {
    let workload = local_target(config, pod_key, target, RouteKind::Tunnel)?;
    // Only the pod's own addresses: never its loopback services or another host.
    if !workload
        .ips
        .iter()
        .any(|ip| ip.to_canonical() == target.ip().to_canonical())
    {
        return Err(forbidden(
            RouteKind::Tunnel,
            format!("{target} is not an address of {pod_key}"),
        ));
    }
    Ok(Plan {
        kind: RouteKind::Tunnel,
        service: None,
        target,
        via: Via::Direct,
        admit: Some(subject(Some(client.clone()), workload, target)),
    })
}

/// The local workload `pod_key`, when `dst` is not one of the proxy's own ports (which
/// would loop back into the proxy).
fn local_target<'c>(
    config: &'c Config,
    pod_key: &str,
    dst: SocketAddr,
    kind: RouteKind,
) -> Result<&'c Workload, NoRoute> {
    let (first, last) = config.agent().startup.proxy_port_range();
    if (first..=last).contains(&dst.port()) {
        return Err(forbidden(
            kind,
            format!("port {} belongs to the proxy", dst.port()),
        ));
    }
    config.local_workload(pod_key).ok_or_else(|| NoRoute {
        kind,
        service: None,
        forbidden: false,
        reason: format!("{pod_key} is not served here"),
    })
}

fn forbidden(kind: RouteKind, reason: String) -> NoRoute {
    NoRoute {
        kind,
        service: None,
        forbidden: true,
        reason,
    }
}

fn subject(source: Option<SpiffeId>, destination: &Workload, target: SocketAddr) -> Subject {
    Subject {
        source,
        destination: destination.qualified_name().to_string(),
        port: target.port(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::RoundRobin;

    /// Node `a` with pods `client` and `local-srv`; node `b` with `remote-srv`; service `echo`
    /// selecting both servers; `closed` denies unknown destinations.
    fn config() -> Config {
        Config::from_yaml_str(
            "agent: {node: a, outboundPort: 15001, inboundPort: 15006, tunnelPort: 15008}\n\
             workloads:\n\
             \x20 - {name: client, namespace: demo, serviceAccount: client, ips: [10.1.0.2], node: a, netns: /n/c}\n\
             \x20 - {name: closed, namespace: demo, ips: [10.1.0.3], node: a, netns: /n/d, unknownDestination: deny}\n\
             \x20 - {name: local-srv, namespace: demo, serviceAccount: srv, ips: [10.1.0.4], node: a, netns: /n/l, labels: {app: echo}}\n\
             \x20 - {name: remote-srv, namespace: demo, serviceAccount: srv, ips: [10.2.0.4], node: b, labels: {app: echo}}\n\
             services:\n\
             \x20 - {name: echo, namespace: demo, vips: [10.96.0.10], ports: [{port: 80, targetPort: 8080}], endpoints: {selector: {app: echo}}}\n\
             \x20 - {name: empty, namespace: demo, vips: [10.96.0.11], ports: [{port: 80, targetPort: 8080}], endpoints: {selector: {app: none}}}\n",
            "route.yaml",
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn workload<'c>(config: &'c Config, name: &str) -> &'c Workload {
        config
            .workloads()
            .iter()
            .find(|w| w.name == name)
            .unwrap_or_else(|| panic!("no workload {name}"))
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn a_vip_balances_to_a_local_endpoint_with_admission_then_a_remote_one_through_a_tunnel() {
        let config = config();
        let client = workload(&config, "client");
        let rr = RoundRobin::default();
        let first = outbound(&config, client, addr("10.96.0.10:80"), &rr).expect("route");
        assert_eq!(first.kind, RouteKind::Service);
        assert_eq!(first.service.as_deref(), Some("demo/echo"));
        assert_eq!(first.target, addr("10.1.0.4:8080"));
        assert_eq!(first.via, Via::Direct);
        let subject = first.admit.expect("a local destination is admitted here");
        assert_eq!(subject.destination, "demo/local-srv");
        assert_eq!(subject.source.as_ref(), Some(&client.identity));
        assert_eq!(subject.port, 8080);

        let second = outbound(&config, client, addr("10.96.0.10:80"), &rr).expect("route");
        assert_eq!(second.target, addr("10.2.0.4:8080"));
        assert_eq!(
            second.via,
            Via::Tunnel {
                expected: workload(&config, "remote-srv").identity.clone()
            }
        );
        assert_eq!(second.admit, None, "the remote node's agent admits it");
    }

    #[test]
    fn pods_unknown_destinations_and_empty_services() {
        let config = config();
        let (client, closed) = (workload(&config, "client"), workload(&config, "closed"));
        let rr = RoundRobin::default();
        let pod = outbound(&config, client, addr("10.2.0.4:9000"), &rr).expect("route");
        assert_eq!(
            (pod.kind, pod.target),
            (RouteKind::Pod, addr("10.2.0.4:9000"))
        );
        let outside = outbound(&config, client, addr("192.0.2.1:443"), &rr).expect("route");
        assert_eq!(outside.kind, RouteKind::Passthrough);
        assert_eq!((outside.via, outside.admit), (Via::Direct, None));
        let denied = outbound(&config, closed, addr("192.0.2.1:443"), &rr).expect_err("denied");
        assert!(denied.forbidden && denied.reason.contains("denies unknown"));
        let empty = outbound(&config, client, addr("10.96.0.11:80"), &rr).expect_err("empty");
        assert!(!empty.forbidden && empty.reason.contains("no endpoints"));
        assert_eq!(empty.service.as_deref(), Some("demo/empty"));
    }

    #[test]
    fn inbound_and_tunnel_targets_must_be_the_pod_itself_and_never_a_proxy_port() {
        let config = config();
        let client = workload(&config, "client").identity.clone();
        let plain = inbound(&config, "demo/local-srv", addr("10.1.0.4:8080")).expect("route");
        assert_eq!(plain.admit.expect("admitted").source, None);
        let proxy_port = inbound(&config, "demo/local-srv", addr("10.1.0.4:15006"));
        assert!(proxy_port.expect_err("loop").forbidden);
        let tunneled =
            tunnel(&config, "demo/local-srv", &client, addr("10.1.0.4:8080")).expect("route");
        assert_eq!(
            tunneled.admit.expect("admitted").source,
            Some(client.clone())
        );
        let elsewhere = tunnel(&config, "demo/local-srv", &client, addr("10.1.0.2:8080"));
        assert!(elsewhere.expect_err("not its address").forbidden);
        let gone = tunnel(&config, "demo/nobody", &client, addr("10.1.0.4:8080"));
        assert!(!gone.expect_err("gone").forbidden);
    }
}
