//! The connections being proxied now. Each carries what the connections view shows of it
//! (where it came from and goes, the identities, its live byte counts) and, when
//! authorization admitted it here, what it was judged on, so a policy change can close the
//! established connections it now denies.
//!
//! One lock per connection registered and one when it ends; nothing per byte (the byte
//! counts are the copy's own atomics, shared).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use parking_lot::Mutex;
use tokio::{sync::Notify, time::Instant};

use super::direction::Direction;
use crate::{copy::Transferred, tls::SpiffeId};

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

/// What the connections view shows of a connection, fixed when it is registered (the bytes
/// excepted: they are the copy's counters).
#[derive(Clone, Debug)]
pub struct ConnectionInfo {
    pub direction: Direction,
    /// `namespace/name` of the local pod whose listener took it.
    pub pod: Arc<str>,
    /// The app's socket (outbound), the remote client (inbound), the tunnel peer (tunnel).
    pub client: SocketAddr,
    /// The client's verified identity; `None` for a plaintext client.
    pub client_identity: Option<SpiffeId>,
    /// Where the client meant to go.
    pub destination: Option<SocketAddr>,
    /// Where the proxy connected.
    pub upstream: SocketAddr,
    /// The identity the tunnel's server proved, when the upstream is a tunnel stream.
    pub tunnel_to: Option<SpiffeId>,
    /// `namespace/name` of the service it was balanced for.
    pub service: Option<String>,
    /// When the proxy accepted it.
    pub started: Instant,
    /// Bytes each way so far, counted by the copy.
    pub moved: Arc<Transferred>,
}

/// One live connection as the admin API reads it.
#[derive(Clone, Debug)]
pub struct LiveConnection {
    pub info: ConnectionInfo,
    /// What authorization judged, when the destination is served here.
    pub subject: Option<Subject>,
}

/// How many connections are live, by direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub outbound: usize,
    pub inbound: usize,
    pub tunnel: usize,
    /// Outbound connections carried by a tunnel stream to another node.
    pub through_tunnels: usize,
}

impl Counts {
    pub fn total(&self) -> usize {
        self.outbound + self.inbound + self.tunnel
    }
}

struct Entry {
    subject: Option<Subject>,
    info: ConnectionInfo,
    close: Arc<Notify>,
}

/// Live connections by registration number (so the oldest come first). Entries are boxed:
/// a B-tree node holds eleven values and is about half full under ascending inserts, which
/// for entries this size doubled their memory per connection.
#[derive(Default)]
pub struct Registry {
    next_id: AtomicU64,
    live: Mutex<BTreeMap<u64, Box<Entry>>>,
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
    /// Registers a connection; `subject` when authorization admits it here (it can then be
    /// revoked), `None` for one whose destination is served elsewhere.
    pub fn track(self: &Arc<Self>, subject: Option<Subject>, info: ConnectionInfo) -> Tracked {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let close = Arc::new(Notify::new());
        self.live.lock().insert(
            id,
            Box::new(Entry {
                subject,
                info,
                close: close.clone(),
            }),
        );
        Tracked {
            registry: self.clone(),
            id,
            close,
        }
    }

    /// Closes every admitted connection `still_allowed` now refuses; returns how many.
    pub fn revoke(&self, mut still_allowed: impl FnMut(&Subject) -> bool) -> usize {
        let live = self.live.lock();
        let mut closed = 0;
        for (subject, entry) in live
            .values()
            .filter_map(|e| e.subject.as_ref().map(|s| (s, e)))
        {
            if !still_allowed(subject) {
                // notify_one stores a permit, so a connection between polls still sees it.
                entry.close.notify_one();
                closed += 1;
            }
        }
        closed
    }

    /// The `limit` oldest live connections, and how many are live by direction. The lock is
    /// held for one pass of counting and `limit` clones, whatever the node carries.
    pub fn oldest(&self, limit: usize) -> (Vec<LiveConnection>, Counts) {
        let live = self.live.lock();
        let mut counts = Counts::default();
        for entry in live.values() {
            match entry.info.direction {
                Direction::Outbound => counts.outbound += 1,
                Direction::Inbound => counts.inbound += 1,
                Direction::Tunnel => counts.tunnel += 1,
            }
            if entry.info.tunnel_to.is_some() {
                counts.through_tunnels += 1;
            }
        }
        let oldest = live
            .values()
            .take(limit)
            .map(|entry| LiveConnection {
                info: entry.info.clone(),
                subject: entry.subject.clone(),
            })
            .collect();
        (oldest, counts)
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
    use std::{net::SocketAddr, sync::Arc, time::Duration};

    use super::{ConnectionInfo, Direction, Registry, Subject};

    fn subject(source: &str, port: u16) -> Subject {
        Subject {
            source: Some(source.parse().expect("valid identity")),
            destination: "ns/b".into(),
            port,
        }
    }

    fn info(direction: Direction, port: u16) -> ConnectionInfo {
        let addr = |port| SocketAddr::from(([10, 0, 0, 1], port));
        ConnectionInfo {
            direction,
            pod: "ns/b".into(),
            client: addr(40000),
            client_identity: None,
            destination: Some(addr(port)),
            upstream: addr(port),
            tunnel_to: None,
            service: None,
            started: tokio::time::Instant::now(),
            moved: Arc::default(),
        }
    }

    #[tokio::test]
    async fn revoking_closes_only_the_denied_connections_and_drop_deregisters() {
        let registry = Arc::new(Registry::default());
        let keep = registry.track(
            Some(subject("spiffe://td/ns/ns/sa/a", 80)),
            info(Direction::Tunnel, 80),
        );
        let close = registry.track(
            Some(subject("spiffe://td/ns/ns/sa/x", 80)),
            info(Direction::Tunnel, 80),
        );
        // Not admitted here: never judged, never revoked.
        let _elsewhere = registry.track(None, info(Direction::Outbound, 443));
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
        assert_eq!(registry.len(), 2);
    }

    #[test]
    fn the_view_takes_the_oldest_and_counts_them_all() {
        let registry = Arc::new(Registry::default());
        let held: Vec<_> = (0..5u16)
            .map(|i| {
                let direction = if i % 2 == 0 {
                    Direction::Outbound
                } else {
                    Direction::Inbound
                };
                registry.track(None, info(direction, 8000 + i))
            })
            .collect();
        let (oldest, counts) = registry.oldest(2);
        let ports: Vec<u16> = oldest.iter().map(|c| c.info.upstream.port()).collect();
        assert_eq!(ports, [8000, 8001]);
        assert_eq!((counts.outbound, counts.inbound, counts.total()), (3, 2, 5));
        drop(held);
        assert_eq!(registry.oldest(2).1.total(), 0);
    }
}
