//! The data plane: per enrolled pod, an outbound listener (captured connects land here) and
//! an inbound listener, opened inside the pod's network namespace; each accepted connection
//! is routed, connected upstream from the pod's namespace, and copied.

pub mod copy;
mod inbound;
mod mesh_tls;

pub use mesh_tls::{MeshTls, MeshTlsError, dev_ca_dir};
pub use reserve::SocketReserve;
mod outbound;
pub mod registry;
mod reserve;
pub mod route;
mod socket;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd,
    sync::{Arc, Mutex},
};

use arc_swap::ArcSwap;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Semaphore,
    task::JoinHandle,
};

use crate::{
    authz,
    balance::Balancer,
    config::Config,
    ebpf::{Datapath, EbpfError},
    metrics::Metrics,
    sys::{NetnsError, NetnsThread},
    tls::SpiffeId,
};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("opening listener {addr} in {netns}: {source}")]
    Listen {
        addr: SocketAddr,
        netns: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Ebpf(#[from] Box<EbpfError>),
    #[error(transparent)]
    MeshTls(#[from] MeshTlsError),
}

/// What every connection handler shares.
pub struct ProxyContext {
    /// The current config snapshot; swapped whole on reload.
    pub config: Arc<ArcSwap<Config>>,
    pub datapath: Arc<Mutex<Datapath>>,
    pub balancer: Arc<dyn Balancer>,
    pub metrics: Arc<Metrics>,
    /// Live connections with what they were authorized as, for revocation on reload.
    pub connections: Arc<registry::Registry>,
    /// Certificates, tunnels to other nodes, tunnel servers of local pods.
    pub mesh_tls: Arc<MeshTls>,
    /// One permit per connection being proxied (`agent.maxConnections`).
    pub connection_slots: Arc<Semaphore>,
}

impl ProxyContext {
    /// Closes the established connections `config` no longer authorizes; returns how many.
    pub fn revoke_denied(&self, config: &Config) -> usize {
        self.connections.revoke(|subject| {
            let Some(workload) = config.local_workload(&subject.destination) else {
                // The workload left the config: not a policy decision; its pod goes away.
                return true;
            };
            authz::authorize(config, subject.source.as_deref(), workload, subject.port).allowed
        })
    }
}

/// One enrolled pod as the proxy sees it.
#[derive(Clone)]
pub struct PodHandle {
    /// `namespace/name`, the key of the workload in the config.
    pub key: String,
    /// Its SPIFFE identity: what it presents to other nodes' pods.
    pub identity: SpiffeId,
    pub netns: NetnsThread,
    /// Ready upstream sockets made in the pod's netns.
    pub sockets: Arc<SocketReserve>,
}

/// The listeners of one pod; dropping it closes them (established connections go on).
pub struct PodListeners {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for PodListeners {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl PodListeners {
    /// Opens the pod's listeners inside its network namespace, hands the inbound ones to
    /// the sk_lookup program for the pod's `ips`, and starts accepting.
    pub fn start(
        ctx: &Arc<ProxyContext>,
        pod: &PodHandle,
        ips: &[IpAddr],
    ) -> Result<Self, ProxyError> {
        let agent = ctx.config.load().agent().clone();
        // Built up as we go, so an error half way closes what was opened.
        let mut started = Self { tasks: Vec::new() };
        // The pod's certificate, then its tunnel server for other nodes' pods. Issuing is
        // quick local signing; enrollment runs outside the proxy's hot path.
        let mesh = ctx.mesh_tls.clone();
        let identity = pod.identity.clone();
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(mesh.ensure(&identity))
        })?;
        let tunnel = mesh_tls::tunnel_listener(pod, agent.tunnel_port, agent.proxy_mark)?;
        started
            .tasks
            .push(mesh.serve_pod(ctx, pod, pod.identity.clone(), tunnel)?);
        for loopback in [
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ] {
            // Outbound on both loopbacks: connect4 rewrites to 127.0.0.1, connect6 to ::1.
            let outbound = listen(
                pod,
                SocketAddr::new(loopback, agent.outbound_port),
                agent.proxy_mark,
            )?;
            started.tasks.push(tokio::spawn(accept_loop(
                ctx.clone(),
                pod.clone(),
                outbound,
                "outbound",
                outbound::handle,
            )));
            // Inbound: sk_lookup hands this socket the pod's new incoming connections of the
            // same family, whatever their port; on loopback so nobody reaches it directly.
            let inbound = listen(
                pod,
                SocketAddr::new(loopback, agent.inbound_port),
                agent.proxy_mark,
            )?;
            let family: Vec<(IpAddr, &dyn AsRawFd)> = ips
                .iter()
                .filter(|ip| ip.is_ipv4() == loopback.is_ipv4())
                .map(|ip| (*ip, &inbound as &dyn AsRawFd))
                .collect();
            ctx.datapath
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .set_inbound_listeners(&family)
                .map_err(Box::new)?;
            started.tasks.push(tokio::spawn(accept_loop(
                ctx.clone(),
                pod.clone(),
                inbound,
                "inbound",
                inbound::handle,
            )));
        }
        Ok(started)
    }
}

/// Accepts on `listener` and runs `handle` on each connection in its own task, which holds
/// a connection slot until it ends. At the limit the accepted connection waits for a slot
/// and the loop accepts nothing more, so a flood waits in the kernel's backlog instead of in
/// agent memory (at most one waiting connection per listener).
async fn accept_loop<F, Fut>(
    ctx: Arc<ProxyContext>,
    pod: PodHandle,
    listener: TcpListener,
    direction: &'static str,
    handle: F,
) where
    F: Fn(Arc<ProxyContext>, PodHandle, TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                // Taken after accept: an idle listener must not sit on a slot.
                let Ok(slot) = ctx.connection_slots.clone().acquire_owned().await else {
                    return;
                };
                // Requests and replies pass through as they come; the app's own Nagle
                // choices still apply on its socket.
                let _ = stream.set_nodelay(true);
                let connection = handle(ctx.clone(), pod.clone(), stream, peer);
                tokio::spawn(async move {
                    connection.await;
                    drop(slot);
                });
            }
            Err(error) => {
                // Out of file descriptors or memory: back off instead of spinning.
                tracing::warn!(pod = %pod.key, direction, %error, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

fn listen(pod: &PodHandle, addr: SocketAddr, mark: u32) -> Result<TcpListener, ProxyError> {
    let error = |source| ProxyError::Listen {
        addr,
        netns: pod.key.clone(),
        source,
    };
    let std_listener = pod
        .netns
        .run_blocking(move || socket::listener(addr, mark))?
        .map_err(error)?;
    TcpListener::from_std(std_listener).map_err(error)
}
