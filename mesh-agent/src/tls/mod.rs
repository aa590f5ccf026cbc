//! Node-to-node mTLS: workload identities ([`SpiffeId`]), the CA seam ([`Signer`]: the
//! in-process [`LocalCa`] of the development shortcut, or [`RemoteSigner`], the client of the
//! CA off the node), the trust bundle, the per-identity certificate store with rotation, and
//! the rustls configurations of the tunnel and of the CA's API ([`ControlId`]s).

mod bundle;
mod ca;
pub mod ca_api;
mod cert;
mod config;
mod control;
mod control_tls;
mod dev_ca;
mod handshakes;
mod identity;
mod remote;
mod store;

#[cfg(test)]
mod tests;

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;

pub use bundle::{BundleError, TrustBundle};
pub use ca::{
    CA_CERT_FILE, CA_KEY_FILE, CaError, DEFAULT_CA_DAYS, DEFAULT_LEAF_LIFETIME, LocalCa,
    SignFuture, Signer,
};
pub use cert::{CertError, CertInfo, cert_info, control_id_of, identity_of};
pub use config::{
    ALPN_H2, ConfigError, IdentityMismatch, client_config, peer_identity, server_config,
};
pub use control::{ControlId, ControlIdError};
pub use control_tls::{ControlMismatch, ca_client_config, ca_server_config, peer_node};
pub use dev_ca::{
    DevCa, generate_ca_valid, generate_dev_ca, init_dev_ca, init_intermediate_ca, pem_certificate,
    write_file,
};
pub use handshakes::{HandshakeLimits, HandshakePermit};
pub use identity::{IdentityError, SpiffeId};
#[cfg(test)]
pub(crate) use remote::load_node_identity;
pub use remote::{
    Answer, CaHealth, NodeCredential, RemoteError, RemoteSigner, RemoteSignerOptions,
};
pub use store::{CertStore, StoreError, StoreOptions};

/// The one crypto provider of the mesh: ring (builds without cmake or a C toolchain beyond
/// cc). Explicit rather than the process default, so nothing else in the binary can change it.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}
