//! Translation and build: enrollment, identity, services and their endpoints, traffic-policy
//! conflicts, refused objects, local pods' sandboxes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use kube::core::DynamicObject;
use kube::runtime::watcher::Event;
use serde_json::{Value, json};

use super::fixtures::*;
use crate::config::{AgentConfig, Config, LoadBalancer, Service, Workload};
use crate::k8s::build::{BuildCache, Built, build};
use crate::k8s::kinds::ObjectKind;
use crate::k8s::locate::Sandboxes;
use crate::k8s::store::{ApplyContext, Stores};
use crate::metrics::Metrics;

struct Harness {
    stores: Stores,
    sandboxes: Sandboxes,
    metrics: Metrics,
    agent: AgentConfig,
    locator: Arc<FakeLocator>,
    /// Kept across builds, as the controller keeps it.
    cache: BuildCache,
    /// The last build's snapshot: its endpoints may have left, and their lookups with them.
    last: Option<Arc<Config>>,
}

impl Harness {
    fn new(locator: Arc<FakeLocator>) -> Self {
        let mut h = Self {
            stores: Stores::default(),
            sandboxes: Sandboxes::new(locator.clone()),
            metrics: Metrics::new(),
            agent: agent(),
            locator,
            cache: BuildCache::default(),
            last: None,
        };
        // Every kind listed, empty: the store is synced.
        for kind in ObjectKind::ALL {
            h.event(kind, Event::Init);
            h.event(kind, Event::InitDone);
        }
        h
    }

    fn event(&mut self, kind: ObjectKind, event: Event<DynamicObject>) -> bool {
        let mut cx = ApplyContext {
            agent: &self.agent,
            metrics: &self.metrics,
            sandboxes: &mut self.sandboxes,
        };
        self.stores.apply(kind, event, &mut cx)
    }

    fn apply(&mut self, kind: ObjectKind, object: Value) -> bool {
        let object: DynamicObject = serde_json::from_value(object).expect("dynamic object");
        self.event(kind, Event::Apply(object))
    }

    fn delete(&mut self, kind: ObjectKind, object: Value) -> bool {
        let object: DynamicObject = serde_json::from_value(object).expect("dynamic object");
        self.event(kind, Event::Delete(object))
    }

    /// The build with the kept cache, checked against one made from nothing: whatever the
    /// events, reusing must give the same snapshot.
    fn build(&mut self) -> Built {
        let built = build(
            &mut self.stores,
            &self.agent,
            &mut self.sandboxes,
            &mut self.cache,
        );
        let fresh = build(
            &mut self.stores,
            &self.agent,
            &mut self.sandboxes,
            &mut BuildCache::default(),
        );
        assert_eq!(built.config, fresh.config, "the cache changed the snapshot");
        let earlier = self.last.replace(built.config.clone());
        same_lookups(&built.config, &fresh.config, earlier.as_deref());
        built
    }

    fn rejected(&self, kind: ObjectKind) -> u64 {
        self.metrics.kube_objects_rejected(kind.name())
    }
}

/// The lookups kept or patched from the last snapshot answer as those computed afresh.
fn same_lookups(kept: &Config, fresh: &Config, earlier: Option<&Config>) {
    let qualified = |s: Option<&Service>| s.map(|s| s.qualified_name().to_string());
    let earlier = earlier.map(Config::services).unwrap_or_default();
    for service in fresh.services().iter().chain(earlier) {
        for port in &service.ports {
            for vip in &service.vips {
                let dst = std::net::SocketAddr::new(*vip, port.port);
                assert_eq!(
                    qualified(kept.service_by_vip(dst).map(|(s, _)| s)),
                    qualified(fresh.service_by_vip(dst).map(|(s, _)| s)),
                    "VIP lookup of {dst}"
                );
            }
            for endpoint in &port.endpoints {
                assert_eq!(
                    qualified(kept.service_by_endpoint(endpoint.addr)),
                    qualified(fresh.service_by_endpoint(endpoint.addr)),
                    "endpoint lookup of {}",
                    endpoint.addr
                );
            }
        }
    }
    for w in fresh.workloads() {
        for ip in &w.ips {
            assert_eq!(
                kept.workload_by_ip(*ip).map(|w| &w.name),
                Some(&w.name),
                "workload of {ip}"
            );
        }
    }
}

