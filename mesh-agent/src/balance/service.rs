//! One service port's picker: its immutable plan ([`select`]) over live state that outlives
//! it ([`Shared`] for the port, [`EndpointStats`] per endpoint), the pick, and the outcomes a
//! pick reports back (connected, failed, reset before a reply).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    time::Duration,
};

use parking_lot::Mutex;

use super::{
    Caller, PickError,
    budget::RetryBudget,
    clock,
    endpoint::EndpointStats,
    maglev,
    select::{self, Availability, Chooser, Group, Spec, View},
};
use crate::config::{CallerMatch, Endpoint, HashOn, LoadBalancer, TrafficPolicy};

/// The state of a service port that survives its picker being rebuilt.
#[derive(Default)]
pub(super) struct Shared {
    /// Serializes the availability flags' changes (ejection, expiry, health, retirement) and
    /// so keeps `flagged` exact.
    lock: Mutex<()>,
    /// Ejection deadlines set (expired or not) plus unhealthy marks, over the current
    /// endpoints: 0 lets a pick skip the availability scan.
    pub(super) flagged: AtomicU32,
    pub(super) active: AtomicU32,
    pub(super) pending: AtomicU32,
    /// Round robin's turn.
    cursor: AtomicUsize,
    pub(super) budget: RetryBudget,
    /// Picks refused by `max_connections` / `max_pending`, ever.
    pub(super) refused_connections: AtomicU64,
    pub(super) refused_pending: AtomicU64,
}

/// Endpoint picking for one service port; see the module docs of [`super`].
pub struct ServiceBalancer {
    pub(super) spec: Spec,
    pub(super) stats: Vec<Arc<EndpointStats>>,
    by_addr: HashMap<SocketAddr, u32>,
    views: Vec<View>,
    /// `views[view_of[caller.ipv4 as usize]]`
    view_of: [usize; 2],
    /// Per caller route of the policy, the index of its subset.
    routes: Vec<Option<usize>>,
    pub(super) shared: Arc<Shared>,
}

impl ServiceBalancer {
    /// A picker for `spec`, keeping the live state of `previous` (same service port): its
    /// shared counters, and each endpoint's stats by address. Endpoints of `previous` not in
    /// `spec` are retired.
    pub(super) fn build(spec: Spec, previous: Option<&ServiceBalancer>) -> Self {
        let shared = previous.map_or_else(Arc::default, |p| p.shared.clone());
        let now = clock::now();
        let stats: Vec<Arc<EndpointStats>> = spec
            .endpoints
            .iter()
            .map(|e| {
                previous
                    .and_then(|p| p.stats_of(e.addr))
                    .cloned()
                    .unwrap_or_else(|| Arc::new(EndpointStats::new(now)))
            })
            .collect();
        let by_addr = (0u32..)
            .zip(&spec.endpoints)
            .map(|(i, e)| (e.addr, i))
            .collect();
        let (views, view_of) = select::views(&spec);
        let routes = spec
            .policy
            .caller_routes
            .iter()
            .map(|r| spec.policy.subsets.iter().position(|s| s.name == r.subset))
            .collect();
        let built = Self {
            spec,
            stats,
            by_addr,
            views,
            view_of,
            routes,
            shared,
        };
        if let Some(previous) = previous {
            previous.retire_missing(&built.by_addr);
        }
        built
    }

    /// Retires every endpoint not in `kept` (all of them for an empty map).
    pub(super) fn retire_missing(&self, kept: &HashMap<SocketAddr, u32>) {
        let _lock = self.shared.lock.lock();
        for (e, stats) in self.spec.endpoints.iter().zip(&self.stats) {
            if kept.contains_key(&e.addr) || stats.retired.swap(true, Relaxed) {
                continue;
            }
            let flags = u32::from(stats.ejected_until.swap(0, Relaxed) != 0)
                + u32::from(stats.unhealthy.swap(false, Relaxed));
            self.shared.flagged.fetch_sub(flags, Relaxed);
        }
    }

    fn stats_of(&self, addr: SocketAddr) -> Option<&Arc<EndpointStats>> {
        let i = *self.by_addr.get(&addr)?;
        self.stats.get(i as usize)
    }

