//! Placement in Kubernetes: the CA's own watch of every pod of the cluster, so the answer to
//! "may node N have identity I" comes from the API server, not from the node asking.
//!
//! An identity is placed on a node while a pod running as that service account
//! (`spec.serviceAccountName`, `default` when empty) in that namespace has
//! `spec.nodeName` = the node and has not finished (`Succeeded`/`Failed` pods hold no
//! identity). Only those few fields are kept, counted per (node, namespace, service account),
//! so a question costs one map lookup whatever the cluster's size.
//!
//! Pods are watched as untyped objects and each is read on its own: one malformed pod is
//! skipped with a warning and never takes the watch down. kube's watcher resumes a broken
//! watch and relists when its resource version is gone; a relist replaces the whole state at
//! once when it is complete. Until the first list is complete the CA knows nothing and
//! answers [`NotSynced`] (a `503` the agents retry), rather than refusing pods it has not seen.

use std::collections::{HashMap, hash_map::Entry};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject},
    runtime::{WatchStreamExt, watcher},
};
use parking_lot::RwLock;
use serde::Deserialize;
use tokio::task::JoinHandle;

use super::placement::{NotSynced, Placement};
use crate::tls::SpiffeId;

/// The service account of a pod that names none.
const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// What the CA keeps of one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PodFacts {
    uid: String,
    /// `spec.nodeName`: `None` until scheduled.
    node: Option<String>,
    service_account: String,
    /// `Succeeded` or `Failed`: the pod runs no more.
    finished: bool,
}

impl PodFacts {
    /// The (node, service account) this pod places, if it places one.
    fn placement(&self) -> Option<(&str, &str)> {
        match (&self.node, self.finished) {
            (Some(node), false) => Some((node, &self.service_account)),
            _ => None,
        }
    }
}

/// `namespace/name`.
type PodKey = (String, String);
/// (node, namespace, service account).
type PlacedKey = (String, String, String);

#[derive(Debug, Default)]
struct State {
    /// Whether a complete list is in.
    synced: bool,
    pods: HashMap<PodKey, PodFacts>,
    /// Running pods per (node, namespace, service account).
    placed: HashMap<PlacedKey, usize>,
    /// A relist in progress: its pods, swapped in when it is complete.
    relist: Option<HashMap<PodKey, PodFacts>>,
}

impl State {
    fn count(&mut self, key: &PodKey, facts: &PodFacts, up: bool) {
        let Some((node, service_account)) = facts.placement() else {
            return;
        };
        let placed = (node.to_owned(), key.0.clone(), service_account.to_owned());
        match self.placed.entry(placed) {
            Entry::Occupied(mut entry) if up => *entry.get_mut() += 1,
            Entry::Occupied(mut entry) => {
                *entry.get_mut() -= 1;
                if *entry.get() == 0 {
                    entry.remove();
                }
            }
            Entry::Vacant(entry) if up => {
                entry.insert(1);
            }
            Entry::Vacant(_) => {}
        }
    }

    fn upsert(&mut self, key: PodKey, facts: PodFacts) {
        if let Some(old) = self.pods.remove(&key) {
            self.count(&key, &old, false);
        }
        self.count(&key, &facts, true);
        self.pods.insert(key, facts);
    }

    fn remove(&mut self, key: &PodKey) {
        if let Some(old) = self.pods.remove(key) {
            self.count(key, &old, false);
        }
    }

    fn replace_all(&mut self, pods: HashMap<PodKey, PodFacts>) {
        self.pods.clear();
        self.placed.clear();
        for (key, facts) in pods {
            self.upsert(key, facts);
        }
        self.synced = true;
    }
}

/// The CA's view of the cluster's pods.
#[derive(Debug)]
pub struct PodWatch {
    trust_domain: String,
    state: RwLock<State>,
}

