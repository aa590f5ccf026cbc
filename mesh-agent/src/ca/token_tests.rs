//! Token authentication against a mock API server answering TokenReviews as Kubernetes does.

use std::sync::{Arc, atomic::Ordering};

use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use kube::runtime::watcher::Event;
use serde_json::{Value, json};

use super::{
    auth::{AuthError, Caller, NodeAuthenticator},
    kube_mock::{Reply, client, pod},
    pods::PodWatch,
    token::{TokenOptions, TokenReviewer},
};

const AGENT: &str = "system:serviceaccount:mesh-system:mesh-agent";

/// A TokenReview answer for `username` with `extra`, `authenticated` as given.
fn review(authenticated: bool, username: &str, extra: Value) -> Value {
    let mut status = json!({"authenticated": authenticated});
    if authenticated {
        status["audiences"] = json!(["mesh-ca"]);
        status["user"] = json!({
            "username": username,
            "uid": "2b3c",
            "groups": ["system:serviceaccounts", "system:serviceaccounts:mesh-system",
                       "system:authenticated"],
            "extra": extra,
        });
    } else {
        status["error"] = json!("[invalid bearer token, service account token has expired]");
    }
    json!({
        "kind": "TokenReview",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"creationTimestamp": null},
        "spec": {"token": "<redacted>", "audiences": ["mesh-ca"]},
        "status": status,
    })
}

/// Extras of a token bound to the agent pod `mesh-agent-x7k2p`, with the node when given.
fn bound(node: Option<&str>) -> Value {
    let mut extra = json!({
        "authentication.kubernetes.io/pod-name": ["mesh-agent-x7k2p"],
        "authentication.kubernetes.io/pod-uid": ["0e5b-agent"],
        "authentication.kubernetes.io/credential-id": ["JTI=7c1d"],
    });
    if let Some(node) = node {
        extra["authentication.kubernetes.io/node-name"] = json!([node]);
        extra["authentication.kubernetes.io/node-uid"] = json!(["9f2a"]);
    }
    extra
}

/// A reviewer whose API server answers every review with `answer` (checking the request is a
/// TokenReview for the CA's audience), and the requests it got.
fn reviewer(
    answer: Value,
    status: StatusCode,
    pods: Arc<PodWatch>,
) -> (TokenReviewer, Arc<std::sync::atomic::AtomicUsize>) {
    let (client, count) = client(move |seen| {
        assert_eq!(seen.method, Method::POST);
        assert!(
            seen.uri
                .starts_with("/apis/authentication.k8s.io/v1/tokenreviews"),
            "{}",
            seen.uri
        );
        assert_eq!(seen.body["kind"], "TokenReview");
        assert_eq!(seen.body["spec"]["audiences"], json!(["mesh-ca"]));
        assert!(
            seen.body["spec"]["token"]
                .as_str()
                .is_some_and(|t| t.starts_with("tok-"))
        );
        Reply::Json(status, answer.clone())
    });
    (
        TokenReviewer::new(client, pods, TokenOptions::default()),
        count,
    )
}

fn headers(token: Option<&str>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Some(token) = token {
        let value = HeaderValue::from_str(&format!("Bearer {token}")).expect("header");
        headers.insert(header::AUTHORIZATION, value);
    }
    headers
}

async fn authenticate(reviewer: &TokenReviewer, token: Option<&str>) -> Result<String, AuthError> {
    let headers = headers(token);
    reviewer
        .authenticate(Caller {
            certificate: None,
            headers: &headers,
        })
        .await
}

fn unsynced() -> Arc<PodWatch> {
    Arc::new(PodWatch::new("cluster.local"))
}

/// A pod watch that knows the agent pod `mesh-agent-x7k2p` on `node-b`.
fn synced() -> Arc<PodWatch> {
    let pods = unsynced();
    pods.apply(Event::Init);
    let agent = pod(
        "mesh-system",
        "mesh-agent-x7k2p",
        "0e5b-agent",
        Some("node-b"),
        Some("mesh-agent"),
        "Running",
    );
    pods.apply(Event::InitApply(
        serde_json::from_value(agent).expect("object"),
    ));
    pods.apply(Event::InitDone);
    pods
}

