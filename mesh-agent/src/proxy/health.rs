//! Active health checks (`trafficPolicy.healthCheck`): a TCP connect to each endpoint of a
//! service every `interval`. An endpoint on this node is probed from inside its own pod, so
//! the connect reaches the app itself (sk_lookup leaves a pod's connections to its own
//! address alone). An endpoint on another node is probed at its pod's tunnel port: its
//! node's agent answers for the pod there, and the app behind it is watched by passive
//! outlier detection. After `unhealthyThreshold` failed checks in a row an endpoint is marked
//! unhealthy (the balancer skips it), after `healthyThreshold` passed ones healthy again.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{net::TcpSocket, task::JoinHandle};

use super::{context::ProxyContext, socket, upstream};
use crate::config::HealthCheck;

/// How often the checker looks for services whose checks are due.
const TICK: Duration = Duration::from_millis(250);

/// Failed or passed checks in a row of one endpoint.
#[derive(Default)]
struct Streak {
    failed: u32,
    passed: u32,
    healthy: bool,
}

/// Runs the checks until the task is aborted.
pub fn spawn(ctx: Arc<ProxyContext>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut streaks: HashMap<(String, u16, SocketAddr), Streak> = HashMap::new();
        let mut last_run: HashMap<(String, u16), Instant> = HashMap::new();
        let mut tick = tokio::time::interval(TICK);
        loop {
            tick.tick().await;
            let now = Instant::now();
            let mut live = Vec::new();
            for balancer in ctx.balancers.all() {
                let (service, port) = (balancer.service().to_owned(), balancer.port());
                let Some(check) = balancer.policy().health_check else {
                    continue;
                };
                let key = (service.clone(), port);
                live.push(key.clone());
                if last_run
                    .get(&key)
                    .is_some_and(|at| now.duration_since(*at) < check.interval)
                {
                    continue;
                }
                last_run.insert(key, now);
                let endpoints: Vec<SocketAddr> = balancer.endpoints().map(|e| e.addr).collect();
                // Concurrently, each bounded by the check's timeout.
                let probes: Vec<_> = endpoints
                    .iter()
                    .map(|addr| tokio::spawn(probe(ctx.clone(), *addr, check)))
                    .collect();
                let mut results = Vec::with_capacity(probes.len());
                for probe in probes {
                    results.push(probe.await.unwrap_or(false));
                }
                for (addr, ok) in endpoints.iter().zip(results) {
                    ctx.metrics.health_check(&service, ok);
                    let streak = streaks
                        .entry((service.clone(), port, *addr))
                        .or_insert_with(|| Streak {
                            healthy: true,
                            ..Streak::default()
                        });
                    if let Some(healthy) = record(streak, ok, &check) {
                        tracing::info!(service, endpoint = %addr, healthy, "health check changed the endpoint's state");
                        balancer.set_health(*addr, healthy);
                    }
                }
            }
            // Forget services that are gone or no longer checked.
            last_run.retain(|key, _| live.contains(key));
            streaks.retain(|(service, port, _), _| live.contains(&(service.clone(), *port)));
        }
    })
}

/// Counts one result; `Some(state)` when the endpoint's state changes.
fn record(streak: &mut Streak, ok: bool, check: &HealthCheck) -> Option<bool> {
    if ok {
        streak.passed += 1;
        streak.failed = 0;
        if !streak.healthy && streak.passed >= check.healthy_threshold {
            streak.healthy = true;
            return Some(true);
        }
    } else {
        streak.failed += 1;
        streak.passed = 0;
        if streak.healthy && streak.failed >= check.unhealthy_threshold {
            streak.healthy = false;
            return Some(false);
        }
    }
    None
}

/// Where a probe goes: from inside a local pod, or from the node.
enum Probe {
    FromPod(Option<super::context::PodHandle>),
    FromNode { addr: SocketAddr, mark: u32 },
}

async fn probe(ctx: Arc<ProxyContext>, addr: SocketAddr, check: HealthCheck) -> bool {
    // Decided from one look at the snapshot, let go of before any await.
    let route = {
        let config = ctx.config.load();
        let mark = config.agent().startup.proxy_mark;
        match config.workload_by_ip(addr.ip()) {
            // Outside the mesh: straight from the node.
            None => Probe::FromNode { addr, mark },
            Some(workload) if workload.local => {
                let key = workload.qualified_name().to_string();
                Probe::FromPod(ctx.pods.read().get(key.as_str()).cloned())
            }
            Some(_) => Probe::FromNode {
                addr: SocketAddr::new(addr.ip(), config.agent().startup.tunnel_port),
                mark,
            },
        }
    };
    match route {
        Probe::FromPod(Some(pod)) => upstream::connect(&pod, addr, check.timeout).await.is_ok(),
        Probe::FromPod(None) => false,
        Probe::FromNode { addr, mark } => node_connect(addr, mark, check.timeout).await,
    }
}

/// A connect from the agent's own network namespace, with the proxy mark.
async fn node_connect(addr: SocketAddr, mark: u32, timeout: Duration) -> bool {
    let Ok(socket) = socket::upstream(addr, mark) else {
        return false;
    };
    let socket = TcpSocket::from_std_stream(socket);
    matches!(
        tokio::time::timeout(timeout, socket.connect(addr)).await,
        Ok(Ok(_))
    )
}

#[cfg(test)]
mod tests {
    use super::{HealthCheck, Streak, record};

    #[test]
    fn thresholds_flip_the_state_once_each_way() {
        let check = HealthCheck {
            unhealthy_threshold: 2,
            healthy_threshold: 3,
            ..HealthCheck::default()
        };
        let mut streak = Streak {
            healthy: true,
            ..Streak::default()
        };
        assert_eq!(record(&mut streak, false, &check), None);
        assert_eq!(record(&mut streak, false, &check), Some(false));
        assert_eq!(record(&mut streak, false, &check), None);
        assert_eq!(record(&mut streak, true, &check), None);
        assert_eq!(record(&mut streak, true, &check), None);
        assert_eq!(record(&mut streak, true, &check), Some(true));
        assert_eq!(record(&mut streak, true, &check), None);
    }
}
