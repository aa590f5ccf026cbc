//! The server's state: objects, one global resourceVersion, the history of changes that
//! watches replay, the compaction point before which history is gone, the open watches and
//! the request log.
//!
//! Every mutation happens under one lock and is pushed to the open watches before the lock
//! is released, so a watch registered under the same lock after replaying history can
//! neither miss nor repeat a change.

use std::collections::{BTreeMap, HashMap};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::{Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use super::ApiRequest;
use super::resources::{self, ResourceType};
use super::watch::{
    Change, Filter, Frame, Status, Watcher, bookmark_line, event_line, expired_line,
    set_resource_version,
};

/// (apiVersion, plural, namespace, name): namespace is "" for cluster-scoped objects.
type Key = (&'static str, &'static str, String, String);

/// One paginated list in progress: the remaining items of the list as of `rv`.
#[derive(Debug)]
struct Snapshot {
    rv: u64,
    items: Vec<Value>,
}

#[derive(Debug, Default)]
pub(crate) struct Store {
    rv: u64,
    /// Watches from a resourceVersion older than this get 410.
    compacted: u64,
    objects: BTreeMap<Key, (&'static ResourceType, Value)>,
    history: Vec<Change>,
    watchers: Vec<Watcher>,
    snapshots: HashMap<u64, Snapshot>,
    next_snapshot: u64,
    pub(crate) requests: Vec<ApiRequest>,
}

/// The namespace and name under which an object is stored.
fn key_of(resource: &'static ResourceType, namespace: &str, name: &str) -> Key {
    (
        resource.api_version,
        resource.plural,
        namespace.to_owned(),
        name.to_owned(),
    )
}

impl Store {
    pub(crate) fn resource_version(&self) -> u64 {
        self.rv
    }

    /// Creates or replaces an object; fills in what the server sets (resourceVersion, uid,
    /// creationTimestamp, the namespace of a namespaced object).
    pub(crate) fn apply(&mut self, mut object: Value) -> Result<Value> {
        let resource = {
            let api_version = object["apiVersion"]
                .as_str()
                .context("object without apiVersion")?;
            let kind = object["kind"].as_str().context("object without kind")?;
            resources::by_kind(api_version, kind).with_context(|| {
                format!("the fake API server does not serve {api_version} {kind}")
            })?
        };
        let kind = resource.kind;
        let meta = object
            .get_mut("metadata")
            .and_then(Value::as_object_mut)
            .context("object without metadata")?;
        let name = meta
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .context("object without metadata.name")?
            .to_owned();
        let namespace = if resource.namespaced {
            let ns = meta
                .get("namespace")
                .and_then(Value::as_str)
                .unwrap_or("default")
                .to_owned();
            meta.insert("namespace".into(), json!(ns));
            ns
        } else {
            ensure!(
                meta.get("namespace").is_none(),
                "{kind} {name} is cluster-scoped and has no namespace"
            );
            String::new()
        };
        let key = key_of(resource, &namespace, &name);
        // A replacement keeps the identity the server gave the object.
        let previous = self.objects.get(&key).map(|(_, o)| &o["metadata"]);
        for field in ["uid", "creationTimestamp"] {
            if meta.get(field).is_none() {
                let value = match previous.map(|p| &p[field]) {
                    Some(v @ Value::String(_)) => v.clone(),
                    _ if field == "uid" => json!(crate::kubelet::new_uid()?),
                    _ => json!(super::fixtures::rfc3339_now()),
                };
                meta.insert(field.into(), value);
            }
        }
        Ok(self.store(resource, namespace, name, object))
    }

    /// Stores `object` as it is under the given key: for malformed objects that [`apply`]
    /// would refuse or fix. Only `metadata.resourceVersion` is set, where there is a map.
    ///
    /// [`apply`]: Store::apply
    pub(crate) fn insert_raw(
        &mut self,
        resource: &'static ResourceType,
        namespace: &str,
        name: &str,
        object: Value,
    ) -> Value {
        let namespace = if resource.namespaced { namespace } else { "" };
        self.store(resource, namespace.to_owned(), name.to_owned(), object)
    }

    fn store(
        &mut self,
        resource: &'static ResourceType,
        namespace: String,
        name: String,
        mut object: Value,
    ) -> Value {
        self.rv += 1;
        set_resource_version(&mut object, self.rv);
        let old = self
            .objects
            .insert(
                key_of(resource, &namespace, &name),
                (resource, object.clone()),
            )
            .map(|(_, o)| o);
        self.record(Change {
            rv: self.rv,
            resource,
            namespace,
            old,
            object: object.clone(),
            deleted: false,
        });
        object
    }

    pub(crate) fn delete(
        &mut self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Result<()> {
        let resource = resources::by_kind(api_version, kind)
            .with_context(|| format!("the fake API server does not serve {api_version} {kind}"))?;
        let namespace = if resource.namespaced { namespace } else { "" };
        let Some((_, old)) = self.objects.remove(&key_of(resource, namespace, name)) else {
            bail!("no {kind} {namespace}/{name} to delete");
        };
        self.rv += 1;
        let mut last = old.clone();
        set_resource_version(&mut last, self.rv);
        self.record(Change {
            rv: self.rv,
            resource,
            namespace: namespace.to_owned(),
            old: Some(old),
            object: last,
            deleted: true,
        });
        Ok(())
    }

    fn record(&mut self, change: Change) {
        self.watchers.retain(|w| match w.event_for(&change) {
            Some(line) => w.send(Frame::Line(line)),
            None => !w.tx.is_closed(),
        });
        self.history.push(change);
    }

    /// Forgets the history up to now: a watch from an older resourceVersion, or the next
    /// page of a list begun before, gets 410 Expired.
    pub(crate) fn compact(&mut self) {
        self.compacted = self.rv;
        self.history.clear();
        self.snapshots.clear();
    }

    /// Ends every open watch with the 410 ERROR event.
    pub(crate) fn expire_watches(&mut self) {
        let line = expired_line("The resourceVersion for the provided watch is too old.");
        for w in self.watchers.drain(..) {
            w.send(Frame::Line(line.clone()));
            w.send(Frame::End);
        }
    }

    /// Breaks every open watch connection.
    pub(crate) fn disconnect_watches(&mut self) {
        for w in self.watchers.drain(..) {
            w.send(Frame::Abort);
        }
    }

    /// A BOOKMARK at the current resourceVersion to every watch that allows them.
    pub(crate) fn bookmark(&mut self) {
        let rv = self.rv;
        self.watchers.retain(|w| {
            !w.bookmarks || w.send(Frame::Line(bookmark_line(w.filter.resource, rv, false)))
        });
    }

    pub(crate) fn open_watches(&self) -> usize {
        self.watchers.iter().filter(|w| !w.tx.is_closed()).count()
    }

    /// One object, as GET returns it.
    pub(crate) fn get(
        &self,
        resource: &'static ResourceType,
        namespace: &str,
        name: &str,
    ) -> Result<Value, Status> {
        self.objects
            .get(&key_of(resource, namespace, name))
            .map(|(_, o)| o.clone())
            .ok_or_else(|| {
                Status::new(
                    404,
                    "NotFound",
                    format!("{} \"{name}\" not found", resource.plural),
                )
            })
    }

    fn matching(&self, filter: &Filter) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|((.., ns, _), (r, o))| filter.matches(r, ns, o))
            .map(|(_, (_, o))| o.clone())
            .collect()
    }

    /// A list response: every matching object, `limit` at a time with a continue token.
    pub(crate) fn list(
        &mut self,
        filter: &Filter,
        limit: Option<usize>,
        continue_token: Option<&str>,
    ) -> Result<Value, Status> {
        let (rv, mut items) = match continue_token {
            Some(token) => {
                let snapshot = token
                    .parse::<u64>()
                    .ok()
                    .and_then(|id| self.snapshots.remove(&id))
                    .ok_or_else(|| {
                        Status::new(
                            410,
                            "Expired",
                            "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                        )
                    })?;
                (snapshot.rv, snapshot.items)
            }
            None => (self.rv, self.matching(filter)),
        };
        let mut metadata = json!({"resourceVersion": rv.to_string()});
        if let Some(limit) = limit.filter(|l| *l > 0 && items.len() > *l) {
            let rest = items.split_off(limit);
            self.next_snapshot += 1;
            metadata["continue"] = json!(self.next_snapshot.to_string());
            metadata["remainingItemCount"] = json!(rest.len());
            self.snapshots
                .insert(self.next_snapshot, Snapshot { rv, items: rest });
        }
        if !filter.resource.custom {
            // Built-in lists carry kind and apiVersion only on the list itself.
            for item in &mut items {
                if let Some(o) = item.as_object_mut() {
                    o.remove("kind");
                    o.remove("apiVersion");
                }
            }
        }
        Ok(json!({
            "kind": filter.resource.list_kind(),
            "apiVersion": filter.resource.api_version,
            "metadata": metadata,
            "items": items,
        }))
    }

    /// Opens a watch: replays what the client has not seen, then registers it for live
    /// changes. `from` None, "" or "0": every current object as ADDED first.
    pub(crate) fn watch(
        &mut self,
        filter: Filter,
        from: Option<&str>,
        initial_events: bool,
        bookmarks: bool,
    ) -> Result<UnboundedReceiver<Frame>, Status> {
        let (tx, rx) = unbounded_channel();
        let start = match from.filter(|v| !v.is_empty() && *v != "0") {
            None => None,
            Some(v) => Some(v.parse::<u64>().map_err(|_| {
                Status::new(
                    400,
                    "BadRequest",
                    format!("invalid resource version: {v:?}"),
                )
            })?),
        };
        match start {
            Some(n) if n < self.compacted => {
                let line = expired_line(&format!(
                    "too old resource version: {n} ({})",
                    self.compacted
                ));
                let _ = tx.send(Frame::Line(line));
                let _ = tx.send(Frame::End);
                return Ok(rx);
            }
            Some(n) if !initial_events => {
                let watcher = Watcher {
                    filter: filter.clone(),
                    bookmarks,
                    tx: tx.clone(),
                };
                for change in self.history.iter().filter(|c| c.rv > n) {
                    if let Some(line) = watcher.event_for(change) {
                        let _ = tx.send(Frame::Line(line));
                    }
                }
            }
            _ => {
                for object in self.matching(&filter) {
                    let _ = tx.send(Frame::Line(event_line("ADDED", &object)));
                }
                if initial_events && bookmarks {
                    let _ = tx.send(Frame::Line(bookmark_line(filter.resource, self.rv, true)));
                }
            }
        }
        self.watchers.push(Watcher {
            filter,
            bookmarks,
            tx,
        });
        Ok(rx)
    }
}