fn names<'a>(workloads: impl IntoIterator<Item = &'a Workload>) -> Vec<String> {
    workloads
        .into_iter()
        .map(|w| w.qualified_name().to_string())
        .collect()
}

#[test]
fn enrolled_namespaces_give_workloads_with_their_identity_and_opted_out_pods_stay_out() {
    let mut h = Harness::new(FakeLocator::with(&[("uid-a", "/proc/10/ns/net")]));
    h.apply(ObjectKind::Namespace, namespace("demo", Some("true")));
    h.apply(ObjectKind::Namespace, namespace("other", None));
    h.apply(ObjectKind::Namespace, namespace("off", Some("false")));
    h.apply(
        ObjectKind::Pod,
        pod("demo", "a", NODE, &["10.0.1.1"], json!({"app": "a"})),
    );
    h.apply(
        ObjectKind::Pod,
        pod("demo", "b", "n2", &["10.0.2.1", "fd00::2:1"], json!({})),
    );
    let opted_out = json!({"mesh.example.dev/enrolled": "false"});
    h.apply(
        ObjectKind::Pod,
        pod("demo", "out", "n2", &["10.0.2.2"], opted_out),
    );
    let mut host = pod("demo", "host", "n2", &["192.168.0.2"], json!({}));
    host["spec"]["hostNetwork"] = json!(true);
    h.apply(ObjectKind::Pod, host);
    let mut done = pod("demo", "done", "n2", &["10.0.2.3"], json!({}));
    done["status"]["phase"] = json!("Succeeded");
    h.apply(ObjectKind::Pod, done);
    h.apply(
        ObjectKind::Pod,
        pod("demo", "pending", "n2", &[], json!({})),
    );
    let mut default_sa = pod("demo", "plain", "n2", &["10.0.2.4"], json!({}));
    default_sa["spec"]
        .as_object_mut()
        .expect("spec")
        .remove("serviceAccountName");
    h.apply(ObjectKind::Pod, default_sa);
    h.apply(
        ObjectKind::Pod,
        pod("other", "c", "n2", &["10.0.3.1"], json!({})),
    );
    h.apply(
        ObjectKind::Pod,
        pod("off", "d", "n2", &["10.0.4.1"], json!({})),
    );

    let config = h.build().config;
    assert_eq!(
        names(config.workloads().iter().map(Arc::as_ref)),
        ["demo/a", "demo/b", "demo/plain"]
    );
    let a = &config.workloads()[0];
    assert_eq!(a.identity.to_string(), "spiffe://mesh.test/ns/demo/sa/a-sa");
    assert!(a.local);
    assert_eq!(a.netns, Some(PathBuf::from("/proc/10/ns/net")));
    assert_eq!(a.labels.get("app").map(String::as_str), Some("a"));
    let b = &config.workloads()[1];
    assert!(!b.local);
    assert_eq!(b.netns, None);
    assert_eq!(b.ips.len(), 2);
    assert_eq!(
        config.workloads()[2].identity.to_string(),
        "spiffe://mesh.test/ns/demo/sa/default"
    );
    assert_eq!(names(config.local_workloads()), ["demo/a"]);
    assert_eq!(
        config
            .workload_by_ip("10.0.2.1".parse().expect("ip"))
            .map(|w| w.name.as_str()),
        Some("b")
    );

    // Enrolling a namespace later brings its pods in; the pod label opts one out.
    h.apply(ObjectKind::Namespace, namespace("other", Some("true")));
    assert_eq!(
        names(h.build().config.workloads().iter().map(Arc::as_ref)),
        ["demo/a", "demo/b", "demo/plain", "other/c"]
    );
    assert_eq!(h.rejected(ObjectKind::Pod), 0);
}

