//! Upstream sockets made ahead of time in a pod's network namespace.
//!
//! A socket must be created inside the pod's netns, which means a hop to the pod's netns
//! thread and back (two context switches) on every new connection. Only `socket()` needs the
//! namespace, so the agent keeps a few ready sockets (marked, non-blocking, no Nagle) per
//! address family and refills them in the background; a connection takes one and connects
//! from the runtime. Pods that make no connections keep none.

use std::{
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use parking_lot::Mutex;

use super::socket;
use crate::sys::NetnsThread;

/// Sockets kept ready per address family once a pod starts connecting.
const TARGET: usize = 16;
/// Refill when fewer than this are left.
const LOW_WATER: usize = 8;

pub struct SocketReserve {
    netns: NetnsThread,
    mark: u32,
    families: [Family; 2],
}

#[derive(Default)]
struct Family {
    ready: Mutex<Vec<std::net::TcpStream>>,
    refilling: AtomicBool,
}

impl SocketReserve {
    pub fn new(netns: NetnsThread, mark: u32) -> Arc<Self> {
        Arc::new(Self {
            netns,
            mark,
            families: Default::default(),
        })
    }

    /// An unconnected socket for connecting to `target`, made in the pod's netns.
    pub async fn take(self: &Arc<Self>, target: SocketAddr) -> io::Result<std::net::TcpStream> {
        let family = &self.families[usize::from(target.is_ipv6())];
        let ready = family.ready.lock().pop();
        self.refill(target);
        match ready {
            Some(socket) => Ok(socket),
            None => {
                let mark = self.mark;
                self.netns
                    .run(move || socket::upstream(target, mark))
                    .await
                    .map_err(io::Error::other)?
            }
        }
    }

    /// Tops the family of `target` up to [`TARGET`] on the netns thread, once at a time.
    fn refill(self: &Arc<Self>, target: SocketAddr) {
        let family = &self.families[usize::from(target.is_ipv6())];
        let low = family.ready.lock().len() < LOW_WATER;
        if !low || family.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        let reserve = self.clone();
        self.netns.submit(move || {
            let family = &reserve.families[usize::from(target.is_ipv6())];
            let missing = TARGET.saturating_sub(family.ready.lock().len());
            // Made outside the lock; a failure (fd limit) just leaves the reserve short.
            let fresh: Vec<_> = (0..missing)
                .map_while(|_| socket::upstream(target, reserve.mark).ok())
                .collect();
            family.ready.lock().extend(fresh);
            family.refilling.store(false, Ordering::Release);
        });
    }
}
