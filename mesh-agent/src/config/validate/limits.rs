//! Validates `policies.rateLimits` and `policies.egressLimits` into [`RateLimitPolicy`] and
//! [`EgressLimitPolicy`]: names and selectors as authorization's, rates within ranges a token
//! bucket can hold, and no policy that limits nothing.
//!
//! The ranges: connections 1..=1,000,000 per second (burst the same); bytes 1..=10 GB per
//! second, with a burst of 1 KiB..=1 GB (below 1 KiB, pacing would write a few bytes at a
//! time). A wait on a limit lasts 1 ms..=1 minute: a held connection holds its sockets.

use std::collections::{BTreeMap, HashMap};

use serde_saphyr::Location;

use super::scalars::Millis;
use super::{Cx, Result};
use crate::config::limits::{
    Bandwidth, EgressLimitPolicy, OnLimit, PerSource, Rate, RateLimitPolicy, SourceOverride,
};
use crate::config::model::QualifiedName;
use crate::config::raw::{
    Present, RawBandwidth, RawEgressLimit, RawLimitAction, RawOnLimit, RawPerSource, RawRate,
    RawRateLimit, S,
};
use crate::config::settings::defaults;
use crate::names::Kind;

const CONNECTIONS_PER_SECOND: (u32, u32) = (1, 1_000_000);
const BYTES_PER_SECOND: (u64, u64) = (1, 10_000_000_000);
const BURST_BYTES: (u64, u64) = (1024, 1_000_000_000);
/// The default burst: a tenth of a second's worth, at least this much.
const MIN_DEFAULT_BURST_BYTES: u64 = 64 * 1024;
const MAX_WAIT: Millis = Millis {
    min: 1,
    max: 60_000,
    max_text: "1 minute",
};

/// The fields both kinds of limit share, as written.
struct Written<'r> {
    name: &'r S<String>,
    namespace: &'r Option<S<String>>,
    selector: &'r Present<BTreeMap<String, String>>,
    connections: &'r Present<RawRate>,
    bandwidth: &'r Present<RawBandwidth>,
    on_limit: &'r Present<RawOnLimit>,
}

/// The fields both kinds of limit share, checked.
struct Common {
    name: String,
    namespace: String,
    selector: Option<BTreeMap<String, String>>,
    connections: Option<Rate>,
    bandwidth: Option<Bandwidth>,
    on_limit: OnLimit,
}

