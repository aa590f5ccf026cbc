//! The one path every proxied connection takes, whatever way it came in (outbound capture,
//! plaintext inbound, tunnel stream):
//!
//! 1. **route**: [`route`] turns the destination and the snapshot into a [`Plan`] (local
//!    endpoint, tunnel to an identity, direct, or refused with the reason);
//! 2. **admit**: a destination served here is registered for revocation, then authorized
//!    ([`ProxyContext::admit`]);
//! 3. **connect**: from the pod's network namespace, or through the tunnel pool;
//! 4. **answer** the downstream (a tunnel stream gets its `200` only now) and **copy**, until
//!    both ends close, the idle timeout, or a policy change revokes it;
//! 5. **report**: the [`ConnectionResult`] filled in on the way logs and counts it when it
//!    drops.
//!
//! A new step (a balancer's feedback, a rate limit, a retry) goes here once, for all three
//! ways in.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{net::TcpStream, sync::OwnedSemaphorePermit};

use super::{
    context::{PodHandle, ProxyContext, Refused},
    outcome::{ConnectionResult, Direction, Outcome},
    registry::Tracked,
    route::{self, NoRoute, Plan, Via},
    upstream::{self, TunnelFailure},
};
use crate::{
    copy::{self, CopyError, Transferred},
    tls::SpiffeId,
    tunnel::{PendingStream, Refusal, TunnelStream},
};

/// The downstream side as it was accepted.
pub enum Downstream {
    /// A TCP connection taken by a pod's outbound or inbound listener.
    Tcp(TcpStream),
    /// A CONNECT stream through a tunnel, answered once the upstream is connected.
    Tunnel(PendingStream),
}

/// A connection the proxy took, and what is known of it before routing.
pub struct Accepted {
    pub direction: Direction,
    pub pod: PodHandle,
    pub downstream: Downstream,
    /// The app's socket (outbound), the remote client (inbound), the tunnel peer (tunnel).
    pub client: SocketAddr,
    /// Where the client meant to go; `None` when the capture left no original destination.
    pub destination: Option<SocketAddr>,
    /// The pod's own identity (outbound), the tunnel peer's (tunnel), none (plaintext).
    pub client_identity: Option<SpiffeId>,
}

/// Runs one connection to its end. Never fails: every way it can end is in its result.
pub async fn serve(ctx: Arc<ProxyContext>, accepted: Accepted) {
    let Accepted {
        direction,
        pod,
        downstream,
        client,
        destination,
        client_identity,
    } = accepted;
    let mut result = ConnectionResult::new(
        ctx.metrics.clone(),
        direction,
        pod.key.clone(),
        client,
        client_identity,
        destination,
    );
    let Some(established) = establish(&ctx, &pod, &mut result).await else {
        refuse(downstream, &result);
        return;
    };
    let downstream = match downstream {
        Downstream::Tcp(stream) => Stream::Tcp(stream),
        Downstream::Tunnel(pending) => match pending.accept() {
            Ok(stream) => Stream::Tunnel(stream),
            Err(error) => {
                result.fail(Outcome::Reset, format!("tunnel stream gone: {error}"));
                return;
            }
        },
    };
    result.established();
    let Established {
        upstream,
        tracked,
        copy: (buffer_bytes, idle_timeout),
        _slot,
    } = established;
    let copied = pump(
        downstream,
        upstream,
        buffer_bytes,
        idle_timeout,
        &result.moved,
    );
    // `None`: revoked by a policy change while open.
    let ended = match &tracked {
        None => Some(copied.await),
        Some(tracked) => tokio::select! {
            ended = copied => Some(ended),
            () = tracked.revoked() => None,
        },
    };
    match ended {
        Some(Ok(())) => result.outcome = Outcome::Closed,
        Some(Err(CopyError::Idle(after))) => {
            result.fail(Outcome::IdleTimeout, format!("idle for {after:?}"));
        }
        Some(Err(CopyError::Io(error))) => result.fail(Outcome::Reset, error.to_string()),
        None => result.fail(Outcome::Revoked, "no longer authorized"),
    }
}

/// What [`establish`] hands the copy.
struct Established {
    upstream: Stream,
    /// Registered for revocation when a policy admitted it here.
    tracked: Option<Tracked>,
    /// Buffer bytes and idle timeout, from the snapshot it was routed by.
    copy: (usize, Duration),
    /// The connection-limit slot of a tunnel stream (TCP ones hold theirs in the accept loop).
    _slot: Option<OwnedSemaphorePermit>,
}

