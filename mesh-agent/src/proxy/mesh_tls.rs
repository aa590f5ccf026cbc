//! Node-to-node mTLS, wired into the data plane: the certificate store for the identities
//! of this node's pods, the client pool of tunnels to other nodes' pods, and a tunnel
//! server (`:tunnelPort`) inside each enrolled pod's network namespace.

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

use super::{PodHandle, ProxyContext, outbound, registry::Subject, socket};
use crate::{
    authz,
    config::AgentConfig,
    tls::{self, CertStore, LocalCa, SpiffeId, StoreOptions, TrustBundle},
    tunnel::{self, ConnectRequest, Pool, PoolOptions, Refusal, Server, ServerOptions},
};

/// The tls and tunnel errors are large (paths, rustls errors): boxed so a `Result` of this
/// stays small on the enrollment path.
#[derive(Debug, thiserror::Error)]
pub enum MeshTlsError {
    #[error(transparent)]
    Ca(Box<tls::CaError>),
    #[error(transparent)]
    Bundle(Box<tls::BundleError>),
    #[error(transparent)]
    Store(Box<tls::StoreError>),
    #[error(transparent)]
    Server(Box<tunnel::ServerError>),
}

macro_rules! boxed_from {
    ($($variant:ident($error:ty)),* $(,)?) => {
        $(impl From<$error> for MeshTlsError {
            fn from(error: $error) -> Self {
                Self::$variant(Box::new(error))
            }
        })*
    };
}

boxed_from!(
    Ca(tls::CaError),
    Bundle(tls::BundleError),
    Store(tls::StoreError),
    Server(tunnel::ServerError),
);

/// Where the agent keeps its development CA when none is configured.
pub fn dev_ca_dir(bpf_name: &str) -> PathBuf {
    Path::new("/run/mesh-agent").join(bpf_name).join("dev-ca")
}

/// The node's mTLS state, shared by every pod's listeners.
pub struct MeshTls {
    pub store: Arc<CertStore>,
    pub pool: Pool,
    server_options: ServerOptions,
    _rotation: JoinHandle<()>,
}

impl MeshTls {
    /// Loads the configured CA (or creates a development CA for this agent when none is
    /// configured), the trust bundle (the CA plus `trustRootFiles`), and starts rotation.
    pub fn start(agent: &AgentConfig) -> Result<Self, MeshTlsError> {
        let (ca_cert, ca_key) = match (&agent.ca_cert_file, &agent.ca_key_file) {
            (Some(cert), Some(key)) => (cert.clone(), key.clone()),
            _ => {
                let dir = dev_ca_dir(&agent.bpf_name);
                if !dir.join(tls::CA_CERT_FILE).exists() {
                    tls::init_dev_ca(&dir, &agent.trust_domain, tls::DEFAULT_CA_DAYS, false)?;
                }
                tracing::warn!(dir = %dir.display(), "no CA configured: using a development CA of this node only; cross-node mTLS needs caCertFile/caKeyFile shared by all nodes");
                (dir.join(tls::CA_CERT_FILE), dir.join(tls::CA_KEY_FILE))
            }
        };
        let ca = LocalCa::load(&ca_cert, &ca_key)?;
        let mut roots = vec![ca_cert];
        roots.extend(agent.trust_root_files.iter().cloned());
        let bundle = TrustBundle::from_pem_files(&roots)?;
        let options = StoreOptions {
            lifetime: agent.cert_lifetime,
            ..StoreOptions::default()
        };
        let store = CertStore::new(Arc::new(ca), bundle, options);
        let rotation = store.spawn_rotation();
        let pool = Pool::new(
            store.clone(),
            PoolOptions {
                connect_timeout: agent.connect_timeout,
                idle_timeout: agent.tunnel_idle_timeout,
                ..PoolOptions::default()
            },
        );
        let server_options = ServerOptions {
            connect_timeout: agent.connect_timeout,
            idle_timeout: agent.idle_timeout,
            ..ServerOptions::default()
        };
        Ok(Self {
            store,
            pool,
            server_options,
            _rotation: rotation,
        })
    }

    /// Issues (if needed) the certificate of `identity`.
    pub async fn ensure(&self, identity: &SpiffeId) -> Result<(), MeshTlsError> {
        self.store.ensure(identity).await?;
        Ok(())
    }

    /// Starts the pod's tunnel server on `listener` (inside its netns).
    pub fn serve_pod(
        &self,
        ctx: &Arc<ProxyContext>,
        pod: &PodHandle,
        identity: SpiffeId,
        listener: TcpListener,
    ) -> Result<JoinHandle<()>, MeshTlsError> {
        let (ctx, pod) = (ctx.clone(), pod.clone());
        let handler = move |request: ConnectRequest| {
            let (ctx, pod) = (ctx.clone(), pod.clone());
            async move { accept_stream(&ctx, &pod, request).await }
        };
        Ok(
            Server::new(&self.store, identity, handler, self.server_options.clone())?
                .spawn(listener),
        )
    }
}

