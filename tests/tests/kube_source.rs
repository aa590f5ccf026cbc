//! The agent with the Kubernetes source (`--source kubernetes`), end to end: its workloads,
//! services and endpoints come from a scripted API server ([`mesh_tests::kubeapi`]) in the
//! node's namespace, its pods are in the kubelet's cgroup layout and found by their UIDs.
//! Traffic to a Service VIP flows; an endpoint added by a watch event gets new connections;
//! a pod deleted from the API is unenrolled; a restarted sandbox is enrolled again; a policy
//! resource takes effect. Needs root and fails loudly without it.

use std::time::Duration;

use mesh_tests::kubeapi::FakeApiServer;
use mesh_tests::kubeapi::fixtures::{self, PodFixture, ServicePort, SliceEndpoint};
use mesh_tests::{Agent, CgroupDriver, ConfigBuilder, Pod, Qos, Topology, assert_root, wait_until};
use serde_json::Value;

const TOOL: &str = env!("CARGO_BIN_EXE_mesh-testtool");
const VIP: &str = "10.96.0.10";
const WAIT: Duration = Duration::from_secs(20);

fn endpoint(pod: &Pod) -> SliceEndpoint {
    SliceEndpoint {
        ip: std::net::IpAddr::V4(pod.ipv4()),
        node: pod.node_name().to_owned(),
        pod_name: pod.name().to_owned(),
        pod_uid: pod.uid().unwrap_or_default().to_owned(),
        ready: true,
        zone: None,
    }
}

fn slice(endpoints: &[&Pod]) -> Value {
    let endpoints: Vec<SliceEndpoint> = endpoints.iter().map(|p| endpoint(p)).collect();
    fixtures::endpoint_slice("test", "echo", &[("http", 8080)], &endpoints)
}

/// The server `mesh-testtool id` reaches at the VIP from `client`, if it connects.
fn id(client: &Pod) -> Option<String> {
    client.id(&format!("{VIP}:80")).ok().map(|(name, _)| name)
}

fn enrolled(agent: &Agent) -> Vec<String> {
    let status = agent.status().unwrap_or_default();
    let mut names: Vec<String> = status["workloads"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|w| w["workload"].as_str().map(str::to_owned))
        .collect();
    names.sort();
    names
}

/// Node `node1` with kubelet-layout pods a (client), b and c (echo servers on :8080), the API
/// server with namespace `test` enrolled, pods a and b, Service `echo` (VIP:80 -> 8080) with
/// b as its endpoint, and the agent on the Kubernetes source, both pods enrolled.
struct Cluster {
    topo: Topology,
    a: Pod,
    b: Pod,
    c: Pod,
    api: FakeApiServer,
    agent: Agent,
    _servers: Vec<mesh_tests::Background>,
}

