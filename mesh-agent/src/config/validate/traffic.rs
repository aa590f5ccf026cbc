//! Validates `services[].trafficPolicy` into a [`TrafficPolicy`]: every part has a default,
//! so only what is written is checked, against ranges that keep the balancer and the health
//! checker sane (a 0 ms timeout or a 1 ms health-check interval is a mistake, not a choice).
//!
//! Every block that can be switched off says so with `enabled: false` (locality, outlier
//! detection, health checks); the other fields of a switched-off block are still checked, so
//! that turning it back on cannot reveal an error. A block key written with no value is
//! refused: `outlierDetection:` alone could mean "off" as well as "the defaults". Only
//! `trafficPolicy:` itself with no value is read as the defaults, as `policies:` is.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_saphyr::Location;

use super::scalars::Millis;
use super::{Cx, Result};
use crate::config::raw::{
    RawAlgorithm, RawCallerRoute, RawCircuitBreaker, RawHashOn, RawHealthCheck, RawLoadBalancer,
    RawLocality, RawOutlierDetection, RawRetries, RawSubset, RawTrafficPolicy, S,
};
use crate::config::traffic::{
    CallerMatch, CallerRoute, CircuitBreaker, HashOn, HealthCheck, LoadBalancer, Locality,
    OutlierDetection, Retries, Subset, TrafficPolicy, defaults,
};
use crate::names::Kind;

/// `connectTimeoutMs` and `healthCheck.timeoutMs`.
const CONNECT_TIMEOUT: Millis = Millis {
    min: 1,
    max: 600_000,
    max_text: "10 minutes",
};
/// `idleTimeoutMs` and `maxConnectionLifetimeMs`.
const CONNECTION_TIME: Millis = Millis {
    min: 1,
    max: 7 * 24 * 3_600_000,
    max_text: "7 days",
};
/// `baseEjectionMs` and `maxEjectionMs`.
const EJECTION: Millis = Millis {
    min: 1,
    max: 24 * 3_600_000,
    max_text: "1 day",
};
/// `healthCheck.intervalMs`: at least 100 ms, so that a few hundred endpoints are not probed
/// thousands of times a second.
const HEALTH_INTERVAL: Millis = Millis {
    min: 100,
    max: 3_600_000,
    max_text: "1 hour",
};
/// Failures or checks in a row.
const STREAK: (u32, u32) = (1, 1000);
/// Retries of one connection.
const ATTEMPTS: (u32, u32) = (0, 10);
const PERCENT: (u8, u8) = (0, 100);
/// `retries.budgetPercent` and `retries.minRetriesPerSecond`.
const BUDGET_PERCENT: (u32, u32) = (0, 100);
const MIN_RETRIES_PER_SECOND: (u32, u32) = (0, 10_000);
/// Circuit limits, as `agent.maxConnections`.
const CIRCUIT: (u32, u32) = (1, 1 << 24);
/// A subset's weight (0: only caller routes choose it).
const SUBSET_WEIGHT: (u32, u32) = (0, 10_000);

