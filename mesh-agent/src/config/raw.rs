//! The YAML document as written, with source positions (`Spanned`) on everything a semantic
//! check may have to point at. Only [`super::validate`] reads it.
//!
//! Numbers that must fit a narrower type (ports, marks) are read as `u64` so that validation,
//! not the YAML layer, says what the allowed range is. Addresses are read as strings for the
//! same reason.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_saphyr::Spanned;

use super::model::{AuthorizationAction, FailMode, UnknownDestination};

pub(super) type S<T> = Spanned<T>;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawConfig {
    pub agent: Option<RawAgent>,
    pub workloads: Option<Vec<S<RawWorkload>>>,
    pub services: Option<Vec<S<RawService>>>,
    pub policies: Option<RawPolicies>,
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
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawService {
    pub name: S<String>,
    pub namespace: Option<S<String>>,
    pub vips: S<Vec<S<String>>>,
    pub ports: S<Vec<S<RawPort>>>,
    pub endpoints: S<RawEndpoints>,
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
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawPolicies {
    pub authorization: Option<Vec<S<RawAuthorizationPolicy>>>,
}

/// In the policy blocks a key written with no value (`from:`, `ports:`) must not silently mean
/// "no condition": those fields are read with [`present`], so that `Some(value: None)` is an
/// explicit null, refused by validation, and `None` an absent key.
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

/// Called only when the key is present: wraps the (possibly null) value in `Some`.
fn present<'de, D, T>(de: D) -> Result<Present<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    S::<Option<T>>::deserialize(de).map(Some)
}