impl PodWatch {
    /// An empty view (not synced) for identities of `trust_domain`.
    pub fn new(trust_domain: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            state: RwLock::new(State::default()),
        }
    }

    /// Watches every pod of the cluster with `client` until the task is dropped. Errors are
    /// logged; kube's watcher retries with backoff and resumes or relists.
    pub fn spawn(self: &std::sync::Arc<Self>, client: Client) -> JoinHandle<()> {
        let this = self.clone();
        let api: Api<DynamicObject> = Api::all_with(client, &ApiResource::erase::<Pod>(&()));
        tokio::spawn(async move {
            let events = watcher(api, watcher::Config::default()).default_backoff();
            let mut events = std::pin::pin!(events);
            while let Some(event) = events.next().await {
                match event {
                    Ok(event) => this.apply(event),
                    Err(error) => {
                        tracing::warn!(%error, "watching pods (the watch is retried)");
                    }
                }
            }
        })
    }

    /// Applies one event of the watch.
    pub(super) fn apply(&self, event: watcher::Event<DynamicObject>) {
        let mut state = self.state.write();
        match event {
            watcher::Event::Init => state.relist = Some(HashMap::new()),
            watcher::Event::InitApply(object) => {
                if let (Some((key, facts)), Some(relist)) = (read_pod(&object), &mut state.relist) {
                    relist.insert(key, facts);
                }
            }
            watcher::Event::InitDone => {
                let pods = state.relist.take().unwrap_or_default();
                state.replace_all(pods);
                tracing::info!(pods = state.pods.len(), "the CA's list of pods is in");
            }
            watcher::Event::Apply(object) => {
                if let Some((key, facts)) = read_pod(&object) {
                    state.upsert(key, facts);
                }
            }
            watcher::Event::Delete(object) => {
                if let Some((key, _)) = read_pod(&object) {
                    state.remove(&key);
                }
            }
        }
    }

    /// The node of the pod `namespace/name` if its UID is `uid` (a pod deleted and made again
    /// under the same name is another pod); `None` if there is no such pod or it is not
    /// scheduled.
    pub fn node_of(
        &self,
        namespace: &str,
        name: &str,
        uid: &str,
    ) -> Result<Option<String>, NotSynced> {
        let state = self.state.read();
        if !state.synced {
            return Err(NotSynced);
        }
        let key = (namespace.to_owned(), name.to_owned());
        Ok(state
            .pods
            .get(&key)
            .filter(|facts| facts.uid == uid)
            .and_then(|facts| facts.node.clone()))
    }
}

impl Placement for PodWatch {
    fn placed(&self, node: &str, identity: &SpiffeId) -> Result<bool, NotSynced> {
        let state = self.state.read();
        if !state.synced {
            return Err(NotSynced);
        }
        if identity.trust_domain() != self.trust_domain {
            return Ok(false);
        }
        let key = (
            node.to_owned(),
            identity.namespace().to_owned(),
            identity.service_account().to_owned(),
        );
        Ok(state.placed.contains_key(&key))
    }
}

/// The fields of a pod the CA reads; everything else is ignored.
#[derive(Debug, Deserialize)]
struct PodShape {
    spec: SpecShape,
    #[serde(default)]
    status: Option<StatusShape>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SpecShape {
    #[serde(default)]
    node_name: Option<String>,
    #[serde(default)]
    service_account_name: Option<String>,
}

#[derive(Debug, Deserialize)]
struct StatusShape {
    #[serde(default)]
    phase: Option<String>,
}

/// One pod's key and facts, or `None` (logged) when the object does not read as a pod.
fn read_pod(object: &DynamicObject) -> Option<(PodKey, PodFacts)> {
    let meta = &object.metadata;
    let (Some(namespace), Some(name)) = (&meta.namespace, &meta.name) else {
        tracing::warn!(?meta.name, ?meta.namespace, "skipped a pod without a name or namespace");
        return None;
    };
    let shape = match PodShape::deserialize(&object.data) {
        Ok(shape) => shape,
        Err(error) => {
            tracing::warn!(%namespace, %name, %error, "skipped a malformed pod");
            return None;
        }
    };
    let phase = shape.status.and_then(|s| s.phase);
    let facts = PodFacts {
        uid: meta.uid.clone().unwrap_or_default(),
        node: shape.spec.node_name.filter(|n| !n.is_empty()),
        service_account: shape
            .spec
            .service_account_name
            .filter(|sa| !sa.is_empty())
            .unwrap_or_else(|| DEFAULT_SERVICE_ACCOUNT.to_owned()),
        finished: matches!(phase.as_deref(), Some("Succeeded" | "Failed")),
    };
    Some(((namespace.clone(), name.clone()), facts))
}
