//! Outbound: connections the connect4/6 programs redirected to the pod's outbound listener.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::net::{TcpSocket, TcpStream};

use super::{PodHandle, ProxyContext, copy, mesh_tls, registry::Subject, route, route::Route};
use crate::{authz, config::AgentConfig, ebpf, tls::SpiffeId, tunnel::TunnelStream};

pub(super) async fn handle(
    ctx: Arc<ProxyContext>,
    pod: PodHandle,
    mut downstream: TcpStream,
    peer: SocketAddr,
) {
    let started = tokio::time::Instant::now();
    let key = ebpf::flow_key(pod.netns.cookie(), peer);
    let orig = ctx
        .datapath
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .take_orig_dst(&key)
        .and_then(|orig| ebpf::decode_addr(&orig.dst));
    let Some(dst) = orig else {
        // Someone connected to the listener directly, or the flow entry was evicted.
        tracing::warn!(pod = %pod.key, %peer, "no original destination; closing");
        ctx.metrics.connection("outbound", "no_orig_dst");
        reset(&downstream);
        return;
    };
    let config = ctx.config.load_full();
    let Some(source) = config.local_workload(&pod.key) else {
        tracing::warn!(pod = %pod.key, %dst, "pod no longer configured; closing");
        reset(&downstream);
        return;
    };
    let route = route::outbound(&config, source, dst, ctx.balancer.as_ref());
    let (target, kind) = match &route {
        Route::Service { endpoint, .. } => (*endpoint, "service"),
        Route::Pod { addr, .. } => (*addr, "pod"),
        Route::Passthrough { addr } => (*addr, "passthrough"),
        Route::Deny { reason } => {
            tracing::info!(target: "access", direction = "outbound", pod = %pod.key, %dst, result = "denied", %reason);
            ctx.metrics.connection("outbound", "denied");
            reset(&downstream);
            return;
        }
    };
    // The snapshot is held until the upstream is connected; the copy keeps only what it needs.
    let agent = config.agent();
    let mut tracked = None;
    let upstream = match config.workload_by_ip(target.ip()) {
        // A pod on this node is reached directly, not through its inbound side: its inbound
        // policy is applied here, with the source pod's identity, which this agent knows.
        Some(destination) if destination.local => {
            let source_id = pod.identity.to_string();
            let decision = authz::authorize(&config, Some(&source_id), destination, target.port());
            if !decision.allowed {
                tracing::info!(target: "access", direction = "outbound", pod = %pod.key, %dst, upstream = %target, result = "denied", reason = decision.reason, policy = ?decision.policy);
                ctx.metrics.connection("outbound", "denied");
                reset(&downstream);
                return;
            }
            tracked = Some(ctx.connections.track(Subject {
                source: Some(source_id),
                destination: destination.qualified_name().to_string(),
                port: target.port(),
            }));
            connect(&pod, target, agent)
                .await
                .map(Upstream::Direct)
                .map_err(|e| e.to_string())
        }
        // A pod of another node: through an mTLS tunnel to its node's agent, which checks
        // our identity and its policy.
        Some(destination) => {
            match SpiffeId::new(
                &agent.trust_domain,
                &destination.namespace,
                &destination.service_account,
            ) {
                Ok(expected) => {
                    mesh_tls::connect_remote(&ctx.mesh_tls, &pod, &expected, target, agent)
                        .await
                        .map(Upstream::Tunnel)
                        .map_err(|e| e.to_string())
                }
                Err(error) => Err(error.to_string()),
            }
        }
        // Outside the mesh: plain TCP from the pod.
        None => connect(&pod, target, agent)
            .await
            .map(Upstream::Direct)
            .map_err(|e| e.to_string()),
    };
    let (buffer_bytes, idle_timeout) = (agent.buffer_bytes, agent.idle_timeout);
    drop(config);
    let upstream = match upstream {
        Ok(upstream) => upstream,
        Err(error) => {
            tracing::info!(target: "access", direction = "outbound", pod = %pod.key, %dst, upstream = %target, result = "connect_failed", %error);
            ctx.metrics.connection("outbound", "connect_failed");
            reset(&downstream);
            return;
        }
    };
    let kind = if matches!(upstream, Upstream::Tunnel(_)) {
        "tunnel"
    } else {
        kind
    };
    ctx.metrics.connection("outbound", kind);
    let _active = ctx.metrics.active("outbound");
    let result = match upstream {
        Upstream::Direct(mut upstream) => {
            copy::bidirectional(
                &mut downstream,
                &mut upstream,
                buffer_bytes,
                idle_timeout,
                tracked.as_ref(),
            )
            .await
        }
        Upstream::Tunnel(stream) => {
            let (down_read, down_write) = downstream.split();
            copy::bidirectional_halves(
                (down_read, down_write),
                stream.into_split(),
                buffer_bytes,
                idle_timeout,
            )
            .await
        }
    };
    let (sent, received, outcome) = match &result {
        Ok(moved) => (
            moved.downstream_to_upstream,
            moved.upstream_to_downstream,
            "closed".to_string(),
        ),
        Err(error) => (0, 0, error.to_string()),
    };
    ctx.metrics.bytes("outbound", sent, received);
    tracing::info!(
        target: "access",
        direction = "outbound",
        pod = %pod.key,
        %peer,
        %dst,
        route = kind,
        upstream = %target,
        sent,
        received,
        duration_ms = started.elapsed().as_millis() as u64,
        result = %outcome,
    );
}

enum Upstream {
    Direct(TcpStream),
    Tunnel(TunnelStream),
}

/// Connects to `target` from inside the pod's network namespace, so the destination sees
/// the pod's own address, with the proxy mark so the connect is not captured again.
pub async fn connect(
    pod: &PodHandle,
    target: SocketAddr,
    agent: &AgentConfig,
) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::from_std_stream(pod.sockets.take(target).await?);
    match tokio::time::timeout(agent.connect_timeout, socket.connect(target)).await {
        Ok(result) => result,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "connect timed out",
        )),
    }
}

/// Closes with a reset, so the app sees a refused connection rather than an empty reply.
pub fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}