#[test]
fn services_take_their_endpoints_from_slices_and_named_target_ports_resolve_per_slice() {
    let mut h = Harness::new(FakeLocator::with(&[("uid-a", "/proc/10/ns/net")]));
    h.apply(ObjectKind::Namespace, namespace("demo", Some("true")));
    h.apply(ObjectKind::Node, node(NODE, "z1"));
    h.apply(
        ObjectKind::Pod,
        pod("demo", "a", NODE, &["10.0.1.1"], json!({})),
    );
    h.apply(
        ObjectKind::Pod,
        pod("demo", "b", "n2", &["10.0.2.1"], json!({})),
    );
    h.apply(
        ObjectKind::Service,
        service(
            "demo",
            "echo",
            "10.96.0.10",
            &[("http", 80, json!("web")), ("metrics", 9090, json!(9090))],
        ),
    );
    let a = ("10.0.1.1", NODE, "z1", true);
    let not_ready = ("10.0.1.9", NODE, "z1", false);
    let b = ("10.0.2.1", "n2", "z2", true);
    let outside = ("10.0.9.9", "n3", "z3", true);
    h.apply(
        ObjectKind::EndpointSlice,
        slice(
            "demo",
            "echo-x",
            "echo",
            &[("http", 8080), ("metrics", 9090)],
            &[a, not_ready],
        ),
    );
    // Another version of the pods: the same name resolves to another number.
    h.apply(
        ObjectKind::EndpointSlice,
        slice("demo", "echo-y", "echo", &[("http", 8081)], &[b, outside]),
    );
    // The same address in two slices (moved by the controller) is one endpoint.
    h.apply(
        ObjectKind::EndpointSlice,
        slice("demo", "echo-z", "echo", &[("http", 8080)], &[a]),
    );
    // A headless Service and an ExternalName give nothing.
    h.apply(
        ObjectKind::Service,
        service("demo", "headless", "None", &[("tcp", 80, json!(80))]),
    );
    let mut external = service("demo", "ext", "10.96.0.99", &[("tcp", 80, json!(80))]);
    external["spec"]["type"] = json!("ExternalName");
    h.apply(ObjectKind::Service, external);

    let config = h.build().config;
    assert_eq!(config.services().len(), 1);
    assert_eq!(config.local_zone(), Some("z1"));
    let (svc, http) = config
        .service_by_vip("10.96.0.10:80".parse().expect("addr"))
        .expect("the VIP routes");
    assert_eq!(svc.qualified_name().to_string(), "demo/echo");
    let addrs: Vec<SocketAddr> = http.endpoints.iter().map(|e| e.addr).collect();
    let want: Vec<SocketAddr> = ["10.0.1.1:8080", "10.0.2.1:8081", "10.0.9.9:8081"]
        .iter()
        .map(|a| a.parse().expect("addr"))
        .collect();
    assert_eq!(addrs, want);
    let first = &http.endpoints[0];
    assert_eq!(
        config.endpoint_workload(first).map(|w| w.name.as_str()),
        Some(config.workloads()[0].name.as_str())
    );
    assert!(first.local);
    assert_eq!(first.zone.as_deref(), Some("z1"));
    let raw = &http.endpoints[2];
    assert_eq!(
        (
            config.endpoint_workload(raw).map(|w| w.name.as_str()),
            raw.node.as_deref(),
            raw.local
        ),
        (None, Some("n3"), false)
    );
    // A numeric target port serves the slice that does not list the port.
    let (_, metrics) = config
        .service_by_vip("10.96.0.10:9090".parse().expect("addr"))
        .expect("the metrics port routes");
    let addrs: Vec<String> = metrics
        .endpoints
        .iter()
        .map(|e| e.addr.to_string())
        .collect();
    assert_eq!(addrs, ["10.0.1.1:9090", "10.0.2.1:9090", "10.0.9.9:9090"]);
    assert_eq!(
        config
            .service_by_endpoint("10.0.2.1:8081".parse().expect("addr"))
            .map(|s| s.name.as_str()),
        Some("echo")
    );

    // Deleting a slice removes its endpoints.
    h.delete(
        ObjectKind::EndpointSlice,
        slice("demo", "echo-y", "echo", &[], &[]),
    );
    let config = h.build().config;
    let (_, http) = config
        .service_by_vip("10.96.0.10:80".parse().expect("addr"))
        .expect("routes");
    assert_eq!(http.endpoints.len(), 1);
}

