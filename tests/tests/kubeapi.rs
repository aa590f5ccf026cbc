//! Tests of the scripted Kubernetes API server ([`mesh_tests::kubeapi`]), driven by kube-rs,
//! the client the agent uses: what it lists, watches and resumes must be what a real server
//! would make it do. The test inside a node namespace needs root and fails loudly without it.

use std::collections::BTreeSet;
use std::fs;
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, WatchEvent, WatchParams,
};
use kube::runtime::{WatchStreamExt as _, reflector, watcher};
use mesh_tests::kubeapi::fixtures::{self, ServicePort, SliceEndpoint};
use mesh_tests::kubeapi::{ApiRequest, FakeApiServer, ServerOptions};
use mesh_tests::{Topology, assert_root};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(10);

/// A kube client for `api`, configured through a kubeconfig file as the agent is.
async fn client(api: &FakeApiServer) -> kube::Client {
    let path = std::env::temp_dir().join(format!(
        "mesh-kubeapi-{}-{}.kubeconfig",
        std::process::id(),
        api.addr().port()
    ));
    api.write_kubeconfig(&path).expect("kubeconfig");
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).expect("reading kubeconfig");
    let _ = fs::remove_file(&path);
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("config from kubeconfig");
    kube::Client::try_from(config).expect("client")
}

fn pod(ns: &str, name: &str, node: &str, labels: &[(&str, &str)]) -> serde_json::Value {
    let ip = format!("10.1.0.{}", 2 + name.len());
    fixtures::pod(
        ns,
        name,
        "",
        node,
        "default",
        &[ip.parse().expect("ip")],
        labels,
    )
}

/// Polls `done` until it holds, for at most [`WAIT`].
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A reflector over Pods with `config`, running in the background; its store.
fn reflect(client: &kube::Client, config: watcher::Config) -> reflector::Store<Pod> {
    let (reader, writer) = reflector::store();
    let stream =
        reflector(writer, watcher(Api::<Pod>::all(client.clone()), config)).default_backoff();
    tokio::spawn(stream.for_each(|_| async {}));
    reader
}

fn names(store: &reflector::Store<Pod>) -> BTreeSet<String> {
    store
        .state()
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| (*n).to_owned()).collect()
}

fn pod_requests(api: &FakeApiServer) -> Vec<ApiRequest> {
    api.requests()
        .into_iter()
        .filter(|r| r.path == "/api/v1/pods")
        .collect()
}