    /// An endpoint for a new connection, never one in `tried` (retries go elsewhere).
    /// Refuses at once (never queues) when the service's circuit limits are reached. A pick
    /// with an empty `tried` counts as a first attempt for the retry budget.
    pub fn pick(
        self: &Arc<Self>,
        caller: &Caller,
        tried: &[SocketAddr],
    ) -> Result<Pick, PickError> {
        let now = clock::now();
        let shared = &self.shared;
        if tried.is_empty() {
            shared.budget.first_attempt(now);
        }
        if self.spec.endpoints.is_empty() {
            return Err(PickError::NoEndpoints);
        }
        let limits = &self.spec.policy.circuit_breaker;
        if limits
            .max_connections
            .is_some_and(|max| shared.active.load(Relaxed) >= max)
        {
            shared.refused_connections.fetch_add(1, Relaxed);
            return Err(PickError::CircuitOpen("max_connections"));
        }
        // Reserve the connect first, so concurrent picks cannot overshoot `max_pending`.
        let reserved = shared.pending.fetch_add(1, Relaxed);
        if limits.max_pending.is_some_and(|max| reserved >= max) {
            shared.pending.fetch_sub(1, Relaxed);
            shared.refused_pending.fetch_add(1, Relaxed);
            return Err(PickError::CircuitOpen("max_pending"));
        }
        match self.choose(caller, tried, now) {
            Ok((index, subset)) => {
                if let Some(stats) = self.stats.get(index as usize) {
                    stats.pending.fetch_add(1, Relaxed);
                }
                Ok(Pick {
                    balancer: self.clone(),
                    index,
                    subset,
                    resolved: false,
                })
            }
            Err(error) => {
                shared.pending.fetch_sub(1, Relaxed);
                Err(error)
            }
        }
    }

    /// (endpoint index, subset index): subset first, then locality, then the algorithm.
    fn choose(
        &self,
        caller: &Caller,
        tried: &[SocketAddr],
        now: u64,
    ) -> Result<(u32, Option<usize>), PickError> {
        let available = self.availability(tried, now);
        let view = self
            .view_of
            .get(usize::from(caller.ipv4))
            .and_then(|v| self.views.get(*v))
            .ok_or(PickError::NoEndpoints)?;
        let key = match self.spec.policy.load_balancer {
            LoadBalancer::Maglev { hash_on } => Some(match (hash_on, caller.identity) {
                (HashOn::SourceIdentity, Some(id)) => maglev::hash_identity(id),
                // A plaintext caller has no identity: its IP.
                _ => maglev::hash_ip(caller.ip),
            }),
            _ => None,
        };
        let subset = self.subset(view, caller, &available, key)?;
        let group = view
            .groups
            .get(subset.unwrap_or(0))
            .ok_or(PickError::NoneAvailable)?;
        let index = match (&group.table, key) {
            // Stickiness first: Maglev ignores locality tiers.
            (Some(table), Some(key)) if available.count(&group.members) > 0 => {
                table.lookup(key, |i| available.get(i))
            }
            (Some(_), _) => None,
            _ => {
                let tier = self.tier(group, &available);
                let chooser = Chooser {
                    algorithm: self.spec.policy.load_balancer,
                    endpoints: &self.spec.endpoints,
                    stats: &self.stats,
                    cursor: &self.shared.cursor,
                    now,
                };
                tier.and_then(|tier| chooser.choose(tier, &available))
            }
        };
        index.map(|i| (i, subset)).ok_or(PickError::NoneAvailable)
    }

    /// Which endpoints are available: all, without a scan, when nothing is flagged or tried
    /// and no per-endpoint limit is set; otherwise a scan (which also clears the ejections
    /// that ended).
    fn availability(&self, tried: &[SocketAddr], now: u64) -> Availability {
        let limits = &self.spec.policy.circuit_breaker;
        let per_endpoint = limits.max_connections_per_endpoint.is_some()
            || limits.max_pending_per_endpoint.is_some();
        if tried.is_empty() && !per_endpoint && self.shared.flagged.load(Relaxed) == 0 {
            return Availability(None);
        }
        let mask = self
            .spec
            .endpoints
            .iter()
            .zip(&self.stats)
            .map(|(e, stats)| {
                if stats.expired(now) {
                    self.expire(stats, now);
                }
                stats.available(now, limits) && !tried.contains(&e.addr)
            })
            .collect();
        Availability(Some(mask))
    }