#[test]
fn of_two_traffic_policies_for_a_service_the_older_wins_and_the_other_is_refused() {
    let mut h = Harness::new(FakeLocator::with(&[]));
    h.apply(
        ObjectKind::Service,
        service("demo", "echo", "10.96.0.10", &[("http", 80, json!(8080))]),
    );
    let newer = policy(
        "TrafficPolicy",
        "demo",
        "a-new",
        "2026-03-01T00:00:00Z",
        json!({"service": "echo", "loadBalancer": {"algorithm": "random"}}),
    );
    let older = policy(
        "TrafficPolicy",
        "demo",
        "b-old",
        "2025-03-01T00:00:00Z",
        json!({"service": "echo", "loadBalancer": {"algorithm": "leastConnections"}}),
    );
    h.apply(ObjectKind::TrafficPolicy, newer);
    h.apply(ObjectKind::TrafficPolicy, older.clone());
    let built = h.build();
    let echo = built.config.service("demo", "echo").expect("service");
    assert_eq!(echo.traffic.load_balancer, LoadBalancer::LeastConnections);
    let conflicts: Vec<String> = built.conflicts.iter().map(ToString::to_string).collect();
    assert_eq!(conflicts, ["demo/a-new"]);

    h.delete(ObjectKind::TrafficPolicy, older);
    let built = h.build();
    assert!(built.conflicts.is_empty());
    let echo = built.config.service("demo", "echo").expect("service");
    assert_eq!(echo.traffic.load_balancer, LoadBalancer::Random);
}

#[test]
fn an_invalid_policy_is_refused_alone_and_its_earlier_version_stays() {
    let mut h = Harness::new(FakeLocator::with(&[]));
    let good = |name: &str, port: u16| {
        policy(
            "AuthorizationPolicy",
            "demo",
            name,
            "2026-01-01T00:00:00Z",
            json!({"selector": {"app": "echo"}, "rules": [{"ports": [port]}]}),
        )
    };
    h.apply(ObjectKind::AuthorizationPolicy, good("first", 8080));
    assert!(!h.apply(ObjectKind::AuthorizationPolicy, good("bad", 0)));
    h.apply(ObjectKind::AuthorizationPolicy, good("last", 9090));
    h.apply(
        ObjectKind::RateLimit,
        policy(
            "RateLimit",
            "demo",
            "nothing",
            "2026-01-01T00:00:00Z",
            json!({}),
        ),
    );
    h.apply(
        ObjectKind::EgressLimit,
        policy(
            "EgressLimit",
            "demo",
            "client",
            "2026-01-01T00:00:00Z",
            json!({"connections": {"perSecond": 50}}),
        ),
    );
    let config = h.build().config;
    let authz: Vec<&str> = config
        .policies()
        .authorization
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(authz, ["first", "last"]);
    assert!(config.policies().rate_limits.is_empty());
    assert_eq!(config.policies().egress_limits.len(), 1);
    assert_eq!(h.rejected(ObjectKind::AuthorizationPolicy), 1);
    assert_eq!(h.rejected(ObjectKind::RateLimit), 1);

    // Made invalid: the valid version in force stays, and the refusal is counted.
    assert!(!h.apply(ObjectKind::AuthorizationPolicy, good("first", 0)));
    let config = h.build().config;
    assert_eq!(config.policies().authorization[0].rules[0].ports, [8080]);
    assert_eq!(h.rejected(ObjectKind::AuthorizationPolicy), 2);

    // A malformed pod (its IPs are not a list) is refused; the others stay.
    h.apply(ObjectKind::Namespace, namespace("demo", Some("true")));
    h.apply(
        ObjectKind::Pod,
        pod("demo", "b", "n2", &["10.0.2.1"], json!({})),
    );
    let mut malformed = pod("demo", "m", "n2", &["10.0.2.2"], json!({}));
    malformed["status"]["podIPs"] = json!("10.0.2.2");
    assert!(!h.apply(ObjectKind::Pod, malformed));
    assert_eq!(
        names(h.build().config.workloads().iter().map(Arc::as_ref)),
        ["demo/b"]
    );
    assert_eq!(h.rejected(ObjectKind::Pod), 1);
}

