//! One policy object of another source (a Kubernetes custom resource): its `spec`, as YAML or
//! JSON text, validated by the same code as the file's entries, so that a field means and
//! accepts the same thing in both. The name and namespace come from the object's metadata;
//! errors name the object instead of a file position:
//! `AuthorizationPolicy demo/echo-from-client: spec.rules[0].ports[0]: must be 1-65535`.

use std::fmt;

use serde_json::{Map, Value};

use super::Cx;
use crate::config::authorization::AuthorizationPolicy;
use crate::config::error::ConfigError;
use crate::config::file::parse_as;
use crate::config::limits::{EgressLimitPolicy, RateLimitPolicy};
use crate::config::raw::{
    RawAuthorizationPolicy, RawEgressLimit, RawRateLimit, RawTrafficPolicy, S,
};
use crate::config::traffic::TrafficPolicy;
use crate::names::Kind;

/// The kinds of policy object, named as the Kubernetes kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PolicyKind {
    AuthorizationPolicy,
    RateLimit,
    EgressLimit,
    TrafficPolicy,
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::AuthorizationPolicy => "AuthorizationPolicy",
            Self::RateLimit => "RateLimit",
            Self::EgressLimit => "EgressLimit",
            Self::TrafficPolicy => "TrafficPolicy",
        })
    }
}

/// A validated policy object.
#[derive(Debug, Clone, PartialEq)]
pub enum PolicyObject {
    Authorization(AuthorizationPolicy),
    RateLimit(RateLimitPolicy),
    EgressLimit(EgressLimitPolicy),
    /// The traffic policy of the service `service` of the object's namespace.
    Traffic {
        service: String,
        /// Shared with the service it applies to.
        policy: std::sync::Arc<TrafficPolicy>,
    },
}

/// The object `kind` `namespace/name` with `spec` (YAML or JSON text), validated.
pub fn policy_object(
    kind: PolicyKind,
    namespace: &str,
    name: &str,
    spec: &str,
) -> Result<PolicyObject, ConfigError> {
    let origin = format!("{kind} {namespace}/{name}");
    let invalid = |path: &str, message: String| ConfigError::Invalid {
        file: origin.clone(),
        line: 0,
        column: 0,
        path: path.to_owned(),
        message,
    };
    let value: Value = parse_as(spec, &origin).map_err(|e| unlocated(e, &origin))?;
    let mut fields = match value {
        Value::Object(map) => map,
        Value::Null => Map::new(),
        _ => return Err(invalid("spec", "must be an object".to_owned())),
    };
    let cx = Cx { file: &origin };
    let named = |mut fields: Map<String, Value>| {
        for key in ["name", "namespace"] {
            if fields.contains_key(key) {
                return Err(invalid(
                    &format!("spec.{key}"),
                    "unknown field (the name and namespace are the object's metadata)".to_owned(),
                ));
            }
        }
        fields.insert("name".to_owned(), Value::String(name.to_owned()));
        fields.insert("namespace".to_owned(), Value::String(namespace.to_owned()));
        Ok(fields)
    };
    let validated = match kind {
        PolicyKind::TrafficPolicy => {
            let service = match fields.remove("service") {
                Some(Value::String(service)) => service,
                Some(_) => {
                    return Err(invalid("spec.service", "must be a service name".to_owned()));
                }
                None => {
                    return Err(invalid(
                        "spec.service",
                        "required: the service of the policy's namespace it applies to".to_owned(),
                    ));
                }
            };
            Kind::Service
                .check(&service)
                .map_err(|e| invalid("spec.service", format!("`{service}`: {e}")))?;
            let raw: RawTrafficPolicy = parse_fields(fields, &origin)?;
            cx.traffic_policy_at(&raw, "spec")
                .map(|policy| PolicyObject::Traffic {
                    service,
                    policy: std::sync::Arc::new(policy),
                })
        }
        PolicyKind::AuthorizationPolicy => {
            let raw: RawAuthorizationPolicy = parse_fields(named(fields)?, &origin)?;
            cx.authorization_policy(&raw, "spec")
                .map(PolicyObject::Authorization)
        }
        PolicyKind::RateLimit => {
            let raw: S<RawRateLimit> = parse_fields(named(fields)?, &origin)?;
            cx.rate_limit(&raw, "spec").map(PolicyObject::RateLimit)
        }
        PolicyKind::EgressLimit => {
            let raw: S<RawEgressLimit> = parse_fields(named(fields)?, &origin)?;
            cx.egress_limit(&raw, "spec").map(PolicyObject::EgressLimit)
        }
    };
    validated.map_err(|e| unlocated(e, &origin))
}

/// `fields` (the spec, with the name and namespace) strictly as `T`.
fn parse_fields<T: serde::de::DeserializeOwned>(
    fields: Map<String, Value>,
    origin: &str,
) -> Result<T, ConfigError> {
    // JSON is YAML: the file's strict parser reads it, with the same messages.
    let text = Value::Object(fields).to_string();
    parse_as(&text, origin).map_err(|e| unlocated(e, origin))
}

/// `e` without the position (in text the user never wrote), its path under `spec`.
fn unlocated(e: ConfigError, origin: &str) -> ConfigError {
    let under_spec = |path: String| {
        if path.is_empty() || path == "spec" || path.starts_with("spec.") {
            path
        } else {
            format!("spec.{path}")
        }
    };
    match e {
        ConfigError::Parse { path, message, .. } => ConfigError::Parse {
            file: origin.to_owned(),
            line: 0,
            column: 0,
            path: under_spec(path),
            message,
        },
        ConfigError::Invalid { path, message, .. } => ConfigError::Invalid {
            file: origin.to_owned(),
            line: 0,
            column: 0,
            path: under_spec(path),
            message,
        },
        other => other,
    }
}