    /// The subset index (`None` without subsets): the first caller route that matches fixes
    /// it, strictly; otherwise one by weight among those with an endpoint available (by the
    /// caller's hash for Maglev, so a source stays in its subset).
    fn subset(
        &self,
        view: &View,
        caller: &Caller,
        available: &Availability,
        key: Option<u64>,
    ) -> Result<Option<usize>, PickError> {
        let subsets = &self.spec.policy.subsets;
        if subsets.is_empty() {
            return Ok(None);
        }
        let has_available = |s: usize| {
            view.groups
                .get(s)
                .is_some_and(|g| available.count(&g.members) > 0)
        };
        let routed = self
            .spec
            .policy
            .caller_routes
            .iter()
            .zip(&self.routes)
            .find(|(route, subset)| subset.is_some() && matches(&route.from, caller));
        if let Some((_, Some(subset))) = routed {
            return if has_available(*subset) {
                Ok(Some(*subset))
            } else {
                Err(PickError::NoneAvailable)
            };
        }
        let eligible = || {
            subsets
                .iter()
                .enumerate()
                .filter(|(i, s)| s.weight > 0 && has_available(*i))
        };
        let total: u64 = eligible().map(|(_, s)| u64::from(s.weight)).sum();
        if total == 0 {
            return Err(PickError::NoneAvailable);
        }
        let mut r = match key {
            Some(key) => maglev::rehash(key) % total,
            None => fastrand::u64(..total),
        };
        for (i, s) in eligible() {
            let weight = u64::from(s.weight);
            if r < weight {
                return Ok(Some(i));
            }
            r -= weight;
        }
        Err(PickError::NoneAvailable)
    }

    /// The narrowest tier with at least `min_healthy_percent` of its endpoints (and at least
    /// one) available; the last tier (all endpoints) serves with any one available.
    fn tier<'g>(&self, group: &'g Group, available: &Availability) -> Option<&'g select::Tier> {
        let percent = usize::from(self.spec.policy.locality.min_healthy_percent);
        let last = group.tiers.len().checked_sub(1)?;
        group.tiers.iter().enumerate().find_map(|(i, tier)| {
            let count = available.count(&tier.members);
            let healthy = count * 100 >= percent * tier.members.len();
            (count > 0 && (healthy || i == last)).then_some(tier)
        })
    }

    /// One more retry fits the retry budget: counts it and says yes, or says no.
    pub fn try_retry(&self) -> bool {
        self.shared
            .budget
            .try_retry(&self.spec.policy.retries, clock::now())
    }

    pub fn policy(&self) -> &TrafficPolicy {
        &self.spec.policy
    }

    /// `namespace/name` of the service.
    pub fn service(&self) -> &str {
        &self.spec.service
    }

    /// The service port (not the target port).
    pub fn port(&self) -> u16 {
        self.spec.port
    }

    /// Every endpoint of the port, for the active health checker.
    pub fn endpoints(&self) -> impl Iterator<Item = &Endpoint> {
        self.spec.endpoints.iter()
    }

    /// The active health checker's verdict on `addr` (an address not of this port is
    /// ignored). An unhealthy endpoint takes no new connection until marked healthy again.
    pub fn set_health(&self, addr: SocketAddr, healthy: bool) {
        let Some(stats) = self.stats_of(addr) else {
            return;
        };
        let _lock = self.shared.lock.lock();
        if stats.retired.load(Relaxed) {
            return;
        }
        let was_unhealthy = stats.unhealthy.swap(!healthy, Relaxed);
        match (was_unhealthy, healthy) {
            (false, false) => {
                self.shared.flagged.fetch_add(1, Relaxed);
            }
            (true, true) => {
                self.shared.flagged.fetch_sub(1, Relaxed);
            }
            _ => {}
        }
    }

    /// Clears an ejection that ended.
    fn expire(&self, stats: &EndpointStats, now: u64) {
        let _lock = self.shared.lock.lock();
        if !stats.retired.load(Relaxed) && stats.expired(now) {
            stats.ejected_until.store(0, Relaxed);
            self.shared.flagged.fetch_sub(1, Relaxed);
        }
    }

    /// A failure of endpoint `index`: extends its streak and ejects it when the streak
    /// reaches `consecutive_failures`, unless that would eject more than
    /// `max_ejected_percent` of the port's endpoints. `true` when this ejected it.
    fn failure(&self, index: u32, previous_streak: u32) -> bool {
        let Some(stats) = self.stats.get(index as usize) else {
            return false;
        };
        let streak = stats
            .streak
            .fetch_add(previous_streak.saturating_add(1), Relaxed)
            .saturating_add(previous_streak)
            .saturating_add(1);
        let Some(outlier) = self.spec.policy.outlier_detection else {
            return false;
        };
        if streak < outlier.consecutive_failures {
            return false;
        }
        let _lock = self.shared.lock.lock();
        let now = clock::now();
        if stats.retired.load(Relaxed) || stats.ejected(now) {
            return false;
        }
        let ejected = self.stats.iter().filter(|s| s.ejected(now)).count();
        let cap = self.stats.len() * usize::from(outlier.max_ejected_percent) / 100;
        if ejected >= cap {
            return false;
        }
        let ejections = stats.ejections.fetch_add(1, Relaxed);
        let factor = 1u32.checked_shl(ejections).unwrap_or(u32::MAX);
        let duration = outlier
            .base_ejection
            .checked_mul(factor)
            .unwrap_or(outlier.max_ejection)
            .min(outlier.max_ejection);
        let until = now.saturating_add(clock::nanos(duration)).max(now + 1);
        if stats.ejected_until.swap(until, Relaxed) == 0 {
            self.shared.flagged.fetch_add(1, Relaxed);
        }
        stats.streak.store(0, Relaxed);
        true
    }
}

