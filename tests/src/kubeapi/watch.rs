//! What one list or watch asks for (a [`Filter`]), the open watches, and the lines a watch
//! stream carries, shaped as the real server writes them.
//!
//! A change is shown to a watch the way the server's watch cache does it: an object that
//! starts matching the selectors arrives as ADDED, one that stops matching as DELETED, so a
//! client's view always equals "the objects that match now".

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::mpsc::UnboundedSender;

use super::resources::ResourceType;
use super::selector::{FieldSelector, LabelSelector};

/// The objects a request is about.
#[derive(Debug, Clone)]
pub(crate) struct Filter {
    pub(crate) resource: &'static ResourceType,
    /// None: every namespace.
    pub(crate) namespace: Option<String>,
    pub(crate) labels: LabelSelector,
    pub(crate) fields: FieldSelector,
}

impl Filter {
    /// Whether the object stored under (`resource`, `namespace`) matches.
    pub(crate) fn matches(&self, resource: &ResourceType, namespace: &str, object: &Value) -> bool {
        std::ptr::eq(resource, self.resource)
            && self.namespace.as_deref().is_none_or(|ns| ns == namespace)
            && self.labels.matches(object)
            && self.fields.matches(object)
    }
}

/// What a watch connection is told to do next.
#[derive(Debug)]
pub(crate) enum Frame {
    /// One event line (JSON and a newline).
    Line(Bytes),
    /// End the response cleanly (after a 410 ERROR event, or the watch timeout).
    End,
    /// Break the connection without ending the chunked body, as a dying server or a
    /// proxy in between would.
    Abort,
}

/// One open watch.
#[derive(Debug)]
pub(crate) struct Watcher {
    pub(crate) filter: Filter,
    pub(crate) bookmarks: bool,
    pub(crate) tx: UnboundedSender<Frame>,
}

/// A stored change, as watches replay it.
#[derive(Debug, Clone)]
pub(crate) struct Change {
    pub(crate) rv: u64,
    pub(crate) resource: &'static ResourceType,
    pub(crate) namespace: String,
    /// The object before the change, if it existed.
    pub(crate) old: Option<Value>,
    /// The object after the change; for a deletion, its last state carrying the deletion's
    /// resourceVersion (what the real server sends in DELETED).
    pub(crate) object: Value,
    pub(crate) deleted: bool,
}

impl Watcher {
    /// Sends `frame`; false once the connection is gone.
    pub(crate) fn send(&self, frame: Frame) -> bool {
        self.tx.send(frame).is_ok()
    }

    /// The event line this watch gets for `change`, if any.
    pub(crate) fn event_for(&self, change: &Change) -> Option<Bytes> {
        let f = &self.filter;
        let ns = change.namespace.as_str();
        let now = !change.deleted && f.matches(change.resource, ns, &change.object);
        let before = change
            .old
            .as_ref()
            .is_some_and(|o| f.matches(change.resource, ns, o));
        match (before, now) {
            (false, true) => Some(event_line("ADDED", &change.object)),
            (true, true) => Some(event_line("MODIFIED", &change.object)),
            (true, false) if change.deleted => Some(event_line("DELETED", &change.object)),
            (true, false) => {
                // Left the selection: the watch cache sends the last matching state with the
                // change's resourceVersion.
                let mut gone = change.old.clone().unwrap_or(Value::Null);
                set_resource_version(&mut gone, change.rv);
                Some(event_line("DELETED", &gone))
            }
            (false, false) => None,
        }
    }
}

/// `{"type":..,"object":..}` and a newline.
pub(crate) fn event_line(kind: &str, object: &Value) -> Bytes {
    // Written by hand to keep the server's field order (type first); serde_json's maps sort.
    Bytes::from(format!("{{\"type\":\"{kind}\",\"object\":{object}}}\n"))
}

/// A BOOKMARK: only kind, apiVersion and the resourceVersion (plus the annotation that ends
/// the initial events of a streaming list).
pub(crate) fn bookmark_line(resource: &ResourceType, rv: u64, initial_end: bool) -> Bytes {
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    event_line(
        "BOOKMARK",
        &json!({"kind": resource.kind, "apiVersion": resource.api_version, "metadata": metadata}),
    )
}

/// The ERROR event with which the server ends a watch it cannot continue (410 Expired).
pub(crate) fn expired_line(message: &str) -> Bytes {
    event_line("ERROR", &Status::new(410, "Expired", message).to_json())
}

/// Sets `metadata.resourceVersion` where the object has a metadata map.
pub(crate) fn set_resource_version(object: &mut Value, rv: u64) {
    if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("resourceVersion".into(), Value::String(rv.to_string()));
    }
}

/// A failure answer (`kind: Status`), as the body of an error response or an ERROR event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Status {
    pub(crate) code: u16,
    pub(crate) reason: &'static str,
    pub(crate) message: String,
}

impl Status {
    pub(crate) fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Status {
        Status {
            code,
            reason,
            message: message.into(),
        }
    }

    pub(crate) fn to_json(&self) -> Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        })
    }
}
