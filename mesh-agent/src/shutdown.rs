//! Stopping on SIGTERM without dropping connections: the handover of a rolling update.
//!
//! A successor agent (a DaemonSet's surge pod) starts while this one runs: the proxy's
//! listeners and the admin API are `SO_REUSEPORT`, so it listens on the same ports and shares
//! the pinned maps and programs. On SIGTERM this agent stops answering the admin API, looks
//! for a successor there, closes its listeners (the kernel moves connections still waiting in
//! their accept queues to the successor's, `tcp_migrate_req`) and lets its established
//! connections finish, up to the drain timeout. Steering stays pinned throughout.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use parking_lot::Mutex;
use tokio::{signal::unix::Signal, time::Instant};

use crate::{
    admin::{self, AdminServer},
    pods::Pods,
    proxy::ProxyContext,
};

/// How long to look for a successor's admin API: a surge pod is ready before the old one is
/// told to stop, so it answers at once when there is one.
const SUCCESSOR_WAIT: Duration = Duration::from_millis(500);
const POLL: Duration = Duration::from_millis(100);

/// What the agent hands over and drains.
pub struct Handover<'a> {
    pub admin: AdminServer,
    pub admin_addr: SocketAddr,
    pub pods: &'a Mutex<Pods>,
    pub proxy: &'a Arc<ProxyContext>,
    pub drain_timeout: Duration,
}

impl Handover<'_> {
    /// Runs the handover; returns early on `again` (a second signal: stop now).
    pub async fn run(self, again: &mut Signal) {
        self.admin.close().await;
        let successor = successor_ready(self.admin_addr).await;
        self.pods.lock().close_listeners();
        // Every proxied connection, tunnel streams from other nodes included (those hold no
        // listener slot).
        let open = || self.proxy.connections.len();
        tracing::info!(
            successor,
            connections = open(),
            drain_timeout = ?self.drain_timeout,
            "listeners closed{}; draining established connections",
            if successor { ", a successor took over" } else { "" }
        );
        let deadline = Instant::now() + self.drain_timeout;
        let drained = async {
            while open() > 0 && Instant::now() < deadline {
                tokio::time::sleep(POLL).await;
            }
        };
        tokio::select! {
            () = drained => {}
            _ = again.recv() => tracing::info!("second signal: stopping now"),
        }
        match open() {
            0 => tracing::info!("every connection finished"),
            left => tracing::info!(connections = left, "closing the connections still open"),
        }
    }
}

/// Whether another agent answers `/ready` on `addr` (this one no longer listens there).
async fn successor_ready(addr: SocketAddr) -> bool {
    let deadline = Instant::now() + SUCCESSOR_WAIT;
    loop {
        if admin::client::ready(addr, POLL).await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}
