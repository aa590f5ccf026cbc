//! One Kubernetes object -> its piece of the model, once per event: the pieces are kept (see
//! `store`) and put together at each rebuild (see `build`), so a rebuild never reads JSON.
//!
//! Objects arrive untyped (`DynamicObject`): a typed watcher fails a whole list when one item
//! does not deserialize, so each object is read as its type here, and a malformed one is
//! refused alone with the reason.

mod pod;
mod policy;
mod service;

use std::collections::BTreeMap;

use kube::core::DynamicObject;
use serde::de::DeserializeOwned;

pub use pod::{PodPiece, pod};
pub use policy::{PolicyPiece, policy};
pub use service::{PortPiece, ServicePiece, SliceEndpoint, SlicePiece, TargetPort, service, slice};

use super::kinds::ObjectKind;
use crate::config::{AgentConfig, ConfigError};

/// The label of a namespace whose pods are in the mesh.
pub const ENROLLED_LABEL: &str = "mesh.example.dev/enrolled";

/// Why an object was refused.
#[derive(Debug, thiserror::Error)]
pub enum TranslateError {
    #[error("metadata.name is missing")]
    NoName,
    #[error("does not read as a {kind}: {source}")]
    Malformed {
        kind: ObjectKind,
        #[source]
        source: serde_json::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Policy(#[from] ConfigError),
}

/// `namespace/name` (namespace empty for cluster-scoped objects): how stores key objects.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() {
            f.write_str(&self.name)
        } else {
            write!(f, "{}/{}", self.namespace, self.name)
        }
    }
}

/// The key of `obj`.
pub fn key(obj: &DynamicObject) -> Result<ObjectKey, TranslateError> {
    let name = obj.metadata.name.clone().ok_or(TranslateError::NoName)?;
    Ok(ObjectKey {
        namespace: obj.metadata.namespace.clone().unwrap_or_default(),
        name,
    })
}

/// What an object of each kind becomes.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    /// A namespace: whether it is enrolled.
    Namespace {
        enrolled: bool,
    },
    /// A pod that may be a workload (whether it is depends on its namespace).
    Pod(Box<PodPiece>),
    /// A Service with cluster IPs.
    Service(ServicePiece),
    EndpointSlice(SlicePiece),
    /// This agent's node: its labels (the zone).
    Node {
        labels: BTreeMap<String, String>,
    },
    Policy(Box<PolicyPiece>),
    /// Valid, but nothing for the mesh (a headless Service, a host-network pod, ...).
    Nothing,
}

/// `obj`, of `kind`, as its piece.
pub fn translate(
    kind: ObjectKind,
    obj: &DynamicObject,
    agent: &AgentConfig,
) -> Result<Piece, TranslateError> {
    let key = key(obj)?;
    Ok(match kind {
        ObjectKind::Namespace => {
            let ns: k8s_openapi::api::core::v1::Namespace = typed(kind, obj)?;
            let enrolled = ns
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(ENROLLED_LABEL))
                .is_some_and(|v| v == "true");
            Piece::Namespace { enrolled }
        }
        ObjectKind::Node => {
            let node: k8s_openapi::api::core::v1::Node = typed(kind, obj)?;
            Piece::Node {
                labels: node.metadata.labels.unwrap_or_default(),
            }
        }
        ObjectKind::Pod => match pod(&typed(kind, obj)?, agent)? {
            Some(p) => Piece::Pod(Box::new(p)),
            None => Piece::Nothing,
        },
        ObjectKind::Service => match service(&typed(kind, obj)?, &key)? {
            Some(s) => Piece::Service(s),
            None => Piece::Nothing,
        },
        ObjectKind::EndpointSlice => match slice(&typed(kind, obj)?)? {
            Some(s) => Piece::EndpointSlice(s),
            None => Piece::Nothing,
        },
        ObjectKind::AuthorizationPolicy
        | ObjectKind::RateLimit
        | ObjectKind::EgressLimit
        | ObjectKind::TrafficPolicy => Piece::Policy(Box::new(policy(kind, obj, &key)?)),
    })
}

/// `obj` read as `K`.
fn typed<K: DeserializeOwned>(kind: ObjectKind, obj: &DynamicObject) -> Result<K, TranslateError> {
    let malformed = |source| TranslateError::Malformed { kind, source };
    let value = serde_json::to_value(obj).map_err(malformed)?;
    serde_json::from_value(value).map_err(malformed)
}

/// A port number from the API's `i32`.
fn port(value: i32, what: &str) -> Result<u16, TranslateError> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| TranslateError::Invalid(format!("{what}: {value} is not a port (1-65535)")))
}

/// An IP address the API wrote, canonical.
fn ip(text: &str, what: &str) -> Result<std::net::IpAddr, TranslateError> {
    text.parse::<std::net::IpAddr>()
        .map(|ip| ip.to_canonical())
        .map_err(|_| TranslateError::Invalid(format!("{what}: `{text}` is not an IP address")))
}