/// A caller route's `from` matches when every condition given matches.
fn matches(from: &CallerMatch, caller: &Caller) -> bool {
    from.labels
        .iter()
        .all(|(k, v)| caller.labels.get(k) == Some(v))
        && (from.identities.is_empty()
            || caller
                .identity
                .is_some_and(|id| from.identities.contains(id)))
}

/// A picked endpoint with a connect in flight (counted as pending until resolved; dropping
/// it unresolved, when the task is cancelled, just ends that).
pub struct Pick {
    balancer: Arc<ServiceBalancer>,
    index: u32,
    subset: Option<usize>,
    resolved: bool,
}

impl Pick {
    pub fn endpoint(&self) -> &Endpoint {
        // `index` comes from the picker's own endpoints.
        &self.balancer.spec.endpoints[self.index as usize]
    }

    /// The subset the endpoint was chosen in.
    pub fn subset(&self) -> Option<&str> {
        let subset = self.balancer.spec.policy.subsets.get(self.subset?)?;
        Some(&subset.name)
    }

    /// Connected after `latency`: feeds the latency estimate, clears the failure streak; the
    /// endpoint counts the connection as active until the guard drops.
    pub fn connected(mut self, latency: Duration) -> ActiveGuard {
        self.resolve();
        let balancer = self.balancer.clone();
        let mut streak = 0;
        if let Some(stats) = balancer.stats.get(self.index as usize) {
            stats.observe(clock::nanos(latency) as f64, clock::now());
            streak = stats.streak.swap(0, Relaxed);
            stats.active.fetch_add(1, Relaxed);
        }
        balancer.shared.active.fetch_add(1, Relaxed);
        ActiveGuard {
            balancer,
            index: self.index,
            streak,
            reset: AtomicBool::new(false),
        }
    }

    /// The connect failed: counts toward outlier ejection; `true` when this ejected it.
    pub fn failed(mut self) -> bool {
        self.resolve();
        self.balancer.failure(self.index, 0)
    }

    fn resolve(&mut self) {
        if std::mem::replace(&mut self.resolved, true) {
            return;
        }
        if let Some(stats) = self.balancer.stats.get(self.index as usize) {
            stats.pending.fetch_sub(1, Relaxed);
        }
        self.balancer.shared.pending.fetch_sub(1, Relaxed);
    }
}

impl Drop for Pick {
    fn drop(&mut self) {
        self.resolve();
    }
}

impl std::fmt::Debug for Pick {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pick")
            .field("endpoint", &self.endpoint().addr)
            .field("subset", &self.subset())
            .finish()
    }
}

/// An open connection to an endpoint: counted as active until dropped.
pub struct ActiveGuard {
    balancer: Arc<ServiceBalancer>,
    index: u32,
    /// The failure streak this connection's success cleared: a reset before any reply gives
    /// it back, so an endpoint that accepts and then resets every connection is still
    /// ejected.
    streak: u32,
    reset: AtomicBool,
}

impl ActiveGuard {
    pub fn endpoint(&self) -> &Endpoint {
        &self.balancer.spec.endpoints[self.index as usize]
    }

    /// The upstream reset before sending anything back: a failure for outlier detection
    /// (counted once per connection). `true` when this ejected the endpoint.
    pub fn reset_before_reply(&self) -> bool {
        if self.reset.swap(true, Relaxed) {
            return false;
        }
        self.balancer.failure(self.index, self.streak)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        if let Some(stats) = self.balancer.stats.get(self.index as usize) {
            stats.active.fetch_sub(1, Relaxed);
        }
        self.balancer.shared.active.fetch_sub(1, Relaxed);
    }
}
