//! Tests' stand-in for the API server (kube's mock-service pattern): a `kube::Client` over a
//! `tower_test` mock, whose requests a task hands to the test's `answer` function. Answers
//! are real-shaped JSON; a watch is a stream the test feeds event by event.

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use bytes::Bytes;
use futures::channel::mpsc::{UnboundedReceiver, UnboundedSender, unbounded};
use http::{Request, Response, StatusCode};
use http_body_util::StreamBody;
use hyper::body::Frame;
use serde_json::{Value, json};

pub(super) type Chunk = Result<Frame<Bytes>, Infallible>;
pub(super) type MockBody = StreamBody<UnboundedReceiver<Chunk>>;

/// One request as the test sees it.
#[derive(Debug)]
pub(super) struct Seen {
    pub method: http::Method,
    /// Path and query.
    pub uri: String,
    pub body: Value,
}

impl Seen {
    pub(super) fn is_watch(&self) -> bool {
        self.uri.contains("watch=true")
    }
}

/// What the fake API server answers.
pub(super) enum Reply {
    Json(StatusCode, Value),
    /// A streamed body (a watch): the test writes events into it with [`WatchFeed`].
    Stream(UnboundedReceiver<Chunk>),
}

/// The writing end of a watch.
#[derive(Clone)]
pub(super) struct WatchFeed(UnboundedSender<Chunk>);

impl WatchFeed {
    /// A watch body and its feed.
    pub(super) fn new() -> (Self, Reply) {
        let (tx, rx) = unbounded();
        (Self(tx), Reply::Stream(rx))
    }

    /// Sends one watch event (`ADDED`, `MODIFIED`, `DELETED`, `BOOKMARK`) for `object`.
    pub(super) fn send(&self, kind: &str, object: Value) {
        self.send_raw(&json!({"type": kind, "object": object}).to_string());
    }

    /// Sends one line as it is.
    pub(super) fn send_raw(&self, line: &str) {
        let _ = self
            .0
            .unbounded_send(Ok(Frame::data(Bytes::from(format!("{line}\n")))));
    }
}

/// A client whose every request is answered by `answer`; counts the requests.
pub(super) fn client(
    mut answer: impl FnMut(&Seen) -> Reply + Send + 'static,
) -> (kube::Client, Arc<AtomicUsize>) {
    let (service, mut handle) =
        tower_test::mock::pair::<Request<kube::client::Body>, Response<MockBody>>();
    let count = Arc::new(AtomicUsize::new(0));
    let counted = count.clone();
    tokio::spawn(async move {
        while let Some((request, respond)) = handle.next_request().await {
            counted.fetch_add(1, Ordering::SeqCst);
            let (parts, body) = request.into_parts();
            let bytes = body.collect_bytes().await.unwrap_or_default();
            let seen = Seen {
                method: parts.method,
                uri: parts.uri.to_string(),
                body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            };
            let (status, body) = match answer(&seen) {
                Reply::Json(status, value) => {
                    let (tx, rx) = unbounded();
                    let _ = tx.unbounded_send(Ok(Frame::data(Bytes::from(value.to_string()))));
                    (status, rx)
                }
                Reply::Stream(rx) => (StatusCode::OK, rx),
            };
            let mut response = Response::new(StreamBody::new(body));
            *response.status_mut() = status;
            respond.send_response(response);
        }
    });
    (kube::Client::new(service, "default"), count)
}

/// A pod as the API server lists it.
pub(super) fn pod(
    namespace: &str,
    name: &str,
    uid: &str,
    node: Option<&str>,
    service_account: Option<&str>,
    phase: &str,
) -> Value {
    let mut spec = json!({"containers": [{"name": "app", "image": "app:1"}]});
    if let Some(node) = node {
        spec["nodeName"] = json!(node);
    }
    if let Some(sa) = service_account {
        spec["serviceAccountName"] = json!(sa);
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": uid, "resourceVersion": "1"},
        "spec": spec,
        "status": {"phase": phase},
    })
}

/// A pod list at `resource_version`.
pub(super) fn pod_list(resource_version: &str, items: Vec<Value>) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "PodList",
        "metadata": {"resourceVersion": resource_version},
        "items": items,
    })
}