#[test]
fn a_local_pod_waits_for_its_sandbox_and_follows_a_new_one() {
    let locator = FakeLocator::with(&[]);
    let mut h = Harness::new(locator.clone());
    h.apply(ObjectKind::Namespace, namespace("demo", Some("true")));
    let a = pod("demo", "a", NODE, &["10.0.1.1"], json!({}));
    h.apply(ObjectKind::Pod, a.clone());
    let built = h.build();
    assert_eq!(built.unresolved, 1);
    assert!(built.config.workloads().is_empty());

    locator
        .sandboxes
        .lock()
        .insert("uid-a".into(), PathBuf::from("/proc/10/ns/net"));
    let built = h.build();
    assert_eq!(built.unresolved, 0);
    assert_eq!(
        built.config.workloads()[0].netns,
        Some(PathBuf::from("/proc/10/ns/net"))
    );
    // Cached: another rebuild does not look again.
    let lookups = *h.locator.lookups.lock();
    h.build();
    assert_eq!(*h.locator.lookups.lock(), lookups);

    // The sandbox is recreated; the pod's next event makes the source look again.
    locator
        .sandboxes
        .lock()
        .insert("uid-a".into(), PathBuf::from("/proc/20/ns/net"));
    assert_eq!(
        h.build().config.workloads()[0].netns,
        Some(PathBuf::from("/proc/10/ns/net"))
    );
    let mut restarted = a;
    restarted["metadata"]["resourceVersion"] = json!("2");
    assert!(h.apply(ObjectKind::Pod, restarted));
    assert_eq!(
        h.build().config.workloads()[0].netns,
        Some(PathBuf::from("/proc/20/ns/net"))
    );
}