impl Cx<'_> {
    pub(super) fn rate_limits(&self, raw: &[S<RawRateLimit>]) -> Result<Vec<RateLimitPolicy>> {
        let mut out: Vec<RateLimitPolicy> = Vec::with_capacity(raw.len());
        let mut names = Names::default();
        for (i, item) in raw.iter().enumerate() {
            let base = format!("policies.rateLimits[{i}]");
            let policy = self.rate_limit(item, &base)?;
            let written = &item.value.name;
            self.unique(
                &mut names,
                (&policy.namespace, &policy.name),
                written,
                &base,
                "rate limit",
            )?;
            out.push(policy);
        }
        Ok(out)
    }

    /// One rate limit, at `base`.
    pub(super) fn rate_limit(&self, item: &S<RawRateLimit>, base: &str) -> Result<RateLimitPolicy> {
        let p = &item.value;
        let c = self.common(
            Written {
                name: &p.name,
                namespace: &p.namespace,
                selector: &p.selector,
                connections: &p.connections,
                bandwidth: &p.bandwidth,
                on_limit: &p.on_limit,
            },
            base,
        )?;
        let per_source = match self.block(
            &p.per_source,
            base,
            "perSource",
            "must set at least one of connections, bandwidth, overrides (omit `perSource` \
             for no limit per source)",
        )? {
            Some((s, at)) => Some(self.per_source(s, at, &format!("{base}.perSource"))?),
            None => None,
        };
        if c.connections.is_none() && c.bandwidth.is_none() && per_source.is_none() {
            return Err(self.err(
                item.referenced,
                base,
                "must set at least one of connections, bandwidth, perSource",
            ));
        }
        Ok(RateLimitPolicy {
            name: c.name,
            namespace: c.namespace,
            selector: c.selector,
            connections: c.connections,
            bandwidth: c.bandwidth,
            per_source,
            on_limit: c.on_limit,
        })
    }

    pub(super) fn egress_limits(
        &self,
        raw: &[S<RawEgressLimit>],
    ) -> Result<Vec<EgressLimitPolicy>> {
        let mut out: Vec<EgressLimitPolicy> = Vec::with_capacity(raw.len());
        let mut names = Names::default();
        for (i, item) in raw.iter().enumerate() {
            let base = format!("policies.egressLimits[{i}]");
            let policy = self.egress_limit(item, &base)?;
            let written = &item.value.name;
            self.unique(
                &mut names,
                (&policy.namespace, &policy.name),
                written,
                &base,
                "egress limit",
            )?;
            out.push(policy);
        }
        Ok(out)
    }

    /// One egress limit, at `base`.
    pub(super) fn egress_limit(
        &self,
        item: &S<RawEgressLimit>,
        base: &str,
    ) -> Result<EgressLimitPolicy> {
        let p = &item.value;
        let c = self.common(
            Written {
                name: &p.name,
                namespace: &p.namespace,
                selector: &p.selector,
                connections: &p.connections,
                bandwidth: &p.bandwidth,
                on_limit: &p.on_limit,
            },
            base,
        )?;
        if c.connections.is_none() && c.bandwidth.is_none() {
            return Err(self.err(
                item.referenced,
                base,
                "must set at least one of connections, bandwidth",
            ));
        }
        Ok(EgressLimitPolicy {
            name: c.name,
            namespace: c.namespace,
            selector: c.selector,
            connections: c.connections,
            bandwidth: c.bandwidth,
            on_limit: c.on_limit,
        })
    }

    fn common(&self, w: Written<'_>, base: &str) -> Result<Common> {
        let name = self.name(w.name, &format!("{base}.name"), Kind::Policy)?;
        let namespace = self.opt_name(
            w.namespace,
            base,
            "namespace",
            Kind::Namespace,
            defaults::NAMESPACE,
        )?;
        let every = "must not be empty (omit it to apply the limit to every workload of the \
                     namespace)";
        let selector = match self.block(w.selector, base, "selector", every)? {
            Some((labels, at)) if labels.is_empty() => {
                return Err(self.err(at, format!("{base}.selector"), every));
            }
            Some((labels, _)) => Some(labels.clone()),
            None => None,
        };
        let on_limit = match self.present(
            w.on_limit,
            base,
            "onLimit",
            "must set action (reject or wait); omit `onLimit` to reject",
        )? {
            Some(o) => self.on_limit(o, &format!("{base}.onLimit"))?,
            None => OnLimit::default(),
        };
        Ok(Common {
            name,
            namespace,
            selector,
            connections: self.rate(w.connections, base)?,
            bandwidth: self.bandwidth(w.bandwidth, base)?,
            on_limit,
        })
    }

    /// `(namespace, name)` is unique in its list.
    fn unique(
        &self,
        names: &mut Names,
        (namespace, name_value): (&str, &str),
        name: &S<String>,
        base: &str,
        what: &str,
    ) -> Result<()> {
        let key = (namespace.to_owned(), name_value.to_owned());
        if let Some(line) = names.get(&key) {
            return Err(self.err(
                name.referenced,
                format!("{base}.name"),
                format!(
                    "{what} {} is already defined at line {line}",
                    QualifiedName(namespace, name_value)
                ),
            ));
        }
        names.insert(key, name.referenced.line());
        Ok(())
    }

    /// `base.connections`, when written.
    fn rate(&self, raw: &Present<RawRate>, base: &str) -> Result<Option<Rate>> {
        let Some(r) = self.present(
            raw,
            base,
            "connections",
            "must set perSecond (omit `connections` for no connection limit)",
        )?
        else {
            return Ok(None);
        };
        let base = format!("{base}.connections");
        let (min, max) = CONNECTIONS_PER_SECOND;
        let per_second = self.ranged(&r.per_second, &format!("{base}.perSecond"), min, max, "")?;
        let burst =
            self.opt_ranged(&r.burst, &base, "burst", CONNECTIONS_PER_SECOND, per_second)?;
        Ok(Some(Rate { per_second, burst }))
    }

    /// `base.bandwidth`, when written.
    fn bandwidth(&self, raw: &Present<RawBandwidth>, base: &str) -> Result<Option<Bandwidth>> {
        let Some(b) = self.present(
            raw,
            base,
            "bandwidth",
            "must set bytesPerSecond (omit `bandwidth` for no byte limit)",
        )?
        else {
            return Ok(None);
        };
        let base = format!("{base}.bandwidth");
        let (min, max) = BYTES_PER_SECOND;
        let path = format!("{base}.bytesPerSecond");
        let bytes_per_second = self.ranged(&b.bytes_per_second, &path, min, max, "")?;
        let default_burst = (bytes_per_second / 10).max(MIN_DEFAULT_BURST_BYTES);
        let burst_bytes = self.opt_ranged(
            &b.burst_bytes,
            &base,
            "burstBytes",
            BURST_BYTES,
            default_burst,
        )?;
        Ok(Some(Bandwidth {
            bytes_per_second,
            burst_bytes,
        }))
    }

    fn on_limit(&self, o: &RawOnLimit, base: &str) -> Result<OnLimit> {
        match (o.action.value, &o.max_wait_ms) {
            (RawLimitAction::Reject, None) => Ok(OnLimit::Reject),
            (RawLimitAction::Reject, Some(ms)) => Err(self.err(
                ms.referenced,
                format!("{base}.maxWaitMs"),
                "only applies to action: wait",
            )),
            (RawLimitAction::Wait, None) => Err(self.err(
                o.action.referenced,
                format!("{base}.maxWaitMs"),
                "is required with action: wait (how long a connection may be held)",
            )),
            (RawLimitAction::Wait, Some(ms)) => Ok(OnLimit::Wait {
                max_wait: self.duration(ms, &format!("{base}.maxWaitMs"), MAX_WAIT)?,
            }),
        }
    }

    fn per_source(&self, s: &RawPerSource, at: Location, base: &str) -> Result<PerSource> {
        let connections = self.rate(&s.connections, base)?;
        let bandwidth = self.bandwidth(&s.bandwidth, base)?;
        let mut overrides: Vec<SourceOverride> = Vec::new();
        let list = self.listed(&s.overrides, base, "overrides", "override", "for none")?;
        for (i, o) in list.into_iter().flatten().enumerate() {
            let path = format!("{base}.overrides[{i}]");
            let Some(ids) =
                self.non_empty_list(&o.value.identities, &path, "identities", "identity")?
            else {
                return Err(self.err(
                    o.referenced,
                    format!("{path}.identities"),
                    "is required: the callers this override is for",
                ));
            };
            let identities = self.identities(ids, &path, "identities")?;
            for (k, id) in identities.iter().enumerate() {
                if let Some(j) = overrides.iter().position(|o| o.identities.contains(id)) {
                    let at = ids.get(k).map_or(o.referenced, |s| s.referenced);
                    return Err(self.err(
                        at,
                        format!("{path}.identities[{k}]"),
                        format!("{id} already has an override: {base}.overrides[{j}]"),
                    ));
                }
            }
            let connections = self.rate(&o.value.connections, &path)?;
            let bandwidth = self.bandwidth(&o.value.bandwidth, &path)?;
            if connections.is_none() && bandwidth.is_none() {
                return Err(self.err(
                    o.referenced,
                    path,
                    "must set at least one of connections, bandwidth",
                ));
            }
            overrides.push(SourceOverride {
                identities,
                connections,
                bandwidth,
            });
        }
        if connections.is_none() && bandwidth.is_none() && overrides.is_empty() {
            return Err(self.err(
                at,
                base,
                "must set at least one of connections, bandwidth, overrides (omit `perSource` \
                 for no limit per source)",
            ));
        }
        Ok(PerSource {
            connections,
            bandwidth,
            overrides,
        })
    }
}

/// `(namespace, name)` -> the line that defined it.
type Names = HashMap<(String, String), u64>;