/// A tunnel stream arrived for this pod: check the target is the pod itself, authorize the
/// client identity, and connect to the app from inside the pod.
async fn accept_stream(
    ctx: &ProxyContext,
    pod: &PodHandle,
    request: ConnectRequest,
) -> Result<TrackedStream, Refusal> {
    let config = ctx.config.load_full();
    let agent = config.agent();
    let target = request.authority;
    let Some(workload) = config.local_workload(&pod.key) else {
        return Err(Refusal::Unavailable(format!(
            "{} is not served here",
            pod.key
        )));
    };
    // Only the pod's own addresses: never its loopback services or another host.
    if !workload
        .ips
        .iter()
        .any(|ip| ip.to_canonical() == target.ip().to_canonical())
    {
        ctx.metrics.connection("tunnel", "bad_target");
        return Err(Refusal::Forbidden(format!(
            "{target} is not an address of {}",
            pod.key
        )));
    }
    let (first, last) = agent.proxy_port_range();
    if (first..=last).contains(&target.port()) {
        return Err(Refusal::Forbidden(format!(
            "port {} belongs to the proxy",
            target.port()
        )));
    }
    let client = request.client_identity.to_string();
    let decision = authz::authorize(&config, Some(&client), workload, target.port());
    if !decision.allowed {
        tracing::info!(target: "access", direction = "tunnel", pod = %pod.key, %client, %target, result = "denied", reason = decision.reason, policy = ?decision.policy);
        ctx.metrics.connection("tunnel", "denied");
        return Err(Refusal::Forbidden(decision.reason.to_owned()));
    }
    // Tunnel streams count against the same node-wide limit as plaintext connections.
    let slot = ctx
        .connection_slots
        .clone()
        .try_acquire_owned()
        .map_err(|_| Refusal::Unavailable("the node is at its connection limit".into()))?;
    let tracked = ctx.connections.track(Subject {
        source: Some(client.clone()),
        destination: pod.key.clone(),
        port: target.port(),
    });
    let stream = outbound::connect(pod, target, agent)
        .await
        .map_err(|error| {
            ctx.metrics.connection("tunnel", "connect_failed");
            Refusal::Unreachable(format!("{target}: {error}"))
        })?;
    ctx.metrics.connection("tunnel", "accepted");
    tracing::info!(target: "access", direction = "tunnel", pod = %pod.key, %client, peer = %request.peer_addr, %target, result = "accepted");
    TrackedStream::new(stream, tracked, slot)
        .map_err(|error| Refusal::Unavailable(error.to_string()))
}

/// Opens a tunnel stream from `pod` (with its own identity) to `target`, a pod of another node
/// whose identity must be `expected`.
pub async fn connect_remote(
    mesh: &MeshTls,
    pod: &PodHandle,
    expected: &SpiffeId,
    target: SocketAddr,
    agent: &AgentConfig,
) -> Result<tunnel::TunnelStream, tunnel::PoolError> {
    let tunnel_addr = SocketAddr::new(target.ip(), agent.tunnel_port);
    let source = pod.identity.clone();
    let agent = agent.clone();
    let pod = pod.clone();
    mesh.pool
        .connect(
            &source,
            expected,
            tunnel_addr,
            target,
            move |addr| async move {
                // The tunnel's TCP connection leaves from the source pod, with the proxy mark.
                outbound::connect(&pod, addr, &agent).await
            },
        )
        .await
}

/// The listener of a pod's tunnel server: dual-stack `[::]:port` where the pod has IPv6,
/// else `0.0.0.0:port`.
pub fn tunnel_listener(
    pod: &PodHandle,
    port: u16,
    mark: u32,
) -> Result<TcpListener, super::ProxyError> {
    let any6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port);
    let any4 = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), port);
    let listener = pod
        .netns
        .run_blocking(move || {
            socket::dual_stack_listener(any6, mark).or_else(|_| socket::listener(any4, mark))
        })?
        .map_err(|source| super::ProxyError::Listen {
            addr: any6,
            netns: pod.key.clone(),
            source,
        })?;
    TcpListener::from_std(listener).map_err(|source| super::ProxyError::Listen {
        addr: any6,
        netns: pod.key.clone(),
        source,
    })
}

/// The upstream of a tunnel stream: registered for revocation, and shut down (both ways)
/// when a policy change revokes it, which ends the tunnel server's copy.
pub struct TrackedStream {
    stream: TcpStream,
    _watch: JoinHandle<()>,
    /// Held while the stream lives.
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl TrackedStream {
    fn new(
        stream: TcpStream,
        tracked: super::registry::Tracked,
        slot: tokio::sync::OwnedSemaphorePermit,
    ) -> std::io::Result<Self> {
        let fd: OwnedFd = stream.as_fd().try_clone_to_owned()?;
        let watch = tokio::spawn(async move {
            tracked.revoked().await;
            let _ = socket2::SockRef::from(&fd).shutdown(std::net::Shutdown::Both);
        });
        Ok(Self {
            stream,
            _watch: watch,
            _slot: slot,
        })
    }
}

impl Drop for TrackedStream {
    fn drop(&mut self) {
        // The connection is over: stop watching (this also deregisters it).
        self._watch.abort();
    }
}

impl AsyncRead for TrackedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TrackedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
