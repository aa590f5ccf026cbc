//! The node's mTLS state, built once at start from the agent settings: the certificate store
//! for the identities of this node's pods (with rotation), the client pool of tunnels to other
//! nodes' pods, and the options of every pod's tunnel server. The proxy opens the listeners
//! and decides what each stream may do; this only holds the shared pieces.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use tokio::{net::TcpListener, task::JoinHandle};

use super::{Pool, PoolOptions, Server, ServerError, ServerOptions, StreamHandler};
use crate::{
    config::StartupSettings,
    metrics::Metrics,
    tls::{self, CertStore, LocalCa, SpiffeId, StoreOptions, TrustBundle},
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
    Server(Box<ServerError>),
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
);

/// Where the agent keeps its development CA when none is configured.
pub fn dev_ca_dir(bpf_name: &str) -> PathBuf {
    Path::new("/run/mesh-agent").join(bpf_name).join("dev-ca")
}

pub struct MeshTls {
    pub store: Arc<CertStore>,
    pub pool: Pool,
    server_options: ServerOptions,
    _rotation: JoinHandle<()>,
}

impl MeshTls {
    /// Loads the configured CA (or creates a development CA for this agent when none is
    /// configured), the trust bundle (the CA plus `trustRootFiles`), and starts rotation.
    /// Connect timeouts are the caller's (they apply live); the pool's own bound its
    /// handshakes.
    pub fn start(agent: &StartupSettings, metrics: &Metrics) -> Result<Self, MeshTlsError> {
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
                idle_timeout: agent.tunnel_idle_timeout,
                metrics: metrics.tunnel("client"),
                ..PoolOptions::default()
            },
        );
        Ok(Self {
            store,
            pool,
            server_options: ServerOptions {
                metrics: metrics.tunnel("server"),
                ..ServerOptions::default()
            },
            _rotation: rotation,
        })
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