/// Each step builds from the kept cache and checks the snapshot and its lookups against one
/// built from nothing (the harness does): services sharing a pod, a slice moving between
/// them, an endpoint leaving, a Service going and coming back, a TrafficPolicy, a pod leaving
/// and a relist.
#[test]
fn changes_one_at_a_time_build_what_a_full_build_would() {
    let mut h = Harness::new(FakeLocator::with(&[]));
    h.apply(ObjectKind::Namespace, namespace("demo", Some("true")));
    for (name, ip) in [("a", "10.0.2.1"), ("b", "10.0.2.2")] {
        h.apply(ObjectKind::Pod, pod("demo", name, "n2", &[ip], json!({})));
    }
    let a = ("10.0.2.1", "n2", "z2", true);
    let b = ("10.0.2.2", "n2", "z2", true);
    for (name, vip) in [("one", "10.96.0.1"), ("two", "10.96.0.2")] {
        h.apply(
            ObjectKind::Service,
            service("demo", name, vip, &[("http", 80, json!(8080))]),
        );
    }
    let port = [("http", 8080)];
    h.apply(
        ObjectKind::EndpointSlice,
        slice("demo", "one-x", "one", &port, &[a, b]),
    );
    h.apply(
        ObjectKind::EndpointSlice,
        slice("demo", "two-x", "two", &port, &[a]),
    );
    let owner = |h: &mut Harness, ip: &str| {
        let config = h.build().config;
        let addr = SocketAddr::new(ip.parse().expect("ip"), 8080);
        config.service_by_endpoint(addr).map(|s| s.name.clone())
    };
    assert_eq!(owner(&mut h, "10.0.2.1").as_deref(), Some("one"));

    // a leaves "one": "two" owns it now; then b leaves too.
    h.apply(
        ObjectKind::EndpointSlice,
        slice("demo", "one-x", "one", &port, &[b]),
    );
    assert_eq!(owner(&mut h, "10.0.2.1").as_deref(), Some("two"));
    h.apply(
        ObjectKind::EndpointSlice,
        slice("demo", "one-x", "one", &port, &[]),
    );
    assert_eq!(owner(&mut h, "10.0.2.2"), None);

    // The slice moves to "two" (another service label), and comes back.
    h.apply(
        ObjectKind::EndpointSlice,
        slice("demo", "one-x", "two", &port, &[b]),
    );
    assert_eq!(owner(&mut h, "10.0.2.2").as_deref(), Some("two"));
    h.apply(
        ObjectKind::EndpointSlice,
        slice("demo", "one-x", "one", &port, &[a, b]),
    );
    assert_eq!(owner(&mut h, "10.0.2.1").as_deref(), Some("one"));

    // "one" goes: its VIP with it, and "two" owns a; back, with its slice still there.
    let one = service("demo", "one", "10.96.0.1", &[("http", 80, json!(8080))]);
    h.delete(ObjectKind::Service, one.clone());
    let config = h.build().config;
    let vip = SocketAddr::new("10.96.0.1".parse().expect("ip"), 80);
    assert!(config.service_by_vip(vip).is_none());
    assert_eq!(owner(&mut h, "10.0.2.1").as_deref(), Some("two"));
    h.apply(ObjectKind::Service, one);
    assert_eq!(owner(&mut h, "10.0.2.2").as_deref(), Some("one"));

    // A TrafficPolicy for "two" only rebuilds "two".
    let before = h.build().config;
    h.apply(
        ObjectKind::TrafficPolicy,
        policy(
            "TrafficPolicy",
            "demo",
            "tp",
            "2026-01-01T00:00:00Z",
            json!({"service": "two", "loadBalancer": {"algorithm": "random"}}),
        ),
    );
    let after = h.build().config;
    assert!(Arc::ptr_eq(&before.services()[0], &after.services()[0]));
    assert!(!Arc::ptr_eq(&before.services()[1], &after.services()[1]));
    assert_eq!(
        after.services()[1].traffic.load_balancer,
        LoadBalancer::Random
    );

    // A pod leaves: its address is no workload endpoint any more.
    h.delete(
        ObjectKind::Pod,
        pod("demo", "b", "n2", &["10.0.2.2"], json!({})),
    );
    assert_eq!(owner(&mut h, "10.0.2.2"), None);

    // A relist of slices without "two-x": a is "one"'s only.
    h.event(ObjectKind::EndpointSlice, Event::Init);
    let object: DynamicObject =
        serde_json::from_value(slice("demo", "one-x", "one", &port, &[a])).expect("slice");
    h.event(ObjectKind::EndpointSlice, Event::InitApply(object));
    h.event(ObjectKind::EndpointSlice, Event::InitDone);
    let config = h.build().config;
    let two = config.service("demo", "two").expect("two");
    assert!(two.ports[0].endpoints.is_empty());
    assert_eq!(owner(&mut h, "10.0.2.1").as_deref(), Some("one"));
}
