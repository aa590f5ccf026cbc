//! The controller against a scripted API server (kube's mock service): nothing is published
//! before every initial list; events, a relist after `410 Gone`, a malformed object among
//! good ones, the agent block's live changes.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::watch;

use super::fake_api::FakeApi;
use super::fixtures::*;
use crate::config::{Config, Scope};
use crate::k8s::kinds::ObjectKind;
use crate::k8s::{SourceInputs, start};
use crate::metrics::Metrics;

const PATIENCE: Duration = Duration::from_secs(10);

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, f)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// The next snapshot published.
async fn next(rx: &mut watch::Receiver<Arc<Config>>) -> Arc<Config> {
    within("a snapshot", rx.changed())
        .await
        .expect("the source is running");
    rx.borrow_and_update().clone()
}

/// Snapshots until one satisfies `ok` (a batch may land in more than one rebuild).
async fn until(
    rx: &mut watch::Receiver<Arc<Config>>,
    what: &str,
    ok: impl Fn(&Config) -> bool,
) -> Arc<Config> {
    within(what, async {
        loop {
            let config = next(rx).await;
            if ok(&config) {
                return config;
            }
        }
    })
    .await
}

fn workload_names(config: &Config) -> Vec<String> {
    config
        .workloads()
        .iter()
        .map(|w| w.qualified_name().to_string())
        .collect()
}

fn endpoints(config: &Config, vip: &str) -> Vec<String> {
    config
        .service_by_vip(vip.parse().expect("addr"))
        .map(|(_, port)| port.endpoints.iter().map(|e| e.addr.to_string()).collect())
        .unwrap_or_default()
}

fn cluster() -> Vec<(&'static str, Value)> {
    let authz = |name: &str, port: u16| {
        policy(
            "AuthorizationPolicy",
            "demo",
            name,
            "2026-01-01T00:00:00Z",
            json!({"selector": {"app": "echo"}, "rules": [{"ports": [port]}]}),
        )
    };
    let mut malformed = pod("demo", "m", "n2", &["10.0.2.9"], json!({}));
    malformed["status"]["podIPs"] = json!("10.0.2.9");
    vec![
        ("namespaces", namespace("demo", Some("true"))),
        ("namespaces", namespace("kube-system", None)),
        ("nodes", node(NODE, "z1")),
        ("nodes", node("n2", "z2")),
        (
            "pods",
            pod("demo", "a", NODE, &["10.0.1.1"], json!({"app": "echo"})),
        ),
        ("pods", malformed),
        (
            "pods",
            pod("demo", "b", "n2", &["10.0.2.1"], json!({"app": "echo"})),
        ),
        (
            "services",
            service("demo", "echo", "10.96.0.10", &[("http", 80, json!("web"))]),
        ),
        (
            "endpointslices",
            slice(
                "demo",
                "echo-1",
                "echo",
                &[("http", 8080)],
                &[("10.0.1.1", NODE, "z1", true)],
            ),
        ),
        ("authorizationpolicies", authz("good", 8080)),
        ("authorizationpolicies", authz("bad", 0)),
        (
            "trafficpolicies",
            policy(
                "TrafficPolicy",
                "demo",
                "echo",
                "2026-01-01T00:00:00Z",
                json!({"service": "echo", "loadBalancer": {"algorithm": "random"}}),
            ),
        ),
    ]
}

