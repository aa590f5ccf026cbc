//! Authorization policies (`policies.authorization`): L4 allow and deny rules on the
//! source's SPIFFE identity and the destination port, modelled on Istio's
//! `AuthorizationPolicy`. Plain values, validated by the file source; evaluated by
//! `crate::authz`. What relates a policy to workloads (`selects`) is beside `Workload`, in
//! [`super::model`], so this file imports nothing of the model.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::tls::SpiffeId;

/// An L4 authorization policy, modelled on Istio's `AuthorizationPolicy`.
///
/// It applies to the workloads of `namespace` whose labels include `selector` (all of the
/// namespace when `None`). It *matches* a connection when any of its `rules` matches; with no
/// rule, an `Allow` policy matches nothing (so it denies everything it applies to) and a
/// `Deny` policy matches everything.
///
/// Decision for a workload (see `crate::authz`): denied if a `Deny` policy applying to it
/// matches; otherwise, if some `Allow` policy applies to it, allowed only when one of them
/// matches; otherwise allowed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuthorizationPolicy {
    pub name: String,
    pub namespace: String,
    /// `None`: every workload of the namespace. Never `Some` of an empty map from the file.
    pub selector: Option<BTreeMap<String, String>>,
    pub action: AuthorizationAction,
    pub rules: Vec<AuthorizationRule>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum AuthorizationAction {
    /// The default, as in Istio.
    #[default]
    Allow,
    Deny,
}

/// Matches a connection when every condition it has matches; a rule without any condition
/// matches every connection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AuthorizationRule {
    /// Conditions on the source; `None`: any source, authenticated or not.
    pub from: Option<RuleSource>,
    /// Destination ports (the workload's target port, not the service port); empty: any port.
    pub ports: Vec<u16>,
}

/// Conditions on the source's SPIFFE identity. Each non-empty list is one condition (an empty
/// list is no condition, as in Istio; the file cannot write one):
/// - the identity is one of `identities` or starts with one of `identity_prefixes` (one
///   condition when both are given: they are two spellings of Istio's `principals`);
/// - its namespace (`/ns/<namespace>/` of an identity of the agent's trust domain) is one of
///   `namespaces`.
///
/// A source with any condition never matches an unauthenticated (plaintext) source.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RuleSource {
    /// Exact SPIFFE IDs.
    pub identities: Vec<SpiffeId>,
    /// SPIFFE ID prefixes, compared byte for byte: end one with `/`
    /// (`spiffe://cluster.local/ns/demo/`) unless a partial path segment is meant
    /// (`.../ns/demo` also matches `.../ns/demo-test/...`).
    pub identity_prefixes: Vec<String>,
    pub namespaces: Vec<String>,
}
