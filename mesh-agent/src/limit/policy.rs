//! The live buckets of one policy, built from its config and kept as long as the policy is
//! unchanged; admission and status for it.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::time::Instant;

use super::{
    bucket::{self, ByteRate, Direct, Duplex, Keyed, ONE, wait_for},
    shaper::Shaper,
    types::{LimitKind, LimitStatus, Limited, Scope, SourceKey},
};
use crate::config::{
    Bandwidth, EgressLimitPolicy, OnLimit, Rate, RateLimitPolicy, SourceOverride, Workload,
};

/// A policy applies to `workload`: same namespace, and the selector (if any) is included in
/// its labels (as `AuthorizationPolicy::selects`).
pub(super) fn selects(
    namespace: &str,
    selector: Option<&BTreeMap<String, String>>,
    workload: &Workload,
) -> bool {
    workload.namespace == namespace
        && selector.is_none_or(|selector| {
            selector
                .iter()
                .all(|(k, v)| workload.labels.get(k) == Some(v))
        })
}

#[derive(Debug, Default)]
struct Counters {
    admitted: AtomicU64,
    limited: AtomicU64,
}

/// A bandwidth limit: its cells and one bucket (or map of buckets) per direction.
struct Bytes<T> {
    rate: ByteRate,
    buckets: Duplex<T>,
}

impl Bytes<Arc<Direct>> {
    fn shared(bandwidth: &Bandwidth) -> Self {
        let rate = ByteRate::new(bandwidth);
        Self {
            rate,
            buckets: Duplex::new(|| rate.bucket()),
        }
    }

    fn shape(&self, shaper: &mut Shaper) {
        let Duplex {
            to_server,
            to_client,
        } = &self.buckets;
        shaper.add(
            self.rate,
            Box::new(Arc::clone(to_server)),
            Box::new(Arc::clone(to_client)),
        );
    }
}

impl<K: std::hash::Hash + Eq + Clone + Send + Sync + 'static> Bytes<Arc<Keyed<K>>> {
    fn keyed(bandwidth: &Bandwidth) -> Self {
        let rate = ByteRate::new(bandwidth);
        Self {
            rate,
            buckets: Duplex::new(|| rate.keyed()),
        }
    }

    fn shape(&self, key: &K, shaper: &mut Shaper) {
        let Duplex {
            to_server,
            to_client,
        } = &self.buckets;
        shaper.add(
            self.rate,
            Box::new((Arc::clone(to_server), key.clone())),
            Box::new((Arc::clone(to_client), key.clone())),
        );
    }

    fn evict(&self) -> usize {
        bucket::evict(&self.buckets.to_server) + bucket::evict(&self.buckets.to_client)
    }

    fn keys(&self) -> usize {
        self.buckets.to_server.len() + self.buckets.to_client.len()
    }
}

/// Buckets keyed by something: per source, per override, per egress workload.
struct KeyedLimits<K: std::hash::Hash + Eq + Clone> {
    connections: Option<Keyed<K>>,
    bandwidth: Option<Bytes<Arc<Keyed<K>>>>,
}

impl<K: std::hash::Hash + Eq + Clone + Send + Sync + 'static> KeyedLimits<K> {
    fn new(connections: Option<&Rate>, bandwidth: Option<&Bandwidth>) -> Self {
        Self {
            connections: connections.map(|rate| Keyed::dashmap(bucket::connection_quota(rate))),
            bandwidth: bandwidth.map(Bytes::keyed),
        }
    }

    async fn admit(&self, key: &K, deadline: Option<Instant>) -> bool {
        match &self.connections {
            Some(bucket) => wait_for(|| bucket::take_keyed(bucket, key, ONE), deadline).await,
            None => true,
        }
    }

    fn shape(&self, key: &K, shaper: &mut Shaper) {
        if let Some(bytes) = &self.bandwidth {
            bytes.shape(key, shaper);
        }
    }

    /// Evicts the idle keys; how many entries are left.
    fn evict(&self) -> usize {
        self.connections.as_ref().map_or(0, bucket::evict)
            + self.bandwidth.as_ref().map_or(0, Bytes::evict)
    }

    fn keys(&self) -> usize {
        self.connections.as_ref().map_or(0, Keyed::len)
            + self.bandwidth.as_ref().map_or(0, Bytes::keys)
    }
}

/// When a refusal is due: `Reject` at once, `Wait` after `max_wait` from the start.
fn deadline(on_limit: OnLimit, start: Instant) -> Option<Instant> {
    match on_limit {
        OnLimit::Reject => None,
        OnLimit::Wait { max_wait } => Some(start + max_wait),
    }
}

/// A `policies.rateLimits[]` entry, live.
pub(super) struct RateLimitState {
    pub(super) policy: RateLimitPolicy,
    qualified: String,
    connections: Option<Direct>,
    bandwidth: Option<Bytes<Arc<Direct>>>,
    per_source: Option<KeyedLimits<SourceKey>>,
    overrides: Vec<(Vec<SourceKey>, KeyedLimits<SourceKey>)>,
    counters: Counters,
}

