//! The plain values the rate limits hand out: who a bucket belongs to, why a connection was
//! refused, and what `/status` shows.

use std::{fmt, net::IpAddr, time::Duration};

use serde::{Deserialize, Serialize};

use crate::{
    config::{Bandwidth, Rate},
    tls::SpiffeId,
};

/// Who a per-source bucket belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SourceKey {
    /// A mutual-TLS peer.
    Identity(SpiffeId),
    /// A plaintext client, by address.
    Ip(IpAddr),
}

impl SourceKey {
    /// A plaintext client; an IPv4-mapped IPv6 address counts as its IPv4 address.
    pub fn ip(addr: IpAddr) -> Self {
        Self::Ip(addr.to_canonical())
    }
}

/// Which bucket refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Scope {
    /// The policy's bucket for all sources together.
    Total,
    /// The source's own bucket (per source, or its override).
    Source,
    /// The sending workload's bucket (egress).
    Workload,
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scope::Total => "total",
            Scope::Source => "per-source",
            Scope::Workload => "per-workload",
        })
    }
}

/// A connection refused by a limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rate limit {policy}: {scope} connections exhausted (waited {waited:?})")]
pub struct Limited {
    /// `namespace/name` of the policy.
    pub policy: String,
    pub scope: Scope,
    /// How long the connection was held before the refusal (zero for `reject`).
    pub waited: Duration,
}

/// Whose limit a [`LimitStatus`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum LimitKind {
    /// `policies.rateLimits`: what reaches the selected workloads.
    RateLimit,
    /// `policies.egressLimits`: what each selected workload sends (its `connections` and
    /// `bandwidth` are per workload).
    EgressLimit,
}

/// One policy, live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LimitStatus {
    /// `namespace/name`
    pub policy: String,
    pub kind: LimitKind,
    pub connections: Option<RateStatus>,
    pub bandwidth: Option<BandwidthStatus>,
    pub per_source_connections: Option<RateStatus>,
    pub per_source_bandwidth: Option<BandwidthStatus>,
    /// Source overrides.
    pub overrides: usize,
    /// Keyed buckets held now (per source, per override identity, per workload; a bandwidth
    /// limit holds one per direction): what eviction keeps bounded.
    pub keys: usize,
    /// Connections it admitted and refused since it was last changed.
    pub admitted: u64,
    pub limited: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RateStatus {
    pub per_second: u32,
    pub burst: u32,
}

impl From<Rate> for RateStatus {
    fn from(rate: Rate) -> Self {
        Self {
            per_second: rate.per_second,
            burst: rate.burst,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BandwidthStatus {
    pub bytes_per_second: u64,
    pub burst_bytes: u64,
}

impl From<Bandwidth> for BandwidthStatus {
    fn from(bandwidth: Bandwidth) -> Self {
        Self {
            bytes_per_second: bandwidth.bytes_per_second,
            burst_bytes: bandwidth.burst_bytes,
        }
    }
}
