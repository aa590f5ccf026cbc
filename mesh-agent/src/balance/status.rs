//! What `/status` shows of the balancers: per service port its algorithm, circuit counters
//! and retry budget, and per endpoint its place, state and live counters.

use std::sync::atomic::Ordering::Relaxed;

use serde::{Deserialize, Serialize};

use super::{budget::RetryBudgetStatus, clock, service::ServiceBalancer};
use crate::config::{HashOn, LoadBalancer};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStatus {
    /// `namespace/name`
    pub service: String,
    pub port: u16,
    /// `roundRobin`, `random`, `weighted`, `leastConnections`, `peakEwma`,
    /// `maglev(sourceIp)` or `maglev(sourceIdentity)`.
    pub algorithm: String,
    pub circuit: CircuitStatus,
    pub retry_budget: RetryBudgetStatus,
    pub endpoints: Vec<EndpointStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CircuitStatus {
    /// Connections open now, and the limit.
    pub active: u32,
    pub max_connections: Option<u32>,
    /// Connects in flight now, and the limit.
    pub pending: u32,
    pub max_pending: Option<u32>,
    /// Picks refused by each limit since the service port appeared.
    pub refused_max_connections: u64,
    pub refused_max_pending: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointStatus {
    pub address: String,
    pub node: Option<String>,
    pub zone: Option<String>,
    /// The subsets it belongs to.
    pub subsets: Vec<String>,
    pub weight: u32,
    /// `state` (`healthy`, `ejected` with `until`, `unhealthy`), flattened into the endpoint.
    #[serde(flatten)]
    pub state: EndpointState,
    pub active: u32,
    pub pending: u32,
    /// The peak-EWMA connect latency estimate now; `None` until a connect was measured.
    pub latency_ms: Option<f64>,
    /// Ejections so far.
    pub ejections: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "state")]
pub enum EndpointState {
    Healthy,
    /// Ejected by outlier detection until `until` (seconds since the Unix epoch).
    Ejected {
        until: u64,
    },
    /// Marked down by the active health check.
    Unhealthy,
}

impl ServiceBalancer {
    pub fn status(&self) -> ServiceStatus {
        let now = clock::now();
        let spec = &self.spec;
        let shared = &self.shared;
        let limits = &spec.policy.circuit_breaker;
        let endpoints = (0u32..)
            .zip(spec.endpoints.iter().zip(&self.stats))
            .map(|(i, (e, stats))| {
                let state = if stats.ejected(now) {
                    EndpointState::Ejected {
                        until: clock::unix_seconds(stats.ejected_until.load(Relaxed)),
                    }
                } else if stats.unhealthy.load(Relaxed) {
                    EndpointState::Unhealthy
                } else {
                    EndpointState::Healthy
                };
                EndpointStatus {
                    address: e.addr.to_string(),
                    node: e.node.clone(),
                    zone: e.zone.clone(),
                    subsets: spec
                        .policy
                        .subsets
                        .iter()
                        .zip(&spec.subsets)
                        .filter(|(_, members)| members.contains(&i))
                        .map(|(s, _)| s.name.clone())
                        .collect(),
                    weight: e.weight,
                    state,
                    active: stats.active.load(Relaxed),
                    pending: stats.pending.load(Relaxed),
                    latency_ms: stats.measured().then(|| stats.latency(now) / 1e6),
                    ejections: stats.ejections.load(Relaxed),
                }
            })
            .collect();
        ServiceStatus {
            service: spec.service.clone(),
            port: spec.port,
            algorithm: algorithm_name(spec.policy.load_balancer).to_owned(),
            circuit: CircuitStatus {
                active: shared.active.load(Relaxed),
                max_connections: limits.max_connections,
                pending: shared.pending.load(Relaxed),
                max_pending: limits.max_pending,
                refused_max_connections: shared.refused_connections.load(Relaxed),
                refused_max_pending: shared.refused_pending.load(Relaxed),
            },
            retry_budget: shared.budget.status(&spec.policy.retries, now),
            endpoints,
        }
    }
}

fn algorithm_name(algorithm: LoadBalancer) -> &'static str {
    match algorithm {
        LoadBalancer::RoundRobin => "roundRobin",
        LoadBalancer::Random => "random",
        LoadBalancer::Weighted => "weighted",
        LoadBalancer::LeastConnections => "leastConnections",
        LoadBalancer::PeakEwma => "peakEwma",
        LoadBalancer::Maglev {
            hash_on: HashOn::SourceIp,
        } => "maglev(sourceIp)",
        LoadBalancer::Maglev {
            hash_on: HashOn::SourceIdentity,
        } => "maglev(sourceIdentity)",
    }
}