impl RateLimitState {
    pub(super) fn new(policy: &RateLimitPolicy) -> Self {
        let per_source = policy.per_source.as_ref();
        let overrides = per_source.map_or(&[][..], |p| p.overrides.as_slice());
        Self {
            policy: policy.clone(),
            qualified: policy.qualified_name().to_string(),
            connections: policy
                .connections
                .as_ref()
                .map(|rate| Direct::direct(bucket::connection_quota(rate))),
            bandwidth: policy.bandwidth.as_ref().map(Bytes::shared),
            per_source: per_source
                .map(|p| KeyedLimits::new(p.connections.as_ref(), p.bandwidth.as_ref())),
            overrides: overrides
                .iter()
                .map(
                    |SourceOverride {
                         identities,
                         connections,
                         bandwidth,
                     }| {
                        let keys = identities
                            .iter()
                            .cloned()
                            .map(SourceKey::Identity)
                            .collect();
                        (
                            keys,
                            KeyedLimits::new(connections.as_ref(), bandwidth.as_ref()),
                        )
                    },
                )
                .collect(),
            counters: Counters::default(),
        }
    }

    /// The source's own limits: its override if one names it, else the per-source ones.
    fn source_limits(&self, source: &SourceKey) -> Option<&KeyedLimits<SourceKey>> {
        self.overrides
            .iter()
            .find(|(keys, _)| keys.contains(source))
            .map(|(_, limits)| limits)
            .or(self.per_source.as_ref())
    }

    /// The source's bucket first, then the total: a source refused by its own limit spends
    /// nothing of the shared one, so a noisy source cannot drain it for the others. (The other
    /// way round, a source refused by the total has spent a token of its own, which only slows
    /// that source.)
    pub(super) async fn admit(
        &self,
        source: &SourceKey,
        start: Instant,
    ) -> Result<Shaper, Limited> {
        let deadline = deadline(self.policy.on_limit, start);
        let own = self.source_limits(source);
        if let Some(own) = own
            && !own.admit(source, deadline).await
        {
            return Err(self.refuse(Scope::Source, start));
        }
        if let Some(total) = &self.connections
            && !wait_for(|| bucket::take(total, ONE), deadline).await
        {
            return Err(self.refuse(Scope::Total, start));
        }
        self.counters.admitted.fetch_add(1, Ordering::Relaxed);
        let mut shaper = Shaper::default();
        if let Some(bytes) = &self.bandwidth {
            bytes.shape(&mut shaper);
        }
        if let Some(own) = own {
            own.shape(source, &mut shaper);
        }
        Ok(shaper)
    }

    fn refuse(&self, scope: Scope, start: Instant) -> Limited {
        self.counters.limited.fetch_add(1, Ordering::Relaxed);
        Limited {
            policy: self.qualified.clone(),
            scope,
            waited: start.elapsed(),
        }
    }

    pub(super) fn evict(&self) {
        if let Some(limits) = &self.per_source {
            limits.evict();
        }
        for (_, limits) in &self.overrides {
            limits.evict();
        }
    }

    pub(super) fn status(&self) -> LimitStatus {
        let policy = &self.policy;
        let per_source = policy.per_source.as_ref();
        LimitStatus {
            policy: self.qualified.clone(),
            kind: LimitKind::RateLimit,
            connections: policy.connections.map(Into::into),
            bandwidth: policy.bandwidth.map(Into::into),
            per_source_connections: per_source.and_then(|p| p.connections).map(Into::into),
            per_source_bandwidth: per_source.and_then(|p| p.bandwidth).map(Into::into),
            overrides: self.overrides.len(),
            keys: self.per_source.as_ref().map_or(0, KeyedLimits::keys)
                + self.overrides.iter().map(|(_, l)| l.keys()).sum::<usize>(),
            admitted: self.counters.admitted.load(Ordering::Relaxed),
            limited: self.counters.limited.load(Ordering::Relaxed),
        }
    }
}

/// A `policies.egressLimits[]` entry, live: one bucket per workload, keyed by `namespace/name`.
pub(super) struct EgressLimitState {
    pub(super) policy: EgressLimitPolicy,
    qualified: String,
    limits: KeyedLimits<Arc<str>>,
    counters: Counters,
}

impl EgressLimitState {
    pub(super) fn new(policy: &EgressLimitPolicy) -> Self {
        Self {
            policy: policy.clone(),
            qualified: policy.qualified_name().to_string(),
            limits: KeyedLimits::new(policy.connections.as_ref(), policy.bandwidth.as_ref()),
            counters: Counters::default(),
        }
    }

    pub(super) async fn admit(
        &self,
        workload: &Arc<str>,
        start: Instant,
    ) -> Result<Shaper, Limited> {
        let deadline = deadline(self.policy.on_limit, start);
        if !self.limits.admit(workload, deadline).await {
            self.counters.limited.fetch_add(1, Ordering::Relaxed);
            return Err(Limited {
                policy: self.qualified.clone(),
                scope: Scope::Workload,
                waited: start.elapsed(),
            });
        }
        self.counters.admitted.fetch_add(1, Ordering::Relaxed);
        let mut shaper = Shaper::default();
        self.limits.shape(workload, &mut shaper);
        Ok(shaper)
    }

    pub(super) fn evict(&self) {
        self.limits.evict();
    }

    pub(super) fn status(&self) -> LimitStatus {
        let policy = &self.policy;
        LimitStatus {
            policy: self.qualified.clone(),
            kind: LimitKind::EgressLimit,
            connections: policy.connections.map(Into::into),
            bandwidth: policy.bandwidth.map(Into::into),
            per_source_connections: None,
            per_source_bandwidth: None,
            overrides: 0,
            keys: self.limits.keys(),
            admitted: self.counters.admitted.load(Ordering::Relaxed),
            limited: self.counters.limited.load(Ordering::Relaxed),
        }
    }
}
