//! The kinds of object the source watches, and where each is served: the built-in kinds at
//! the version this agent is built for (`k8s-openapi`'s), the mesh's own at
//! `mesh.example.dev/v1alpha1`.

use std::fmt;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::core::ApiResource;

use crate::config::PolicyKind;

/// The API group of the mesh's custom resources.
pub const MESH_GROUP: &str = "mesh.example.dev";
/// Their version.
pub const MESH_VERSION: &str = "v1alpha1";

/// What the source watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectKind {
    Namespace,
    Pod,
    Service,
    EndpointSlice,
    /// This agent's node only.
    Node,
    AuthorizationPolicy,
    RateLimit,
    EgressLimit,
    TrafficPolicy,
}

impl ObjectKind {
    pub const ALL: [ObjectKind; 9] = [
        Self::Namespace,
        Self::Pod,
        Self::Service,
        Self::EndpointSlice,
        Self::Node,
        Self::AuthorizationPolicy,
        Self::RateLimit,
        Self::EgressLimit,
        Self::TrafficPolicy,
    ];

    /// The Kubernetes kind (`EndpointSlice`), also the label of the rejection counter.
    pub fn name(self) -> &'static str {
        match self {
            Self::Namespace => "Namespace",
            Self::Pod => "Pod",
            Self::Service => "Service",
            Self::EndpointSlice => "EndpointSlice",
            Self::Node => "Node",
            Self::AuthorizationPolicy => "AuthorizationPolicy",
            Self::RateLimit => "RateLimit",
            Self::EgressLimit => "EgressLimit",
            Self::TrafficPolicy => "TrafficPolicy",
        }
    }

    /// Where the API serves it.
    pub fn api_resource(self) -> ApiResource {
        let mesh = |kind: &str, plural: &str| ApiResource {
            group: MESH_GROUP.to_owned(),
            version: MESH_VERSION.to_owned(),
            api_version: format!("{MESH_GROUP}/{MESH_VERSION}"),
            kind: kind.to_owned(),
            plural: plural.to_owned(),
        };
        match self {
            Self::Namespace => ApiResource::erase::<Namespace>(&()),
            Self::Pod => ApiResource::erase::<Pod>(&()),
            Self::Service => ApiResource::erase::<Service>(&()),
            Self::EndpointSlice => ApiResource::erase::<EndpointSlice>(&()),
            Self::Node => ApiResource::erase::<Node>(&()),
            Self::AuthorizationPolicy => mesh(self.name(), "authorizationpolicies"),
            Self::RateLimit => mesh(self.name(), "ratelimits"),
            Self::EgressLimit => mesh(self.name(), "egresslimits"),
            Self::TrafficPolicy => mesh(self.name(), "trafficpolicies"),
        }
    }

    /// The policy kind of a mesh resource.
    pub fn policy(self) -> Option<PolicyKind> {
        match self {
            Self::AuthorizationPolicy => Some(PolicyKind::AuthorizationPolicy),
            Self::RateLimit => Some(PolicyKind::RateLimit),
            Self::EgressLimit => Some(PolicyKind::EgressLimit),
            Self::TrafficPolicy => Some(PolicyKind::TrafficPolicy),
            _ => None,
        }
    }
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
