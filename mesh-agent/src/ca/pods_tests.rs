//! The CA's pod watch against a mock API server: the first list, watch events, malformed
//! pods, moves, finished pods.

use std::sync::Arc;

use http::{Method, StatusCode};
use serde_json::json;

use super::{
    kube_mock::{Reply, WatchFeed, client, pod, pod_list},
    placement::Placement,
    pods::PodWatch,
};
use crate::{test_support::eventually, tls::SpiffeId};

const TD: &str = "cluster.local";

fn id(namespace: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(TD, namespace, sa).expect("id")
}

/// A pod watch whose first list is `list` (at resource version 100), answered when the test
/// calls the returned function (so the test sees the CA before it), then a watch carrying the
/// events the test feeds.
fn watched(list: Vec<serde_json::Value>) -> (Arc<PodWatch>, impl FnOnce(), WatchFeed) {
    let (feed, watch_body) = WatchFeed::new();
    let (list_feed, list_body) = WatchFeed::new();
    let list = pod_list("100", list);
    let mut watch_body = Some(watch_body);
    let mut list_body = Some(list_body);
    let relist = list.clone();
    let (client, _) = client(move |seen| {
        assert_eq!(seen.method, Method::GET);
        assert!(seen.uri.starts_with("/api/v1/pods?"), "{}", seen.uri);
        if seen.is_watch() {
            assert!(seen.uri.contains("resourceVersion=100"), "{}", seen.uri);
            // A second watch (after the first ends) stays open with nothing in it.
            return watch_body.take().unwrap_or_else(|| {
                let (feed, body) = WatchFeed::new();
                std::mem::forget(feed);
                body
            });
        }
        list_body
            .take()
            .unwrap_or_else(|| Reply::Json(StatusCode::OK, relist.clone()))
    });
    let pods = Arc::new(PodWatch::new(TD));
    // The task lives as long as the test's runtime.
    drop(pods.spawn(client));
    let release = move || {
        list_feed.send_raw(&list.to_string());
        drop(list_feed);
    };
    (pods, release, feed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_follows_the_list_and_the_watch() {
    let malformed = json!({
        "metadata": {"name": "broken", "namespace": "shop", "uid": "u-x"},
        "spec": {"nodeName": 5, "serviceAccountName": ["db"]},
    });
    let (pods, release, feed) = watched(vec![
        pod("shop", "api-1", "u-1", Some("n1"), Some("api"), "Running"),
        malformed,
        pod("shop", "web-1", "u-2", Some("n2"), None, "Running"),
        pod(
            "shop",
            "job-1",
            "u-3",
            Some("n1"),
            Some("batch"),
            "Succeeded",
        ),
        pod("shop", "pending", "u-4", None, Some("queue"), "Pending"),
    ]);
    // The list is not answered yet.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;

    // Nothing is known before the first list: not "refused", "not yet".
    assert!(pods.placed("n1", &id("shop", "api")).is_err());
    assert!(pods.node_of("shop", "api-1", "u-1").is_err());
    release();
    eventually("the first list", || {
        pods.placed("n1", &id("shop", "api")).is_ok()
    })
    .await;

    let placed = |node: &str, ns: &str, sa: &str| pods.placed(node, &id(ns, sa)).expect("synced");
    assert!(placed("n1", "shop", "api"));
    assert!(!placed("n2", "shop", "api"), "api runs on n1 only");
    assert!(
        placed("n2", "shop", "default"),
        "no serviceAccountName: default"
    );
    assert!(
        !placed("n1", "shop", "batch"),
        "a Succeeded pod holds no identity"
    );
    assert!(
        !placed("n1", "shop", "queue"),
        "an unscheduled pod is on no node"
    );
    assert!(!placed("n1", "shop", "db"), "the malformed pod was skipped");
    assert!(!placed("n1", "other", "api"), "another namespace");
    let other_td = SpiffeId::new("other.td", "shop", "api").expect("id");
    assert!(!pods.placed("n1", &other_td).expect("synced"));
    assert_eq!(
        pods.node_of("shop", "api-1", "u-1").expect("synced"),
        Some("n1".into())
    );
    assert_eq!(
        pods.node_of("shop", "api-1", "u-other").expect("synced"),
        None,
        "a pod of the same name with another UID is another pod"
    );

    // A new pod, then the pod moves (a pod is never rescheduled, but a replacement under
    // the same name is the same thing to the CA).
    feed.send(
        "ADDED",
        pod("shop", "db-1", "u-5", Some("n3"), Some("db"), "Pending"),
    );
    eventually("db placed on n3", || placed("n3", "shop", "db")).await;
    feed.send(
        "MODIFIED",
        pod("shop", "api-1", "u-6", Some("n2"), Some("api"), "Running"),
    );
    eventually("api moved to n2", || placed("n2", "shop", "api")).await;
    assert!(!placed("n1", "shop", "api"), "no longer on n1");

    // A malformed event is skipped and the watch goes on.
    feed.send(
        "MODIFIED",
        json!({
            "metadata": {"name": "db-1", "namespace": "shop", "resourceVersion": "7"},
            "spec": {"nodeName": []},
        }),
    );
    feed.send(
        "ADDED",
        pod(
            "shop",
            "cache-1",
            "u-7",
            Some("n1"),
            Some("cache"),
            "Running",
        ),
    );
    eventually("cache placed after a malformed event", || {
        placed("n1", "shop", "cache")
    })
    .await;
    assert!(
        placed("n3", "shop", "db"),
        "the malformed event changed nothing"
    );

    // The pod finishes: no longer placed; a deleted pod neither.
    feed.send(
        "MODIFIED",
        pod("shop", "db-1", "u-5", Some("n3"), Some("db"), "Succeeded"),
    );
    eventually("db finished", || !placed("n3", "shop", "db")).await;
    feed.send(
        "DELETED",
        pod(
            "shop",
            "cache-1",
            "u-7",
            Some("n1"),
            Some("cache"),
            "Running",
        ),
    );
    eventually("cache deleted", || !placed("n1", "shop", "cache")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pods_of_one_service_account_on_a_node_count_separately() {
    let (pods, release, feed) = watched(vec![
        pod("shop", "api-1", "u-1", Some("n1"), Some("api"), "Running"),
        pod("shop", "api-2", "u-2", Some("n1"), Some("api"), "Running"),
    ]);
    release();
    let placed = || pods.placed("n1", &id("shop", "api"));
    eventually("the first list", || placed().is_ok()).await;
    feed.send(
        "DELETED",
        pod("shop", "api-1", "u-1", Some("n1"), Some("api"), "Running"),
    );
    feed.send(
        "ADDED",
        pod("shop", "marker", "u-9", Some("n9"), Some("m"), "Running"),
    );
    eventually("the events are in", || {
        pods.placed("n9", &id("shop", "m")).unwrap_or(false)
    })
    .await;
    assert!(placed().expect("synced"), "api-2 still runs on n1");
    feed.send(
        "DELETED",
        pod("shop", "api-2", "u-2", Some("n1"), Some("api"), "Running"),
    );
    eventually("the last api pod gone", || !placed().unwrap_or(true)).await;
}
