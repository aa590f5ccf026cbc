//! The controller: applies the watchers' events to the stores, and after each batch (an event
//! and whatever else is ready) rebuilds the snapshot and publishes it if it differs. Nothing
//! is published before every kind has completed its first list: the agent's first snapshot is
//! the complete initial sync. The agent block comes from the file source (the mounted
//! ConfigMap), whose changes rebuild too.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};

use super::build::{BuildCache, build};
use super::kinds::ObjectKind;
use super::locate::{PodLocator, Sandboxes};
use super::store::{ApplyContext, Stores};
use super::stream::{Update, spawn_all};
use super::translate::ObjectKey;
use crate::config::{AgentConfig, Config, ConfigWatch, ReloadStatus};
use crate::metrics::Metrics;

/// How often local pods whose sandbox was not found are looked for again.
pub const SANDBOX_RETRY: Duration = Duration::from_secs(1);
/// How often the start logs that it still waits for the initial lists.
const WAIT_LOG: Duration = Duration::from_secs(5);
/// Events buffered between the watchers and the controller.
const QUEUE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("the Kubernetes source stopped before its initial sync")]
    Stopped,
}

/// What the source needs.
pub struct SourceInputs {
    pub client: kube::Client,
    /// The file source's snapshots (the agent block).
    pub file: watch::Receiver<Arc<Config>>,
    /// The file source's status: this source's publications count there too.
    pub status: Arc<ReloadStatus>,
    pub locator: Arc<dyn PodLocator>,
    pub metrics: Arc<Metrics>,
}

/// Starts the source and waits for its first, complete snapshot (logging while it waits).
pub async fn start(inputs: SourceInputs) -> Result<(Arc<Config>, ConfigWatch), SourceError> {
    let placeholder = inputs.file.borrow().clone();
    let (tx, mut rx) = watch::channel(placeholder);
    let status = inputs.status.clone();
    let unlisted = Arc::new(Mutex::new(ObjectKind::ALL.to_vec()));
    let task = tokio::spawn(run(inputs, tx, unlisted.clone()));
    let waiting = Instant::now();
    loop {
        tokio::select! {
            changed = rx.changed() => {
                changed.map_err(|_| SourceError::Stopped)?;
                break;
            }
            () = tokio::time::sleep(WAIT_LOG) => {
                // A kind that never lists (its CRD not installed, RBAC missing) shows here,
                // and its watcher's errors say why.
                let unlisted: Vec<&str> = unlisted.lock().iter().map(|k| k.name()).collect();
                tracing::info!(
                    waited = ?waiting.elapsed(),
                    unlisted = %unlisted.join(", "),
                    "waiting for the initial lists of the Kubernetes API"
                );
            }
        }
    }
    let config = rx.borrow_and_update().clone();
    tracing::info!(
        workloads = config.workloads().len(),
        services = config.services().len(),
        took = ?waiting.elapsed(),
        "Kubernetes source synced"
    );
    Ok((config, ConfigWatch::new(rx, status, task)))
}

async fn run(
    inputs: SourceInputs,
    tx: watch::Sender<Arc<Config>>,
    unlisted: Arc<Mutex<Vec<ObjectKind>>>,
) {
    let SourceInputs {
        client,
        mut file,
        status,
        locator,
        metrics,
    } = inputs;
    let mut agent: AgentConfig = file.borrow_and_update().agent().clone();
    let (updates_tx, mut updates) = mpsc::channel::<Update>(QUEUE);
    let watchers = spawn_all(&client, &agent.startup.node, &updates_tx);
    drop(updates_tx);
    let mut controller = Controller {
        stores: Stores::default(),
        sandboxes: Sandboxes::new(locator),
        conflicts: BTreeSet::new(),
        published: false,
        unresolved: 0,
        cache: BuildCache::default(),
    };
    let mut retry = tokio::time::interval(SANDBOX_RETRY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut dirty = false;
        // The file watcher counts the reloads it publishes: a rebuild for the agent block
        // alone is not counted twice.
        let mut from_api = true;
        tokio::select! {
            update = updates.recv() => {
                let Some(update) = update else { break };
                let mut cx = ApplyContext {
                    agent: &agent,
                    metrics: &metrics,
                    sandboxes: &mut controller.sandboxes,
                };
                dirty |= controller.stores.apply(update.kind, update.event, &mut cx);
                // Whatever else is ready goes into the same rebuild.
                while let Ok(update) = updates.try_recv() {
                    dirty |= controller.stores.apply(update.kind, update.event, &mut cx);
                }
            }
            changed = file.changed() => {
                if changed.is_err() {
                    break;
                }
                let new = file.borrow_and_update().agent().clone();
                if new != agent {
                    agent = new;
                    dirty = true;
                    from_api = false;
                }
            }
            _ = retry.tick(), if controller.unresolved > 0 => dirty = true,
            () = tx.closed() => break,
        }
        if dirty && controller.stores.synced() {
            let counted = from_api.then_some(status.as_ref());
            controller.publish(&agent, &tx, counted, &metrics);
        } else if dirty {
            *unlisted.lock() = controller.stores.unsynced();
        }
    }
    drop(watchers);
}

struct Controller {
    stores: Stores,
    sandboxes: Sandboxes,
    /// TrafficPolicies refused for a conflict, as of the last rebuild (logged once each).
    conflicts: BTreeSet<ObjectKey>,
    published: bool,
    /// Local pods left out of the last rebuild (sandbox not found yet).
    unresolved: usize,
    cache: BuildCache,
}

impl Controller {
    fn publish(
        &mut self,
        agent: &AgentConfig,
        tx: &watch::Sender<Arc<Config>>,
        status: Option<&ReloadStatus>,
        metrics: &Metrics,
    ) {
        let building = Instant::now();
        let built = build(
            &mut self.stores,
            agent,
            &mut self.sandboxes,
            &mut self.cache,
        );
        self.unresolved = built.unresolved;
        let conflicts: BTreeSet<ObjectKey> = built.conflicts.into_iter().collect();
        for object in conflicts.difference(&self.conflicts) {
            tracing::warn!(
                kind = %ObjectKind::TrafficPolicy,
                %object,
                reason = "an older TrafficPolicy names the same Service",
                "Kubernetes object refused; skipped"
            );
            metrics.kube_object_rejected(ObjectKind::TrafficPolicy.name());
        }
        self.conflicts = conflicts;
        if self.published && **tx.borrow() == *built.config {
            return;
        }
        // The first snapshot is the start's, not a reload.
        let reload = std::mem::replace(&mut self.published, true);
        tx.send_replace(built.config);
        if let Some(status) = status.filter(|_| reload) {
            status.applied(building.elapsed());
        }
        tracing::debug!(
            unresolved = self.unresolved,
            "Kubernetes snapshot published"
        );
    }
}