#[tokio::test]
async fn the_source_follows_the_api_from_the_initial_sync_through_events_and_a_relist() {
    let (client, api) = FakeApi::start(cluster());
    api.hold("trafficpolicies");
    let metrics = Arc::new(Metrics::new());
    let (file_tx, file_rx) = watch::channel(agent_config());
    let starting = tokio::spawn(start(SourceInputs {
        client,
        file: file_rx,
        status: Arc::default(),
        locator: FakeLocator::with(&[("uid-a", "/proc/10/ns/net")]),
        metrics: metrics.clone(),
    }));
    within("the other lists", async {
        while api.lists("pods") == 0 || api.lists("endpointslices") == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !starting.is_finished(),
        "published before every kind was listed"
    );
    api.release("trafficpolicies");
    let (config, source) = within("the initial sync", starting)
        .await
        .expect("task")
        .expect("synced");

    // The complete initial state; the malformed pod and the invalid policy are skipped.
    assert_eq!(workload_names(&config), ["demo/a", "demo/b"]);
    assert_eq!(config.local_zone(), Some("z1"));
    assert_eq!(endpoints(&config, "10.96.0.10:80"), ["10.0.1.1:8080"]);
    let authz: Vec<&str> = config
        .policies()
        .authorization
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(authz, ["good"]);
    let echo = config.service("demo", "echo").expect("echo");
    assert_eq!(
        echo.traffic.load_balancer,
        crate::config::LoadBalancer::Random
    );
    assert_eq!(metrics.kube_objects_rejected(ObjectKind::Pod.name()), 1);
    assert_eq!(
        metrics.kube_objects_rejected(ObjectKind::AuthorizationPolicy.name()),
        1
    );
    assert_eq!(
        source.stats().snapshot().applied,
        0,
        "the start is not a reload"
    );
    let mut rx = source.current();

    // An endpoint added by a watch event.
    within("the watches", async {
        while api.watching("endpointslices") == 0 || api.watching("pods") == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    api.event(
        "endpointslices",
        "MODIFIED",
        slice(
            "demo",
            "echo-1",
            "echo",
            &[("http", 8080)],
            &[
                ("10.0.1.1", NODE, "z1", true),
                ("10.0.2.1", "n2", "z2", true),
            ],
        ),
    );
    let config = next(&mut rx).await;
    assert_eq!(
        endpoints(&config, "10.96.0.10:80"),
        ["10.0.1.1:8080", "10.0.2.1:8080"]
    );
    assert_eq!(source.stats().snapshot().applied, 1);
    let remote = &config
        .service_by_vip("10.96.0.10:80".parse().expect("addr"))
        .expect("routes")
        .1
        .endpoints[1];
    assert_eq!(remote.zone.as_deref(), Some("z2"));
    assert!(config.endpoint_workload(remote).is_some());

    // A bookmark changes nothing: nothing is published.
    api.bookmark("pods");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), rx.changed())
            .await
            .is_err(),
        "a bookmark published a snapshot"
    );

    // A pod deleted by a watch event.
    api.event(
        "pods",
        "DELETED",
        pod("demo", "b", "n2", &["10.0.2.1"], json!({})),
    );
    let config = next(&mut rx).await;
    assert_eq!(workload_names(&config), ["demo/a"]);

    // While the pods' watch is down, pod c comes and pod a goes; the API then answers the
    // watch with 410 Gone: the watcher lists again and the source follows the new list.
    api.set_quietly("pods", pod("demo", "c", "n2", &["10.0.2.3"], json!({})));
    api.remove_quietly("pods", &pod("demo", "a", NODE, &[], json!({})));
    api.expire("pods");
    let config = until(&mut rx, "the relist", |c| workload_names(c) == ["demo/c"]).await;
    assert!(config.local_workloads().next().is_none());
    assert_eq!(api.lists("pods"), 2);

    // A policy made valid by an event comes in; the earlier refusals stay counted.
    api.event(
        "authorizationpolicies",
        "MODIFIED",
        policy(
            "AuthorizationPolicy",
            "demo",
            "bad",
            "2026-01-01T00:00:00Z",
            json!({"rules": [{"ports": [9090]}]}),
        ),
    );
    let config = next(&mut rx).await;
    assert_eq!(config.policies().authorization.len(), 2);

    // A live setting of the file's agent block applies.
    let text = format!("agent: {{node: {NODE}, trustDomain: mesh.test, connectTimeoutMs: 77}}\n");
    let changed = Config::from_yaml_str_scoped(&text, "mesh.yaml", None, Scope::AgentOnly)
        .unwrap_or_else(|e| panic!("{e}"));
    file_tx.send_replace(Arc::new(changed));
    let config = next(&mut rx).await;
    assert_eq!(
        config.agent().live.connect_timeout,
        Duration::from_millis(77)
    );
    assert_eq!(workload_names(&config), ["demo/c"]);
}

#[tokio::test]
async fn a_local_pod_comes_in_once_its_sandbox_is_found_and_a_second_traffic_policy_is_counted() {
    let traffic = |name: &str, created: &str, algorithm: &str| {
        policy(
            "TrafficPolicy",
            "demo",
            name,
            created,
            json!({"service": "echo", "loadBalancer": {"algorithm": algorithm}}),
        )
    };
    let (client, _api) = FakeApi::start(vec![
        ("namespaces", namespace("demo", Some("true"))),
        ("pods", pod("demo", "a", NODE, &["10.0.1.1"], json!({}))),
        (
            "services",
            service("demo", "echo", "10.96.0.10", &[("http", 80, json!(8080))]),
        ),
        (
            "trafficpolicies",
            traffic("newer", "2026-02-01T00:00:00Z", "random"),
        ),
        (
            "trafficpolicies",
            traffic("older", "2026-01-01T00:00:00Z", "roundRobin"),
        ),
    ]);
    let metrics = Arc::new(Metrics::new());
    let locator = FakeLocator::with(&[]);
    let (_file_tx, file_rx) = watch::channel(agent_config());
    let (config, source) = within(
        "the initial sync",
        start(SourceInputs {
            client,
            file: file_rx,
            status: Arc::default(),
            locator: locator.clone(),
            metrics: metrics.clone(),
        }),
    )
    .await
    .expect("synced");
    // The pod of this node has no sandbox yet: it is left out, not published without netns.
    assert!(config.workloads().is_empty());
    let echo = config.service("demo", "echo").expect("echo");
    assert_eq!(
        echo.traffic.load_balancer,
        crate::config::LoadBalancer::RoundRobin
    );
    assert_eq!(
        metrics.kube_objects_rejected(ObjectKind::TrafficPolicy.name()),
        1
    );

    // The sandbox appears with no event about the pod: the source looks again by itself.
    let mut rx = source.current();
    locator
        .sandboxes
        .lock()
        .insert("uid-a".into(), "/proc/10/ns/net".into());
    let config = next(&mut rx).await;
    assert_eq!(workload_names(&config), ["demo/a"]);
    assert_eq!(
        config.workloads()[0].netns.as_deref(),
        Some(std::path::Path::new("/proc/10/ns/net"))
    );
    // Logged and counted once, not at every rebuild.
    assert_eq!(
        metrics.kube_objects_rejected(ObjectKind::TrafficPolicy.name()),
        1
    );
}
