//! A scripted API server behind kube's mock service (`tower_test::mock::pair`): lists answer
//! with the objects in force and a resourceVersion, watches stay open and carry the events
//! the test sends, newline-delimited, as the API server writes them.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use futures::channel::mpsc::{UnboundedReceiver, UnboundedSender, unbounded};
use http::{Request, Response};
use http_body_util::StreamBody;
use hyper::body::Frame;
use kube::client::Body;
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tower_test::mock;

type Chunk = Result<Frame<Bytes>, Infallible>;
type ResponseBody = StreamBody<UnboundedReceiver<Chunk>>;
type Reply = mock::SendResponse<Response<ResponseBody>>;

#[derive(Default)]
struct State {
    /// plural -> objects in force.
    objects: HashMap<String, Vec<Value>>,
    resource_version: u64,
    /// plural -> open watch streams.
    watches: HashMap<String, Vec<UnboundedSender<Chunk>>>,
    /// plural -> list requests served.
    lists: HashMap<String, usize>,
    /// Lists not answered until released.
    held: HashSet<String>,
    waiting: Vec<(String, String, Reply)>,
}

pub struct FakeApi {
    state: Arc<Mutex<State>>,
    task: JoinHandle<()>,
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `(apiVersion, kind)` of the objects of `plural`.
fn kind_of(plural: &str) -> (&'static str, &'static str) {
    match plural {
        "namespaces" => ("v1", "Namespace"),
        "pods" => ("v1", "Pod"),
        "services" => ("v1", "Service"),
        "nodes" => ("v1", "Node"),
        "endpointslices" => ("discovery.k8s.io/v1", "EndpointSlice"),
        "authorizationpolicies" => ("mesh.example.dev/v1alpha1", "AuthorizationPolicy"),
        "ratelimits" => ("mesh.example.dev/v1alpha1", "RateLimit"),
        "egresslimits" => ("mesh.example.dev/v1alpha1", "EgressLimit"),
        "trafficpolicies" => ("mesh.example.dev/v1alpha1", "TrafficPolicy"),
        other => panic!("the fake API serves no {other}"),
    }
}

fn same_object(a: &Value, b: &Value) -> bool {
    a["metadata"]["name"] == b["metadata"]["name"]
        && a["metadata"]["namespace"] == b["metadata"]["namespace"]
}

fn body(chunks: Vec<Bytes>) -> (ResponseBody, Option<UnboundedSender<Chunk>>) {
    let (tx, rx) = unbounded();
    for chunk in chunks {
        let _ = tx.unbounded_send(Ok(Frame::data(chunk)));
    }
    (StreamBody::new(rx), Some(tx))
}

impl State {
    fn list(&mut self, plural: &str, query: &str, reply: Reply) {
        *self.lists.entry(plural.to_owned()).or_default() += 1;
        let (api_version, kind) = kind_of(plural);
        let field_name = query
            .split('&')
            .find_map(|p| p.strip_prefix("fieldSelector="))
            .map(|s| s.replace("%3D", "="))
            .and_then(|s| s.strip_prefix("metadata.name=").map(str::to_owned));
        let items: Vec<Value> = self
            .objects
            .get(plural)
            .into_iter()
            .flatten()
            .filter(|o| {
                field_name
                    .as_ref()
                    .is_none_or(|n| o["metadata"]["name"] == json!(n))
            })
            .cloned()
            .collect();
        let list = json!({
            "apiVersion": api_version,
            "kind": format!("{kind}List"),
            "metadata": {"resourceVersion": self.resource_version.to_string()},
            "items": items,
        });
        let (body, _) = body(vec![Bytes::from(list.to_string())]);
        reply.send_response(Response::new(body));
    }

    fn watch(&mut self, plural: &str, reply: Reply) {
        let (body, tx) = body(Vec::new());
        if let Some(tx) = tx {
            self.watches.entry(plural.to_owned()).or_default().push(tx);
        }
        reply.send_response(Response::new(body));
    }

