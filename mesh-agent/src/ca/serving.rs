//! The CA API's own certificate: issued by the CA to itself at start (identity
//! `spiffe://<trust-domain>/ca`, server authentication only, a key that never leaves the
//! process) and renewed at half-life, so a CA running for months never presents an expired
//! one. Nodes check it against their trust bundle, as any peer.

use std::{fmt, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PublicKeyData};
use rustls::{
    pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::task::JoinHandle;

use super::server::Authority;
use crate::tls::{self, CaError, ControlId, LocalCa};

/// Lifetime of the API's certificate.
const LIFETIME: Duration = Duration::from_secs(24 * 3600);

pub(super) struct ServingCert {
    id: ControlId,
    current: ArcSwap<CertifiedKey>,
}

impl fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServingCert").field("id", &self.id).finish()
    }
}

impl ServingCert {
    pub(super) fn issue(signer: &LocalCa, id: ControlId) -> Result<Arc<Self>, CaError> {
        let current = ArcSwap::from_pointee(certified(signer, &id)?);
        Ok(Arc::new(Self { id, current }))
    }

    /// Renews the certificate at half its lifetime (an hour later after a failure).
    pub(super) fn spawn_renewal(self: &Arc<Self>, authority: Arc<Authority>) -> JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut wait = LIFETIME / 2;
            loop {
                tokio::time::sleep(wait).await;
                match certified(&authority.signer, &this.id) {
                    Ok(key) => {
                        this.current.store(Arc::new(key));
                        wait = LIFETIME / 2;
                    }
                    Err(error) => {
                        tracing::error!(%error, "renewing the CA API's certificate");
                        wait = Duration::from_secs(3600);
                    }
                }
            }
        })
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn certified(signer: &LocalCa, id: &ControlId) -> Result<CertifiedKey, CaError> {
    let fail = |reason: String| CaError::Sign {
        identity: id.to_string(),
        reason,
    };
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| fail(e.to_string()))?;
    let chain = signer.sign_control_now(id, &key.subject_public_key_info(), LIFETIME)?;
    let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing = tls::provider()
        .key_provider
        .load_private_key(private)
        .map_err(|e| fail(e.to_string()))?;
    Ok(CertifiedKey::new(chain, signing))
}
