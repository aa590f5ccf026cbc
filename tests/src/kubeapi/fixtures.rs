//! Objects shaped like a real API server's output (Kubernetes 1.33, containerd), so that a
//! client decoding them meets every field it would meet in a cluster, not a minimal subset.
//!
//! The server fills in resourceVersion, uid (where absent) and creationTimestamp when an
//! object is applied.

use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value, json};

use crate::kubelet::Qos;
use crate::{Node, Pod};

/// Label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The current time as the API server writes it: `2026-12-04T23:48:23Z`.
pub fn rfc3339_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let secs = i64::try_from(secs).unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days since 1970-01-01 to a civil date (proleptic Gregorian; Howard Hinnant's method).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn labels_map(labels: &[(&str, &str)]) -> Value {
    Value::Object(
        labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), json!(v)))
            .collect::<Map<_, _>>(),
    )
}

fn condition(kind: &str, now: &str) -> Value {
    json!({"type": kind, "status": "True", "lastProbeTime": null, "lastTransitionTime": now})
}

/// A running Pod with one container, as the kubelet reports it.
#[derive(Debug, Clone)]
pub struct PodFixture {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub node: String,
    /// status.hostIP; None leaves hostIP out (a pod not yet reported by a kubelet).
    pub host_ip: Option<IpAddr>,
    pub service_account: String,
    /// status.podIPs, the first also status.podIP.
    pub ips: Vec<IpAddr>,
    pub labels: Vec<(String, String)>,
    pub qos: Qos,
}

impl PodFixture {
    /// The Pod object of a topology pod made by [`crate::Topology::add_kubelet_pod`]: its
    /// uid, node, both addresses, QoS class, and the node's underlay address as hostIP.
    pub fn of(
        pod: &Pod,
        namespace: &str,
        service_account: &str,
        labels: &[(&str, &str)],
    ) -> PodFixture {
        PodFixture {
            namespace: namespace.to_owned(),
            name: pod.name().to_owned(),
            uid: pod.uid().map_or_else(String::new, str::to_owned),
            node: pod.node_name().to_owned(),
            host_ip: Some(IpAddr::V4(pod.node().underlay_ipv4())),
            service_account: service_account.to_owned(),
            ips: vec![IpAddr::V4(pod.ipv4()), IpAddr::V6(pod.ipv6())],
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            qos: pod.kubelet().map_or(Qos::BestEffort, |k| k.qos),
        }
    }

    pub fn to_json(&self) -> Value {
        let now = rfc3339_now();
        let labels: Vec<(&str, &str)> = self
            .labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let resources = match self.qos {
            Qos::BestEffort => json!({}),
            Qos::Burstable => json!({"requests": {"cpu": "10m", "memory": "16Mi"}}),
            Qos::Guaranteed => json!({
                "limits": {"cpu": "100m", "memory": "64Mi"},
                "requests": {"cpu": "100m", "memory": "64Mi"},
            }),
        };
        let mut metadata = json!({
            "name": self.name,
            "namespace": self.namespace,
            "labels": labels_map(&labels),
        });
        if !self.uid.is_empty() {
            metadata["uid"] = json!(self.uid);
        }
        let image = "registry.k8s.io/e2e-test-images/agnhost:2.53";
        let mut status = json!({
            "phase": "Running",
            "conditions": [
                condition("PodReadyToStartContainers", &now),
                condition("Initialized", &now),
                condition("Ready", &now),
                condition("ContainersReady", &now),
                condition("PodScheduled", &now),
            ],
            "podIP": self.ips.first().map(ToString::to_string),
            "podIPs": self.ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect::<Vec<_>>(),
            "startTime": now,
            "qosClass": self.qos.class(),
            "containerStatuses": [{
                "name": "app",
                "state": {"running": {"startedAt": now}},
                "lastState": {},
                "ready": true,
                "restartCount": 0,
                "image": image,
                "imageID": "registry.k8s.io/e2e-test-images/agnhost@sha256:99c6b4bb4a1e1df3f0b3752168c89358794d02258ebebc26bf21c29399011a85",
                "containerID": "containerd://4f1bd8c0a1b34f6a7e8a2f6b9c0d1e2f3a4b5c6d7e8f90a1b2c3d4e5f6a7b8c9",
                "started": true,
            }],
        });
        if let Some(s) = status.as_object_mut().filter(|_| self.ips.is_empty()) {
            // No address yet: the kubelet leaves both fields out.
            s.remove("podIP");
            s.remove("podIPs");
        }
        if let Some(host) = self.host_ip {
            status["hostIP"] = json!(host.to_string());
            status["hostIPs"] = json!([{"ip": host.to_string()}]);
        }
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": metadata,
            "spec": {
                "containers": [{
                    "name": "app",
                    "image": image,
                    "imagePullPolicy": "IfNotPresent",
                    "resources": resources,
                    "terminationMessagePath": "/dev/termination-log",
                    "terminationMessagePolicy": "File",
                }],
                "dnsPolicy": "ClusterFirst",
                "enableServiceLinks": true,
                "nodeName": self.node,
                "preemptionPolicy": "PreemptLowerPriority",
                "priority": 0,
                "restartPolicy": "Always",
                "schedulerName": "default-scheduler",
                "securityContext": {},
                "serviceAccount": self.service_account,
                "serviceAccountName": self.service_account,
                "terminationGracePeriodSeconds": 30,
                "tolerations": [
                    {"effect": "NoExecute", "key": "node.kubernetes.io/not-ready", "operator": "Exists", "tolerationSeconds": 300},
                    {"effect": "NoExecute", "key": "node.kubernetes.io/unreachable", "operator": "Exists", "tolerationSeconds": 300},
                ],
            },
            "status": status,
        })
    }
}

