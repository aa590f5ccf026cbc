//! The converted pieces of every object the source watches, by kind and `namespace/name`,
//! with the watchers' list protocol applied: a (re)list fills a fresh buffer that replaces
//! the kind's pieces only when complete (`InitDone`), so objects deleted while the watch was
//! down go away and a half-done relist is never built from.
//!
//! A refused object (malformed, invalid) is logged, counted and skipped; an earlier valid
//! version of it stays, as the previous file stays when a new one is invalid.
//!
//! Pieces are shared (`Arc`) and replaced only when they change, a relist keeping the ones it
//! finds equal. For the build to redo only what changed (see `build::BuildCache`), the stores
//! keep the slices of each Service, note which Services a change touches (its own, a slice's,
//! a TrafficPolicy's target) and count each kind's changes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use kube::core::DynamicObject;
use kube::runtime::watcher::Event;
use smallvec::SmallVec;

use super::kinds::ObjectKind;
use super::locate::Sandboxes;
use super::translate::{ObjectKey, Piece, TranslateError, key, translate};
use crate::config::{AgentConfig, PolicyObject};
use crate::metrics::Metrics;

#[derive(Debug, Default)]
struct Store {
    items: BTreeMap<ObjectKey, Arc<Piece>>,
    /// Filling during a (re)list.
    relist: Option<BTreeMap<ObjectKey, Arc<Piece>>>,
    /// A first list completed.
    synced: bool,
    /// Changes applied to `items` so far.
    changes: u64,
}

/// What applying an event needs besides the stores.
pub struct ApplyContext<'a> {
    pub agent: &'a AgentConfig,
    pub metrics: &'a Metrics,
    pub sandboxes: &'a mut Sandboxes,
}

/// What an event did to a kind's pieces.
enum Outcome {
    Unchanged,
    /// The piece of `key` went from `old` to `new` (`None`: absent).
    Changed {
        key: ObjectKey,
        old: Option<Arc<Piece>>,
        new: Option<Arc<Piece>>,
    },
    /// A relist replaced the kind's pieces with different ones.
    Relisted,
    /// An unchanged local pod: its event may be the only sign of a new sandbox.
    LocalPod,
}

/// The Services whose built form may be out of date, since the build last took them.
#[derive(Debug, Default)]
pub struct Touched {
    pub services: BTreeSet<ObjectKey>,
    /// A relist of Services, slices or TrafficPolicies: any of them.
    pub all: bool,
}

/// Every kind's pieces.
#[derive(Debug)]
pub struct Stores {
    kinds: BTreeMap<ObjectKind, Store>,
    /// Service (`namespace/name`) -> the keys of its EndpointSlices.
    slices: foldhash::HashMap<ObjectKey, SliceKeys>,
    touched: Touched,
}

impl Default for Stores {
    fn default() -> Self {
        Self {
            kinds: ObjectKind::ALL
                .iter()
                .map(|k| (*k, Store::default()))
                .collect(),
            slices: foldhash::HashMap::default(),
            touched: Touched::default(),
        }
    }
}

/// The keys of a Service's EndpointSlices, ascending (most Services have one: kept inline).
type SliceKeys = SmallVec<[ObjectKey; 1]>;

fn insert_sorted(keys: &mut SliceKeys, key: ObjectKey) {
    if let Err(at) = keys.binary_search(&key) {
        keys.insert(at, key);
    }
}

/// The Service a piece is about: itself, a slice's, a TrafficPolicy's target.
fn service_of(key: &ObjectKey, piece: &Piece) -> Option<ObjectKey> {
    let name = match piece {
        Piece::Service(_) => &key.name,
        Piece::EndpointSlice(slice) => &slice.service,
        Piece::Policy(p) => match &p.object {
            PolicyObject::Traffic { service, .. } => service,
            _ => return None,
        },
        _ => return None,
    };
    Some(ObjectKey {
        namespace: key.namespace.clone(),
        name: name.clone(),
    })
}