    fn send(&mut self, plural: &str, line: &Value) {
        let mut text = line.to_string();
        text.push('\n');
        let bytes = Bytes::from(text);
        if let Some(watches) = self.watches.get_mut(plural) {
            watches.retain(|tx| tx.unbounded_send(Ok(Frame::data(bytes.clone()))).is_ok());
        }
    }
}

impl FakeApi {
    /// A client of a fake API holding `objects` (plural, object).
    pub fn start(objects: Vec<(&str, Value)>) -> (kube::Client, FakeApi) {
        let (service, handle) = mock::pair::<Request<Body>, Response<ResponseBody>>();
        let mut state = State {
            resource_version: 100,
            ..State::default()
        };
        for (plural, object) in objects {
            state
                .objects
                .entry(plural.to_owned())
                .or_default()
                .push(object);
        }
        let state = Arc::new(Mutex::new(state));
        let serving = state.clone();
        let task = tokio::spawn(async move {
            let mut handle = std::pin::pin!(handle);
            while let Some((request, reply)) = handle.next_request().await {
                let plural = request
                    .uri()
                    .path()
                    .rsplit('/')
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                let query = request.uri().query().unwrap_or_default().to_owned();
                let mut state = serving.lock();
                if query.split('&').any(|p| p == "watch=true") {
                    state.watch(&plural, reply);
                } else if state.held.contains(&plural) {
                    state.waiting.push((plural, query, reply));
                } else {
                    state.list(&plural, &query, reply);
                }
            }
        });
        (
            kube::Client::new(service, "default"),
            FakeApi { state, task },
        )
    }

    /// Lists of `plural` wait until [`FakeApi::release`].
    pub fn hold(&self, plural: &str) {
        self.state.lock().held.insert(plural.to_owned());
    }

    pub fn release(&self, plural: &str) {
        let mut state = self.state.lock();
        state.held.remove(plural);
        let waiting = std::mem::take(&mut state.waiting);
        for (p, query, reply) in waiting {
            if p == plural {
                state.list(&p, &query, reply);
            } else {
                state.waiting.push((p, query, reply));
            }
        }
    }

    /// List requests of `plural` answered so far.
    pub fn lists(&self, plural: &str) -> usize {
        self.state.lock().lists.get(plural).copied().unwrap_or(0)
    }

    /// Watches of `plural` open now.
    pub fn watching(&self, plural: &str) -> usize {
        self.state.lock().watches.get(plural).map_or(0, Vec::len)
    }

    /// Changes the objects in force without telling the watchers (as while disconnected).
    pub fn set_quietly(&self, plural: &str, object: Value) {
        let mut state = self.state.lock();
        state.resource_version += 1;
        let list = state.objects.entry(plural.to_owned()).or_default();
        list.retain(|o| !same_object(o, &object));
        list.push(object);
    }

    pub fn remove_quietly(&self, plural: &str, object: &Value) {
        let mut state = self.state.lock();
        state.resource_version += 1;
        if let Some(list) = state.objects.get_mut(plural) {
            list.retain(|o| !same_object(o, object));
        }
    }

    /// An ADDED, MODIFIED or DELETED event of `object`, applied to the objects in force.
    pub fn event(&self, plural: &str, kind: &str, mut object: Value) {
        let mut state = self.state.lock();
        state.resource_version += 1;
        let rv = state.resource_version.to_string();
        object["metadata"]["resourceVersion"] = json!(rv);
        let list = state.objects.entry(plural.to_owned()).or_default();
        list.retain(|o| !same_object(o, &object));
        if kind != "DELETED" {
            list.push(object.clone());
        }
        let (api_version, k) = kind_of(plural);
        object["apiVersion"] = json!(api_version);
        object["kind"] = json!(k);
        state.send(plural, &json!({"type": kind, "object": object}));
    }

    /// A BOOKMARK: the current resourceVersion, no object change.
    pub fn bookmark(&self, plural: &str) {
        let mut state = self.state.lock();
        let (api_version, kind) = kind_of(plural);
        let rv = state.resource_version.to_string();
        let line = json!({
            "type": "BOOKMARK",
            "object": {"apiVersion": api_version, "kind": kind, "metadata": {"resourceVersion": rv}},
        });
        state.send(plural, &line);
    }

    /// The watch of `plural` ends with `410 Gone` (its resourceVersion is too old).
    pub fn expire(&self, plural: &str) {
        let mut state = self.state.lock();
        let line = json!({
            "type": "ERROR",
            "object": {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": "too old resource version: 100 (150)",
                "reason": "Expired",
                "code": 410,
            },
        });
        state.send(plural, &line);
        state.watches.remove(plural);
    }
}