/// A running BestEffort Pod (no hostIP; see [`PodFixture`] for more control).
pub fn pod(
    namespace: &str,
    name: &str,
    uid: &str,
    node: &str,
    service_account: &str,
    ips: &[IpAddr],
    labels: &[(&str, &str)],
) -> Value {
    PodFixture {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        uid: uid.to_owned(),
        node: node.to_owned(),
        host_ip: None,
        service_account: service_account.to_owned(),
        ips: ips.to_vec(),
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        qos: Qos::BestEffort,
    }
    .to_json()
}

/// An active Namespace; carries `kubernetes.io/metadata.name` like every real one.
pub fn namespace(name: &str, labels: &[(&str, &str)]) -> Value {
    let mut labels = labels_map(labels);
    labels["kubernetes.io/metadata.name"] = json!(name);
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": labels},
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    })
}

/// One Service port: name ("" for the unnamed single port), port, targetPort; TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServicePort<'a> {
    pub name: &'a str,
    pub port: u16,
    pub target_port: u16,
}

/// A ClusterIP Service; `cluster_ips` decides the IP families (dual-stack when both).
pub fn service(
    namespace: &str,
    name: &str,
    cluster_ips: &[IpAddr],
    ports: &[ServicePort<'_>],
    selector: &[(&str, &str)],
) -> Value {
    let families: Vec<&str> = cluster_ips
        .iter()
        .map(|ip| if ip.is_ipv4() { "IPv4" } else { "IPv6" })
        .collect();
    let ports: Vec<Value> = ports
        .iter()
        .map(|p| {
            let mut port = json!({"port": p.port, "protocol": "TCP", "targetPort": p.target_port});
            if !p.name.is_empty() {
                port["name"] = json!(p.name);
            }
            port
        })
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "clusterIP": cluster_ips.first().map(ToString::to_string),
            "clusterIPs": cluster_ips.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "internalTrafficPolicy": "Cluster",
            "ipFamilies": families,
            "ipFamilyPolicy": if cluster_ips.len() > 1 { "PreferDualStack" } else { "SingleStack" },
            "ports": ports,
            "selector": labels_map(selector),
            "sessionAffinity": "None",
            "type": "ClusterIP",
        },
        "status": {"loadBalancer": {}},
    })
}

/// One endpoint of an EndpointSlice: a pod's address on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceEndpoint {
    pub ip: IpAddr,
    pub node: String,
    pub pod_name: String,
    pub pod_uid: String,
    pub ready: bool,
    pub zone: Option<String>,
}