impl Cx<'_> {
    /// `{service}.trafficPolicy`, defaults applied.
    pub(super) fn traffic_policy(
        &self,
        raw: &Option<RawTrafficPolicy>,
        service: &str,
    ) -> Result<TrafficPolicy> {
        let Some(t) = raw else {
            return Ok(TrafficPolicy::default());
        };
        self.traffic_policy_at(t, &format!("{service}.trafficPolicy"))
    }

    /// A traffic policy written at `base`, defaults applied.
    pub(super) fn traffic_policy_at(
        &self,
        t: &RawTrafficPolicy,
        base: &str,
    ) -> Result<TrafficPolicy> {
        let base = base.to_owned();
        let defaults_hint = "must not be empty (omit it for the defaults)";
        let load_balancer =
            match self.present(&t.load_balancer, &base, "loadBalancer", defaults_hint)? {
                Some(lb) => self.load_balancer(lb, &format!("{base}.loadBalancer"))?,
                None => LoadBalancer::default(),
            };
        let locality = match self.present(&t.locality, &base, "locality", defaults_hint)? {
            Some(l) => self.locality(l, &format!("{base}.locality"))?,
            None => Locality::default(),
        };
        let outlier_detection = match self.present(
            &t.outlier_detection,
            &base,
            "outlierDetection",
            "must not be empty (write {} for the defaults, {enabled: false} to turn it off)",
        )? {
            Some(o) => self.outlier_detection(o, &format!("{base}.outlierDetection"))?,
            None => Some(OutlierDetection::default()),
        };
        let health_check = match self.present(
            &t.health_check,
            &base,
            "healthCheck",
            "must not be empty (write {} to check with the defaults, omit it for no checks)",
        )? {
            Some(h) => self.health_check(h, &format!("{base}.healthCheck"))?,
            None => None,
        };
        let retries = match self.present(&t.retries, &base, "retries", defaults_hint)? {
            Some(r) => self.retries(r, &format!("{base}.retries"))?,
            None => Retries::default(),
        };
        let connect_timeout = self.millis(
            &t.connect_timeout_ms,
            &base,
            "connectTimeoutMs",
            CONNECT_TIMEOUT,
        )?;
        let idle_timeout =
            self.millis(&t.idle_timeout_ms, &base, "idleTimeoutMs", CONNECTION_TIME)?;
        let max_connection_lifetime = self.millis(
            &t.max_connection_lifetime_ms,
            &base,
            "maxConnectionLifetimeMs",
            CONNECTION_TIME,
        )?;
        let circuit_breaker = match self.present(
            &t.circuit_breaker,
            &base,
            "circuitBreaker",
            "must not be empty (omit it for no limits)",
        )? {
            Some(c) => self.circuit_breaker(c, &format!("{base}.circuitBreaker"))?,
            None => CircuitBreaker::default(),
        };
        let subsets = match self.block(
            &t.subsets,
            &base,
            "subsets",
            "must list at least one subset (omit `subsets` for none)",
        )? {
            Some((list, at)) => self.subsets(list, at, &format!("{base}.subsets"))?,
            None => Vec::new(),
        };
        let mut caller_routes = Vec::new();
        let routes = self.listed(&t.caller_routes, &base, "callerRoutes", "route", "for none")?;
        for (i, route) in routes.into_iter().flatten().enumerate() {
            let path = format!("{base}.callerRoutes[{i}]");
            caller_routes.push(self.caller_route(route, &path, &subsets)?);
        }
        Ok(TrafficPolicy {
            load_balancer,
            locality,
            outlier_detection,
            health_check,
            retries,
            connect_timeout,
            idle_timeout,
            max_connection_lifetime,
            circuit_breaker,
            subsets,
            caller_routes,
        })
    }

    fn load_balancer(&self, lb: &RawLoadBalancer, base: &str) -> Result<LoadBalancer> {
        let algorithm = lb
            .algorithm
            .as_ref()
            .map_or(RawAlgorithm::PeakEwma, |a| a.value);
        if let (Some(hash_on), false) = (&lb.hash_on, algorithm == RawAlgorithm::Maglev) {
            return Err(self.err(
                hash_on.referenced,
                format!("{base}.hashOn"),
                "only applies to algorithm: maglev",
            ));
        }
        let hash_on = match lb.hash_on.as_ref().map(|h| h.value) {
            None | Some(RawHashOn::SourceIp) => HashOn::SourceIp,
            Some(RawHashOn::SourceIdentity) => HashOn::SourceIdentity,
        };
        Ok(match algorithm {
            RawAlgorithm::RoundRobin => LoadBalancer::RoundRobin,
            RawAlgorithm::Random => LoadBalancer::Random,
            RawAlgorithm::Weighted => LoadBalancer::Weighted,
            RawAlgorithm::LeastConnections => LoadBalancer::LeastConnections,
            RawAlgorithm::PeakEwma => LoadBalancer::PeakEwma,
            RawAlgorithm::Maglev => LoadBalancer::Maglev { hash_on },
        })
    }

    fn locality(&self, l: &RawLocality, base: &str) -> Result<Locality> {
        Ok(Locality {
            enabled: l.enabled.unwrap_or(true),
            min_healthy_percent: self.opt_ranged(
                &l.min_healthy_percent,
                base,
                "minHealthyPercent",
                PERCENT,
                defaults::MIN_HEALTHY_PERCENT,
            )?,
        })
    }

    fn outlier_detection(
        &self,
        o: &RawOutlierDetection,
        base: &str,
    ) -> Result<Option<OutlierDetection>> {
        let consecutive_failures = self.opt_ranged(
            &o.consecutive_failures,
            base,
            "consecutiveFailures",
            STREAK,
            defaults::CONSECUTIVE_FAILURES,
        )?;
        let base_ejection = self.millis(&o.base_ejection_ms, base, "baseEjectionMs", EJECTION)?;
        let max_ejection = self.millis(&o.max_ejection_ms, base, "maxEjectionMs", EJECTION)?;
        let max_ejected_percent = self.opt_ranged(
            &o.max_ejected_percent,
            base,
            "maxEjectedPercent",
            PERCENT,
            defaults::MAX_EJECTED_PERCENT,
        )?;
        let (base_ejection, max_ejection) = self.ordered(
            (&o.base_ejection_ms, base_ejection, defaults::BASE_EJECTION),
            (&o.max_ejection_ms, max_ejection, defaults::MAX_EJECTION),
            base,
            ("baseEjectionMs", "maxEjectionMs"),
        )?;
        Ok(o.enabled.unwrap_or(true).then_some(OutlierDetection {
            consecutive_failures,
            base_ejection,
            max_ejection,
            max_ejected_percent,
        }))
    }

    fn health_check(&self, h: &RawHealthCheck, base: &str) -> Result<Option<HealthCheck>> {
        let interval = self.millis(&h.interval_ms, base, "intervalMs", HEALTH_INTERVAL)?;
        let timeout = self.millis(&h.timeout_ms, base, "timeoutMs", CONNECT_TIMEOUT)?;
        let (timeout, interval) = self.ordered(
            (&h.timeout_ms, timeout, defaults::HEALTH_TIMEOUT),
            (&h.interval_ms, interval, defaults::HEALTH_INTERVAL),
            base,
            ("timeoutMs", "intervalMs"),
        )?;
        let unhealthy_threshold = self.opt_ranged(
            &h.unhealthy_threshold,
            base,
            "unhealthyThreshold",
            STREAK,
            defaults::UNHEALTHY_THRESHOLD,
        )?;
        let healthy_threshold = self.opt_ranged(
            &h.healthy_threshold,
            base,
            "healthyThreshold",
            STREAK,
            defaults::HEALTHY_THRESHOLD,
        )?;
        Ok(h.enabled.unwrap_or(true).then_some(HealthCheck {
            interval,
            timeout,
            unhealthy_threshold,
            healthy_threshold,
        }))
    }

    /// Two durations of one block, defaults applied, where the first must not exceed the
    /// second; the refusal points at whichever of the two was written (the defaults are
    /// ordered).
    fn ordered(
        &self,
        (low_raw, low, low_default): (&Option<S<u64>>, Option<Duration>, Duration),
        (high_raw, high, high_default): (&Option<S<u64>>, Option<Duration>, Duration),
        base: &str,
        (low_name, high_name): (&str, &str),
    ) -> Result<(Duration, Duration)> {
        let (low, high) = (low.unwrap_or(low_default), high.unwrap_or(high_default));
        if low <= high {
            return Ok((low, high));
        }
        let written = |d: Duration, raw: &Option<S<u64>>| {
            let default = if raw.is_some() { "" } else { " (the default)" };
            format!("{} ms{default}", d.as_millis())
        };
        let (at, name) = match (low_raw, high_raw) {
            (_, Some(h)) => (h.referenced, high_name),
            (Some(l), None) => (l.referenced, low_name),
            (None, None) => (Location::UNKNOWN, high_name),
        };
        Err(self.err(
            at,
            format!("{base}.{name}"),
            format!(
                "{low_name} ({}) must not exceed {high_name} ({})",
                written(low, low_raw),
                written(high, high_raw)
            ),
        ))
    }

    fn retries(&self, r: &RawRetries, base: &str) -> Result<Retries> {
        Ok(Retries {
            attempts: self.opt_ranged(
                &r.attempts,
                base,
                "attempts",
                ATTEMPTS,
                defaults::RETRY_ATTEMPTS,
            )?,
            budget_percent: self.opt_ranged(
                &r.budget_percent,
                base,
                "budgetPercent",
                BUDGET_PERCENT,
                defaults::RETRY_BUDGET_PERCENT,
            )?,
            min_retries_per_second: self.opt_ranged(
                &r.min_retries_per_second,
                base,
                "minRetriesPerSecond",
                MIN_RETRIES_PER_SECOND,
                defaults::MIN_RETRIES_PER_SECOND,
            )?,
        })
    }

    fn circuit_breaker(&self, c: &RawCircuitBreaker, base: &str) -> Result<CircuitBreaker> {
        let limit = |field: &Option<S<u64>>, name: &str| -> Result<Option<u32>> {
            field
                .as_ref()
                .map(|v| self.ranged(v, &format!("{base}.{name}"), CIRCUIT.0, CIRCUIT.1, ""))
                .transpose()
        };
        Ok(CircuitBreaker {
            max_connections: limit(&c.max_connections, "maxConnections")?,
            max_pending: limit(&c.max_pending_connects, "maxPendingConnects")?,
            max_connections_per_endpoint: limit(
                &c.max_connections_per_endpoint,
                "maxConnectionsPerEndpoint",
            )?,
            max_pending_per_endpoint: limit(
                &c.max_pending_connects_per_endpoint,
                "maxPendingConnectsPerEndpoint",
            )?,
        })
    }

    /// Distinct names, non-empty labels, and some weight: a caller no route matches must
    /// have a subset to go to.
    fn subsets(&self, list: &[S<RawSubset>], at: Location, base: &str) -> Result<Vec<Subset>> {
        if list.is_empty() {
            return Err(self.err(
                at,
                base,
                "must list at least one subset (omit `subsets` for none)",
            ));
        }
        let mut out: Vec<Subset> = Vec::with_capacity(list.len());
        for (i, item) in list.iter().enumerate() {
            let s = &item.value;
            let path = format!("{base}[{i}]");
            let name = self.name(&s.name, &format!("{path}.name"), Kind::Subset)?;
            if let Some(j) = out.iter().position(|o| o.name == name) {
                return Err(self.err(
                    s.name.referenced,
                    format!("{path}.name"),
                    format!("subset {name} is already defined by {base}[{j}]"),
                ));
            }
            if s.labels.value.is_empty() {
                return Err(self.err(
                    s.labels.referenced,
                    format!("{path}.labels"),
                    "must not be empty (a subset is the endpoints whose workload has these labels)",
                ));
            }
            let (min, max) = SUBSET_WEIGHT;
            let weight = self.ranged(&s.weight, &format!("{path}.weight"), min, max, "")?;
            out.push(Subset {
                name,
                labels: s.labels.value.clone(),
                weight,
            });
        }
        if out.iter().all(|s| s.weight == 0) {
            return Err(self.err(
                at,
                base,
                "at least one subset needs a weight above 0 (callers that no route matches go \
                 by weight)",
            ));
        }
        Ok(out)
    }

    fn caller_route(
        &self,
        route: &S<RawCallerRoute>,
        base: &str,
        subsets: &[Subset],
    ) -> Result<CallerRoute> {
        let r = &route.value;
        let conditions = "must set at least one of labels, identities";
        let Some((from, at)) = self.block(&r.from, base, "from", conditions)? else {
            return Err(self.err(route.referenced, format!("{base}.from"), conditions));
        };
        let from_base = format!("{base}.from");
        if from.labels.is_none() && from.identities.is_none() {
            return Err(self.err(at, from_base, conditions));
        }
        let labels: BTreeMap<String, String> = match self.block(
            &from.labels,
            &from_base,
            "labels",
            "must not be empty (omit `labels` for any)",
        )? {
            Some((labels, at)) if labels.is_empty() => {
                return Err(self.err(
                    at,
                    format!("{from_base}.labels"),
                    "must not be empty (omit `labels` for any)",
                ));
            }
            Some((labels, _)) => labels.clone(),
            None => BTreeMap::new(),
        };
        let identities =
            match self.non_empty_list(&from.identities, &from_base, "identities", "identity")? {
                Some(list) => self.identities(list, &from_base, "identities")?,
                None => Vec::new(),
            };
        let subset = &r.subset.value;
        if !subsets.iter().any(|s| s.name == *subset) {
            let known: Vec<&str> = subsets.iter().map(|s| s.name.as_str()).collect();
            let message = if known.is_empty() {
                format!("no subset {subset}: the service has no subsets")
            } else {
                format!("no subset {subset} (the subsets are {})", known.join(", "))
            };
            return Err(self.err(r.subset.referenced, format!("{base}.subset"), message));
        }
        Ok(CallerRoute {
            from: CallerMatch { labels, identities },
            subset: subset.clone(),
        })
    }
}
