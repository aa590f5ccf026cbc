//! Rate limits (`policies.rateLimits`, `policies.egressLimits`): token buckets for new
//! connections and for bytes, shared by the whole node. A destination's owner limits what
//! reaches its workloads (enforced where authorization is); a caller's egress is limited by
//! the caller's own agent. Plain values, validated by the file source; enforced by
//! `crate::limit`.

use std::{collections::BTreeMap, time::Duration};

use serde::Serialize;

use super::{dump, model::QualifiedName};
use crate::tls::SpiffeId;

/// New connections per second, with a burst (the bucket's size).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rate {
    pub per_second: u32,
    /// At least 1; default: `per_second`.
    pub burst: u32,
}

/// Bytes per second each way, with a burst; shaping pauses reading, never drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Bandwidth {
    pub bytes_per_second: u64,
    /// Default: a tenth of a second's worth, at least 64 KiB.
    pub burst_bytes: u64,
}

/// What happens to a connection over its limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "camelCase")]
pub enum OnLimit {
    /// Refused at once (a reset).
    #[default]
    Reject,
    /// Held until a token is there, refused after `max_wait`.
    Wait {
        #[serde(rename = "maxWaitMs", serialize_with = "dump::millis")]
        max_wait: Duration,
    },
}

/// `policies.rateLimits[]`: limits on what reaches the workloads of `namespace` whose
/// labels include `selector` (all of the namespace when `None`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitPolicy {
    pub name: String,
    pub namespace: String,
    pub selector: Option<BTreeMap<String, String>>,
    /// All sources together.
    pub connections: Option<Rate>,
    pub bandwidth: Option<Bandwidth>,
    /// Each source identity (or, for plaintext clients, each source IP) on its own.
    pub per_source: Option<PerSource>,
    pub on_limit: OnLimit,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PerSource {
    pub connections: Option<Rate>,
    pub bandwidth: Option<Bandwidth>,
    /// Named callers with limits of their own (instead of the per-source ones).
    pub overrides: Vec<SourceOverride>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceOverride {
    pub identities: Vec<SpiffeId>,
    pub connections: Option<Rate>,
    pub bandwidth: Option<Bandwidth>,
}

/// `policies.egressLimits[]`: each workload of `namespace` whose labels include `selector`
/// may open at most this many connections (and move this many bytes) on its own, enforced by
/// its own node's agent. One bucket per workload, so a noisy pod only spends its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EgressLimitPolicy {
    pub name: String,
    pub namespace: String,
    pub selector: Option<BTreeMap<String, String>>,
    pub connections: Option<Rate>,
    pub bandwidth: Option<Bandwidth>,
    pub on_limit: OnLimit,
}

impl RateLimitPolicy {
    /// `namespace/name`
    pub fn qualified_name(&self) -> QualifiedName<'_> {
        QualifiedName(&self.namespace, &self.name)
    }
}

impl EgressLimitPolicy {
    /// `namespace/name`
    pub fn qualified_name(&self) -> QualifiedName<'_> {
        QualifiedName(&self.namespace, &self.name)
    }
}
