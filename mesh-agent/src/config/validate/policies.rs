//! Validates the `policies` block: authorization policies, their rules and source conditions;
//! the rate limits are in [`super::limits`].

use std::collections::HashMap;

use serde_saphyr::Location;

use super::{Cx, Result};
use crate::config::authorization::{AuthorizationPolicy, AuthorizationRule, RuleSource};
use crate::config::error::ConfigError;
use crate::config::model::Policies;
use crate::config::raw::{RawAuthorizationPolicy, RawFrom, RawPolicies, RawRule, S};
use crate::config::settings::defaults;
use crate::names::Kind;

impl Cx<'_> {
    pub(super) fn policies(&self, raw: &RawPolicies) -> Result<Policies> {
        let mut authorization: Vec<AuthorizationPolicy> = Vec::new();
        let mut names: HashMap<(String, String), u64> = HashMap::new();
        for (i, item) in raw.authorization.iter().flatten().enumerate() {
            let base = format!("policies.authorization[{i}]");
            let policy = self.authorization_policy(&item.value, &base)?;
            let key = (policy.namespace.clone(), policy.name.clone());
            if let Some(line) = names.get(&key) {
                return Err(self.err(
                    item.value.name.referenced,
                    format!("{base}.name"),
                    format!(
                        "authorization policy {} is already defined at line {line}",
                        policy.qualified_name()
                    ),
                ));
            }
            names.insert(key, item.value.name.referenced.line());
            authorization.push(policy);
        }
        Ok(Policies {
            authorization,
            rate_limits: self.rate_limits(raw.rate_limits.as_deref().unwrap_or_default())?,
            egress_limits: self.egress_limits(raw.egress_limits.as_deref().unwrap_or_default())?,
        })
    }

    pub(super) fn authorization_policy(
        &self,
        p: &RawAuthorizationPolicy,
        base: &str,
    ) -> Result<AuthorizationPolicy> {
        let name = self.name(&p.name, &format!("{base}.name"), Kind::Policy)?;
        let namespace = self.opt_name(
            &p.namespace,
            base,
            "namespace",
            Kind::Namespace,
            defaults::NAMESPACE,
        )?;
        let selector = match &p.selector {
            None => None,
            Some(s) => match &s.value {
                Some(labels) if !labels.is_empty() => Some(labels.clone()),
                _ => {
                    return Err(self.err(
                        s.referenced,
                        format!("{base}.selector"),
                        "must not be empty (omit it to apply the policy to every workload of \
                         the namespace)",
                    ));
                }
            },
        };
        let action = match &p.action {
            None => Default::default(),
            Some(a) => a.value.ok_or_else(|| {
                self.err(
                    a.referenced,
                    format!("{base}.action"),
                    "must be allow or deny",
                )
            })?,
        };
        // `rules:` with no value is refused rather than read as "no rule": that would mean
        // "deny everything" or "match everything", a surprise either way.
        let raw_rules = self.present(&p.rules, base, "rules", "must be a list of rules")?;
        let mut rules = Vec::new();
        for (j, r) in raw_rules.into_iter().flatten().enumerate() {
            rules.push(self.rule(&r.value, &format!("{base}.rules[{j}]"))?);
        }
        Ok(AuthorizationPolicy {
            name,
            namespace,
            selector,
            action,
            rules,
        })
    }

    fn rule(&self, r: &RawRule, base: &str) -> Result<AuthorizationRule> {
        let from = match &r.from {
            None => None,
            Some(f) => match &f.value {
                Some(from) => Some(self.from(from, f.referenced, base)?),
                None => return Err(self.empty_from(f.referenced, base)),
            },
        };
        let mut ports: Vec<u16> = Vec::new();
        if let Some(list) = self.non_empty_list(&r.ports, base, "ports", "port")? {
            for (k, p) in list.iter().enumerate() {
                let path = format!("{base}.ports[{k}]");
                let port = self.port(p, &path)?;
                if ports.contains(&port) {
                    return Err(self.err(
                        p.referenced,
                        path,
                        format!("port {port} is listed twice"),
                    ));
                }
                ports.push(port);
            }
        }
        Ok(AuthorizationRule { from, ports })
    }

    /// The `from` block of the rule at `rule`.
    fn from(&self, f: &RawFrom, at: Location, rule: &str) -> Result<RuleSource> {
        if f.identities.is_none() && f.identity_prefixes.is_none() && f.namespaces.is_none() {
            return Err(self.empty_from(at, rule));
        }
        let base = format!("{rule}.from");
        let mut source = RuleSource::default();
        if let Some(list) = self.non_empty_list(&f.identities, &base, "identities", "identity")? {
            for (k, id) in list.iter().enumerate() {
                let path = format!("{base}.identities[{k}]");
                source.identities.push(self.identity(
                    id,
                    &path,
                    " (use identityPrefixes for a prefix)",
                )?);
            }
        }
        if let Some(list) = self.non_empty_list(
            &f.identity_prefixes,
            &base,
            "identityPrefixes",
            "identity prefix",
        )? {
            for (k, prefix) in list.iter().enumerate() {
                let path = format!("{base}.identityPrefixes[{k}]");
                source
                    .identity_prefixes
                    .push(self.identity_prefix(prefix, &path)?);
            }
        }
        if let Some(list) = self.non_empty_list(&f.namespaces, &base, "namespaces", "namespace")? {
            for (k, ns) in list.iter().enumerate() {
                let path = format!("{base}.namespaces[{k}]");
                source
                    .namespaces
                    .push(self.name(ns, &path, Kind::Namespace)?);
            }
        }
        Ok(source)
    }

    fn empty_from(&self, at: Location, rule: &str) -> ConfigError {
        self.err(
            at,
            format!("{rule}.from"),
            "must set at least one of identities, identityPrefixes, namespaces (omit `from` to \
             match any source)",
        )
    }

    /// A prefix of SPIFFE IDs: `spiffe://`, then anything but a blank or control character.
    fn identity_prefix(&self, s: &S<String>, path: &str) -> Result<String> {
        let v = &s.value;
        if !v.starts_with("spiffe://") {
            return Err(self.err(
                s.referenced,
                path,
                format!("`{v}` does not start with spiffe://"),
            ));
        }
        if v.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(self.err(
                s.referenced,
                path,
                format!("`{v}` contains a blank or control character"),
            ));
        }
        Ok(v.clone())
    }
}
