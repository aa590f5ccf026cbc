//! The certificate authority off the nodes: `mesh-agent ca serve` (the same binary, another
//! role; a process locally, a Deployment in Kubernetes) and `mesh-agent ca issue-node`.
//!
//! Why: an agent holding the CA key lets whoever owns one node mint any identity of the mesh.
//! Here the nodes hold only the trust bundle and their node certificate (in Kubernetes, their
//! pod's service-account token); the CA holds the root or an intermediate key and signs a
//! workload identity for a node only if a pod running as that service account is placed on it. A compromised node can still obtain the identities of
//! its own pods (it runs them), and no other.
//!
//! - [`auth`]: who is asking ([`NodeAuthenticator`]; local mode: the node certificate;
//!   Kubernetes: [`token`], the agent's service-account token by TokenReview).
//! - [`placement`]: which identities a node may have ([`Placement`]; local mode: the mesh
//!   configuration file; Kubernetes: [`pods`], the CA's own watch of pods).
//! - [`server`]: the TLS API (mutual locally) and its limits.
//! - [`serving`]: the CA API's own certificate, issued by the CA to itself and renewed.

pub mod auth;
pub mod placement;
pub mod pods;
pub mod server;
mod serving;
pub mod token;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PublicKeyData};
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
    task::JoinHandle,
};
use tokio_rustls::TlsAcceptor;

pub use auth::{NodeAuthenticator, NodeCertificate};
pub use placement::{ConfigPlacement, NotSynced, Placement};
pub use pods::PodWatch;
pub use server::{Authority, Limits};
pub use token::{TokenOptions, TokenReviewer};

use crate::{
    config::ConfigError,
    tls::{self, BundleError, CaError, ControlId, LocalCa, TrustBundle},
};

/// The CA API's default port.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:15012";
/// Files `mesh-agent ca issue-node` writes.
pub const NODE_CERT_FILE: &str = "node.crt";
pub const NODE_KEY_FILE: &str = "node.key";

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error("the CA's TLS configuration: {0}")]
    Tls(#[from] tls::ConfigError),
    #[error(transparent)]
    Identity(#[from] tls::ControlIdError),
    #[error("binding the CA API on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the Kubernetes API client: {0}")]
    Kube(#[from] kube::Error),
    #[error("waiting for signals: {0}")]
    Signal(std::io::Error),
}

/// What `mesh-agent ca serve` runs with.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// `ca.crt` (the CA certificate, then its chain up to the root) and `ca.key`.
    pub ca_dir: PathBuf,
    pub mode: Mode,
    pub listen: SocketAddr,
    pub limits: Limits,
}

/// How the CA learns who is asking and what runs where.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Node certificates; placement from the mesh configuration file.
    Local {
        /// The mesh configuration: placement (`workloads`) and the trust domain.
        config: PathBuf,
        /// More roots node certificates may chain to (root rotation), besides the CA's own.
        trust_roots: Vec<PathBuf>,
    },
    /// The agents' service-account tokens (TokenReview); placement from the CA's own watch of
    /// pods. The API server is the one `kube::Client::try_default` finds (in a pod: its
    /// service account).
    Kubernetes {
        trust_domain: String,
        token: TokenOptions,
    },
}