/// An EndpointSlice of `service` as the endpointslice controller writes it, one address
/// family (that of the first endpoint; IPv4 when empty); `ports` are (name, port) on the
/// pods. Its name is `<service>-<5 chars>`, fixed per service and family, so that applying
/// again replaces the same slice.
pub fn endpoint_slice(
    namespace: &str,
    service: &str,
    ports: &[(&str, u16)],
    endpoints: &[SliceEndpoint],
) -> Value {
    let family = match endpoints.first() {
        Some(e) if e.ip.is_ipv6() => "IPv6",
        _ => "IPv4",
    };
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|e| {
            let mut v = json!({
                "addresses": [e.ip.to_string()],
                "conditions": {"ready": e.ready, "serving": e.ready, "terminating": false},
                "nodeName": e.node,
                "targetRef": {"kind": "Pod", "name": e.pod_name, "namespace": namespace, "uid": e.pod_uid},
            });
            if let Some(zone) = &e.zone {
                v["zone"] = json!(zone);
            }
            v
        })
        .collect();
    let ports: Vec<Value> = ports
        .iter()
        .map(|(name, port)| json!({"name": name, "port": port, "protocol": "TCP"}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{service}-{}", slice_suffix(namespace, service, family)),
            "generateName": format!("{service}-"),
            "namespace": namespace,
            "labels": {
                SERVICE_NAME_LABEL: service,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": rfc3339_now()},
        },
        "addressType": family,
        "endpoints": endpoints,
        "ports": ports,
    })
}

/// Five lowercase alphanumerics from the slice's identity (FNV-1a), like generateName's.
fn slice_suffix(namespace: &str, service: &str, family: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in namespace
        .bytes()
        .chain([0])
        .chain(service.bytes())
        .chain([0])
        .chain(family.bytes())
    {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|i| char::from(ALPHABET[((h >> (i * 8)) % ALPHABET.len() as u64) as usize]))
        .collect()
}

/// A Ready Node with the labels the kubelet sets, plus `labels`.
pub fn node(name: &str, labels: &[(&str, &str)]) -> Value {
    let now = rfc3339_now();
    let mut all = json!({
        "beta.kubernetes.io/arch": "amd64",
        "beta.kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
    });
    for (k, v) in labels {
        all[*k] = json!(v);
    }
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": all},
        "spec": {},
        "status": {
            "addresses": [{"type": "Hostname", "address": name}],
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": "kubelet is posting ready status",
                "lastHeartbeatTime": now, "lastTransitionTime": now,
            }],
            "nodeInfo": {
                "architecture": "amd64",
                "containerRuntimeVersion": "containerd://2.1.1",
                "kernelVersion": "6.18.0",
                "kubeProxyVersion": "",
                "kubeletVersion": "v1.33.1",
                "operatingSystem": "linux",
                "osImage": "Debian GNU/Linux 13 (trixie)",
                "bootID": "", "machineID": "", "systemUUID": "",
            },
        },
    })
}

/// The Node object of a topology node: [`node`] plus its underlay address as InternalIP
/// and its pod subnets as podCIDRs.
pub fn topology_node(node_: &Node, labels: &[(&str, &str)]) -> Value {
    let mut object = node(node_.name(), labels);
    let cidrs = [
        format!("{}/24", node_.pod_subnet_v4()),
        format!("{}/64", node_.pod_subnet_v6()),
    ];
    object["spec"] = json!({"podCIDR": cidrs[0], "podCIDRs": cidrs});
    object["status"]["addresses"] = json!([
        {"type": "InternalIP", "address": node_.underlay_ipv4().to_string()},
        {"type": "Hostname", "address": node_.name()},
    ]);
    object
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let t = rfc3339_now();
        assert_eq!(t.len(), 20, "{t}");
        assert!(
            t.starts_with("20") && t.ends_with('Z') && &t[10..11] == "T",
            "{t}"
        );
    }

    #[test]
    fn slices_name_stays_per_service_and_family() {
        let ep = |ip: &str| SliceEndpoint {
            ip: ip.parse().expect("ip"),
            node: "n1".into(),
            pod_name: "p".into(),
            pod_uid: "u".into(),
            ready: true,
            zone: None,
        };
        let a = endpoint_slice("ns", "echo", &[("http", 8080)], &[ep("10.1.0.2")]);
        let b = endpoint_slice("ns", "echo", &[("http", 8080)], &[ep("10.1.0.3")]);
        let c = endpoint_slice("ns", "echo", &[("http", 8080)], &[ep("fd00:1::2")]);
        assert_eq!(a["metadata"]["name"], b["metadata"]["name"]);
        assert_ne!(a["metadata"]["name"], c["metadata"]["name"]);
        assert_eq!(c["addressType"], "IPv6");
        assert_eq!(a["metadata"]["labels"][SERVICE_NAME_LABEL], "echo");
    }
}
