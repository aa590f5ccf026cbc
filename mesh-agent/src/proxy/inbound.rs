//! Inbound: connections to the pod from outside it, handed to the inbound listener by the
//! sk_lookup program. The accepted socket's local address is the original destination and
//! its peer the real client, so inbound policy (a later issue) can judge both.

use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpStream;

use super::{PodHandle, ProxyContext, copy, outbound, registry::Subject};
use crate::authz;

pub(super) async fn handle(
    ctx: Arc<ProxyContext>,
    pod: PodHandle,
    mut downstream: TcpStream,
    client: SocketAddr,
) {
    let started = tokio::time::Instant::now();
    let Ok(dst) = downstream.local_addr() else {
        return;
    };
    let config = ctx.config.load_full();
    let agent = config.agent();
    let (first, last) = agent.proxy_port_range();
    if (first..=last).contains(&dst.port()) {
        // A connection to a proxy port itself would loop back here.
        outbound::reset(&downstream);
        return;
    }
    let Some(workload) = config.local_workload(&pod.key) else {
        outbound::reset(&downstream);
        return;
    };
    // Plaintext: the client is unauthenticated, so only policies without identity
    // conditions can allow it.
    let decision = authz::authorize(&config, None, workload, dst.port());
    if !decision.allowed {
        tracing::info!(target: "access", direction = "inbound", pod = %pod.key, %client, %dst, result = "denied", reason = decision.reason, policy = ?decision.policy);
        ctx.metrics.connection("inbound", "denied");
        outbound::reset(&downstream);
        return;
    }
    let tracked = ctx.connections.track(Subject {
        source: None,
        destination: pod.key.clone(),
        port: dst.port(),
    });
    // The app is in this pod: connect from inside its netns to its own address. The
    // sk_lookup program leaves connections from the pod's own addresses alone.
    let mut upstream = match outbound::connect(&pod, dst, agent).await {
        Ok(upstream) => upstream,
        Err(error) => {
            tracing::info!(target: "access", direction = "inbound", pod = %pod.key, %client, %dst, result = "connect_failed", %error);
            ctx.metrics.connection("inbound", "connect_failed");
            outbound::reset(&downstream);
            return;
        }
    };
    ctx.metrics.connection("inbound", "plaintext");
    let _active = ctx.metrics.active("inbound");
    // The copy keeps only what it needs of the snapshot.
    let (buffer_bytes, idle_timeout) = (agent.buffer_bytes, agent.idle_timeout);
    drop(config);
    let result = copy::bidirectional(
        &mut downstream,
        &mut upstream,
        buffer_bytes,
        idle_timeout,
        Some(&tracked),
    )
    .await;
    let (received, sent, outcome) = match &result {
        Ok(moved) => (
            moved.downstream_to_upstream,
            moved.upstream_to_downstream,
            "closed".to_string(),
        ),
        Err(error) => (0, 0, error.to_string()),
    };
    ctx.metrics.bytes("inbound", received, sent);
    tracing::info!(
        target: "access",
        direction = "inbound",
        pod = %pod.key,
        %client,
        %dst,
        received,
        sent,
        duration_ms = started.elapsed().as_millis() as u64,
        result = %outcome,
    );
}
