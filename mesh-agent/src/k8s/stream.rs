//! One kube watcher per kind, untyped, each forwarding its events into one channel that the
//! source drains. The watcher resumes from the last resourceVersion after a disconnect and
//! relists after `410 Gone`; errors are logged and retried with kube's default backoff
//! (exponential, capped), so a flapping API server is not hammered.

use futures::StreamExt;
use kube::api::Api;
use kube::core::DynamicObject;
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::kinds::ObjectKind;

/// One event of one kind.
pub struct Update {
    pub kind: ObjectKind,
    pub event: watcher::Event<DynamicObject>,
}

/// The running watchers; dropping this stops them (also when the source's task is aborted).
pub struct Watchers(Vec<JoinHandle<()>>);

impl Drop for Watchers {
    fn drop(&mut self) {
        for watcher in &self.0 {
            watcher.abort();
        }
    }
}

/// Watchers of every kind (this node's Node only), sending into `tx`.
pub fn spawn_all(client: &kube::Client, node: &str, tx: &mpsc::Sender<Update>) -> Watchers {
    let handles = ObjectKind::ALL
        .iter()
        .map(|kind| {
            let mut config = watcher::Config::default();
            if *kind == ObjectKind::Node {
                config = config.fields(&format!("metadata.name={node}"));
            }
            tokio::spawn(watch_kind(client.clone(), *kind, config, tx.clone()))
        })
        .collect();
    Watchers(handles)
}

async fn watch_kind(
    client: kube::Client,
    kind: ObjectKind,
    config: watcher::Config,
    tx: mpsc::Sender<Update>,
) {
    let api: Api<DynamicObject> = Api::all_with(client, &kind.api_resource());
    let mut events = std::pin::pin!(watcher(api, config).default_backoff());
    while let Some(item) = events.next().await {
        match item {
            Ok(event) => {
                if tx.send(Update { kind, event }).await.is_err() {
                    return;
                }
            }
            Err(error) => {
                tracing::warn!(%kind, %error, "Kubernetes watch failed; retrying with backoff");
            }
        }
    }
}
