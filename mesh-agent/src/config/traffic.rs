//! What a service's callers do (`services[].trafficPolicy`): balancing, locality, outlier
//! ejection and active health checks, retries, timeouts, circuit breaking, and the traffic
//! split between subsets. Plain values, validated by the file source; applied live by
//! `crate::balance` and the connection pipeline.

use std::{collections::BTreeMap, time::Duration};

use serde::Serialize;

use super::dump;
use crate::tls::SpiffeId;

/// Defaults of `trafficPolicy`.
pub mod defaults {
    use std::time::Duration;

    pub const MIN_HEALTHY_PERCENT: u8 = 50;
    pub const CONSECUTIVE_FAILURES: u32 = 5;
    pub const BASE_EJECTION: Duration = Duration::from_secs(30);
    pub const MAX_EJECTION: Duration = Duration::from_secs(300);
    pub const MAX_EJECTED_PERCENT: u8 = 50;
    pub const HEALTH_INTERVAL: Duration = Duration::from_secs(10);
    pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
    pub const UNHEALTHY_THRESHOLD: u32 = 2;
    pub const HEALTHY_THRESHOLD: u32 = 1;
    pub const RETRY_ATTEMPTS: u32 = 2;
    pub const RETRY_BUDGET_PERCENT: u32 = 20;
    pub const MIN_RETRIES_PER_SECOND: u32 = 10;
    /// The node label that names a node's zone (Kubernetes' well-known label).
    pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
}

/// `services[].trafficPolicy`; every part has a default, so a service without the block
/// gets [`TrafficPolicy::default`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicy {
    pub load_balancer: LoadBalancer,
    pub locality: Locality,
    /// Passive: consecutive connect failures eject an endpoint. `None`: off.
    pub outlier_detection: Option<OutlierDetection>,
    /// Active TCP checks. `None`: off.
    pub health_check: Option<HealthCheck>,
    pub retries: Retries,
    /// Override `agent.connectTimeoutMs` / `agent.idleTimeoutMs` for this service.
    #[serde(rename = "connectTimeoutMs", serialize_with = "dump::millis_opt")]
    pub connect_timeout: Option<Duration>,
    #[serde(rename = "idleTimeoutMs", serialize_with = "dump::millis_opt")]
    pub idle_timeout: Option<Duration>,
    /// A connection is closed after this long, however busy. `None`: no limit.
    #[serde(
        rename = "maxConnectionLifetimeMs",
        serialize_with = "dump::millis_opt"
    )]
    pub max_connection_lifetime: Option<Duration>,
    pub circuit_breaker: CircuitBreaker,
    /// Weighted subsets of the endpoints (by labels). Empty: one implicit subset of all.
    pub subsets: Vec<Subset>,
    /// A/B by caller: the first route whose `from` matches the caller chooses its subset,
    /// before any weight.
    pub caller_routes: Vec<CallerRoute>,
}

impl Default for TrafficPolicy {
    fn default() -> Self {
        Self {
            load_balancer: LoadBalancer::default(),
            locality: Locality::default(),
            outlier_detection: Some(OutlierDetection::default()),
            health_check: None,
            retries: Retries::default(),
            connect_timeout: None,
            idle_timeout: None,
            max_connection_lifetime: None,
            circuit_breaker: CircuitBreaker::default(),
            subsets: Vec::new(),
            caller_routes: Vec::new(),
        }
    }
}

/// `trafficPolicy.loadBalancer`: `{algorithm: ..., hashOn: ...}`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(
    tag = "algorithm",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
pub enum LoadBalancer {
    /// Each endpoint in turn.
    RoundRobin,
    /// Uniformly at random.
    Random,
    /// At random, in proportion to the endpoints' weights.
    Weighted,
    /// Power of two choices on active connections (plus connects in flight).
    LeastConnections,
    /// Power of two choices on connect latency (peak-sensitive, decaying average) times
    /// load: the default, because it steers away from both slow and busy endpoints without
    /// configuration.
    #[default]
    PeakEwma,
    /// Consistent hashing (Maglev) on the source: a source stays on its endpoint, and
    /// removing one of N endpoints moves about 1/N of the sources.
    Maglev { hash_on: HashOn },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum HashOn {
    /// The client's IP address.
    #[default]
    SourceIp,
    /// The client's SPIFFE identity (all pods of one service account together).
    SourceIdentity,
}

/// `trafficPolicy.locality`: prefer endpoints on this node, then in this node's zone, then
/// anywhere. A tier is used while at least `min_healthy_percent` of its endpoints (and at
/// least one) are usable; otherwise traffic fails over to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Locality {
    pub enabled: bool,
    pub min_healthy_percent: u8,
}