#[tokio::test]
async fn a_token_naming_its_node_is_the_node_and_is_reviewed_once() {
    let answer = review(true, AGENT, bound(Some("node-a")));
    let (reviewer, count) = reviewer(answer, StatusCode::CREATED, unsynced());
    assert_eq!(
        authenticate(&reviewer, Some("tok-1")).await.expect("node"),
        "node-a"
    );
    // The node's next requests, at once or later, reuse the review.
    let burst = futures::future::join_all((0..8).map(|_| authenticate(&reviewer, Some("tok-1"))));
    for result in burst.await {
        assert_eq!(result.expect("node"), "node-a");
    }
    assert_eq!(count.load(Ordering::SeqCst), 1, "one review for the burst");
    // Another token (the kubelet rotated it) is reviewed on its own.
    assert_eq!(
        authenticate(&reviewer, Some("tok-2")).await.expect("node"),
        "node-a"
    );
    assert_eq!(count.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_burst_with_a_new_token_waits_for_one_review() {
    let answer = review(true, AGENT, bound(Some("node-a")));
    let (reviewer, count) = reviewer(answer, StatusCode::CREATED, unsynced());
    let burst = futures::future::join_all((0..8).map(|_| authenticate(&reviewer, Some("tok-1"))));
    for result in burst.await {
        assert_eq!(result.expect("node"), "node-a");
    }
    assert_eq!(count.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn without_the_node_extra_the_node_is_the_pods_from_the_watch() {
    let answer = review(true, AGENT, bound(None));
    let (reviewer, _) = reviewer(answer.clone(), StatusCode::CREATED, synced());
    assert_eq!(
        authenticate(&reviewer, Some("tok-1")).await.expect("node"),
        "node-b"
    );

    // The pod watch has no list yet: try again later, not refused.
    let (reviewer, count) = reviewer_with(answer.clone(), unsynced());
    let error = authenticate(&reviewer, Some("tok-1"))
        .await
        .expect_err("not yet");
    assert!(matches!(error, AuthError::Unavailable(_)), "{error}");
    // Not cached: the next request reviews again.
    let _ = authenticate(&reviewer, Some("tok-1")).await;
    assert_eq!(count.load(Ordering::SeqCst), 2);

    // A pod of that name but another UID (the agent pod was replaced): refused.
    let mut other = answer;
    other["status"]["user"]["extra"]["authentication.kubernetes.io/pod-uid"] = json!(["other"]);
    let (reviewer, _) = reviewer_with(other, synced());
    let error = authenticate(&reviewer, Some("tok-1"))
        .await
        .expect_err("refused");
    assert!(matches!(error, AuthError::Refused(_)), "{error}");

    // Bound to no pod at all: no node, refused.
    let (reviewer, _) = reviewer_with(review(true, AGENT, json!({})), synced());
    let error = authenticate(&reviewer, Some("tok-1"))
        .await
        .expect_err("refused");
    assert!(error.to_string().contains("not bound to a pod"), "{error}");
}

fn reviewer_with(
    answer: Value,
    pods: Arc<PodWatch>,
) -> (TokenReviewer, Arc<std::sync::atomic::AtomicUsize>) {
    reviewer(answer, StatusCode::CREATED, pods)
}

#[tokio::test]
async fn invalid_tokens_other_accounts_and_audiences_are_refused() {
    let (reviewer, count) = reviewer_with(review(false, "", json!({})), synced());
    let error = authenticate(&reviewer, Some("tok-1"))
        .await
        .expect_err("refused");
    assert!(matches!(error, AuthError::Refused(_)), "{error}");
    assert!(error.to_string().contains("expired"), "{error}");
    // A refusal is not cached as a success: each try is reviewed.
    let _ = authenticate(&reviewer, Some("tok-1")).await;
    assert_eq!(count.load(Ordering::SeqCst), 2);

    // A valid token of another service account (a workload's, say) names no node.
    let workload = "system:serviceaccount:shop:api";
    let (reviewer, _) = reviewer_with(review(true, workload, bound(Some("node-a"))), synced());
    let error = authenticate(&reviewer, Some("tok-1"))
        .await
        .expect_err("refused");
    assert!(
        error.to_string().contains("system:serviceaccount:shop:api"),
        "{error}"
    );

    // Authenticated, but not for the CA's audience.
    let mut other_audience = review(true, AGENT, bound(Some("node-a")));
    other_audience["status"]["audiences"] = json!(["https://kubernetes.default.svc"]);
    let (reviewer, _) = reviewer_with(other_audience, synced());
    let error = authenticate(&reviewer, Some("tok-1"))
        .await
        .expect_err("refused");
    assert!(error.to_string().contains("audience"), "{error}");

    // No token at all: refused without asking the API server.
    let (reviewer, count) = reviewer_with(review(true, AGENT, bound(Some("node-a"))), synced());
    for token in [None, Some("")] {
        let error = authenticate(&reviewer, token).await.expect_err("no token");
        assert!(matches!(error, AuthError::NoToken), "{error}");
    }
    assert_eq!(count.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn an_api_server_error_is_a_retry_and_not_cached() {
    let failure = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "tokenreviews.authentication.k8s.io is forbidden: User \
                    \"system:serviceaccount:mesh-system:mesh-ca\" cannot create resource",
        "reason": "Forbidden", "code": 403,
    });
    let (reviewer, count) = reviewer(failure, StatusCode::FORBIDDEN, synced());
    let error = authenticate(&reviewer, Some("tok-1"))
        .await
        .expect_err("unavailable");
    assert!(matches!(error, AuthError::Unavailable(_)), "{error}");
    assert!(error.to_string().contains("forbidden"), "{error}");
    let _ = authenticate(&reviewer, Some("tok-1")).await;
    assert_eq!(count.load(Ordering::SeqCst), 2);
}
