//! Steps 1-3 of the pipeline for one connection: route, then per attempt admission
//! (authorization and rate limits where the destination is served here) and the connect. A
//! service's endpoint is picked per attempt; a failed connect is retried on another endpoint
//! while the service's retry budget allows, and feeds the balancer (latency, failure streaks,
//! ejection).
//!
//! A pod's outbound connection's first bytes, when the app has sent them by the time its
//! first tunnel attempt starts, are read there and go right behind the stream's CONNECT
//! ([`Early`]); a connection that never takes a tunnel is left to the copy. A retry sends them
//! again (a direct hop writes them once connected), except after a tunnel attempt that failed
//! without an answer once they were out (the app on the other side may have them): that
//! failure is final, so nothing reaches an app twice.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, OnceLock},
    time::Duration,
};

use bytes::Bytes;
use tokio::{io::AsyncWriteExt, net::TcpStream, sync::OwnedSemaphorePermit, time::Instant};

use super::{
    context::{PodHandle, ProxyContext, Refused},
    direction::Direction,
    outcome::{ConnectionResult, Outcome},
    registry::{ConnectionInfo, Tracked},
    route::{self, Hop, NoRoute, Plan, RouteKind, Target, Via},
    upstream::{self, TunnelFailure},
};
use crate::{
    balance::{ActiveGuard, Caller, PickError, ServiceBalancer},
    config::{Config, Workload},
    limit::{Shaper, SourceKey},
    tls::SpiffeId,
    tunnel::{Early, StreamTarget, TunnelStream},
};

/// The most a connection's first bytes read before connecting may be (a request, a TLS
/// ClientHello with a post-quantum key share).
const EARLY_BYTES: usize = 4096;

/// Either side of a connection.
pub(super) enum Stream {
    Tcp(TcpStream),
    Tunnel(TunnelStream),
}

/// How the copy runs, from the agent's live settings and the service's traffic policy.
#[derive(Clone, Copy)]
pub(super) struct CopySettings {
    pub buffer_bytes: usize,
    pub idle_timeout: Duration,
    pub max_lifetime: Option<Duration>,
    /// TCP-to-TCP copies use `splice(2)` (`agent.splice`).
    pub splice: bool,
}

/// What [`establish`] hands the copy.
pub(super) struct Established {
    pub upstream: Stream,
    /// Registered for the connections view, and for revocation when a policy admitted it
    /// here.
    pub tracked: Tracked,
    /// The bandwidth limits that apply (egress of the source, ingress of the destination).
    pub shaper: Shaper,
    pub copy: CopySettings,
    /// The balanced endpoint's count of active connections, while this one lives.
    pub active: Option<ActiveGuard>,
    /// The connection-limit slot of a tunnel stream (TCP ones hold theirs in the accept loop).
    pub _slot: Option<OwnedSemaphorePermit>,
    /// The downstream's first bytes, already sent upstream with the connect.
    pub early_bytes: usize,
}

/// What the attempts share.
struct Attempts<'a> {
    ctx: &'a ProxyContext,
    pod: &'a PodHandle,
    connect_timeout: Duration,
    tunnel_port: u16,
    /// A tunnel stream's vouched-for client pod address: direct connects leave from it.
    connect_from: Option<IpAddr>,
    /// An outbound connection's downstream, whose first bytes a tunnel attempt reads.
    downstream: Option<&'a TcpStream>,
    /// Those bytes, once read: sent with each later attempt's connect.
    early: OnceLock<Early>,
}

/// Why one attempt failed.
enum Failed {
    /// The connect failed: another endpoint may do.
    Retryable,
    /// The connect failed after the first bytes went out without an answer: the endpoint
    /// failed, and no other may be tried.
    AfterSending,
    /// Refused by policy or limits: no retry.
    Final,
}