fn cluster(name: &str, driver: CgroupDriver) -> Cluster {
    assert_root();
    let mut topo = Topology::new(name).expect("topology");
    let node = topo.add_node("node1").expect("node");
    let a = topo
        .add_kubelet_pod(&node, "a", driver, Qos::BestEffort)
        .expect("pod a");
    let b = topo
        .add_kubelet_pod(&node, "b", driver, Qos::Burstable)
        .expect("pod b");
    let c = topo
        .add_kubelet_pod(&node, "c", driver, Qos::BestEffort)
        .expect("pod c");
    let servers: Vec<_> = [(&b, "b"), (&c, "c")]
        .into_iter()
        .map(|(pod, name)| {
            pod.spawn_ready(TOOL, ["serve", "--listen", "[::]:8080", "--name", name])
                .expect("server")
        })
        .collect();

    let api = FakeApiServer::start_in(&node.netns_path()).expect("API server");
    let enrolled_label = [("mesh.example.dev/enrolled", "true")];
    api.apply(fixtures::namespace("test", &enrolled_label))
        .expect("namespace");
    api.apply(fixtures::topology_node(&node, &[]))
        .expect("node");
    for (pod, app) in [(&a, "client"), (&b, "echo")] {
        api.apply(PodFixture::of(pod, "test", pod.name(), &[("app", app)]).to_json())
            .expect("pod");
    }
    let port = ServicePort {
        name: "http",
        port: 80,
        target_port: 8080,
    };
    api.apply(fixtures::service(
        "test",
        "echo",
        &[VIP.parse().expect("vip")],
        &[port],
        &[("app", "echo")],
    ))
    .expect("service");
    api.apply(slice(&[&b])).expect("slice");

    let dir = std::env::temp_dir().join(format!("mesh-test-{}", topo.id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    // The systemd cluster names the kubepods cgroup itself; the cgroupfs one names the tree
    // above it, as the DaemonSet's ConfigMap does, and the agent finds `kubepods` below.
    let cgroup = match driver {
        CgroupDriver::Systemd => topo.kubepods_root(driver),
        CgroupDriver::Cgroupfs => topo.cgroup_root().to_owned(),
    };
    let config = ConfigBuilder::new(&topo, &node).cgroup(&cgroup).build();
    let agent = Agent::start_kubernetes(&topo, &node, &config, &kubeconfig).expect("agent starts");
    let attached = agent.status().expect("status")["cgroup"]
        .as_str()
        .map(std::path::PathBuf::from);
    assert_eq!(
        attached,
        Some(topo.kubepods_root(driver)),
        "programs on the kubepods cgroup"
    );
    assert!(
        wait_until(WAIT, || enrolled(&agent).len() == 2),
        "pods a and b enrolled: {:?}",
        agent.status()
    );
    Cluster {
        topo,
        a,
        b,
        c,
        api,
        agent,
        _servers: servers,
    }
}

#[test]
fn service_traffic_follows_the_api_server() {
    // Every field bound: what a `..` leaves in the temporary (the topology, the servers)
    // would be torn down at once.
    let Cluster {
        topo: _topo,
        a,
        b,
        c,
        api,
        agent,
        _servers,
    } = cluster("kubesrc", CgroupDriver::Systemd);

    // Traffic to the Service VIP reaches its endpoint.
    assert!(
        wait_until(WAIT, || id(&a).as_deref() == Some("b")),
        "the VIP reaches b"
    );

    // Pod c and an endpoint for it arrive by watch events: new connections reach it.
    api.apply(PodFixture::of(&c, "test", "c", &[("app", "echo")]).to_json())
        .expect("pod c");
    api.apply(slice(&[&b, &c])).expect("slice with c");
    assert!(
        wait_until(WAIT, || id(&a).as_deref() == Some("c")),
        "a new connection reaches c"
    );
    assert!(wait_until(WAIT, || enrolled(&agent).len() == 3));

    // Pod b deleted from the API: unenrolled, and its endpoint gone.
    api.delete("v1", "Pod", "test", "b").expect("delete b");
    api.apply(slice(&[&c])).expect("slice without b");
    assert!(
        wait_until(WAIT, || enrolled(&agent).len() == 2),
        "b unenrolled: {:?}",
        agent.status()
    );
    for _ in 0..5 {
        assert_eq!(id(&a).as_deref(), Some("c"));
    }
}

#[test]
fn a_restarted_sandbox_is_enrolled_again_and_a_policy_resource_takes_effect() {
    let Cluster {
        mut topo,
        a,
        b,
        c: _c,
        api,
        agent,
        _servers,
    } = cluster("kubesrc2", CgroupDriver::Cgroupfs);
    assert!(wait_until(WAIT, || id(&a).as_deref() == Some("b")));

    // The kubelet recreates b's sandbox (new namespace, same UID and addresses) and updates
    // the pod: the agent finds the new namespace and enrolls it.
    let before = agent.status().expect("status");
    let netns_of_b = |status: &Value| {
        status["workloads"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|w| w["workload"] == "test/b")
            .map(|w| w["netns"].clone())
    };
    let old = netns_of_b(&before).expect("b enrolled");
    let b = topo.restart_sandbox(&b).expect("sandbox restart");
    let _server = b
        .spawn_ready(TOOL, ["serve", "--listen", "[::]:8080", "--name", "b2"])
        .expect("server in the new sandbox");
    api.apply(PodFixture::of(&b, "test", "b", &[("app", "echo")]).to_json())
        .expect("pod b updated");
    assert!(
        wait_until(WAIT, || {
            agent
                .status()
                .ok()
                .and_then(|s| netns_of_b(&s))
                .is_some_and(|netns| netns != old)
        }),
        "b enrolled again in its new namespace: {:?}",
        agent.status()
    );
    assert!(wait_until(WAIT, || id(&a).as_deref() == Some("b2")));

    // An AuthorizationPolicy denying a's identity: a's connections to b are refused.
    api.apply(serde_json::json!({
        "apiVersion": "mesh.example.dev/v1alpha1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-client", "namespace": "test"},
        "spec": {
            "selector": {"app": "echo"},
            "action": "deny",
            "rules": [{"from": {"identities": ["spiffe://cluster.local/ns/test/sa/a"]}}],
        },
    }))
    .expect("policy");
    assert!(
        wait_until(WAIT, || id(&a).is_none()),
        "the policy refuses a's connections"
    );
}