#[tokio::test]
async fn lists_and_gets_like_a_real_server() {
    let api = FakeApiServer::start().expect("server");
    let c = client(&api).await;
    api.apply(fixtures::namespace("a", &[("mesh", "on")]))
        .expect("ns");
    for (ns, name) in [("a", "p1"), ("a", "p2"), ("b", "p3")] {
        api.apply(pod(ns, name, "n1", &[])).expect("pod");
    }
    let all = Api::<Pod>::all(c.clone())
        .list(&ListParams::default())
        .await
        .expect("list");
    assert_eq!(all.items.len(), 3);
    assert_eq!(
        all.metadata.resource_version,
        Some(api.resource_version().to_string())
    );
    let p1 = &all.items[0];
    assert!(
        p1.metadata.uid.as_ref().is_some_and(|u| u.len() == 36),
        "uid filled in"
    );
    assert!(p1.metadata.creation_timestamp.is_some());
    let status = p1.status.as_ref().expect("status");
    assert_eq!(status.phase.as_deref(), Some("Running"));
    assert_eq!(status.pod_ips.as_ref().map(Vec::len), Some(1));
    assert_eq!(
        Api::<Pod>::namespaced(c.clone(), "a")
            .list(&ListParams::default())
            .await
            .expect("ns list")
            .items
            .len(),
        2
    );
    let got = Api::<Pod>::namespaced(c.clone(), "b")
        .get("p3")
        .await
        .expect("get");
    assert_eq!(got.metadata.namespace.as_deref(), Some("b"));

    // Pages with continue tokens, all at the first page's resourceVersion.
    let first = Api::<Pod>::all(c.clone())
        .list(&ListParams::default().limit(2))
        .await
        .expect("page 1");
    assert_eq!(first.items.len(), 2);
    let token = first.metadata.continue_.clone().expect("continue token");
    api.apply(pod("b", "p4", "n1", &[]))
        .expect("pod during paging");
    let second = Api::<Pod>::all(c.clone())
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
        .expect("page 2");
    assert_eq!(
        second.items.len(),
        1,
        "the snapshot of the first page, not p4"
    );
    assert_eq!(second.metadata.continue_, None);
    assert_eq!(
        second.metadata.resource_version,
        first.metadata.resource_version
    );
    // After a compaction the rest of a list is gone: 410, start again.
    let first = Api::<Pod>::all(c.clone())
        .list(&ListParams::default().limit(2))
        .await
        .expect("page 1");
    api.compact();
    let token = first.metadata.continue_.expect("continue token");
    let expired = Api::<Pod>::all(c.clone())
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await;
    assert!(
        matches!(&expired, Err(kube::Error::Api(s)) if s.code == 410 && s.reason == "Expired"),
        "{expired:?}"
    );
    // Not in another namespace.
    let missing = Api::<Pod>::namespaced(c.clone(), "a").get("p3").await;
    assert!(
        matches!(&missing, Err(kube::Error::Api(s)) if s.is_not_found()),
        "{missing:?}"
    );

    // Built-in lists leave kind/apiVersion off the items; single objects carry them.
    let raw: serde_json::Value = c
        .request(
            http::Request::get("/api/v1/pods")
                .body(Vec::new())
                .expect("request"),
        )
        .await
        .expect("raw list");
    assert_eq!(
        (raw["kind"].as_str(), raw["apiVersion"].as_str()),
        (Some("PodList"), Some("v1"))
    );
    assert!(raw["items"][0].get("kind").is_none() && raw["items"][0].get("apiVersion").is_none());
    let raw: serde_json::Value = c
        .request(
            http::Request::get("/api/v1/namespaces/b/pods/p3")
                .body(Vec::new())
                .expect("request"),
        )
        .await
        .expect("raw get");
    assert_eq!(raw["kind"], "Pod");
}

#[tokio::test]
async fn every_fixture_decodes_as_the_real_type() {
    let api = FakeApiServer::start().expect("server");
    let c = client(&api).await;
    let vip = "10.96.0.10".parse().expect("ip");
    let port = ServicePort {
        name: "http",
        port: 80,
        target_port: 8080,
    };
    api.apply(fixtures::service(
        "a",
        "echo",
        &[vip],
        &[port],
        &[("app", "echo")],
    ))
    .expect("svc");
    let endpoint = SliceEndpoint {
        ip: "10.1.0.2".parse().expect("ip"),
        node: "n1".into(),
        pod_name: "echo-1".into(),
        pod_uid: "0d6a1f0e-0000-4000-8000-000000000001".into(),
        ready: true,
        zone: Some("zone-a".into()),
    };
    api.apply(fixtures::endpoint_slice(
        "a",
        "echo",
        &[("http", 8080)],
        &[endpoint],
    ))
    .expect("slice");
    api.apply(fixtures::node(
        "n1",
        &[("topology.kubernetes.io/zone", "zone-a")],
    ))
    .expect("node");
    api.apply(fixtures::namespace("a", &[])).expect("ns");
    let lp = ListParams::default();
    let svc = &Api::<Service>::all(c.clone())
        .list(&lp)
        .await
        .expect("services")
        .items[0];
    let spec = svc.spec.as_ref().expect("spec");
    assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.0.10"));
    assert_eq!(spec.ports.as_ref().expect("ports")[0].port, 80);
    let slice = &Api::<EndpointSlice>::all(c.clone())
        .list(&lp)
        .await
        .expect("slices")
        .items[0];
    assert_eq!(slice.address_type, "IPv4");
    assert_eq!(slice.endpoints[0].node_name.as_deref(), Some("n1"));
    assert_eq!(
        slice.endpoints[0].conditions.as_ref().and_then(|c| c.ready),
        Some(true)
    );
    let labels = slice.metadata.labels.as_ref().expect("labels");
    assert_eq!(
        labels.get("kubernetes.io/service-name").map(String::as_str),
        Some("echo")
    );
    let node = &Api::<Node>::all(c.clone())
        .list(&lp)
        .await
        .expect("nodes")
        .items[0];
    assert_eq!(
        node.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("kubernetes.io/hostname"))
            .map(String::as_str),
        Some("n1")
    );
    let ns = &Api::<Namespace>::all(c.clone())
        .list(&lp)
        .await
        .expect("namespaces")
        .items[0];
    assert_eq!(
        ns.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Active")
    );
}

