//! The listeners of one enrolled pod, opened inside its network namespace: outbound (where
//! connect4/6 send the app's connects), inbound (where sk_lookup hands connections from
//! outside the mesh) and the tunnel server (streams from other nodes' pods). Each accepted
//! connection becomes an [`Accepted`] and goes down the [`pipeline`].

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd,
    sync::Arc,
};

use tokio::{
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

use super::{
    client_ip,
    context::{PodHandle, ProxyContext, ProxyError},
    direction::Direction,
    pipeline::{self, Accepted, Downstream},
    socket,
};
use crate::{
    ebpf,
    tunnel::{ConnectRequest, PendingStream},
};

/// How long enrolling a pod waits for its first certificate. Issuing takes milliseconds; the
/// wait is for a CA that is far, loaded or down.
const CERTIFICATE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The listeners of one pod; dropping it closes them (established connections go on).
pub struct PodListeners {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for PodListeners {
    fn drop(&mut self) {
        self.close();
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
        let agent = ctx.config.load().agent().startup.clone();
        // Built up as we go, so an error half way closes what was opened.
        let mut started = Self { tasks: Vec::new() };
        match pod
            .netns
            .run_blocking(socket::migrate_pending_connections)?
        {
            Ok(()) => {}
            // An older kernel: a handover then resets what waits in the accept queues.
            Err(error) => {
                tracing::warn!(pod = %pod.key, %error, "net.ipv4.tcp_migrate_req not set")
            }
        }
        // The pod's certificate, then its tunnel server for other nodes' pods. Enrollment
        // runs outside the proxy's hot path but holds the pods' lock, which the admin API
        // reads too: a CA that is slow or unreachable fails the enrollment after a bounded
        // wait (it is tried again later) rather than stalling `mesh-agent status`.
        let mesh = ctx.mesh_tls.clone();
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(async {
                tokio::time::timeout(CERTIFICATE_WAIT, mesh.ensure(&pod.identity))
                    .await
                    .map_err(|_| ProxyError::CertificateWait(CERTIFICATE_WAIT))
            })
        })??;
        let tunnel = tunnel_listener(pod, agent.tunnel_port, agent.proxy_mark)?;
        let handler = {
            let (ctx, pod) = (ctx.clone(), pod.clone());
            move |request: ConnectRequest, stream: PendingStream| {
                let vouched = request.forwarded_for.and_then(|claimed| {
                    let config = ctx.config.load();
                    let identity = &request.client_identity;
                    let (peer, target) = (request.peer_addr, request.authority);
                    client_ip::vouched(&config, identity, peer, claimed, target)
                        .inspect_err(|reason| {
                            tracing::debug!(pod = %pod.key, %peer, %claimed, %reason, "client address not believed");
                        })
                        .ok()
                });
                let accepted = Accepted {
                    direction: Direction::Tunnel,
                    pod: pod.clone(),
                    downstream: Downstream::Tunnel(stream),
                    client: vouched.unwrap_or(request.peer_addr),
                    destination: Some(request.authority),
                    client_identity: Some(request.client_identity),
                    connect_from: vouched.map(|client| client.ip()),
                };
                pipeline::serve(ctx.clone(), accepted)
            }
        };
        started
            .tasks
            .push(mesh.serve(pod.identity.clone(), handler, tunnel)?);
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
                outbound_connection,
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
                .set_inbound_listeners(&family)
                .map_err(Box::new)?;
            started.tasks.push(tokio::spawn(accept_loop(
                ctx.clone(),
                pod.clone(),
                inbound,
                inbound_connection,
            )));
        }
        Ok(started)
    }

    /// Stops accepting: the listening sockets close, connections being served go on.
    pub fn close(&mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
    }
}

/// A connect the connect4/6 programs redirected here: its original destination is in the
/// flow map, keyed by the pod's netns and the app's socket address.
fn outbound_connection(
    ctx: &ProxyContext,
    pod: PodHandle,
    stream: TcpStream,
    client: SocketAddr,
) -> Accepted {
    let key = ebpf::flow_key(pod.netns.cookie(), client);
    let destination = ctx.orig_dst.take(&key);
    Accepted {
        direction: Direction::Outbound,
        client_identity: Some(pod.identity.clone()),
        pod,
        downstream: Downstream::Tcp(stream),
        client,
        destination,
        connect_from: None,
    }
}

/// A connection sk_lookup handed to the inbound listener: the accepted socket's local
/// address is the original destination, its peer the real client.
fn inbound_connection(
    _ctx: &ProxyContext,
    pod: PodHandle,
    stream: TcpStream,
    client: SocketAddr,
) -> Accepted {
    let destination = stream.local_addr().ok();
    Accepted {
        direction: Direction::Inbound,
        client_identity: None,
        pod,
        downstream: Downstream::Tcp(stream),
        client,
        destination,
        connect_from: None,
    }
}

/// Accepts on `listener` and serves each connection in its own task, which holds a
/// connection slot until it ends. At the limit the accepted connection waits for a slot and
/// the loop accepts nothing more, so a flood waits in the kernel's backlog instead of in
/// agent memory (at most one waiting connection per listener).
async fn accept_loop(
    ctx: Arc<ProxyContext>,
    pod: PodHandle,
    listener: TcpListener,
    accepted: fn(&ProxyContext, PodHandle, TcpStream, SocketAddr) -> Accepted,
) {
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
                let ctx = ctx.clone();
                let pod = pod.clone();
                tokio::spawn(async move {
                    let connection = accepted(&ctx, pod, stream, peer);
                    pipeline::serve(ctx, connection).await;
                    drop(slot);
                });
            }
            Err(error) => {
                // Out of file descriptors or memory: back off instead of spinning.
                tracing::warn!(pod = %pod.key, %error, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

fn listen(pod: &PodHandle, addr: SocketAddr, mark: u32) -> Result<TcpListener, ProxyError> {
    let std_listener = pod
        .netns
        .run_blocking(move || socket::listener(addr, mark))?
        .map_err(|source| listen_error(pod, addr, source))?;
    TcpListener::from_std(std_listener).map_err(|source| listen_error(pod, addr, source))
}

/// The listener of a pod's tunnel server: dual-stack `[::]:port` where the pod has IPv6,
/// else `0.0.0.0:port`.
fn tunnel_listener(pod: &PodHandle, port: u16, mark: u32) -> Result<TcpListener, ProxyError> {
    let any6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port);
    let any4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port);
    let listener = pod
        .netns
        .run_blocking(move || {
            socket::dual_stack_listener(any6, mark).or_else(|_| socket::listener(any4, mark))
        })?
        .map_err(|source| listen_error(pod, any6, source))?;
    TcpListener::from_std(listener).map_err(|source| listen_error(pod, any6, source))
}

fn listen_error(pod: &PodHandle, addr: SocketAddr, source: std::io::Error) -> ProxyError {
    ProxyError::Listen {
        addr,
        netns: pod.key.to_string(),
        source,
    }
}
