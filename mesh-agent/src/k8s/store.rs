//! The converted pieces of every object the source watches, by kind and `namespace/name`,
//! with the watchers' list protocol applied: a (re)list fills a fresh buffer that replaces
//! the kind's pieces only when complete (`InitDone`), so objects deleted while the watch was
//! down go away and a half-done relist is never built from.
//!
//! A refused object (malformed, invalid) is logged, counted and skipped; an earlier valid
//! version of it stays, as the previous file stays when a new one is invalid.
//!
//! Pieces are shared (`Arc`) and replaced only when they change, a relist keeping the ones it
//! finds equal: the build recognizes an unchanged piece by pointer and reuses what it made
//! from it (see `build::BuildCache`). Each kind counts its changes for the same purpose.

use std::collections::BTreeMap;
use std::sync::Arc;

use kube::core::DynamicObject;
use kube::runtime::watcher::Event;

use super::kinds::ObjectKind;
use super::locate::Sandboxes;
use super::translate::{ObjectKey, Piece, TranslateError, key, translate};
use crate::config::AgentConfig;
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

/// Every kind's pieces.
#[derive(Debug)]
pub struct Stores {
    kinds: BTreeMap<ObjectKind, Store>,
}

impl Default for Stores {
    fn default() -> Self {
        Self {
            kinds: ObjectKind::ALL
                .iter()
                .map(|k| (*k, Store::default()))
                .collect(),
        }
    }
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
        match event {
            Event::Init => {
                store.relist = Some(BTreeMap::new());
                false
            }
            Event::InitApply(obj) => {
                if kind == ObjectKind::Pod {
                    forget_pod(&obj, cx);
                }
                let converted = convert(kind, &obj, cx);
                let Store { items, relist, .. } = store;
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
                false
            }
            Event::InitDone => {
                let listed = store.relist.take().unwrap_or_default();
                let changed = !store.synced || store.items != listed;
                store.items = listed;
                store.synced = true;
                store.changes += u64::from(changed);
                changed
            }
            Event::Apply(obj) => {
                if kind == ObjectKind::Pod {
                    forget_pod(&obj, cx);
                }
                let Some((key, piece)) = convert(kind, &obj, cx) else {
                    return false;
                };
                // A local pod's event may be the only sign of a new sandbox.
                let local_pod = matches!(&piece, Piece::Pod(p) if p.workload.local);
                let changed = store.items.get(&key).is_none_or(|old| **old != piece);
                if changed {
                    store.items.insert(key, Arc::new(piece));
                    store.changes += 1;
                }
                changed || local_pod
            }
            Event::Delete(obj) => {
                if kind == ObjectKind::Pod {
                    forget_pod(&obj, cx);
                }
                let removed = key(&obj).is_ok_and(|key| store.items.remove(&key).is_some());
                store.changes += u64::from(removed);
                removed
            }
        }
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

    /// How many changes the pieces of `kind` have had: equal counts, same pieces.
    pub fn changes(&self, kind: ObjectKind) -> u64 {
        self.kinds.get(&kind).map_or(0, |s| s.changes)
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