impl Default for Locality {
    fn default() -> Self {
        Self {
            enabled: true,
            min_healthy_percent: defaults::MIN_HEALTHY_PERCENT,
        }
    }
}

/// `trafficPolicy.outlierDetection`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    /// Connect failures (or resets before any byte came back) in a row that eject.
    pub consecutive_failures: u32,
    /// The first ejection lasts this long; each further one of the same endpoint twice as
    /// long, up to `max_ejection`.
    #[serde(rename = "baseEjectionMs", serialize_with = "dump::millis")]
    pub base_ejection: Duration,
    #[serde(rename = "maxEjectionMs", serialize_with = "dump::millis")]
    pub max_ejection: Duration,
    /// Never more than this share of the endpoints ejected at once.
    pub max_ejected_percent: u8,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            consecutive_failures: defaults::CONSECUTIVE_FAILURES,
            base_ejection: defaults::BASE_EJECTION,
            max_ejection: defaults::MAX_EJECTION,
            max_ejected_percent: defaults::MAX_EJECTED_PERCENT,
        }
    }
}

/// `trafficPolicy.healthCheck`: a TCP connect to each endpoint every `interval`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthCheck {
    #[serde(rename = "intervalMs", serialize_with = "dump::millis")]
    pub interval: Duration,
    #[serde(rename = "timeoutMs", serialize_with = "dump::millis")]
    pub timeout: Duration,
    /// Failed checks in a row that mark an endpoint unhealthy, and passed ones that mark it
    /// healthy again.
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        Self {
            interval: defaults::HEALTH_INTERVAL,
            timeout: defaults::HEALTH_TIMEOUT,
            unhealthy_threshold: defaults::UNHEALTHY_THRESHOLD,
            healthy_threshold: defaults::HEALTHY_THRESHOLD,
        }
    }
}

/// `trafficPolicy.retries`: a failed connect (no byte sent yet, so always safe) is retried on
/// another endpoint, up to `attempts` more times, while the retry budget allows: retries stay
/// under `budget_percent` of the connections of the last 10 s, or `min_retries_per_second`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Retries {
    pub attempts: u32,
    pub budget_percent: u32,
    pub min_retries_per_second: u32,
}

impl Default for Retries {
    fn default() -> Self {
        Self {
            attempts: defaults::RETRY_ATTEMPTS,
            budget_percent: defaults::RETRY_BUDGET_PERCENT,
            min_retries_per_second: defaults::MIN_RETRIES_PER_SECOND,
        }
    }
}

/// `trafficPolicy.circuitBreaker`: beyond a limit a new connection is refused at once (a
/// reset), never queued. `None`: no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CircuitBreaker {
    /// Connections open to the service (this node's callers).
    pub max_connections: Option<u32>,
    /// Connects in flight to the service.
    #[serde(rename = "maxPendingConnects")]
    pub max_pending: Option<u32>,
    /// The same per endpoint: an endpoint at its limit is skipped.
    pub max_connections_per_endpoint: Option<u32>,
    #[serde(rename = "maxPendingConnectsPerEndpoint")]
    pub max_pending_per_endpoint: Option<u32>,
}

/// `trafficPolicy.subsets[]`: the endpoints whose workload labels include `labels`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Subset {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Relative weight; 0 takes no traffic by weight (a caller route may still choose it).
    pub weight: u32,
}

/// `trafficPolicy.callerRoutes[]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CallerRoute {
    pub from: CallerMatch,
    /// The name of one of the service's subsets.
    pub subset: String,
}

/// Matches a caller when every condition given matches; at least one is given.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CallerMatch {
    /// The calling workload's labels include these.
    pub labels: BTreeMap<String, String>,
    /// The caller's identity is one of these.
    pub identities: Vec<SpiffeId>,
}