#[tokio::test]
async fn watcher_sees_changes_and_selectors_move_objects_in_and_out() {
    let api = FakeApiServer::start().expect("server");
    let c = client(&api).await;
    api.apply(pod("a", "web-1", "n1", &[("app", "web")]))
        .expect("pod");
    api.apply(pod("a", "db-1", "n1", &[("app", "db")]))
        .expect("pod");
    api.apply(pod("a", "web-2", "n2", &[("app", "web")]))
        .expect("pod");
    let web = reflect(&c, watcher::Config::default().labels("app=web"));
    let node1 = reflect(&c, watcher::Config::default().fields("spec.nodeName=n1"));
    eventually("initial lists", || {
        names(&web) == set(&["web-1", "web-2"]) && names(&node1) == set(&["web-1", "db-1"])
    })
    .await;

    // ADDED, MODIFIED (a label change moves db-1 into the web selection), DELETED.
    api.apply(pod("a", "web-3", "n1", &[("app", "web")]))
        .expect("add");
    api.apply(pod("a", "db-1", "n1", &[("app", "web")]))
        .expect("relabel");
    api.delete("v1", "Pod", "a", "web-2").expect("delete");
    eventually("live changes", || {
        names(&web) == set(&["web-1", "web-3", "db-1"])
    })
    .await;
    // Leaving the selection is a DELETED for that watch.
    api.apply(pod("a", "web-1", "n1", &[("app", "other")]))
        .expect("relabel out");
    eventually("web-1 leaves", || names(&web) == set(&["web-3", "db-1"])).await;
    assert_eq!(names(&node1), set(&["web-1", "web-3", "db-1"]));
    let modified = node1
        .get(&reflector::ObjectRef::new("web-1").within("a"))
        .expect("web-1");
    assert_eq!(
        modified
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("app"))
            .map(String::as_str),
        Some("other")
    );
    let watches = pod_requests(&api)
        .into_iter()
        .filter(ApiRequest::is_watch)
        .count();
    assert_eq!(
        watches,
        2,
        "one watch each, never restarted: {:?}",
        api.requests()
    );

    // Selectors a real server refuses are refused.
    let bad = Api::<Service>::all(c.clone())
        .list(&ListParams::default().fields("spec.nodeName=n1"))
        .await;
    assert!(bad.is_err(), "spec.nodeName is not a Service field");
}