/// Route, admit, connect (from `connect_from`, a tunnel client's vouched-for address, when
/// given); a tunnel attempt sends what an outbound `downstream` has sent so far with its
/// CONNECT. `None`: refused, with the reason in `result`.
pub(super) async fn establish(
    ctx: &ProxyContext,
    pod: &PodHandle,
    result: &mut ConnectionResult,
    connect_from: Option<IpAddr>,
    downstream: Option<&TcpStream>,
) -> Option<Established> {
    let Some(dst) = result.destination else {
        result.fail(
            Outcome::NoOrigDst,
            "no original destination (a direct connect to the listener, or an evicted flow)",
        );
        return None;
    };
    let config = ctx.config.load_full();
    result.snapshot = Some(config.clone());
    let source = match result.direction {
        Direction::Outbound => config.local_workload(&pod.key),
        Direction::Inbound | Direction::Tunnel => None,
    };
    let plan = match route_connection(ctx, &config, &pod.key, source, dst, result) {
        Ok(plan) => plan,
        Err(no_route) => {
            result.route = no_route.kind;
            result.service = no_route.service;
            let outcome = if no_route.forbidden {
                Outcome::Forbidden
            } else {
                Outcome::NoRoute
            };
            result.fail(outcome, no_route.reason);
            return None;
        }
    };
    result.route = plan.kind;
    result.service = plan.service;
    let (live, startup) = (&config.agent().live, &config.agent().startup);
    let traffic = match &plan.target {
        Target::Balanced(balancer) => Some(balancer.policy()),
        Target::Fixed(_) => None,
    };
    let copy = CopySettings {
        buffer_bytes: live.buffer_bytes,
        idle_timeout: traffic
            .and_then(|t| t.idle_timeout)
            .unwrap_or(live.idle_timeout),
        max_lifetime: traffic.and_then(|t| t.max_connection_lifetime),
        splice: live.splice,
    };
    let attempts = Attempts {
        ctx,
        pod,
        connect_timeout: traffic
            .and_then(|t| t.connect_timeout)
            .unwrap_or(live.connect_timeout),
        tunnel_port: startup.tunnel_port,
        connect_from,
        downstream: downstream.filter(|_| result.direction == Direction::Outbound),
        early: OnceLock::new(),
    };

    // Tunnel streams count against the same node-wide limit as TCP connections, which take
    // their slot before accepting.
    let slot = match result.direction {
        Direction::Tunnel => match ctx.connection_slots.clone().try_acquire_owned() {
            Ok(slot) => Some(slot),
            Err(_) => {
                result.fail(Outcome::Overloaded, "the node is at its connection limit");
                return None;
            }
        },
        Direction::Outbound | Direction::Inbound => None,
    };
    // What the source may send, enforced by the source's own agent.
    let egress = match result.direction {
        Direction::Outbound => match ctx.limits.admit_egress(&pod.key).await {
            Ok(shaper) => shaper,
            Err(limited) => {
                ctx.metrics.rate_limited(&limited.policy, "egress");
                result.fail(Outcome::RateLimited, limited.to_string());
                result.policy = Some(limited.policy);
                return None;
            }
        },
        Direction::Inbound | Direction::Tunnel => Shaper::default(),
    };

    let (upstream, tracked, shaper, active) = match plan.target {
        Target::Fixed(hop) => {
            let (upstream, tracked, shaper) = attempts.one(&hop, result).await.ok()?;
            (upstream, tracked, shaper, None)
        }
        Target::Balanced(balancer) => {
            let identity = result.client_identity.clone();
            let caller = caller(source, identity.as_ref(), result.client, dst);
            attempts
                .balanced(&config, source, &balancer, &caller, result)
                .await?
        }
    };
    Some(Established {
        upstream,
        tracked,
        shaper: egress.and(shaper),
        copy,
        active,
        _slot: slot,
        early_bytes: attempts.early.get().map_or(0, Early::len),
    })
}

/// What `downstream` has sent so far, up to [`EARLY_BYTES`], without waiting. Read with a
/// plain non-blocking `recv`: tokio may not have seen the socket readable yet. Nothing (and
/// the copy finds the rest, EOF or the error) when there is nothing now.
fn early_bytes(downstream: &TcpStream) -> Bytes {
    use std::os::fd::AsRawFd;

    use nix::sys::socket::{MsgFlags, recv};
    let mut buffer = [0; EARLY_BYTES];
    match recv(downstream.as_raw_fd(), &mut buffer, MsgFlags::MSG_DONTWAIT) {
        Ok(read) => Bytes::copy_from_slice(&buffer[..read]),
        Err(_) => Bytes::new(),
    }
}

fn route_connection(
    ctx: &ProxyContext,
    config: &Config,
    pod_key: &str,
    source: Option<&Workload>,
    dst: SocketAddr,
    result: &ConnectionResult,
) -> Result<Plan, NoRoute> {
    match (result.direction, source, &result.client_identity) {
        (Direction::Outbound, Some(source), _) => {
            route::outbound(config, source, dst, &ctx.balancers)
        }
        (Direction::Outbound, None, _) => Err(NoRoute {
            kind: RouteKind::None,
            service: None,
            forbidden: false,
            reason: "the pod is no longer configured".into(),
        }),
        (Direction::Inbound, ..) => route::inbound(config, pod_key, dst),
        (Direction::Tunnel, _, Some(client)) => route::tunnel(config, pod_key, client, dst),
        (Direction::Tunnel, _, None) => Err(NoRoute {
            kind: RouteKind::Tunnel,
            service: None,
            forbidden: true,
            reason: "a tunnel stream without a client identity".into(),
        }),
    }
}

