//! Node-wide rate limits: token buckets for new connections and for bytes, from
//! `policies.rateLimits` (what reaches a local workload) and `policies.egressLimits` (what a
//! local workload sends). One [`Limits`] serves every pod's listeners, so a limit holds for
//! the node however many listeners the traffic comes through.
//!
//! - **Buckets.** `governor`'s GCRA (see `bucket`): a check is a compare-and-swap on one
//!   word; nothing is locked while a connection waits.
//! - **Fairness.** Per-source buckets (by SPIFFE identity, or by IP for plaintext clients)
//!   keep a noisy source to its own share: its refused attempts spend nothing of anyone
//!   else's. The total bucket of a policy is shared by all its sources by design — it is the
//!   destination's capacity — so sources admitted by their own limits compete for it.
//! - **Several policies** selecting one workload must all admit a connection; one that admits
//!   before another refuses has spent its token (as an authorization check costs its time).
//! - **Reloads.** [`Limits::sync`] keeps the buckets (and so the current use) of every policy
//!   that did not change, and starts changed and new ones full.
//! - **Memory.** Keyed buckets are dropped by [`Limits::evict_idle`] once full again (a fresh
//!   bucket is the same), so a flood of distinct sources leaves nothing behind.

mod bucket;
mod policy;
mod shaper;
mod types;

use std::{collections::HashMap, sync::Arc};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use tokio::time::Instant;

use self::policy::{EgressLimitState, RateLimitState, selects};
pub use self::shaper::{Pacer, Shaper};
pub use self::types::{
    BandwidthStatus, LimitKind, LimitStatus, Limited, RateStatus, Scope, SourceKey,
};
use crate::config::Config;

/// The node's limits: shared by every pod's listeners (clone the `Arc` it is kept in).
pub struct Limits {
    tables: ArcSwap<Tables>,
    /// One `sync` at a time (each builds on the tables the previous one left).
    syncing: Mutex<()>,
}

/// The policies selecting one workload, in config order.
type Selecting<T> = Arc<[Arc<T>]>;

/// The policies of one config snapshot, and which select which local workload.
#[derive(Default)]
struct Tables {
    /// In config order.
    rate: Vec<Arc<RateLimitState>>,
    egress: Vec<Arc<EgressLimitState>>,
    /// Local workload `namespace/name` -> the rate limits selecting it.
    rate_for: HashMap<String, Selecting<RateLimitState>>,
    /// Local workload `namespace/name` -> its bucket key and the egress limits selecting it.
    egress_for: HashMap<String, (Arc<str>, Selecting<EgressLimitState>)>,
}

impl Default for Limits {
    fn default() -> Self {
        Self::new()
    }
}

impl Limits {
    /// No limit yet; [`Limits::sync`] brings the config's.
    pub fn new() -> Self {
        Self {
            tables: ArcSwap::from_pointee(Tables::default()),
            syncing: Mutex::new(()),
        }
    }

    /// Brings the buckets in line with `config.policies.rate_limits` / `.egress_limits`: an
    /// unchanged policy (equal in everything, selector included) keeps its buckets, its use
    /// and its counts; changed or new ones start full; gone ones are dropped (connections
    /// already admitted keep their shaping). Which policies select which local workload is
    /// computed here, once per snapshot.
    pub fn sync(&self, config: &Config) {
        let _one_at_a_time = self.syncing.lock();
        let old = self.tables.load();
        let rate: Vec<Arc<RateLimitState>> = config
            .policies
            .rate_limits
            .iter()
            .map(|policy| {
                old.rate
                    .iter()
                    .find(|state| state.policy == *policy)
                    .map_or_else(|| Arc::new(RateLimitState::new(policy)), Arc::clone)
            })
            .collect();
        let egress: Vec<Arc<EgressLimitState>> = config
            .policies
            .egress_limits
            .iter()
            .map(|policy| {
                old.egress
                    .iter()
                    .find(|state| state.policy == *policy)
                    .map_or_else(|| Arc::new(EgressLimitState::new(policy)), Arc::clone)
            })
            .collect();
        let mut rate_for = HashMap::new();
        let mut egress_for = HashMap::new();
        for workload in config.local_workloads() {
            let name = workload.qualified_name().to_string();
            let selecting: Arc<[_]> = rate
                .iter()
                .filter(|s| selects(&s.policy.namespace, s.policy.selector.as_ref(), workload))
                .cloned()
                .collect();
            if !selecting.is_empty() {
                rate_for.insert(name.clone(), selecting);
            }
            let selecting: Arc<[_]> = egress
                .iter()
                .filter(|s| selects(&s.policy.namespace, s.policy.selector.as_ref(), workload))
                .cloned()
                .collect();
            if !selecting.is_empty() {
                egress_for.insert(name.clone(), (Arc::from(name), selecting));
            }
        }
        self.tables.store(Arc::new(Tables {
            rate,
            egress,
            rate_for,
            egress_for,
        }));
    }

    /// A new connection to the local workload `destination` (`namespace/name`) from
    /// `source`: every rate limit selecting the workload must admit it (the source's own
    /// bucket — its override if one names it, else the per-source one — then the total).
    /// `wait` policies hold it up to their `max_wait` (refusing at once when the bucket says
    /// the token comes later than that), `reject` ones refuse at once. Admitted, it gets the
    /// byte shaping of those policies.
    pub async fn admit(&self, destination: &str, source: &SourceKey) -> Result<Shaper, Limited> {
        let Some(policies) = self.tables.load().rate_for.get(destination).cloned() else {
            return Ok(Shaper::default());
        };
        let start = Instant::now();
        let mut shaper = Shaper::default();
        for policy in policies.iter() {
            shaper = shaper.and(policy.admit(source, start).await?);
        }
        Ok(shaper)
    }

    /// The same for what the local workload `source` (`namespace/name`) opens: every egress
    /// limit selecting it, each with one bucket per workload.
    pub async fn admit_egress(&self, source: &str) -> Result<Shaper, Limited> {
        let Some((key, policies)) = self.tables.load().egress_for.get(source).cloned() else {
            return Ok(Shaper::default());
        };
        let start = Instant::now();
        let mut shaper = Shaper::default();
        for policy in policies.iter() {
            shaper = shaper.and(policy.admit(&key, start).await?);
        }
        Ok(shaper)
    }

    /// Drops the keyed buckets that are full again (idle for at least their refill time plus
    /// one interval) and gives their memory back. Call it every few seconds: 100 000 sources
    /// seen once cost nothing a refill time later.
    pub fn evict_idle(&self) {
        let tables = self.tables.load();
        for policy in &tables.rate {
            policy.evict();
        }
        for policy in &tables.egress {
            policy.evict();
        }
    }

    /// Each policy in config order: rate limits, then egress limits.
    pub fn status(&self) -> Vec<LimitStatus> {
        let tables = self.tables.load();
        let rate = tables.rate.iter().map(|p| p.status());
        rate.chain(tables.egress.iter().map(|p| p.status()))
            .collect()
    }
}

#[cfg(test)]
mod tests;
