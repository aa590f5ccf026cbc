//! Bounding the TLS handshakes in flight, in total and per peer address: a handshake costs a
//! server real CPU, so a flood of them (or one peer opening many) must wait or be refused
//! rather than take every core. Shared by the pods' tunnel servers and the CA's API.

use std::{collections::HashMap, net::IpAddr, sync::Arc};

use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Concurrent TLS handshakes allowed, in total and per peer address. Clone it into every
/// server that should share the bound (the tunnel servers of all pods of a node).
#[derive(Clone)]
pub struct HandshakeLimits {
    total: Arc<Semaphore>,
    per_peer: Arc<Mutex<HashMap<IpAddr, usize>>>,
    max_per_peer: usize,
}

impl HandshakeLimits {
    pub fn new(max_total: usize, max_per_peer: usize) -> Self {
        Self {
            total: Arc::new(Semaphore::new(max_total.max(1))),
            per_peer: Arc::new(Mutex::new(HashMap::new())),
            max_per_peer: max_per_peer.max(1),
        }
    }

    /// A permit for one handshake from `peer`, or `None` at either limit.
    pub fn try_acquire(&self, peer: IpAddr) -> Option<HandshakePermit> {
        let total = self.total.clone().try_acquire_owned().ok()?;
        let mut per_peer = self.per_peer.lock();
        let count = per_peer.entry(peer).or_insert(0);
        if *count >= self.max_per_peer {
            return None;
        }
        *count += 1;
        Some(HandshakePermit {
            _total: total,
            limits: self.clone(),
            peer,
        })
    }
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        Self::new(256, 32)
    }
}

/// One handshake in flight; dropping it frees its place.
pub struct HandshakePermit {
    _total: OwnedSemaphorePermit,
    limits: HandshakeLimits,
    peer: IpAddr,
}

impl Drop for HandshakePermit {
    fn drop(&mut self) {
        let mut per_peer = self.limits.per_peer.lock();
        if let Some(count) = per_peer.get_mut(&self.peer) {
            *count -= 1;
            if *count == 0 {
                per_peer.remove(&self.peer);
            }
        }
    }
}
