//! The route decision: where a connection goes and what must be checked before it does,
//! decided from the config snapshot and the service's balancer (no I/O; unit-tested below,
//! benchmarked in `benches/hot_paths.rs`). One function per way in, one [`Plan`] out; a
//! service's endpoints are picked per attempt by the pipeline, and [`hop`] says how to reach
//! each.

use std::{net::SocketAddr, sync::Arc};

use super::registry::Subject;
use crate::{
    balance::{Balancers, ServiceBalancer},
    config::{Config, UnknownDestination, Workload},
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

/// One address to connect to, and what must be checked first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hop {
    pub addr: SocketAddr,
    pub via: Via,
    /// A workload of this node is the destination: its inbound policy (authorization and
    /// rate limits) is enforced here, on this subject (registered first, for revocation).
    pub admit: Option<Subject>,
}

/// Where the connection goes.
#[derive(Clone)]
pub enum Target {
    /// One address (a pod, a passthrough destination, the local app).
    Fixed(Hop),
    /// A service port: each attempt asks its balancer for an endpoint, then [`hop`] says how
    /// to reach it.
    Balanced(Arc<ServiceBalancer>),
}

/// The whole decision for one connection.
#[derive(Clone)]
pub struct Plan {
    pub kind: RouteKind,
    /// The service whose VIP was dialled, `namespace/name`.
    pub service: Option<String>,
    pub target: Target,
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
    balancers: &Balancers,
) -> Result<Plan, NoRoute> {
    if let Some((service, port)) = config.service_by_vip(dst) {
        let name = service.qualified_name().to_string();
        return match balancers.get(&name, port.port) {
            Some(balancer) => Ok(Plan {
                kind: RouteKind::Service,
                service: Some(name),
                target: Target::Balanced(balancer),
            }),
            // The snapshot changed between the lookup and the balancers' sync.
            None => Err(NoRoute {
                kind: RouteKind::Service,
                reason: format!("service {name} port {} is being reconfigured", port.port),
                service: Some(name),
                forbidden: false,
            }),
        };
    }
    if let Some(workload) = config.workload_by_ip(dst.ip()) {
        return Ok(Plan {
            kind: RouteKind::Pod,
            service: None,
            target: Target::Fixed(hop(source, Some(workload), dst)),
        });
    }
    match source.unknown_destination {
        UnknownDestination::Passthrough => Ok(Plan {
            kind: RouteKind::Passthrough,
            service: None,
            target: Target::Fixed(Hop {
                addr: dst,
                via: Via::Direct,
                admit: None,
            }),
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
pub fn hop(source: &Workload, destination: Option<&Workload>, target: SocketAddr) -> Hop {
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
    Hop {
        addr: target,
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
        target: Target::Fixed(Hop {
            addr: dst,
            via: Via::Direct,
            admit: Some(subject(None, workload, dst)),
        }),
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
        target: Target::Fixed(Hop {
            addr: target,
            via: Via::Direct,
            admit: Some(subject(Some(client.clone()), workload, target)),
        }),
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

    fn fixed(plan: Plan) -> Hop {
        match plan.target {
            Target::Fixed(hop) => hop,
            Target::Balanced(_) => panic!("expected a fixed target"),
        }
    }

    #[test]
    fn a_vip_goes_to_its_service_balancer_and_a_hop_says_how_to_reach_each_endpoint() {
        let config = config();
        let client = workload(&config, "client");
        let balancers = Balancers::new();
        balancers.sync(&config);
        let plan = outbound(&config, client, addr("10.96.0.10:80"), &balancers).expect("route");
        assert_eq!(plan.kind, RouteKind::Service);
        assert_eq!(plan.service.as_deref(), Some("demo/echo"));
        assert!(matches!(plan.target, Target::Balanced(_)));

        let local = hop(
            client,
            Some(workload(&config, "local-srv")),
            addr("10.1.0.4:8080"),
        );
        assert_eq!(local.via, Via::Direct);
        let subject = local.admit.expect("a local destination is admitted here");
        assert_eq!(subject.destination, "demo/local-srv");
        assert_eq!(subject.source.as_ref(), Some(&client.identity));
        assert_eq!(subject.port, 8080);

        let remote = hop(
            client,
            Some(workload(&config, "remote-srv")),
            addr("10.2.0.4:8080"),
        );
        assert_eq!(
            remote.via,
            Via::Tunnel {
                expected: workload(&config, "remote-srv").identity.clone()
            }
        );
        assert_eq!(remote.admit, None, "the remote node's agent admits it");
    }

    #[test]
    fn pods_unknown_destinations_and_unsynced_services() {
        let config = config();
        let (client, closed) = (workload(&config, "client"), workload(&config, "closed"));
        let balancers = Balancers::new();
        let pod = outbound(&config, client, addr("10.2.0.4:9000"), &balancers).expect("route");
        assert_eq!(pod.kind, RouteKind::Pod);
        assert_eq!(fixed(pod).addr, addr("10.2.0.4:9000"));
        let outside = outbound(&config, client, addr("192.0.2.1:443"), &balancers);
        let outside = outside.expect("route");
        assert_eq!(outside.kind, RouteKind::Passthrough);
        let outside = fixed(outside);
        assert_eq!((outside.via, outside.admit), (Via::Direct, None));
        let denied = outbound(&config, closed, addr("192.0.2.1:443"), &balancers);
        let denied = denied.err().expect("denied");
        assert!(denied.forbidden && denied.reason.contains("denies unknown"));
        // Balancers not synced with this snapshot yet: no route, not a crash.
        let unsynced = outbound(&config, client, addr("10.96.0.10:80"), &balancers);
        assert!(!unsynced.err().expect("no balancer").forbidden);
    }

    #[test]
    fn inbound_and_tunnel_targets_must_be_the_pod_itself_and_never_a_proxy_port() {
        let config = config();
        let client = workload(&config, "client").identity.clone();
        let plain = inbound(&config, "demo/local-srv", addr("10.1.0.4:8080")).expect("route");
        assert_eq!(fixed(plain).admit.expect("admitted").source, None);
        let proxy_port = inbound(&config, "demo/local-srv", addr("10.1.0.4:15006"));
        assert!(proxy_port.err().expect("loop").forbidden);
        let tunneled = tunnel(&config, "demo/local-srv", &client, addr("10.1.0.4:8080"));
        let tunneled = fixed(tunneled.expect("route"));
        assert_eq!(
            tunneled.admit.expect("admitted").source,
            Some(client.clone())
        );
        let elsewhere = tunnel(&config, "demo/local-srv", &client, addr("10.1.0.2:8080"));
        assert!(elsewhere.err().expect("not its address").forbidden);
        let gone = tunnel(&config, "demo/nobody", &client, addr("10.1.0.4:8080"));
        assert!(!gone.err().expect("gone").forbidden);
    }
}
