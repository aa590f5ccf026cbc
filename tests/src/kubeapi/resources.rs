//! The resource types the scripted API server knows, and the mapping of request paths onto
//! them, as the real server's discovery would route them.
//!
//! Only what a node agent reads is listed: the core types, EndpointSlices and the project's
//! own custom resources (deploy/kubernetes/base/crds). An unknown path is a 404, as on a real
//! server that does not serve the type.

/// One served resource type.
#[derive(Debug, PartialEq, Eq)]
pub struct ResourceType {
    /// `v1`, `discovery.k8s.io/v1`, `mesh.example.dev/v1alpha1`.
    pub api_version: &'static str,
    /// `Pod`, `EndpointSlice`, ...
    pub kind: &'static str,
    /// The path segment: `pods`, `endpointslices`, ...
    pub plural: &'static str,
    /// Whether objects live in a namespace.
    pub namespaced: bool,
    /// A custom resource: the real server keeps `kind`/`apiVersion` on the items of its
    /// lists (they are stored unstructured), where built-in lists leave them out.
    pub custom: bool,
}

const fn builtin(
    api_version: &'static str,
    kind: &'static str,
    plural: &'static str,
    namespaced: bool,
) -> ResourceType {
    ResourceType {
        api_version,
        kind,
        plural,
        namespaced,
        custom: false,
    }
}

const fn custom(kind: &'static str, plural: &'static str) -> ResourceType {
    ResourceType {
        api_version: MESH_API_VERSION,
        kind,
        plural,
        namespaced: true,
        custom: true,
    }
}

/// Group/version of the project's custom resources.
pub const MESH_API_VERSION: &str = "mesh.example.dev/v1alpha1";

/// Every type the server serves.
pub static RESOURCES: &[ResourceType] = &[
    builtin("v1", "Pod", "pods", true),
    builtin("v1", "Namespace", "namespaces", false),
    builtin("v1", "Service", "services", true),
    builtin("v1", "Node", "nodes", false),
    builtin(
        "discovery.k8s.io/v1",
        "EndpointSlice",
        "endpointslices",
        true,
    ),
    custom("AuthorizationPolicy", "authorizationpolicies"),
    custom("RateLimit", "ratelimits"),
    custom("EgressLimit", "egresslimits"),
    custom("TrafficPolicy", "trafficpolicies"),
];

/// The type of objects with this `apiVersion` and `kind`.
pub fn by_kind(api_version: &str, kind: &str) -> Option<&'static ResourceType> {
    RESOURCES
        .iter()
        .find(|r| r.api_version == api_version && r.kind == kind)
}

/// What a request path names.
#[derive(Debug, PartialEq, Eq)]
pub struct Route {
    pub resource: &'static ResourceType,
    /// `/namespaces/{ns}/...`: only that namespace; None: all namespaces (or cluster scope).
    pub namespace: Option<String>,
    /// `/.../{name}`: one object.
    pub name: Option<String>,
}

/// Maps `/api/v1/...` and `/apis/{group}/{version}/...` onto a route; None is a 404.
pub fn route(path: &str) -> Option<Route> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (api_version, rest) = match segments.as_slice() {
        ["api", "v1", rest @ ..] => ("v1".to_owned(), rest),
        ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
        _ => return None,
    };
    let find = |plural: &str| {
        RESOURCES
            .iter()
            .find(|r| r.api_version == api_version && r.plural == plural)
    };
    let (resource, namespace, name) = match rest {
        [plural] => (find(plural)?, None, None),
        ["namespaces", ns, plural, tail @ ..] if tail.len() <= 1 => {
            let resource = find(plural)?;
            if !resource.namespaced {
                return None;
            }
            (resource, Some((*ns).to_owned()), tail.first())
        }
        [plural, name] => (find(plural)?, None, Some(name)),
        _ => return None,
    };
    if resource.namespaced && namespace.is_none() && name.is_some() {
        // A namespaced object is only addressable within its namespace.
        return None;
    }
    Some(Route {
        resource,
        namespace,
        name: name.map(|n| (*n).to_owned()),
    })
}

impl ResourceType {
    /// `PodList`, `EndpointSliceList`, ...
    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_the_paths_a_client_uses() {
        let r = route("/api/v1/pods").expect("pods");
        assert_eq!((r.resource.kind, r.namespace, r.name), ("Pod", None, None));
        let r = route("/api/v1/namespaces/demo/pods/web").expect("one pod");
        assert_eq!(
            (r.resource.kind, r.namespace.as_deref(), r.name.as_deref()),
            ("Pod", Some("demo"), Some("web"))
        );
        let r = route("/api/v1/namespaces/demo").expect("one namespace");
        assert_eq!(
            (r.resource.kind, r.name.as_deref()),
            ("Namespace", Some("demo"))
        );
        let r = route("/api/v1/namespaces").expect("namespaces");
        assert_eq!(r.resource.kind, "Namespace");
        let r = route("/apis/discovery.k8s.io/v1/namespaces/a/endpointslices").expect("slices");
        assert_eq!(
            (r.resource.kind, r.namespace.as_deref()),
            ("EndpointSlice", Some("a"))
        );
        let r = route("/apis/mesh.example.dev/v1alpha1/ratelimits").expect("crd");
        assert!(r.resource.custom);
        assert_eq!(
            route("/api/v1/nodes/n1").expect("node").name.as_deref(),
            Some("n1")
        );
        assert!(
            route("/api/v1/pods/web").is_none(),
            "namespaced object without namespace"
        );
        assert!(
            route("/api/v1/namespaces/a/nodes").is_none(),
            "cluster-scoped in a namespace"
        );
        assert!(route("/api/v1/configmaps").is_none());
        assert!(route("/apis/apps/v1/deployments").is_none());
    }
}