/// The caller as the balancer sees it: the pod's own address (the accepted socket's peer is
/// the loopback address connect4 rewrote to), identity and labels.
fn caller<'a>(
    source: Option<&'a Workload>,
    identity: Option<&'a SpiffeId>,
    client: SocketAddr,
    dst: SocketAddr,
) -> Caller<'a> {
    static NO_LABELS: std::sync::LazyLock<std::collections::BTreeMap<String, String>> =
        std::sync::LazyLock::new(Default::default);
    let ip = source
        .and_then(|w| w.ips.iter().find(|ip| ip.is_ipv4() == dst.is_ipv4()))
        .copied()
        .unwrap_or(client.ip());
    Caller {
        ip,
        identity,
        labels: source.map_or(&NO_LABELS, |w| &w.labels),
        ipv4: dst.is_ipv4(),
    }
}

type Connected = (Stream, Tracked, Shaper, Option<ActiveGuard>);

impl Attempts<'_> {
    /// Picks endpoints of `balancer` until one connects, retrying failed connects within the
    /// budget.
    async fn balanced(
        &self,
        config: &Config,
        source: Option<&Workload>,
        balancer: &Arc<ServiceBalancer>,
        caller: &Caller<'_>,
        result: &mut ConnectionResult,
    ) -> Option<Connected> {
        let metrics = &self.ctx.metrics;
        let service = result.service.clone().unwrap_or_default();
        let max_attempts = balancer.policy().retries.attempts as usize + 1;
        let mut tried: Vec<SocketAddr> = Vec::new();
        loop {
            let pick = match balancer.pick(caller, &tried) {
                Ok(pick) => pick,
                Err(PickError::CircuitOpen(limit)) => {
                    metrics.circuit_open(&service);
                    result.fail(Outcome::CircuitOpen, format!("circuit breaker: {limit}"));
                    return None;
                }
                Err(PickError::NoEndpoints) => {
                    result.fail(
                        Outcome::NoRoute,
                        format!("service {service} has no endpoints"),
                    );
                    return None;
                }
                Err(PickError::NoneAvailable) => {
                    // After failed attempts the last connect error says more.
                    if tried.is_empty() {
                        result.fail(
                            Outcome::NoHealthyEndpoint,
                            format!("no endpoint of {service} is available"),
                        );
                    }
                    return None;
                }
            };
            let addr = pick.endpoint().addr;
            // Endpoint ids belong to the balancer's snapshot: find the workload by address.
            let destination = config.workload_by_ip(addr.ip());
            let hop = match source {
                Some(source) => route::hop(source, destination, addr),
                None => Hop {
                    addr,
                    via: Via::Direct,
                    admit: None,
                },
            };
            let started = Instant::now();
            match self.one(&hop, result).await {
                Ok((upstream, tracked, shaper)) => {
                    let latency = started.elapsed();
                    metrics.connect_latency(&service, latency);
                    let active = pick.connected(latency);
                    return Some((upstream, tracked, shaper, Some(active)));
                }
                Err(Failed::Final) => return None,
                Err(failed @ (Failed::Retryable | Failed::AfterSending)) => {
                    if pick.failed() {
                        metrics.ejection(&service);
                        tracing::info!(service, endpoint = %addr, "endpoint ejected after consecutive failures");
                    }
                    if matches!(failed, Failed::AfterSending) {
                        return None;
                    }
                    tried.push(addr);
                    if tried.len() >= max_attempts {
                        metrics.retry(&service, "attempts_exhausted");
                        return None;
                    }
                    if !balancer.try_retry() {
                        metrics.retry(&service, "budget_exhausted");
                        return None;
                    }
                    metrics.retry(&service, "retried");
                    result.retries += 1;
                }
            }
        }
    }

    /// What a tunnel stream to `target` says of its client, for the app on the other node to
    /// see it: the app's pod address of the target's family, with the app's port. Only for
    /// the pod's own connections (outbound).
    fn forwarded_for(&self, result: &ConnectionResult, target: SocketAddr) -> Option<SocketAddr> {
        if result.direction != Direction::Outbound {
            return None;
        }
        let ipv4 = target.ip().to_canonical().is_ipv4();
        self.pod
            .ips
            .iter()
            .find(|ip| ip.to_canonical().is_ipv4() == ipv4)
            .map(|ip| SocketAddr::new(*ip, result.client.port()))
    }

    /// Registers the attempt (the connections view shows it from now on), admits it when
    /// the destination is served here, and connects to one hop.
    async fn one(
        &self,
        hop: &Hop,
        result: &mut ConnectionResult,
    ) -> Result<(Stream, Tracked, Shaper), Failed> {
        let ctx = self.ctx;
        result.upstream = Some(hop.addr);
        result.tunnel_to = match &hop.via {
            Via::Direct => None,
            Via::Tunnel { expected } => Some(expected.clone()),
        };
        result.tunnel_addr = match &hop.via {
            Via::Direct => None,
            Via::Tunnel { .. } => Some(SocketAddr::new(hop.addr.ip(), self.tunnel_port)),
        };
        let info = ConnectionInfo {
            direction: result.direction,
            pod: result.pod.clone(),
            client: result.client,
            client_identity: result.client_identity.clone(),
            destination: result.destination,
            upstream: hop.addr,
            tunnel_to: result.tunnel_to.clone(),
            service: result.service.clone(),
            started: result.started(),
            moved: result.moved.clone(),
        };
        let (tracked, shaper) = match &hop.admit {
            None => (ctx.connections.track(None, info), Shaper::default()),
            Some(subject) => {
                let tracked = match ctx.admit(subject.clone(), info) {
                    Ok((tracked, decision)) => {
                        result.policy = decision.policy;
                        tracked
                    }
                    Err(Refused::Denied(decision)) => {
                        result.policy = decision.policy;
                        result.fail(Outcome::Denied, decision.reason);
                        return Err(Failed::Final);
                    }
                    Err(Refused::Gone) => {
                        result.fail(Outcome::NoRoute, "the destination left the configuration");
                        return Err(Failed::Final);
                    }
                };
                let source = match &subject.source {
                    Some(identity) => SourceKey::Identity(identity.clone()),
                    None => SourceKey::ip(result.client.ip()),
                };
                match ctx.limits.admit(&subject.destination, &source).await {
                    Ok(shaper) => (tracked, shaper),
                    Err(limited) => {
                        ctx.metrics.rate_limited(&limited.policy, "ingress");
                        result.fail(Outcome::RateLimited, limited.to_string());
                        result.policy = Some(limited.policy);
                        return Err(Failed::Final);
                    }
                }
            }
        };
        let connected = match &hop.via {
            Via::Direct => self.direct(hop.addr).await,
            Via::Tunnel { expected } => upstream::tunnel(
                &ctx.mesh_tls,
                self.pod,
                expected,
                StreamTarget {
                    authority: hop.addr,
                    forwarded_for: self.forwarded_for(result, hop.addr),
                },
                self.early(),
                self.tunnel_port,
                self.connect_timeout,
            )
            .await
            .map(Stream::Tunnel)
            .map_err(|failure| match failure {
                TunnelFailure::Denied(reason) => (Outcome::Denied, reason, Failed::Final),
                TunnelFailure::Failed(reason) => {
                    (Outcome::ConnectFailed, reason, Failed::Retryable)
                }
                TunnelFailure::AfterSending(reason) => {
                    (Outcome::ConnectFailed, reason, Failed::AfterSending)
                }
            }),
        };
        match connected {
            Ok(stream) => Ok((stream, tracked, shaper)),
            Err((outcome, reason, failed)) => {
                result.fail(outcome, reason);
                Err(failed)
            }
        }
    }

    /// The downstream's first bytes, read at the first call (none without a downstream).
    fn early(&self) -> &Early {
        self.early.get_or_init(|| match self.downstream {
            Some(downstream) => Early::new(early_bytes(downstream)),
            None => Early::default(),
        })
    }

    /// A TCP connect from the pod (from the vouched-for client's address for a tunnel
    /// stream), then the first bytes if an earlier tunnel attempt read them.
    async fn direct(&self, addr: SocketAddr) -> Result<Stream, (Outcome, String, Failed)> {
        let timeout = self.connect_timeout;
        let connected = match self.connect_from {
            Some(client) => upstream::connect_as(self.ctx, self.pod, addr, client, timeout).await,
            None => upstream::connect(self.pod, addr, timeout).await,
        };
        let mut stream = connected
            .map_err(|error| (Outcome::ConnectFailed, error.to_string(), Failed::Retryable))?;
        if let Some(early) = self.early.get().filter(|early| !early.is_empty()) {
            // A new socket's send buffer takes them at once; a failure may come after some
            // went out.
            stream.write_all(early.bytes()).await.map_err(|error| {
                let reason = format!("sending the first bytes: {error}");
                (Outcome::ConnectFailed, reason, Failed::AfterSending)
            })?;
        }
        Ok(Stream::Tcp(stream))
    }
}