/// A CA serving its API; stops when dropped.
pub struct RunningCa {
    /// Where the API listens (the port chosen when asked for port 0).
    pub addr: SocketAddr,
    pub trust_domain: String,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for RunningCa {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Loads the CA key, the placement and the roots, and starts serving the API.
pub async fn start(options: ServeOptions) -> Result<RunningCa, ServeError> {
    start_with(options, None).await
}

/// [`start`], in Kubernetes mode with `client` when given (tests: a mock API server).
async fn start_with(
    options: ServeOptions,
    client: Option<kube::Client>,
) -> Result<RunningCa, ServeError> {
    match options.mode.clone() {
        Mode::Local {
            config,
            trust_roots,
        } => start_local(options, &config, &trust_roots).await,
        Mode::Kubernetes {
            trust_domain,
            token,
        } => {
            let client = match client {
                Some(client) => client,
                None => kube::Client::try_default().await?,
            };
            start_kubernetes(options, client, &trust_domain, token).await
        }
    }
}

async fn start_local(
    options: ServeOptions,
    config: &Path,
    trust_roots: &[PathBuf],
) -> Result<RunningCa, ServeError> {
    let signer = LocalCa::load_dir(&options.ca_dir)?;
    let placement = Arc::new(ConfigPlacement::watch(config)?);
    let trust_domain = placement.trust_domain();
    // Nodes' certificates chain to the CA's root (the last certificate of its file) or to a
    // root listed for a rotation.
    let own_root = signer.chain().pop().into_iter().collect();
    let mut bundle = TrustBundle::from_ders(own_root)?;
    if !trust_roots.is_empty() {
        bundle = bundle.merged(&TrustBundle::from_pem_files(trust_roots)?);
    }
    let authority = Authority {
        signer,
        trust_domain,
        placement,
        authenticator: Arc::new(NodeCertificate),
        limits: options.limits,
    };
    run(authority, Some(bundle), options.listen, Vec::new()).await
}

/// Kubernetes mode with `client`: the pod watch starts at once; signing waits for its first
/// list (`503` until then).
async fn start_kubernetes(
    options: ServeOptions,
    client: kube::Client,
    trust_domain: &str,
    token: TokenOptions,
) -> Result<RunningCa, ServeError> {
    let signer = LocalCa::load_dir(&options.ca_dir)?;
    let pods = Arc::new(PodWatch::new(trust_domain));
    let watch = pods.spawn(client.clone());
    let authority = Authority {
        signer,
        trust_domain: trust_domain.to_owned(),
        placement: pods.clone(),
        authenticator: Arc::new(TokenReviewer::new(client, pods, token)),
        limits: options.limits,
    };
    run(authority, None, options.listen, vec![watch]).await
}

/// Serves `authority` on `listen`; `node_roots`: client certificates required, chained to them.
async fn run(
    authority: Authority,
    node_roots: Option<TrustBundle>,
    listen: SocketAddr,
    mut tasks: Vec<JoinHandle<()>>,
) -> Result<RunningCa, ServeError> {
    let trust_domain = authority.trust_domain.clone();
    let ca_id = ControlId::ca(&trust_domain)?;
    let serving = serving::ServingCert::issue(&authority.signer, ca_id)?;
    let tls = tls::ca_server_config(node_roots, &trust_domain, serving.clone())?;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: listen,
        source,
    })?;
    let authority = Arc::new(authority);
    tasks.push(serving.spawn_renewal(authority.clone()));
    tasks.push(tokio::spawn(server::serve(
        listener,
        authority,
        TlsAcceptor::from(tls),
    )));
    Ok(RunningCa {
        addr,
        trust_domain,
        tasks,
    })
}

/// `mesh-agent ca serve`: runs the CA until SIGTERM or SIGINT.
pub async fn serve(options: ServeOptions) -> Result<(), ServeError> {
    let mut terminate = signal(SignalKind::terminate()).map_err(ServeError::Signal)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(ServeError::Signal)?;
    let running = start(options).await?;
    tracing::info!(listen = %running.addr, trust_domain = %running.trust_domain, "CA ready");
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    drop(running);
    tracing::info!("CA stopped");
    Ok(())
}

/// `mesh-agent ca issue-node`: a node certificate for `node` (client authentication only,
/// URI SAN `spiffe://<trust-domain>/node/<node>`) valid for `days`, signed by the CA in
/// `ca_dir`, written with its chain to `out/node.crt` and its key to `out/node.key` (0600).
pub fn issue_node(
    ca_dir: &Path,
    trust_domain: &str,
    node: &str,
    days: u32,
    out: &Path,
    force: bool,
) -> Result<(PathBuf, PathBuf), ServeError> {
    let signer = LocalCa::load_dir(ca_dir)?;
    let id = ControlId::node(trust_domain, node)?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| CaError::Sign {
        identity: id.to_string(),
        reason: e.to_string(),
    })?;
    let lifetime = Duration::from_secs(u64::from(days) * 86_400);
    let chain = signer.sign_control_now(&id, &key.subject_public_key_info(), lifetime)?;
    let cert_path = out.join(NODE_CERT_FILE);
    let key_path = out.join(NODE_KEY_FILE);
    std::fs::create_dir_all(out).map_err(|source| CaError::Write {
        path: out.to_owned(),
        source,
    })?;
    let pem: String = chain.iter().map(tls::pem_certificate).collect();
    tls::write_file(&key_path, key.serialize_pem().as_bytes(), 0o600, force)?;
    tls::write_file(&cert_path, pem.as_bytes(), 0o644, force)?;
    Ok((cert_path, key_path))
}

#[cfg(test)]
mod kube_mock;
#[cfg(test)]
mod kube_serve_tests;
#[cfg(test)]
mod pods_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod token_tests;