impl Stores {
    /// Applies one watcher event of `kind`; true when what a rebuild reads changed.
    pub fn apply(
        &mut self,
        kind: ObjectKind,
        event: Event<DynamicObject>,
        cx: &mut ApplyContext<'_>,
    ) -> bool {
        let Some(store) = self.kinds.get_mut(&kind) else {
            return false;
        };
        match store.apply(kind, event, cx) {
            Outcome::Unchanged => false,
            Outcome::LocalPod => true,
            Outcome::Changed { key, old, new } => {
                let old = old.and_then(|p| service_of(&key, &p));
                let new = new.and_then(|p| service_of(&key, &p));
                if kind == ObjectKind::EndpointSlice {
                    if let Some(service) = &old
                        && let Some(slices) = self.slices.get_mut(service)
                    {
                        slices.retain(|k| *k != key);
                        if slices.is_empty() {
                            self.slices.remove(service);
                        }
                    }
                    if let Some(service) = &new {
                        insert_sorted(self.slices.entry(service.clone()).or_default(), key);
                    }
                }
                self.touched.services.extend(old.into_iter().chain(new));
                true
            }
            Outcome::Relisted => {
                if kind == ObjectKind::EndpointSlice {
                    self.index_slices();
                }
                self.touched.all |= matches!(
                    kind,
                    ObjectKind::Service | ObjectKind::EndpointSlice | ObjectKind::TrafficPolicy
                );
                true
            }
        }
    }

    /// The slice index made again from the slices (after a relist).
    fn index_slices(&mut self) {
        let mut index: foldhash::HashMap<ObjectKey, SliceKeys> = foldhash::HashMap::default();
        for (key, piece) in self.shared(ObjectKind::EndpointSlice) {
            if let Some(service) = service_of(key, piece) {
                insert_sorted(index.entry(service).or_default(), key.clone());
            }
        }
        self.slices = index;
    }

    /// The Services touched since the last call.
    pub fn take_touched(&mut self) -> Touched {
        std::mem::take(&mut self.touched)
    }

    /// The piece of `key`, of `kind`.
    pub fn get(&self, kind: ObjectKind, key: &ObjectKey) -> Option<&Arc<Piece>> {
        self.kinds.get(&kind).and_then(|s| s.items.get(key))
    }

    /// The EndpointSlices of Service `service`.
    pub fn slices_of(&self, service: &ObjectKey) -> impl Iterator<Item = &Arc<Piece>> + '_ {
        self.slices
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|key| self.get(ObjectKind::EndpointSlice, key))
    }

    /// Every kind has completed a first list.
    pub fn synced(&self) -> bool {
        self.kinds.values().all(|s| s.synced)
    }

    /// The kinds still waiting for their first list.
    pub fn unsynced(&self) -> Vec<ObjectKind> {
        self.kinds
            .iter()
            .filter(|(_, s)| !s.synced)
            .map(|(k, _)| *k)
            .collect()
    }

    /// The pieces of `kind`, by `namespace/name`.
    pub fn pieces(&self, kind: ObjectKind) -> impl Iterator<Item = (&ObjectKey, &Piece)> + '_ {
        self.shared(kind).map(|(key, piece)| (key, &**piece))
    }

    /// The pieces of `kind` as shared: the same `Arc` as long as the piece is unchanged.
    pub fn shared(&self, kind: ObjectKind) -> impl Iterator<Item = (&ObjectKey, &Arc<Piece>)> + '_ {
        self.kinds
            .get(&kind)
            .into_iter()
            .flat_map(|s| s.items.iter())
    }

    /// How many changes the pieces of `kind` have had (a local pod's event counts, its
    /// sandbox being looked up again): equal counts, same pieces.
    pub fn changes(&self, kind: ObjectKind) -> u64 {
        self.kinds.get(&kind).map_or(0, |s| s.changes)
    }
}