#[tokio::test]
async fn expired_watch_relists_and_ends_up_right() {
    // No bookmarks: the client's resourceVersion must stay behind the compaction point.
    let api = FakeApiServer::start_with(ServerOptions {
        bookmark_interval: Duration::from_secs(3600),
        ..ServerOptions::default()
    })
    .expect("server");
    let c = client(&api).await;
    api.apply(pod("a", "p1", "n1", &[])).expect("pod");
    api.apply(pod("a", "p2", "n1", &[])).expect("pod");
    let store = reflect(&c, watcher::Config::default());
    eventually("initial list", || names(&store) == set(&["p1", "p2"])).await;
    eventually("watch open", || api.open_watches() == 1).await;
    api.clear_requests();
    api.expire_watches();
    api.delete("v1", "Pod", "a", "p1").expect("delete");
    api.apply(pod("a", "p3", "n1", &[])).expect("add");
    eventually("relisted state", || names(&store) == set(&["p2", "p3"])).await;
    let requests = pod_requests(&api);
    assert!(
        requests.first().is_some_and(ApiRequest::is_list),
        "relist after 410: {requests:?}"
    );

    // A resume from a compacted resourceVersion gets 410 too, and relists.
    eventually("watch open", || api.open_watches() == 1).await;
    let seen = api.resource_version();
    api.apply(fixtures::namespace("other", &[]))
        .expect("unrelated change");
    api.compact();
    api.clear_requests();
    api.disconnect_watches();
    api.apply(pod("a", "p4", "n1", &[])).expect("add");
    eventually("state after compaction", || {
        names(&store) == set(&["p2", "p3", "p4"])
    })
    .await;
    let requests = pod_requests(&api);
    assert!(
        requests[0].is_watch() && requests[0].param("resourceVersion") == Some(&*seen.to_string()),
        "resume first: {requests:?}"
    );
    assert!(requests[1].is_list(), "then a relist: {requests:?}");
}

#[tokio::test]
async fn disconnected_watch_resumes_without_relisting() {
    let api = FakeApiServer::start().expect("server");
    let c = client(&api).await;
    api.apply(pod("a", "p1", "n1", &[])).expect("pod");
    let store = reflect(&c, watcher::Config::default());
    eventually("initial list", || names(&store) == set(&["p1"])).await;
    eventually("watch open", || api.open_watches() == 1).await;
    api.apply(pod("a", "p2", "n1", &[])).expect("pod");
    eventually("p2", || names(&store) == set(&["p1", "p2"])).await;
    let last = api.resource_version();
    api.clear_requests();
    api.disconnect_watches();
    api.apply(pod("a", "p3", "n1", &[]))
        .expect("pod while disconnected");
    eventually("p3 after the resume", || {
        names(&store) == set(&["p1", "p2", "p3"])
    })
    .await;
    let requests = pod_requests(&api);
    assert!(
        !requests.iter().any(ApiRequest::is_list),
        "no relist: {requests:?}"
    );
    assert_eq!(
        requests[0].param("resourceVersion"),
        Some(&*last.to_string()),
        "{requests:?}"
    );
}

#[tokio::test]
async fn bookmarks_timeouts_and_streaming_lists() {
    let api = FakeApiServer::start_with(ServerOptions {
        bookmark_interval: Duration::from_millis(100),
        ..ServerOptions::default()
    })
    .expect("server");
    let c = client(&api).await;
    api.apply(pod("a", "p1", "n1", &[])).expect("pod");
    let rv = api.resource_version().to_string();
    let pods = Api::<Pod>::all(c.clone());
    let started = tokio::time::Instant::now();
    let events: Vec<_> = pods
        .watch(&WatchParams::default().timeout(1), &rv)
        .await
        .expect("watch")
        .collect()
        .await;
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "ends at timeoutSeconds"
    );
    assert!(!events.is_empty());
    for e in events {
        match e.expect("event") {
            WatchEvent::Bookmark(b) => assert_eq!(b.metadata.resource_version, rv),
            other => panic!("only bookmarks expected, got {other:?}"),
        }
    }

    api.clear_requests();
    let store = reflect(&c, watcher::Config::default().streaming_lists());
    eventually("streamed initial state", || names(&store) == set(&["p1"])).await;
    let requests = pod_requests(&api);
    assert!(!requests.iter().any(ApiRequest::is_list), "{requests:?}");
    assert_eq!(requests[0].param("sendInitialEvents"), Some("true"));
}

