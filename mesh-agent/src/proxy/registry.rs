//! The connections being proxied now, each with what authorization judged it on, so a
//! policy change can close the established connections it now denies.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::tls::SpiffeId;

/// What a connection was authorized as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subject {
    /// The client's SPIFFE identity; `None` for a plaintext, unauthenticated client.
    pub source: Option<SpiffeId>,
    /// The destination workload, `namespace/name`.
    pub destination: String,
    /// The destination port (the pod's port).
    pub port: u16,
}

struct Entry {
    subject: Subject,
    close: Arc<Notify>,
}

#[derive(Default)]
pub struct Registry {
    next_id: AtomicU64,
    live: Mutex<HashMap<u64, Entry>>,
}

/// Registration of one connection; deregisters on drop.
pub struct Tracked {
    registry: Arc<Registry>,
    id: u64,
    close: Arc<Notify>,
}

impl Tracked {
    /// Completes when the connection must be closed (its authorization was revoked).
    pub async fn revoked(&self) {
        self.close.notified().await;
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.registry.live.lock().remove(&self.id);
    }
}

impl Registry {
    pub fn track(self: &Arc<Self>, subject: Subject) -> Tracked {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let close = Arc::new(Notify::new());
        self.live.lock().insert(
            id,
            Entry {
                subject,
                close: close.clone(),
            },
        );
        Tracked {
            registry: self.clone(),
            id,
            close,
        }
    }

    /// Closes every connection `still_allowed` now refuses; returns how many.
    pub fn revoke(&self, mut still_allowed: impl FnMut(&Subject) -> bool) -> usize {
        let live = self.live.lock();
        let mut closed = 0;
        for entry in live.values() {
            if !still_allowed(&entry.subject) {
                // notify_one stores a permit, so a connection between polls still sees it.
                entry.close.notify_one();
                closed += 1;
            }
        }
        closed
    }

    /// What each live connection was authorized as (for the admin API).
    pub fn subjects(&self) -> Vec<Subject> {
        self.live
            .lock()
            .values()
            .map(|entry| entry.subject.clone())
            .collect()
    }

    pub fn len(&self) -> usize {
        self.live.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.lock().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use super::{Registry, Subject};

    fn subject(source: &str, port: u16) -> Subject {
        Subject {
            source: Some(source.parse().expect("valid identity")),
            destination: "ns/b".into(),
            port,
        }
    }

    #[tokio::test]
    async fn revoking_closes_only_the_denied_connections_and_drop_deregisters() {
        let registry = Arc::new(Registry::default());
        let keep = registry.track(subject("spiffe://td/ns/ns/sa/a", 80));
        let close = registry.track(subject("spiffe://td/ns/ns/sa/x", 80));
        assert_eq!(
            registry.revoke(|s| s
                .source
                .as_ref()
                .is_none_or(|id| id.service_account() != "x")),
            1
        );
        tokio::time::timeout(Duration::from_secs(1), close.revoked())
            .await
            .expect("revoked");
        assert!(
            tokio::time::timeout(Duration::from_millis(50), keep.revoked())
                .await
                .is_err()
        );
        drop(close);
        assert_eq!(registry.len(), 1);
    }
}
