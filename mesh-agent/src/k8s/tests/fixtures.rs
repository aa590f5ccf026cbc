//! Objects as the API server writes them (list items carry no kind; creation timestamps are
//! RFC 3339), a locator double, and an agent block.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;
use serde_json::{Value, json};

use crate::config::{AgentConfig, Config, Scope};
use crate::k8s::locate::{PodLocator, Unresolved};

pub const NODE: &str = "n1";

pub fn agent_config() -> Arc<Config> {
    let text = format!("agent: {{node: {NODE}, trustDomain: mesh.test}}\n");
    Arc::new(
        Config::from_yaml_str_scoped(&text, "mesh.yaml", None, Scope::AgentOnly)
            .unwrap_or_else(|e| panic!("{e}")),
    )
}

pub fn agent() -> AgentConfig {
    agent_config().agent().clone()
}

pub fn meta(namespace: Option<&str>, name: &str, labels: Value) -> Value {
    let mut m = json!({
        "name": name,
        "uid": format!("uid-{name}"),
        "resourceVersion": "1",
        "creationTimestamp": "2026-01-01T00:00:00Z",
        "labels": labels,
    });
    if let Some(ns) = namespace {
        m["namespace"] = json!(ns);
    }
    m
}

pub fn namespace(name: &str, enrolled: Option<&str>) -> Value {
    let labels = match enrolled {
        Some(v) => json!({"kubernetes.io/metadata.name": name, "mesh.example.dev/enrolled": v}),
        None => json!({"kubernetes.io/metadata.name": name}),
    };
    json!({"metadata": meta(None, name, labels), "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}})
}

pub fn node(name: &str, zone: &str) -> Value {
    json!({"metadata": meta(None, name, json!({"topology.kubernetes.io/zone": zone})), "spec": {}})
}

/// A running pod with `ips` on `node`.
pub fn pod(namespace: &str, name: &str, node: &str, ips: &[&str], labels: Value) -> Value {
    let pod_ips: Vec<Value> = ips.iter().map(|ip| json!({"ip": ip})).collect();
    json!({
        "metadata": meta(Some(namespace), name, labels),
        "spec": {
            "nodeName": node,
            "serviceAccountName": format!("{name}-sa"),
            "containers": [{"name": "app", "image": "app:1"}],
        },
        "status": {"phase": "Running", "podIP": ips.first(), "podIPs": pod_ips},
    })
}

/// A ClusterIP Service; `ports`: (name, port, targetPort as JSON).
pub fn service(namespace: &str, name: &str, vip: &str, ports: &[(&str, u16, Value)]) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p, t)| json!({"name": n, "protocol": "TCP", "port": p, "targetPort": t}))
        .collect();
    json!({
        "metadata": meta(Some(namespace), name, json!({})),
        "spec": {
            "type": "ClusterIP",
            "clusterIP": vip,
            "clusterIPs": [vip],
            "selector": {"app": name},
            "ports": ports,
        },
        "status": {"loadBalancer": {}},
    })
}

/// An EndpointSlice of `service`; `endpoints`: (ip, node, zone, ready).
pub fn slice(
    namespace: &str,
    name: &str,
    service: &str,
    ports: &[(&str, u16)],
    endpoints: &[(&str, &str, &str, bool)],
) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p)| json!({"name": n, "protocol": "TCP", "port": p}))
        .collect();
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(ip, node, zone, ready)| {
            json!({
                "addresses": [ip],
                "conditions": {"ready": ready, "serving": ready, "terminating": false},
                "nodeName": node,
                "zone": zone,
            })
        })
        .collect();
    json!({
        "metadata": meta(
            Some(namespace),
            name,
            json!({"kubernetes.io/service-name": service, "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}),
        ),
        "addressType": "IPv4",
        "ports": ports,
        "endpoints": endpoints,
    })
}

/// A mesh policy resource created at `created` (RFC 3339).
pub fn policy(kind: &str, namespace: &str, name: &str, created: &str, spec: Value) -> Value {
    let mut m = meta(Some(namespace), name, json!({}));
    m["creationTimestamp"] = json!(created);
    json!({"apiVersion": "mesh.example.dev/v1alpha1", "kind": kind, "metadata": m, "spec": spec})
}

/// Pods found by UID from a table the test fills.
#[derive(Default)]
pub struct FakeLocator {
    pub sandboxes: Mutex<HashMap<String, PathBuf>>,
    pub lookups: Mutex<usize>,
}

impl FakeLocator {
    pub fn with(entries: &[(&str, &str)]) -> Arc<Self> {
        let locator = Self::default();
        for (uid, path) in entries {
            locator
                .sandboxes
                .lock()
                .insert((*uid).to_owned(), PathBuf::from(path));
        }
        Arc::new(locator)
    }
}

impl PodLocator for FakeLocator {
    fn netns(&self, uid: &str) -> Result<PathBuf, Unresolved> {
        *self.lookups.lock() += 1;
        self.sandboxes
            .lock()
            .get(uid)
            .cloned()
            .ok_or_else(|| Unresolved::pending(format!("no pod {uid}")))
    }
}