#[tokio::test]
async fn malformed_object_is_served_next_to_good_ones() {
    let api = FakeApiServer::start().expect("server");
    let c = client(&api).await;
    api.apply(pod("a", "good", "n1", &[])).expect("pod");
    let mut bad = pod("a", "bad", "n1", &[]);
    bad["spec"]["containers"] = json!("not a list");
    api.insert_raw("v1", "Pod", "a", "bad", bad).expect("raw");
    assert!(
        Api::<Pod>::all(c.clone())
            .list(&ListParams::default())
            .await
            .is_err(),
        "a typed list cannot decode it"
    );
    let resource =
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("", "v1", "Pod"), "pods");
    let dynamic = Api::<DynamicObject>::all_with(c.clone(), &resource);
    let list = dynamic
        .list(&ListParams::default())
        .await
        .expect("dynamic list");
    let bad = list
        .items
        .iter()
        .find(|o| o.metadata.name.as_deref() == Some("bad"))
        .expect("bad is served");
    assert_eq!(bad.data["spec"]["containers"], json!("not a list"));
    assert_eq!(list.items.len(), 2);

    // Custom resources too, with kind/apiVersion on each item as the real server keeps them.
    api.apply(json!({
        "apiVersion": "mesh.example.dev/v1alpha1", "kind": "RateLimit",
        "metadata": {"name": "limits", "namespace": "a"},
        "spec": {"selector": {"app": "echo"}, "connections": {"perSecond": 100}},
    }))
    .expect("crd");
    let raw: serde_json::Value = c
        .request(
            http::Request::get("/apis/mesh.example.dev/v1alpha1/namespaces/a/ratelimits")
                .body(Vec::new())
                .expect("request"),
        )
        .await
        .expect("crd list");
    assert_eq!(raw["kind"], "RateLimitList");
    assert_eq!(raw["items"][0]["kind"], "RateLimit");
}

#[test]
fn server_listens_inside_a_node_netns() {
    assert_root();
    let mut topo = Topology::new("kubeapi_netns").expect("topology");
    let node = topo.add_node("node1").expect("node");
    let api = FakeApiServer::start_in(&node.netns_path()).expect("server in node");
    api.apply(fixtures::topology_node(&node, &[]))
        .expect("node object");
    let body = node
        .http_get(
            &api.addr().to_string(),
            "/api/v1/nodes?fieldSelector=metadata.name%3Dnode1",
        )
        .expect("GET from the node");
    let list: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(list["items"][0]["metadata"]["name"], "node1");
    assert_eq!(
        list["items"][0]["status"]["addresses"][0]["address"],
        "192.168.100.1"
    );
    assert!(
        std::net::TcpStream::connect(api.addr()).is_err(),
        "not on the host's loopback"
    );
}

/// The raw bytes of a watch of all pods until the server ends or breaks it, after `act`.
fn raw_watch(api: &FakeApiServer, act: impl FnOnce()) -> String {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(api.addr()).expect("connect");
    stream
        .write_all(b"GET /api/v1/pods?watch=true&resourceVersion=0 HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n")
        .expect("request");
    assert!(mesh_tests::wait_until(WAIT, || api.open_watches() == 1));
    act();
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut bytes = Vec::new();
    // A broken connection may end in a reset: what arrived before it is what counts.
    let _ = stream.read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}

#[test]
fn disconnect_breaks_the_stream_and_expiry_ends_it() {
    let api = FakeApiServer::start().expect("server");
    api.apply(pod("a", "p1", "n1", &[])).expect("pod");
    let broken = raw_watch(&api, || api.disconnect_watches());
    assert!(broken.starts_with("HTTP/1.1 200 OK\r\n"), "{broken}");
    assert!(broken.contains("transfer-encoding: chunked"), "{broken}");
    assert!(
        broken.contains(r#"{"type":"ADDED","object":{"apiVersion":"v1","#),
        "{broken}"
    );
    assert!(!broken.ends_with("0\r\n\r\n"), "no final chunk: {broken}");

    let expired = raw_watch(&api, || api.expire_watches());
    assert!(
        expired.contains(r#""type":"ERROR""#) && expired.contains(r#""code":410"#),
        "{expired}"
    );
    assert!(
        expired.ends_with("\n\r\n0\r\n\r\n"),
        "a clean end after the ERROR: {expired}"
    );
    assert_eq!(api.open_watches(), 0);
}
