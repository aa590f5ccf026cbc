//! The node's mTLS state, built once at start from the agent settings: the signer (the CA off
//! the node when `agent.ca` is set, else the development shortcut of a CA key on the node),
//! the certificate store for the identities of this node's pods (with rotation), the client
//! pool of tunnels to other nodes' pods, and the options of every pod's tunnel server. The
//! proxy opens the listeners and decides what each stream may do; this only holds the shared
//! pieces.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use tokio::{net::TcpListener, task::JoinHandle};

use super::{Pool, PoolOptions, Server, ServerError, ServerOptions, StreamHandler};
use crate::{
    config::{CaCredential, StartupSettings},
    metrics::Metrics,
    tls::{
        self, CaHealth, CertStore, LocalCa, NodeCredential, RemoteSigner, RemoteSignerOptions,
        Signer, SpiffeId, StoreOptions, TrustBundle,
    },
};

/// One request to the CA, connect to answer.
const CA_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

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
    Server(Box<ServerError>),
    #[error(transparent)]
    Remote(Box<tls::RemoteError>),
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
    Server(ServerError),
    Remote(tls::RemoteError),
);

/// Where the agent keeps its development CA when none is configured.
pub fn dev_ca_dir(bpf_name: &str) -> PathBuf {
    Path::new("/run/mesh-agent").join(bpf_name).join("dev-ca")
}

/// Where this node's certificates come from.
enum CaMode {
    /// The CA key is on the node (`caCertFile`/`caKeyFile`, or a development CA).
    Local,
    /// The CA off the node, and the task that checks it is reachable.
    Remote {
        signer: Arc<RemoteSigner>,
        _check: JoinHandle<()>,
    },
}

pub struct MeshTls {
    pub store: Arc<CertStore>,
    pub pool: Pool,
    ca: CaMode,
    server_options: ServerOptions,
    _rotation: JoinHandle<()>,
}

impl MeshTls {
    /// Sets up the signer — the CA off the node (`agent.ca`: the trust bundle is
    /// `trustRootFiles`, and no CA key or development CA is read or made), or the configured
    /// CA key (or a development CA made for this agent when none is configured; the bundle is
    /// the CA plus `trustRootFiles`) — and starts rotation.
    /// Connect timeouts are the caller's (they apply live); the pool's own bound its
    /// handshakes.
    pub fn start(agent: &StartupSettings, metrics: &Metrics) -> Result<Self, MeshTlsError> {
        let (signer, bundle, ca): (Arc<dyn Signer>, TrustBundle, CaMode) = match &agent.ca {
            Some(remote) => {
                // No CA key and no development CA on this node: only the roots.
                let bundle = TrustBundle::from_pem_files(&agent.trust_root_files)?;
                let signer = Arc::new(RemoteSigner::new(RemoteSignerOptions {
                    address: remote.address.clone(),
                    trust_domain: agent.trust_domain.clone(),
                    node: agent.node.clone(),
                    credential: match &remote.credential {
                        CaCredential::NodeCertificate {
                            node_cert_file,
                            node_key_file,
                        } => NodeCredential::Certificate {
                            cert_file: node_cert_file.clone(),
                            key_file: node_key_file.clone(),
                        },
                        CaCredential::Token { token_file } => NodeCredential::Token {
                            file: token_file.clone(),
                        },
                    },
                    bundle: bundle.clone(),
                    request_timeout: CA_REQUEST_TIMEOUT,
                })?);
                tracing::info!(address = %remote.address, "certificates come from the CA off the node");
                let check = tokio::spawn(check_loop(signer.clone(), remote.check_interval));
                let ca = CaMode::Remote {
                    signer: signer.clone(),
                    _check: check,
                };
                (signer, bundle, ca)
            }
            None => {
                let (ca, bundle) = local_ca(agent)?;
                (Arc::new(ca), bundle, CaMode::Local)
            }
        };
        let options = StoreOptions {
            lifetime: agent.cert_lifetime,
            ..StoreOptions::default()
        };
        let store = CertStore::new(signer, bundle, options);
        let rotation = store.spawn_rotation();
        let pool = Pool::new(
            store.clone(),
            PoolOptions {
                idle_timeout: agent.tunnel_idle_timeout,
                connections_per_peer: agent
                    .tunnel_connections_per_peer
                    .unwrap_or_else(super::default_connections_per_peer),
                metrics: metrics.tunnel("client"),
                ..PoolOptions::default()
            },
        );
        Ok(Self {
            store,
            pool,
            ca,
            server_options: ServerOptions {
                metrics: metrics.tunnel("server"),
                ..ServerOptions::default()
            },
            _rotation: rotation,
        })
    }

    /// What the node knows of the CA off the node; `None` with a CA key on the node.
    pub fn ca_health(&self) -> Option<(&str, CaHealth)> {
        match &self.ca {
            CaMode::Local => None,
            CaMode::Remote { signer, .. } => Some((signer.address(), signer.health())),
        }
    }

    /// Issues (if needed) the certificate of `identity`.
    pub async fn ensure(&self, identity: &SpiffeId) -> Result<(), MeshTlsError> {
        self.store.ensure(identity).await?;
        Ok(())
    }

    /// Serves tunnels to `identity` on `listener` (opened in the pod's netns), each stream
    /// handed to `handler`. `identity` must have been [`ensure`](Self::ensure)d.
    pub fn serve<H: StreamHandler>(
        &self,
        identity: SpiffeId,
        handler: H,
        listener: TcpListener,
    ) -> Result<JoinHandle<()>, MeshTlsError> {
        Ok(
            Server::new(&self.store, identity, handler, self.server_options.clone())?
                .spawn(listener),
        )
    }
}

/// The development shortcut: the CA key on the node (configured, or a development CA of this
/// node made on first start), and the bundle of its certificate and `trustRootFiles`.
fn local_ca(agent: &StartupSettings) -> Result<(LocalCa, TrustBundle), MeshTlsError> {
    let (ca_cert, ca_key) = match (&agent.ca_cert_file, &agent.ca_key_file) {
        (Some(cert), Some(key)) => (cert.clone(), key.clone()),
        _ => {
            let dir = dev_ca_dir(&agent.bpf_name);
            if !dir.join(tls::CA_CERT_FILE).exists() {
                tls::init_dev_ca(&dir, &agent.trust_domain, tls::DEFAULT_CA_DAYS, false)?;
            }
            tracing::warn!(dir = %dir.display(), "no CA configured: using a development CA of this node only; cross-node mTLS needs caCertFile/caKeyFile shared by all nodes, or agent.ca");
            (dir.join(tls::CA_CERT_FILE), dir.join(tls::CA_KEY_FILE))
        }
    };
    let ca = LocalCa::load(&ca_cert, &ca_key)?;
    let mut roots = vec![ca_cert];
    roots.extend(agent.trust_root_files.iter().cloned());
    Ok((ca, TrustBundle::from_pem_files(&roots)?))
}

/// Checks the CA every `interval`, logging when it becomes unreachable or comes back.
async fn check_loop(signer: Arc<RemoteSigner>, interval: std::time::Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_reachable = None;
    loop {
        tick.tick().await;
        let result = signer.check().await;
        let reachable = result.is_ok();
        if was_reachable != Some(reachable) {
            match result {
                Ok(()) => tracing::info!(address = %signer.address(), "the CA is reachable"),
                Err(error) => {
                    tracing::warn!(address = %signer.address(), %error, "the CA is unreachable; current certificates stay in use")
                }
            }
        }
        was_reachable = Some(reachable);
    }
}
