//! The YAML document as written, with source positions (`Spanned`) on everything a semantic
//! check may have to point at. Only [`super::validate`] reads it.
//!
//! Numbers that must fit a narrower type (ports, marks) are read as `u64` so that validation,
//! not the YAML layer, says what the allowed range is. Addresses are read as strings for the
//! same reason.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_saphyr::Spanned;

use super::{
    authorization::AuthorizationAction,
    model::{FailMode, UnknownDestination},
};

pub(super) type S<T> = Spanned<T>;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawConfig {
    pub agent: Option<RawAgent>,
    pub nodes: Option<Vec<S<RawNode>>>,
    pub workloads: Option<Vec<S<RawWorkload>>>,
    pub services: Option<Vec<S<RawService>>>,
    pub policies: Option<RawPolicies>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawNode {
    pub name: S<String>,
    pub labels: Option<BTreeMap<String, S<String>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawAgent {
    pub node: Option<S<String>>,
    pub cgroup: Option<S<String>>,
    pub bpf_name: Option<S<String>>,
    pub outbound_port: Option<S<u64>>,
    pub inbound_port: Option<S<u64>>,
    pub tunnel_port: Option<S<u64>>,
    pub admin_addr: Option<S<String>>,
    pub proxy_mark: Option<S<u64>>,
    pub transparent_mark: Option<S<u64>>,
    pub reply_table: Option<S<u64>>,
    pub excluded_ports: Option<Vec<S<u64>>>,
    pub excluded_cidrs: Option<Vec<S<String>>>,
    pub connect_timeout_ms: Option<S<u64>>,
    pub idle_timeout_ms: Option<S<u64>>,
    pub buffer_bytes: Option<S<u64>>,
    pub max_connections: Option<S<u64>>,
    pub trust_domain: Option<S<String>>,
    pub ca_cert_file: Option<S<String>>,
    pub ca_key_file: Option<S<String>>,
    pub trust_root_files: Option<Vec<S<String>>>,
    pub cert_lifetime_minutes: Option<S<u64>>,
    pub tunnel_idle_timeout_ms: Option<S<u64>>,
    pub tunnel_connections_per_peer: Option<S<u64>>,
    pub drain_timeout_ms: Option<S<u64>>,
    pub access_log: Option<RawAccessLog>,
    pub istio_metrics: Option<bool>,
    pub splice: Option<bool>,
    pub ca: Option<S<RawRemoteCa>>,
    pub fast_path: Option<bool>,
}

/// The access log, for all pods (`agent.accessLog`) or one workload (`workloads[].accessLog`,
/// where an absent field keeps the agent's).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawAccessLog {
    pub enabled: Option<bool>,
    pub sample_percent: Option<S<u64>>,
}

/// `agent.ca`: the certificate authority off the node.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawRemoteCa {
    pub address: S<String>,
    pub node_cert_file: Option<S<String>>,
    pub node_key_file: Option<S<String>>,
    pub token_file: Option<S<String>>,
    pub check_interval_ms: Option<S<u64>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawWorkload {
    pub name: S<String>,
    pub namespace: Option<S<String>>,
    pub service_account: Option<S<String>>,
    pub ips: S<Vec<S<String>>>,
    pub node: Option<S<String>>,
    pub netns: Option<S<String>>,
    pub labels: Option<BTreeMap<String, String>>,
    pub fail_mode: Option<FailMode>,
    pub unknown_destination: Option<UnknownDestination>,
    pub access_log: Option<RawAccessLog>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawService {
    pub name: S<String>,
    pub namespace: Option<S<String>>,
    pub vips: S<Vec<S<String>>>,
    pub ports: S<Vec<S<RawPort>>>,
    pub endpoints: S<RawEndpoints>,
    /// With no value: the defaults, as when absent.
    pub traffic_policy: Option<RawTrafficPolicy>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawPort {
    pub port: S<u64>,
    pub target_port: Option<S<u64>>,
    pub name: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawEndpoints {
    pub selector: Option<S<BTreeMap<String, String>>>,
    pub workloads: Option<S<Vec<S<String>>>>,
    pub addresses: Option<S<Vec<S<String>>>>,
    /// Workload name (or address, in `addresses` mode) -> weight.
    #[serde(default, deserialize_with = "present")]
    pub weights: Present<BTreeMap<String, S<u64>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawPolicies {
    pub authorization: Option<Vec<S<RawAuthorizationPolicy>>>,
    pub rate_limits: Option<Vec<S<RawRateLimit>>>,
    pub egress_limits: Option<Vec<S<RawEgressLimit>>>,
}

/// In the policy blocks a key written with no value (`from:`, `ports:`) must not silently mean
/// "no condition": those fields are read with [`present`], so that `Some(value: None)` is an
/// explicit null, refused by validation, and `None` an absent key. The blocks of a traffic
/// policy and of the rate limits are read the same way: `outlierDetection:` with no value
/// could mean "off" as well as "the defaults", so neither is guessed.
pub(super) type Present<T> = Option<S<Option<T>>>;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawAuthorizationPolicy {
    pub name: S<String>,
    pub namespace: Option<S<String>>,
    #[serde(default, deserialize_with = "present")]
    pub selector: Present<BTreeMap<String, String>>,
    #[serde(default, deserialize_with = "present")]
    pub action: Present<AuthorizationAction>,
    #[serde(default, deserialize_with = "present")]
    pub rules: Present<Vec<S<RawRule>>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawRule {
    #[serde(default, deserialize_with = "present")]
    pub from: Present<RawFrom>,
    #[serde(default, deserialize_with = "present")]
    pub ports: Present<Vec<S<u64>>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawFrom {
    #[serde(default, deserialize_with = "present")]
    pub identities: Present<Vec<S<String>>>,
    #[serde(default, deserialize_with = "present")]
    pub identity_prefixes: Present<Vec<S<String>>>,
    #[serde(default, deserialize_with = "present")]
    pub namespaces: Present<Vec<S<String>>>,
}

// ---- trafficPolicy --------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawTrafficPolicy {
    #[serde(default, deserialize_with = "present")]
    pub load_balancer: Present<RawLoadBalancer>,
    #[serde(default, deserialize_with = "present")]
    pub locality: Present<RawLocality>,
    #[serde(default, deserialize_with = "present")]
    pub outlier_detection: Present<RawOutlierDetection>,
    #[serde(default, deserialize_with = "present")]
    pub health_check: Present<RawHealthCheck>,
    #[serde(default, deserialize_with = "present")]
    pub retries: Present<RawRetries>,
    pub connect_timeout_ms: Option<S<u64>>,
    pub idle_timeout_ms: Option<S<u64>>,
    pub max_connection_lifetime_ms: Option<S<u64>>,
    #[serde(default, deserialize_with = "present")]
    pub circuit_breaker: Present<RawCircuitBreaker>,
    #[serde(default, deserialize_with = "present")]
    pub subsets: Present<Vec<S<RawSubset>>>,
    #[serde(default, deserialize_with = "present")]
    pub caller_routes: Present<Vec<S<RawCallerRoute>>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawLoadBalancer {
    pub algorithm: Option<S<RawAlgorithm>>,
    pub hash_on: Option<S<RawHashOn>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) enum RawAlgorithm {
    RoundRobin,
    Random,
    Weighted,
    LeastConnections,
    PeakEwma,
    Maglev,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) enum RawHashOn {
    SourceIp,
    SourceIdentity,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawLocality {
    pub enabled: Option<bool>,
    pub min_healthy_percent: Option<S<u64>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawOutlierDetection {
    pub enabled: Option<bool>,
    pub consecutive_failures: Option<S<u64>>,
    pub base_ejection_ms: Option<S<u64>>,
    pub max_ejection_ms: Option<S<u64>>,
    pub max_ejected_percent: Option<S<u64>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawHealthCheck {
    pub enabled: Option<bool>,
    pub interval_ms: Option<S<u64>>,
    pub timeout_ms: Option<S<u64>>,
    pub unhealthy_threshold: Option<S<u64>>,
    pub healthy_threshold: Option<S<u64>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawRetries {
    pub attempts: Option<S<u64>>,
    pub budget_percent: Option<S<u64>>,
    pub min_retries_per_second: Option<S<u64>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawCircuitBreaker {
    pub max_connections: Option<S<u64>>,
    pub max_pending_connects: Option<S<u64>>,
    pub max_connections_per_endpoint: Option<S<u64>>,
    pub max_pending_connects_per_endpoint: Option<S<u64>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawSubset {
    pub name: S<String>,
    pub labels: S<BTreeMap<String, String>>,
    pub weight: S<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawCallerRoute {
    #[serde(default, deserialize_with = "present")]
    pub from: Present<RawCallerFrom>,
    pub subset: S<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawCallerFrom {
    #[serde(default, deserialize_with = "present")]
    pub labels: Present<BTreeMap<String, String>>,
    #[serde(default, deserialize_with = "present")]
    pub identities: Present<Vec<S<String>>>,
}

// ---- rateLimits, egressLimits ---------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawRateLimit {
    pub name: S<String>,
    pub namespace: Option<S<String>>,
    #[serde(default, deserialize_with = "present")]
    pub selector: Present<BTreeMap<String, String>>,
    #[serde(default, deserialize_with = "present")]
    pub connections: Present<RawRate>,
    #[serde(default, deserialize_with = "present")]
    pub bandwidth: Present<RawBandwidth>,
    #[serde(default, deserialize_with = "present")]
    pub per_source: Present<RawPerSource>,
    #[serde(default, deserialize_with = "present")]
    pub on_limit: Present<RawOnLimit>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawEgressLimit {
    pub name: S<String>,
    pub namespace: Option<S<String>>,
    #[serde(default, deserialize_with = "present")]
    pub selector: Present<BTreeMap<String, String>>,
    #[serde(default, deserialize_with = "present")]
    pub connections: Present<RawRate>,
    #[serde(default, deserialize_with = "present")]
    pub bandwidth: Present<RawBandwidth>,
    #[serde(default, deserialize_with = "present")]
    pub on_limit: Present<RawOnLimit>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawRate {
    pub per_second: S<u64>,
    pub burst: Option<S<u64>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawBandwidth {
    pub bytes_per_second: S<u64>,
    pub burst_bytes: Option<S<u64>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawPerSource {
    #[serde(default, deserialize_with = "present")]
    pub connections: Present<RawRate>,
    #[serde(default, deserialize_with = "present")]
    pub bandwidth: Present<RawBandwidth>,
    #[serde(default, deserialize_with = "present")]
    pub overrides: Present<Vec<S<RawOverride>>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawOverride {
    #[serde(default, deserialize_with = "present")]
    pub identities: Present<Vec<S<String>>>,
    #[serde(default, deserialize_with = "present")]
    pub connections: Present<RawRate>,
    #[serde(default, deserialize_with = "present")]
    pub bandwidth: Present<RawBandwidth>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawOnLimit {
    pub action: S<RawLimitAction>,
    pub max_wait_ms: Option<S<u64>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) enum RawLimitAction {
    Reject,
    Wait,
}

/// Called only when the key is present: wraps the (possibly null) value in `Some`.
fn present<'de, D, T>(de: D) -> Result<Present<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    S::<Option<T>>::deserialize(de).map(Some)
}