impl Store {
    fn apply(
        &mut self,
        kind: ObjectKind,
        event: Event<DynamicObject>,
        cx: &mut ApplyContext<'_>,
    ) -> Outcome {
        match event {
            Event::Init => {
                self.relist = Some(BTreeMap::new());
                Outcome::Unchanged
            }
            Event::InitApply(obj) => {
                if kind == ObjectKind::Pod {
                    forget_pod(&obj, cx);
                }
                let converted = convert(kind, &obj, cx);
                let Store { items, relist, .. } = self;
                let buffer = relist.get_or_insert_with(BTreeMap::new);
                match converted {
                    Some((key, piece)) => {
                        // An equal piece keeps its identity across the relist.
                        let shared = match items.get(&key) {
                            Some(old) if **old == piece => old.clone(),
                            _ => Arc::new(piece),
                        };
                        buffer.insert(key, shared);
                    }
                    None => {
                        // Refused: its earlier valid version, if any, stays.
                        if let Some((key, old)) = key(&obj)
                            .ok()
                            .and_then(|k| items.get(&k).map(|old| (k, old.clone())))
                        {
                            buffer.insert(key, old);
                        }
                    }
                }
                Outcome::Unchanged
            }
            Event::InitDone => {
                let listed = self.relist.take().unwrap_or_default();
                let changed = !self.synced || self.items != listed;
                self.items = listed;
                self.synced = true;
                if changed {
                    self.changes += 1;
                    Outcome::Relisted
                } else {
                    Outcome::Unchanged
                }
            }
            Event::Apply(obj) => {
                if kind == ObjectKind::Pod {
                    forget_pod(&obj, cx);
                }
                let Some((key, piece)) = convert(kind, &obj, cx) else {
                    return Outcome::Unchanged;
                };
                if self.items.get(&key).is_some_and(|old| **old == piece) {
                    return match piece {
                        Piece::Pod(p) if p.workload.local => {
                            // Counted: the build looks the sandbox up again.
                            self.changes += 1;
                            Outcome::LocalPod
                        }
                        _ => Outcome::Unchanged,
                    };
                }
                let new = Arc::new(piece);
                let old = self.items.insert(key.clone(), new.clone());
                self.changes += 1;
                Outcome::Changed {
                    key,
                    old,
                    new: Some(new),
                }
            }
            Event::Delete(obj) => {
                if kind == ObjectKind::Pod {
                    forget_pod(&obj, cx);
                }
                let Some((key, old)) = key(&obj)
                    .ok()
                    .and_then(|key| self.items.remove(&key).map(|old| (key, old)))
                else {
                    return Outcome::Unchanged;
                };
                self.changes += 1;
                Outcome::Changed {
                    key,
                    old: Some(old),
                    new: None,
                }
            }
        }
    }
}

fn forget_pod(obj: &DynamicObject, cx: &mut ApplyContext<'_>) {
    if let Some(uid) = obj.metadata.uid.as_deref() {
        cx.sandboxes.forget(uid);
    }
}

/// `obj` as its piece, or `None` after logging and counting why it is refused.
fn convert(
    kind: ObjectKind,
    obj: &DynamicObject,
    cx: &ApplyContext<'_>,
) -> Option<(ObjectKey, Piece)> {
    let result = key(obj).and_then(|key| Ok((key, translate(kind, obj, cx.agent)?)));
    match result {
        Ok(converted) => Some(converted),
        Err(error) => {
            reject(kind, obj, &error, cx.metrics);
            None
        }
    }
}

/// Logs and counts a refused object.
fn reject(kind: ObjectKind, obj: &DynamicObject, error: &TranslateError, metrics: &Metrics) {
    let object = key(obj).map_or_else(|_| "(no name)".to_owned(), |k| k.to_string());
    tracing::warn!(%kind, %object, reason = %error, "Kubernetes object refused; skipped");
    metrics.kube_object_rejected(kind.name());
}