/// Route, admit, connect. `None`: refused, with the reason in `result`.
async fn establish(
    ctx: &ProxyContext,
    pod: &PodHandle,
    result: &mut ConnectionResult,
) -> Option<Established> {
    let Some(dst) = result.destination else {
        result.fail(
            Outcome::NoOrigDst,
            "no original destination (a direct connect to the listener, or an evicted flow)",
        );
        return None;
    };
    let config = ctx.config.load_full();
    let routed = match (result.direction, &result.client_identity) {
        (Direction::Outbound, _) => match config.local_workload(&pod.key) {
            Some(source) => route::outbound(&config, source, dst, ctx.balancer.as_ref()),
            None => Err(NoRoute {
                kind: route::RouteKind::None,
                service: None,
                forbidden: false,
                reason: "the pod is no longer configured".into(),
            }),
        },
        (Direction::Inbound, _) => route::inbound(&config, &pod.key, dst),
        (Direction::Tunnel, Some(client)) => route::tunnel(&config, &pod.key, client, dst),
        (Direction::Tunnel, None) => Err(NoRoute {
            kind: route::RouteKind::Tunnel,
            service: None,
            forbidden: true,
            reason: "a tunnel stream without a client identity".into(),
        }),
    };
    let plan: Plan = match routed {
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
    result.upstream = Some(plan.target);
    // Only what the rest needs is kept of the snapshot.
    let (live, tunnel_port) = (&config.agent().live, config.agent().startup.tunnel_port);
    let connect_timeout = live.connect_timeout;
    let copy = (live.buffer_bytes, live.idle_timeout);
    drop(config);

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
    let tracked = match plan.admit.map(|subject| ctx.admit(subject)) {
        None => None,
        Some(Ok((tracked, decision))) => {
            result.policy = decision.policy;
            Some(tracked)
        }
        Some(Err(Refused::Denied(decision))) => {
            result.policy = decision.policy;
            result.fail(Outcome::Denied, decision.reason);
            return None;
        }
        Some(Err(Refused::Gone)) => {
            result.fail(Outcome::NoRoute, "the destination left the configuration");
            return None;
        }
    };
    let upstream = match plan.via {
        Via::Direct => upstream::connect(pod, plan.target, connect_timeout)
            .await
            .map(Stream::Tcp)
            .map_err(|error| (Outcome::ConnectFailed, error.to_string())),
        Via::Tunnel { expected } => {
            let stream = upstream::tunnel(
                &ctx.mesh_tls,
                pod,
                &expected,
                plan.target,
                tunnel_port,
                connect_timeout,
            )
            .await;
            result.tunnel_to = Some(expected);
            stream.map(Stream::Tunnel).map_err(|failure| match failure {
                TunnelFailure::Denied(reason) => (Outcome::Denied, reason),
                TunnelFailure::Failed(reason) => (Outcome::ConnectFailed, reason),
            })
        }
    };
    match upstream {
        Ok(upstream) => Some(Established {
            upstream,
            tracked,
            copy,
            _slot: slot,
        }),
        Err((outcome, reason)) => {
            result.fail(outcome, reason);
            None
        }
    }
}

/// Refuses the downstream the way its kind understands: a TCP reset, or a tunnel response
/// status.
fn refuse(downstream: Downstream, result: &ConnectionResult) {
    match downstream {
        Downstream::Tcp(stream) => upstream::reset(&stream),
        Downstream::Tunnel(pending) => {
            let reason = result.reason.clone().unwrap_or_default();
            let refusal = match result.outcome {
                Outcome::Denied | Outcome::Forbidden => Refusal::Forbidden(reason),
                Outcome::ConnectFailed => Refusal::Unreachable(reason),
                _ => Refusal::Unavailable(reason),
            };
            pending.refuse(&refusal);
        }
    }
}

/// Either side of a connection.
enum Stream {
    Tcp(TcpStream),
    Tunnel(TunnelStream),
}

async fn pump(
    downstream: Stream,
    upstream: Stream,
    buffer_bytes: usize,
    idle_timeout: Duration,
    moved: &Transferred,
) -> Result<(), CopyError> {
    use Stream::{Tcp, Tunnel};
    match (downstream, upstream) {
        (Tcp(mut down), Tcp(mut up)) => {
            copy::tcp(&mut down, &mut up, buffer_bytes, idle_timeout, moved).await
        }
        (Tcp(mut down), Tunnel(up)) => {
            let up = up.into_split();
            copy::halves(down.split(), up, buffer_bytes, idle_timeout, moved).await
        }
        (Tunnel(down), Tcp(mut up)) => {
            let down = down.into_split();
            copy::halves(down, up.split(), buffer_bytes, idle_timeout, moved).await
        }
        (Tunnel(down), Tunnel(up)) => {
            let (down, up) = (down.into_split(), up.into_split());
            copy::halves(down, up, buffer_bytes, idle_timeout, moved).await
        }
    }
}
